"""Prometheus metrics, named in vLLM's style with a ``tierlm:`` prefix.

Counters and histograms are fed by the scheduler's hooks (``SchedulerEvents``, called from its thread);
gauges are read when /metrics is scraped: requests running and waiting, KV cache blocks, GPU memory per
device, and expert-cache hits per tier.

Expert-cache hook: ``Metrics.expert_stats`` is a callable returning running totals per tier,
``{tier: {"hits": int, "bytes_read": int}}`` (tiers "device", "ram", "disk": where routed experts were served
from). The server points it at the model's ``expert_stats`` (``runtime/experts.TierStats``) when its experts
are tiered; any other source of the same shape plugs in the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tierlm.runtime.scheduler import Request, Scheduler, SchedulerEvents

# Latency buckets (seconds) spanning a GPU's milliseconds to a CPU's or a cold disk tier's seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)
E2E_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)

ExpertStats = Callable[[], Mapping[str, Mapping[str, int]]]


class Metrics(SchedulerEvents):
    """One registry per server (not the process-global one), so several servers can live in one process."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("tierlm:prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("tierlm:generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("tierlm:request_success", "Sequences finished, by reason.", ["finished_reason"],
                                registry=r)
        self.ttft = Histogram("tierlm:time_to_first_token_seconds", "Arrival to first token, per sequence.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("tierlm:inter_token_latency_seconds", "Time between a sequence's tokens.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("tierlm:e2e_request_latency_seconds", "Arrival to last token, per sequence.",
                             buckets=E2E_BUCKETS, registry=r)
        self.scheduler: Scheduler | None = None
        self.expert_stats: ExpertStats | None = None
        r.register(_ScrapeTimeGauges(self))

    def bind(self, scheduler: Scheduler, expert_stats: ExpertStats | None = None) -> None:
        self.scheduler, self.expert_stats = scheduler, expert_stats

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # SchedulerEvents, called from the scheduler's thread (prometheus_client is thread-safe)
    def prompt(self, request: Request) -> None:
        self.prompt_tokens.inc(len(request.prompt_ids))

    def first_token(self, request: Request, ttft_s: float) -> None:
        self.generation_tokens.inc()
        self.ttft.observe(ttft_s)

    def next_token(self, request: Request, gap_s: float) -> None:
        self.generation_tokens.inc()
        self.itl.observe(gap_s)

    def finished(self, request: Request, reason: str) -> None:
        self.requests.labels(reason).inc()
        if request.last_token_at is not None:
            self.e2e.observe(request.last_token_at - request.arrival)


class _ScrapeTimeGauges:
    def __init__(self, metrics: Metrics):
        self.m = metrics

    def collect(self):
        s = self.m.scheduler
        running = GaugeMetricFamily("tierlm:num_requests_running", "Sequences in the running batch.")
        waiting = GaugeMetricFamily("tierlm:num_requests_waiting", "Sequences waiting for admission.")
        usage = GaugeMetricFamily("tierlm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).")
        used = GaugeMetricFamily("tierlm:kv_cache_used_blocks", "KV cache blocks held by sequences.")
        total = GaugeMetricFamily("tierlm:kv_cache_total_blocks", "KV cache blocks in the pool.")
        block = GaugeMetricFamily("tierlm:kv_cache_block_size_tokens", "Tokens per KV cache block.")
        running.add_metric([], s.num_running if s else 0)
        waiting.add_metric([], s.num_waiting if s else 0)
        n_used, n_total = (s.kv_blocks_used, s.kv_blocks_total) if s else (0, 0)
        used.add_metric([], n_used)
        total.add_metric([], n_total)
        usage.add_metric([], n_used / n_total if n_total else 0.0)
        block.add_metric([], s.cache.block_size if s else 0)
        yield from (running, waiting, usage, used, total, block)
        yield from self._experts()
        yield from self._gpu_memory(s)

    def _experts(self):
        hits = CounterMetricFamily("tierlm:expert_cache_hits", "Routed-expert uses served by each tier.",
                                   labels=["tier"])
        read = CounterMetricFamily("tierlm:expert_bytes_read", "Routed-expert bytes read from each tier.",
                                   labels=["tier"])
        stats = self.m.expert_stats() if self.m.expert_stats else {}
        for tier, counts in stats.items():
            hits.add_metric([tier], counts.get("hits", 0))
            read.add_metric([tier], counts.get("bytes_read", 0))
        yield from (hits, read)

    def _gpu_memory(self, s: Scheduler | None):
        used = GaugeMetricFamily("tierlm:gpu_memory_used_bytes", "Memory torch has allocated, per GPU.",
                                 labels=["device"])
        total = GaugeMetricFamily("tierlm:gpu_memory_total_bytes", "Memory of each GPU.", labels=["device"])
        if s is not None and s.model.device.type == "cuda":  # never initialize CUDA for a CPU server
            import torch

            for i in range(torch.cuda.device_count()):
                used.add_metric([f"cuda:{i}"], torch.cuda.memory_allocated(i))
                total.add_metric([f"cuda:{i}"], torch.cuda.get_device_properties(i).total_memory)
        yield from (used, total)
