"""Hugging Face safetensors checkpoints: single file or sharded with ``model.safetensors.index.json``.

Headers are parsed here (not by the safetensors library) so that every broken file gets an error naming the
shard and the fix; tensor data is memory-mapped and read lazily, one tensor at a time, so loading never holds a
second copy of the model.
"""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import torch

from tierlm.errors import CheckpointError
from tierlm.weights.safetensors_header import TensorEntry, read_header

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsCheckpoint:
    """The tensor index of a checkpoint folder (or one .safetensors file), read lazily."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.root = path if path.is_dir() else path.parent
        if path.is_file():
            files = [path]
        else:
            index = path / "model.safetensors.index.json"
            if index.exists():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{index.name} is corrupt ({e}); re-download it") from None
                files = [path / f for f in sorted(set(weight_map.values()))]
                missing = [f.name for f in files if not f.exists()]
                if missing:
                    raise CheckpointError(f"shard {missing[0]} listed in {index.name} is missing from {path}"
                                          f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                                          "download every shard of the checkpoint")
            else:
                files = sorted(path.glob("*.safetensors"))
                if not files:
                    raise CheckpointError(f"no .safetensors files in {path}: point at a Hugging Face checkpoint "
                                          "folder (config.json + *.safetensors) or a .gguf file")
        self.entries: dict[str, TensorEntry] = {}
        for f in files:
            for name, e in read_header(f).items():
                if name in self.entries:
                    raise CheckpointError(f"tensor {name!r} appears in both {self.entries[name].file.name} and "
                                          f"{f.name}; the checkpoint is inconsistent")
                self.entries[name] = e
        self._maps: dict[Path, mmap.mmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint in {self.root}; the download is "
                                  "incomplete or config.json belongs to another model") from None

    def get(self, name: str) -> torch.Tensor:
        """The tensor as stored, a zero-copy view of the memory-mapped file (copy-on-write, never written)."""
        e = self.entry(name)
        mm = self._maps.get(e.file)
        if mm is None:
            with open(e.file, "rb") as f:
                mm = self._maps[e.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        dtype = DTYPES[e.dtype]
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=dtype)
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=e.nbytes, offset=e.start)
        return flat.view(dtype).view(e.shape)

    def close(self) -> None:
        self._maps.clear()  # the maps close once the views into them are gone
