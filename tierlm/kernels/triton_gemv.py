"""Matrix-vector kernels over raw GGUF rows: one thread per weight row, the K loop split across warps.

Decode reads every weight byte once and does little else, so the work per byte decides the speed.
Here each thread owns one row and walks its bytes with wide loads; the W warps of a program take
interleaved "units" (a fixed run of bytes of one block) of the same rows, and the partial sums
meet once at the end. The activation row is the same for every thread, so its loads are broadcasts.

Nibbles become floats with one shift and one logic op: ``(q << s) & mask | 0x3F800000`` is the
float ``1 + q / 2**b`` exactly, so ``w = A * f - B`` with A, B folded from the block's scales is a
single FMA (no int-to-float conversion, which runs at a quarter rate). ``ASM`` selects hand-written
PTX that does this on four packed bytes at a time; without it the same math runs as Triton ops
(the Triton interpreter cannot run PTX).

Glossary: W = warps = parallel unit streams, R = rows per thread (32R rows per program), V = bytes
per thread per load, u = unit index along a row. Units: Q4_K: a 32-byte chunk of the nibbles (64
weights); Q6_K: 16 lanes of one 128-element half (64 weights); Q8_0, Q5_0, F16, BF16, F32: 32 weights.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tierlm.kernels.triton_q import row_stride

UNITS_PER_BLOCK = {12: 4, 14: 4, 8: 1, 6: 1, 1: 1, 30: 1, 0: 1}  # type id -> units in one GGUF block
UNIT_BLOCK = {12: 256, 14: 256, 8: 32, 6: 32, 1: 32, 30: 32, 0: 32}  # elements of the block a unit is cut from


def units_per_row(qtype: int, k: int, q4k_block: bool = False) -> int:
    """Units in a row of k elements (Q4K_BLOCK makes a whole Q4_K block one unit)."""
    per_block = 1 if (q4k_block and qtype == 12) else UNITS_PER_BLOCK[qtype]
    return k // UNIT_BLOCK[qtype] * per_block



def _shift(dst: str, src: str, left: int) -> str:
    return f"shl.b32 {dst}, {src}, {left};" if left >= 0 else f"shr.u32 {dst}, {src}, {-left};"


def _asm_bytes_to_floats(srcs: list[str], top: int, width: int, nbytes: int, xor: int = 0) -> str:
    """PTX placing the ``width``-bit field at bit 0 of each of the first ``nbytes`` bytes of every
    source word into float mantissa bits top-width+1..top over 1.0f (xor: bits flipped there too),
    one output register per byte, in order."""
    lines, o = [], 0
    mask = ((1 << width) - 1) << (top - width + 1)
    for src in srcs:
        for k in range(nbytes):
            t = f"t{o}"
            lines.append(_shift(t, src, top - width + 1 - 8 * k))
            if xor:  # (t & mask) ^ (1.0f | xor): LUT of (a & b) ^ c
                lines.append(f"lop3.b32 ${o}, {t}, 0x{mask:08X}, 0x{0x3F800000 | xor:08X}, 0x6A;")
            else:  # (t & mask) | 1.0f: LUT of (a & b) | c
                lines.append(f"lop3.b32 ${o}, {t}, 0x{mask:08X}, 0x3F800000, 0xEA;")
            o += 1
    return "\n".join(lines)


def _q4_asm() -> str:
    """Q4_K: 4 packed bytes -> (1 + lo/16) x 4, then (1 + hi/16) x 4."""
    body = "shr.u32 hi, $8, 4;\n" + _asm_bytes_to_floats(["$8", "hi"], 22, 4, 4)
    return "{\n.reg .b32 hi, t<8>;\n" + body + "\n}"


def _q6_asm(nbytes: int) -> str:
    """Q6_K: packed (low-nibble bytes of rows 0/1, the same bytes' high nibbles for rows 2/3,
    2-bit highs) -> 1 + q/64 for rows 0..3, ``nbytes`` lanes each."""
    n = 4 * nbytes
    a, b, h = f"${n}", f"${n + 1}", f"${n + 2}"
    body = [
        f"shr.u32 a, {a}, 4;", f"shr.u32 b, {b}, 4;",
        f"shl.b32 h0, {h}, 4;", f"shl.b32 h1, {h}, 2;", f"shr.u32 h3, {h}, 2;",
        "and.b32 h0, h0, 0x30303030;", "and.b32 h1, h1, 0x30303030;",
        f"and.b32 h2, {h}, 0x30303030;", "and.b32 h3, h3, 0x30303030;",
        f"lop3.b32 v0, {a}, 0x0F0F0F0F, h0, 0xEA;", f"lop3.b32 v1, {b}, 0x0F0F0F0F, h1, 0xEA;",
        "lop3.b32 v2, a, 0x0F0F0F0F, h2, 0xEA;", "lop3.b32 v3, b, 0x0F0F0F0F, h3, 0xEA;",
    ]
    return ("{\n.reg .b32 v<4>, h<4>, a, b, t<16>;\n" + "\n".join(body) + "\n"
            + _asm_bytes_to_floats(["v0", "v1", "v2", "v3"], 22, 6, nbytes) + "\n}")


def _q8_asm(nbytes: int) -> str:
    """Q8_0: int8 bytes -> 1 + (q + 128)/256 (flipping the sign bit makes q + 128 unsigned)."""
    return "{\n.reg .b32 t<4>;\n" + _asm_bytes_to_floats([f"${nbytes}"], 22, 8, nbytes, xor=0x00400000) + "\n}"


# Q4_K reads 16-byte vectors, so four bytes share a register; Q6_K and Q8_0 blocks are only 2-byte
# aligned, so their loads, and the asm, take two bytes at a time (pack=4 would first regroup the
# bytes through shared memory).
_Q4_ASM = tl.constexpr(_q4_asm())
_Q6_ASM = tl.constexpr(_q6_asm(2))
_Q8_ASM = tl.constexpr(_q8_asm(2))


@triton.jit
def _bits_f(v, left: tl.constexpr, mask: tl.constexpr):
    """Triton-op twin of the PTX: ((v << left) & mask) | 1.0f as float32 (left < 0 shifts right)."""
    if left >= 0:
        s = v << left
    else:
        s = v >> (-left)
    return ((s & mask) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _q4_floats(q, ASM: tl.constexpr):
    if ASM:
        return tl.inline_asm_elementwise(_Q4_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [q], dtype=(tl.float32, tl.float32),
                                         is_pure=True, pack=4)
    v = q.to(tl.int32)
    return _bits_f(v, 19, 0x00780000), _bits_f(v, 15, 0x00780000)


@triton.jit
def _q6_floats(qa, qb, qh, ASM: tl.constexpr):
    if ASM:
        return tl.inline_asm_elementwise(_Q6_ASM, "=r," * 8 + "r,r,r", [qa, qb, qh],
                                         dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=2)
    a = qa.to(tl.int32)
    b = qb.to(tl.int32)
    h = qh.to(tl.int32)
    f0 = _bits_f((a & 15) | ((h & 3) << 4), 17, 0x007E0000)
    f1 = _bits_f((b & 15) | (((h >> 2) & 3) << 4), 17, 0x007E0000)
    f2 = _bits_f((a >> 4) | (((h >> 4) & 3) << 4), 17, 0x007E0000)
    f3 = _bits_f((b >> 4) | ((h >> 6) << 4), 17, 0x007E0000)
    return f0, f1, f2, f3


@triton.jit
def _q8_floats(q, ASM: tl.constexpr):
    if ASM:
        return tl.inline_asm_elementwise(_Q8_ASM, "=r,=r,r", [q], dtype=tl.float32, is_pure=True, pack=2)
    return _bits_f(q.to(tl.int32) ^ 0x80, 15, 0x007F8000)


@triton.jit
def _f16s(p):
    return tl.load(p.to(tl.pointer_type(tl.float16))).to(tl.float32)


@triton.jit
def _q4k_ab(blk, s, keep):
    """Q4_K group s (0..7) of the block at blk -> (A, B) with w = A * (1 + q/16) - B, times keep."""
    sb = blk + 4
    a = tl.load(sb + s).to(tl.int32)  # s<4: scale; s>=4: min's top bits
    c = tl.load(sb + s + 4).to(tl.int32)  # s<4: min; s>=4: both low nibbles
    e = tl.load(sb + s % 4).to(tl.int32)  # s>=4: scale's top bits
    low = s < 4
    sc = tl.where(low, a & 63, (c & 15) | ((e >> 6) << 4)).to(tl.float32)
    mn = tl.where(low, c & 63, (c >> 4) | ((a >> 6) << 4)).to(tl.float32)
    A = 16.0 * _f16s(blk) * sc
    return A * keep, (A + _f16s(blk + 2) * mn) * keep


@triton.jit
def _xload(x_ptr, off):
    return tl.load(x_ptr + off).to(tl.float32)


@triton.jit
def _q4k_unit(acc, wr, kb, c, keep, i, x0, x1, x2, x3, ASM: tl.constexpr):
    """acc += one Q4_K unit (32-byte chunk c of block kb) of the rows at wr: x0/x2 meet the low
    nibbles of the chunk's two 16-byte halves (group 2c), x1/x3 the high ones (group 2c+1)."""
    blk = wr + kb * 144
    A0, B0 = _q4k_ab(blk, 2 * c, keep)
    A1, B1 = _q4k_ab(blk, 2 * c + 1, keep)
    fl, fh = _q4_floats(tl.load(blk + 16 + c * 32 + i), ASM)
    acc += (A0 * fl - B0) * x0
    acc += (A1 * fh - B1) * x1
    fl, fh = _q4_floats(tl.load(blk + 32 + c * 32 + i), ASM)
    acc += (A0 * fl - B0) * x2
    acc += (A1 * fh - B1) * x3
    return acc


