"""The MLA cache: per layer, per token, the normalized latent (C) and the RoPE'd shared key (R).

68.6 KiB per token for DeepSeek-V3 in bf16 (61 layers × 576 × 2 B), against 4.77 MiB for decompressed K/V.
Two layouts implement the ``CacheView`` protocol of ``model/attention.py``:

- ``KVCache``: contiguous slots. A sequence owns one row for its lifetime; capacity grows geometrically when a
  longer sequence arrives (the copy is visible in ``reserve``). Simple, and the reference.
- ``PagedKVCache``: a pool of fixed-size blocks and one block table per sequence, so sequences of different
  lengths share memory and a finished sequence's blocks go back to the pool at once. The block bookkeeping
  (``BlockAllocator``) is plain Python.

Both are addressed by a sequence's *slot* (an int): a row index in ``KVCache``, a block-table key in
``PagedKVCache``. ``ensure(slots, lengths)`` makes room before a forward pass; ``view(slots)`` is what the model
sees.

Glossary: N slots, L layers, Smax capacity (tokens per slot), C kv_lora_rank, R rope dims, B batch, T tokens,
NB blocks in the pool, Bs tokens per block, W blocks per row of a block table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from tierlm.config import ModelConfig
from tierlm.errors import TierlmError
from tierlm.plan import memory as plan_memory


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return plan_memory.kv_bytes_per_token(cfg, dtype.itemsize)  # the planner's count, in this cache's dtype


def free_memory_bytes(device: torch.device) -> int:
    """Memory a KV pool may take on ``device``: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): assume 4 GiB
        return 4 << 30


def layer_devices(cfg: ModelConfig, device) -> list[torch.device]:
    """One device per layer: ``device`` is one device for all, or a per-layer list (pipeline over GPUs)."""
    if isinstance(device, (list, tuple)):
        if len(device) != cfg.num_hidden_layers:
            raise ValueError(f"{len(device)} layer devices for {cfg.num_hidden_layers} layers")
        return [torch.device(d) for d in device]
    return [torch.device(device)] * cfg.num_hidden_layers


class _OnDevice:
    """An index tensor with copies on the devices of the layers that use it (made once per batch)."""

    def __init__(self, t: torch.Tensor):
        self._by = {t.device: t}

    def on(self, device: torch.device) -> torch.Tensor:
        t = self._by.get(device)
        if t is None:
            t = self._by[device] = next(iter(self._by.values())).to(device)  # to the next pipeline stage
        return t


