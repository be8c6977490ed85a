"""Quantize float tensors into GGML block formats (torch, vectorized over blocks, any device).

Q8_0, Q4_0, Q5_0 (and F32/F16/BF16) reproduce ``gguf.quants.quantize`` byte for byte. gguf-py cannot
write K-quants, so Q4_K, Q5_K and Q6_K follow llama.cpp's reference quantizers (``quantize_row_*_ref``
in ``ggml-quants.c``, the path ``llama-quantize`` takes without an importance matrix): the same
searches, constants and float32 operation order, run on all blocks at once, with sums taken left to
right as in the C loops. The bytes therefore equal the C code evaluated in plain IEEE float32; a
llama.cpp build whose compiler fuses multiply-adds (``-march=native`` with FMA) may round a sum
differently and pick another, equally valid, encoding for a rare near-tie block.

Glossary: N = blocks, S = sub-blocks (N * sub-blocks per block), L = lanes of a sub-block.
"""

from __future__ import annotations

import numpy as np
import torch

from tierlm.weights.ggml_types import QK_K, FormatError, GGMLType, check_row_length

GROUP_MAX_EPS = float(np.float32(1e-15))  # llama.cpp: a sub-block below this |max| is all zero
_CHUNK_ELEMENTS = 1 << 18  # elements quantized per step: the search's temporaries (~1 MB each) stay in cache;
                            # 8M-element steps ran 3x slower (memory-bound), smaller ones pay per-op overhead


