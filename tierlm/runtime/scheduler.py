"""Continuous batching: requests join and leave the running batch at every step.

A ``Scheduler`` owns a model, a paged KV cache and two queues, waiting (FIFO) and running. One ``step()``:

1. drops cancelled requests: their blocks go back to the pool at once;
2. admits waiting requests, oldest first, while the batch has room and the pool can promise each its whole
   budget (prompt + max_tokens, capped by the context), so a running request never runs out of memory;
3. runs one prefill pass over the newly admitted (their first token) and one decode pass over the others;
4. hands each request its token event through the request's sink.

Every running sequence advances by one token per step, whatever else is in the batch. ``generate_batch``
drives a scheduler step by step from the caller's thread; the HTTP server runs one in a thread of its own
(``start``), submitting and cancelling from the event loop.

If a forward pass raises (a fault, an out-of-memory error), the requests in that pass get a
``GenerationFailed`` and the scheduler goes on with the next step.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass, field

from tierlm.errors import RequestError, TierlmError
from tierlm.runtime.generate import Sequence, Stats, TokenEvent, decode, make_sequence, next_tokens, prefill
from tierlm.runtime.graphs import DecodeGraphs
from tierlm.runtime.kv_cache import (CacheFullError, PagedKVCache, blocks_for, free_memory_bytes,
                                     kv_bytes_per_token)
from tierlm.runtime.sampling import SamplingParams

log = logging.getLogger("tierlm.scheduler")

BLOCK_SIZE = 16  # tokens per KV block: small enough that a sequence wastes < 16 tokens of memory


class QueueFullError(TierlmError):
    """The waiting queue is at its limit; the client should retry later (HTTP 429)."""


class GenerationFailed(TierlmError):
    """A request's generation failed after it was admitted (delivered to its sink, not raised)."""


class SchedulerEvents:
    """Hooks the scheduler calls from its thread (the server's metrics implement them). No-ops by default."""

    def prompt(self, request: Request) -> None:
        """A request's prompt was prefilled."""

    def first_token(self, request: Request, ttft_s: float) -> None:
        """A request got its first token, ``ttft_s`` after it arrived."""

    def next_token(self, request: Request, gap_s: float) -> None:
        """A request got another token, ``gap_s`` after its previous one."""

    def finished(self, request: Request, reason: str) -> None:
        """A request left: reason "stop", "length", "cancelled" or "error"."""


Sink = Callable[["TokenEvent | GenerationFailed"], None]


@dataclass(eq=False)
class Request:
    """One sequence to generate. Built by ``Scheduler.submit``; events go to ``sink`` (called from the
    scheduler's thread), the last one with ``finish_reason`` set, or a ``GenerationFailed``."""

    id: int
    index: int  # ``TokenEvent.seq`` of its events
    seq: Sequence
    budget: int  # tokens of KV cache it may use: prompt + max_tokens, capped by the context
    sink: Sink | None
    arrival: float = field(default_factory=time.perf_counter)
    state: str = "waiting"  # waiting | running | done
    cancelled: bool = False
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str | None = None  # stop | length | cancelled | error

    @property
    def prompt_ids(self) -> list[int]:
        return self.seq.prompt_ids

    @property
    def output_ids(self) -> list[int]:
        return self.seq.output_ids