class KVCache:
    """Each layer's cache lives on that layer's device: kv[l] (N, Smax, C), pe[l] (N, Smax, R)."""

    def __init__(self, cfg: ModelConfig, n_slots: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str | Sequence):
        self.cfg, self.dtype = cfg, dtype
        self.layer_devices = layer_devices(cfg, device)
        self.device = self.layer_devices[0]
        self.n_slots, self.capacity = n_slots, 0
        self.version = 0  # bumped whenever the storage is reallocated (replayed CUDA graphs point into it)
        self.kv: list[torch.Tensor] = []
        self.pe: list[torch.Tensor] = []
        self.reserve(capacity)

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` tokens per slot, keeping what is cached."""
        if capacity <= self.capacity:
            return
        new_cap = max(capacity, 2 * self.capacity)
        cfg, N = self.cfg, self.n_slots
        kvs, pes = [], []
        for layer, dev in enumerate(self.layer_devices):
            kv = torch.zeros(N, new_cap, cfg.kv_lora_rank, dtype=self.dtype, device=dev)
            pe = torch.zeros(N, new_cap, cfg.qk_rope_head_dim, dtype=self.dtype, device=dev)
            if self.capacity:  # device-to-device copy of what was cached
                kv[:, : self.capacity] = self.kv[layer]
                pe[:, : self.capacity] = self.pe[layer]
            kvs.append(kv)
            pes.append(pe)
        self.kv, self.pe, self.capacity = kvs, pes, new_cap
        self.version += 1

    def ensure(self, slots: Sequence[int], lengths: Sequence[int]) -> None:
        """Make room for ``lengths[i]`` tokens in ``slots[i]``."""
        self.reserve(max(lengths))

    def view(self, slots: torch.Tensor, span: int | None = None) -> SlotView:
        """The cache as seen by a batch whose row b owns slot ``slots[b]``; ``span``: keys read per row (see
        ``CacheView``), at most ``capacity``."""
        return SlotView(self, slots, span)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.kv) + sum(t.nbytes for t in self.pe)


class SlotView:
    def __init__(self, cache: KVCache, slots: torch.Tensor, span: int | None = None):
        if span is not None and span > cache.capacity:
            raise ValueError(f"a span of {span} keys is past the cache's capacity of {cache.capacity}")
        self.cache, self.slots, self.span = cache, _OnDevice(slots), span

    def write(self, layer: int, positions: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor) -> None:
        slots = self.slots.on(positions.device)
        rows = slots[:, None].expand_as(positions)  # (B, T)
        self.cache.kv[layer][rows, positions] = kv.to(self.cache.dtype)
        self.cache.pe[layer][rows, positions] = pe.to(self.cache.dtype)

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        slots = self.slots.on(self.cache.kv[layer].device)
        return self.cache.kv[layer][slots, :length], self.cache.pe[layer][slots, :length]


# ------------------------------------------------------------------------------------------------ paged


class CacheFullError(TierlmError, MemoryError):
    """The block pool has no free block left for a sequence that needs one."""


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class BlockAllocator:
    """Which blocks of the pool are free, which sequence holds which, and what admitted sequences may still
    claim (``reserve``). Plain Python: no tensors.

    Block 0 is never handed out: it is the scratch block where a batch's padding positions write (see
    ``PagedView``).
    """

    def __init__(self, n_blocks: int, block_size: int):
        if n_blocks < 2 or block_size < 1:
            raise ValueError(f"a paged KV cache needs >= 2 blocks of >= 1 token, got {n_blocks} x {block_size}")
        self.n_blocks, self.block_size = n_blocks, block_size
        self._free = list(range(n_blocks - 1, 0, -1))  # a stack: pop() hands out low ids first
        self.tables: dict[int, list[int]] = {}  # slot -> its blocks, in position order
        self._reserved: dict[int, int] = {}  # slot -> blocks it may still claim beyond those it holds

    @property
    def usable(self) -> int:
        """Blocks that sequences can hold (all but the scratch block)."""
        return self.n_blocks - 1

    @property
    def free(self) -> int:
        """Blocks neither held nor promised to an admitted sequence."""
        return len(self._free) - sum(self._reserved.values())

    @property
    def used(self) -> int:
        return self.usable - len(self._free)

    def can_admit(self, tokens: int) -> bool:
        return blocks_for(tokens, self.block_size) <= self.free

    def admit(self, slot: int, tokens: int = 0) -> None:
        """Open a block table for ``slot`` and promise it room for ``tokens`` tokens (0: promise nothing, take
        blocks as they are free)."""
        if slot in self.tables:
            raise ValueError(f"slot {slot} already has a block table")
        need = blocks_for(tokens, self.block_size)
        if need > self.free:
            raise CacheFullError(f"{tokens} tokens need {need} KV blocks; {self.free} are free")
        self.tables[slot], self._reserved[slot] = [], need

    def grow(self, slot: int, tokens: int) -> None:
        """Hold enough blocks for ``tokens`` tokens in ``slot``, taking its promised blocks first."""
        table = self.tables[slot]
        missing = blocks_for(tokens, self.block_size) - len(table)
        if missing <= 0:
            return
        promised = min(missing, self._reserved[slot])
        if missing - promised > self.free:
            raise CacheFullError(f"slot {slot} needs {missing} more KV blocks; {len(self._free)} are free and "
                                 f"{sum(self._reserved.values())} of those are promised to running sequences")
        self._reserved[slot] -= promised
        table += [self._free.pop() for _ in range(missing)]

    def release(self, slot: int) -> None:
        """Return every block of ``slot`` (and its unclaimed promise) to the pool."""
        self._free += reversed(self.tables.pop(slot, []))
        self._reserved.pop(slot, None)

    def add_blocks(self, n: int) -> None:
        """The pool grew by ``n`` blocks (``PagedKVCache.grow_pool``)."""
        self._free[:0] = range(self.n_blocks + n - 1, self.n_blocks - 1, -1)
        self.n_blocks += n


class PagedKVCache:
    """The MLA cache in fixed-size blocks, shared by all sequences: per layer, on that layer's device,
    kv[l] (NB, Bs, C) and pe[l] (NB, Bs, R)."""

    def __init__(self, cfg: ModelConfig, n_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str | Sequence):
        self.cfg, self.dtype = cfg, dtype
        self.layer_devices = layer_devices(cfg, device)
        self.device = self.layer_devices[0]
        self.blocks = BlockAllocator(n_blocks, block_size)
        self.block_size = block_size
        self.version = 0  # bumped whenever the pool is reallocated (replayed CUDA graphs point into it)
        # Zeros, not empty: padding rows read masked keys from stale blocks, and 0 × NaN would still be NaN.
        self.kv = [torch.zeros(n_blocks, block_size, cfg.kv_lora_rank, dtype=dtype, device=d)
                   for d in self.layer_devices]
        self.pe = [torch.zeros(n_blocks, block_size, cfg.qk_rope_head_dim, dtype=dtype, device=d)
                   for d in self.layer_devices]

    @classmethod
    def for_tokens(cls, cfg: ModelConfig, tokens: int, dtype: torch.dtype, device: torch.device | str,
                   block_size: int = 16) -> PagedKVCache:
        """A pool that holds ``tokens`` tokens (plus the scratch block)."""
        return cls(cfg, blocks_for(tokens, block_size) + 1, block_size, dtype, device)

    def admit(self, slot: int, tokens: int = 0) -> None:
        self.blocks.admit(slot, tokens)

    def release(self, slot: int) -> None:
        self.blocks.release(slot)

    def ensure(self, slots: Sequence[int], lengths: Sequence[int]) -> None:
        """Hold blocks for ``lengths[i]`` tokens in ``slots[i]``; raises ``CacheFullError`` when the pool is out."""
        for slot, n in zip(slots, lengths):
            self.blocks.grow(int(slot), int(n))

    def grow_pool(self, n_blocks: int) -> None:
        """Add blocks to the pool, keeping what is cached (a device-to-device copy, as ``KVCache.reserve``)."""
        grow = lambda t: torch.cat([t, t.new_zeros(n_blocks, *t.shape[1:])])  # noqa: E731
        self.kv, self.pe = [grow(t) for t in self.kv], [grow(t) for t in self.pe]
        self.blocks.add_blocks(n_blocks)
        self.version += 1

    def view(self, slots: torch.Tensor | Sequence[int]) -> PagedView:
        """The cache as seen by a batch whose row b is the sequence in slot ``slots[b]``."""
        slots = slots.tolist() if isinstance(slots, torch.Tensor) else list(slots)
        tables = self.tables(slots)
        width = len(tables[0]) if tables else 0
        return PagedView(self, torch.tensor(tables, dtype=torch.long, device=self.device).view(len(slots), width))

    def tables(self, slots: Sequence[int], width: int | None = None) -> list[list[int]]:
        """The block tables of ``slots``, padded with the scratch block to ``width`` (default: the longest)."""
        tables = [self.blocks.tables[s] for s in slots]
        width = max(map(len, tables), default=0) if width is None else width
        return [t + [0] * (width - len(t)) for t in tables]  # past a row's blocks: the scratch block

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.kv) + sum(t.nbytes for t in self.pe)

    @property
    def bytes_per_block(self) -> int:
        return self.nbytes // self.blocks.n_blocks


class PagedView:
    """A batch's view of the paged cache through its block table (B, W): position p of row b lives at
    block ``table[b, p // Bs]``, offset ``p % Bs``. Positions past a row's blocks (the padding of a batch of
    different lengths) map to the scratch block 0: written there, never read unmasked."""

    def __init__(self, cache: PagedKVCache, table: torch.Tensor, span: int | None = None):
        """``span``: keys read per row (see ``CacheView``); the table must then cover it."""
        if span is not None and blocks_for(span, cache.block_size) > table.shape[1]:
            raise ValueError(f"a span of {span} keys needs {blocks_for(span, cache.block_size)} blocks per row; "
                             f"the table has {table.shape[1]}")
        self.cache, self.table, self.span = cache, _OnDevice(table), span

    def _table(self, width: int, device: torch.device) -> torch.Tensor:
        table = self.table.on(device)
        if width > table.shape[1]:
            table = torch.nn.functional.pad(table, (0, width - table.shape[1]), value=0)
            self.table = _OnDevice(table)
        return table

    def write(self, layer: int, positions: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor) -> None:
        bs = self.cache.block_size
        # a fixed span: the table already covers every position (and reading the furthest one would sync)
        width = blocks_for(self.span, bs) if self.span else int(positions.max()) // bs + 1
        table = self._table(width, positions.device)
        block = table.gather(1, positions // bs)  # (B, T)
        offset = positions % bs  # (B, T)
        self.cache.kv[layer][block, offset] = kv.to(self.cache.dtype)
        self.cache.pe[layer][block, offset] = pe.to(self.cache.dtype)

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = blocks_for(length, self.cache.block_size)
        kv_l, pe_l = self.cache.kv[layer], self.cache.pe[layer]
        table = self._table(n, kv_l.device)[:, :n]  # (B, n)
        B = table.shape[0]
        kv = kv_l[table].view(B, -1, kv_l.shape[-1])[:, :length]  # (B, S, C)
        pe = pe_l[table].view(B, -1, pe_l.shape[-1])[:, :length]  # (B, S, R)
        return kv, pe
