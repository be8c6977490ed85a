"""DeepSeek MoE: the router (gate), the routed experts, and the shared experts.

Glossary: N tokens (batch × time flattened), D hidden, E routed experts, K experts per token (top-k),
G expert groups, I expert intermediate size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tierlm.config import ModelConfig
from tierlm.kernels.router import fused_route_applies, route
from tierlm.model.layers import MLP


class Gate(nn.Module):
    """Chooses K experts per token and their weights. Everything in fp32: the correction bias of DeepSeek-V3 is
    large (≈ +2) next to the score differences that decide the ranking, so bf16 would reorder experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.hidden_size, dtype=torch.float32))
        if cfg.has_gate_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) → expert ids (N, K) int64, weights (N, K) float32. On GPUs, the choice after the product is
        one launch where ``kernels.router`` covers the configuration."""
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        # the kernel has no backward: where a gradient is asked for, PyTorch's form
        if self.cfg.has_gate_bias and logits.is_cuda and not logits.requires_grad \
                and fused_route_applies(self.cfg, logits):
            return route(self.cfg, logits, self.e_score_correction_bias.float())
        return self.choose(logits)

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The choice from router logits (N, E) float32, in PyTorch."""
        cfg = self.cfg
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if cfg.has_gate_bias else scores  # selection only
        if cfg.topk_method != "greedy" and cfg.topk_group < cfg.n_group:
            grouped = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)  # (N, G, E/G)
            if cfg.topk_method == "noaux_tc":
                group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G): sum of each group's top-2
            else:
                group_score = grouped.max(dim=-1).values
            keep = group_score.topk(cfg.topk_group, dim=-1).indices  # (N, topk_group)
            group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], float("-inf")).flatten(1)
        ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices  # (N, K)
        weights = scores.gather(1, ids)  # weights come from the unbiased scores
        if cfg.norm_topk_prob and (cfg.scoring_func == "sigmoid" or cfg.num_experts_per_tok > 1):
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * cfg.routed_scaling_factor


class RoutedExperts(nn.Module):
    """All routed experts of one layer, stacked; tokens are grouped per expert so each active expert runs once
    on all of its tokens (no loop over every expert for every token)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(E, I, D))
        self.up_proj = nn.Parameter(torch.empty(E, I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x (n, D) → (n, D)."""
        return F.linear(F.silu(F.linear(x, self.gate_proj[e])) * F.linear(x, self.up_proj[e]), self.down_proj[e])

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), ids/weights (N, K) → (N, D) float32, the weighted sum of each token's experts."""
        return dispatch(self.expert, self.gate_proj.shape[0], x, ids, weights)


def dispatch(expert: Callable[[int, torch.Tensor], torch.Tensor], n_experts: int, x: torch.Tensor,
             ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_k weights[:, k] · expert(ids[:, k], x): tokens sorted by expert, each active expert called once on
    all of its tokens. x (N, D), ids/weights (N, K) → (N, D) float32."""
    N, K = ids.shape
    flat = ids.flatten()  # (N·K,)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=n_experts).tolist()  # one device sync per layer
    token = order // K  # which token each sorted assignment belongs to
    w = weights.flatten()[order]
    out = torch.zeros(N, x.shape[-1], dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = token[start:start + n]
        y = expert(e, x[sel])  # (n, D)
        out.index_put_((sel,), y.float() * w[start:start + n, None], accumulate=True)  # index_add_ is slow on CPU
        start += n
    return out


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Gate(cfg)
        self.experts = RoutedExperts(cfg)
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts) \
            if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) → (B, T, D) float32."""
        flat = x.reshape(-1, x.shape[-1])  # (N, D)
        ids, weights = self.gate(flat)
        y = self.experts(flat, ids, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat).float()
        return y.view(*x.shape[:-1], -1)
