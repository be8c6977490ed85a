"""GGML tensor types that tierlm reads: block geometry and byte layout, with no torch import.

The planner sizes tensors with ``tensor_nbytes`` before any weight is touched, so this module stays
plain Python. Type ids are the ``gguf`` package's ``GGMLQuantizationType`` values, the same numbers a
GGUF file stores. Each block is a run of fields laid out back to back, little-endian, as in
llama.cpp's ``ggml-common.h``; the dequantizers in ``formats.py`` slice blocks by these fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from gguf import GGMLQuantizationType as GGMLType

from tierlm.errors import TierlmError

QK_K = 256  # elements in a K-quant super-block


class FormatError(TierlmError, ValueError):
    """A tensor's GGML type, shape or byte size does not fit the format it claims."""


@dataclass(frozen=True)
class BlockFormat:
    """One GGML type: ``block_size`` elements are stored in ``type_size`` bytes split into ``fields``."""

    type: GGMLType
    block_size: int
    fields: tuple[tuple[str, int], ...]  # (name, bytes) in storage order

    @property
    def type_size(self) -> int:
        return sum(n for _, n in self.fields)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size

    def field_offsets(self) -> tuple[tuple[str, int, int], ...]:
        """(name, start, end) byte ranges of each field inside one block."""
        out, start = [], 0
        for name, n in self.fields:
            out.append((name, start, start + n))
            start += n
        return tuple(out)


def _fmt(t: GGMLType, block_size: int, *fields: tuple[str, int]) -> BlockFormat:
    return BlockFormat(t, block_size, tuple(fields))


# d / dmin are fp16 scales; scales are packed 4-, 6- or 8-bit sub-block scales (see formats.py).
FORMATS: dict[GGMLType, BlockFormat] = {
    f.type: f
    for f in (
        _fmt(GGMLType.F32, 1, ("value", 4)),
        _fmt(GGMLType.F16, 1, ("value", 2)),
        _fmt(GGMLType.BF16, 1, ("value", 2)),
        _fmt(GGMLType.Q8_0, 32, ("d", 2), ("qs", 32)),
        _fmt(GGMLType.Q4_0, 32, ("d", 2), ("qs", 16)),
        _fmt(GGMLType.Q5_0, 32, ("d", 2), ("qh", 4), ("qs", 16)),
        _fmt(GGMLType.Q2_K, QK_K, ("scales", QK_K // 16), ("qs", QK_K // 4), ("d", 2), ("dmin", 2)),
        _fmt(GGMLType.Q3_K, QK_K, ("hmask", QK_K // 8), ("qs", QK_K // 4), ("scales", 12), ("d", 2)),
        _fmt(GGMLType.Q4_K, QK_K, ("d", 2), ("dmin", 2), ("scales", 12), ("qs", QK_K // 2)),
        _fmt(GGMLType.Q5_K, QK_K, ("d", 2), ("dmin", 2), ("scales", 12), ("qh", QK_K // 8), ("qs", QK_K // 2)),
        _fmt(GGMLType.Q6_K, QK_K, ("ql", QK_K // 2), ("qh", QK_K // 4), ("scales", QK_K // 16), ("d", 2)),
    )
}


def ggml_type(t: GGMLType | int) -> GGMLType:
    """Normalise a type id (enum or the integer stored in a GGUF file) and check tierlm can read it."""
    try:
        t = GGMLType(int(t))
    except ValueError:
        raise FormatError(f"unknown GGML type id {t!r}; the file may come from a newer llama.cpp") from None
    if t not in FORMATS:
        known = ", ".join(k.name for k in FORMATS)
        raise FormatError(
            f"GGML type {t.name} is not supported by tierlm (supported: {known}); "
            "requantize the model to one of these, e.g. Q4_K_M"
        )
    return t


def block_format(t: GGMLType | int) -> BlockFormat:
    """The block geometry of a supported GGML type."""
    return FORMATS[ggml_type(t)]


def check_row_length(t: GGMLType | int, shape: Sequence[int]) -> BlockFormat:
    """Check that ``shape``'s last (contiguous) dim holds whole blocks of type ``t``."""
    fmt = block_format(t)
    if any(int(s) < 0 for s in shape):
        raise FormatError(f"negative dimension in tensor shape {tuple(shape)}")
    row = int(shape[-1]) if len(shape) else 1
    if row % fmt.block_size:
        raise FormatError(
            f"row length {row} of shape {tuple(shape)} is not a multiple of the {fmt.type.name} block size "
            f"({fmt.block_size} elements); such a tensor cannot be stored as {fmt.type.name} "
            f"(llama.cpp falls back to a type with smaller blocks, e.g. Q5_0 or Q8_0)"
        )
    return fmt


def tensor_nbytes(t: GGMLType | int, shape: Sequence[int]) -> int:
    """Bytes that a tensor of ``shape`` (torch order, last dim contiguous) occupies as GGML type ``t``."""
    fmt = check_row_length(t, shape)
    return math.prod(int(s) for s in shape) // fmt.block_size * fmt.type_size
