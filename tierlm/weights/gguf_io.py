"""Reading GGUF files: header, metadata, tensor table, and zero-copy views of the tensor data.

An own parser instead of ``gguf.GGUFReader``: every count, length and offset read from the file is checked against
the bytes the file actually has before it is used, so a corrupt or hostile file ends in a ``CheckpointError`` that
names the file and the problem — never a huge allocation, an IndexError or a struct.error. Tensor data is never
read here: ``tensor_bytes`` hands out slices of a read-only memory map, and the OS pages them in when used.

Split models (``{stem}-00001-of-00009.gguf`` …) open from the first shard and read as one file.

Layout (little-endian; shared reference §3.1):
    magic "GGUF" u32 | version u32 | n_tensors u64 | n_kv u64
    n_kv × (key: string, type: u32, value)                string = u64 length + UTF-8 bytes
    n_tensors × (name: string, n_dims: u32, ne[n_dims]: u64, ggml type: u32, offset: u64)
    padding to ``general.alignment`` (default 32), then the data section; offsets are relative to its start.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType, Keys

from tierlm.errors import CheckpointError

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4
MAX_KEY_BYTES = 65535          # GGUF spec: keys are at most 2^16-1 bytes
MAX_TENSOR_NAME_BYTES = 64     # GGUF spec (ggml's GGML_MAX_NAME)
MAX_STRING_BYTES = 128 << 20   # an embedded tokenizer.json is a few MB; 128 MB is far past any real value
MAX_ARRAY_LEN = 1 << 28        # a 129k-token vocabulary is 2^17; this bounds list building on huge files
_HEADER = struct.Struct("<IIQQ")
_MIN_KV_BYTES = 8 + 1 + 4 + 1          # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset
_INT64_MAX = (1 << 63) - 1

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<B",
}
_ARRAY_DTYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT32: "<f4", GGUFValueType.FLOAT64: "<f8", GGUFValueType.BOOL: "<u1",
}
SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def shard_name(stem: str, no: int, count: int) -> str:
    """The file name of shard ``no`` (1-based) of ``count``, as llama.cpp and gguf-py write it."""
    return f"{stem}-{no:05d}-of-{count:05d}.gguf"


def human_bytes(n: int) -> str:
    """A size for error messages: "4.1 GB (4100000000 bytes)"."""
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in the table. ``shape`` is in torch order (ggml's ``ne`` reversed), in elements."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int      # absolute byte offset in ``file``
    nbytes: int
    file: Path


class _Cursor:
    """Bounds-checked little-endian reads from a byte buffer; every failure names the file."""

    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {problem}")

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        if n > self.remaining:
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos}, but only {self.remaining} remain: "
                            "the file is truncated or corrupt; re-download it")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, cap: int) -> str:
        n = self.scalar("<Q", f"length of {what}")
        if n > self.remaining:
            raise self.fail(f"{what} declares a length of {n} bytes but only {self.remaining} bytes remain in the "
                            "file: the file is truncated or corrupt; re-download it")
        if n > cap:
            raise self.fail(f"{what} is {n} bytes long, above the limit of {cap}: the file is corrupt")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8: the file is corrupt; re-download it") from None

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.scalar("<I", f"value type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {raw}: the file is corrupt or from a newer GGUF "
                            "version") from None

    def value(self, vtype: GGUFValueType, what: str) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what, MAX_STRING_BYTES)
        if vtype != GGUFValueType.ARRAY:
            v = self.scalar(_SCALAR_FORMATS[vtype], what)
            if vtype == GGUFValueType.FLOAT32:  # the shortest decimal that is this float32: 1e-6 reads as 1e-6
                return float(np.format_float_scientific(np.float32(v), unique=True))
            return bool(v) if vtype == GGUFValueType.BOOL else v
        etype = self.value_type(f"elements of {what}")
        n = self.scalar("<Q", f"length of {what}")
        if etype == GGUFValueType.ARRAY:
            raise self.fail(f"{what} is an array of arrays, which ggml's own GGUF reader rejects too")
        min_item = 8 if etype == GGUFValueType.STRING else np.dtype(_ARRAY_DTYPES[etype]).itemsize
        if n > self.remaining // min_item:
            raise self.fail(f"{what} declares {n} elements, more than the {self.remaining} remaining bytes can "
                            "hold: the file is truncated or corrupt; re-download it")
        if n > MAX_ARRAY_LEN:
            raise self.fail(f"{what} declares {n} elements, above the limit of {MAX_ARRAY_LEN}: the file is corrupt")
        if etype == GGUFValueType.STRING:
            return [self.string(f"element {i} of {what}", MAX_STRING_BYTES) for i in range(n)]
        dtype = np.dtype(_ARRAY_DTYPES[etype])
        start = self.take(n * dtype.itemsize, what)
        arr = np.frombuffer(self.buf, dtype=dtype, count=n, offset=start).astype(dtype.newbyteorder("="))
        return arr.astype(bool) if etype == GGUFValueType.BOOL else arr


@dataclass
class _Shard:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data: np.memmap


def _parse(path: Path) -> _Shard:
    """Parse one GGUF file (one shard). Reads only the header region; maps the file read-only."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    if size < _HEADER.size:
        raise CheckpointError(f"{path} is only {size} bytes, too small to be a GGUF file; re-download it")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    buf = memoryview(data)
    try:
        return _parse_buffer(_Cursor(buf, path), data)
    finally:
        buf.release()


