"""Routed experts served from three tiers: the compute device, host RAM, and disk (memory-mapped).

One ``TieredExperts`` replaces a layer's experts. Each expert's three matrices live in one tier:

- ``device``: in a fixed set of slots on the layer's compute device (a GPU, or the CPU when there is none). The
  slots are a cache: the plan fills them with the hottest experts, and an expert used often enough from a
  slower tier replaces the coldest one (scores count uses with exponential decay, so both frequency and recency
  count).
- ``ram``: host memory (pinned when a GPU is present). Computed on the CPU for a few tokens; copied into a
  device slot when a batch is large enough that the copy pays for itself.
- ``disk``: byte ranges of the checkpoint (and a read-only view of its memory map). The moment this layer's
  router has chosen them, its disk experts are read with large positional reads (``os.preadv``) on a few
  threads, all at once (the disk serves them in parallel, with no page-fault-sized reads), into a small pool of
  reusable host buffers; they are computed last, after the device and RAM experts, so the reads overlap that
  work. The next layer's likely experts are hinted to the kernel with ``posix_fadvise(WILLNEED)``, guessing
  from the next router on this layer's input and from the previous token's choices. A wrong guess costs disk
  bandwidth, the scarcest thing when experts live on disk, so each layer measures how many of the experts
  hinted to it were then used (decayed counts) and takes no more hints while that precision is under
  ``PREFETCH_MIN_PRECISION``, with one probing round every ``PREFETCH_PROBE_EVERY`` steps to notice when
  guessing starts to pay (uniformly random routing, for one, can never be guessed).

On a GPU, with Q4_K/Q6_K/Q8_0/Q5_0 weights and a decode-sized batch, the device-resident experts run as one
fused MoE launch over the slots (``kernels.moe.moe_quant``), started before the CPU works on the host experts.

Every byte moved between tiers is a visible line below (``copy_``, ``.to(``) and is counted in ``TierStats``.

Glossary: E experts, S device slots, I expert intermediate size, D hidden, RB bytes per weight row,
N tokens, K experts per token.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tierlm.kernels.cpu_quant import TYPES as CPU_TYPES
from tierlm.kernels.cpu_quant import cpu_quant_matmul
from tierlm.kernels.moe import DEFAULT as MOE_DEFAULT
from tierlm.kernels.moe import moe_quant
from tierlm.kernels.q6k_layout import align_, aligns
from tierlm.kernels.quant_matmul import FUSED_TYPES, quant_matmul
from tierlm.plan.memory import STAGING_EXPERTS_PER_TOPK
from tierlm.runtime.placement import CPU_ROWS
from tierlm.weights.ggml_types import GGMLType

TIERS = ("device", "ram", "disk")
PREFETCH_MIN_PRECISION = 0.5  # hints kept only while at least half of the hinted experts are then used
PREFETCH_WARMUP = 32  # experts hinted to a layer (in all) before its precision is trusted
PREFETCH_PROBE_EVERY = 16  # steps between probing rounds while hints are off
PREFETCH_DECAY = 0.98  # per step, on the hinted and used counts


@dataclass
class TierStats:
    """Counters shared by all layers: expert uses ("hits") and bytes read per tier, and tokens decoded."""

    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    bytes_read: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    promotions: int = 0
    bytes_promoted: int = 0
    prefetched: int = 0  # disk experts hinted to the kernel ahead of use
    prefetch_used: int = 0  # ... of which the layer then used
    bytes_prefetched: int = 0  # bytes those hints asked the disk for
    tokens: int = 0
    oom_events: int = 0

    def reset(self) -> None:
        """Zero every counter (e.g. after a warm-up)."""
        self.__init__()

    def as_dict(self) -> dict:
        per_token = {t: self.bytes_read[t] / self.tokens for t in TIERS} if self.tokens else dict.fromkeys(TIERS, 0.0)
        total = sum(self.hits.values()) or 1
        return {"hits": dict(self.hits), "hit_rate": {t: self.hits[t] / total for t in TIERS},
                "bytes_read": dict(self.bytes_read), "bytes_per_token": per_token, "promotions": self.promotions,
                "bytes_promoted": self.bytes_promoted, "prefetched": self.prefetched,
                "prefetch_used": self.prefetch_used, "bytes_prefetched": self.bytes_prefetched, "tokens": self.tokens,
                "oom_events": self.oom_events}


@dataclass
class HostExpert:
    """One expert's gate/up/down bytes outside the device: RAM tensors or memory-map views (disk)."""

    tier: str  # "ram" or "disk"
    mats: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (I, RB), (I, RB), (D, RB) uint8 on the CPU
    extents: tuple[tuple[int, int, int], ...] = ()  # disk: (fd, offset, nbytes) per matrix, for prefetching

    @property
    def nbytes(self) -> int:
        return sum(m.numel() for m in self.mats)


