"""The one-launch router (kernels/router.py) against model.moe.Gate's PyTorch choice: in Triton's interpreter on the
CPU and compiled on GPUs. (Its sm_75 build is one of tests/test_kernels_sm75.py's.)"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from tierlm.kernels.router import KernelInputError, fused_route_applies, route
from tierlm.model.moe import Gate

ROOT = Path(__file__).resolve().parents[1]
# DeepSeek-V3's routing, a tiny grouped one, one whose groups are all kept, and one without normalization
CONFIGS = {
    "v3": dict(n_routed_experts=256, n_group=8, topk_group=4, num_experts_per_tok=8, routed_scaling_factor=2.5),
    "tiny": dict(n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4),
    "all-groups": dict(n_routed_experts=64, n_group=4, topk_group=4, num_experts_per_tok=8),
    "unnormalized": dict(n_routed_experts=32, n_group=8, topk_group=2, num_experts_per_tok=2, norm_topk_prob=False),
}


def _case(name: str, tokens: int = 7, seed: int = 0):
    cfg = tiny_config(**CONFIGS[name])
    g = torch.Generator().manual_seed(seed)
    gate = Gate(cfg)
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.randn(cfg.n_routed_experts, generator=g) * 2)  # as large as V3's
    logits = torch.randn(tokens, cfg.n_routed_experts, generator=g) * 3
    return cfg, gate, logits


def _check(name: str, device: str) -> None:
    cfg, gate, logits = _case(name)
    gate, logits = gate.to(device), logits.to(device)
    ids, wts = route(cfg, logits, gate.e_score_correction_bias)
    ref_ids, ref_wts = gate.choose(logits)
    assert torch.equal(ids, ref_ids), (name, ids, ref_ids)  # the same experts in the same order
    torch.testing.assert_close(wts, ref_wts, rtol=1e-6, atol=1e-7)


def test_route_in_the_interpreter():
    code = textwrap.dedent(f"""
        from tests.test_router import _check
        for name in {list(CONFIGS)!r}:
            _check(name, "cpu")
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


def test_route_covers_v3_and_refuses_the_rest():
    cfg, gate, logits = _case("v3")
    assert not fused_route_applies(cfg, logits)  # a CPU tensor outside the interpreter: Gate keeps PyTorch's form
    with pytest.raises(KernelInputError, match="use model.moe.Gate's PyTorch form"):
        route(cfg, logits, gate.e_score_correction_bias)
    v2 = tiny_config(model_type="deepseek_v2", scoring_func="softmax", topk_method="greedy")
    assert not fused_route_applies(v2, logits.to("meta"))


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
def test_route_on_the_gpu(name):
    _check(name, "cuda")


@pytest.mark.gpu
def test_the_gate_routes_on_the_gpu_as_on_the_cpu():
    cfg, gate, _ = _case("v3")
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # inference: the kernel on the GPU
        ids, wts = gate(x)
        cuda_ids, cuda_wts = gate.to("cuda")(x.to("cuda"))
    assert torch.equal(cuda_ids.cpu(), ids)
    torch.testing.assert_close(cuda_wts.cpu(), wts, rtol=1e-4, atol=1e-5)  # the product's order of sums differs
    with torch.enable_grad():  # a gradient asked for through the weights: PyTorch's form, which has one
        x.requires_grad_()
        _, grad_wts = gate(x.to("cuda"))
        grad_wts.sum().backward()
    assert x.grad is not None and gate.weight.grad is not None