def _parse_buffer(cur: _Cursor, data: np.memmap) -> _Shard:
    version, n_tensors, n_kv = _read_header(cur)
    metadata = _read_metadata(cur, n_kv)
    alignment = metadata.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"metadata {Keys.General.ALIGNMENT!r} = {alignment!r} is not a power of two")
    infos: list[tuple[str, GGMLQuantizationType, tuple[int, ...], int, int]] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        infos.append(_read_tensor_info(cur, i, alignment, seen))
    # The data section starts at the next multiple of the alignment; tensor offsets are relative to it.
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {name: TensorInfo(name, ggml_type, shape, data_start + offset, nbytes, cur.path)
               for name, ggml_type, shape, offset, nbytes in infos}
    _check_data_ranges(cur, list(tensors.values()))
    return _Shard(cur.path, version, metadata, tensors, data)


def _read_header(cur: _Cursor) -> tuple[int, int, int]:
    magic, version, n_tensors, n_kv = _HEADER.unpack_from(cur.buf, cur.take(_HEADER.size, "header"))
    if magic != GGUF_MAGIC:
        raise cur.fail(f"bad magic {bytes(cur.buf[:4])!r} (expected b'GGUF'): not a GGUF file")
    if version not in SUPPORTED_VERSIONS:
        hint = " (it looks byte-swapped: big-endian GGUF files are not supported)" if version >= 1 << 16 else ""
        raise cur.fail(f"GGUF version {version} is not supported{hint}; tierlm reads versions "
                       f"{', '.join(map(str, SUPPORTED_VERSIONS))}")
    if n_tensors > cur.remaining // _MIN_TENSOR_INFO_BYTES:
        raise cur.fail(f"header declares {n_tensors} tensors, more than a file of {cur.size} bytes can describe: "
                       "the file is truncated or corrupt; re-download it")
    if n_kv > cur.remaining // _MIN_KV_BYTES:
        raise cur.fail(f"header declares {n_kv} metadata entries, more than a file of {cur.size} bytes can hold: "
                       "the file is truncated or corrupt; re-download it")
    return version, n_tensors, n_kv


def _read_metadata(cur: _Cursor, n_kv: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"key of metadata entry #{i}", MAX_KEY_BYTES)
        if not key:
            raise cur.fail(f"metadata entry #{i} has an empty key: the file is corrupt")
        if key in metadata:
            raise cur.fail(f"metadata key {key!r} appears twice: the file is corrupt")
        metadata[key] = cur.value(cur.value_type(f"metadata {key!r}"), f"metadata {key!r}")
    return metadata