def pread_into(fd: int, offset: int, buf: torch.Tensor) -> None:
    """Fill ``buf`` (a CPU uint8 tensor) with the file's bytes from ``offset``, looping over short reads."""
    view = memoryview(buf.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at byte {offset + done} of a checkpoint file (truncated since loading?)")
        done += n


class DiskReader:
    """Reads disk-tier experts into reusable host buffers on a few threads (reads release the GIL).

    One reader serves every layer (layers run one after another), so the buffers held at once are about one
    layer's disk experts: K experts per token, a few MB to tens of MB each.
    """

    def __init__(self, workers: int = 8):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tierlm-disk")
        self.free: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}

    def submit(self, h: HostExpert) -> tuple[tuple, tuple[torch.Tensor, ...], list[Future]]:
        key = tuple(tuple(m.shape) for m in h.mats)
        free = self.free.setdefault(key, [])
        bufs = free.pop() if free else tuple(torch.empty(m.shape, dtype=torch.uint8) for m in h.mats)
        futs = [self.pool.submit(pread_into, fd, off, b) for (fd, off, _), b in zip(h.extents, bufs)]
        return key, bufs, futs

    def release(self, key: tuple, bufs: tuple[torch.Tensor, ...]) -> None:
        self.free[key].append(bufs)


_reader: DiskReader | None = None


def disk_reader() -> DiskReader:
    global _reader
    if _reader is None:
        _reader = DiskReader()
    return _reader


