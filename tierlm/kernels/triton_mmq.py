"""Decode products of a few activation rows (up to 16) on tensor cores, straight from GGUF bytes.

One program owns BN weight rows and one K range (split-K: the programs of one output add their
partial sums afterwards). Each loop step decodes NB GGUF blocks of its BN rows in registers to the
activations' dtype (fp16 or bf16) and multiplies them with all of the (up to BM = 16) activation
rows in ``tl.dot``, so a weight byte is read and decoded once whatever the number of rows. The
activations stay in their float dtype (no int8 groups as in ``triton_mmvq``): at 16 rows the
tensor cores make the multiply free, and the weight decode is what costs.

Each type is decoded in the order its bytes sit in, as several tiles per step that each take one
``tl.dot``: a Q4_K block is two (BN, 128) tiles, the low and the high nibbles of its 128 bytes
(sub-blocks 0, 2, 4, 6 and 1, 3, 5, 7); a Q6_K block is four (BN, 64) tiles, one per 2-bit plane
of its high bytes; Q8_0 and Q5_0 are (BN, 32 NB) tiles in natural order. The activations are
loaded in each tile's order, contiguous runs of 32 or 16 elements. Nibbles and 6-bit values turn
into floats as ``(q << s) & m | 1.0f`` = 1 + q/2**b, so a weight is one FMA ``A * f - B``.

Where the card has no tensor cores for Triton (Turing), ``tl.dot`` becomes FMAs; the wrappers then
keep the int8-activation kernels (``quant_matmul.pick_config``).

Glossary: M = activation rows (BM = 16 per program), N = weight rows (BN per program), K = inputs,
NB = GGUF blocks per loop step, S = weights of one row in one step's tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tierlm.kernels.triton_q import _f, _f16_at, _q4k_scale_min, _to_dot, row_stride

Q4_K, Q6_K, Q8_0, Q5_0 = 12, 14, 8, 6
BLOCK_ELEMS = {Q4_K: 256, Q6_K: 256, Q8_0: 32, Q5_0: 32}


@triton.jit
def _nib(wq, k: tl.constexpr, a, c, HIGH: tl.constexpr, DOT_KIND: tl.constexpr):
    """The low (or high) nibble of byte k of each word, as a * (1 + q/16) - c in the dot's dtype."""
    s: tl.constexpr = 19 - 8 * k - 4 * HIGH  # moves the nibble to float bits 19..22
    if s >= 0:
        f = (wq << s) & 0x00780000
    else:
        f = (wq >> -s) & 0x00780000
    return _to_dot(a * _f(f | 0x3F800000) - c, DOT_KIND)


@triton.jit
def _nibbles(wq, a, c, HIGH: tl.constexpr, DOT_KIND: tl.constexpr):
    """(..., 8) words -> (..., 32) weights in byte order: the four bytes of a word side by side."""
    # join's new axis is the last: [w, i, j] of join(join(b0, b2), join(b1, b3)) is byte 2i + j
    return tl.join(tl.join(_nib(wq, 0, a, c, HIGH, DOT_KIND), _nib(wq, 2, a, c, HIGH, DOT_KIND)),
                   tl.join(_nib(wq, 1, a, c, HIGH, DOT_KIND), _nib(wq, 3, a, c, HIGH, DOT_KIND)))  # (..., 8, 2, 2)


# Four bytes -> their four low and four high nibbles as fp16 a * q + c, two at a time: prmt puts two bytes
# under the exponent 0x64 (fp16 1024 + byte), a mask keeps one nibble (1024 + q, or 1024 + 16 q), sub 1024
# is exact, then one fma.f16x2 per pair. The high nibbles' a is divided by 16 by the caller.
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


