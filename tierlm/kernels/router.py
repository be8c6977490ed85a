"""DeepSeek-V3's router after its matrix-vector product, in one launch on GPUs.

``model.moe.Gate`` in PyTorch is a dozen launches per layer (sigmoid, bias, group top-2 sums, group top-k, scatter,
masked fill, top-k, gather, sum, divide, scale), each a few microseconds at a decode step's handful of tokens. Here
one program routes one token (``triton_router.route_kernel``) with the same float32 arithmetic. It covers the
configurations that need it: sigmoid scores with the correction bias (``noaux_tc``), groups or none, power-of-two
expert and group counts; others take the PyTorch form. Where two scores tie exactly, the lower expert index wins,
which ``torch.topk`` does not promise.

Glossary: T tokens, E routed experts, G groups, K experts per token.
"""

from __future__ import annotations

import torch

from tierlm.config import ModelConfig
from tierlm.kernels.quant_matmul import KernelInputError, _interpreting

MAX_EXPERTS = 1024  # scores one program holds in registers


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def fused_route_applies(cfg: ModelConfig, logits: torch.Tensor) -> bool:
    """Whether ``route`` runs the kernel for this configuration and these (T, E) float32 logits."""
    E = cfg.n_routed_experts
    return ((logits.is_cuda or _interpreting()) and logits.dtype == torch.float32 and logits.dim() == 2
            and cfg.scoring_func == "sigmoid" and cfg.topk_method == "noaux_tc" and _pow2(E) and E <= MAX_EXPERTS
            and _pow2(cfg.n_group) and _pow2(cfg.num_experts_per_tok) and cfg.num_experts_per_tok <= E)


def route(cfg: ModelConfig, logits: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (T, E) float32 and the correction bias (E,) float32 → expert ids (T, K) int64 and weights (T, K)
    float32, as ``model.moe.Gate`` computes them."""
    if not fused_route_applies(cfg, logits):
        raise KernelInputError("route: these logits or this routing configuration are not the kernel's; use "
                               "model.moe.Gate's PyTorch form")
    T, E = logits.shape
    if E != cfg.n_routed_experts or bias.shape != (E,) or bias.dtype != torch.float32:
        raise KernelInputError(f"route: logits (T, {cfg.n_routed_experts}) and a float32 bias of shape "
                               f"({cfg.n_routed_experts},) expected, got {tuple(logits.shape)} and "
                               f"{bias.dtype} {tuple(bias.shape)}")
    K = cfg.num_experts_per_tok
    ids = torch.empty(T, K, dtype=torch.int64, device=logits.device)
    wts = torch.empty(T, K, dtype=torch.float32, device=logits.device)
    if T:
        from tierlm.kernels.triton_router import route_kernel

        # group-limited routing keeps topk_group of n_group groups; with them all kept, there is nothing to limit
        route_kernel[(T,)](logits.contiguous(), bias, ids, wts, float(cfg.routed_scaling_factor), E=E,
                           G=cfg.n_group, TOPK_GROUP=cfg.topk_group, K=K, NORM=cfg.norm_topk_prob,
                           num_warps=max(1, min(4, E // 64)))
    return ids, wts
