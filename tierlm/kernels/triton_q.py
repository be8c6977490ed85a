"""Tiled Triton kernels over raw GGUF blocks: dequantize a weight tile in registers and multiply.

Every kernel reads the GGUF bytes as they sit in the file (rows of ``nblocks`` blocks, no
repacking) and works in float32 from the moment a block is decoded, like ``formats.dequantize``.
Tiles serve several activation rows at once (``qmm_kernel``: FMAs, or ``tl.dot`` where the wrapper
asks for it: tensor cores on sm_80+, FMAs on sm_75), prefill's dequantization (``dequant_kernel``)
and the MoE's sorted path; one-row products use ``triton_gemv``. No kernel here issues a bf16
instruction unless its activations are bf16: bf16 weights are widened by an integer shift.

A decoded tile is (BN, S) float32 with S = NB * BLOCK weights per row, in an order that keeps each
loaded byte in one place (a Q4_K byte's two nibbles sit side by side); ``kidx`` (S,) gives each
column's element index inside the step, and activations are loaded in that same order.

Glossary: M = activation rows, N = weight rows (outputs), K = reduction length, BM/BN = tile rows,
BLOCK = elements of one GGUF block (32 for the float types), NB = blocks per loop step.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # grid dependency control: Triton 3.3+
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    HAS_PDL = True
except ImportError:  # pragma: no cover - older Triton
    HAS_PDL = False

# GGML type ids (gguf.GGMLQuantizationType values) as plain ints, so they can be constexprs.
F32, F16, Q4_0, Q5_0, Q8_0, Q4_K, Q6_K, BF16 = 0, 1, 2, 6, 8, 12, 14, 30

BLOCK_ELEMS = {Q4_K: 256, Q6_K: 256, Q8_0: 32, Q5_0: 32, F16: 32, BF16: 32, F32: 32}
BLOCK_BYTES = {Q4_K: 144, Q6_K: 210, Q8_0: 34, Q5_0: 22, F16: 64, BF16: 64, F32: 128}

# DOT_KIND: the operand type of tl.dot tiles (accumulation is always float32).
DOT_F32, DOT_F16, DOT_BF16 = 0, 1, 2


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """The start of a kernel launched with programmatic dependent launch (sm_90+, ``quant_matmul.pdl_launch``): wait
    until the launch before it has finished and its writes are visible (nothing may be read or written before this),
    then let the launch after it be scheduled, its programs waiting the same way. The launch gap is then spent while
    this kernel runs instead of between kernels."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def row_stride(row_bytes, QTYPE: tl.constexpr):
    """A row's byte stride, with the alignment Triton can prove: it only tracks whether an integer
    argument is divisible by 16, which Q4_K rows (144-byte blocks) always are; every other type's
    rows are whole 2-byte words, which ``(row_bytes // 2) * 2`` shows, so those bytes load in pairs."""
    if QTYPE == 12:
        return row_bytes
    return (row_bytes // 2) * 2


@triton.jit
def q6k_block(wrow, b, dof, ALIGNED: tl.constexpr):
    """Block b of Q6_K rows starting at ``wrow``: (pointer to its 208-byte body of ql, qh and scales, pointer to
    its 2-byte d), in GGUF's layout or, with ALIGNED, in ``kernels.q6k_layout``'s (dof: 208 * blocks per row)."""
    if ALIGNED:
        # b * 208, but known to the compiler only as even, as GGUF's b * 210 is: the tiles then load the bodies two
        # bytes at a time, as they do GGUF's. On rows of 16-byte multiples a plain b * 208 lets Triton load them in
        # 16-byte pieces and pipeline those through shared memory (sm_90 PTX of Triton 3.9: 28 cp.async against 16),
        # which measured 1.2-1.4x slower in the tiles at 3-16 rows and 1.1-1.2x in prefill's dequantizer (H200;
        # bench/results/q6k-layout-rows-NVIDIA_H200-{narrow,wide}.json, q6k-layout-prefill-NVIDIA_H200-narrow.txt)
        return wrow + tl.where(b >= 0, b * 208, b * 210), wrow + dof + b * 2
    else:
        return wrow + b * 210, wrow + b * 210 + 208


@triton.jit
def _f(bits):
    """int32 bit pattern -> float32."""
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _f16_at(p, mask):
    """fp16 stored at byte pointer ``p`` (2-byte aligned) -> float32."""
    return tl.load(p.to(tl.pointer_type(tl.float16)), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _q4k_scale_min(blk, s, mask):
    """Q4_K group s (0..7): (d * scale, dmin * min) as float32."""
    sb = blk + 4
    a = tl.load(sb + s, mask=mask, other=0).to(tl.int32)  # s<4: scale; s>=4: min's top bits
    c = tl.load(sb + s + 4, mask=mask, other=0).to(tl.int32)  # s<4: min; s>=4: both low nibbles
    e = tl.load(sb + s % 4, mask=mask, other=0).to(tl.int32)  # s>=4: scale's top bits
    low = s < 4
    sc = tl.where(low, a & 63, (c & 15) | ((e >> 6) << 4)).to(tl.float32)
    mn = tl.where(low, c & 63, (c >> 4) | ((a >> 6) << 4)).to(tl.float32)
    return _f16_at(blk, mask) * sc, _f16_at(blk + 2, mask) * mn


@triton.jit
def _dequant_tile(wrow, kb, kend, nmask, QTYPE: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr,
                  FLAT: tl.constexpr, ALIGNED: tl.constexpr, dof):
    """Blocks kb .. kb+NB-1 of BN weight rows -> (w (BN, NB*BLOCK) float32, kidx (NB*BLOCK,) int32).

    wrow: (BN,) uint8 pointers to the rows' first byte; nmask: (BN,) valid rows; blocks >= kend
    read as 0. ALIGNED, dof: Q6_K rows in the aligned layout (``q6k_block``). FLAT=False skips the final
    reshape: w keeps the rank its type decodes in (rows first), and kidx has the same rank with a leading 1, which
    is all a store needs. Nibbles and 6-bit values become floats as ``(q << s) & m | 1.0f`` = 1 + q/2**b, so a
    weight is one FMA ``A * f - B`` with A, B folded from the block's scales.
    """
    wr = wrow[:, None, None]
    nm = nmask[:, None, None]
    if QTYPE == 12:  # Q4_K: d, dmin, 12 bytes of 6-bit (scale, min) x 8, 128 bytes of nibbles
        cc = tl.arange(0, 4 * NB)[None, :, None]  # 32-byte chunk: group 2c in low nibbles, 2c+1 in high
        j = tl.arange(0, 32)[None, None, :]
        b = kb + cc // 4
        c = cc % 4
        mask = nm & (b < kend)
        blk = wr + b * 144
        sl, ml = _q4k_scale_min(blk, 2 * c, mask)
        sh, mh = _q4k_scale_min(blk, 2 * c + 1, mask)
        q = tl.load(blk + 16 + c * 32 + j, mask=mask, other=0).to(tl.int32)  # (BN, 4NB, 32)
        wl = (16.0 * sl) * _f(((q << 19) & 0x00780000) | 0x3F800000) - (16.0 * sl + ml)
        wh = (16.0 * sh) * _f(((q << 15) & 0x00780000) | 0x3F800000) - (16.0 * sh + mh)
        klo = cc * 64 + j  # element of the low nibble inside the step
        w, kidx = tl.join(wl, wh), tl.join(klo, klo + 32)  # (BN, 4NB, 32, 2)
    elif QTYPE == 14:  # Q6_K: 128 bytes low nibbles, 64 bytes 2-bit highs, 16 int8 scales, d
        hh = tl.arange(0, 2 * NB)[None, :, None, None]  # 128-element half
        t = tl.arange(0, 2)[None, None, :, None]  # 16-lane group inside a 32-element row
        i = tl.arange(0, 16)[None, None, None, :]
        b = kb + hh // 2
        h = hh % 2
        mask = nmask[:, None, None, None] & (b < kend)
        blk, dp = q6k_block(wrow[:, None, None, None], b, dof, ALIGNED)
        lane = t * 16 + i
        qa = tl.load(blk + h * 64 + lane, mask=mask, other=0).to(tl.int32)  # rows 0 (low), 2 (high)
        qb = tl.load(blk + h * 64 + 32 + lane, mask=mask, other=0).to(tl.int32)  # rows 1, 3
        qh = tl.load(blk + 128 + h * 32 + lane, mask=mask, other=0).to(tl.int32)
        d = 64.0 * _f16_at(dp, mask)
        sp = (blk + 192 + h * 8 + t).to(tl.pointer_type(tl.int8))
        a0 = d * tl.load(sp, mask=mask, other=0).to(tl.float32)
        a1 = d * tl.load(sp + 2, mask=mask, other=0).to(tl.float32)
        a2 = d * tl.load(sp + 4, mask=mask, other=0).to(tl.float32)
        a3 = d * tl.load(sp + 6, mask=mask, other=0).to(tl.float32)
        w0 = a0 * _f((((qa & 15) | ((qh & 3) << 4)) << 17) | 0x3F800000) - 1.5 * a0
        w1 = a1 * _f((((qb & 15) | (((qh >> 2) & 3) << 4)) << 17) | 0x3F800000) - 1.5 * a1
        w2 = a2 * _f(((((qa >> 4) & 15) | (((qh >> 4) & 3) << 4)) << 17) | 0x3F800000) - 1.5 * a2
        w3 = a3 * _f(((((qb >> 4) & 15) | (((qh >> 6) & 3) << 4)) << 17) | 0x3F800000) - 1.5 * a3
        k0 = hh * 128 + lane  # row 0's element inside the step; row r adds 32r
        w = tl.join(tl.join(w0, w1), tl.join(w2, w3))  # (BN, 2NB, 2, 16, 2, 2)
        kidx = tl.join(tl.join(k0, k0 + 32), tl.join(k0 + 64, k0 + 96))
    else:  # 32-element blocks, natural order
        g = tl.arange(0, NB)[None, :, None]
        l = tl.arange(0, 32)[None, None, :]
        b = kb + g
        mask = nm & (b < kend)
        if QTYPE == 8:  # Q8_0: d, 32 int8
            blk = wr + b * 34
            q = tl.load((blk + 2 + l).to(tl.pointer_type(tl.int8)), mask=mask, other=0).to(tl.int32)
            d = 256.0 * _f16_at(blk, mask)
            w = d * _f(((q + 128) << 15) | 0x3F800000) - 1.5 * d
        elif QTYPE == 6:  # Q5_0: d, 32 fifth bits (u32 LE), 16 bytes of nibbles (lanes l and l+16)
            blk = wr + b * 22
            hb = tl.load(blk + 2 + l // 8, mask=mask, other=0).to(tl.int32)
            qs = tl.load(blk + 6 + l % 16, mask=mask, other=0).to(tl.int32)
            q = ((qs >> ((l // 16) * 4)) & 15) | (((hb >> (l % 8)) & 1) << 4)
            d = 32.0 * _f16_at(blk, mask)
            w = d * _f((q << 18) | 0x3F800000) - 1.5 * d
        elif QTYPE == 1:  # F16
            w = tl.load(wr.to(tl.pointer_type(tl.float16)) + b * 32 + l, mask=mask, other=0.0).to(tl.float32)
        elif QTYPE == 30:  # BF16, widened by a shift (no bf16 instruction)
            bits = tl.load(wr.to(tl.pointer_type(tl.uint16)) + b * 32 + l, mask=mask, other=0).to(tl.uint32)
            w = (bits << 16).to(tl.float32, bitcast=True)
        else:  # F32
            w = tl.load(wr.to(tl.pointer_type(tl.float32)) + b * 32 + l, mask=mask, other=0.0)
        kidx = g * 32 + l  # (1, NB, 32)
    if FLAT:
        w = tl.reshape(w, [w.shape[0], NB * BLOCK])
        kidx = tl.reshape(kidx, [NB * BLOCK])
    return w, kidx


@triton.jit
def _x_tile(xrow, xmask, kb, kend, QTYPE: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr):
    """Activations of blocks kb .. kb+NB-1 for BM rows -> (BM, NB*BLOCK), in ``_dequant_tile``'s
    column order: loaded contiguously (wide loads) and permuted by the same join/reshape."""
    xr = xrow[:, None, None]
    xm = xmask[:, None, None]
    if QTYPE == 12:
        cc = tl.arange(0, 4 * NB)[None, :, None]
        off = kb * 256 + cc * 64 + tl.arange(0, 32)[None, None, :]
        m = xm & (kb + cc // 4 < kend)
        x = tl.join(tl.load(xr + off, mask=m, other=0.0), tl.load(xr + off + 32, mask=m, other=0.0))
    elif QTYPE == 14:
        hh = tl.arange(0, 2 * NB)[None, :, None, None]
        off = (kb * 256 + hh * 128 + tl.arange(0, 2)[None, None, :, None] * 16
               + tl.arange(0, 16)[None, None, None, :])
        xr4 = xrow[:, None, None, None]
        m = xmask[:, None, None, None] & (kb + hh // 2 < kend)
        x0 = tl.load(xr4 + off, mask=m, other=0.0)
        x1 = tl.load(xr4 + off + 32, mask=m, other=0.0)
        x2 = tl.load(xr4 + off + 64, mask=m, other=0.0)
        x3 = tl.load(xr4 + off + 96, mask=m, other=0.0)
        x = tl.join(tl.join(x0, x1), tl.join(x2, x3))
    else:
        g = tl.arange(0, NB)[None, :, None]
        x = tl.load(xr + kb * 32 + g * 32 + tl.arange(0, 32)[None, None, :], mask=xm & (kb + g < kend), other=0.0)
    return tl.reshape(x, [x.shape[0], NB * BLOCK])


@triton.jit
def _to_dot(t, DOT_KIND: tl.constexpr):
    if DOT_KIND == 1:
        return t.to(tl.float16)
    elif DOT_KIND == 2:
        return t.to(tl.bfloat16)
    else:
        return t.to(tl.float32)


@triton.jit
def _mac(xrow, xmask, wrow, nmask, kb0, kend,
         QTYPE: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_DOT: tl.constexpr,
         DOT_KIND: tl.constexpr, DOT_PREC: tl.constexpr, ALIGNED: tl.constexpr, dof):
    """Sum over GGUF blocks kb0..kend-1 of x[m] . w[n] -> (BLOCK_M, BLOCK_N) float32, BLOCK_M >= 2.

    xrow: (BLOCK_M,) pointers to activation rows, xmask their validity; wrow: (BLOCK_N,) uint8
    pointers to weight rows, nmask their validity. FMAs over a (BM, BN, S) product, or tl.dot.
    ALIGNED, dof: Q6_K rows in the aligned layout (``q6k_block``).
    """
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(kb0, kend, NB):
        w, kidx = _dequant_tile(wrow, kb, kend, nmask, QTYPE, NB, BLOCK, True, ALIGNED, dof)  # (BN, S), (S,)
        xv = _x_tile(xrow, xmask, kb, kend, QTYPE, NB, BLOCK)  # (BM, S), same column order
        if USE_DOT:
            acc = tl.dot(_to_dot(xv, DOT_KIND), tl.trans(_to_dot(w, DOT_KIND)), acc, input_precision=DOT_PREC)
        else:
            acc += tl.sum(xv.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)  # (BM, BN, S) -> (BM, BN)
    return acc


@triton.jit
def qmm_kernel(x_ptr, w_ptr, out_ptr, M, N, nblocks, row_bytes, stride_xm, stride_om, stride_os, blocks_per_split,
               QTYPE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               NB: tl.constexpr, USE_DOT: tl.constexpr, DOT_KIND: tl.constexpr, DOT_PREC: tl.constexpr,
               ALIGNED: tl.constexpr = False):
    """out[pid_k, m, n] = sum over this split's blocks of x[m, :] . dequant(w[n, :]) (ALIGNED: Q6_K rows in the
    aligned layout).

    Grid: (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), splits). Split s covers blocks
    [s * blocks_per_split, (s + 1) * blocks_per_split); its partial sums go to out + s * stride_os.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    nmask = offs_n < N
    xrow = x_ptr + offs_m.to(tl.int64) * stride_xm
    wrow = w_ptr + offs_n.to(tl.int64) * row_stride(row_bytes, QTYPE)
    kb0 = pid_k * blocks_per_split
    kend = tl.minimum(kb0 + blocks_per_split, nblocks)
    acc = _mac(xrow, mmask, wrow, nmask, kb0, kend, QTYPE, NB, BLOCK, BLOCK_M, BLOCK_N, USE_DOT, DOT_KIND, DOT_PREC,
               ALIGNED, nblocks * 208)
    optr = out_ptr + pid_k.to(tl.int64) * stride_os + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def dequant_kernel(w_ptr, out_ptr, N, K, nblocks, row_bytes,
                   QTYPE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, NB: tl.constexpr,
                   ALIGNED: tl.constexpr = False):
    """out[n, k] = dequant(w)[n, k] in out's dtype (ALIGNED: Q6_K rows in the aligned layout). Grid:
    (cdiv(N, BLOCK_N), cdiv(nblocks, NB))."""
    kb = tl.program_id(1) * NB
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    # stored in the rank the type decodes in: a reshape to (BN, S) would cost a layout change
    wrow = w_ptr + offs_n.to(tl.int64) * row_stride(row_bytes, QTYPE)
    w, kidx = _dequant_tile(wrow, kb, nblocks, nmask, QTYPE, NB, BLOCK, False, ALIGNED, nblocks * 208)
    k = kb * BLOCK + kidx
    if QTYPE == 12:
        rows = offs_n[:, None, None, None]
    elif QTYPE == 14:
        rows = offs_n[:, None, None, None, None, None]
    else:
        rows = offs_n[:, None, None]
    tl.store(out_ptr + rows.to(tl.int64) * K + k, w.to(out_ptr.dtype.element_ty), mask=(rows < N) & (k < K))
