"""Decode steps replayed from CUDA graphs.

At batch 1, a DeepSeek-V3 decode step is hundreds of small launches: the quantized products, and around them the
norms, RoPE, the attention's einsums, the router's top-k. Launched eagerly from Python, each costs the host more
than it costs the GPU, and the attention's span (``int(positions.max())``) syncs once per layer, so the GPU idles
between launches. Here a step is captured once per (batch size, span) and then replayed: one launch from the host.

What changes from step to step goes through one small int64 tensor, copied in before the replay: each row's token,
position, and block table (paged cache) or slot (contiguous cache). The keys a row reads are a fixed span, a
multiple of ``SPAN_STEP``, masked past the row's position, so one graph serves ``SPAN_STEP`` consecutive steps.
The logits are those of the eager step up to the order of floating-point sums over the padded span.

A step is captured where it can be: every layer on one CUDA device, and routed experts that the fused MoE kernels
decode (``QuantRoutedExperts`` of fused types). Expert tiers on the host, per-expert dispatch (it syncs) and
layers spread over several GPUs run eagerly, as does everything with ``TIERLM_CUDA_GRAPHS=0``.

Glossary: B sequences in the step, W block-table width, V vocabulary.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tierlm.kernels.moe import DEFAULT as MOE_DEFAULT
from tierlm.runtime.kv_cache import KVCache, PagedKVCache, PagedView, SlotView, blocks_for

log = logging.getLogger("tierlm")

SPAN_STEP = 256  # keys read per row are a multiple of this: one graph per SPAN_STEP steps of a sequence
MAX_BATCH = 16  # sequences per captured step; larger batches run eagerly (their launches cost relatively less)
MAX_GRAPHS = 16  # captured steps kept (least recently used dropped first); they share one memory pool


def graph_blocker(model) -> str | None:
    """Why ``model``'s decode steps cannot be replayed from CUDA graphs, or None when they can."""
    from tierlm.model.quantized import QuantRoutedExperts

    if os.environ.get("TIERLM_CUDA_GRAPHS", "1") == "0":
        return "TIERLM_CUDA_GRAPHS=0"
    if model.device.type != "cuda":
        return f"the model runs on {model.device.type}, not a CUDA device"
    if len(set(model.layer_devices)) > 1:  # the head sits with the last stage
        return "the layers span several devices"
    for i, layer in enumerate(model.module.model.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None and not (isinstance(experts, QuantRoutedExperts) and experts.fusable):
            return (f"layer {i}'s routed experts ({type(experts).__name__}) are not all decoded by the fused MoE "
                    "kernels, whose launches never wait on the host")
    return None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: torch.Tensor  # (B, 2 + W) int64: token, position, then the block table (paged) or the slot
    pick: torch.Tensor  # (B,) zeros: each row's one token (kept alive: the graph reads it at every replay)
    logits: torch.Tensor  # (B, V) float32, written by each replay
    finite: torch.Tensor  # (L,) bool, written by each replay


class DecodeGraphs:
    """Captured decode steps of one model over one KV cache (``KVCache`` or ``PagedKVCache``).

    ``step`` returns the logits, or None when the step is not one it replays (too many sequences, or capture
    failed once, which is logged): the caller then runs it eagerly. A cache that reallocates its storage
    (``version``) drops every graph, since they point into it."""

    def __init__(self, model, cache: KVCache | PagedKVCache, *, max_batch: int = MAX_BATCH,
                 span_step: int = SPAN_STEP, max_graphs: int = MAX_GRAPHS):
        self.model, self.cache = model, cache
        K = max(model.config.num_experts_per_tok, 1) if model.config.n_routed_experts else 1
        # the fused MoE decodes unsorted below sorted_min_pairs (token, expert) pairs; sorting takes other paths
        self.max_batch = min(max_batch, (MOE_DEFAULT.sorted_min_pairs - 1) // K)
        self.span_step, self.max_graphs = span_step, max_graphs
        self.paged = isinstance(cache, PagedKVCache)
        self.graphs: OrderedDict[tuple[int, int], _Graph] = OrderedDict()
        self.version = cache.version
        self.pool = torch.cuda.graph_pool_handle()
        self.failed: str | None = None  # why capturing stopped, once it failed
        self.captures = self.replays = 0

    @classmethod
    def for_model(cls, model, cache, **kwargs) -> DecodeGraphs | None:
        """A runner for ``model`` over ``cache``, or None (with the reason logged) when its steps cannot be
        captured."""
        reason = graph_blocker(model)
        if reason is not None:
            log.debug("decode steps run eagerly: %s", reason)
            return None
        return cls(model, cache, **kwargs)

    def step(self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor | None:
        """One decode step: row b feeds ``tokens[b]`` at ``positions[b]`` of the sequence in ``slots[b]`` (the
        cache already holds room for it: ``cache.ensure``). Returns logits (B, V) float32, or None."""
        B = len(slots)
        if self.failed or not 0 < B <= self.max_batch:
            return None
        if self.cache.version != self.version:
            self._drop_all()
            self.version = self.cache.version
        span = self._span(max(positions) + 1)
        rows = self._rows(slots, tokens, positions, span)
        key = (B, span)
        g = self.graphs.get(key)
        if g is None:
            g = self._capture(rows, span)
            if g is None:
                return None
            self.graphs[key] = g
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
            g.inputs.copy_(torch.tensor(rows, dtype=torch.long))  # one host-to-device copy
        g.graph.replay()
        self.replays += 1
        self.model.module.check_finite(g.finite, g.logits)
        return g.logits.clone()  # the graph's own buffer is rewritten by the next replay

    def _span(self, need: int) -> int:
        span = -(-need // self.span_step) * self.span_step
        return span if self.paged else min(span, self.cache.capacity)  # ensure() made capacity >= need

    def _rows(self, slots, tokens, positions, span: int) -> list[list[int]]:
        if self.paged:
            tables = self.cache.tables(slots, blocks_for(span, self.cache.block_size))
            return [[t, p, *table] for t, p, table in zip(tokens, positions, tables)]
        return [[t, p, s] for t, p, s in zip(tokens, positions, slots)]

    def _view(self, inputs: torch.Tensor, span: int) -> PagedView | SlotView:
        if self.paged:
            return PagedView(self.cache, inputs[:, 2:], span)
        return SlotView(self.cache, inputs[:, 2], span)

    def _capture(self, rows: list[list[int]], span: int) -> _Graph | None:
        """Run the step once eagerly on a side stream (compiles kernels, fills lazy caches; it writes the cache
        entries the replay rewrites), then capture it. The inputs hold this step's rows."""
        dev = self.model.device
        inputs = torch.tensor(rows, dtype=torch.long, device=dev)
        tokens, positions = inputs[:, :1], inputs[:, 1:2]
        view = self._view(inputs, span)
        pick = torch.zeros(len(rows), dtype=torch.long, device=dev)
        module = self.model.module
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        try:
            with torch.cuda.stream(side):
                module.run(tokens, positions, view, pick)  # another error here is the step's own: it propagates
        except torch.OutOfMemoryError as e:  # the eager step recovers from it (Model.step)
            return self._give_up(e)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        rng = torch.cuda.default_generators[dev.index if dev.index is not None else torch.cuda.current_device()]
        rng_before = rng.clone_state()
        try:
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                logits, finite = module.run(tokens, positions, view, pick)
        except (RuntimeError, torch.OutOfMemoryError) as e:  # a launch that waits on the host, or no memory
            # A capture that fails never ends the device's default generator's capture: every later draw from it
            # (torch.randn on the device, anywhere in the process) would raise. Its state from before is put back.
            rng.graphsafe_set_state(rng_before)
            return self._give_up(e)
        self.captures += 1
        return _Graph(graph, inputs, pick, logits, finite)

    def _drop_all(self) -> None:
        self.graphs.clear()
        # the pool dies with the last graph that used it: later captures need a new one
        self.pool = torch.cuda.graph_pool_handle()

    def _give_up(self, e: BaseException) -> None:
        self.failed = f"{type(e).__name__}: {e}".splitlines()[0]
        self._drop_all()
        torch.cuda.empty_cache()
        log.warning("decode steps run eagerly from now on: capturing one as a CUDA graph failed (%s)", self.failed)
