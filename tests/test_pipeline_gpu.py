"""Layers split over several GPUs in one process give the tokens one GPU gives (needs ≥ 2 GPUs)."""

import pytest
import torch

import tierlm
from tierlm.runtime.generate import generate_batch
from tierlm.runtime.placement import DeviceMap, Placement
from tierlm.runtime.sampling import SamplingParams

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two or more CUDA GPUs")]


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    from tierlm.runtime.demo import ensure_demo
    from tierlm.weights.convert import convert

    return convert(ensure_demo(), tmp_path_factory.mktemp("pipe") / "demo-q8.gguf", "Q8_0")[0]


def tokens(model, n=12):
    ids = [model.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in ("Hello", "Why is the sky blue?")]
    out = {}
    for step in generate_batch(model, ids, SamplingParams(temperature=0, max_tokens=n)):
        for e in step:
            out.setdefault(e.seq, []).append(e.token_id)
    return [out[0], out[1]]


def test_pipeline_over_two_gpus_matches_one_gpu(demo_gguf):
    one = tierlm.load(demo_gguf, device="cuda:0", dtype="float16")
    ref_logits, ref_tokens = one.logits(list(range(100, 140))), tokens(one)
    cfg = one.config
    dm = DeviceMap.split(cfg.num_hidden_layers, ["cuda:0", "cuda:1"])
    two = tierlm.load(demo_gguf, device=dm, dtype="float16")
    assert {p.device.index for p in two.module.parameters()} == {0, 1}
    assert (two.logits(list(range(100, 140))).cpu() - ref_logits.cpu()).abs().max() <= 1e-3  # logits come off the last GPU
    assert tokens(two) == ref_tokens
    # with experts also in RAM and on disk (computed by the CPU in float32): same tokens as one GPU, same tiers
    placement = Placement.by_fraction(cfg, 0.25, 0.25)
    tiered_one = tierlm.load(demo_gguf, device="cuda:0", dtype="float16", placement=placement)
    tiered_two = tierlm.load(demo_gguf, device=dm, dtype="float16", placement=placement)
    assert tokens(tiered_two) == tokens(tiered_one)
    assert tiered_two.expert_stats.hits["ram"] > 0 and tiered_two.expert_stats.hits["disk"] > 0


def test_server_scheduler_runs_a_pipeline(demo_gguf):
    from tierlm.runtime.scheduler import Scheduler

    dm = DeviceMap.split(tierlm.load(demo_gguf).config.num_hidden_layers, ["cuda:0", "cuda:1"])
    model = tierlm.load(demo_gguf, device=dm, dtype="float16")
    sched = Scheduler(model, max_batch=4)
    assert {t.device.index for t in sched.cache.kv} == {0, 1}