def _nearest(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """llama.cpp ``nearest_int`` then clamp to [lo, hi]: its add-1.5*2^23 trick rounds half to even.

    Clamping first is equivalent for finite values and keeps inf/NaN (from a zero scale that the
    caller masks out afterwards) from turning into undefined integers.
    """
    return torch.round(torch.nan_to_num(v, nan=0.0).clamp(lo, hi))


def _div(a: torch.Tensor | float, b: torch.Tensor | float) -> torch.Tensor:
    """Correctly rounded a / b when one side is a Python number, as C computes it.

    torch evaluates ``number / tensor`` as ``reciprocal(tensor) * number``, and CUDA evaluates
    ``tensor / number`` as a multiply by the reciprocal; either is off by an ulp often enough to
    change a rounded level. Wrapping the number in a 0-dim tensor on the same device keeps a true
    division.
    """
    ref = a if isinstance(a, torch.Tensor) else b
    if not isinstance(a, torch.Tensor):
        a = ref.new_full((), a)
    if not isinstance(b, torch.Tensor):
        b = ref.new_full((), b)
    return torch.div(a, b)


def _f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """(N, 1) float32 -> (N, 2) little-endian fp16 bytes, rounded to nearest even like GGML_FP32_TO_FP16."""
    return d.to(torch.float16).view(torch.uint8)


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int64).bitwise_and(0xFF).to(torch.uint8)


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim strictly left to right, like C's ``for (...) s += t[i]`` in float32.

    A tree reduction would differ in the last bit and flip near-ties in the scale searches; the
    rows are short (16 or 32), so one op per lane over all rows costs little.
    """
    cols = t.movedim(-1, 0).contiguous()  # (L, ...): each step adds one contiguous slab, not a strided column
    acc = cols[0].clone()
    for i in range(1, cols.shape[0]):
        acc += cols[i]
    return acc


def _absmax_signed(x: torch.Tensor) -> torch.Tensor:
    """The value with the largest |x| along the last dim, first one on ties (C's strict '<' scan)."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))


# ---------------------------------------------------------------- legacy 32-element blocks (gguf-py)


def _q8_0(x: torch.Tensor) -> torch.Tensor:
    d = _div(x.abs().amax(-1, keepdim=True), 127)
    inv = torch.where(d == 0, 0.0, _div(1, d))
    v = x * inv
    # gguf's np_roundf: round half away from zero, computed without the x + 0.5 double rounding
    a = v.abs()
    fl = torch.floor(a)
    q = torch.sign(v) * (fl + torch.floor(2 * (a - fl)))
    return torch.cat([_f16_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=1)


def _q4_0(x: torch.Tensor) -> torch.Tensor:
    d = _div(_absmax_signed(x), -8)
    inv = torch.where(d == 0, 0.0, _div(1, d))
    q = _u8(torch.trunc(x * inv + 8.5).clamp(0, 15))  # (N, 32)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return torch.cat([_f16_bytes(d), qs], dim=1)


def _q5_0(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    d = _div(_absmax_signed(x), -16)
    inv = torch.where(d == 0, 0.0, _div(1, d))
    q = torch.trunc(x * inv + 16.5).clamp(0, 31).to(torch.int64)  # (N, 32)
    qs = _u8((q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4))
    # 5th bits as a little-endian u32: element j -> byte j//8, bit j%8
    bit = torch.arange(8, device=x.device)
    qh = _u8(((q >> 4).view(n, 4, 8) << bit).sum(-1))
    return torch.cat([_f16_bytes(d), qh, qs], dim=1)


# ---------------------------------------------------------------- K-quant searches (llama.cpp)


def _make_qkx2_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weighted least-squares fit x ~ scale*L - the_min, L in [0, nmax], for every row of x (S, L).

    Starts from the min/max grid, then tries nstep+1 stretched grids (rmin + rdelta*is + nmax levels
    over the current best range) and keeps a candidate only if its weighted squared error is lower.
    Returns (scale (S,), the_min (S,), L (S, L) float).
    """
    mn = x.amin(-1)
    mn = torch.where(mn > 0, 0.0, mn)  # never positive (C's `if (min > 0) min = 0`, which keeps -0.0)
    mx = x.amax(-1)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = mx == mn

    def err(scale, lv, m):  # sum w * (scale*L + min - x)^2, in C's order
        diff = scale[:, None] * lv + m[:, None] - x
        return _seqsum(w * (diff * diff))

    iscale = _div(nmax, mx - mn)
    scale = _div(1, iscale)
    L = _nearest(iscale[:, None] * (x - mn[:, None]), 0, nmax)
    best = err(scale, L, mn)
    for step in range(nstep + 1):
        num = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)
        iscale = _div(float(num), mx - mn)  # mn is the best min so far, as in C
        la = _nearest(iscale[:, None] * (x - mn[:, None]), 0, nmax)
        wl = w * la
        sum_l = _seqsum(wl)
        sum_l2 = _seqsum(wl * la)
        sum_xl = _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, 0.0, this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = err(this_scale, la, this_min)
        take = (D > 0) & (cur < best) & ~flat
        L = torch.where(take[:, None], la, L)
        best = torch.where(take, cur, best)
        scale = torch.where(take, this_scale, scale)
        mn = torch.where(take, this_min, mn)
    scale = torch.where(flat, 0.0, scale)
    L = torch.where(flat[:, None], 0.0, L)
    return scale, -mn, L


def _make_qx_quants_rmse1(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric fit x ~ scale*(L - nmax), L in [0, 2*nmax), weighted by x^2, over every row of x (S, L).

    llama.cpp ``make_qx_quants(rmse_type=1, qw=NULL)``: the grid where the largest |x| maps to -nmax,
    then 18 grids with nmax +- 0.1*is levels, keeping the one that maximises sumlx^2 / suml2.
    Returns (scale (S,), L (S, L) float).
    """
    mx = _absmax_signed(x).squeeze(-1)
    zero = mx.abs() < GROUP_MAX_EPS
    mx = torch.where(zero, 1.0, mx)
    w = x * x
    wx = w * x

    def attempt(iscale):
        lv = _nearest(iscale[:, None] * x, -nmax, nmax - 1)
        return lv, _seqsum(wx * lv), _seqsum(w * lv * lv)

    lv, sumlx, suml2 = attempt(_div(-nmax, mx))
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        num = np.float32(nmax) + np.float32(0.1) * np.float32(step)
        l2, slx, sl2 = attempt(_div(-float(num), mx))
        take = (sl2 > 0) & (slx * slx > best * sl2)
        lv = torch.where(take[:, None], l2, lv)
        scale = torch.where(take, slx / sl2, scale)
        best = torch.where(take, scale * slx, best)
    L = torch.where(zero[:, None], 0.0, lv + nmax)
    return torch.where(zero, 0.0, scale), L


# ---------------------------------------------------------------- K-quant blocks


def _q45_k_common(x: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared Q4_K/Q5_K body: 8 sub-blocks of 32 with 6-bit scales and mins under fp16 d and dmin.

    Returns (d bytes (N, 2), dmin bytes (N, 2), packed scales (N, 12), L (N, 8, 32) int64).
    """
    n = x.shape[0]
    xs = x.reshape(n * 8, 32)  # (S, L)
    # C's sqrtf is correctly rounded; torch's float32 sqrt on the CPU is not always (one ulp off, which moves a
    # weight and then a min). The float64 root rounded to float32 is the correctly rounded float32 root.
    av_x = torch.sqrt(_div(_seqsum(xs * xs).unsqueeze(-1), 32).double()).float()
    w = av_x + xs.abs()
    scale, the_min, L = _make_qkx2_quants(xs, w, nmax, rmin, rdelta, nstep)
    scale, the_min, L = scale.view(n, 8), the_min.view(n, 8), L.view(n, 8, 32)

    # C scans from +0 with '>', so a block whose mins are all -0.0 keeps dmin = +0.0 (not clamp's -0.0)
    max_scale = scale.amax(-1, keepdim=True)  # (N, 1)
    max_scale = torch.where(max_scale > 0, max_scale, 0.0)
    max_min = the_min.amax(-1, keepdim=True)
    max_min = torch.where(max_min > 0, max_min, 0.0)
    inv_scale = torch.where(max_scale > 0, _div(63, max_scale), 0.0)
    inv_min = torch.where(max_min > 0, _div(63, max_min), 0.0)
    # C stores nearest_int into a uint8 (wraps) and then takes MIN(63, .)
    ls = (_nearest(inv_scale * scale, -(2**22), 2**22).to(torch.int64) & 0xFF).clamp(max=63)
    lm = (_nearest(inv_min * the_min, -(2**22), 2**22).to(torch.int64) & 0xFF).clamp(max=63)
    d16 = _div(max_scale, 63).to(torch.float16)
    dmin16 = _div(max_min, 63).to(torch.float16)

    # Requantize against the stored (rounded) scales; a zero scale keeps the search's levels.
    d = (d16.to(torch.float32) * ls.to(torch.float32)).unsqueeze(-1)  # (N, 8, 1)
    dm = (dmin16.to(torch.float32) * lm.to(torch.float32)).unsqueeze(-1)
    lq = _nearest((x.view(n, 8, 32) + dm) / d, 0, nmax)
    L = torch.where(d != 0, lq, L).to(torch.int64)

    packed = torch.cat(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4),
        ],
        dim=1,
    )
    return d16.view(torch.uint8), dmin16.view(torch.uint8), _u8(packed), L


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, L = _q45_k_common(x, 15, -1.0, 0.1, 20)
    n = x.shape[0]
    L = L.view(n, 4, 2, 32)  # chunk c: sub-block 2c -> low nibbles, 2c+1 -> high nibbles
    qs = _u8(L[:, :, 0] | (L[:, :, 1] << 4)).reshape(n, QK_K // 2)
    return torch.cat([d, dmin, scales, qs], dim=1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, L = _q45_k_common(x, 31, -0.5, 0.1, 15)
    n = x.shape[0]
    lo = (L & 0x0F).view(n, 4, 2, 32)
    qs = _u8(lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, QK_K // 2)
    bit = torch.arange(8, device=x.device).view(1, 8, 1)
    qh = _u8(((L >> 4) << bit).sum(1))  # bit j of qh[l]: 5th bit of sub-block j, lane l
    return torch.cat([d, dmin, scales, qh, qs], dim=1)


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    scale, L = _make_qx_quants_rmse1(x.reshape(n * 16, 16), 32)
    scale, L = scale.view(n, 16), L.view(n, 16, 16)

    max_scale = _absmax_signed(scale)  # (N, 1), signed
    zero = max_scale.abs() < GROUP_MAX_EPS  # whole block written as zeros
    iscale = _div(-128, torch.where(zero, 1.0, max_scale))
    d16 = _div(1, iscale).to(torch.float16)
    sc = _nearest(iscale * scale, -(2**22), 127).to(torch.int64)  # int8 in C: MIN(127, .)

    d = (d16.to(torch.float32) * sc.to(torch.float32)).unsqueeze(-1)  # (N, 16, 1)
    lq = _nearest(x.view(n, 16, 16) / d, -32, 31) + 32
    L = torch.where(d != 0, lq, L).to(torch.int64).view(n, 2, 4, 32)  # (N, half, row, lane)

    r0, r1, r2, r3 = L.unbind(2)  # rows l, l+32, l+64, l+96 of each half
    ql = torch.cat([(r0 & 0x0F) | ((r2 & 0x0F) << 4), (r1 & 0x0F) | ((r3 & 0x0F) << 4)], dim=-1)
    qh = (r0 >> 4) | ((r1 >> 4) << 2) | ((r2 >> 4) << 4) | ((r3 >> 4) << 6)
    out = torch.cat([_u8(ql).reshape(n, 128), _u8(qh).reshape(n, 64), _u8(sc), d16.view(torch.uint8)], dim=1)
    return torch.where(zero, 0, out)


# ---------------------------------------------------------------- float types (gguf-py)


def _bf16(x: torch.Tensor) -> torch.Tensor:
    n = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    n = torch.where(nan, (n & 0xFFFF0000) | (64 << 16), n)  # quiet NaN
    n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16  # round to nearest even
    return (n & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.uint8)


_QUANT = {
    GGMLType.F32: lambda x: x.contiguous().view(torch.uint8),
    GGMLType.F16: lambda x: x.to(torch.float16).view(torch.uint8),
    GGMLType.BF16: _bf16,
    GGMLType.Q8_0: _q8_0,
    GGMLType.Q4_0: _q4_0,
    GGMLType.Q5_0: _q5_0,
    GGMLType.Q4_K: _q4_k,
    GGMLType.Q5_K: _q5_k,
    GGMLType.Q6_K: _q6_k,
}
QUANTIZABLE = tuple(_QUANT)


def quantize(x: torch.Tensor, type: GGMLType | int) -> torch.Tensor:
    """Encode ``x`` (..., K) as GGML type ``type``; returns uint8 (..., K / block_size * type_size).

    The bytes are the GGUF layout: ``gguf.quants.dequantize(out.numpy(), type)`` reads them back and
    ``GGUFWriter.add_tensor(name, out.numpy(), raw_dtype=type)`` writes them. Computed in float32 on
    ``x``'s device.
    """
    fmt = check_row_length(type, x.shape)
    if fmt.type not in _QUANT:
        can = ", ".join(t.name for t in QUANTIZABLE)
        raise FormatError(f"tierlm cannot quantize to {fmt.type.name} (it can write {can}); use llama-quantize")
    if not x.is_floating_point():
        raise FormatError(f"quantize expects a floating-point tensor, got {x.dtype}")
    blocks = x.detach().to(torch.float32).reshape(-1, fmt.block_size)  # (N, block_size)
    if len(blocks) == 0:
        out = torch.empty((0, fmt.type_size), dtype=torch.uint8, device=x.device)
    elif fmt.block_size == 1 or len(blocks) * fmt.block_size <= _CHUNK_ELEMENTS:
        out = _QUANT[fmt.type](blocks)
    else:
        step = _CHUNK_ELEMENTS // fmt.block_size
        out = torch.cat([_QUANT[fmt.type](c.contiguous()) for c in blocks.split(step)])
    lead = tuple(x.shape[:-1]) if x.dim() else ()
    row = x.shape[-1] // fmt.block_size * fmt.type_size if x.dim() else fmt.type_size
    return out.reshape(*lead, row)
