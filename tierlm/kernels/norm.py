"""RMSNorm in one launch on GPUs, optionally after the residual add that feeds it.

The PyTorch form (``model.layers.RMSNorm``) is seven elementwise and reduction launches: widen, square, mean,
add eps, rsqrt, two multiplies, narrow. A DeepSeek-V3 decode step has four norms per layer, so at batch 1 those
launches cost more than the norms' arithmetic. Here one program normalizes one row in registers, in float32 with
the same order of operations (``x * rsqrt(mean(x²) + eps) * w``); only the sum of squares is reduced in another
order, so results match the PyTorch form to float32 rounding before the cast to the output dtype. The kernel is
``triton_norm.rms_norm_kernel``.

Glossary: R rows, D features.
"""

from __future__ import annotations

import torch

from tierlm.kernels.quant_matmul import KernelInputError, _interpreting

MAX_D = 16384  # features a program holds in registers; wider rows take the PyTorch form


def fused_norm_applies(x: torch.Tensor) -> bool:
    """Whether ``rms_norm`` runs the kernel for ``x`` (a CUDA tensor of a float type, rows of at most MAX_D)."""
    return (x.is_cuda or _interpreting()) and x.dtype in (torch.float32, torch.float16, torch.bfloat16) \
        and 0 < x.shape[-1] <= MAX_D


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of x (..., D) with a float32 weight (D,), cast to ``out_dtype``. With ``residual`` (..., D) float32:
    v = residual + x first, and the result is (v float32, its norm)."""
    D = x.shape[-1]
    if weight.shape != (D,) or weight.dtype != torch.float32:
        raise KernelInputError(f"rms_norm: the weight must be float32 of shape ({D},), not {weight.dtype} "
                               f"{tuple(weight.shape)}")
    if not fused_norm_applies(x):
        raise KernelInputError(f"rms_norm: {x.dtype} rows of {D} on {x.device} are not the kernel's; use the "
                               "PyTorch form (rms_norm_ref)")
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    R = x2.shape[0]
    y = torch.empty(R, D, dtype=out_dtype, device=x.device)
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != torch.float32:
            raise KernelInputError(f"rms_norm: the residual must be float32 of shape {tuple(x.shape)}, not "
                                   f"{residual.dtype} {tuple(residual.shape)}")
        r2 = residual.reshape(-1, D)
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
        h = torch.empty(R, D, dtype=torch.float32, device=x.device)
    else:
        r2, h = x2, y  # unused without ADD
    if R:
        from tierlm.kernels.triton_norm import rms_norm_kernel

        block = 1 << (D - 1).bit_length()
        rms_norm_kernel[(R,)](x2, r2, h, weight, y, D, x2.stride(0), r2.stride(0), eps, ADD=residual is not None,
                              BLOCK=block, num_warps=max(1, min(8, block // 256)))
    y = y.view(x.shape)
    return (h.view(x.shape), y) if residual is not None else y


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype,
                 residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The PyTorch form of ``rms_norm`` (the model's own on the CPU)."""
    v = x.float() if residual is None else residual + x.float()
    y = (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * weight).to(out_dtype)
    return y if residual is None else (v, y)
