"""Routed experts spread over the device, RAM and disk: same tokens whatever the placement, counted per tier,
bytes as planned, recovery from out-of-memory. Every tier is emulated on the CPU."""

import subprocess
import sys

import pytest
import torch

import tierlm
from tierlm.runtime.experts import TieredExperts
from tierlm.runtime.generate import generate_batch
from tierlm.runtime.placement import Placement
from tierlm.runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    from tierlm.runtime.demo import ensure_demo
    from tierlm.weights.convert import convert

    return convert(ensure_demo(), tmp_path_factory.mktemp("tiers") / "demo-q8.gguf", "Q8_0")[0]


PROMPTS = ["Hello, how are you?", "Explain mixture of experts in one line", "1 + 1 ="]


def greedy(model, n=6):
    ids = [model.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    out = {}
    for step in generate_batch(model, ids, SamplingParams(temperature=0, max_tokens=n)):
        for e in step:
            out.setdefault(e.seq, []).append(e.token_id)
    return [out[i] for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def reference(demo_gguf):
    model = tierlm.load(demo_gguf, dtype="float32")
    return greedy(model), model.logits(list(range(100, 140)))


@pytest.mark.parametrize("device,ram", [(1.0, 0.0), (0.0, 0.0), (0.25, 0.25), (0.5, 0.0)])
def test_same_tokens_and_logits_whatever_the_placement(demo_gguf, reference, device, ram):
    tokens, logits = reference
    model = tierlm.load(demo_gguf, dtype="float32", placement=Placement.by_fraction(
        tierlm.load(demo_gguf).config, device, ram))
    assert torch.equal(model.logits(list(range(100, 140))), logits)
    assert greedy(model) == tokens
    hits = model.expert_stats.hits
    assert (hits["device"] > 0) == (device > 0) and (hits["ram"] > 0) == (ram > 0)
    assert (hits["disk"] > 0) == (device + ram < 1)


def test_hits_and_bytes_are_counted_per_tier(demo_gguf):
    cfg = tierlm.load(demo_gguf).config
    model = tierlm.load(demo_gguf, dtype="float32", placement=Placement.by_fraction(cfg, 0.25, 0.25))
    n = 37
    model.logits(list(range(200, 200 + n)))
    s = model.expert_stats
    assert s.tokens == n
    layers = model.module.model.layers
    tiered = [layer.mlp.experts for layer in layers if isinstance(getattr(layer.mlp, "experts", None), TieredExperts)]
    assert len(tiered) == len(cfg.moe_layers)
    # one "hit" per (layer, expert) used in the step; its bytes are read once for all of its tokens
    used = sum(len(t.last_ids) for t in tiered)
    assert sum(s.hits.values()) == used
    assert sum(s.bytes_read.values()) == used * tiered[0].expert_bytes
    assert s.prefetched > 0  # the next layer's disk experts were hinted to the kernel


def test_planned_bytes_match_what_is_allocated(demo_gguf):
    """The planner's RAM and disk bytes for the experts equal what the runtime holds there (within 3%)."""
    from tierlm.plan import make_hardware, make_plan
    from tierlm.plan.command import resolve_model

    cfg, tensors, name, path = resolve_model(str(demo_gguf), None)
    plan = make_plan(cfg, hardware=make_hardware(gpus="0", ram="112MiB", disk_gbps=2, detect=False),
                     tensors=tensors, name=name)
    assert plan.fits
    counts = plan.expert_counts()
    assert counts["ram"] > 0 and counts["disk"] > 0  # the budget forces both host tiers
    model = tierlm.load(demo_gguf, dtype="float32", placement=Placement.from_plan(plan))
    held = {"ram": 0, "disk": 0}
    for layer in model.module.model.layers:
        ex = getattr(layer.mlp, "experts", None)
        if isinstance(ex, TieredExperts):
            for e, h in ex.host.items():
                if ex.slot_of[e] < 0:  # device experts keep a disk view as backing; it is not read
                    held[h.tier] += h.nbytes
    cpu = next(d for d in plan.devices if d.kind == "cpu")
    disk = next(d for d in plan.devices if d.kind == "disk")
    assert held["ram"] == pytest.approx(cpu.parts["experts"], rel=0.03)
    assert held["disk"] == pytest.approx(disk.parts["experts"], rel=0.03)
    always_active = sum(t.numel() * t.element_size() for n, t in model.module.named_parameters()) + sum(
        b.numel() * b.element_size() for n, b in model.module.named_buffers() if "slot_" not in n)
    # the plan counts always-active weights as stored in the file; dense F32/F16 ones load as fp32 here
    assert always_active >= cpu.parts["weights"] * 0.97


def test_out_of_memory_during_decode_recovers_with_the_same_output(demo_gguf, reference, monkeypatch):
    tokens, _ = reference
    cfg = tierlm.load(demo_gguf).config
    model = tierlm.load(demo_gguf, dtype="float32", placement=Placement.by_fraction(cfg, 0.5, 0.25))
    calls = {"n": 0}
    original = TieredExperts._run

    def flaky(self, x, *mats):
        calls["n"] += 1
        if calls["n"] == 40:  # in the middle of decoding
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, x, *mats)

    monkeypatch.setattr(TieredExperts, "_run", flaky)
    slots_before = [len(layer.mlp.experts.expert_in) for layer in model.module.model.layers
                    if isinstance(getattr(layer.mlp, "experts", None), TieredExperts)]
    assert greedy(model) == tokens
    assert model.oom_events == 1 and model.expert_stats.oom_events == 1
    slots_after = [len(layer.mlp.experts.expert_in) for layer in model.module.model.layers
                   if isinstance(getattr(layer.mlp, "experts", None), TieredExperts)]
    assert slots_after == [s // 2 for s in slots_before]


def test_out_of_memory_with_nothing_to_free_is_a_clear_error(demo_gguf, monkeypatch):
    from tierlm.errors import OutOfMemory

    model = tierlm.load(demo_gguf, dtype="float32")

    def always(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(type(model.module), "forward", always)
    with pytest.raises(OutOfMemory, match="nothing left to free"):
        model.logits([1, 2, 3])


def test_disk_reads_past_the_staging_window_give_the_same_logits(demo_gguf, reference, monkeypatch):
    """A prompt touching more disk experts than the staging window holds reads the rest as the window frees up."""
    from tierlm.runtime import experts as ex

    monkeypatch.setattr(ex, "STAGING_EXPERTS_PER_TOPK", 0.25)  # a window of one expert
    reads = []
    original = ex.DiskReader.submit
    monkeypatch.setattr(ex.DiskReader, "submit", lambda self, h: reads.append(h) or original(self, h))
    model = tierlm.load(demo_gguf, dtype="float32", placement=Placement.by_fraction(
        tierlm.load(demo_gguf).config, 0.0, 0.0))
    assert torch.equal(model.logits(list(range(100, 140))), reference[1])
    assert len(reads) == model.expert_stats.hits["disk"] > len(model.config.moe_layers)
    assert sum(len(v) for v in ex.disk_reader().free.values()) >= 1  # the buffers came back to the pool


def test_placement_must_match_the_model(demo_gguf):
    from tierlm.errors import ConfigError

    bad = Placement({99: ["ram"] * 32}, {99: 0})
    with pytest.raises(ConfigError, match="another model"):
        tierlm.load(demo_gguf, placement=bad)


def test_cli_plans_prints_and_reports_tiers(demo_gguf):
    r = subprocess.run([sys.executable, "-m", "tierlm.cli", "run", str(demo_gguf), "-p", "Hi", "--max-tokens", "4",
                        "--gpus", "0", "--ram", "112MiB", "--disk-gbps", "2", "--stats"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "experts   gpu 0" in r.stderr and "decode" in r.stderr  # the plan, printed before loading
    assert "experts: device 0 uses" in r.stderr and "disk" in r.stderr
    r = subprocess.run([sys.executable, "-m", "tierlm.cli", "run", str(demo_gguf), "-p", "Hi", "--gpus", "0",
                        "--ram", "8MiB", "--disk-gbps", "2"], capture_output=True, text=True, timeout=180)
    assert r.returncode == 1 and "the plan does not fit" in r.stderr and "Traceback" not in r.stderr


def test_recorded_routing_profile_puts_hot_experts_in_the_faster_tier(demo_gguf, tmp_path):
    import shutil

    from tierlm.plan import make_hardware, make_plan
    from tierlm.plan.command import resolve_model
    from tierlm.plan.planner import default_profile, recorded_profile_path
    from tierlm.runtime.profile import ProfileRecorder

    path = tmp_path / "m.gguf"
    shutil.copy(demo_gguf, path)
    model = tierlm.load(path, dtype="float32")
    rec = ProfileRecorder(model.module)
    model.logits(list(range(300, 340)))
    saved = rec.save(recorded_profile_path(path))
    rec.close()
    counts = {int(k): v for k, v in __import__("json").loads(saved.read_text())["layers"].items()}
    assert set(counts) == set(model.config.moe_layers)
    assert all(sum(row) == 40 * model.config.num_experts_per_tok for row in counts.values())
    cfg, tensors, name, p = resolve_model(str(path), None)
    plan = make_plan(cfg, hardware=make_hardware(gpus="0", ram="112MiB", disk_gbps=2, detect=False),
                     tensors=tensors, name=name, profile=default_profile(p))
    for le in plan.experts:
        row = counts[le.layer]
        assert le.ram and le.disk
        assert min(row[e] for e in le.ram) >= max(row[e] for e in le.disk)  # hottest first


def test_server_runs_a_tiered_plan_and_exports_tier_counters(demo_gguf):
    """`tierlm serve MODEL.gguf --gpus 0 --ram …` plans, serves from RAM and disk, and counts both in /metrics."""
    from test_server_harness import ServerProcess

    server = ServerProcess(str(demo_gguf), "--gpus", "0", "--ram", "112MiB", "--disk-gbps", "2").wait_ready()
    try:
        reply = server.client().chat.completions.create(
            model="demo-q8", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0)
        assert reply.usage.completion_tokens == 4
        hits = {line.split('tier="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
                for line in server.get("/metrics").text.splitlines()
                if line.startswith("tierlm:expert_cache_hits_total{")}
        assert hits["ram"] > 0 and hits["disk"] > 0 and hits["device"] == 0
        assert "experts   gpu 0" in server.output()  # the plan was printed before loading
    finally:
        assert server.stop() == 0


def test_copy_threshold_follows_the_bandwidths():
    """A host expert is copied to the GPU once the CPU would read it more times than one PCIe copy costs."""
    from tierlm.plan.hardware import declared_hardware
    from tierlm.runtime.placement import CPU_KERNEL_EFFICIENCY, CPU_ROWS, copy_threshold

    slow_cpu = declared_hardware("1x22GiB", "64GiB", disk_gbps=3, ram_gbps=20, pcie_gbps=25)
    fast_cpu = declared_hardware("1x22GiB", "64GiB", disk_gbps=3, ram_gbps=200, pcie_gbps=12)
    assert copy_threshold(slow_cpu) == CPU_ROWS + 1  # one CPU pass already costs more than the copy
    assert copy_threshold(fast_cpu) == -(-200 * CPU_KERNEL_EFFICIENCY // 12) * CPU_ROWS + 1
    assert copy_threshold(declared_hardware("0", "64GiB", disk_gbps=3)) > 10**6  # no GPU: never copy


def _tiered_layers(model):
    return [layer.mlp.experts for layer in model.module.model.layers
            if isinstance(getattr(layer.mlp, "experts", None), TieredExperts)]


def test_prefetch_stops_when_its_guesses_miss_and_resumes_when_they_hit(demo_gguf, monkeypatch):
    """Hints cost disk bandwidth: under routing no guess can predict (fresh random experts every step) each
    layer stops taking them, apart from probing rounds; under routing that repeats they stay on."""
    from tierlm.model.moe import Gate
    from tierlm.runtime import experts as ex

    cfg = tierlm.load(demo_gguf).config
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    g = torch.Generator().manual_seed(0)
    mode = {"random": True}

    def route(self, x):
        if mode["random"]:
            ids = torch.rand(x.shape[0], E, generator=g).topk(K, dim=-1).indices
        else:
            ids = torch.arange(E - K, E).expand(x.shape[0], K)  # the same experts, all on disk, every step
        return ids, torch.full((x.shape[0], K), 1.0 / K)

    monkeypatch.setattr(Gate, "forward", route)
    model = tierlm.load(demo_gguf, dtype="float32", placement=Placement.by_fraction(cfg, 0.0, 0.25))
    layers = _tiered_layers(model)
    s = model.expert_stats

    def steps(n):
        for i in range(n):
            model.logits([100 + i])

    steps(120)
    late = layers[-1]
    assert late.prefetch_precision < ex.PREFETCH_MIN_PRECISION
    before = s.prefetched
    steps(2 * ex.PREFETCH_PROBE_EVERY)
    # off apart from one probing round per PREFETCH_PROBE_EVERY steps and layer
    assert s.prefetched - before <= 2 * (len(layers) - 1) * 2 * K
    mode["random"] = False
    steps(3 * ex.PREFETCH_PROBE_EVERY + 60)
    assert late.prefetch_precision >= ex.PREFETCH_MIN_PRECISION and late.takes_hints()
    before, used = s.prefetched, s.prefetch_used
    steps(10)
    assert s.prefetched > before and s.prefetch_used - used == s.prefetched - before  # every hint used


def test_disk_experts_are_promoted_from_their_read_not_from_the_memory_map(demo_gguf):
    """A hot disk expert is copied into a device slot from the buffers this step read it into: its memory-map
    view would fault its pages in one at a time. The views are overwritten with zeros here, so a promotion
    that copied them would change the logits."""
    cfg = tierlm.load(demo_gguf).config
    ref = tierlm.load(demo_gguf, dtype="float32")
    model = tierlm.load(demo_gguf, dtype="float32", placement=Placement.by_fraction(cfg, 0.25, 0.0))
    layers = _tiered_layers(model)
    for layer in layers:
        layer.promotes = True  # what a GPU does; with no GPU the slots are host memory, so it is off by default
        for h in layer.host.values():
            assert h.tier == "disk"
            h.mats = tuple(torch.zeros_like(m) for m in h.mats)
    for i in range(24):  # single tokens, repeating: a few experts get hot
        prompt = [100 + i % 3]
        assert torch.equal(model.logits(prompt), ref.logits(prompt))
    promoted = [e for layer in layers for e in layer.expert_in if e in layer.host]
    assert model.expert_stats.promotions >= len(layers) and promoted


def test_promotion_never_evicts_an_expert_routed_in_the_same_step(demo_gguf):
    """On a GPU the device experts of a step run as one launch after the loop that may promote: an expert of
    that step must keep its slot, however cold its decayed score (it would otherwise count for nothing)."""
    cfg = tierlm.load(demo_gguf).config
    model = tierlm.load(demo_gguf, dtype="float32", placement=Placement.by_fraction(cfg, 0.25, 0.75))
    layer = _tiered_layers(model)[0]
    residents = [e for e in layer.expert_in if e >= 0]
    coldest, other = residents[0], residents[1]
    hot = next(e for e, h in layer.host.items() if h.tier == "ram")
    layer.score = [1.0] * layer.n_experts
    layer.score[coldest], layer.score[other] = 0.0, 0.5
    assert layer._victim() == layer.slot_of[coldest]
    other_slot = layer.slot_of[other]
    slot = layer._promote(hot, keep={coldest, hot})
    assert slot == other_slot and layer.expert_in[slot] == hot and layer.slot_of[other] == -1
    assert layer.slot_of[coldest] >= 0
    assert layer._promote(next(e for e, h in layer.host.items() if h.tier == "ram" and e != other),
                          keep=set(layer.expert_in)) == -1  # every resident in use: nothing to evict
