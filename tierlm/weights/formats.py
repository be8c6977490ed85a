"""GGML block formats in torch: dequantize raw GGUF bytes on any device, and quantize back.

``dequantize`` is bit-exact with ``gguf.quants.dequantize`` (llama.cpp's reference layout): it works
in float32 with the same operation order (fp16 scales widened to float32 first, then e.g. Q4_K's
``(d*sc)*q - dmin*m``), one tensor op per step over all blocks at once. Eager torch runs each
elementwise op as its own kernel, so no multiply-add is fused on CPU or CUDA and the rounding
matches. Quantizers live in ``quantize.py`` and are re-exported here.

Glossary: N = blocks, S = sub-blocks per block, L = lanes (elements of a sub-block).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from tierlm.weights.ggml_types import (
    FORMATS,
    QK_K,
    BlockFormat,
    FormatError,
    GGMLType,
    block_format,
    check_row_length,
    ggml_type,
    tensor_nbytes,
)
from tierlm.weights.quantize import quantize

__all__ = [
    "FORMATS",
    "BlockFormat",
    "FormatError",
    "GGMLType",
    "block_format",
    "dequantize",
    "ggml_type",
    "quantize",
    "tensor_nbytes",
]


def _fields(blocks: torch.Tensor, fmt: BlockFormat) -> list[torch.Tensor]:
    """Split (N, type_size) uint8 blocks into one (N, nbytes) tensor per field, in storage order."""
    return [blocks[:, a:b] for _, a, b in fmt.field_offsets()]


def _f16(field: torch.Tensor) -> torch.Tensor:
    """(N, 2) little-endian fp16 bytes -> (N, 1) float32, exactly as ggml's GGML_FP16_TO_FP32."""
    return field.contiguous().view(torch.float16).to(torch.float32)


