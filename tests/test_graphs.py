"""Decode steps replayed from CUDA graphs (runtime/graphs.py), and the fixed key span they rest on."""

from types import SimpleNamespace

import pytest
import torch

import tierlm
from conftest import write_gguf_source
from tierlm.runtime.graphs import DecodeGraphs, graph_blocker
from tierlm.runtime.kv_cache import PagedKVCache, PagedView
from tierlm.runtime.sampling import SamplingParams
from tierlm.runtime.scheduler import Scheduler
from tierlm.weights.convert import convert

PROMPTS = [list(range(5, 26)), list(range(40, 47)), list(range(100, 133))]


@pytest.fixture(scope="module")
def q4km(tmp_path_factory):
    """The tiny GGUF model in Q4_K_M: its experts decode through the fused MoE kernels."""
    root = tmp_path_factory.mktemp("graphs")
    return convert(write_gguf_source(root / "hf", seed=5), root / "tiny-Q4_K_M.gguf", "Q4_K_M")[0]


def _prefilled(model, cache_kind: str):
    """Three prompts of different lengths prefilled into a cache of ``cache_kind``; returns (cache, positions)."""
    n = len(PROMPTS)
    if cache_kind == "paged":
        cache = PagedKVCache.for_tokens(model.config, 256, model.dtype, model.device, block_size=4)
        for slot, p in enumerate(PROMPTS):
            cache.admit(slot)
    else:
        cache = model.new_cache(n, 64)
    cache.ensure(range(n), [len(p) + 1 for p in PROMPTS])
    T = max(map(len, PROMPTS))
    tokens = torch.zeros(n, T, dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        tokens[b, : len(p)] = torch.tensor(p)
    dev = model.device
    positions = torch.arange(T)[None].expand(n, T)
    model.step(tokens.to(dev), positions.to(dev), cache.view(torch.arange(n, device=dev)))
    return cache, torch.tensor([[len(p)] for p in PROMPTS], device=dev)


@pytest.mark.parametrize("cache_kind", ["paged", "slots"])
def test_a_fixed_span_reads_what_the_exact_span_reads(tiny_ckpt, cache_kind):
    """A decode step whose rows read a fixed span of keys, past their positions, gives the logits of the step that
    reads exactly up to the furthest position: the keys past a row's position are masked, even when what sits
    there is huge (stale entries, the paged cache's scratch block)."""
    model = tierlm.load(tiny_ckpt, device="cpu")
    cache, positions = _prefilled(model, cache_kind)
    tokens = torch.tensor([[7], [8], [9]])
    slots = torch.arange(3)
    exact = model.step(tokens, positions, cache.view(slots), pick=torch.zeros(3, dtype=torch.long))
    span = 48
    for kv in cache.kv:  # everything past each row's position: garbage a missing mask would let through
        if cache_kind == "paged":
            kv[0] = 1e4  # the scratch block
        else:
            for b, p in enumerate(positions[:, 0].tolist()):
                kv[b, p + 1:] = 1e4
    if cache_kind == "paged":
        view = PagedView(cache, torch.tensor(cache.tables(range(3), span // cache.block_size)), span)
    else:
        cache.reserve(span)
        view = cache.view(slots, span)
    fixed = model.step(tokens, positions, view, pick=torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(fixed, exact, rtol=1e-5, atol=1e-5)


def test_a_span_past_the_cache_is_refused(tiny_ckpt):
    model = tierlm.load(tiny_ckpt, device="cpu")
    cache = model.new_cache(1, 32)
    with pytest.raises(ValueError, match="past the cache's capacity"):
        cache.view(torch.zeros(1, dtype=torch.long), 64)
    paged = PagedKVCache.for_tokens(model.config, 64, model.dtype, "cpu", block_size=4)
    with pytest.raises(ValueError, match="needs 4 blocks per row; the table has 2"):
        PagedView(paged, torch.zeros(1, 2, dtype=torch.long), 16)


def test_graph_blocker_names_what_keeps_steps_eager(tiny_ckpt, monkeypatch):
    model = tierlm.load(tiny_ckpt, device="cpu")
    assert "not a CUDA device" in graph_blocker(model)
    cuda = torch.device("cuda", 0)
    L = model.config.num_hidden_layers
    # the same modules, as if on one GPU: the HF checkpoint's experts go through per-expert dispatch, which syncs
    on_gpu = SimpleNamespace(device=cuda, layer_devices=[cuda] * L, module=model.module, config=model.config)
    assert "layer 1's routed experts (RoutedExperts)" in graph_blocker(on_gpu)
    spread = SimpleNamespace(**{**vars(on_gpu), "layer_devices": [cuda] * (L - 1) + [torch.device("cuda", 1)]})
    assert graph_blocker(spread) == "the layers span several devices"
    monkeypatch.setenv("TIERLM_CUDA_GRAPHS", "0")
    assert graph_blocker(on_gpu) == "TIERLM_CUDA_GRAPHS=0"


def test_a_cpu_scheduler_runs_eagerly(tiny_ckpt):
    model = tierlm.load(tiny_ckpt, device="cpu")
    assert Scheduler(model, max_batch=2).graphs is None


def _generate(model, graphs: bool, span_step: int = 16, max_tokens: int = 40):
    """Greedy continuations of PROMPTS through the scheduler, with a pool that starts too small (it grows,
    and the graphs pointing into it are dropped). Returns (token lists, the scheduler)."""
    sched = Scheduler(model, max_batch=len(PROMPTS), max_prefill_tokens=None, raise_errors=True, cuda_graphs=graphs,
                      block_size=4)
    if sched.graphs is not None:
        sched.graphs.span_step = span_step
    for i, p in enumerate(PROMPTS):
        sched.submit(p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), index=i)
    out = [[] for _ in PROMPTS]
    while sched.busy:
        for ev in sched.step():
            out[ev.seq].append(ev.token_id)
    return out, sched


@pytest.mark.gpu
@pytest.mark.parametrize("cache_kind", ["paged", "slots"])
def test_a_step_with_a_fixed_span_never_waits_on_the_device(q4km, cache_kind):
    """What a CUDA graph can capture: no device sync and no copy from pageable host memory in the step."""
    model = tierlm.load(q4km, device="cuda", dtype="bfloat16")
    cache, positions = _prefilled(model, cache_kind)
    span = 64
    if cache_kind == "paged":
        view = PagedView(cache, torch.tensor(cache.tables(range(3), span // cache.block_size), device="cuda"), span)
    else:
        view = cache.view(torch.arange(3, device="cuda"), span)
    tokens, pick = torch.tensor([[7], [8], [9]], device="cuda"), torch.zeros(3, dtype=torch.long, device="cuda")
    model.module.run(tokens, positions, view, pick)  # warm: compiled kernels, per-device constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        model.module.run(tokens, positions, view, pick)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_graph_decode_gives_the_eager_tokens(q4km, dtype):
    """Three sequences of different lengths, decoded with steps replayed from CUDA graphs across several key spans,
    batch sizes and a pool that grows: the greedy tokens of the eager steps."""
    model = tierlm.load(q4km, device="cuda", dtype=dtype)
    eager, sched = _generate(model, graphs=False)
    assert sched.graphs is None
    replayed, sched = _generate(model, graphs=True)
    g = sched.graphs
    assert g is not None and g.failed is None, g and g.failed
    assert g.captures >= 4 and g.replays > 3 * g.captures  # spans 16..64, and the pool grew (graphs dropped)
    assert sched.cache.version > 0
    assert replayed == eager


@pytest.mark.gpu
@pytest.mark.parametrize("cache_kind", ["paged", "slots"])
def test_a_replayed_step_gives_the_eager_logits(q4km, cache_kind):
    model = tierlm.load(q4km, device="cuda", dtype="bfloat16")
    cache, positions = _prefilled(model, cache_kind)
    graphs = DecodeGraphs(model, cache, span_step=32)
    tokens = [7, 8, 9]
    pos = positions[:, 0].tolist()
    for step in range(3):  # the first step captures, the others replay with new inputs
        eager = model.step(torch.tensor(tokens, device="cuda")[:, None], torch.tensor(pos, device="cuda")[:, None],
                           cache.view(torch.arange(3, device="cuda")), pick=torch.zeros(3, dtype=torch.long,
                                                                                           device="cuda"))
        replayed = graphs.step(list(range(3)), tokens, pos)
        assert replayed is not None
        torch.testing.assert_close(replayed, eager, rtol=2e-2, atol=2e-2)
        assert (replayed.argmax(-1) == eager.argmax(-1)).all()
        tokens = eager.argmax(-1).tolist()
        pos = [p + 1 for p in pos]
        cache.ensure(range(3), [p + 1 for p in pos])
    assert graphs.captures == 1 and graphs.replays == 3


@pytest.mark.gpu
def test_a_step_that_cannot_be_captured_runs_eagerly(q4km, monkeypatch, caplog):
    """A launch that waits on the host inside the step: capturing fails once, is logged, and every step from then
    on runs eagerly with the same tokens."""
    model = tierlm.load(q4km, device="cuda", dtype="bfloat16")
    eager, _ = _generate(model, graphs=False, max_tokens=8)
    run = model.module.run

    def syncing_run(tokens, positions, cache, pick=None):
        int(positions.max())  # a device sync: not allowed while capturing
        return run(tokens, positions, cache, pick)

    monkeypatch.setattr(model.module, "run", syncing_run)
    replayed, sched = _generate(model, graphs=True, max_tokens=8)
    assert sched.graphs.failed is not None and sched.graphs.captures == 0
    assert "capturing one as a CUDA graph failed" in caplog.text
    assert replayed == eager
    # the failed capture left the device's default generator usable: draws from it neither raise nor repeat
    a, b = torch.randn(4, device="cuda"), torch.randn(4, device="cuda")
    assert not torch.equal(a, b)
