"""Decode products with int8 activations: each weight byte read once, coalesced, and multiplied four
lanes at a time by ``dp4a`` (the scheme of llama.cpp's MMVQ kernels).

The activation row is first cut into groups of 32 values, each stored as int8 ``xq`` with a float
scale ``xd`` (``x ~= xd * xq``) and ``xs = xd * sum(xq)`` (``quantize_q8_kernel``). A weight block
then contributes, per group of equal scale, ``scale * xd * sum(q * xq)`` with the integer sum done
by ``dp4a`` on packed bytes, and ``- min * xs`` for the formats with an offset. That leaves a few
instructions per weight and thread (about 2 for Q4_K and 3.4 for Q6_K in the sm_90 SASS, addressing
and scales included), under what the memory bandwidth needs on every card from Turing on (``dp4a``
is sm_61+); what the kernels reach is in ``bench/results/kernels-NVIDIA_H200-int8.md``.

Layout: a program owns BN weight rows and walks NBLK blocks of 256 elements of each per step (8 NBLK
blocks of 32 for Q8_0 and Q5_0). ``PF`` loads the next step's weight bytes before computing the
current step's (measured slower on an H200; kept for other cards). The tensors of one
step are (rows, blocks, pieces of a block, words): 16-byte loads for Q4_K, whose 144-byte blocks
are 16-byte aligned; pairs of 2-byte loads for Q6_K, Q8_0 and Q5_0, whose blocks are only 2-byte
aligned. Which of the other dimensions neighbouring threads take is the compiler's choice (for a
(blocks, rows, 8 pieces, 4 words) Q4_K step Triton 3.6 gave them the rows: 32 cache lines per
weight load in Nsight Compute on an H200). The one-row defaults leave it no choice (``LOADS & 4``):
Q4_K steps are (lines, 32 words), so eight threads read a block's 128 nibble bytes as one run
(``_q4k_rows32``); Q6_K steps are one flat tensor of sixteen lanes per block (``_q6k_rows16``).
The activation words are the same for every row: they come from L1. Q6_K rows in the aligned layout
(``kernels.q6k_layout``, what the model keeps on a GPU) are read 4-16 bytes per load (``_q6k_rows_a``).

``ASM`` selects the ``dp4a`` instruction; without it (Triton's CPU interpreter) a Triton-op twin
computes the same integer sums.

Glossary: BN = weight rows per program, NBLK = blocks per row per step, kb = block index along K,
c = 32-byte chunk of a Q4_K block's nibbles, h = 128-element half of a Q6_K block, w = 4-byte word.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tierlm.kernels.triton_q import pdl_enter, row_stride

Q4_K, Q6_K, Q8_0, Q5_0 = 12, 14, 8, 6
BLOCK_ELEMS = {Q4_K: 256, Q6_K: 256, Q8_0: 32, Q5_0: 32}
_SIGN4 = tl.constexpr(-0x7F7F7F80)  # 0x80808080 as an int32
_M4 = tl.constexpr(0x0F0F0F0F)
_H4 = tl.constexpr(-0x0F0F0F10)  # 0xF0F0F0F0 as an int32


def fit_step(nblk: int, num_warps: int, K: int) -> tuple[int, int]:
    """(NBLK, num_warps) for rows of K elements: a step of ``nblk`` 256-element blocks is cut to the
    power of two that covers the row (no lanes past its end), and its warps in proportion."""
    nb = min(nblk, triton.next_power_of_2(max(1, K // 256)))
    return nb, max(1, num_warps * nb // nblk)


@triton.jit
def _rint(v, ASM: tl.constexpr):
    """Round to the nearest integer, ties to even (cvt.rni; the twin rounds up and fixes ties)."""
    if ASM:
        return tl.inline_asm_elementwise("cvt.rni.f32.f32 $0, $1;", "=f,f", [v], dtype=tl.float32, is_pure=True,
                                         pack=1)
    r = tl.floor(v + 0.5)
    return tl.where(((r - v) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0), r - 1.0, r)


@triton.jit
def quantize_q8_kernel(x_ptr, xq_ptr, xd_ptr, xs_ptr, K, stride_xm, G: tl.constexpr, ASM: tl.constexpr,
                       PACK: tl.constexpr = False, PDL: tl.constexpr = False):
    """Row m, groups g0..g0+G-1 of x: xq = round(x * (127 / max|x|)) as int8 (the product rounded to
    float32, then to the nearest integer, ties to even), xd = max|x| / 127, xs = xd * sum(xq).
    Grid: (M, cdiv(K / 32, G)). PDL: launched with programmatic dependent launch (``pdl_enter``)."""
    pdl_enter(PDL)
    m = tl.program_id(0)
    g = tl.program_id(1) * G + tl.arange(0, G)
    gmask = g < K // 32
    offs = g[:, None] * 32 + tl.arange(0, 32)[None, :]
    x = tl.load(x_ptr + m.to(tl.int64) * stride_xm + offs, mask=gmask[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    inv = tl.where(amax > 0, tl.math.div_rn(tl.full(amax.shape, 127.0, tl.float32), tl.maximum(amax, 1e-30)), 0.0)
    q = _rint(x * inv[:, None], ASM)  # no add after the product: nothing to fuse it into
    q = tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int32)
    d = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))
    tl.store(xq_ptr + m.to(tl.int64) * K + offs, q.to(tl.int8), mask=gmask[:, None])
    ng = K // 32
    i = m.to(tl.int64) * ng + g
    s = d * tl.sum(q, axis=1).to(tl.float32)
    if PACK:  # (xd, xs) pairs at xd_ptr
        tl.store(xd_ptr + 2 * i, d, mask=gmask)
        tl.store(xd_ptr + 2 * i + 1, s, mask=gmask)
    else:
        tl.store(xd_ptr + i, d, mask=gmask)
        tl.store(xs_ptr + i, s, mask=gmask)


@triton.jit
def _sb(v):
    """Signed value of the low byte of an int32."""
    v = v & 0xFF
    return v - ((v & 0x80) << 1)


@triton.jit
def _dp4a(a, b, A_SIGNED: tl.constexpr, ASM: tl.constexpr):
    """Sum of the four byte products of a and b (b signed; a signed or unsigned), as int32."""
    if ASM:
        if A_SIGNED:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, 0;", "=r,r,r", [a, b], dtype=tl.int32,
                                             is_pure=True, pack=1)
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, 0;", "=r,r,r", [a, b], dtype=tl.int32,
                                         is_pure=True, pack=1)
    s = a * 0
    for i in tl.static_range(4):
        if A_SIGNED:
            ai = _sb(a >> (8 * i))
        else:
            ai = (a >> (8 * i)) & 0xFF
        s += ai * _sb(b >> (8 * i))
    return s


@triton.jit
def _f16(bits):
    """Low 16 bits of an int32 as a float16 value, widened to float32."""
    return (bits & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _u32(p):
    """The 4-byte word at a 2-byte aligned uint16 pointer, from two 2-byte loads."""
    return tl.load(p).to(tl.int32) | (tl.load(p + 1).to(tl.int32) << 16)


@triton.jit
def _q4k_scale(w1, w2, w3, sh, low):
    """6-bit scale and min of the Q4_K group whose bits sit in byte sh // 8 of header words 1..3
    (groups 0..3 plainly; ``low`` false: groups 4..7, split between word 3 and the top bits of 1, 2)."""
    b1, b2, b3 = (w1 >> sh) & 0xFF, (w2 >> sh) & 0xFF, (w3 >> sh) & 0xFF
    return (tl.where(low, b1 & 63, (b3 & 15) | ((b1 >> 6) << 4)),
            tl.where(low, b2 & 63, (b3 >> 4) | ((b2 >> 6) << 4)))


@triton.jit
def _q4k_fetch(wrow, kb, wo, LOADS: tl.constexpr = 0):
    """The weight bytes of one Q4_K step: header words 0..3 (BN, NBLK, 1) and the two halves of the
    nibble chunks (BN, NBLK, 4, 4). LOADS & 1: each thread loads its block's whole 16-byte header
    as one vector and takes the words out of its own registers (words of shape (BN, NBLK, 4))."""
    blk = (wrow[:, None] + kb[None, :] * 144).to(tl.pointer_type(tl.int32))  # (BN, NBLK)
    qp = blk[:, :, None, None] + 4 + wo[None, None]
    if LOADS & 1:
        j4 = wo[None, None] % 4  # word of the header, over (BN, NBLK, chunk, word)
        hv = tl.load(blk[:, :, None, None] + j4)
        w0, w1, w2, w3 = (tl.sum(tl.where(j4 == 0, hv, 0), axis=3), tl.sum(tl.where(j4 == 1, hv, 0), axis=3),
                          tl.sum(tl.where(j4 == 2, hv, 0), axis=3), tl.sum(tl.where(j4 == 3, hv, 0), axis=3))
    else:
        w0, w1, w2, w3 = (tl.load(blk)[:, :, None], tl.load(blk + 1)[:, :, None], tl.load(blk + 2)[:, :, None],
                          tl.load(blk + 3)[:, :, None])
    return w0, w1, w2, w3, tl.load(qp), tl.load(qp + 4)


@triton.jit
def _q4k_rows(xq32, xd_ptr, xs_ptr, wrow, kb0, kb1, BN: tl.constexpr, NBLK: tl.constexpr, ASM: tl.constexpr,
              PF: tl.constexpr, LOADS: tl.constexpr = 0):
    """Q4_K: (BN,) partial dot products over blocks kb0..kb1-1.

    Tensors are (BN, NBLK, 4 chunks, 4 words): chunk c is the 32 nibble bytes of groups 2c (low
    nibbles) and 2c+1 (high nibbles). Its two 16-byte halves are two loads of the same shape, so
    one thread holds the whole chunk: its scales are decoded once for 64 weights and the sums over
    its words need no shuffle. PF loads the next step's weight bytes before computing this one's
    (twice the bytes in flight per thread). LOADS & 1: each thread loads its block's 16-byte header
    as one vector (instead of four words); LOADS & 2: xd_ptr holds (xd, xs) pairs, and a thread's
    four scales come in one 16-byte load.
    """
    c = tl.arange(0, 4)
    j4 = tl.arange(0, 4)[None, None, None, :]  # float of a 16-byte (xd, xs) vector, over (BN, NBLK, chunk, float)
    c3 = c[None, None, :]  # over (BN, NBLK, chunk)
    low = c3 < 2  # groups 0..3 have plain 6-bit scales
    sh = 8 * ((2 * c3) % 4)  # the byte of the header words that holds group 2c's scale bits
    wo = 8 * c[:, None] + tl.arange(0, 4)[None, :]  # (4, 4): nibble word offset after the 16-byte header
    acc = tl.zeros([BN, NBLK, 4], dtype=tl.float32)
    if PF:
        n0, n1, n2, n3, nq0, nq1 = _q4k_fetch(wrow, tl.minimum(kb0 + tl.arange(0, NBLK), kb1 - 1), wo, LOADS)
    for k in range(kb0, kb1, NBLK):
        kb = k + tl.arange(0, NBLK)
        keep = (kb < kb1)[None, :, None]
        kb = tl.minimum(kb, kb1 - 1)
        if PF:
            w0, w1, w2, w3, q0, q1 = n0, n1, n2, n3, nq0, nq1
            n0, n1, n2, n3, nq0, nq1 = _q4k_fetch(wrow, tl.minimum(kb + NBLK, kb1 - 1), wo, LOADS)
        else:
            w0, w1, w2, w3, q0, q1 = _q4k_fetch(wrow, kb, wo, LOADS)
        d = _f16(w0)
        dmin = _f16(w0 >> 16)
        sc_lo, mn_lo = _q4k_scale(w1, w2, w3, sh, low)
        sc_hi, mn_hi = _q4k_scale(w1, w2, w3, sh + 8, low)
        # low nibbles of chunk c, word j: elements 64c + 4j + (0..3), activation word 16c + j; high: 16c + 8 + j
        xp = xq32 + tl.broadcast_to(kb[None, :, None, None] * 64 + (wo + 8 * c[:, None])[None, None], [BN, NBLK, 4, 4])
        s_lo = tl.sum(_dp4a(q0 & _M4, tl.load(xp), False, ASM) + _dp4a(q1 & _M4, tl.load(xp + 4), False, ASM), axis=3)
        s_hi = tl.sum(_dp4a(q0 & _H4, tl.load(xp + 8), False, ASM)
                      + _dp4a(q1 & _H4, tl.load(xp + 12), False, ASM), axis=3) >> 4  # high nibbles in place: 16 x
        gi = tl.broadcast_to((kb[:, None] * 8 + 2 * c[None, :])[None], [BN, NBLK, 4])  # x group of the low nibbles
        if LOADS & 2:  # (xd, xs) of groups gi and gi + 1: 16 contiguous bytes
            pv = xd_ptr + 2 * gi[:, :, :, None]  # gi is even and the pairs are 16-byte aligned
            v = tl.load(tl.max_contiguous(tl.multiple_of(pv, [16, 16, 16, 16]), [1, 1, 1, 4]) + j4)
            dxl, sxl = tl.sum(tl.where(j4 == 0, v, 0.0), axis=3), tl.sum(tl.where(j4 == 1, v, 0.0), axis=3)
            dxh, sxh = tl.sum(tl.where(j4 == 2, v, 0.0), axis=3), tl.sum(tl.where(j4 == 3, v, 0.0), axis=3)
        else:
            dxl, dxh = tl.load(xd_ptr + gi), tl.load(xd_ptr + gi + 1)
            sxl, sxh = tl.load(xs_ptr + gi), tl.load(xs_ptr + gi + 1)
        part = d * (dxl * (sc_lo * s_lo).to(tl.float32) + dxh * (sc_hi * s_hi).to(tl.float32)) \
            - dmin * (mn_lo.to(tl.float32) * sxl + mn_hi.to(tl.float32) * sxh)
        acc += tl.where(keep, part, 0.0)
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _q4k_rows32(xq32, xd_ptr, xs_ptr, wrow, kb0, kb1, BN: tl.constexpr, NBLK: tl.constexpr, ASM: tl.constexpr,
                LOADS: tl.constexpr):
    """Q4_K with eight threads per block (LOADS & 4). A step's tensors are (NBLK * BN, 32 words):
    line i is block k + i // BN of row i % BN, and the 32 words are its 128 nibble bytes, so a
    thread holds the four words of one 16-byte piece hc and neighbouring threads hold neighbouring
    pieces (a warp's load is whole 128-byte runs of four rows whatever order the compiler gives to
    the other dimension; with four or more rows the four lines of a warp are one block column and
    read the same activation words). Piece hc holds the low nibbles of group 2 (hc // 2) and the high
    nibbles of group 2 (hc // 2) + 1, elements 16 (hc % 2) .. + 15 of each; the block's 16-byte
    header is one vector load, the same address for its eight threads. Sums over a piece's words
    are taken on the (NBLK * BN, 8, 4) view of the same registers."""
    L: tl.constexpr = NBLK * BN
    i = tl.arange(0, L)
    w = tl.arange(0, 32)[None, :]
    j = w % 4
    hc = w // 4
    xo = 16 * (hc // 2) + 4 * (hc % 2) + j  # activation word of the low nibbles of word w
    wr = tl.reshape(tl.broadcast_to(wrow[None, :], [NBLK, BN]), [L])[:, None]
    c3 = tl.arange(0, 8)[None, :] // 2  # chunk of each piece, over (L, 8)
    low = c3 < 2
    sh = 8 * ((2 * c3) % 4)
    j3 = tl.arange(0, 4)[None, None, :]
    acc = tl.zeros([L, 8], dtype=tl.float32)
    for k in range(kb0, kb1, NBLK):
        kb = k + i // BN
        keep = (kb < kb1)[:, None]
        kb = tl.minimum(kb, kb1 - 1)[:, None]
        blk = tl.multiple_of((wr + kb * 144).to(tl.pointer_type(tl.int32)), [16, 16])  # (L, 1); Q4_K rows are 16-byte aligned
        hv = tl.reshape(tl.load(blk + j), [L, 8, 4])
        q = tl.load(blk + 4 + w)
        xp = xq32 + kb * 64 + xo
        s_lo = tl.sum(tl.reshape(_dp4a(q & _M4, tl.load(xp), False, ASM), [L, 8, 4]), axis=2)
        s_hi = tl.sum(tl.reshape(_dp4a(q & _H4, tl.load(xp + 8), False, ASM), [L, 8, 4]), axis=2) >> 4
        w0, w1 = tl.sum(tl.where(j3 == 0, hv, 0), axis=2), tl.sum(tl.where(j3 == 1, hv, 0), axis=2)
        w2, w3 = tl.sum(tl.where(j3 == 2, hv, 0), axis=2), tl.sum(tl.where(j3 == 3, hv, 0), axis=2)
        d = _f16(w0)
        dmin = _f16(w0 >> 16)
        sc_lo, mn_lo = _q4k_scale(w1, w2, w3, sh, low)
        sc_hi, mn_hi = _q4k_scale(w1, w2, w3, sh + 8, low)
        gi = kb * 8 + 2 * (hc // 2)  # x group of the low nibbles, over (L, 32)
        if LOADS & 2:  # (xd, xs) of groups gi and gi + 1: 16 contiguous bytes
            v = tl.reshape(tl.load(tl.multiple_of(xd_ptr + 2 * gi, [16, 16]) + j), [L, 8, 4])  # gi is even
            dxl, sxl = tl.sum(tl.where(j3 == 0, v, 0.0), axis=2), tl.sum(tl.where(j3 == 1, v, 0.0), axis=2)
            dxh, sxh = tl.sum(tl.where(j3 == 2, v, 0.0), axis=2), tl.sum(tl.where(j3 == 3, v, 0.0), axis=2)
        else:
            g8 = kb * 8 + 2 * c3
            dxl, dxh = tl.load(xd_ptr + g8), tl.load(xd_ptr + g8 + 1)
            sxl, sxh = tl.load(xs_ptr + g8), tl.load(xs_ptr + g8 + 1)
        part = d * (dxl * (sc_lo * s_lo).to(tl.float32) + dxh * (sc_hi * s_hi).to(tl.float32)) \
            - 0.5 * dmin * (mn_lo.to(tl.float32) * sxl + mn_hi.to(tl.float32) * sxh)  # two pieces per group
        acc += tl.where(keep, part, 0.0)
    return tl.sum(tl.reshape(tl.sum(acc, axis=1), [NBLK, BN]), axis=0)


@triton.jit
def _dp4a_add(a, b, c, ASM: tl.constexpr):
    """c + the four byte products of a (unsigned) and b (signed), as int32 (dp4a's own accumulator)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                         is_pure=True, pack=1)
    return c + _dp4a(a, b, False, ASM)


@triton.jit
def _words4(v):
    """The four words of each thread's 16-byte piece of a (lines, 32 words) int32 tensor, as four
    (lines, 8) tensors (sums of one nonzero term: picks of registers, no arithmetic)."""
    v3 = tl.reshape(v, [v.shape[0], 8, 4])
    j3 = tl.arange(0, 4)[None, None, :]
    return (tl.sum(tl.where(j3 == 0, v3, 0), axis=2), tl.sum(tl.where(j3 == 1, v3, 0), axis=2),
            tl.sum(tl.where(j3 == 2, v3, 0), axis=2), tl.sum(tl.where(j3 == 3, v3, 0), axis=2))


@triton.jit
def _q4k_math(hv, q, xl, xh, v, sa, se, ma, ASM: tl.constexpr):
    """``_q4k_rows32p``'s sums for one step: (lines, 8) partial dot products from the loaded header
    ``hv``, nibbles ``q``, activation words ``xl`` (low nibbles) and ``xh`` (high), and (xd, xs) bits
    ``v`` (all (lines, 32) int32)."""
    w0, w1, w2, w3 = _words4(hv)
    q0, q1, q2, q3 = _words4(q)
    x0, x1, x2, x3 = _words4(xl)
    y0, y1, y2, y3 = _words4(xh)
    dxl, sxl, dxh, sxh = _words4(v)
    s_lo = _dp4a_add(q0 & _M4, x0, _dp4a_add(q1 & _M4, x1, _dp4a_add(q2 & _M4, x2, _dp4a(q3 & _M4, x3, False, ASM),
                                                                      ASM), ASM), ASM)
    s_hi = _dp4a_add(q0 & _H4, y0, _dp4a_add(q1 & _H4, y1, _dp4a_add(q2 & _H4, y2, _dp4a(q3 & _H4, y3, False, ASM),
                                                                      ASM), ASM), ASM) >> 4
    e = w3 >> se
    scp = ((w1 >> sa) & ma) | (e & ~ma)  # scales of groups 2c, 2c + 1 in bytes 0, 1 (low 6 bits)
    mnp = ((w2 >> sa) & ma) | ((e >> 4) & ~ma)  # and their mins
    return _f16(w0) * (dxl.to(tl.float32, bitcast=True) * ((scp & 63) * s_lo).to(tl.float32)
                       + dxh.to(tl.float32, bitcast=True) * (((scp >> 8) & 63) * s_hi).to(tl.float32)) \
        - 0.5 * _f16(w0 >> 16) * ((mnp & 63).to(tl.float32) * sxl.to(tl.float32, bitcast=True)
                                  + ((mnp >> 8) & 63).to(tl.float32) * sxh.to(tl.float32, bitcast=True))


@triton.jit
def _ld(p, live, MASK: tl.constexpr, CM: tl.constexpr = 0, EV: tl.constexpr = 0):
    """The values at p (zeros where MASK and not live). CM, the cache modifier: 0 none, 1 ".cg" (cached in L2, not
    L1), 2 the eviction policy "evict_first"; else EV, the eviction policy: 0 none, 1 "evict_last"."""
    if MASK:
        if CM == 1:
            return tl.load(p, mask=live, other=0, cache_modifier=".cg")
        elif CM == 2:
            return tl.load(p, mask=live, other=0, eviction_policy="evict_first")
        elif EV == 1:
            return tl.load(p, mask=live, other=0, eviction_policy="evict_last")
        else:
            return tl.load(p, mask=live, other=0)
    else:
        if CM == 1:
            return tl.load(p, cache_modifier=".cg")
        elif CM == 2:
            return tl.load(p, eviction_policy="evict_first")
        elif EV == 1:
            return tl.load(p, eviction_policy="evict_last")
        else:
            return tl.load(p)


@triton.jit
def _q4k_acts(px, pd, live, MASK: tl.constexpr, AEV: tl.constexpr = 0):
    """One activation row's words for a ``_q4k_math`` step: low- and high-nibble words and (xd, xs) bits. AEV: the
    loads' eviction policy (``_ld``'s EV; 1: kept in L1 before the weights)."""
    return _ld(px, live, MASK, 0, AEV), _ld(px + 8, live, MASK, 0, AEV), _ld(pd, live, MASK, 0, AEV)


@triton.jit
def _q4k_step_m(pw, px, pd, sx1, sx2, sx3, sd1, sd2, sd3, live, sa, se, ma, ASM: tl.constexpr, MASK: tl.constexpr,
                MR: tl.constexpr, WCM: tl.constexpr = 0, AEV: tl.constexpr = 0):
    """One step of ``_q4k_rows32p``: the weight words loaded once, then each activation row's sums
    (rows 1..3 at word offsets sx1..sx3 of xq and sd1..sd3 of the (xd, xs) pairs; zeros past MR). WCM: the weight
    loads' cache modifier (``_ld``'s CM; 1, ".cg": not kept in L1); AEV: the activation loads' eviction policy."""
    w = tl.arange(0, 32)[None, :]
    if MASK:
        hv, q = _ld(pw + w % 4, live, True, WCM), _ld(pw + 4 + w, live, True, WCM)
    else:
        hv, q = _ld(pw + w % 4, None, False, WCM), _ld(pw + 4 + w, None, False, WCM)
    xl, xh, v = _q4k_acts(px, pd, live, MASK, AEV)
    p0 = _q4k_math(hv, q, xl, xh, v, sa, se, ma, ASM)
    p1, p2, p3 = tl.zeros_like(p0), tl.zeros_like(p0), tl.zeros_like(p0)
    if MR > 1:
        xl, xh, v = _q4k_acts(px + sx1, pd + sd1, live, MASK, AEV)
        p1 = _q4k_math(hv, q, xl, xh, v, sa, se, ma, ASM)
    if MR > 2:
        xl, xh, v = _q4k_acts(px + sx2, pd + sd2, live, MASK, AEV)
        p2 = _q4k_math(hv, q, xl, xh, v, sa, se, ma, ASM)
    if MR > 3:
        xl, xh, v = _q4k_acts(px + sx3, pd + sd3, live, MASK, AEV)
        p3 = _q4k_math(hv, q, xl, xh, v, sa, se, ma, ASM)
    return p0, p1, p2, p3


@triton.jit
def _q4k_lines(wrow, kb0, BN: tl.constexpr, NBLK: tl.constexpr):
    """The (L, 1) int32 pointers of a ``_q4k_rows32p`` step's lines (NBLK blocks of BN rows, L = NBLK * BN) from
    block kb0, and the (L,) block index of each line."""
    L: tl.constexpr = NBLK * BN
    kb = kb0 + tl.arange(0, L) // BN
    wr = tl.reshape(tl.broadcast_to(wrow[None, :], [NBLK, BN]), [L])[:, None]
    return tl.multiple_of((wr + kb[:, None] * 144).to(tl.pointer_type(tl.int32)), [16, 16]), kb


@triton.jit
def q4k_first_step(wrow, kb0, kb1, BN: tl.constexpr, NBLK: tl.constexpr, WCM: tl.constexpr = 0):
    """The weight words of ``_q4k_rows32p``'s first step (header, nibbles; zeros past kb1), for a kernel to load
    before its grid-dependency wait (``pdl_enter``): weights are no launch's output, so their first bytes can be on
    their way while the launch before finishes. Passed back as ``_q4k_rows32p``'s PRE words."""
    pw, kb = _q4k_lines(wrow, kb0, BN, NBLK)
    w = tl.arange(0, 32)[None, :]
    live = (kb < kb1)[:, None]
    return _ld(pw + w % 4, live, True, WCM), _ld(pw + 4 + w, live, True, WCM)


@triton.jit
def _q4k_piece_shifts():
    """For ``_q4k_math`` over a step's (lines, 8) pieces: the shift ``sa`` and mask ``ma`` of header words 1 and 2 and
    the shift ``se`` of word 3 that give each piece's two scales and two mins."""
    c = tl.arange(0, 8)[None, :] // 2  # the chunk of each piece, over (L, 8): low nibbles of group 2c, high of 2c + 1
    hi = c >= 2  # groups 4..7: low 4 bits in header word 3, top 2 bits in words 1 and 2
    se = 16 * (c % 2)  # bit of group 2c's byte in word 3 (groups 4..7) or words 1 and 2 (0..3)
    sa = se + tl.where(hi, 2, 0)  # shift of words 1, 2: their top bits to bits 4, 5 for groups 4..7
    ma = tl.where(hi, 0x3030, 0x3F3F)  # bits taken from words 1, 2; the others from word 3
    return sa, se, ma


@triton.jit
def _spread_lines(v, NBLK: tl.constexpr, L: tl.constexpr, LPB: tl.constexpr):
    """(L,) values of a step's lines -> (NBLK * L * LPB,) over its lanes: lane t works on line (t // LPB) % L."""
    return tl.reshape(tl.broadcast_to(v[None, :, None], [NBLK, L, LPB]), [NBLK * L * LPB])


@triton.jit
def _q4k_act_ptrs(xq32, xd_ptr, kb, BN: tl.constexpr, NBLK: tl.constexpr, XROW: tl.constexpr):
    """The (L, 32) int32 pointers of a ``_q4k_math`` step's activation words of the low nibbles (the high ones are 8
    words on) and (xd, xs) words, for lines of blocks ``kb`` (L,). XROW: ``xq32`` and ``xd_ptr`` are (BN,) pointers,
    the activation row of each weight row (16-byte aligned), repeated over the step's NBLK blocks."""
    w = tl.arange(0, 32)[None, :]
    hc = w // 4
    if XROW:
        xq_l = tl.multiple_of(_spread_lines(xq32, NBLK, BN, 1)[:, None], [16, 16])
        xd_l = tl.multiple_of(_spread_lines(xd_ptr.to(tl.pointer_type(tl.int32)), NBLK, BN, 1)[:, None], [16, 16])
    else:
        xq_l, xd_l = xq32, xd_ptr.to(tl.pointer_type(tl.int32))
    px = xq_l + kb[:, None] * 64 + 16 * (hc // 2) + 4 * (hc % 2) + w % 4  # activation words of the low nibbles
    pd = tl.multiple_of(xd_l + kb[:, None] * 16, [16, 16]) + 4 * (hc // 2) + w % 4
    return px, pd


@triton.jit
def _q4k_rows32p(xq32, xd_ptr, wrow, kb0, kb1, nact, K, BN: tl.constexpr, NBLK: tl.constexpr, ASM: tl.constexpr,
                 PF: tl.constexpr = False, MR: tl.constexpr = 1, XROW: tl.constexpr = False,
                 PRE: tl.constexpr = False, hv0=0, q0=0, WCM: tl.constexpr = 0, AEV: tl.constexpr = 0):
    """``_q4k_rows32`` in fewer instructions (LOADS & 8; (xd, xs) pairs as with LOADS & 2), for up to
    MR (<= 4) activation rows at once. Returns four (BN,) float32 sums (zeros past MR).

    The same walk and loads, with: whole steps unmasked and the last, partial one masked (a zero
    header has zero scales); pointers set before the loop, moved by a scalar; each piece's two
    scales and two mins decoded side by side in the bytes of one word, with shifts and masks that
    depend on the piece alone (set before the loop); dp4a summing into its own accumulator; and the
    (xd, xs) floats picked out as integer bits, since adding a float zero is not free. With MR > 1,
    a step's weight words are loaded, masked and decoded once for all rows; ``nact`` of them are
    real (K int8 apart, their (xd, xs) pairs K // 16 floats apart; rows past ``nact`` repeat the
    last). PF (MR = 1): each step first loads the next step's weight bytes (masked past kb1), so a
    warp has two steps of them in flight (with PRE, the first step's are the caller's). XROW (MR = 1): ``xq32`` and
    ``xd_ptr`` are (BN,) pointers, the activation row of each weight row (16-byte aligned, as rows of K int8 and
    K // 16 pairs are), so one step may dot the rows of several experts with several activation rows. PRE (MR = 1):
    the first step's weight words ``hv0``, ``q0`` were loaded by the caller (``q4k_first_step``). WCM, AEV: the weight
    loads' cache modifier and the activation loads' eviction policy (``_q4k_step_m``)."""
    L: tl.constexpr = NBLK * BN
    i = tl.arange(0, L)
    w = tl.arange(0, 32)[None, :]
    sa, se, ma = _q4k_piece_shifts()
    pw, kb = _q4k_lines(wrow, kb0, BN, NBLK)  # (L, 1), (L,)
    tl.static_assert(MR == 1 or not XROW, "an activation row per weight row, one activation row each")
    px, pd = _q4k_act_ptrs(xq32, xd_ptr, kb, BN, NBLK, XROW)
    kw, dw = K // 4, K // 16  # xq words and (xd, xs) words per activation row (K is a multiple of 256)
    sx1, sx2, sx3 = tl.minimum(1, nact - 1) * kw, tl.minimum(2, nact - 1) * kw, tl.minimum(3, nact - 1) * kw
    sd1, sd2, sd3 = tl.minimum(1, nact - 1) * dw, tl.minimum(2, nact - 1) * dw, tl.minimum(3, nact - 1) * dw
    a0 = tl.zeros([L, 8], dtype=tl.float32)
    a1, a2, a3 = a0, a0, a0
    if PF:
        tl.static_assert(MR == 1, "prefetch with one activation row")
        live = (kb < kb1)[:, None]
        if PRE:
            hv, q = hv0, q0
        else:
            hv, q = _ld(pw + w % 4, live, True, WCM), _ld(pw + 4 + w, live, True, WCM)
        for k in range(kb0, kb1, NBLK):
            o = k - kb0
            nlive = (kb + o + NBLK < kb1)[:, None]
            nhv = _ld(pw + (o + NBLK) * 36 + w % 4, nlive, True, WCM)
            nq = _ld(pw + (o + NBLK) * 36 + 4 + w, nlive, True, WCM)
            xl, xh, v = _q4k_acts(px + o * 64, pd + o * 16, live, True, AEV)
            a0 += _q4k_math(hv, q, xl, xh, v, sa, se, ma, ASM)
            hv, q, live = nhv, nq, nlive
    else:
        kfull = kb0 + (kb1 - kb0) // NBLK * NBLK
        start = kb0
        tail = kfull < kb1
        if PRE:  # the first step, masked past kb1, on the words loaded before; then the whole steps after it
            tl.static_assert(MR == 1, "the first step loaded by the caller: one activation row")
            xl, xh, v = _q4k_acts(px, pd, (kb < kb1)[:, None], True, AEV)
            a0 += _q4k_math(hv0, q0, xl, xh, v, sa, se, ma, ASM)
            start = kb0 + NBLK
            tail = tail & (kfull > kb0)  # with fewer than NBLK blocks the first step was the only one
        for k in range(start, kfull, NBLK):
            o = k - kb0  # blocks from the first: a scalar, so the pointers keep their known alignment
            p0, p1, p2, p3 = _q4k_step_m(pw + o * 36, px + o * 64, pd + o * 16, sx1, sx2, sx3, sd1, sd2, sd3, None,
                                         sa, se, ma, ASM, False, MR, WCM, AEV)
            a0, a1, a2, a3 = a0 + p0, a1 + p1, a2 + p2, a3 + p3
        if tail:
            o = kfull - kb0
            p0, p1, p2, p3 = _q4k_step_m(pw + o * 36, px + o * 64, pd + o * 16, sx1, sx2, sx3, sd1, sd2, sd3,
                                         (kfull + i // BN < kb1)[:, None], sa, se, ma, ASM, True, MR, WCM, AEV)
            a0, a1, a2, a3 = a0 + p0, a1 + p1, a2 + p2, a3 + p3
    return (tl.sum(tl.reshape(tl.sum(a0, axis=1), [NBLK, BN]), axis=0),
            tl.sum(tl.reshape(tl.sum(a1, axis=1), [NBLK, BN]), axis=0),
            tl.sum(tl.reshape(tl.sum(a2, axis=1), [NBLK, BN]), axis=0),
            tl.sum(tl.reshape(tl.sum(a3, axis=1), [NBLK, BN]), axis=0))


@triton.jit
def _q4k_step_g(p0, p1, p2, p3, px, pd, live, sa, se, ma, ASM: tl.constexpr, MASK: tl.constexpr, G: tl.constexpr):
    """One step of ``_q4k_rows32g``: the weight words of up to 4 groups of lines (line pointers p0..p3; G of them
    real), then the activation words of those lines once, then each group's sums (zeros past G)."""
    w = tl.arange(0, 32)[None, :]
    hv0, q0 = _ld(p0 + w % 4, live, MASK), _ld(p0 + 4 + w, live, MASK)
    hv1, q1, hv2, q2, hv3, q3 = hv0, q0, hv0, q0, hv0, q0
    if G > 1:
        hv1, q1 = _ld(p1 + w % 4, live, MASK), _ld(p1 + 4 + w, live, MASK)
    if G > 2:
        hv2, q2 = _ld(p2 + w % 4, live, MASK), _ld(p2 + 4 + w, live, MASK)
    if G > 3:
        hv3, q3 = _ld(p3 + w % 4, live, MASK), _ld(p3 + 4 + w, live, MASK)
    xl, xh, v = _q4k_acts(px, pd, live, MASK)
    r0 = _q4k_math(hv0, q0, xl, xh, v, sa, se, ma, ASM)
    r1, r2, r3 = tl.zeros_like(r0), tl.zeros_like(r0), tl.zeros_like(r0)
    if G > 1:
        r1 = _q4k_math(hv1, q1, xl, xh, v, sa, se, ma, ASM)
    if G > 2:
        r2 = _q4k_math(hv2, q2, xl, xh, v, sa, se, ma, ASM)
    if G > 3:
        r3 = _q4k_math(hv3, q3, xl, xh, v, sa, se, ma, ASM)
    return r0, r1, r2, r3


@triton.jit
def _q4k_rows32g(xq32, xd_ptr, w0, w1, w2, w3, kb0, kb1, G: tl.constexpr, BN: tl.constexpr, NBLK: tl.constexpr,
                 ASM: tl.constexpr, PRE: tl.constexpr = False, h0=0, n0=0, h1=0, n1=0, h2=0, n2=0, h3=0, n3=0):
    """``_q4k_rows32p`` with XROW (an activation row per weight row: (BN,) pointers ``xq32``, ``xd_ptr``) for G (<= 4)
    groups of BN weight rows that share those activation rows: group g's rows at the (BN,) pointers w_g. A thread
    holds the same lines of every group, so each step's activation words are loaded once for G groups: a program
    reads its activations once per G * BN rows. Returns four (BN,) float32 sums (zeros past G). PRE: the first step's
    header and nibble words of group g, ``h_g`` and ``n_g``, were loaded by the caller (``q4k_first_step``)."""
    tl.static_assert(G >= 1 and G <= 4, "1 to 4 groups of rows")
    L: tl.constexpr = NBLK * BN
    i = tl.arange(0, L)
    sa, se, ma = _q4k_piece_shifts()
    p0, kb = _q4k_lines(w0, kb0, BN, NBLK)
    p1, p2, p3 = p0, p0, p0
    if G > 1:
        p1 = _q4k_lines(w1, kb0, BN, NBLK)[0]
    if G > 2:
        p2 = _q4k_lines(w2, kb0, BN, NBLK)[0]
    if G > 3:
        p3 = _q4k_lines(w3, kb0, BN, NBLK)[0]
    px, pd = _q4k_act_ptrs(xq32, xd_ptr, kb, BN, NBLK, True)
    a0 = tl.zeros([L, 8], dtype=tl.float32)
    a1, a2, a3 = a0, a0, a0
    kfull = kb0 + (kb1 - kb0) // NBLK * NBLK
    start = kb0
    tail = kfull < kb1
    if PRE:  # the first step, masked past kb1, on the words loaded before; then the whole steps after it
        xl, xh, v = _q4k_acts(px, pd, (kb < kb1)[:, None], True)
        a0 += _q4k_math(h0, n0, xl, xh, v, sa, se, ma, ASM)
        if G > 1:
            a1 += _q4k_math(h1, n1, xl, xh, v, sa, se, ma, ASM)
        if G > 2:
            a2 += _q4k_math(h2, n2, xl, xh, v, sa, se, ma, ASM)
        if G > 3:
            a3 += _q4k_math(h3, n3, xl, xh, v, sa, se, ma, ASM)
        start = kb0 + NBLK
        tail = tail & (kfull > kb0)  # with fewer than NBLK blocks the first step was the only one
    for k in range(start, kfull, NBLK):
        o = k - kb0
        r0, r1, r2, r3 = _q4k_step_g(p0 + o * 36, p1 + o * 36, p2 + o * 36, p3 + o * 36, px + o * 64, pd + o * 16,
                                     None, sa, se, ma, ASM, False, G)
        a0, a1, a2, a3 = a0 + r0, a1 + r1, a2 + r2, a3 + r3
    if tail:
        o = kfull - kb0
        r0, r1, r2, r3 = _q4k_step_g(p0 + o * 36, p1 + o * 36, p2 + o * 36, p3 + o * 36, px + o * 64, pd + o * 16,
                                     (kfull + i // BN < kb1)[:, None], sa, se, ma, ASM, True, G)
        a0, a1, a2, a3 = a0 + r0, a1 + r1, a2 + r2, a3 + r3
    return (tl.sum(tl.reshape(tl.sum(a0, axis=1), [NBLK, BN]), axis=0),
            tl.sum(tl.reshape(tl.sum(a1, axis=1), [NBLK, BN]), axis=0),
            tl.sum(tl.reshape(tl.sum(a2, axis=1), [NBLK, BN]), axis=0),
            tl.sum(tl.reshape(tl.sum(a3, axis=1), [NBLK, BN]), axis=0))


@triton.jit
def _q6k_quad(A, B, H, i: tl.constexpr):
    """The four signed 6-bit weights of quarter i (elements 32i + 4w + 0..3 of a half) from a word w's
    ql bytes A (i = 0, 2) and B (i = 1, 3) and qh bits H, one per byte."""
    if i == 0:
        q = (A & _M4) | ((H << 4) & 0x30303030)
    elif i == 1:
        q = (B & _M4) | ((H << 2) & 0x30303030)
    elif i == 2:
        q = ((A >> 4) & _M4) | (H & 0x30303030)
    else:
        q = ((B >> 4) & _M4) | ((H >> 2) & 0x30303030)
    return ((q | _SIGN4) - 0x20202020) ^ _SIGN4  # each byte minus 32, no borrow across bytes


@triton.jit
def _q6k_fetch(wrow, kb, h4, w4):
    """The weight words of one Q6_K step: A, B, H (BN, NBLK, 2, 2, 4) and d (BN, NBLK, 1, 1)."""
    blk = wrow[:, None] + kb[None, :] * 210  # (BN, NBLK) uint8
    b16 = blk.to(tl.pointer_type(tl.uint16))[:, :, None, None, None]
    A = _u32(b16 + (32 * h4 + 2 * w4)[None])  # ql bytes 64h + 4w: low nibbles -> i = 0, high -> i = 2
    B = _u32(b16 + (32 * h4 + 16 + 2 * w4)[None])  # ql bytes 64h + 32 + 4w: i = 1 and 3
    H = _u32(b16 + (64 + 16 * h4 + 2 * w4)[None])  # qh bytes 128 + 32h + 4w: 2 bits for each i
    d = _f16(tl.load(blk.to(tl.pointer_type(tl.uint16)) + 104).to(tl.int32))[:, :, None, None]
    return A, B, H, d


@triton.jit
def _q6k_rows(xq32, xd_ptr, xs_ptr, wrow, kb0, kb1, BN: tl.constexpr, NBLK: tl.constexpr, ASM: tl.constexpr,
              PF: tl.constexpr):
    """Q6_K: tensors are (BN, NBLK, 2 halves, 2 quarters, 4 words); word w = 4 * quarter + r of half h
    gives the four int8 words of elements 128h + 32i + 4w + (0..3), i = 0..3, whose scale is
    scales[8h + 2i + quarter]."""
    h4 = tl.arange(0, 2)[None, :, None, None]  # over (NBLK, h, quarter, r)
    w4 = tl.arange(0, 2)[None, None, :, None] * 4 + tl.arange(0, 4)[None, None, None, :]
    h2 = tl.arange(0, 2)[:, None]  # over (h, quarter)
    qt2 = tl.arange(0, 2)[None, :]
    acc = tl.zeros([BN, NBLK, 2, 2], dtype=tl.float32)
    if PF:
        nA, nB, nH, nd = _q6k_fetch(wrow, tl.minimum(kb0 + tl.arange(0, NBLK), kb1 - 1), h4, w4)
    for k in range(kb0, kb1, NBLK):
        kb = k + tl.arange(0, NBLK)
        keep = (kb < kb1)[None, :, None, None]
        kb = tl.minimum(kb, kb1 - 1)
        if PF:
            A, B, H, d = nA, nB, nH, nd
            nA, nB, nH, nd = _q6k_fetch(wrow, tl.minimum(kb + NBLK, kb1 - 1), h4, w4)
        else:
            A, B, H, d = _q6k_fetch(wrow, kb, h4, w4)
        blk = wrow[:, None] + kb[None, :] * 210  # (BN, NBLK) uint8
        sp = (blk[:, :, None, None] + 192 + (8 * h2 + qt2)[None, None]).to(tl.pointer_type(tl.int8))
        xo = tl.broadcast_to((kb[:, None, None, None] * 64 + 32 * h4 + w4)[None], [BN, NBLK, 2, 2, 4])
        # xo: the word of element 128h + 4w; gi: the x group of i = 0
        gi = tl.broadcast_to((kb[:, None, None] * 8 + 4 * h2[None])[None], [BN, NBLK, 2, 2])
        part = tl.zeros([BN, NBLK, 2, 2], dtype=tl.float32)
        for i in tl.static_range(4):
            q = _q6k_quad(A, B, H, i)
            s = tl.sum(_dp4a(q, tl.load(xq32 + xo + 8 * i), True, ASM), axis=4).to(tl.float32)
            sc = tl.load(sp + 2 * i).to(tl.float32)  # (BN, NBLK, 2, 2)
            part += sc * tl.load(xd_ptr + gi + i) * s
        acc += tl.where(keep, d * part, 0.0)
    return tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)


@triton.jit
def _q6k_lanes16(row0, N, BN: tl.constexpr, NBLK: tl.constexpr):
    """The lanes of a sixteen-thread Q6_K step: for each, its line (block k + line // BN of row
    line % BN), word w4 and half h, and its weight row (clamped to N - 1)."""
    t = tl.arange(0, NBLK * BN * 16)
    line = t // 16
    return line, t & 7, (t >> 3) & 1, tl.minimum(row0 + line % BN, N - 1)


@triton.jit
def _q6k_rows16(xq32, xd_ptr, w_ptr, row0, N, rstride, kb0, kb1, BN: tl.constexpr, NBLK: tl.constexpr,
                ASM: tl.constexpr):
    """Q6_K with sixteen threads per block (LOADS & 4): a step is one flat tensor of NBLK * BN * 16
    lanes, lane t working on word w = t % 8 of half h = (t // 8) % 2 of line t // 16 (block
    k + line // BN of row line % BN), with the math of ``_q6k_rows`` for one word. Being flat, the
    tensor leaves the compiler no choice of lane order: a warp's 2-byte loads fall in two blocks.
    The word offsets are built with masks, which hide their contiguity from the compiler, so that
    the activation loads are single words in the layout of the weight loads (no layout change)."""
    line, w4, h, rows = _q6k_lanes16(row0, N, BN, NBLK)
    wr = w_ptr + rows.to(tl.int64) * rstride
    acc = tl.zeros([NBLK * BN * 16], dtype=tl.float32)
    for k in range(kb0, kb1, NBLK):
        kb = k + line // BN
        keep = kb < kb1
        kb = tl.minimum(kb, kb1 - 1)
        blk = wr + kb * 210
        b16 = blk.to(tl.pointer_type(tl.uint16))
        A = _u32(b16 + 32 * h + 2 * w4)  # ql bytes 64h + 4w: low nibbles -> i = 0, high -> i = 2
        B = _u32(b16 + 32 * h + 16 + 2 * w4)  # ql bytes 64h + 32 + 4w: i = 1 and 3
        H = _u32(b16 + 64 + 16 * h + 2 * w4)  # qh bytes 128 + 32h + 4w: 2 bits for each i
        d = _f16(tl.load(b16 + 104).to(tl.int32))
        sp = (blk + 192 + 8 * h + (w4 >> 2)).to(tl.pointer_type(tl.int8))
        xo = kb * 64 + 32 * h + w4
        gi = kb * 8 + 4 * h
        part = tl.zeros([NBLK * BN * 16], dtype=tl.float32)
        for i in tl.static_range(4):
            s = _dp4a(_q6k_quad(A, B, H, i), tl.load(xq32 + xo + 8 * i), True, ASM)
            part += (tl.load(sp + 2 * i).to(tl.int32) * s).to(tl.float32) * tl.load(xd_ptr + gi + i)
        acc += tl.where(keep, d * part, 0.0)
    return tl.sum(tl.sum(tl.reshape(acc, [NBLK, BN, 16]), axis=2), axis=0)


@triton.jit
def _q6k_lane(pa, ph, ps, pdd, px, pd, live, ASM: tl.constexpr, MASK: tl.constexpr):
    """One step of ``_q6k_rows16p``: each lane's partial sum for its word, from its pointers to the ql
    word of quarter 0 (``pa``, uint16; quarter 1 is 32 bytes on), the qh word (``ph``), the scale of
    quarter 0 (``ps``), the block's d (``pdd``), the activation word of quarter 0 (``px``) and the
    half's four xd (``pd``). MASK: lanes past the block range (``live`` false) read nothing and give
    zeros (the last step)."""
    if MASK:
        A = tl.load(pa, mask=live, other=0).to(tl.int32) | (tl.load(pa + 1, mask=live, other=0).to(tl.int32) << 16)
        B = tl.load(pa + 16, mask=live, other=0).to(tl.int32) \
            | (tl.load(pa + 17, mask=live, other=0).to(tl.int32) << 16)
        H = tl.load(ph, mask=live, other=0).to(tl.int32) | (tl.load(ph + 1, mask=live, other=0).to(tl.int32) << 16)
    else:
        A, B, H = _u32(pa), _u32(pa + 16), _u32(ph)  # ql bytes 64h + 4w (i = 0, 2), + 32 (i = 1, 3); qh bytes
    return _q6k_words_dot(A, B, H, ps, pdd, px, pd, live, ASM, MASK, False)


@triton.jit
def _q6k_words_dot(A, B, H, ps, pdd, px, pd, live, ASM: tl.constexpr, MASK: tl.constexpr, WIDE: tl.constexpr):
    """The rest of a Q6_K lane step once its weight words are loaded (``_q6k_lane``: one word a lane, A (lanes,);
    WIDE, ``_q6k_lane_a``: W words, A (lanes, W) summed over W): d, the half's four xd (one 16-byte load), then the
    four quarters' dp4a sums times scale and xd, times d."""
    j4 = tl.arange(0, 4)[None, :]
    if MASK:
        xlive = live[:, None] if WIDE else live  # over the activation words' shape
        d = _f16(tl.load(pdd, mask=live, other=0).to(tl.int32))
        xd4 = tl.load(pd[:, None] + j4, mask=live[:, None], other=0.0)
    else:
        d = _f16(tl.load(pdd).to(tl.int32))
        xd4 = tl.load(pd[:, None] + j4)
    xi = xd4.to(tl.int32, bitcast=True)
    part = tl.zeros([pdd.shape[0]], dtype=tl.float32)
    for i in tl.static_range(4):
        if MASK:
            sc = tl.load(ps + 2 * i, mask=live, other=0).to(tl.int32)
            xw = tl.load(px + 8 * i, mask=xlive, other=0)
        else:
            sc, xw = tl.load(ps + 2 * i).to(tl.int32), tl.load(px + 8 * i)
        s = _dp4a(_q6k_quad(A, B, H, i), xw, True, ASM)
        if WIDE:
            s = tl.sum(s, axis=1)
        xdi = tl.sum(tl.where(j4 == i, xi, 0), axis=1).to(tl.float32, bitcast=True)
        part += (sc * s).to(tl.float32) * xdi
    return d * part


@triton.jit
def _q6k_rows16p(xq32, xd_ptr, w_ptr, row0, N, rstride, kb0, kb1, BN: tl.constexpr, NBLK: tl.constexpr,
                 ASM: tl.constexpr):
    """``_q6k_rows16`` in fewer instructions (Q6_K with LOADS & 8): whole steps unmasked and the last,
    partial one masked; each lane's pointers set before the loop and moved by a scalar; a half's four
    xd as one 16-byte load."""
    line, w4, h, rows = _q6k_lanes16(row0, N, BN, NBLK)
    kb = kb0 + line // BN
    blk = w_ptr + rows.to(tl.int64) * rstride + kb * 210
    pa = (blk + 64 * h + 4 * w4).to(tl.pointer_type(tl.uint16))
    ph = (blk + 128 + 32 * h + 4 * w4).to(tl.pointer_type(tl.uint16))
    ps = (blk + 192 + 8 * h + (w4 >> 2)).to(tl.pointer_type(tl.int8))
    pdd = (blk + 208).to(tl.pointer_type(tl.uint16))
    px = xq32 + kb * 64 + 32 * h + w4
    pd = tl.multiple_of(xd_ptr + kb * 8 + 4 * h, 16)
    acc = tl.zeros([NBLK * BN * 16], dtype=tl.float32)
    kfull = kb0 + (kb1 - kb0) // NBLK * NBLK
    for k in range(kb0, kfull, NBLK):
        o = k - kb0
        acc += _q6k_lane(pa + o * 105, ph + o * 105, ps + o * 210, pdd + o * 105, px + o * 64, pd + o * 8, None, ASM,
                         False)
    if kfull < kb1:
        o = kfull - kb0
        acc += _q6k_lane(pa + o * 105, ph + o * 105, ps + o * 210, pdd + o * 105, px + o * 64, pd + o * 8,
                         kfull + line // BN < kb1, ASM, True)
    return tl.sum(tl.sum(tl.reshape(acc, [NBLK, BN, 16]), axis=2), axis=0)


@triton.jit
def _q6k_lane_a(pa, ph, ps, pdd, px, pd, live, ASM: tl.constexpr, MASK: tl.constexpr):
    """One step of ``_q6k_rows_a``: each lane's partial sum for its W words (``_q6k_lane`` with (lanes, W) int32
    pointers ``pa`` (ql, quarter 0; quarter 1 is 8 words on), ``ph`` (qh) and ``px`` (activations))."""
    if MASK:
        lw = live[:, None]
        A, B, H = tl.load(pa, mask=lw, other=0), tl.load(pa + 8, mask=lw, other=0), tl.load(ph, mask=lw, other=0)
    else:
        A, B, H = tl.load(pa), tl.load(pa + 8), tl.load(ph)
    return _q6k_words_dot(A, B, H, ps, pdd, px, pd, live, ASM, MASK, True)


@triton.jit
def _q6k_rows_a(xq32, xd_ptr, w_ptr, row0, N, row_bytes, kb0, kb1, BN: tl.constexpr, NBLK: tl.constexpr,
                W: tl.constexpr, ASM: tl.constexpr):
    """Q6_K rows in the aligned layout (``kernels.q6k_layout``): 16 / W lanes per block, each reading W words
    (4 W bytes) of ql at once, of the quarter-1 ql and of qh, with the math of ``_q6k_rows16p``. Rows start on
    4 W-byte boundaries (the caller's choice of W), and so do the bodies (208 bytes) and every lane's words.
    Whole steps unmasked, the last partial one masked."""
    LPB: tl.constexpr = 16 // W  # lanes per block
    t = tl.arange(0, NBLK * BN * LPB)
    line = t // LPB  # lane t: block kb0 + line // BN of row line % BN; half h, first word wq
    h = (t % LPB) // (LPB // 2)
    wq = (t % (LPB // 2)) * W
    rows = tl.minimum(row0 + line % BN, N - 1)
    kb = kb0 + line // BN
    wr = w_ptr + rows.to(tl.int64) * ((row_bytes // (4 * W)) * (4 * W))
    body = wr + kb * 208
    wv = tl.arange(0, W)[None, :]
    pa = (body + 64 * h + 4 * wq).to(tl.pointer_type(tl.int32))[:, None] + wv  # ql bytes 64h + 4w (i = 0, 2)
    ph = (body + 128 + 32 * h + 4 * wq).to(tl.pointer_type(tl.int32))[:, None] + wv  # qh bytes 128 + 32h + 4w
    ps = (body + 192 + 8 * h + (wq >> 2)).to(tl.pointer_type(tl.int8))
    pdd = (wr + (row_bytes // 210) * 208).to(tl.pointer_type(tl.uint16)) + kb
    px = xq32 + (kb * 64 + 32 * h + wq)[:, None] + wv
    pd = tl.multiple_of(xd_ptr + kb * 8 + 4 * h, 16)
    acc = tl.zeros([NBLK * BN * LPB], dtype=tl.float32)
    kfull = kb0 + (kb1 - kb0) // NBLK * NBLK
    for k in range(kb0, kfull, NBLK):
        o = k - kb0
        acc += _q6k_lane_a(pa + o * 52, ph + o * 52, ps + o * 208, pdd + o, px + o * 64, pd + o * 8, None, ASM, False)
    if kfull < kb1:
        o = kfull - kb0
        acc += _q6k_lane_a(pa + o * 52, ph + o * 52, ps + o * 208, pdd + o, px + o * 64, pd + o * 8,
                           kfull + line // BN < kb1, ASM, True)
    return tl.sum(tl.sum(tl.reshape(acc, [NBLK, BN, LPB]), axis=2), axis=0)


@triton.jit
def _q6k_group_words(r, kb, h, wq, nbr, live, MASK: tl.constexpr, W: tl.constexpr):
    """One group's weight words of a ``_q6k_rows_ag`` step, from its lanes' row pointers ``r`` (uint8, 4 W-byte
    aligned): ql words A (quarters 0, 2) and B (1, 3) and qh words H, (lanes, W) int32; the two scale words of the
    lane's half (lanes, 2) int32 (its four scales are bytes q, q + 2, 4 + q, 6 + q, q = wq // 4; one 8-byte load
    where rows are 8-byte aligned, W > 1); d (lanes,) float32."""
    wv = tl.arange(0, W)[None, :]
    j2 = tl.arange(0, 2)[None, :]
    body = r + kb * 208
    pa = tl.multiple_of(body + 64 * h + 4 * wq, 4 * W).to(tl.pointer_type(tl.int32))[:, None] + wv
    ph = tl.multiple_of(body + 128 + 32 * h + 4 * wq, 4 * W).to(tl.pointer_type(tl.int32))[:, None] + wv
    ps = tl.multiple_of(body + 192 + 8 * h, 8 if W > 1 else 4).to(tl.pointer_type(tl.int32))[:, None] + j2
    pdd = (r + nbr * 208).to(tl.pointer_type(tl.uint16)) + kb
    lw = live[:, None] if MASK else None
    A, B, H, S = _ld(pa, lw, MASK), _ld(pa + 8, lw, MASK), _ld(ph, lw, MASK), _ld(ps, lw, MASK)
    return A, B, H, S, _f16(_ld(pdd, live, MASK).to(tl.int32))


@triton.jit
def _q6k_group_dot(A, B, H, S, d, x0, x1, x2, x3, xi, sh, ASM: tl.constexpr):
    """One group's sums of a ``_q6k_rows_ag`` step: the four quarters' dp4a sums of its words with the activation
    words x0..x3 (lanes, W), times their scales (bytes of S shifted by ``sh``) and xd (xi: the half's four xd bits,
    (lanes, 4)), times d."""
    j2 = tl.arange(0, 2)[None, :]
    j4 = tl.arange(0, 4)[None, :]
    s01 = tl.sum(tl.where(j2 == 0, S, 0), axis=1) >> sh  # scales of quarters 0 and 1 in bytes 0 and 2
    s23 = tl.sum(tl.where(j2 == 1, S, 0), axis=1) >> sh  # of quarters 2 and 3
    part = tl.zeros([d.shape[0]], dtype=tl.float32)
    for i in tl.static_range(4):
        if i == 0:
            xw = x0
        elif i == 1:
            xw = x1
        elif i == 2:
            xw = x2
        else:
            xw = x3
        sw = s01 if i < 2 else s23
        sc = (sw << (24 - 16 * (i % 2))) >> 24  # the signed scale byte
        s = tl.sum(_dp4a(_q6k_quad(A, B, H, i), xw, True, ASM), axis=1)
        xdi = tl.sum(tl.where(j4 == i, xi, 0), axis=1).to(tl.float32, bitcast=True)
        part += (sc * s).to(tl.float32) * xdi
    return d * part


@triton.jit
def _q6k_step_ag(r0, r1, r2, r3, kb, h, wq, sh, nbr, px, pd, live, ASM: tl.constexpr, MASK: tl.constexpr,
                 G: tl.constexpr, W: tl.constexpr):
    """One step of ``_q6k_rows_ag``: the weight words of up to 4 groups (lanes' row pointers r0..r3; G of them real),
    then the activation words and xd of the step once, then each group's sums (zeros past G)."""
    A0, B0, H0, S0, d0 = _q6k_group_words(r0, kb, h, wq, nbr, live, MASK, W)
    A1, B1, H1, S1, d1 = A0, B0, H0, S0, d0
    A2, B2, H2, S2, d2 = A0, B0, H0, S0, d0
    A3, B3, H3, S3, d3 = A0, B0, H0, S0, d0
    if G > 1:
        A1, B1, H1, S1, d1 = _q6k_group_words(r1, kb, h, wq, nbr, live, MASK, W)
    if G > 2:
        A2, B2, H2, S2, d2 = _q6k_group_words(r2, kb, h, wq, nbr, live, MASK, W)
    if G > 3:
        A3, B3, H3, S3, d3 = _q6k_group_words(r3, kb, h, wq, nbr, live, MASK, W)
    lw = live[:, None] if MASK else None
    j4 = tl.arange(0, 4)[None, :]
    x0, x1, x2, x3 = _ld(px, lw, MASK), _ld(px + 8, lw, MASK), _ld(px + 16, lw, MASK), _ld(px + 24, lw, MASK)
    xi = _ld(pd[:, None] + j4, lw, MASK).to(tl.int32, bitcast=True)
    g0 = _q6k_group_dot(A0, B0, H0, S0, d0, x0, x1, x2, x3, xi, sh, ASM)
    g1, g2, g3 = tl.zeros_like(g0), tl.zeros_like(g0), tl.zeros_like(g0)
    if G > 1:
        g1 = _q6k_group_dot(A1, B1, H1, S1, d1, x0, x1, x2, x3, xi, sh, ASM)
    if G > 2:
        g2 = _q6k_group_dot(A2, B2, H2, S2, d2, x0, x1, x2, x3, xi, sh, ASM)
    if G > 3:
        g3 = _q6k_group_dot(A3, B3, H3, S3, d3, x0, x1, x2, x3, xi, sh, ASM)
    return g0, g1, g2, g3


@triton.jit
def _q6k_rows_ag(xq32, xd_ptr, w0, w1, w2, w3, nbr, kb0, kb1, G: tl.constexpr, L: tl.constexpr, NBLK: tl.constexpr,
                 W: tl.constexpr, ASM: tl.constexpr):
    """Aligned Q6_K rows (``_q6k_rows_a``'s lanes and math) with an activation row per line: (L,) pointers ``xq32``
    (int32) and ``xd_ptr`` (float32, one xd per 32 values), each 16-byte aligned, and G (<= 4) groups of L weight rows
    that share them, group g's rows at the (L,) uint8 pointers w_g (4 W-byte aligned, with ``nbr`` blocks each).
    A lane holds the same words of every group, so each step's activation words and xd are loaded once for G rows;
    a lane's four scales come from one 8-byte load (two 4-byte ones where W = 1). Whole steps unmasked, the last
    partial one masked. Returns four (L,) float32 sums (zeros past G)."""
    tl.static_assert(G >= 1 and G <= 4, "1 to 4 groups of rows")
    LPB: tl.constexpr = 16 // W  # lanes per block
    t = tl.arange(0, NBLK * L * LPB)
    h = (t % LPB) // (LPB // 2)  # the lane's half of its block and first word in it
    wq = (t % (LPB // 2)) * W
    sh = 8 * (wq // 4)  # its scales' byte in each pair
    kb = kb0 + t // (L * LPB)
    r0 = tl.multiple_of(_spread_lines(w0, NBLK, L, LPB), 4 * W)
    r1, r2, r3 = r0, r0, r0
    if G > 1:
        r1 = tl.multiple_of(_spread_lines(w1, NBLK, L, LPB), 4 * W)
    if G > 2:
        r2 = tl.multiple_of(_spread_lines(w2, NBLK, L, LPB), 4 * W)
    if G > 3:
        r3 = tl.multiple_of(_spread_lines(w3, NBLK, L, LPB), 4 * W)
    xq_t = tl.multiple_of(_spread_lines(xq32, NBLK, L, LPB), 16)
    xd_t = tl.multiple_of(_spread_lines(xd_ptr, NBLK, L, LPB), 16)
    px = tl.multiple_of(xq_t + kb * 64 + 32 * h + wq, 4 * W)[:, None] + tl.arange(0, W)[None, :]
    pd = tl.multiple_of(xd_t + kb * 8 + 4 * h, 16)
    a0 = tl.zeros([NBLK * L * LPB], dtype=tl.float32)
    a1, a2, a3 = a0, a0, a0
    kfull = kb0 + (kb1 - kb0) // NBLK * NBLK
    for k in range(kb0, kfull, NBLK):
        o = k - kb0
        g0, g1, g2, g3 = _q6k_step_ag(r0, r1, r2, r3, kb + o, h, wq, sh, nbr, px + o * 64, pd + o * 8, None, ASM,
                                      False, G, W)
        a0, a1, a2, a3 = a0 + g0, a1 + g1, a2 + g2, a3 + g3
    if kfull < kb1:
        o = kfull - kb0
        g0, g1, g2, g3 = _q6k_step_ag(r0, r1, r2, r3, kb + o, h, wq, sh, nbr, px + o * 64, pd + o * 8, kb + o < kb1,
                                      ASM, True, G, W)
        a0, a1, a2, a3 = a0 + g0, a1 + g1, a2 + g2, a3 + g3
    return (tl.sum(tl.sum(tl.reshape(a0, [NBLK, L, LPB]), axis=2), axis=0),
            tl.sum(tl.sum(tl.reshape(a1, [NBLK, L, LPB]), axis=2), axis=0),
            tl.sum(tl.sum(tl.reshape(a2, [NBLK, L, LPB]), axis=2), axis=0),
            tl.sum(tl.sum(tl.reshape(a3, [NBLK, L, LPB]), axis=2), axis=0))


@triton.jit
def _q80_fetch(wrow, kb, w):
    """One Q8_0 step: the quant words (BN, NB, 8) and d (BN, NB, 1)."""
    b16 = (wrow[:, None] + kb[None, :] * 34).to(tl.pointer_type(tl.uint16))[:, :, None]  # (BN, NB, 1)
    return _u32(b16 + 1 + 2 * w[None, None, :]), _f16(tl.load(b16).to(tl.int32))


@triton.jit
def _q80_rows(xq32, xd_ptr, xs_ptr, wrow, kb0, kb1, BN: tl.constexpr, NBLK: tl.constexpr, ASM: tl.constexpr,
              PF: tl.constexpr):
    """Q8_0: tensors are (BN, NB, 8 words) with NB = 8 NBLK blocks (256 elements per NBLK, as for
    the K-quants); a 34-byte block is d then 32 int8. Every word keeps its own float sum until the
    loop ends, so no step needs a shuffle."""
    NB: tl.constexpr = 8 * NBLK
    w = tl.arange(0, 8)
    acc = tl.zeros([BN, NB, 8], dtype=tl.float32)
    if PF:
        nq, nd = _q80_fetch(wrow, tl.minimum(kb0 + tl.arange(0, NB), kb1 - 1), w)
    for k in range(kb0, kb1, NB):
        kb = k + tl.arange(0, NB)
        keep = (kb < kb1)[None, :, None]
        kb = tl.minimum(kb, kb1 - 1)
        if PF:
            q, d = nq, nd
            nq, nd = _q80_fetch(wrow, tl.minimum(kb + NB, kb1 - 1), w)
        else:
            q, d = _q80_fetch(wrow, kb, w)
        xo = tl.broadcast_to((kb[:, None] * 8 + w[None, :])[None], [BN, NB, 8])
        s = _dp4a(q, tl.load(xq32 + xo), True, ASM).to(tl.float32)
        acc += tl.where(keep, d * tl.load(xd_ptr + tl.broadcast_to(kb[None, :, None], [BN, NB, 1])) * s, 0.0)
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _spread4(t):
    """Bits 0..3 of t to bit 4 of bytes 0..3."""
    return ((t * 0x00204081) & 0x01010101) << 4


@triton.jit
def _q50_fetch(wrow, kb, w3):
    """One Q5_0 step: the fifth-bit word (BN, NB, 1), the nibble words (BN, NB, 4), d (BN, NB, 1)."""
    b16 = (wrow[:, None] + kb[None, :] * 22).to(tl.pointer_type(tl.uint16))[:, :, None]  # (BN, NB, 1)
    return _u32(b16 + 1), _u32(b16 + 3 + 2 * w3), _f16(tl.load(b16).to(tl.int32))


@triton.jit
def _q50_rows(xq32, xd_ptr, xs_ptr, wrow, kb0, kb1, BN: tl.constexpr, NBLK: tl.constexpr, ASM: tl.constexpr,
              PF: tl.constexpr):
    """Q5_0: tensors are (BN, NB, 4 words), NB = 8 NBLK; a 22-byte block is d, 32 fifth bits, 16 bytes
    of nibbles (element j in the low nibble of byte j, element 16 + j in its high nibble); w = q - 16."""
    NB: tl.constexpr = 8 * NBLK
    w = tl.arange(0, 4)
    w3 = w[None, None, :]
    acc = tl.zeros([BN, NB, 4], dtype=tl.float32)
    if PF:
        nqh, nQ, nd = _q50_fetch(wrow, tl.minimum(kb0 + tl.arange(0, NB), kb1 - 1), w3)
    for k in range(kb0, kb1, NB):
        kb = k + tl.arange(0, NB)
        keep = (kb < kb1)[None, :, None]
        kb = tl.minimum(kb, kb1 - 1)
        if PF:
            qh, Q, d = nqh, nQ, nd
            nqh, nQ, nd = _q50_fetch(wrow, tl.minimum(kb + NB, kb1 - 1), w3)
        else:
            qh, Q, d = _q50_fetch(wrow, kb, w3)
        lo = (Q & _M4) | _spread4((qh >> (4 * w3)) & 15)
        hi = ((Q >> 4) & _M4) | _spread4((qh >> (16 + 4 * w3)) & 15)
        xo = tl.broadcast_to((kb[:, None] * 8 + w[None, :])[None], [BN, NB, 4])
        s = (_dp4a(lo, tl.load(xq32 + xo), False, ASM) + _dp4a(hi, tl.load(xq32 + xo + 4), False, ASM)).to(tl.float32)
        kb3 = tl.broadcast_to(kb[None, :, None], [BN, NB, 1])
        acc += tl.where(keep, d * (tl.load(xd_ptr + kb3) * s - 4.0 * tl.load(xs_ptr + kb3)), 0.0)  # 16 xs over 4 words
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def mmvq_rows(xq_ptr, xd_ptr, xs_ptr, w_ptr, row0, N, row_bytes, kb0, kb1,
              QTYPE: tl.constexpr, BN: tl.constexpr, NBLK: tl.constexpr, ASM: tl.constexpr, PF: tl.constexpr = False,
              LOADS: tl.constexpr = 0, ALIGNED: tl.constexpr = 0):
    """Rows row0 .. row0 + BN - 1 of the weight at w_ptr dotted with one quantized activation row
    (xq int8, xd/xs per 32 values) over blocks kb0..kb1-1: (BN,) float32. Rows past N are clamped
    (their values are garbage for the caller to mask); an empty block range gives zeros. ALIGNED (Q6_K): 0 for
    GGUF's layout, else the rows are in the aligned layout and each lane reads ALIGNED words (``_q6k_rows_a``;
    LOADS is then unused)."""
    rows = tl.minimum(row0 + tl.arange(0, BN), N - 1)
    wrow = w_ptr + rows.to(tl.int64) * row_stride(row_bytes, QTYPE)
    xq32 = xq_ptr.to(tl.pointer_type(tl.int32))
    if QTYPE == 14 and ALIGNED:
        return _q6k_rows_a(xq32, xd_ptr, w_ptr, row0, N, row_bytes, kb0, kb1, BN, NBLK, ALIGNED, ASM)
    elif QTYPE == 12 and LOADS & 8:
        tl.static_assert(LOADS & 2 != 0, "the lean Q4_K step (LOADS & 8) reads (xd, xs) pairs (LOADS & 2)")
        return _q4k_rows32p(xq32, xd_ptr, wrow, kb0, kb1, 1, 0, BN, NBLK, ASM, PF)[0]
    elif QTYPE == 12 and LOADS & 4:
        return _q4k_rows32(xq32, xd_ptr, xs_ptr, wrow, kb0, kb1, BN, NBLK, ASM, LOADS)
    elif QTYPE == 12:
        return _q4k_rows(xq32, xd_ptr, xs_ptr, wrow, kb0, kb1, BN, NBLK, ASM, PF, LOADS)
    elif QTYPE == 14 and LOADS & 8:
        return _q6k_rows16p(xq32, xd_ptr, w_ptr, row0, N, row_stride(row_bytes, QTYPE), kb0, kb1, BN, NBLK, ASM)
    elif QTYPE == 14 and LOADS & 4:
        return _q6k_rows16(xq32, xd_ptr, w_ptr, row0, N, row_stride(row_bytes, QTYPE), kb0, kb1, BN, NBLK, ASM)
    elif QTYPE == 14:
        return _q6k_rows(xq32, xd_ptr, xs_ptr, wrow, kb0, kb1, BN, NBLK, ASM, PF)
    elif QTYPE == 8:
        return _q80_rows(xq32, xd_ptr, xs_ptr, wrow, kb0, kb1, BN, NBLK, ASM, PF)
    else:
        return _q50_rows(xq32, xd_ptr, xs_ptr, wrow, kb0, kb1, BN, NBLK, ASM, PF)


@triton.jit
def mmvq_kernel(xq_ptr, xd_ptr, xs_ptr, w_ptr, out_ptr, N, K, row_bytes, nblocks, blocks_per_split,
                stride_om, stride_os, M,
                QTYPE: tl.constexpr, BN: tl.constexpr, NBLK: tl.constexpr, ASM: tl.constexpr,
                PF: tl.constexpr = False, LOADS: tl.constexpr = 0, MR: tl.constexpr = 1, ALIGNED: tl.constexpr = 0,
                PDL: tl.constexpr = False):
    """out[s, m, n] = weight row n . activation row m over split s's blocks, for M activation rows.

    Grid: (cdiv(M, MR) * cdiv(N, BN), splits); program i is row block i // G of activation rows
    MR * (i % G) .. + MR - 1, G = cdiv(M, MR). With MR = 1 the M programs of one row block run side
    by side and the rows after the first find the weights in L2 (and the first axis, unlike the
    second, has room for 129280 one-row blocks); MR > 1 (Q4_K with LOADS & 8 only): one program
    reads the weights once for MR activation rows (without PF: its loads are those of one step). ALIGNED: see
    ``mmvq_rows``. PDL: launched with programmatic dependent launch (``pdl_enter``).
    """
    pdl_enter(PDL)
    pid = tl.program_id(0)
    G = tl.cdiv(M, MR)
    m = (pid % G).to(tl.int64) * MR
    row0 = (pid // G) * BN
    s = tl.program_id(1)
    kb0 = s * blocks_per_split
    kb1 = tl.minimum(kb0 + blocks_per_split, nblocks)
    ng = (2 if LOADS & 2 else 1) * (K // 32)  # scale words per activation row
    rows = row0 + tl.arange(0, BN)
    po = out_ptr + s.to(tl.int64) * stride_os + m * stride_om + rows
    if MR > 1:
        tl.static_assert(QTYPE == 12 and LOADS & 8 != 0 and LOADS & 2 != 0 and MR <= 4,
                         "several activation rows per program: the lean Q4_K step (LOADS & 8 and 2), up to 4")
        wrow = w_ptr + tl.minimum(rows, N - 1).to(tl.int64) * row_stride(row_bytes, QTYPE)
        nact = tl.minimum(M - m, MR).to(tl.int32)
        a0, a1, a2, a3 = _q4k_rows32p(xq_ptr.to(tl.pointer_type(tl.int32)) + m * (K // 4), xd_ptr + m * ng, wrow,
                                      kb0, kb1, nact, K, BN, NBLK, ASM, False, MR)
        ty = out_ptr.dtype.element_ty
        r = tl.zeros([BN], dtype=tl.int32) + nact  # activation rows of this program, over its weight rows
        tl.store(po, a0.to(ty), mask=rows < N)
        tl.store(po + stride_om, a1.to(ty), mask=(rows < N) & (r > 1))
        if MR > 2:
            tl.store(po + 2 * stride_om, a2.to(ty), mask=(rows < N) & (r > 2))
        if MR > 3:
            tl.store(po + 3 * stride_om, a3.to(ty), mask=(rows < N) & (r > 3))
    else:
        acc = mmvq_rows(xq_ptr + m * K, xd_ptr + m * ng, xs_ptr + m * (K // 32), w_ptr, row0, N, row_bytes,
                        kb0, kb1, QTYPE, BN, NBLK, ASM, PF, LOADS, ALIGNED)
        tl.store(po, acc.to(out_ptr.dtype.element_ty), mask=rows < N)


@triton.jit
def moe_up_q8_kernel(xq_ptr, xd_ptr, xs_ptr, gate_ptr, up_ptr, h_ptr, ids_ptr, E, I, D, nb_g, nb_u, rb_g, rb_u,
                     es_g, es_u, TOPK,
                     GATE_T: tl.constexpr, UP_T: tl.constexpr, BN: tl.constexpr, NBLK: tl.constexpr,
                     ASM: tl.constexpr, PF: tl.constexpr = False, LOADS: tl.constexpr = 0, ALIGNED: tl.constexpr = 0,
                     PDL: tl.constexpr = False, GU: tl.constexpr = False):
    """h[p, n] = silu(gate_e[n] . x[token]) * (up_e[n] . x[token]) for pair p = program 0 (expert
    e = ids[p], token p // TOPK), rows n of program 1's block; float32 (P, I). An expert id outside
    [0, E) reads nothing and gives zeros. ALIGNED: Q6_K experts in the aligned layout (``mmvq_rows``). PDL: see
    ``pdl_enter``. GU (Q4_K gate and up, the lean step): a step's lines hold the BN gate rows and the BN up rows side
    by side, so one loop walks both matrices (instead of one loop over the gate rows, then one over the up rows).
    (Its first step's weights loaded before the grid-dependency wait, as ``moe_down_slots_q8_kernel``'s EARLY does,
    measured 1.1-1.2 us slower on an H200: bench/results/read-ceiling-NVIDIA_H200-early.json.)"""
    pdl_enter(PDL)
    t = tl.program_id(0)
    row0 = tl.program_id(1) * BN
    e = tl.load(ids_ptr + t)
    valid = (e >= 0) & (e < E)
    e = tl.where(valid, e, 0).to(tl.int64)
    tok = (t // TOPK).to(tl.int64)
    xq, xd, xs = xq_ptr + tok * D, xd_ptr + tok * ((2 if LOADS & 2 else 1) * (D // 32)), xs_ptr + tok * (D // 32)
    if GU:
        tl.static_assert(GATE_T == 12 and UP_T == 12 and LOADS & 8 != 0, "gate and up side by side: lean Q4_K")
        r = tl.arange(0, 2 * BN)
        isup = r >= BN
        n = tl.minimum(row0 + r % BN, I - 1).to(tl.int64)
        wrow = tl.where(isup, up_ptr + e * es_u + n * rb_u, gate_ptr + e * es_g + n * rb_g)
        a = _q4k_rows32p(xq.to(tl.pointer_type(tl.int32)), xd, wrow, 0, tl.where(valid, nb_g, 0), 1, D, 2 * BN, NBLK,
                         ASM)[0]
        g = tl.sum(tl.reshape(tl.where(isup, 0.0, a), [2, BN]), axis=0)
        u = tl.sum(tl.reshape(tl.where(isup, a, 0.0), [2, BN]), axis=0)
    else:
        g, u = _gate_up_rows(xq, xd, xs, gate_ptr + e * es_g, up_ptr + e * es_u, row0, I, rb_g, rb_u,
                             tl.where(valid, nb_g, 0), tl.where(valid, nb_u, 0), GATE_T, UP_T, BN, NBLK, ASM, PF,
                             LOADS, ALIGNED)
    rows = row0 + tl.arange(0, BN)
    tl.store(h_ptr + t.to(tl.int64) * I + rows, g / (1.0 + tl.exp(-g)) * u, mask=rows < I)


@triton.jit
def _gate_up_rows(xq, xd, xs, gate_ptr, up_ptr, row0, I, rb_g, rb_u, nb_g, nb_u, GATE_T: tl.constexpr,
                  UP_T: tl.constexpr, BN: tl.constexpr, NBLK: tl.constexpr, ASM: tl.constexpr, PF: tl.constexpr,
                  LOADS: tl.constexpr, ALIGNED: tl.constexpr):
    """An expert's gate rows, then its up rows, dotted with x: two (BN,) float32."""
    g = mmvq_rows(xq, xd, xs, gate_ptr, row0, I, rb_g, 0, nb_g, GATE_T, BN, NBLK, ASM, PF, LOADS, ALIGNED)
    u = mmvq_rows(xq, xd, xs, up_ptr, row0, I, rb_u, 0, nb_u, UP_T, BN, NBLK, ASM, PF, LOADS, ALIGNED)
    return g, u


@triton.jit
def moe_down_q8_kernel(hq_ptr, hd_ptr, hs_ptr, down_ptr, y_ptr, wts_ptr, ids_ptr, E, I, D, nb_d, rb_d, es_d, TOPK,
                       DOWN_T: tl.constexpr, BN: tl.constexpr, NBLK: tl.constexpr, ASM: tl.constexpr,
                       PF: tl.constexpr = False, LOADS: tl.constexpr = 0, ALIGNED: tl.constexpr = 0,
                       SUM: tl.constexpr = False, PDL: tl.constexpr = False):
    """y[p, n] = wts[p] * (down_e[n] . h[p]) with h quantized like x; float32 (P, D). SUM: program row 0 is a token
    t, and y[t, n] (T, D) is the sum of its TOPK pairs' rows, added in slot order in registers (the slots' sum
    without a launch of its own). ALIGNED: see ``mmvq_rows``. PDL: see ``pdl_enter``."""
    pdl_enter(PDL)
    row0 = tl.program_id(1) * BN
    rows = row0 + tl.arange(0, BN)
    lo = tl.program_id(0).to(tl.int64) * (TOPK if SUM else 1)
    acc = tl.zeros([BN], dtype=tl.float32)
    for p in range(lo, lo + (TOPK if SUM else 1)):
        e = tl.load(ids_ptr + p)
        valid = (e >= 0) & (e < E)
        e = tl.where(valid, e, 0).to(tl.int64)
        acc += tl.load(wts_ptr + p) * mmvq_rows(
            hq_ptr + p * I, hd_ptr + p * ((2 if LOADS & 2 else 1) * (I // 32)), hs_ptr + p * (I // 32),
            down_ptr + e * es_d, row0, D, rb_d, 0, tl.where(valid, nb_d, 0), DOWN_T, BN, NBLK, ASM, PF, LOADS, ALIGNED)
    tl.store(y_ptr + tl.program_id(0).to(tl.int64) * D + rows, acc, mask=rows < D)


@triton.jit
def moe_down_slots_q8_kernel(hq_ptr, hd_ptr, down_ptr, y_ptr, wts_ptr, ids_ptr, E, I, D, nb_d, rb_d, es_d, TOPK,
                             KP: tl.constexpr, BN: tl.constexpr, NBLK: tl.constexpr, ASM: tl.constexpr,
                             PDL: tl.constexpr = False, EARLY: tl.constexpr = False, PF: tl.constexpr = False,
                             WCM: tl.constexpr = 0, AEV: tl.constexpr = 0, G: tl.constexpr = 1,
                             PRELOAD: tl.constexpr = True, DOWN_T: tl.constexpr = 12, ALIGNED: tl.constexpr = 0):
    """y[t, n] = sum over slots k of wts[p] * (down_e[n] . h[p]), p = t * TOPK + k, e = ids[p]: a token's TOPK slots
    side by side in one program (KP >= TOPK, a power of two, slots past TOPK empty), each slot's BN rows one
    activation row of the lean Q4_K step (``_q4k_rows32p`` with XROW; (xd, xs) pairs at hd_ptr), added over the
    slots in a fixed order in registers: the slots' sum without a launch of its own, and without the sequential walk
    of ``moe_down_q8_kernel``'s SUM, whose programs run TOPK times as long. Program (t, block of BN rows); float32
    (T, D). An expert id outside [0, E) adds nothing (its lanes' sums are dropped, whatever they read). EARLY: ids and
    wts are read, and the first step's weights loaded, before the grid-dependency wait; only for ids and wts written
    two launches before this one or earlier (the launch just before, h's quantizer, waits for them), as
    ``moe._moe_pairs_q8`` launches it; PRELOAD false: EARLY reads ids and wts alone before the wait, every weight after
    it. PF: each step first loads the next step's weights (``_q4k_rows32p``'s PF). WCM, AEV: the weight loads' cache
    modifier and the activation loads' eviction policy (``_q4k_step_m``). G > 1: a program is G blocks of BN rows whose
    lines share a thread's activation words (``_q4k_rows32g``; with EARLY and PRELOAD, every group's first step is
    loaded before the wait); it takes no PF, WCM or AEV. DOWN_T = 14: Q6_K down experts in the aligned layout, ALIGNED
    words a lane (``_q6k_rows_ag``, h's xd unpacked: one per 32 values at hd_ptr), in 1 to 4 groups of BN rows; EARLY
    reads ids and wts alone before the wait (no PRELOAD), and there is no PF, WCM or AEV."""
    if not EARLY:
        pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    row0 = tl.program_id(1) * (BN * G)
    r = tl.arange(0, KP * BN)
    slot = r // BN
    p = t * TOPK + tl.minimum(slot, TOPK - 1)
    e = tl.load(ids_ptr + p)
    valid = (e >= 0) & (e < E) & (slot < TOPK)
    e = tl.where(valid, e, 0).to(tl.int64)
    n = tl.minimum(row0 + r % BN, D - 1)
    wrow = down_ptr + e * es_d + n.to(tl.int64) * rb_d
    xq = (hq_ptr + p * I).to(tl.pointer_type(tl.int32))
    wt = tl.load(wts_ptr + p)
    ge = down_ptr + e * es_d
    w1 = ge + tl.minimum(row0 + BN + r % BN, D - 1).to(tl.int64) * rb_d
    w2 = ge + tl.minimum(row0 + 2 * BN + r % BN, D - 1).to(tl.int64) * rb_d
    w3 = ge + tl.minimum(row0 + 3 * BN + r % BN, D - 1).to(tl.int64) * rb_d
    if DOWN_T == 14:
        tl.static_assert(ALIGNED > 0 and not PF and WCM == 0 and AEV == 0 and not (EARLY and PRELOAD),
                         "aligned Q6_K down experts: ALIGNED words a lane; no PF, WCM, AEV or PRELOAD")
        if EARLY:
            pdl_enter(PDL)
        a0, a1, a2, a3 = _q6k_rows_ag(xq, hd_ptr + p * (I // 32), wrow, w1, w2, w3, nb_d, 0, nb_d, G, KP * BN, NBLK,
                                      ALIGNED, ASM)
        _groups_store(y_ptr + t * D, a0, a1, a2, a3, valid, wt, row0, D, KP, BN, G)
    elif G > 1:
        tl.static_assert(DOWN_T == 12 and not PF and WCM == 0 and AEV == 0, "row groups: no PF, WCM or AEV")
        xd = hd_ptr + p * (I // 16)
        h0, n0, h1, n1, h2, n2, h3, n3 = 0, 0, 0, 0, 0, 0, 0, 0
        if EARLY and PRELOAD:
            h0, n0 = q4k_first_step(wrow, 0, nb_d, KP * BN, NBLK)
            h1, n1 = q4k_first_step(w1, 0, nb_d, KP * BN, NBLK)
            if G > 2:
                h2, n2 = q4k_first_step(w2, 0, nb_d, KP * BN, NBLK)
            if G > 3:
                h3, n3 = q4k_first_step(w3, 0, nb_d, KP * BN, NBLK)
        if EARLY:
            pdl_enter(PDL)
        a0, a1, a2, a3 = _q4k_rows32g(xq, xd, wrow, w1, w2, w3, 0, nb_d, G, KP * BN, NBLK, ASM, EARLY and PRELOAD,
                                      h0, n0, h1, n1, h2, n2, h3, n3)
        _groups_store(y_ptr + t * D, a0, a1, a2, a3, valid, wt, row0, D, KP, BN, G)
    else:
        tl.static_assert(DOWN_T == 12, "Q4_K or aligned Q6_K down experts")
        hv0, q0 = 0, 0
        if EARLY and PRELOAD:
            hv0, q0 = q4k_first_step(wrow, 0, nb_d, KP * BN, NBLK, WCM)
        if EARLY:
            pdl_enter(PDL)
        a = _q4k_rows32p(xq, hd_ptr + p * (I // 16), wrow, 0, nb_d, 1, I, KP * BN, NBLK, ASM, PF, 1, True,
                         EARLY and PRELOAD, hv0, q0, WCM, AEV)[0]
        _slots_store(y_ptr + t * D, a, valid, wt, row0, D, KP, BN)


@triton.jit
def _held_words(r, kb, h, wq, nb_d, live, MASK: tl.constexpr, W: tl.constexpr, DOWN_T: tl.constexpr):
    """A ``moe_down_held_q8_kernel`` lane's weight words of the row at r (uint8, its expert's row): aligned Q6_K
    (DOWN_T 14), ``_q6k_group_words``' five; Q4_K (12), the block header and the lane's 32-byte chunk (chunk 2 h + wq
    // W: two (lanes, 4) int32 tensors), then two fillers."""
    if DOWN_T == 14:
        A, B, H, S, d = _q6k_group_words(r, kb, h, wq, nb_d, live, MASK, W)
    else:
        w4 = tl.arange(0, 4)[None, :]
        blk = (r + kb * 144).to(tl.pointer_type(tl.int32))
        ph = tl.multiple_of(blk, 16)[:, None] + w4
        pq = tl.multiple_of(blk + 4 + 8 * (2 * h + wq // W), 16)[:, None] + w4
        lw = live[:, None] if MASK else None
        A = _ld(ph, lw, MASK)
        B, H, S, d = _ld(pq, lw, MASK), _ld(pq + 4, lw, MASK), A, 0.0
    return A, B, H, S, d


@triton.jit
def _held_acts(hq_ptr, hd_ptr, p, I, kb, h, wq, live, MASK: tl.constexpr, W: tl.constexpr, DOWN_T: tl.constexpr):
    """A lane's activation words, held for all its rows: aligned Q6_K, the four quarters' (lanes, W) words and the
    half's four xd bits (``_q6k_step_ag``'s); Q4_K, the words of its chunk's two groups of 32 (low nibbles: words
    0-3 and 4-7; high: the same of the next group) and their two (xd, xs) pairs (bits, (lanes, 4))."""
    lw = live[:, None] if MASK else None
    j4 = tl.arange(0, 4)[None, :]
    xq = (hq_ptr + p * I).to(tl.pointer_type(tl.int32))
    if DOWN_T == 14:
        px = tl.multiple_of(xq + kb * 64 + 32 * h + wq, 4 * W)[:, None] + tl.arange(0, W)[None, :]
        pd = tl.multiple_of(hd_ptr + p * (I // 32) + kb * 8 + 4 * h, 16)[:, None] + j4
        step = 8  # the quarters' words
    else:
        g = kb * 8 + 2 * (2 * h + wq // W)  # the chunk's low-nibble group
        px = tl.multiple_of(xq + g * 8, 16)[:, None] + j4
        pd = tl.multiple_of(hd_ptr + p * (I // 16) + 2 * g, 16)[:, None] + j4
        step = 4  # the two groups' halves
    return (_ld(px, lw, MASK), _ld(px + step, lw, MASK), _ld(px + 2 * step, lw, MASK), _ld(px + 3 * step, lw, MASK),
            _ld(pd, lw, MASK).to(tl.int32, bitcast=True))


@triton.jit
def _held_dot(A, B, H, S, d, x0, x1, x2, x3, xi, sh, h, wq, ASM: tl.constexpr, W: tl.constexpr,
              DOWN_T: tl.constexpr):
    """A lane's partial sum of one row from ``_held_words`` and ``_held_acts``: aligned Q6_K, ``_q6k_group_dot``;
    Q4_K, chunk c's two groups: d (sc_lo xd_lo s_lo + sc_hi xd_hi s_hi) - dmin (m_lo xs_lo + m_hi xs_hi)."""
    if DOWN_T == 14:
        part = _q6k_group_dot(A, B, H, S, d, x0, x1, x2, x3, xi, sh, ASM)
    else:
        part = _q4k_chunk_dot(A, B, H, x0, x1, x2, x3, xi, 2 * h + wq // W, ASM)
    return part


@triton.jit
def _word(v, i: tl.constexpr):
    """Word i of each lane's (lanes, 4) int32 words (a sum of one nonzero term: a pick of a register)."""
    return tl.sum(tl.where(tl.arange(0, 4)[None, :] == i, v, 0), axis=1)


@triton.jit
def _q4k_chunk_dot(A, B, H, x0, x1, x2, x3, xi, c, ASM: tl.constexpr):
    """``_held_dot`` of Q4_K: header words A, chunk c's nibble words B (bytes 0-15) and H (16-31), (lanes, 4) each;
    activation words x0, x1 (group 2c) and x2, x3 (2c + 1); xi: their (xd, xs) pairs' bits."""
    s_lo = tl.sum(_dp4a_add(B & _M4, x0, _dp4a(H & _M4, x1, False, ASM), ASM), axis=1)  # B, H: chunk bytes 0-15,
    s_hi = tl.sum(_dp4a_add((B >> 4) & _M4, x2, _dp4a((H >> 4) & _M4, x3, False, ASM), ASM), axis=1)  # 16-31
    w0, w1, w2, w3 = _word(A, 0), _word(A, 1), _word(A, 2), _word(A, 3)
    glo = 2 * c
    sc_lo, m_lo = _q4k_scale(w1, w2, w3, 8 * (glo % 4), glo < 4)
    sc_hi, m_hi = _q4k_scale(w1, w2, w3, 8 * ((glo + 1) % 4), glo + 1 < 4)
    dxl, sxl = _word(xi, 0).to(tl.float32, bitcast=True), _word(xi, 1).to(tl.float32, bitcast=True)
    dxh, sxh = _word(xi, 2).to(tl.float32, bitcast=True), _word(xi, 3).to(tl.float32, bitcast=True)
    return _f16(w0) * (dxl * (sc_lo * s_lo).to(tl.float32) + dxh * (sc_hi * s_hi).to(tl.float32)) \
        - _f16(w0 >> 16) * (m_lo.to(tl.float32) * sxl + m_hi.to(tl.float32) * sxh)


@triton.jit
def moe_down_held_q8_kernel(hq_ptr, hd_ptr, down_ptr, y_ptr, wts_ptr, ids_ptr, E, I, D, nb_d, rb_d, es_d, TOPK, NPROG,
                            KP: tl.constexpr, NB: tl.constexpr, W: tl.constexpr, G: tl.constexpr, ASM: tl.constexpr,
                            PDL: tl.constexpr = False, EARLY: tl.constexpr = False, FULL: tl.constexpr = True,
                            PF: tl.constexpr = False, DOWN_T: tl.constexpr = 14):
    """``moe_down_slots_q8_kernel``'s sums with each lane's activation words held in registers for all its rows: a
    program is a token's KP slots x one row (NB blocks, NB >= nb_d a power of two, 16 / W lanes a block: NL = NB * 16
    / W lanes a slot), reads its slots' activations once, then walks its share of the rows (program j of NPROG: units
    j * U // NPROG .. (j + 1) * U // NPROG - 1 of G rows, U = D / G rounded up; at most NL rows), G (1 to 4; 1 or 2
    with PF) rows a step. Aligned Q6_K down experts (DOWN_T 14): each lane with ``_q6k_rows_ag``'s words and math
    (h's xd unpacked); Q4_K (12, W = 4): a lane is a 32-byte chunk of nibbles (two groups of 32) and reads its
    block's header ((xd, xs) pairs at hd_ptr). A step's rows are summed over each slot's lanes (within a warp where
    NL = 32) and kept at lane (row - first row) of their slot; after the walk the slots are weighted and added in a
    fixed order, once. So the activations are loaded once a program, not once every G rows as in the slots' launch.
    Grid (T, NPROG); float32 (T, D). FULL: nb_d == NB. EARLY: ids and wts read before the grid-dependency wait
    (with PF, the first step's weights too). PF: each step loads the next step's weights (none past the program's
    rows) before its sums; without it a step past the program's rows reads rows clamped to D - 1, whose sums land
    past its kept lanes."""
    if not EARLY:
        pdl_enter(PDL)
    tl.static_assert(G >= 1 and G <= 4 and (G <= 2 or not PF), "1 to 4 rows a step; 1 or 2 with PF")
    tl.static_assert(DOWN_T == 14 or (DOWN_T == 12 and W == 4), "aligned Q6_K, or Q4_K with W = 4")
    LPB: tl.constexpr = 16 // W
    NL: tl.constexpr = NB * LPB
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    u = tl.arange(0, KP * NL)
    slot = u // NL
    lane = u % NL
    kb = lane // LPB  # the lane's block, half and first word (Q4_K: chunk 2 h + wq // W)
    h = (lane % LPB) // (LPB // 2)
    wq = (lane % (LPB // 2)) * W
    sh = 8 * (wq // 4)
    p = t * TOPK + tl.minimum(slot, TOPK - 1)
    e = tl.load(ids_ptr + p)
    valid = (e >= 0) & (e < E) & (slot < TOPK)
    e = tl.where(valid, e, 0).to(tl.int64)
    wt = tl.load(wts_ptr + p)
    base = down_ptr + e * es_d
    units = (D + G - 1) // G  # rows are shared out G at a time
    r0 = (G * (j * units // NPROG)).to(tl.int32)
    r1 = tl.minimum(G * ((j + 1) * units // NPROG), D).to(tl.int32)
    live = kb < nb_d
    if PF:
        nA0, nB0, nH0, nS0, nd0 = _held_words(tl.multiple_of(base + r0 * rb_d, 4 * W), kb, h, wq, nb_d,
                                              live & (kb * 0 + r0 < r1), True, W, DOWN_T)
        nA1, nB1, nH1, nS1, nd1 = nA0, nB0, nH0, nS0, nd0
        if G > 1:
            nA1, nB1, nH1, nS1, nd1 = _held_words(tl.multiple_of(base + (r0 + 1) * rb_d, 4 * W), kb, h, wq, nb_d,
                                                  live & (kb * 0 + r0 + 1 < r1), True, W, DOWN_T)
    if EARLY:
        pdl_enter(PDL)
    x0, x1, x2, x3, xi = _held_acts(hq_ptr, hd_ptr, p, I, kb, h, wq, live, not FULL, W, DOWN_T)
    col = tl.reshape(lane, [KP, NL])
    acc = tl.zeros([KP, NL], dtype=tl.float32)
    for r in range(r0, r1, G):  # a step's G rows loaded, then summed
        if PF:
            A0, B0, H0, S0, d0 = nA0, nB0, nH0, nS0, nd0
            A1, B1, H1, S1, d1 = nA1, nB1, nH1, nS1, nd1
            rn = r + G
            nA0, nB0, nH0, nS0, nd0 = _held_words(tl.multiple_of(base + rn * rb_d, 4 * W), kb, h, wq, nb_d,
                                                  live & (kb * 0 + rn < r1), True, W, DOWN_T)
            nA1, nB1, nH1, nS1, nd1 = nA0, nB0, nH0, nS0, nd0
            if G > 1:
                nA1, nB1, nH1, nS1, nd1 = _held_words(tl.multiple_of(base + (rn + 1) * rb_d, 4 * W), kb, h, wq,
                                                      nb_d, live & (kb * 0 + rn + 1 < r1), True, W, DOWN_T)
        else:
            ra = tl.multiple_of(base + r * rb_d, 4 * W)  # within one expert's bytes: int32
            A0, B0, H0, S0, d0 = _held_words(ra, kb, h, wq, nb_d, live, not FULL, W, DOWN_T)
            A1, B1, H1, S1, d1 = A0, B0, H0, S0, d0
            if G > 1:
                rb = tl.multiple_of(base + tl.minimum(r + 1, D - 1) * rb_d, 4 * W)
                A1, B1, H1, S1, d1 = _held_words(rb, kb, h, wq, nb_d, live, not FULL, W, DOWN_T)
            if G > 2:
                rc = tl.multiple_of(base + tl.minimum(r + 2, D - 1) * rb_d, 4 * W)
                A2, B2, H2, S2, d2 = _held_words(rc, kb, h, wq, nb_d, live, not FULL, W, DOWN_T)
            if G > 3:
                rd = tl.multiple_of(base + tl.minimum(r + 3, D - 1) * rb_d, 4 * W)
                A3, B3, H3, S3, d3 = _held_words(rd, kb, h, wq, nb_d, live, not FULL, W, DOWN_T)
        v = _held_dot(A0, B0, H0, S0, d0, x0, x1, x2, x3, xi, sh, h, wq, ASM, W, DOWN_T)
        acc = tl.where(col == r - r0, tl.sum(tl.reshape(v, [KP, NL]), axis=1)[:, None], acc)
        if G > 1:
            v = _held_dot(A1, B1, H1, S1, d1, x0, x1, x2, x3, xi, sh, h, wq, ASM, W, DOWN_T)
            acc = tl.where(col == r + 1 - r0, tl.sum(tl.reshape(v, [KP, NL]), axis=1)[:, None], acc)
        if G > 2:
            v = _held_dot(A2, B2, H2, S2, d2, x0, x1, x2, x3, xi, sh, h, wq, ASM, W, DOWN_T)
            acc = tl.where(col == r + 2 - r0, tl.sum(tl.reshape(v, [KP, NL]), axis=1)[:, None], acc)
        if G > 3:
            v = _held_dot(A3, B3, H3, S3, d3, x0, x1, x2, x3, xi, sh, h, wq, ASM, W, DOWN_T)
            acc = tl.where(col == r + 3 - r0, tl.sum(tl.reshape(v, [KP, NL]), axis=1)[:, None], acc)
    ok = tl.reshape(valid, [KP, NL])
    y = tl.sum(tl.where(ok, acc * tl.reshape(wt, [KP, NL]), 0.0), axis=0)
    rows = r0 + tl.arange(0, NL)
    tl.store(y_ptr + t * D + rows, y, mask=rows < r1)


@triton.jit
def _slots_store(y_row, a, valid, wt, row0, D, KP: tl.constexpr, BN: tl.constexpr):
    """The slots' (KP * BN,) sums ``a`` of rows row0.. row0 + BN - 1, weighted (``wt``), added over the slots in a
    fixed order (an invalid slot adds nothing) and stored at y_row."""
    a = tl.where(valid, a * wt, 0.0)
    y = tl.sum(tl.reshape(a, [KP, BN]), axis=0)
    rows = row0 + tl.arange(0, BN)
    tl.store(y_row + rows, y, mask=rows < D)


@triton.jit
def _groups_store(y_row, a0, a1, a2, a3, valid, wt, row0, D, KP: tl.constexpr, BN: tl.constexpr, G: tl.constexpr):
    """``_slots_store`` of G groups' sums a0..a3, group g's rows row0 + g * BN ..."""
    _slots_store(y_row, a0, valid, wt, row0, D, KP, BN)
    if G > 1:
        _slots_store(y_row, a1, valid, wt, row0 + BN, D, KP, BN)
    if G > 2:
        _slots_store(y_row, a2, valid, wt, row0 + 2 * BN, D, KP, BN)
    if G > 3:
        _slots_store(y_row, a3, valid, wt, row0 + 3 * BN, D, KP, BN)
