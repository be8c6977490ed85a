"""The one-launch RMSNorm (kernels/norm.py) against its PyTorch form: in Triton's interpreter on the CPU, compiled
on GPUs, and ahead of time for Turing."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tierlm.kernels.norm import KernelInputError, rms_norm, rms_norm_ref
from tierlm.model.layers import RMSNorm

ROOT = Path(__file__).resolve().parents[1]
# (rows, features, row stride or None): DeepSeek-V3's hidden and q_lora rows, the kv latent read from the
# kv_a output (512 of every 576), and an odd width
SHAPES = [(3, 7168, None), (2, 1536, None), (4, 512, 576), (5, 100, None)]


def _inputs(R, D, stride, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(R, stride or D, generator=g) * 3
    x = base[:, :D].to(dtype)  # a strided view when stride is set
    w = torch.rand(D, generator=g) + 0.5
    res = torch.randn(R, D, generator=g) * 10
    return x, w, res


def _check(x, w, res, out_dtype, device):
    x, w, res = x.to(device), w.to(device), res.to(device)
    y = rms_norm(x, w, 1e-6, out_dtype)
    ref = rms_norm_ref(x, w, 1e-6, out_dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if out_dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(y, ref, **tol)
    h, y = rms_norm(x, w, 1e-6, out_dtype, residual=res)
    h_ref, ref = rms_norm_ref(x, w, 1e-6, out_dtype, residual=res)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)  # the same one float32 add
    torch.testing.assert_close(y, ref, **tol)
    if out_dtype != torch.float32:  # at most one step of the output type apart
        step = ref.float().abs().clamp_min(1e-3) * (2 ** -7 if out_dtype == torch.bfloat16 else 2 ** -10)
        assert ((y.float() - ref.float()).abs() <= step).all()


def test_rms_norm_in_the_interpreter():
    code = textwrap.dedent("""
        import torch
        from tests.test_norm import SHAPES, _check, _inputs
        for R, D, stride in SHAPES:
            for dtype in (torch.float32, torch.float16):
                for out in (torch.float32, torch.float16):
                    _check(*_inputs(R, D, stride, dtype), out, "cpu")
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


def test_rms_norm_refuses_what_it_cannot_take():
    x = torch.zeros(2, 8)
    with pytest.raises(KernelInputError, match="float32 of shape"):
        rms_norm(x, torch.ones(8, dtype=torch.float16), 1e-6, torch.float32)
    with pytest.raises(KernelInputError, match="use the PyTorch form"):
        rms_norm(x, torch.ones(8), 1e-6, torch.float32)  # a CPU tensor outside the interpreter


def test_the_model_norm_keeps_its_pytorch_form_on_the_cpu():
    """On the CPU the layer is PyTorch's ops exactly (the reference tests against transformers rest on it)."""
    norm = RMSNorm(64, 1e-6)
    x, h = torch.randn(3, 64, dtype=torch.bfloat16), torch.randn(3, 64)
    xf = x.float()
    assert torch.equal(norm(x, torch.float32), xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))
    v, y = norm.add(h, x, torch.bfloat16)
    assert torch.equal(v, h + xf) and torch.equal(y, norm(v, torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{r}x{d}" + (f"s{s}" if s else "") for r, d, s in SHAPES])
def test_rms_norm_on_the_gpu(shape, dtype):
    for out in (torch.float32, dtype):
        _check(*_inputs(*shape, dtype), out, "cuda")


@pytest.mark.gpu
def test_the_model_norm_takes_pytorchs_form_where_a_gradient_is_asked_for():
    norm = RMSNorm(256, 1e-6).cuda()
    x = torch.randn(3, 256, device="cuda", requires_grad=True)
    norm(x, torch.float32).square().sum().backward()
    xr = x.detach().clone().requires_grad_()
    rms_norm_ref(xr, norm.weight.detach(), 1e-6, torch.float32).square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    with torch.no_grad():
        torch.testing.assert_close(norm(x, torch.float32), rms_norm(x, norm.weight, 1e-6, torch.float32))


def test_rms_norm_compiles_for_turing():
    aot = pytest.importorskip("tierlm.kernels.aot", reason="this triton cannot compile ahead of time")
    forms = [v for v in aot.variants(75) if v.name.startswith("rms_norm")]
    assert {v.constexprs["ADD"] for v in forms} == {False, True}
    for v in forms:
        ptx = aot.compile_variant(v, 75).asm["ptx"]
        assert ".target sm_75" in ptx and "bf16" not in ptx
