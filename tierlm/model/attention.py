"""Multi-head Latent Attention (MLA), naive and absorbed forms side by side.

Both forms read the same cache: per token, the normalized latent c (C = kv_lora_rank) and the RoPE'd shared key
k_pe (R = qk_rope_head_dim). "naive" decompresses c into per-head keys and values (the reference, as in HF
transformers); "absorb" folds W_UK into the query and W_UV after the attention (the inference form of the
official code and llama.cpp), so it never materializes per-head K/V.

Glossary: B batch, T new tokens, S cached tokens (keys), H heads, C kv_lora_rank, R rope dims,
Dn qk_nope_head_dim, Dv v_head_dim, D hidden.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch
from torch import nn

from tierlm.config import ModelConfig
from tierlm.model.layers import RMSNorm, linear
from tierlm.model.rope import apply_rope

AttnImpl = Literal["naive", "absorb"]


class CacheView(Protocol):
    """The MLA cache as one batch sees it (runtime/kv_cache.py implements it: contiguous slots or paged blocks).

    ``span``: how many keys each row reads, when the caller fixes it (a decode step replayed from a CUDA graph
    reads a bucket of keys, masked past each row's position); None: one past the furthest position, which costs a
    device sync."""

    span: int | None

    def write(self, layer: int, positions: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor) -> None:
        """Store the latent kv (B, T, C) and RoPE'd key pe (B, T, R) of each row at its positions (B, T)."""

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's first ``length`` cached tokens: kv (B, S, C), pe (B, S, R)."""


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dn, self.dr, self.dv = (cfg.num_attention_heads, cfg.qk_nope_head_dim,
                                                   cfg.qk_rope_head_dim, cfg.v_head_dim)
        self.kv_rank, self.q_rank = cfg.kv_lora_rank, cfg.q_lora_rank
        self.scale = cfg.softmax_scale
        qk = self.dn + self.dr
        if cfg.q_lora_rank is None:
            self.q_proj = linear(cfg.hidden_size, self.n_heads * qk)
        else:
            self.q_a_proj = linear(cfg.hidden_size, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = linear(cfg.q_lora_rank, self.n_heads * qk)
        self.kv_a_proj_with_mqa = linear(cfg.hidden_size, self.kv_rank + self.dr)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.rms_norm_eps)
        self.kv_b_proj = linear(self.kv_rank, self.n_heads * (self.dn + self.dv))
        self.o_proj = linear(self.n_heads * self.dv, cfg.hidden_size)

    def _wkv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_UK (H, Dn, C) and W_UV (H, Dv, C)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.dn + self.dv, self.kv_rank)
        return w[:, : self.dn], w[:, self.dn:]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: CacheView, layer: int, impl: AttnImpl = "absorb") -> torch.Tensor:
        """x (B, T, D) in the compute dtype; positions (B, T) of the new tokens; ``cache`` this batch's view."""
        B, T, _ = x.shape
        if self.q_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.dn + self.dr)  # (B, T, H, Dn+R)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)

        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.dr], dim=-1)  # (B,T,C), (B,T,R)
        c = self.kv_a_layernorm(c)
        k_pe = apply_rope(k_pe, cos, sin)

        # Store the new tokens at their positions, then read every key up to the furthest one.
        cache.write(layer, positions, c, k_pe)
        S = cache.span or int(positions.max()) + 1
        kv, pe = cache.read(layer, S)
        kv, pe = kv.to(x.dtype), pe.to(x.dtype)  # (B, S, C), (B, S, R)
        # Causal and per-sequence: a query at position p sees keys 0..p of its own slot.
        allowed = torch.arange(S, device=x.device)[None, None, :] <= positions[:, :, None]  # (B, T, S)

        if impl == "naive":
            out = self._naive(q_nope, q_pe, kv, pe, allowed)
        elif impl == "absorb":
            out = self._absorb(q_nope, q_pe, kv, pe, allowed)
        else:
            raise ValueError(f"attn_impl must be 'naive' or 'absorb', not {impl!r}")
        return self.o_proj(out.reshape(B, T, self.n_heads * self.dv))

    def _softmax(self, scores: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        scores = scores.float() * self.scale
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))  # (B, H, T, S)
        return scores.softmax(dim=-1).to(dtype)

    def _naive(self, q_nope, q_pe, kv, pe, allowed) -> torch.Tensor:
        B, S, _ = kv.shape
        kvb = self.kv_b_proj(kv).view(B, S, self.n_heads, self.dn + self.dv)  # (B, S, H, Dn+Dv)
        k_nope, v = kvb.split([self.dn, self.dv], dim=-1)
        scores = (torch.einsum("bthd,bshd->bhts", q_nope, k_nope)
                  + torch.einsum("bthr,bsr->bhts", q_pe, pe))  # (B, H, T, S)
        p = self._softmax(scores, allowed, v.dtype)
        return torch.einsum("bhts,bshd->bthd", p, v)  # (B, T, H, Dv)

    def _absorb(self, q_nope, q_pe, kv, pe, allowed) -> torch.Tensor:
        w_uk, w_uv = self._wkv_b()
        q_lat = torch.einsum("bthd,hdc->bthc", q_nope, w_uk.to(q_nope.dtype))  # (B, T, H, C)
        scores = (torch.einsum("bthc,bsc->bhts", q_lat, kv)
                  + torch.einsum("bthr,bsr->bhts", q_pe, pe))  # (B, H, T, S)
        p = self._softmax(scores, allowed, kv.dtype)
        o_lat = torch.einsum("bhts,bsc->bthc", p, kv)  # (B, T, H, C)
        return torch.einsum("bthc,hdc->bthd", o_lat, w_uv.to(o_lat.dtype))  # (B, T, H, Dv)
