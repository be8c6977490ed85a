"""Bytes per block of each tensor format the planner sizes, with no dependency at all.

GGML types store a row as whole blocks: ``block_elements`` values in ``block_bytes`` bytes (llama.cpp
``ggml-common.h``; the same numbers as gguf-py's ``GGML_QUANT_SIZES``). A row's length (the contiguous, last
torch dim) must be a multiple of the block. ``FP8`` is not a GGML type: it is the Hugging Face block format of the
official DeepSeek-V3 checkpoint, one e4m3 byte per value plus one fp32 scale per 128×128 tile (reference §2),
and is sized by ``fp8_nbytes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tierlm.errors import CheckpointError
from tierlm.weights.safetensors_header import ITEMSIZE

# name: (GGML type id, block elements, block bytes). Ids are the numbers a GGUF file stores.
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84),
    "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "BF16": (30, 1, 2),
    # i-quants: not produced by tierlm, but third-party DeepSeek GGUFs (e.g. "dynamic" 1.58–2.5 bit) use them,
    # and a plan of such a file must still count its bytes.
    "IQ2_XXS": (16, 256, 66),
    "IQ2_XS": (17, 256, 74),
    "IQ3_XXS": (18, 256, 98),
    "IQ1_S": (19, 256, 50),
    "IQ4_NL": (20, 32, 18),
    "IQ3_S": (21, 256, 110),
    "IQ2_S": (22, 256, 82),
    "IQ4_XS": (23, 256, 136),
    "IQ1_M": (29, 256, 56),
}
_BY_ID = {tid: name for name, (tid, _, _) in GGML_TYPES.items()}

# Plain element types of safetensors checkpoints (bytes per element); F8_E4M3 scales are separate F32 tensors.
SAFETENSORS_DTYPES: dict[str, int] = ITEMSIZE

FP8 = "FP8"
FP8_BLOCK = (128, 128)


def type_name(t: object) -> str:
    """Normalise a type given as a name ("Q4_K"), a GGML id (12) or an enum with ``.name`` (gguf's)."""
    if isinstance(t, bool):
        raise CheckpointError(f"tensor type {t!r} is neither a GGML type name nor an id")
    if isinstance(t, int):
        if t not in _BY_ID:
            raise CheckpointError(f"GGML type id {t} is unknown to the planner; known: "
                                  f"{', '.join(f'{n}={i}' for i, n in sorted(_BY_ID.items()))}")
        return _BY_ID[t]
    name = getattr(t, "name", t)
    if not isinstance(name, str):
        raise CheckpointError(f"tensor type {t!r} is neither a GGML type name nor an id")
    return name.upper()


def block(t: object) -> tuple[int, int]:
    """(block elements, block bytes) of a GGML type or safetensors dtype."""
    name = type_name(t)
    if name in GGML_TYPES:
        return GGML_TYPES[name][1:]
    if name in SAFETENSORS_DTYPES:
        return 1, SAFETENSORS_DTYPES[name]
    raise CheckpointError(f"tensor type {name!r} is unknown to the planner; known: "
                          f"{', '.join([*GGML_TYPES, *SAFETENSORS_DTYPES, FP8])}")


def fits_blocks(t: object, shape: Sequence[int]) -> bool:
    """Whether rows of ``shape`` (torch order: last dim contiguous) are whole blocks of type ``t``."""
    row = int(shape[-1]) if len(shape) else 1
    return row % block(t)[0] == 0


def tensor_nbytes(t: object, shape: Sequence[int]) -> int:
    """Bytes of a tensor of ``shape`` (torch order) stored as ``t`` (GGML type, safetensors dtype or ``FP8``)."""
    name = type_name(t)
    if name == FP8:
        return fp8_nbytes(shape)
    elems, nbytes = block(name)
    if not fits_blocks(name, shape):
        raise CheckpointError(f"a row of {shape[-1]} values (shape {tuple(shape)}) is not a whole number of "
                              f"{name} blocks of {elems}; such a tensor cannot be stored as {name}")
    return math.prod(int(s) for s in shape) // elems * nbytes


def fp8_nbytes(shape: Sequence[int], block_shape: tuple[int, int] = FP8_BLOCK) -> int:
    """One byte per value plus an fp32 ``weight_scale_inv`` per (partial) tile of the last two dims."""
    if len(shape) < 2:
        return math.prod(int(s) for s in shape)
    *lead, rows, cols = (int(s) for s in shape)
    tiles = math.ceil(rows / block_shape[0]) * math.ceil(cols / block_shape[1])
    return math.prod(lead) * (rows * cols + 4 * tiles)


def bits_per_weight(t: object) -> float:
    if type_name(t) == FP8:
        return 8 + 32 / (FP8_BLOCK[0] * FP8_BLOCK[1])
    elems, nbytes = block(t)
    return 8 * nbytes / elems