class Scheduler:
    """Continuous batching over one model.

    ``max_batch``: sequences per step. ``max_waiting``: queue length past which ``submit`` raises
    ``QueueFullError`` (None: unbounded). ``ctx``: tokens per sequence, prompt and output (default and cap: the
    model's context). ``kv_tokens``: size of the KV block pool in tokens; None grows the pool on demand and
    admits by batch size alone (for ``generate_batch``). ``max_prefill_tokens``: prompt tokens admitted per
    step beyond the first request, so one step's prefill cannot stall the running batch for long.
    ``raise_errors``: re-raise a failed forward pass after failing its requests (synchronous callers).
    ``cuda_graphs``: replay decode steps from CUDA graphs where the model allows it (``runtime/graphs.py``).
    """

    def __init__(self, model, *, max_batch: int = 32, max_waiting: int | None = None, ctx: int | None = None,
                 kv_tokens: int | None = None, block_size: int = BLOCK_SIZE, max_prefill_tokens: int | None = 4096,
                 events: SchedulerEvents | None = None, stats: Stats | None = None, raise_errors: bool = False,
                 cuda_graphs: bool = True):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        cfg = model.config
        self.model = model
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.ctx = min(ctx or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_prefill_tokens = max_prefill_tokens
        self.events = events or SchedulerEvents()
        self.stats = stats if stats is not None else Stats()
        self.raise_errors = raise_errors
        self.growable = kv_tokens is None
        self.cache = PagedKVCache.for_tokens(cfg, kv_tokens or block_size * max_batch, model.dtype,
                                             model.layer_devices, block_size)
        self.graphs = DecodeGraphs.for_model(model, self.cache) if cuda_graphs else None
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._ids = itertools.count()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---------------------------------------------------------------------------------------- requests

    def submit(self, prompt_ids: Seq[int], params: SamplingParams, *, sink: Sink | None = None,
               index: int = 0) -> Request:
        """Validate and queue one sequence. Raises ``RequestError`` (bad prompt or parameters, or a budget the
        pool can never hold) or ``QueueFullError``."""
        return self.submit_many([prompt_ids], [params], sinks=[sink], indices=[index])[0]

    def submit_many(self, prompts: Seq[Seq[int]], params: Seq[SamplingParams], *,
                    sinks: Seq[Sink | None] | None = None, indices: Seq[int] | None = None) -> list[Request]:
        """Queue several sequences at once, or none of them (the choices of one HTTP request)."""
        sinks = sinks or [None] * len(prompts)
        indices = indices or range(len(prompts))
        vocab = self.model.config.vocab_size
        reqs = []
        for prompt, sp, sink, index in zip(prompts, params, sinks, indices):
            prompt = list(prompt)
            if any(not 0 <= t < vocab for t in prompt):
                bad = next(t for t in prompt if not 0 <= t < vocab)
                raise RequestError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
            rid = next(self._ids)
            seq = make_sequence(self.model, prompt, sp, rid, max_len=self.ctx)
            budget = min(len(prompt) + seq.params.max_tokens, self.ctx)
            if not self.growable and blocks_for(budget, self.cache.block_size) > self.cache.blocks.usable:
                held = self.cache.blocks.usable * self.cache.block_size
                raise RequestError(f"the prompt and max_tokens need {budget} tokens of KV cache; this server holds "
                                   f"{held}: lower max_tokens or shorten the prompt")
            reqs.append(Request(rid, index, seq, budget, sink))
        with self._cv:
            if self.max_waiting is not None and len(self.waiting) + len(reqs) > self.max_waiting:
                raise QueueFullError(
                    f"the server is busy: {len(self.waiting)} requests are waiting (limit {self.max_waiting}) "
                    f"behind {len(self.running)} running; retry later")
            self.waiting.extend(reqs)
            self._cv.notify_all()
        return reqs

    def cancel(self, request: Request) -> None:
        """Drop a request (its client went away): it leaves the queue now, or the batch at the next step,
        and its KV blocks go back to the pool. Its sink gets nothing more."""
        with self._cv:
            if request.state == "done":
                return
            request.cancelled = True
            if request.state == "waiting":
                self.waiting.remove(request)
                self._done(request, "cancelled")
            self._cv.notify_all()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_blocks_used(self) -> int:
        return self.cache.blocks.used

    @property
    def kv_blocks_total(self) -> int:
        return self.cache.blocks.usable

    # ---------------------------------------------------------------------------------------- one step

    def step(self) -> list[TokenEvent]:
        """Admit, prefill the new, decode the rest: every running request gets one token. Returns the events."""
        with self._cv:
            for r in [r for r in self.running if r.cancelled]:
                self._done(r, "cancelled")
            new = self._admit()
        old = [r for r in self.running if r.seq.output_ids]
        first = []  # (admission order, event): the events keep the order requests were admitted in
        for group in _prefill_groups(new):
            first += zip([new.index(r) for r in group], self._forward(group, prefill))
        events = [ev for _, ev in sorted(first, key=lambda pair: pair[0])]
        if old:
            events += self._forward(old, decode)
        return events

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        prefill_budget = self.max_prefill_tokens if self.max_prefill_tokens is not None else float("inf")
        blocks = self.cache.blocks
        while self.waiting and len(self.running) < self.max_batch:
            r = self.waiting[0]
            if admitted and len(r.prompt_ids) > prefill_budget:
                break
            if not self.growable and not blocks.can_admit(r.budget):
                break  # oldest first: a big request is not overtaken forever by small ones
            self.waiting.popleft()
            self.cache.admit(r.seq.slot, 0 if self.growable else r.budget)
            r.state = "running"
            self.running.append(r)
            admitted.append(r)
            prefill_budget -= len(r.prompt_ids)
        return admitted

    def _forward(self, reqs: list[Request], run) -> list[TokenEvent]:
        seqs = [r.seq for r in reqs]
        t0 = time.perf_counter()
        try:
            if self.growable:
                self._make_room(seqs, run is prefill)
            logits = prefill(self.model, self.cache, seqs) if run is prefill else \
                decode(self.model, self.cache, seqs, self.graphs)
            events = next_tokens(self.model, seqs, logits, [r.index for r in reqs])
        except Exception as e:  # the fault boundary: fail this pass's requests, keep serving the others
            log.exception("a %s pass over %d sequences failed", run.__name__, len(reqs))
            failure = GenerationFailed(f"generation failed: {type(e).__name__}: {e}")
            with self._cv:
                for r in reqs:
                    if r.state != "done":
                        self._done(r, "error", failure)
            if self.raise_errors:
                raise
            return []
        now = time.perf_counter()
        if run is prefill:
            self.stats.prefill_s += now - t0
            self.stats.prompt_tokens += sum(len(s.prompt_ids) for s in seqs)
            self.prompt_tokens_total += sum(len(s.prompt_ids) for s in seqs)
        else:
            self.stats.decode_s += now - t0
        self.stats.generated_tokens += len(events)
        self.generation_tokens_total += len(events)
        for r, ev in zip(reqs, events):
            self._deliver(r, ev, now)
        return events

    def _make_room(self, seqs: list[Sequence], is_prefill: bool) -> None:
        """Growable pool: add blocks until this pass's sequences fit (``ensure`` then only takes them)."""
        blocks = self.cache.blocks
        need = sum(max(blocks_for(len(s.prompt_ids) if is_prefill else s.length, blocks.block_size)
                       - len(blocks.tables[s.slot]), 0) for s in seqs)
        short = need - blocks.free
        if short > 0:
            self.cache.grow_pool(max(short, blocks.n_blocks))

    def _deliver(self, r: Request, ev: TokenEvent, now: float) -> None:
        if r.first_token_at is None:
            r.first_token_at = now
            self.events.prompt(r)
            self.events.first_token(r, now - r.arrival)
        else:
            self.events.next_token(r, now - r.last_token_at)
        r.last_token_at = now
        if ev.finish_reason:
            with self._cv:
                self._done(r, ev.finish_reason)
        if r.sink is not None and not r.cancelled:
            try:
                r.sink(ev)
            except Exception:  # a sink that cannot take events (its client is gone) ends its request
                log.exception("request %d: its sink failed; cancelling it", r.id)
                self.cancel(r)

    def _done(self, r: Request, reason: str, failure: GenerationFailed | None = None) -> None:
        """Retire ``r`` (caller holds the lock): out of the batch, blocks back to the pool, sink told of a failure."""
        if r.state == "running":
            self.running.remove(r)
            self.cache.release(r.seq.slot)
        r.state, r.finish_reason = "done", reason
        self.events.finished(r, reason)
        if failure is not None and r.sink is not None and not r.cancelled:
            try:
                r.sink(failure)
            except Exception:
                log.exception("request %d: its sink failed", r.id)

    # ---------------------------------------------------------------------------------------- thread

    def start(self) -> Scheduler:
        """Run steps in a background thread whenever there is work."""
        self._thread = threading.Thread(target=self._loop, name="tierlm-scheduler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.busy:
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a bug outside the model step: fail what is in flight rather than hang
                log.exception("a scheduler step failed")
                failure = GenerationFailed(f"generation failed: {type(e).__name__}: {e}")
                with self._cv:
                    for r in list(self.running):
                        self._done(r, "error", failure)

    def stop(self, message: str = "the server is shutting down") -> None:
        """Stop the thread after its current step; requests still queued or running get a ``GenerationFailed``."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        failure = GenerationFailed(message)
        with self._cv:
            for r in [*self.waiting, *self.running]:
                if r in self.waiting:
                    self.waiting.remove(r)
                self._done(r, "error", failure)


def _prefill_groups(reqs: list[Request]) -> list[list[Request]]:
    """Split new requests into prefill passes whose right-padding at most doubles the tokens computed: a long
    prompt is not made to pad every short one joining with it."""
    groups: list[list[Request]] = []
    total = 0
    for r in sorted(reqs, key=lambda r: -len(r.prompt_ids)):  # each group's first request is its longest
        n = len(r.prompt_ids)
        if groups and len(groups[-1][0].prompt_ids) * (len(groups[-1]) + 1) <= 2 * (total + n):
            groups[-1].append(r)
            total += n
        else:
            groups.append([r])
            total = n
    return groups


def kv_pool_tokens(model, max_batch: int, ctx: int, memory_fraction: float = 0.9) -> int:
    """Tokens of KV cache for a server: room for ``max_batch`` sequences of ``ctx`` tokens, or as many tokens
    as ``memory_fraction`` of the device's free memory holds, whichever is less."""
    per_token = kv_bytes_per_token(model.config, model.dtype)
    fits = int(free_memory_bytes(model.device) * memory_fraction) // per_token
    tokens = min(max_batch * ctx, fits)
    if tokens < ctx:
        raise CacheFullError(
            f"the KV cache of one {ctx}-token sequence needs {ctx * per_token / 2**20:.0f} MiB but only "
            f"{fits * per_token / 2**20:.0f} MiB are free on {model.device}: lower --ctx")
    return tokens