@functools.lru_cache(maxsize=None)
def _shifts(shifts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The shift amounts as a uint8 tensor on ``device``, made once: a copy from the host at every call would
    cost a sync, and is not allowed in a step captured as a CUDA graph (``runtime/graphs.py``)."""
    return torch.tensor(shifts, dtype=torch.uint8, device=device)


def _bits(field: torch.Tensor, shifts: Sequence[int], mask: int) -> torch.Tensor:
    """(N, B) bytes -> (N, len(shifts), B): every byte shifted by each amount, then masked."""
    sh = _shifts(tuple(shifts), field.device).view(1, -1, 1)
    return (field.unsqueeze(1) >> sh) & mask


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, groups*B) bytes -> (N, groups, 2, B): low nibbles of each group of B bytes, then high ones."""
    n = qs.shape[0]
    qs = qs.reshape(n, groups, 1, -1)  # (N, groups, 1, B)
    return (qs >> _shifts((0, 4), qs.device).view(1, 1, 2, 1)) & 0x0F


def _dq_q8_0(b: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    d, qs = _fields(b, fmt)
    return qs.contiguous().view(torch.int8).to(torch.float32) * _f16(d)


def _dq_q4_0(b: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    d, qs = _fields(b, fmt)
    q = _nibbles(qs, 1).reshape(b.shape[0], 32).to(torch.float32) - 8  # element j<16: low nibble of qs[j]
    return _f16(d) * q


def _dq_q5_0(b: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    d, qh, qs = _fields(b, fmt)
    n = b.shape[0]
    # qh is a little-endian u32 whose bit j is the 5th bit of element j: byte j//8, bit j%8.
    hi = _bits(qh, range(8), 1).transpose(1, 2).reshape(n, 32)  # (N, 4 bytes, 8 bits) -> (N, 32)
    lo = _nibbles(qs, 1).reshape(n, 32)
    q = (lo | (hi << 4)).to(torch.float32) - 16
    return _f16(d) * q


def _dq_q2_k(b: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    scales, qs, d, dmin = _fields(b, fmt)
    n = b.shape[0]
    dl = (_f16(d) * (scales & 0x0F).to(torch.float32)).view(n, 16, 1)
    ml = (_f16(dmin) * (scales >> 4).to(torch.float32)).view(n, 16, 1)
    # 2 halves of 128 elements; element 32*s + l of a half is bits 2s..2s+1 of qs[32*half + l].
    q = _bits(qs.reshape(n * 2, 32), (0, 2, 4, 6), 3)  # (2N, 4, 32)
    q = q.reshape(n, 16, 16).to(torch.float32)  # (N, 16 sub-blocks, 16 lanes)
    return (dl * q - ml).reshape(n, QK_K)


def _dq_q3_k(b: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    hmask, qs, scales, d = _fields(b, fmt)
    n = b.shape[0]
    # 16 six-bit scales: low 4 bits from nibbles of bytes 0..7, high 2 bits from 2-bit fields of bytes 8..11.
    lo = _bits(scales[:, :8], (0, 4), 0x0F).reshape(n, 16)
    hi = _bits(scales[:, 8:], (0, 2, 4, 6), 0x03).reshape(n, 16)
    sc = (lo | (hi << 4)).to(torch.float32) - 32
    dl = (_f16(d) * sc).view(n, 16, 1)
    ql = _bits(qs.reshape(n * 2, 32), (0, 2, 4, 6), 3).reshape(n, 16, 16)
    # hmask bit k of byte l is the high bit of element 32k + l; a set bit means "no -4 offset".
    qh = _bits(hmask, range(8), 1).reshape(n, 16, 16) ^ 1
    q = ql.to(torch.float32) - (qh << 2).to(torch.float32)
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K packed 12 bytes -> eight 6-bit scales and eight 6-bit mins, each (N, 8) uint8.

    Bytes 0..3 / 4..7 hold sc/m of sub-blocks 0..3 in their low 6 bits and the top 2 bits of
    sub-blocks 4..7 in bits 6..7; bytes 8..11 hold the low nibbles of sc (low) and m (high) for 4..7.
    """
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _dq_q4_k(b: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    d, dmin, scales, qs = _fields(b, fmt)
    n = b.shape[0]
    sc, mn = _scale_min_k4(scales)
    dl = (_f16(d) * sc.to(torch.float32)).view(n, 8, 1)
    ml = (_f16(dmin) * mn.to(torch.float32)).view(n, 8, 1)
    # Chunk c (32 bytes) holds sub-block 2c in low nibbles and 2c+1 in high nibbles.
    q = _nibbles(qs, 4).reshape(n, 8, 32).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _dq_q5_k(b: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    d, dmin, scales, qh, qs = _fields(b, fmt)
    n = b.shape[0]
    sc, mn = _scale_min_k4(scales)
    dl = (_f16(d) * sc.to(torch.float32)).view(n, 8, 1)
    ml = (_f16(dmin) * mn.to(torch.float32)).view(n, 8, 1)
    lo = _nibbles(qs, 4).reshape(n, 8, 32)
    hi = _bits(qh, range(8), 1)  # (N, 8, 32): bit j of qh[l] is the 5th bit of sub-block j, lane l
    q = (lo | (hi << 4)).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _dq_q6_k(b: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    ql, qh, scales, d = _fields(b, fmt)
    n = b.shape[0]
    dl = (_f16(d) * scales.contiguous().view(torch.int8).to(torch.float32)).view(n, 16, 1)
    # Per half of 128: ql nibbles give (low of bytes 0..63, high of bytes 0..63) -> elements 0..127 in
    # 32-lane rows ordered (ql[0:32] lo, ql[32:64] lo, ql[0:32] hi, ql[32:64] hi); qh 2-bit fields follow
    # the same row order (shift 0, 2, 4, 6 of qh[0:32]).
    lo = _nibbles(ql, 2).reshape(n, 8, 32)
    hi = _bits(qh.reshape(n * 2, 32), (0, 2, 4, 6), 3).reshape(n, 8, 32)
    q = (lo | (hi << 4)).to(torch.float32) - 32
    return (dl * q.reshape(n, 16, 16)).reshape(n, QK_K)


def _dq_f32(b: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _dq_f16(b: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32)


def _dq_bf16(b: torch.Tensor, fmt: BlockFormat) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).to(torch.float32)  # a 16-bit shift: exact, NaNs kept


_DEQUANT: dict[GGMLType, Callable[[torch.Tensor, BlockFormat], torch.Tensor]] = {
    GGMLType.F32: _dq_f32,
    GGMLType.F16: _dq_f16,
    GGMLType.BF16: _dq_bf16,
    GGMLType.Q8_0: _dq_q8_0,
    GGMLType.Q4_0: _dq_q4_0,
    GGMLType.Q5_0: _dq_q5_0,
    GGMLType.Q2_K: _dq_q2_k,
    GGMLType.Q3_K: _dq_q3_k,
    GGMLType.Q4_K: _dq_q4_k,
    GGMLType.Q5_K: _dq_q5_k,
    GGMLType.Q6_K: _dq_q6_k,
}
assert _DEQUANT.keys() == FORMATS.keys()


def dequantize(
    raw: torch.Tensor,
    type: GGMLType | int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode GGML bytes into a tensor of ``shape`` (torch order: the last dim is the GGUF row).

    ``raw`` is a contiguous uint8 tensor on any device holding exactly ``tensor_nbytes(type, shape)``
    bytes (any shape, e.g. the (..., row_bytes) view that ``gguf.GGUFReader`` gives). The result is
    computed in float32, bit-exact with ``gguf.quants.dequantize``, then cast to ``dtype``.
    """
    fmt = check_row_length(type, shape)
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        got = raw.dtype if isinstance(raw, torch.Tensor) else raw.__class__.__name__
        raise FormatError(f"dequantize expects a torch.uint8 tensor of raw GGUF bytes, got {got}")
    want = tensor_nbytes(fmt.type, shape)
    if raw.numel() != want:
        raise FormatError(
            f"{fmt.type.name} tensor of shape {tuple(shape)} needs {want} bytes but {raw.numel()} were given; "
            "the tensor's shape or type does not match its data (truncated or misread file?)"
        )
    if want == 0:
        return torch.empty(tuple(int(s) for s in shape), dtype=dtype, device=raw.device)
    blocks = raw.reshape(-1, fmt.type_size)  # (N, type_size)
    out = _DEQUANT[fmt.type](blocks, fmt)  # (N, block_size) float32
    return out.reshape(tuple(int(s) for s in shape)).to(dtype)
