"""What the HTTP layer needs of the runtime: the loaded model, its scheduler thread, and an asyncio view of a
submitted request's events.

The scheduler runs in its own thread and calls each request's sink from there; ``Submission`` turns those
calls into an ``asyncio.Queue`` on the server's event loop (``call_soon_threadsafe``), so a handler awaits
events and cancels its requests when its client goes away.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tierlm.runtime.generate import TokenEvent
from tierlm.runtime.sampling import SamplingParams
from tierlm.runtime.scheduler import GenerationFailed, Request, Scheduler, SchedulerEvents, kv_pool_tokens

log = logging.getLogger("tierlm.serve")

# generation_config.json keys that become request defaults when a request leaves them out.
GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class Engine:
    """A loaded model served under ``name``; ``chat_template`` None means the checkpoint's own."""

    model: object
    scheduler: Scheduler
    name: str
    chat_template: str | None = None
    defaults: dict = field(default_factory=dict)
    # Set on shutdown: in-flight requests still running at this time (time.monotonic()) are cut off with an
    # error, so that their responses end cleanly before the server closes.
    deadline: float | None = None

    @classmethod
    def start(cls, model, *, name: str, max_batch: int, ctx: int | None, max_waiting: int | None,
              chat_template: str | None = None, events: SchedulerEvents | None = None) -> Engine:
        """Size the KV pool from free memory, start the scheduler thread."""
        if model.device.type == "cpu":
            # The event loop needs a core too: torch's worker threads spin while they wait, and when one of
            # them shares a core with the loop every parallel op stalls (measured: 20x slower decode steps on
            # 2 cores).
            torch.set_num_threads(max(1, min(torch.get_num_threads(), (os.cpu_count() or 2) - 1)))
        ctx = min(ctx or model.config.max_position_embeddings, model.config.max_position_embeddings)
        sched = Scheduler(model, max_batch=max_batch, max_waiting=max_waiting, ctx=ctx,
                          kv_tokens=kv_pool_tokens(model, max_batch, ctx), events=events)
        return cls(model, sched.start(), name, chat_template, generation_defaults(model))

    @property
    def ctx(self) -> int:
        return self.scheduler.ctx

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def submit(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams]) -> Submission:
        """Queue one sequence per (prompt, params) pair, choice i being the i-th. Raises ``RequestError`` or
        ``QueueFullError`` before anything is queued."""
        sub = Submission(self.scheduler, asyncio.get_running_loop())
        sub.requests = self.scheduler.submit_many(prompts, params, sinks=[sub.sink(i) for i in range(len(prompts))],
                                                  indices=list(range(len(prompts))))
        return sub

    def drain(self, seconds: float) -> None:
        """Give in-flight requests ``seconds`` to finish."""
        self.deadline = time.monotonic() + seconds

    def stop(self) -> None:
        self.scheduler.stop()


Item = tuple[int | None, "TokenEvent | GenerationFailed | None"]  # (choice, event); (None, None): cancelled


class Submission:
    """The events of one HTTP request's sequences, awaited on the event loop."""

    def __init__(self, scheduler: Scheduler, loop: asyncio.AbstractEventLoop):
        self.scheduler, self.loop = scheduler, loop
        self.queue: asyncio.Queue[Item] = asyncio.Queue()
        self.requests: list[Request] = []

    def sink(self, choice: int):
        def put(item: TokenEvent | GenerationFailed) -> None:  # called in the scheduler's thread
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (choice, item))

        return put

    async def next(self, timeout: float | None = None) -> Item | None:
        """The next (choice, event or failure); ``(None, None)`` once cancelled; None if ``timeout`` seconds pass
        without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def cancel(self) -> None:
        """Drop every sequence of this request that is still queued or running (idempotent). A handler still
        waiting in ``next`` wakes up with ``(None, None)``."""
        for r in self.requests:
            self.scheduler.cancel(r)
        self.queue.put_nowait((None, None))


def generation_defaults(model) -> dict:
    """Sampling defaults from the checkpoint's generation_config.json (absent or unreadable: none)."""
    try:
        cfg = json.loads((model.folder / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    out = {k: cfg[k] for k in GENERATION_DEFAULTS if isinstance(cfg.get(k), (int, float))
           and not isinstance(cfg.get(k), bool)}
    if cfg.get("do_sample") is False:  # HF: greedy whatever the temperature says
        out["temperature"] = 0.0
    return out
