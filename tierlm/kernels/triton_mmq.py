"""Decode products of a few activation rows (up to 16) on tensor cores, straight from GGUF bytes.

One program owns BN weight rows and one K range (split-K: the programs of one output add their
partial sums afterwards). Each loop step decodes NB GGUF blocks of its BN rows in registers to the
activations' dtype (fp16 or bf16) and multiplies them with all of the (up to BM = 16) activation
rows in ``tl.dot``, so a weight byte is read and decoded once whatever the number of rows. The
activations stay in their float dtype (no int8 groups as in ``triton_mmvq``): at 16 rows the
tensor cores make the multiply free, and the weight decode is what costs.

Each type is decoded in the order its bytes sit in, as several tiles per step that each take one
``tl.dot``; the activations are loaded in each tile's order, in contiguous runs of 32 or 16:
- Q4_K (one block per step): eight (32, BN) tiles, one per sub-block, all tensors 2-D with the
  weight rows last; the nibbles become fp16 or bf16 pairs in inline PTX (``_Q4K_HALF2``,
  ``_Q4K_BF16X2``; the interpreter takes the float32 twin). Its loads are 4 bytes or wider, so Triton's
  pipeliner streams them through shared memory (cp.async) ahead of the math;
- Q6_K: four (BN, 64 NB) tiles per step, one per 2-bit plane of its high bytes;
- Q8_0, Q5_0: one (BN, 32 NB) tile per step in natural order.
Q6_K, Q8_0 and Q5_0 blocks are only 2-byte aligned, too narrow for cp.async, so their loads are not
pipelined. Forms measured and dropped (a Q4_K step of (BN, 128) tiles, Q6_K tiles of 16, Q6_K with
the next step's bytes loaded first) are in bench/results/decode-rows-NVIDIA_H200.md. Nibbles and
6-bit values turn into floats as ``(q << s) & m | 1.0f`` = 1 + q/2**b, so a weight is one FMA
``A * f - B``.

Where the card has no tensor cores for Triton (Turing), ``tl.dot`` becomes FMAs; the wrappers then
keep the int8-activation kernels (``quant_matmul.pick_config``).

Glossary: M = activation rows (BM = 16 per program), N = weight rows (BN per program), K = inputs,
NB = GGUF blocks per loop step, S = weights of one row in one step's tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tierlm.kernels.triton_q import (BLOCK_ELEMS, Q4_K, _dequant_tile, _f, _f16_at, _to_dot, _x_tile, q6k_block,
                                     row_stride)


def step_blocks(qtype: int, nblk: int) -> int:
    """GGUF blocks per loop step for ``nblk`` 256-element blocks (Q4_K: always one)."""
    return 1 if qtype == Q4_K else nblk * 256 // BLOCK_ELEMS[qtype]


@triton.jit
def _q6k_plane(acc, xp, xmask, qv, qh, sp, d, wmask, R: tl.constexpr, S: tl.constexpr, DOT_KIND: tl.constexpr):
    """Plane R of a Q6_K step: the 6-bit values of elements 128h + 32R + l, scale 8h + 2R + l // 16."""
    a = d * tl.load(sp + 2 * R, mask=wmask, other=0).to(tl.float32)  # (BN, NB, 2, 2, 1)
    q = ((qv >> (4 * (R // 2))) & 15) | (((qh >> (2 * R)) & 3) << 4)
    w = a * _f((q << 17) | 0x3F800000) - 1.5 * a  # (BN, NB, 2, 2, 16): 64 a (1 + q/64) - 96 a = a (q - 32)
    x = tl.load(xp + 32 * R, mask=xmask, other=0.0)  # (BM, NB, 2, 2, 16)
    return tl.dot(_to_dot(tl.reshape(x, [x.shape[0], S]), DOT_KIND),
                  tl.trans(_to_dot(tl.reshape(w, [w.shape[0], S]), DOT_KIND)), acc)


@triton.jit
def _q6k_step(acc, xrow, mmask, wrow, nmask, kb, kend, NB: tl.constexpr, DOT_KIND: tl.constexpr,
              ALIGNED: tl.constexpr, dof):
    """Blocks kb .. kb+NB-1: low-nibble bytes (two loads), high bytes (one), then four dots of K = 64 NB
    (ALIGNED, dof: rows in the aligned layout, ``triton_q.q6k_block``)."""
    b = kb + tl.arange(0, NB)[None, :, None, None, None]  # (1, NB, 1, 1, 1)
    h = tl.arange(0, 2)[None, None, :, None, None]  # 128-element half
    g = tl.arange(0, 2)[None, None, None, :, None]  # 16-element group: its own scale
    l = g * 16 + tl.arange(0, 16)[None, None, None, None, :]  # (1, 1, 1, 2, 16): 0..31
    bmask = b < kend
    wmask = nmask[:, None, None, None, None] & bmask
    blk, dp = q6k_block(wrow[:, None, None, None, None], b, dof, ALIGNED)
    qa = tl.load(blk + h * 64 + l, mask=wmask, other=0).to(tl.int32)  # low nibbles: planes 0 and 2
    qb = tl.load(blk + h * 64 + 32 + l, mask=wmask, other=0).to(tl.int32)  # planes 1 and 3
    qh = tl.load(blk + 128 + h * 32 + l, mask=wmask, other=0).to(tl.int32)  # 2 high bits of each plane
    d = 64.0 * _f16_at(dp, wmask)  # (BN, NB, 1, 1, 1)
    sp = (blk + 192 + h * 8 + g).to(tl.pointer_type(tl.int8))  # (BN, NB, 2, 2, 1): plane R adds 2R
    xp = xrow[:, None, None, None, None] + b * 256 + h * 128 + l  # (BM, NB, 2, 2, 16): plane R adds 32R
    xmask = mmask[:, None, None, None, None] & bmask
    S: tl.constexpr = NB * 64
    acc = _q6k_plane(acc, xp, xmask, qa, qh, sp, d, wmask, 0, S, DOT_KIND)
    acc = _q6k_plane(acc, xp, xmask, qb, qh, sp, d, wmask, 1, S, DOT_KIND)
    acc = _q6k_plane(acc, xp, xmask, qa, qh, sp, d, wmask, 2, S, DOT_KIND)
    return _q6k_plane(acc, xp, xmask, qb, qh, sp, d, wmask, 3, S, DOT_KIND)


@triton.jit
def _q32_step(acc, xrow, mmask, wrow, nmask, kb, kend, QTYPE: tl.constexpr, NB: tl.constexpr,
              DOT_KIND: tl.constexpr):
    """Q8_0 or Q5_0: NB blocks of 32 in natural order (``triton_q``'s decode and activation tiles), one dot."""
    w, _ = _dequant_tile(wrow, kb, kend, nmask, QTYPE, NB, 32, True, False, 0)  # (BN, 32 NB)
    x = _x_tile(xrow, mmask, kb, kend, QTYPE, NB, 32)  # (BM, 32 NB)
    return tl.dot(_to_dot(x, DOT_KIND), tl.trans(_to_dot(w, DOT_KIND)), acc)


# Four bytes -> their four low and four high nibbles as fp16 a * q + c, two at a time: prmt puts two bytes
# under the exponent 0x64 (fp16 1024 + byte), a mask keeps one nibble (1024 + q, or 1024 + 16 q), sub 1024
# is exact, then one fma.f16x2 per pair. The caller divides the high nibbles' a by 16. Operands (pack=4):
# $0-$3 out (lo 0-1, lo 2-3, hi 0-1, hi 2-3), $4 the bytes, then a and c of the low, a and c of the high
# nibbles, each as two fp16 pairs. a and c are rounded to fp16 first: a sub-block whose d * scale falls below
# fp16's normal range (6.1e-5, weights under about 1e-3) loses scale precision there; the float32 twin does not.
_Q4K_HALF2 = tl.constexpr("""{
.reg .b32 t0, t1, v, e, k;
mov.b32 e, 0x64646464;
mov.b32 k, 0x64006400;
prmt.b32 t0, $4, e, 0x4140;
prmt.b32 t1, $4, e, 0x4342;
and.b32 v, t0, 0x640F640F; sub.f16x2 v, v, k; fma.rn.f16x2 $0, v, $5, $7;
and.b32 v, t1, 0x640F640F; sub.f16x2 v, v, k; fma.rn.f16x2 $1, v, $6, $8;
and.b32 v, t0, 0x64F064F0; sub.f16x2 v, v, k; fma.rn.f16x2 $2, v, $9, $11;
and.b32 v, t1, 0x64F064F0; sub.f16x2 v, v, k; fma.rn.f16x2 $3, v, $10, $12;
}""")


# The same for bf16 (sm_80+): 0x43 is bf16 128 + byte up to 127 only, so the high nibbles are shifted down
# rather than masked in place, and v - 128 is an fma (sub.bf16x2 needs sm_90). The caller's a is not divided.
_Q4K_BF16X2 = tl.constexpr("""{
.reg .b32 t0, t1, v, e, one, m128;
mov.b32 e, 0x43434343;
mov.b32 one, 0x3F803F80;
mov.b32 m128, 0xC300C300;
prmt.b32 t0, $4, e, 0x4140;
prmt.b32 t1, $4, e, 0x4342;
and.b32 v, t0, 0x430F430F; fma.rn.bf16x2 v, v, one, m128; fma.rn.bf16x2 $0, v, $5, $7;
and.b32 v, t1, 0x430F430F; fma.rn.bf16x2 v, v, one, m128; fma.rn.bf16x2 $1, v, $6, $8;
shr.b32 v, t0, 4; and.b32 v, v, 0x000F000F; or.b32 v, v, 0x43004300;
fma.rn.bf16x2 v, v, one, m128; fma.rn.bf16x2 $2, v, $9, $11;
shr.b32 v, t1, 4; and.b32 v, v, 0x000F000F; or.b32 v, v, 0x43004300;
fma.rn.bf16x2 v, v, one, m128; fma.rn.bf16x2 $3, v, $10, $12;
}""")


@triton.jit
def _q4k_scales(w0, w1, w2, w3, s: tl.constexpr):
    """Sub-block s of a Q4_K block from its header words (d|dmin, scale bytes 0-3, 4-7, 8-11): (d * scale,
    dmin * min) as float32."""
    if s < 4:
        sc = (w1 >> (8 * s)) & 63
        mn = (w2 >> (8 * s)) & 63
    else:
        sc = ((w3 >> (8 * (s - 4))) & 15) | (((w1 >> (8 * (s - 4) + 6)) & 3) << 4)
        mn = ((w3 >> (8 * (s - 4) + 4)) & 15) | (((w2 >> (8 * (s - 4) + 6)) & 3) << 4)
    d = (w0 & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((w0 >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return d * sc.to(tl.float32), dmin * mn.to(tl.float32)


@triton.jit
def _q4k_header(blk, wmask):
    """The four header words of a Q4_K block per weight row (1, BN): d|dmin, scale bytes 0-3, 4-7, 8-11
    (zeros where masked: zero scales, so zero weights)."""
    hp = blk.to(tl.pointer_type(tl.int32))
    return (tl.load(hp, mask=wmask, other=0), tl.load(hp + 1, mask=wmask, other=0),
            tl.load(hp + 2, mask=wmask, other=0), tl.load(hp + 3, mask=wmask, other=0))


@triton.jit
def _q4k_pair(blk, wmask, w0, w1, w2, w3, c: tl.constexpr, DOT_KIND: tl.constexpr, ASM: tl.constexpr):
    """Sub-blocks 2c and 2c+1 of a Q4_K block, the low and high nibbles of its bytes 32c .. 32c+31, as two
    (32, BN) tiles in the dot's dtype (DOT_KIND; float32 for 0)."""
    sl, ml = _q4k_scales(w0, w1, w2, w3, 2 * c)  # (1, BN)
    sh, mh = _q4k_scales(w0, w1, w2, w3, 2 * c + 1)
    q = tl.load(blk + 16 + c * 32 + tl.arange(0, 32)[:, None], mask=wmask, other=0)  # (32, BN) uint8
    if ASM and DOT_KIND == 1:
        wl, wh = tl.inline_asm_elementwise(
            _Q4K_HALF2, "=r,=r,=r,=r" + ",r" * 9,
            [q, sl.to(tl.float16), (-ml).to(tl.float16), (sh * 0.0625).to(tl.float16), (-mh).to(tl.float16)],
            dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    elif ASM and DOT_KIND == 2:
        wl, wh = tl.inline_asm_elementwise(
            _Q4K_BF16X2, "=r,=r,=r,=r" + ",r" * 9,
            [q, sl.to(tl.bfloat16), (-ml).to(tl.bfloat16), sh.to(tl.bfloat16), (-mh).to(tl.bfloat16)],
            dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
    else:
        qi = q.to(tl.int32)
        wl = _to_dot((16.0 * sl) * _f(((qi << 19) & 0x00780000) | 0x3F800000) - (16.0 * sl + ml), DOT_KIND)
        wh = _to_dot((16.0 * sh) * _f(((qi << 15) & 0x00780000) | 0x3F800000) - (16.0 * sh + mh), DOT_KIND)
    return wl, wh


@triton.jit
def _q4k_step(acc, xrow, mmask, wrow, nmask, kb, DOT_KIND: tl.constexpr, ASM: tl.constexpr):
    """Block kb (NB = 1) as eight (32, BN) tiles, one per sub-block, each with its own dot of K = 32. Every
    tensor is 2-D with the weight rows last, which lets the compiler decode in the dot operand's layout, and
    the header is read as four words: loads of 4 bytes or more are pipelined (cp.async) with the nibbles."""
    j = tl.arange(0, 32)
    blk = wrow[None, :] + kb * 144  # (1, BN)
    wmask = nmask[None, :]  # one block per step: kb < kend
    xmask = mmask[:, None]
    w0, w1, w2, w3 = _q4k_header(blk, wmask)
    for c in tl.static_range(4):
        wl, wh = _q4k_pair(blk, wmask, w0, w1, w2, w3, c, DOT_KIND, ASM)
        xp = xrow[:, None] + kb * 256 + c * 64 + j[None, :]  # (BM, 32)
        acc = tl.dot(_to_dot(tl.load(xp, mask=xmask, other=0.0), DOT_KIND), wl, acc)
        acc = tl.dot(_to_dot(tl.load(xp + 32, mask=xmask, other=0.0), DOT_KIND), wh, acc)
    return acc


@triton.jit
def q6k_dequant_kernel(w_ptr, out_ptr, N, K, row_bytes, BN: tl.constexpr, NB: tl.constexpr,
                       ALIGNED: tl.constexpr = False):
    """out[n, k] = dequant(w)[n, k] for Q6_K in out's dtype, NB blocks of BN rows per program as (32, BN) tiles
    with the elements of each weight row down the columns (as ``q4k_dequant_kernel``); ALIGNED: rows in the
    aligned layout. Grid: (cdiv(N, BN), cdiv(K / 256, NB))."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = offs_n < N
    wrow = w_ptr + offs_n.to(tl.int64) * ((row_bytes // 2) * 2)  # whole 2-byte words: pairs of byte loads
    orow = out_ptr + offs_n.to(tl.int64)[None, :] * K  # (1, BN)
    l = tl.arange(0, 32)[:, None]  # (32, 1)
    for i in tl.static_range(NB):
        kb = tl.program_id(1) * NB + i
        wmask = (nmask & (offs_n * 0 + kb < K // 256))[None, :]  # (1, BN)
        blk, dp = q6k_block(wrow[None, :], kb, (K // 256) * 208, ALIGNED)
        d = _f16_at(dp, wmask)
        for h in tl.static_range(2):
            qa = tl.load(blk + h * 64 + l, mask=wmask, other=0).to(tl.int32)  # (32, BN): planes 0 and 2
            qb = tl.load(blk + h * 64 + 32 + l, mask=wmask, other=0).to(tl.int32)  # planes 1 and 3
            qh = tl.load(blk + 128 + h * 32 + l, mask=wmask, other=0).to(tl.int32)
            for r in tl.static_range(4):
                qv = qa if r % 2 == 0 else qb
                q = ((qv >> (4 * (r // 2))) & 15) | (((qh >> (2 * r)) & 3) << 4)
                sp = (blk + 192 + h * 8 + 2 * r + l // 16).to(tl.pointer_type(tl.int8))  # (32, BN): two scales
                a = d * tl.load(sp, mask=wmask, other=0).to(tl.float32)
                op = orow + kb * 256 + h * 128 + 32 * r + l
                tl.store(op, ((q - 32).to(tl.float32) * a).to(out_ptr.dtype.element_ty), mask=wmask)


@triton.jit
def q4k_dequant_kernel(w_ptr, out_ptr, N, K, row_bytes, BN: tl.constexpr, NB: tl.constexpr,
                       OUT_KIND: tl.constexpr, ASM: tl.constexpr):
    """out[n, k] = dequant(w)[n, k] for Q4_K in out's dtype (OUT_KIND: 1 fp16, 2 bf16, 0 fp32), NB blocks of
    BN rows per program, with ``mmq_kernel``'s decode. Grid: (cdiv(N, BN), cdiv(K / 256, NB))."""
    offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
    nmask = offs_n < N
    wrow = w_ptr + offs_n.to(tl.int64) * row_bytes
    orow = out_ptr + offs_n.to(tl.int64)[None, :] * K  # (1, BN)
    j = tl.arange(0, 32)[:, None]
    for i in tl.static_range(NB):
        kb = tl.program_id(1) * NB + i
        wmask = (nmask & (offs_n * 0 + kb < K // 256))[None, :]  # (1, BN); a tensor compare, for the interpreter
        blk = wrow[None, :] + kb * 144
        w0, w1, w2, w3 = _q4k_header(blk, wmask)
        for c in tl.static_range(4):
            wl, wh = _q4k_pair(blk, wmask, w0, w1, w2, w3, c, OUT_KIND, ASM)
            op = orow + kb * 256 + c * 64 + j  # (32, BN)
            tl.store(op, wl.to(out_ptr.dtype.element_ty), mask=wmask)
            tl.store(op + 32, wh.to(out_ptr.dtype.element_ty), mask=wmask)


@triton.jit
def mmq_mac(xrow, mmask, wrow, nmask, kb0, kend, QTYPE: tl.constexpr, NB: tl.constexpr, BM: tl.constexpr,
            BN: tl.constexpr, DOT_KIND: tl.constexpr, ASM: tl.constexpr, ALIGNED: tl.constexpr, dof):
    """Sum over GGUF blocks kb0 .. kend-1 of x[m] . w[n] -> (BM, BN) float32, BM >= 16 (``triton_q._mac``'s
    contract, with this module's decode). xrow: (BM,) activation row pointers, mmask their validity; wrow:
    (BN,) weight row pointers, nmask their validity. float32 activations (DOT_KIND 0) multiply in tl.dot's
    default precision (tf32 on sm_80+). ALIGNED, dof: Q6_K rows in the aligned layout (``triton_q.q6k_block``)."""
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if QTYPE == 12:
        for kb in range(kb0, kend):  # one block per step, whatever NB says
            acc = _q4k_step(acc, xrow, mmask, wrow, nmask, kb, DOT_KIND, ASM)
    else:
        for kb in range(kb0, kend, NB):
            if QTYPE == 14:
                acc = _q6k_step(acc, xrow, mmask, wrow, nmask, kb, kend, NB, DOT_KIND, ALIGNED, dof)
            else:
                acc = _q32_step(acc, xrow, mmask, wrow, nmask, kb, kend, QTYPE, NB, DOT_KIND)
    return acc


@triton.jit
def mmq_kernel(x_ptr, w_ptr, out_ptr, M, N, nblocks, row_bytes, stride_xm, stride_om, stride_os, blocks_per_split,
               QTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr, DOT_KIND: tl.constexpr,
               ASM: tl.constexpr = False, ALIGNED: tl.constexpr = False):
    """out[pid_k, m, n] = sum over split pid_k's GGUF blocks of x[m, :] . dequant(w[n, :]) (ALIGNED: Q6_K rows in
    the aligned layout).

    Grid: (cdiv(N, BN), splits, cdiv(M, BM)). Split s covers blocks [s * blocks_per_split,
    (s + 1) * blocks_per_split), a whole number of NB-block steps; its sums go to out + s * stride_os.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.program_id(2) * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mmask = offs_m < M
    nmask = offs_n < N
    xrow = x_ptr + offs_m.to(tl.int64) * stride_xm  # (BM,)
    wrow = w_ptr + offs_n.to(tl.int64) * row_stride(row_bytes, QTYPE)  # (BN,)
    kb0 = pid_k * blocks_per_split
    kend = tl.minimum(kb0 + blocks_per_split, nblocks)
    acc = mmq_mac(xrow, mmask, wrow, nmask, kb0, kend, QTYPE, NB, BM, BN, DOT_KIND, ASM, ALIGNED, nblocks * 208)
    optr = out_ptr + pid_k.to(tl.int64) * stride_os + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