@triton.jit
def _byte(w, k: tl.constexpr):
    return (w >> (8 * k)) & 0xFF


@triton.jit
def _q4k_hdr_ab(w1, w2, w3, d, dmin, s: tl.constexpr, keep):
    """(A, B) of Q4_K group s from the scale words of a block header (bytes 4..15 as w1, w2, w3)."""
    if s < 4:
        sc = _byte(w1, s) & 63
        mn = _byte(w2, s) & 63
    else:
        lo = _byte(w3, s - 4)  # low nibbles of scale and min
        sc = (lo & 15) | ((_byte(w1, s - 4) >> 6) << 4)
        mn = (lo >> 4) | ((_byte(w2, s - 4) >> 6) << 4)
    A = 16.0 * d * sc.to(tl.float32)
    return A * keep, (A + dmin * mn.to(tl.float32)) * keep


@triton.jit
def _q4k_block(acc, wr, kb, keep, i, x_ptr, ASM: tl.constexpr):
    """acc += one whole Q4_K block of the rows at wr: the 16-byte header in one load, then the four
    32-byte chunks (group 2c in the low nibbles of chunk c, 2c+1 in the high ones)."""
    blk = wr + kb * 144
    hdr = tl.load(blk.to(tl.pointer_type(tl.int32)) + tl.arange(0, 4)[None, :])  # (32W, 4) words
    even, odd = tl.split(tl.reshape(hdr, [hdr.shape[0], 2, 2]))  # words (0, 2) and (1, 3)
    w0, w2 = tl.split(even)
    w1, w3 = tl.split(odd)
    w0, w1, w2, w3 = w0[:, None], w1[:, None], w2[:, None], w3[:, None]
    d = (w0 & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    dmin = ((w0 >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    for c in tl.static_range(4):
        A0, B0 = _q4k_hdr_ab(w1, w2, w3, d, dmin, 2 * c, keep)
        A1, B1 = _q4k_hdr_ab(w1, w2, w3, d, dmin, 2 * c + 1, keep)
        xo = kb * 256 + c * 64 + i
        fl, fh = _q4_floats(tl.load(blk + 16 + c * 32 + i), ASM)
        acc += (A0 * fl - B0) * _xload(x_ptr, xo)
        acc += (A1 * fh - B1) * _xload(x_ptr, xo + 32)
        fl, fh = _q4_floats(tl.load(blk + 32 + c * 32 + i), ASM)
        acc += (A0 * fl - B0) * _xload(x_ptr, xo + 16)
        acc += (A1 * fh - B1) * _xload(x_ptr, xo + 48)
    return acc


@triton.jit
def _q6k_scales(wr, kb, h, t, keep):
    """The four (row r = 0..3) scales of Q6_K unit (h, t) of block kb, times 64 d: A_r."""
    blk = wr + kb * 210
    d = 64.0 * _f16s(blk + 208) * keep
    sp = (blk + 192 + h * 8 + t).to(tl.pointer_type(tl.int8))
    return (d * tl.load(sp).to(tl.float32), d * tl.load(sp + 2).to(tl.float32),
            d * tl.load(sp + 4).to(tl.float32), d * tl.load(sp + 6).to(tl.float32))


@triton.jit
def _q6k_part(acc, wr, kb, h, lane, A0, A1, A2, A3, x0, x1, x2, x3, ASM: tl.constexpr):
    """acc += 2 lanes x 4 rows of a Q6_K unit: w = A * (1 + q/64) - 1.5 A."""
    blk = wr + kb * 210
    f0, f1, f2, f3 = _q6_floats(tl.load(blk + h * 64 + lane), tl.load(blk + h * 64 + 32 + lane),
                                tl.load(blk + 128 + h * 32 + lane), ASM)
    acc += (A0 * f0 - 1.5 * A0) * x0
    acc += (A1 * f1 - 1.5 * A1) * x1
    acc += (A2 * f2 - 1.5 * A2) * x2
    acc += (A3 * f3 - 1.5 * A3) * x3
    return acc


@triton.jit
def _q50_part(acc, blk, qh, A, i, xl, xh):
    """acc += lanes i and 16 + i of a Q5_0 block: w = A * (1 + q/32) - 1.5 A."""
    qs = tl.load(blk + 6 + i).to(tl.int32)
    acc += (A * _bits_f((qs & 15) | (((qh >> i) & 1) << 4), 18, 0x007C0000) - 1.5 * A) * xl
    acc += (A * _bits_f((qs >> 4) | (((qh >> (i + 16)) & 1) << 4), 18, 0x007C0000) - 1.5 * A) * xh
    return acc


@triton.jit
def _float_part(acc, wr, k, keep, x, QTYPE: tl.constexpr):
    if QTYPE == 1:
        w = tl.load(wr.to(tl.pointer_type(tl.float16)) + k).to(tl.float32)
    elif QTYPE == 30:  # bf16 widened by a shift: no bf16 instruction
        w = (tl.load(wr.to(tl.pointer_type(tl.uint16)) + k).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        w = tl.load(wr.to(tl.pointer_type(tl.float32)) + k)
    acc += (w * keep) * x
    return acc


@triton.jit
def _float_rows(x_ptr, wa, wb, ws, u0, u1, QTYPE: tl.constexpr, V: tl.constexpr, W: tl.constexpr, R: tl.constexpr):
    """F16 / BF16 / F32 rows for ``_gemv``: units of 32 elements, V per 16-byte load."""
    e = tl.arange(0, V)[None, :]
    acc_a = tl.zeros([32 * W, V], dtype=tl.float32)
    acc_b = tl.zeros([32 * W, V], dtype=tl.float32)
    for u in range(u0, u1, W):
        uu = u + ws
        keep = (uu < u1).to(tl.float32)
        uc = tl.minimum(uu, u1 - 1)
        for p in tl.static_range(32 // V):
            k = uc * 32 + p * V + e
            x = _xload(x_ptr, k)
            acc_a = _float_part(acc_a, wa, k, keep, x, QTYPE)
            if R == 2:
                acc_b = _float_part(acc_b, wb, k, keep, x, QTYPE)
    return acc_a, acc_b


@triton.jit
def _gemv(x_ptr, w_ptr, row0, N, row_bytes, u0, u1,
          QTYPE: tl.constexpr, W: tl.constexpr, R: tl.constexpr, ASM: tl.constexpr,
          Q4K_BLOCK: tl.constexpr = False):
    """Rows row0 .. row0 + 32R - 1 of w dotted with the activation row over units u0..u1-1.

    Returns (32R,) float32 (rows past N hold garbage: the caller masks its store). Thread t of
    the program owns row row0 + t % 32 (and row0 + 32 + t % 32 when R = 2) and walks units
    t // 32, t // 32 + W, ...; one activation load serves its R rows. Tensors are (32W, V): a
    thread's V bytes or elements of one load. Repeats inside a unit are unrolled loops, not tensor
    dimensions, so Triton cannot spread one row over several threads, whatever order it gives
    equally-strided dimensions. No load is masked: rows and units are clamped into range and a
    unit past u1 gets zero scales (``keep``). Q4K_BLOCK makes a Q4_K unit a whole block, read as
    nine 16-byte loads per row (header, then nibbles) instead of 16-byte nibble loads plus eight
    1-2 byte scale loads per 32-byte chunk: with one row per thread, every load instruction of a
    warp touches 32 rows, so few wide loads matter more than few instructions.
    """
    t = tl.arange(0, 32 * W)
    ws = (t // 32)[:, None]  # (32W, 1): the unit stream of each warp
    ra = row0 + t % 32
    stride = row_stride(row_bytes, QTYPE)
    wa = (w_ptr + tl.minimum(ra, N - 1).to(tl.int64) * stride)[:, None]  # (32W, 1)
    wb = (w_ptr + tl.minimum(ra + 32, N - 1).to(tl.int64) * stride)[:, None]
    if QTYPE == 12 and Q4K_BLOCK:  # Q4_K unit = a whole block
        i = tl.arange(0, 16)[None, :]
        acc_a = tl.zeros([32 * W, 16], dtype=tl.float32)
        acc_b = tl.zeros([32 * W, 16], dtype=tl.float32)
        for u in range(u0, u1, W):
            uu = u + ws
            keep = (uu < u1).to(tl.float32)
            uc = tl.minimum(uu, u1 - 1)
            acc_a = _q4k_block(acc_a, wa, uc, keep, i, x_ptr, ASM)
            if R == 2:
                acc_b = _q4k_block(acc_b, wb, uc, keep, i, x_ptr, ASM)
    elif QTYPE == 12:  # Q4_K unit c of block kb: nibble bytes 32c..32c+31; groups 2c (low), 2c+1 (high)
        i = tl.arange(0, 16)[None, :]
        acc_a = tl.zeros([32 * W, 16], dtype=tl.float32)
        acc_b = tl.zeros([32 * W, 16], dtype=tl.float32)
        for u in range(u0, u1, W):
            uu = u + ws
            keep = (uu < u1).to(tl.float32)  # 0 for the tail's surplus units
            uc = tl.minimum(uu, u1 - 1)
            kb = uc // 4
            c = uc % 4
            xo = kb * 256 + c * 64 + i
            x0, x1 = _xload(x_ptr, xo), _xload(x_ptr, xo + 32)
            x2, x3 = _xload(x_ptr, xo + 16), _xload(x_ptr, xo + 48)
            acc_a = _q4k_unit(acc_a, wa, kb, c, keep, i, x0, x1, x2, x3, ASM)
            if R == 2:
                acc_b = _q4k_unit(acc_b, wb, kb, c, keep, i, x0, x1, x2, x3, ASM)
    elif QTYPE == 14:  # Q6_K unit (h, t) of block kb: lanes 16t.. of half h, all four 32-element rows
        e = tl.arange(0, 2)[None, :]
        acc_a = tl.zeros([32 * W, 2], dtype=tl.float32)
        acc_b = tl.zeros([32 * W, 2], dtype=tl.float32)
        for u in range(u0, u1, W):
            uu = u + ws
            keep = (uu < u1).to(tl.float32)
            uc = tl.minimum(uu, u1 - 1)
            kb = uc // 4
            h = (uc % 4) // 2
            th = uc % 2
            a0, a1, a2, a3 = _q6k_scales(wa, kb, h, th, keep)
            if R == 2:
                b0, b1, b2, b3 = _q6k_scales(wb, kb, h, th, keep)
            for p in tl.static_range(8):
                lane = th * 16 + p * 2 + e  # (32W, 2)
                xo = kb * 256 + h * 128 + lane
                x0, x1 = _xload(x_ptr, xo), _xload(x_ptr, xo + 32)
                x2, x3 = _xload(x_ptr, xo + 64), _xload(x_ptr, xo + 96)
                acc_a = _q6k_part(acc_a, wa, kb, h, lane, a0, a1, a2, a3, x0, x1, x2, x3, ASM)
                if R == 2:
                    acc_b = _q6k_part(acc_b, wb, kb, h, lane, b0, b1, b2, b3, x0, x1, x2, x3, ASM)
    elif QTYPE == 8:  # Q8_0 unit = block: d, 32 int8
        e = tl.arange(0, 2)[None, :]
        acc_a = tl.zeros([32 * W, 2], dtype=tl.float32)
        acc_b = tl.zeros([32 * W, 2], dtype=tl.float32)
        for u in range(u0, u1, W):
            uu = u + ws
            keep = (uu < u1).to(tl.float32)
            uc = tl.minimum(uu, u1 - 1)
            ba, bb = wa + uc * 34, wb + uc * 34
            da, db = 256.0 * _f16s(ba) * keep, 256.0 * _f16s(bb) * keep
            for p in tl.static_range(16):
                lane = p * 2 + e
                x = _xload(x_ptr, uc * 32 + lane)
                acc_a += (da * _q8_floats(tl.load(ba + 2 + lane), ASM) - 1.5 * da) * x
                if R == 2:
                    acc_b += (db * _q8_floats(tl.load(bb + 2 + lane), ASM) - 1.5 * db) * x
    elif QTYPE == 6:  # Q5_0 unit = block: d, 32 fifth bits, 16 bytes of nibbles (lanes i and 16+i)
        e = tl.arange(0, 2)[None, :]
        acc_a = tl.zeros([32 * W, 2], dtype=tl.float32)
        acc_b = tl.zeros([32 * W, 2], dtype=tl.float32)
        for u in range(u0, u1, W):
            uu = u + ws
            keep = (uu < u1).to(tl.float32)
            uc = tl.minimum(uu, u1 - 1)
            ba, bb = wa + uc * 22, wb + uc * 22
            ha, hb = (ba + 2).to(tl.pointer_type(tl.uint16)), (bb + 2).to(tl.pointer_type(tl.uint16))
            qha = tl.load(ha).to(tl.int32) | (tl.load(ha + 1).to(tl.int32) << 16)
            qhb = tl.load(hb).to(tl.int32) | (tl.load(hb + 1).to(tl.int32) << 16)
            da, db = 32.0 * _f16s(ba) * keep, 32.0 * _f16s(bb) * keep
            for p in tl.static_range(8):
                i = p * 2 + e
                xl, xh = _xload(x_ptr, uc * 32 + i), _xload(x_ptr, uc * 32 + 16 + i)
                acc_a = _q50_part(acc_a, ba, qha, da, i, xl, xh)
                if R == 2:
                    acc_b = _q50_part(acc_b, bb, qhb, db, i, xl, xh)
    elif QTYPE == 0:  # F32 unit = 32 elements
        acc_a, acc_b = _float_rows(x_ptr, wa, wb, ws, u0, u1, QTYPE, 4, W, R)
    else:  # F16 / BF16 unit = 32 elements
        acc_a, acc_b = _float_rows(x_ptr, wa, wb, ws, u0, u1, QTYPE, 8, W, R)
    out = tl.sum(tl.reshape(tl.sum(acc_a, axis=1), [W, 32]), axis=0)  # (32,): the W unit streams added
    if R == 2:
        sb = tl.sum(tl.reshape(tl.sum(acc_b, axis=1), [W, 32]), axis=0)
        out = tl.reshape(tl.trans(tl.join(out, sb)), [64])  # rows row0.. then row0 + 32..
    return out


@triton.jit
def qmv_kernel(x_ptr, w_ptr, out_ptr, N, units, row_bytes, stride_xm, stride_om, units_per_split, stride_os,
               QTYPE: tl.constexpr, W: tl.constexpr, R: tl.constexpr, ASM: tl.constexpr,
               Q4K_BLOCK: tl.constexpr = False):
    """out[s, m, n] = activation row m . weight row n over split s's units.

    Grid: (M, cdiv(N, 32R), splits); the M programs of one row block run side by side, so rows
    after the first mostly find the weights in L2.
    """
    m = tl.program_id(0)
    row0 = tl.program_id(1) * (32 * R)
    s = tl.program_id(2)
    u0 = s * units_per_split
    u1 = tl.minimum(u0 + units_per_split, units)
    acc = _gemv(x_ptr + m.to(tl.int64) * stride_xm, w_ptr, row0, N, row_bytes, u0, u1, QTYPE, W, R, ASM, Q4K_BLOCK)
    rows = row0 + tl.arange(0, 32 * R)
    optr = out_ptr + s.to(tl.int64) * stride_os + m.to(tl.int64) * stride_om + rows
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=rows < N)