@triton.jit
def _q4k_step_half2(acc, xrow, mmask, wrow, nmask, kb, kend, NB: tl.constexpr):
    """``_q4k_step`` for fp16 activations with the decode in packed fp16 (``_Q4K_HALF2``)."""
    b = kb + tl.arange(0, NB)[None, :, None, None]  # (1, NB, 1, 1)
    c = tl.arange(0, 4)[None, None, :, None]
    j = tl.arange(0, 32)[None, None, None, :]
    bmask = b < kend
    wmask = nmask[:, None, None, None] & bmask
    blk = wrow[:, None, None, None] + b * 144
    sl, ml = _q4k_scale_min(blk, 2 * c, wmask)  # (BN, NB, 4, 1)
    sh, mh = _q4k_scale_min(blk, 2 * c + 1, wmask)
    q = tl.load(blk + 16 + c * 32 + j, mask=wmask, other=0)  # (BN, NB, 4, 32) uint8
    wl, wh = tl.inline_asm_elementwise(
        _Q4K_HALF2, "=r,=r,=r,=r" + ",r" * 9, [q, sl.to(tl.float16), (-ml).to(tl.float16),
                                              (sh * 0.0625).to(tl.float16), (-mh).to(tl.float16)],
        dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    S: tl.constexpr = NB * 128
    xp = xrow[:, None, None, None] + b * 256 + c * 64 + j
    xmask = mmask[:, None, None, None] & bmask
    xl = tl.reshape(tl.load(xp, mask=xmask, other=0.0), [xrow.shape[0], S])
    xh = tl.reshape(tl.load(xp + 32, mask=xmask, other=0.0), [xrow.shape[0], S])
    acc = tl.dot(xl.to(tl.float16), tl.trans(tl.reshape(wl, [wl.shape[0], S])), acc)
    return tl.dot(xh.to(tl.float16), tl.trans(tl.reshape(wh, [wh.shape[0], S])), acc)


@triton.jit
def _q4k_step(acc, xrow, mmask, wrow, nmask, kb, kend, NB: tl.constexpr, DOT_KIND: tl.constexpr):
    """Blocks kb .. kb+NB-1: the nibble bytes as (BN, NB, 4, 8) words, two dots of K = 128 NB."""
    b = kb + tl.arange(0, NB)[None, :, None, None]  # (1, NB, 1, 1)
    c = tl.arange(0, 4)[None, None, :, None]  # 32-byte chunk: sub-block 2c low nibbles, 2c+1 high
    bmask = b < kend
    wmask = nmask[:, None, None, None] & bmask  # (BN, NB, 1, 1); masked: zero scales, zero weights
    blk = wrow[:, None, None, None] + b * 144
    sl, ml = _q4k_scale_min(blk, 2 * c, wmask)  # (BN, NB, 4, 1)
    sh, mh = _q4k_scale_min(blk, 2 * c + 1, wmask)
    wp = (blk + 16 + c * 32).to(tl.pointer_type(tl.int32))
    wq = tl.load(wp + tl.arange(0, 8)[None, None, None, :], mask=wmask, other=0)  # (BN, NB, 4, 8)
    S: tl.constexpr = NB * 128
    wl = tl.reshape(_nibbles(wq, 16.0 * sl, 16.0 * sl + ml, 0, DOT_KIND), [wq.shape[0], S])
    wh = tl.reshape(_nibbles(wq, 16.0 * sh, 16.0 * sh + mh, 1, DOT_KIND), [wq.shape[0], S])
    j = tl.arange(0, 32)[None, None, None, :]
    xp = xrow[:, None, None, None] + b * 256 + c * 64 + j  # (BM, NB, 4, 32): sub-block 2c's elements
    xmask = mmask[:, None, None, None] & bmask
    xl = tl.reshape(tl.load(xp, mask=xmask, other=0.0), [xrow.shape[0], S])
    xh = tl.reshape(tl.load(xp + 32, mask=xmask, other=0.0), [xrow.shape[0], S])
    acc = tl.dot(_to_dot(xl, DOT_KIND), tl.trans(wl), acc)  # (BM, S) x (S, BN)
    return tl.dot(_to_dot(xh, DOT_KIND), tl.trans(wh), acc)


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
def _q6k_step(acc, xrow, mmask, wrow, nmask, kb, kend, NB: tl.constexpr, DOT_KIND: tl.constexpr):
    """Blocks kb .. kb+NB-1: low-nibble bytes (two loads), high bytes (one), then four dots of K = 64 NB."""
    b = kb + tl.arange(0, NB)[None, :, None, None, None]  # (1, NB, 1, 1, 1)
    h = tl.arange(0, 2)[None, None, :, None, None]  # 128-element half
    g = tl.arange(0, 2)[None, None, None, :, None]  # 16-element group: its own scale
    l = g * 16 + tl.arange(0, 16)[None, None, None, None, :]  # (1, 1, 1, 2, 16): 0..31
    bmask = b < kend
    wmask = nmask[:, None, None, None, None] & bmask
    blk = wrow[:, None, None, None, None] + b * 210
    qa = tl.load(blk + h * 64 + l, mask=wmask, other=0).to(tl.int32)  # low nibbles: planes 0 and 2
    qb = tl.load(blk + h * 64 + 32 + l, mask=wmask, other=0).to(tl.int32)  # planes 1 and 3
    qh = tl.load(blk + 128 + h * 32 + l, mask=wmask, other=0).to(tl.int32)  # 2 high bits of each plane
    d = 64.0 * _f16_at(blk + 208, wmask)  # (BN, NB, 1, 1, 1)
    sp = (blk + 192 + h * 8 + g).to(tl.pointer_type(tl.int8))  # (BN, NB, 2, 2, 1): plane R adds 2R
    xp = xrow[:, None, None, None, None] + b * 256 + h * 128 + l  # (BM, NB, 2, 2, 16): plane R adds 32R
    xmask = mmask[:, None, None, None, None] & bmask
    S: tl.constexpr = NB * 64
    acc = _q6k_plane(acc, xp, xmask, qa, qh, sp, d, wmask, 0, S, DOT_KIND)
    acc = _q6k_plane(acc, xp, xmask, qb, qh, sp, d, wmask, 1, S, DOT_KIND)
    acc = _q6k_plane(acc, xp, xmask, qa, qh, sp, d, wmask, 2, S, DOT_KIND)
    return _q6k_plane(acc, xp, xmask, qb, qh, sp, d, wmask, 3, S, DOT_KIND)


@triton.jit
def _q6k_fetch(wrow, nmask, kb, kend, NB: tl.constexpr):
    """The bytes of blocks kb .. kb+NB-1 that a Q6_K step decodes: low-nibble bytes (planes 0/2 and 1/3), high
    bytes, the four planes' int8 scales and d (zeros for blocks at or past kend)."""
    b = kb + tl.arange(0, NB)[None, :, None, None, None]  # (1, NB, 1, 1, 1)
    h = tl.arange(0, 2)[None, None, :, None, None]  # 128-element half
    g = tl.arange(0, 2)[None, None, None, :, None]  # 16-element group: its own scale
    l = g * 16 + tl.arange(0, 16)[None, None, None, None, :]  # (1, 1, 1, 2, 16): 0..31
    wmask = nmask[:, None, None, None, None] & (b < kend)
    blk = wrow[:, None, None, None, None] + b * 210
    qa = tl.load(blk + h * 64 + l, mask=wmask, other=0)  # (BN, NB, 2, 2, 16)
    qb = tl.load(blk + h * 64 + 32 + l, mask=wmask, other=0)
    qh = tl.load(blk + 128 + h * 32 + l, mask=wmask, other=0)
    sp = (blk + 192 + h * 8 + g).to(tl.pointer_type(tl.int8))  # (BN, NB, 2, 2, 1): plane R adds 2R
    s0 = tl.load(sp, mask=wmask, other=0)
    s1 = tl.load(sp + 2, mask=wmask, other=0)
    s2 = tl.load(sp + 4, mask=wmask, other=0)
    s3 = tl.load(sp + 6, mask=wmask, other=0)
    return qa, qb, qh, s0, s1, s2, s3, 64.0 * _f16_at(blk + 208, wmask)


@triton.jit
def _q6k_plane_of(acc, xp, xmask, qv, qh, sc, d, R: tl.constexpr, S: tl.constexpr, DOT_KIND: tl.constexpr):
    """``_q6k_plane`` on fetched bytes."""
    a = d * sc.to(tl.float32)  # (BN, NB, 2, 2, 1)
    q = ((qv.to(tl.int32) >> (4 * (R // 2))) & 15) | (((qh.to(tl.int32) >> (2 * R)) & 3) << 4)
    w = a * _f((q << 17) | 0x3F800000) - 1.5 * a  # (BN, NB, 2, 2, 16)
    x = tl.load(xp + 32 * R, mask=xmask, other=0.0)  # (BM, NB, 2, 2, 16)
    return tl.dot(_to_dot(tl.reshape(x, [x.shape[0], S]), DOT_KIND),
                  tl.trans(_to_dot(tl.reshape(w, [w.shape[0], S]), DOT_KIND)), acc)


@triton.jit
def _q6k_math(acc, xrow, mmask, kb, kend, qa, qb, qh, s0, s1, s2, s3, d, NB: tl.constexpr, DOT_KIND: tl.constexpr):
    """Four dots of K = 64 NB on a fetched Q6_K step."""
    b = kb + tl.arange(0, NB)[None, :, None, None, None]
    h = tl.arange(0, 2)[None, None, :, None, None]
    l = tl.arange(0, 2)[None, None, None, :, None] * 16 + tl.arange(0, 16)[None, None, None, None, :]
    xp = xrow[:, None, None, None, None] + b * 256 + h * 128 + l  # (BM, NB, 2, 2, 16): plane R adds 32R
    xmask = mmask[:, None, None, None, None] & (b < kend)
    S: tl.constexpr = NB * 64
    acc = _q6k_plane_of(acc, xp, xmask, qa, qh, s0, d, 0, S, DOT_KIND)
    acc = _q6k_plane_of(acc, xp, xmask, qb, qh, s1, d, 1, S, DOT_KIND)
    acc = _q6k_plane_of(acc, xp, xmask, qa, qh, s2, d, 2, S, DOT_KIND)
    return _q6k_plane_of(acc, xp, xmask, qb, qh, s3, d, 3, S, DOT_KIND)


@triton.jit
def _q32_step(acc, xrow, mmask, wrow, nmask, kb, kend, QTYPE: tl.constexpr, NB: tl.constexpr,
              DOT_KIND: tl.constexpr):
    """Q8_0 (d, 32 int8) or Q5_0 (d, 32 fifth bits, 16 nibble bytes): NB blocks of 32, one dot."""
    b = kb + tl.arange(0, NB)[None, :, None]  # (1, NB, 1)
    l = tl.arange(0, 32)[None, None, :]
    bmask = b < kend
    wmask = nmask[:, None, None] & bmask
    if QTYPE == 8:
        blk = wrow[:, None, None] + b * 34
        q = tl.load((blk + 2 + l).to(tl.pointer_type(tl.int8)), mask=wmask, other=0).to(tl.int32)
        d = 256.0 * _f16_at(blk, wmask)
        w = d * _f(((q + 128) << 15) | 0x3F800000) - 1.5 * d  # 256 d (1 + (q + 128)/256) - 384 d = d q
    else:
        blk = wrow[:, None, None] + b * 22
        hb = tl.load(blk + 2 + l // 8, mask=wmask, other=0).to(tl.int32)
        qs = tl.load(blk + 6 + l % 16, mask=wmask, other=0).to(tl.int32)
        q = ((qs >> ((l // 16) * 4)) & 15) | (((hb >> (l % 8)) & 1) << 4)
        d = 32.0 * _f16_at(blk, wmask)
        w = d * _f((q << 18) | 0x3F800000) - 1.5 * d  # 32 d (1 + q/32) - 48 d = d (q - 16)
    x = tl.load(xrow[:, None, None] + b * 32 + l, mask=mmask[:, None, None] & bmask, other=0.0)  # (BM, NB, 32)
    S: tl.constexpr = NB * 32
    return tl.dot(_to_dot(tl.reshape(x, [x.shape[0], S]), DOT_KIND),
                  tl.trans(_to_dot(tl.reshape(w, [w.shape[0], S]), DOT_KIND)), acc)


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
def _q4k_step_2d(acc, xrow, mmask, wrow, nmask, kb, kend, DOT_KIND: tl.constexpr, ASM: tl.constexpr):
    """Block kb as eight (32, BN) tiles, one per sub-block, each with its own dot of K = 32; every tensor is 2-D
    with the weight rows last, so the decode can happen in the dot operand's own layout. The header is read
    as four words (loads of 4 bytes or more can be pipelined with cp.async)."""
    j = tl.arange(0, 32)
    blk = wrow[None, :] + kb * 144  # (1, BN)
    wmask = nmask[None, :]  # one block per step: kb < kend
    xmask = mmask[:, None]
    hp = blk.to(tl.pointer_type(tl.int32))
    w0 = tl.load(hp, mask=wmask, other=0)  # (1, BN): masked rows get zero scales, so zero weights
    w1 = tl.load(hp + 1, mask=wmask, other=0)
    w2 = tl.load(hp + 2, mask=wmask, other=0)
    w3 = tl.load(hp + 3, mask=wmask, other=0)
    for c in tl.static_range(4):
        sl, ml = _q4k_scales(w0, w1, w2, w3, 2 * c)  # (1, BN)
        sh, mh = _q4k_scales(w0, w1, w2, w3, 2 * c + 1)
        q = tl.load(blk + 16 + c * 32 + j[:, None], mask=wmask, other=0)  # (32, BN) uint8
        if ASM and DOT_KIND == 1:
            wl, wh = tl.inline_asm_elementwise(
                _Q4K_HALF2, "=r,=r,=r,=r" + ",r" * 9,
                [q, sl.to(tl.float16), (-ml).to(tl.float16), (sh * 0.0625).to(tl.float16), (-mh).to(tl.float16)],
                dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
        else:
            qi = q.to(tl.int32)
            wl = _to_dot((16.0 * sl) * _f(((qi << 19) & 0x00780000) | 0x3F800000) - (16.0 * sl + ml), DOT_KIND)
            wh = _to_dot((16.0 * sh) * _f(((qi << 15) & 0x00780000) | 0x3F800000) - (16.0 * sh + mh), DOT_KIND)
        xp = xrow[:, None] + kb * 256 + c * 64 + j[None, :]  # (BM, 32)
        acc = tl.dot(_to_dot(tl.load(xp, mask=xmask, other=0.0), DOT_KIND), wl, acc)
        acc = tl.dot(_to_dot(tl.load(xp + 32, mask=xmask, other=0.0), DOT_KIND), wh, acc)
    return acc


@triton.jit
def _q6k_step_2d(acc, xrow, mmask, wrow, nmask, kb, kend, DOT_KIND: tl.constexpr):
    """Block kb as sixteen (16, BN) tiles, one per scale, each with its own dot of K = 16."""
    i = tl.arange(0, 16)
    blk = wrow[None, :] + kb * 210  # (1, BN)
    wmask = nmask[None, :]  # one block per step: kb < kend
    xmask = mmask[:, None]
    d = _f16_at(blk + 208, wmask)
    for h in tl.static_range(2):
        for g in tl.static_range(2):
            l = g * 16 + i[:, None]  # (16, 1)
            qa = tl.load(blk + h * 64 + l, mask=wmask, other=0).to(tl.int32)  # (16, BN)
            qb = tl.load(blk + h * 64 + 32 + l, mask=wmask, other=0).to(tl.int32)
            qh = tl.load(blk + 128 + h * 32 + l, mask=wmask, other=0).to(tl.int32)
            for r in tl.static_range(4):
                qv = qa if r % 2 == 0 else qb
                q = ((qv >> (4 * (r // 2))) & 15) | (((qh >> (2 * r)) & 3) << 4)
                sc = tl.load((blk + 192 + h * 8 + 2 * r + g).to(tl.pointer_type(tl.int8)), mask=wmask, other=0)
                w = _to_dot((q - 32).to(tl.float32) * (d * sc.to(tl.float32)), DOT_KIND)
                xp = xrow[:, None] + kb * 256 + h * 128 + 32 * r + g * 16 + i[None, :]  # (BM, 16)
                acc = tl.dot(_to_dot(tl.load(xp, mask=xmask, other=0.0), DOT_KIND), w, acc)
    return acc


@triton.jit
def mmq_kernel(x_ptr, w_ptr, out_ptr, M, N, nblocks, row_bytes, stride_xm, stride_om, stride_os, blocks_per_split,
               QTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr, DOT_KIND: tl.constexpr,
               ASM: tl.constexpr = False, FORM: tl.constexpr = 0):
    """out[pid_k, m, n] = sum over split pid_k's GGUF blocks of x[m, :] . dequant(w[n, :]).

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
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if QTYPE == 14 and FORM == 2:  # the next step's bytes are loaded before this step's math
        qa, qb, qh, s0, s1, s2, s3, d = _q6k_fetch(wrow, nmask, kb0, kend, NB)
        for kb in range(kb0, kend, NB):
            na, nb_, nh, n0, n1, n2, n3, nd = _q6k_fetch(wrow, nmask, kb + NB, kend, NB)
            acc = _q6k_math(acc, xrow, mmask, kb, kend, qa, qb, qh, s0, s1, s2, s3, d, NB, DOT_KIND)
            qa, qb, qh, s0, s1, s2, s3, d = na, nb_, nh, n0, n1, n2, n3, nd
    for kb in range(kb0, kend if QTYPE != 14 or FORM != 2 else kb0, NB):
        if QTYPE == 12 and FORM == 1:
            acc = _q4k_step_2d(acc, xrow, mmask, wrow, nmask, kb, kend, DOT_KIND, ASM)
        elif QTYPE == 14 and FORM == 1:
            acc = _q6k_step_2d(acc, xrow, mmask, wrow, nmask, kb, kend, DOT_KIND)
        elif QTYPE == 12 and ASM and DOT_KIND == 1:
            acc = _q4k_step_half2(acc, xrow, mmask, wrow, nmask, kb, kend, NB)
        elif QTYPE == 12:
            acc = _q4k_step(acc, xrow, mmask, wrow, nmask, kb, kend, NB, DOT_KIND)
        elif QTYPE == 14:
            acc = _q6k_step(acc, xrow, mmask, wrow, nmask, kb, kend, NB, DOT_KIND)
        else:
            acc = _q32_step(acc, xrow, mmask, wrow, nmask, kb, kend, QTYPE, NB, DOT_KIND)
    optr = out_ptr + pid_k.to(tl.int64) * stride_os + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