def _read_tensor_info(cur: _Cursor, i: int, alignment: int, seen: set[str]):
    """One tensor-table entry → (name, type, shape in torch order, offset in the data section, nbytes)."""
    name = cur.string(f"name of tensor #{i}", MAX_TENSOR_NAME_BYTES)
    what = f"tensor {name!r}"
    if not name:
        raise cur.fail(f"tensor #{i} has an empty name: the file is corrupt")
    if name in seen:
        raise cur.fail(f"tensor name {name!r} appears twice: the file is corrupt")
    seen.add(name)
    n_dims = cur.scalar("<I", f"n_dims of {what}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"{what} has {n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}: the file is corrupt")
    ne = [cur.scalar("<Q", f"dimension {j} of {what}") for j in range(n_dims)]  # ggml order: ne[0] = row length
    for j, d in enumerate(ne):
        if d == 0 or d > _INT64_MAX:
            shown = d if d == 0 else d - (1 << 64)  # ggml reads dims as int64
            raise cur.fail(f"{what} has dimension {j} = {shown}; dimensions must be positive: the file is corrupt")
    n_elements = math.prod(ne)
    if n_elements > _INT64_MAX:
        raise cur.fail(f"{what} has dimensions {ne} whose product overflows 64 bits: the file is corrupt")
    type_id = cur.scalar("<I", f"type of {what}")
    try:
        ggml_type = GGMLQuantizationType(type_id)
        block_elems, block_bytes = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise cur.fail(f"{what} has unknown ggml type {type_id}: the file is corrupt or uses a quantization "
                       "this gguf package does not know (upgrade gguf)") from None
    if ne[0] % block_elems:
        raise cur.fail(f"{what} ({ggml_type.name}) has rows of {ne[0]} elements, not a multiple of the "
                       f"{block_elems}-element block: the file is corrupt")
    offset = cur.scalar("<Q", f"data offset of {what}")
    if offset % alignment:
        raise cur.fail(f"{what} has data offset {offset}, not a multiple of the alignment {alignment}: the file "
                       "is corrupt")
    return name, ggml_type, tuple(reversed(ne)), offset, n_elements // block_elems * block_bytes


def _check_data_ranges(cur: _Cursor, tensors: list[TensorInfo]) -> None:
    """Every tensor's bytes lie inside the file, and no two tensors share bytes."""
    if not tensors:
        return
    last = max(tensors, key=lambda t: t.offset + t.nbytes)
    need = last.offset + last.nbytes
    if need > cur.size:
        raise cur.fail(f"tensor {last.name!r} ends at byte {need}, past the end of the file: the file is truncated "
                       f"or corrupt (expected at least {human_bytes(need)}, found {human_bytes(cur.size)}); "
                       "re-download it")
    by_offset = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(by_offset, by_offset[1:]):
        if b.offset < a.offset + a.nbytes:
            raise cur.fail(f"tensors {a.name!r} and {b.name!r} overlap (bytes {a.offset}..{a.offset + a.nbytes} and "
                           f"{b.offset}..{b.offset + b.nbytes}): the file is corrupt")


def _meta_int(shard: _Shard, key: str, default: int) -> int:
    v = shard.metadata.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise CheckpointError(f"{shard.path}: metadata {key!r} = {v!r} is not a non-negative integer")
    return v


class GGUFFile:
    """A GGUF model: one file or all shards of a split one, read as a single tensor table.

    ``metadata`` comes from the first shard (gguf-py and llama-quantize write model keys only there);
    ``tensors`` maps each name to its ``TensorInfo``; ``tensor_bytes(name)`` is a zero-copy view of its data.
    Metadata values: Python int/bool/str scalars; float32 scalars as the shortest decimal of that float32 (1e-6
    reads back as 1e-6); string arrays as ``list[str]``; numeric arrays as 1-D numpy arrays.
    """

    def __init__(self, path: Path, shards: list[_Shard]):
        self.path = path
        self.shards = [s.path for s in shards]
        self.version = shards[0].version
        self.metadata: dict[str, Any] = shards[0].metadata
        self.tensors: dict[str, TensorInfo] = {}
        for s in shards:
            for name, info in s.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"tensor {name!r} is in both {self.tensors[name].file.name} and "
                                          f"{s.path.name}: the shards do not belong together; re-download them")
                self.tensors[name] = info
        self._maps: dict[Path, np.memmap] = {s.path: s.data for s in shards}

    @classmethod
    def open(cls, path: str | Path) -> "GGUFFile":
        """Open a GGUF file; for a split model, pass its first shard (``…-00001-of-000NN.gguf``)."""
        path = Path(path)
        m = SHARD_NAME.match(path.name)
        if m and int(m["no"]) != 1:
            first = path.with_name(shard_name(m["stem"], 1, int(m["count"])))
            raise CheckpointError(f"{path.name} is shard {int(m['no'])} of {int(m['count'])} of a split model; "
                                  f"open the first shard instead: {first}")
        first = _parse(path)
        count = _meta_int(first, Keys.Split.LLM_KV_SPLIT_COUNT, 1)
        no = _meta_int(first, Keys.Split.LLM_KV_SPLIT_NO, 0)
        if no != 0:
            raise CheckpointError(f"{path} is shard {no + 1} of {count} of a split model (split.no = {no}); "
                                  "open the first shard (split.no = 0) instead")
        shards = [first]
        if count > 1:
            if not m or int(m["count"]) != count:
                raise CheckpointError(f"{path} is the first of {count} shards, but its name does not end in "
                                      f"-00001-of-{count:05d}.gguf, so the other shards cannot be found; "
                                      "restore the original file names")
            for i in range(2, count + 1):
                shard_path = path.with_name(shard_name(m["stem"], i, count))
                if not shard_path.exists():
                    raise CheckpointError(f"shard {shard_path.name} of {path.name} is missing (looked in "
                                          f"{path.parent}); re-download it")
                shard = _parse(shard_path)
                got_no = shard.metadata.get(Keys.Split.LLM_KV_SPLIT_NO)
                got_count = shard.metadata.get(Keys.Split.LLM_KV_SPLIT_COUNT)
                if got_no != i - 1 or got_count != count:
                    raise CheckpointError(f"{shard_path} says it is shard {got_no} of {got_count} (split.no is "
                                          f"0-based), expected {i - 1} of {count}: the shards are mixed up; "
                                          "re-download them")
                shards.append(shard)
        gguf = cls(path, shards)
        if Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT in first.metadata:
            expected = _meta_int(first, Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, 0)
            if expected != len(gguf.tensors):
                raise CheckpointError(f"{path} declares {expected} tensors over {count} shard(s) "
                                      f"(split.tensors.count) but the shards hold {len(gguf.tensors)}: a shard is "
                                      "from another download; re-download the shards")
        return gguf

    def tensor_bytes(self, name: str) -> np.memmap:
        """The raw bytes of tensor ``name`` as a read-only uint8 view of the mapped file (no copy, no read)."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path} has no tensor {name!r}")
        return self._maps[info.file][info.offset:info.offset + info.nbytes]

    @property
    def architecture(self) -> str | None:
        return self.metadata.get(Keys.General.ARCHITECTURE)

    def close(self) -> None:
        """Drop the file mappings; views already handed out stay valid until they are released."""
        self._maps.clear()

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, shards={len(self.shards)}, tensors={len(self.tensors)})"
