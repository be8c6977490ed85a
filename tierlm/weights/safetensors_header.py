"""Safetensors headers, read without torch (the planner uses them too).

Every broken file gets an error naming the file and the fix before any tensor is touched: a truncated or
garbage header, malformed entries, dtypes tierlm cannot read, sizes that disagree with the shapes, and data
that runs past the end of the file.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from tierlm.errors import CheckpointError

ITEMSIZE: dict[str, int] = {  # bytes per element of each safetensors dtype tierlm reads
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}
MAX_HEADER = 100 * 2**20  # real headers are a few MB at most


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path.name} is truncated ({size} bytes, no safetensors header); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER, size - 8):
            raise CheckpointError(f"{path.name} is not a valid safetensors file (header length {n} for a "
                                  f"{size}-byte file): the file is truncated or corrupt; re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path.name} has a corrupt safetensors header ({e}); re-download it") from None
    base = 8 + n
    entries: dict[str, TensorEntry] = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: tensor {name!r} has a malformed header entry; re-download it") from None
        if dtype not in ITEMSIZE:
            raise CheckpointError(f"{path.name}: tensor {name!r} has dtype {dtype}, which tierlm cannot read")
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * ITEMSIZE[dtype] or begin < 0:
            raise CheckpointError(f"{path.name}: tensor {name!r} header says {end - begin} bytes for shape "
                                  f"{list(shape)} {dtype}; the file is corrupt, re-download it")
        entries[name] = TensorEntry(name, dtype, shape, path, base + begin, end - begin)
        data_end = max(data_end, end)
    if base + data_end > size:
        raise CheckpointError(f"{path.name} is truncated: expected {base + data_end:,} bytes, found {size:,}; "
                              "re-download it")
    return entries
