"""Building blocks shared by the attention, dense and MoE layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tierlm.kernels.norm import fused_norm_applies, rms_norm, rms_norm_ref


def linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free projection (DeepSeek has no biases). Weights are filled by the loader."""
    return nn.Linear(in_features, out_features, bias=False)


class RMSNorm(nn.Module):
    """w · x / sqrt(mean(x²) + eps), in fp32 (weight kept fp32); the result is cast to ``out_dtype``. On GPUs one
    launch (``kernels.norm``), elsewhere PyTorch's elementwise ops."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        norm = rms_norm if self._fused(x) else rms_norm_ref
        return norm(x, self.weight, self.eps, out_dtype or x.dtype)

    def add(self, h: torch.Tensor, a: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual step before a block: (h + a in fp32, its norm in ``out_dtype``); h float32, a any float."""
        norm = rms_norm if self._fused(a, h) else rms_norm_ref
        return norm(a, self.weight, self.eps, out_dtype, residual=h)

    def _fused(self, x: torch.Tensor, *more: torch.Tensor) -> bool:
        """The one-launch kernel where it applies and no gradient is asked for (it has no backward)."""
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, self.weight, *more))
        return x.is_cuda and not grad and self.weight.dtype == torch.float32 and fused_norm_applies(x)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x)). Used for the dense layers and the shared experts. With quantized
    projections on a GPU at one row, the fused MoE kernels of one expert (``quantized.fused_mlp``)."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = linear(dim, inter)
        self.up_proj = linear(dim, inter)
        self.down_proj = linear(inter, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from tierlm.model.quantized import fused_mlp

            y = fused_mlp(self.gate_proj, self.up_proj, self.down_proj, x)
            if y is not None:
                return y
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