class TieredExperts(nn.Module):
    def __init__(self, layer: int, types: tuple[GGMLType, GGMLType, GGMLType], n_experts: int, dim: int,
                 inter: int, device: torch.device, slots: int, stats: TierStats, row_bytes: tuple[int, int, int],
                 gpu_batch_threshold: int = 2 * CPU_ROWS, decay: float = 0.95):
        super().__init__()
        self.layer, self.types, self.n_experts, self.dim, self.inter = layer, types, n_experts, dim, inter
        self.device, self.stats = torch.device(device), stats
        rb_g, rb_u, rb_d = row_bytes
        self.register_buffer("slot_gate", torch.empty(slots, inter, rb_g, dtype=torch.uint8, device=device))
        self.register_buffer("slot_up", torch.empty(slots, inter, rb_u, dtype=torch.uint8, device=device))
        self.register_buffer("slot_down", torch.empty(slots, dim, rb_d, dtype=torch.uint8, device=device))
        self.slot_of = [-1] * n_experts  # expert → device slot, or -1
        self.expert_in = [-1] * slots  # slot → expert, or -1
        self.slot_map = torch.full((n_experts,), -1, dtype=torch.int64, device=device)  # slot_of, on the device
        self.fused = self.device.type == "cuda" and all(t in FUSED_TYPES for t in types)
        # Q6_K experts in the slots of a GPU are held in the aligned layout (kernels.q6k_layout), converted there
        # as they are copied in; RAM and disk keep GGUF's
        self.aligned = self.device.type == "cuda" and aligns(types, (dim, dim, inter))
        # hot host experts are copied into the slots: on a GPU only; with no GPU the slots are host memory too
        self.promotes = self.device.type == "cuda"
        self.host: dict[int, HostExpert] = {}
        self.score = [0.0] * n_experts
        self.decay, self.gpu_batch_threshold = decay, gpu_batch_threshold
        self.last_ids: set[int] = set()
        self.next: TieredExperts | None = None  # the next MoE layer's experts, for prefetching
        self.next_gate: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.counts_tokens = False  # the first MoE layer counts the tokens that pass through
        self.has_disk = False  # whether any expert lives on disk (put_host): prefetching is pointless otherwise
        self.hinted: set[int] = set()  # disk experts hinted for this layer's next step
        self.pf_issued = self.pf_used = 0.0  # decayed counts of hinted experts and of those then used
        self.pf_total = self.pf_steps = 0  # hinted experts ever; steps

    # ---- filling ------------------------------------------------------------------------------------------
    def put_device(self, e: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        slot = self.expert_in.index(-1)
        self._write_slot(slot, e, gate, up, down)

    def put_host(self, e: int, expert: HostExpert) -> None:
        self.host[e] = expert
        self.has_disk = self.has_disk or expert.tier == "disk"

    def _write_slot(self, slot: int, e: int, gate, up, down) -> None:
        self.slot_gate[slot].copy_(gate, non_blocking=True)  # host → device copy (or a device move)
        self.slot_up[slot].copy_(up, non_blocking=True)
        self.slot_down[slot].copy_(down, non_blocking=True)
        if self.aligned:  # in place, on the device, after the copies (same stream)
            for t, m in zip(self.types, (self.slot_gate, self.slot_up, self.slot_down)):
                if t == GGMLType.Q6_K:
                    align_(m[slot])
        self.slot_of[e], self.expert_in[slot] = slot, e
        self._sync_slot_map()

    def _sync_slot_map(self) -> None:
        if self.fused:
            self.slot_map.copy_(torch.tensor(self.slot_of, dtype=torch.int64), non_blocking=False)

    @property
    def expert_bytes(self) -> int:
        return self.slot_gate[0].numel() + self.slot_up[0].numel() + self.slot_down[0].numel() \
            if self.slot_gate.shape[0] else sum(h.nbytes for h in self.host.values()) // max(len(self.host), 1)

    # ---- compute ------------------------------------------------------------------------------------------
    def _run(self, x: torch.Tensor, gate, up, down, aligned: bool = False) -> torch.Tensor:
        """One expert; ``aligned``: its Q6_K matrices are a device slot's, in the aligned layout."""
        g = quant_matmul(x, gate, self.types[0], self.dim, aligned=aligned)
        u = quant_matmul(x, up, self.types[1], self.dim, aligned=aligned)
        return quant_matmul(F.silu(g) * u, down, self.types[2], self.inter, aligned=aligned)

    def _run_host(self, x: torch.Tensor, gate, up, down) -> torch.Tensor:
        """An expert in RAM or on disk, on the CPU. With a GPU model the CPU kernel takes int8 activations
        (llama.cpp's CPU arithmetic, ~2x faster than float32): the GPU experts do not compute in float32
        either. With a CPU model every tier computes the same float32 way, so placement changes no bit."""
        if self.device.type != "cuda" or not all(t in CPU_TYPES for t in self.types):
            return self._run(x, gate, up, down)
        if x.shape[0] > CPU_ROWS:  # the CPU kernel's rows per call; beyond, quant_matmul would dequantize
            return torch.cat([self._run_host(c, gate, up, down) for c in x.split(CPU_ROWS)])
        g = cpu_quant_matmul(x, gate, self.types[0], self.dim, mode="q8")
        u = cpu_quant_matmul(x, up, self.types[1], self.dim, mode="q8")
        return cpu_quant_matmul(F.silu(g) * u, down, self.types[2], self.inter, mode="q8")

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), ids/weights (N, K) → (N, D) float32. Device experts are launched first so that, on a GPU,
        they run while the CPU computes the host experts."""
        N, K = ids.shape
        if self.counts_tokens:
            self.stats.tokens += N
        self._prefetch_next(x)
        flat = ids.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        used = {e for e, n in enumerate(counts) if n}
        self._score_hints(used)
        # this layer's disk experts, read now, in parallel: all of them at decode; a prefill batch that touches
        # most experts reads through a window of the staging RAM the planner reserves (2 K experts)
        on_disk = [e for e, n in enumerate(counts) if n and e in self.host and self.host[e].tier == "disk"
                   and self.host[e].extents]
        todo = deque(e for e in on_disk if self.slot_of[e] < 0)
        reads: dict[int, tuple] = {}

        def top_up() -> None:
            while todo and len(reads) < STAGING_EXPERTS_PER_TOPK * K:
                e = todo.popleft()
                if self.slot_of[e] < 0:  # not promoted meanwhile
                    reads[e] = disk_reader().submit(self.host[e])

        top_up()
        is_read = set(on_disk)
        kept: tuple[int, tuple] | None = None  # the hottest disk expert computed this step and its read, for promotion
        fused = self.fused and len(self.expert_in) > 0 and N * K < MOE_DEFAULT.sorted_min_pairs
        token, w = order // K, weights.flatten()[order]
        out = torch.zeros(N, self.dim, dtype=torch.float32, device=x.device)
        host_work, start = [], 0
        # On the CPU every tier computes the same float32 way, so the outputs are summed in expert order (held until
        # the end: up to N·K·D floats) and any placement, promotions included, gives the same bits. On a GPU the
        # tiers' arithmetic differs anyway (int8 activations on the CPU), so each output is added at once.
        parts: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if x.device.type == "cpu" else None

        def add(e: int, sel: torch.Tensor, y: torch.Tensor) -> None:
            if parts is None:
                out.index_put_((sel,), y, accumulate=True)
            else:
                parts[e] = sel, y

        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel, we = token[start:start + n], w[start:start + n, None]
            start += n
            slot = self.slot_of[e]
            if slot < 0 and n >= self.gpu_batch_threshold and self.device.type == "cuda":
                # a big batch: copying the expert in beats computing it on the CPU; no expert routed in this
                # step is evicted (the fused launch below reads the slots of all of them)
                slot = self._promote_read(e, reads, used) if e in is_read else self._promote(e, keep=used)
            if slot >= 0:
                self._count(e, "device", n)
                if not fused:
                    y = self._run(x[sel], self.slot_gate[slot], self.slot_up[slot], self.slot_down[slot],
                                  self.aligned)
                    add(e, sel, y.float() * we)
            else:
                host_work.append((e, sel, we))
        if fused and len(host_work) < len(used):  # some experts are on the device
            # one launch pair for every device expert; an id whose expert is elsewhere maps to slot -1: no work
            out += moe_quant(x, self.slot_map[ids], weights.float(), self.slot_gate, self.slot_up, self.slot_down,
                             *self.types, aligned=self.aligned)
        host_work.sort(key=lambda w: w[0] in is_read)  # RAM first: the disk reads get time
        for e, sel, we in host_work:
            h = self.host[e]
            self._count(e, h.tier, len(sel))
            xs = x[sel].to("cpu", torch.float32)  # device → host: the tokens this expert needs
            mats = h.mats
            read = None
            if e in is_read:
                read = reads.pop(e) if e in reads else disk_reader().submit(h)  # past the window: read it now
                key, mats, futs = read
                for f in futs:
                    f.result()  # disk → RAM buffer
            y = self._run_host(xs, *mats).to(x.device, non_blocking=True)  # host → device: its outputs
            add(e, sel, y.float() * we)
            if read is not None:  # y is the kernel's own tensor: the buffer is free, unless kept for promotion
                if self.promotes and (kept is None or self.score[e] > self.score[kept[0]]):
                    kept, read = (e, read), kept and kept[1]
                if read is not None:
                    disk_reader().release(*read[:2])
                top_up()
        for e in sorted(parts or ()):
            out.index_put_((parts[e][0],), parts[e][1], accumulate=True)
        for key, bufs, futs in reads.values():  # read but not computed here (promoted meanwhile)
            for f in futs:
                f.result()
            disk_reader().release(key, bufs)
        self.last_ids = used
        self._age_and_maybe_promote(used, {kept[0]: kept[1][1]} if kept else {})
        if kept:
            disk_reader().release(*kept[1][:2])
        return out

    def _promote_read(self, e: int, reads: dict[int, tuple], keep: set[int]) -> int:
        """Promote disk expert e from this step's read of it (started now if it was past the window)."""
        if self._victim(keep) < 0:
            return -1
        key, bufs, futs = reads.pop(e) if e in reads else disk_reader().submit(self.host[e])
        for f in futs:
            f.result()
        slot = self._promote(e, bufs, keep)
        disk_reader().release(key, bufs)
        return slot

    def _count(self, e: int, tier: str, n_tokens: int) -> None:
        self.stats.hits[tier] += 1
        self.stats.bytes_read[tier] += self.expert_bytes
        self.score[e] += 1.0

    # ---- cache policy --------------------------------------------------------------------------------------
    def _victim(self, keep: set[int] = frozenset()) -> int:
        """The device slot holding the expert with the lowest score (an empty slot first), never one of ``keep``;
        -1 when there is none."""
        if -1 in self.expert_in:
            return self.expert_in.index(-1)
        return min((s for s in range(len(self.expert_in)) if self.expert_in[s] not in keep),
                   key=lambda s: self.score[self.expert_in[s]], default=-1)

    def _promote(self, e: int, mats: tuple[torch.Tensor, ...] | None = None, keep: set[int] = frozenset()) -> int:
        """Copy expert e into the device, evicting the coldest resident (which goes back to its host tier).
        A disk expert is copied from ``mats``, the buffers it was just read into: its memory-map view would
        fault its pages in one at a time, synchronously (tens of ms per expert)."""
        if not len(self.expert_in) or e not in self.host:
            return -1
        if mats is None:
            if self.host[e].tier == "disk" and self.host[e].extents:
                return -1
            mats = self.host[e].mats
        slot = self._victim(keep)
        if slot < 0:
            return -1
        old = self.expert_in[slot]
        if old >= 0:
            self.slot_of[old] = -1  # its bytes still live in RAM or on disk: eviction copies nothing back
        self._write_slot(slot, e, *mats)
        self.stats.promotions += 1
        self.stats.bytes_promoted += self.host[e].nbytes
        return slot

    def _age_and_maybe_promote(self, used: set[int], staged: dict[int, tuple[torch.Tensor, ...]]) -> None:
        """Decay all scores; if the hottest host expert of this step (``used``) now clearly outscores the coldest
        resident, swap them. Disk experts are candidates only when this step read them (``staged``: expert → its
        read buffers)."""
        self.score = [s * self.decay for s in self.score]
        if not len(self.expert_in) or not self.promotes:
            return
        hot = max((e for e in used if self.slot_of[e] < 0
                   and (e in staged or self.host[e].tier != "disk" or not self.host[e].extents)),
                  key=lambda e: self.score[e], default=None)
        if hot is None:
            return
        victim = self._victim(used)  # an expert of this step is hot, whatever its decayed score says
        if victim < 0:
            return
        cold = self.expert_in[victim]
        if cold < 0 or self.score[hot] > 2.0 * self.score[cold] + 1.0:  # hysteresis: no ping-pong
            self._promote(hot, staged.get(hot), used)

    def shrink(self, keep: int) -> int:
        """Give up device slots (after an out-of-memory error): keep the ``keep`` hottest. Returns slots freed."""
        n = len(self.expert_in)
        if keep >= n:
            return 0
        order = sorted(range(n), key=lambda s: -self.score[self.expert_in[s]] if self.expert_in[s] >= 0 else 1e30)
        kept = order[:keep]
        for s in order[keep:]:
            if self.expert_in[s] >= 0:
                self.slot_of[self.expert_in[s]] = -1
        idx = torch.tensor(kept, dtype=torch.long, device=self.slot_gate.device)
        self.slot_gate = self.slot_gate[idx].clone()
        self.slot_up = self.slot_up[idx].clone()
        self.slot_down = self.slot_down[idx].clone()
        self.expert_in = [self.expert_in[s] for s in kept]
        for s, e in enumerate(self.expert_in):
            if e >= 0:
                self.slot_of[e] = s
        self._sync_slot_map()
        return n - keep

    # ---- prefetch -------------------------------------------------------------------------------------------
    def _prefetch_next(self, x: torch.Tensor) -> None:
        nxt = self.next
        if nxt is None or not nxt.has_disk or not nxt.takes_hints():
            return  # no guessing (no router run, no device sync) when it would not be used
        guess = set(nxt.last_ids)
        if self.next_gate is not None:
            x = x.to(self.next_gate.weight.device)  # the next layer may sit on the next GPU
            ids, _ = self.next_gate(x)  # the next router on this layer's input: a cheap guess of its choices
            guess.update(ids.flatten().tolist())
        nxt.prefetch(guess)

    @property
    def prefetch_precision(self) -> float:
        """Decayed share of the experts hinted to this layer that it then used (1.0 before any hint)."""
        return self.pf_used / self.pf_issued if self.pf_issued else 1.0

    def takes_hints(self) -> bool:
        """Whether hints for this layer currently pay: during warm-up, while precise enough, or when probing."""
        if self.pf_total < PREFETCH_WARMUP or self.prefetch_precision >= PREFETCH_MIN_PRECISION:
            return True
        return self.pf_steps % PREFETCH_PROBE_EVERY == 0

    def _score_hints(self, used: set[int]) -> None:
        self.pf_issued *= PREFETCH_DECAY
        self.pf_used *= PREFETCH_DECAY
        self.pf_steps += 1
        if self.hinted:
            hit = len(self.hinted & used)
            self.pf_issued += len(self.hinted)
            self.pf_total += len(self.hinted)
            self.pf_used += hit
            self.stats.prefetch_used += hit
            self.hinted = set()

    def prefetch(self, experts: set[int]) -> None:
        """Ask the kernel to read these experts' disk pages ahead (asynchronous; a no-op for other tiers, and
        while this layer's hints have not been paying, see ``takes_hints``)."""
        if not self.takes_hints():
            return
        for e in experts:
            h = self.host.get(e)
            if h is None or h.tier != "disk" or self.slot_of[e] >= 0 or e in self.hinted:
                continue
            for fd, off, n in h.extents:
                os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
            self.hinted.add(e)
            self.stats.prefetched += 1
            self.stats.bytes_prefetched += h.nbytes


def link_layers(model) -> list[TieredExperts]:
    """Chain the tiered layers so each prefetches for the next, and let the first count tokens."""
    tiered = [layer.mlp.experts for layer in model.model.layers
              if isinstance(getattr(layer.mlp, "experts", None), TieredExperts)]
    gates = {layer.mlp.experts: layer.mlp.gate for layer in model.model.layers
             if isinstance(getattr(layer.mlp, "experts", None), TieredExperts)}
    for a, b in zip(tiered, tiered[1:]):
        a.next, a.next_gate = b, gates[b]
    if tiered:
        tiered[0].counts_tokens = True
    return tiered


_fds: dict[str, int] = {}
_fd_lock = threading.Lock()


def file_descriptor(path: str) -> int:
    """One read-only descriptor per checkpoint file, for the disk reader and prefetch hints. It is marked
    for random access: the kernel's readahead would otherwise extend every expert read by up to the
    device's readahead window (8 MB on some virtual disks), reading the neighbouring expert for nothing."""
    with _fd_lock:
        if path not in _fds:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            _fds[path] = fd
        return _fds[path]
