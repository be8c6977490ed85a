"""Decoupled RoPE on the qk_rope_head_dim channels, with YaRN frequency scaling.

Layout: adjacent pairs (x0, x1), (x2, x3), … each rotated by one frequency, as in the official DeepSeek code and
llama.cpp. Checkpoints written for the half-split (rotate_half) layout are permuted on load instead
(weights/hf_names.py), so one layout runs everywhere.

Glossary: B batch, T tokens, H heads, R rope dims (R/2 frequencies).
"""

from __future__ import annotations

import math

import torch

from tierlm.config import ModelConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (R/2,) float32 and the cos/sin magnitude factor (1.0 for DeepSeek's configs)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    y = cfg.rope_scaling
    if y is None:
        return inv_freq, 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(y.beta_fast)), 0)
    high = min(math.ceil(correction_dim(y.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1 for high-frequency dims (kept), 0 for low-frequency dims (divided by factor)
    inv_freq = inv_freq / y.factor * (1 - keep) + inv_freq * keep
    if y.mscale and y.mscale_all_dim:
        attn_factor = _yarn_mscale(y.factor, y.mscale) / _yarn_mscale(y.factor, y.mscale_all_dim)
    else:
        attn_factor = _yarn_mscale(y.factor)
    return inv_freq, attn_factor


class Rope:
    """cos/sin computed on the fly from positions (no table of a fixed maximum length)."""

    def __init__(self, cfg: ModelConfig):
        self.inv_freq, self.attn_factor = rope_frequencies(cfg)
        self._on: dict[torch.device, torch.Tensor] = {}

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int → cos, sin (B, T, R/2) float32."""
        inv = self._on.get(positions.device)
        if inv is None:
            inv = self._on[positions.device] = self.inv_freq.to(positions.device)
        angles = positions.to(torch.float32)[..., None] * inv  # (B, T, R/2)
        return angles.cos() * self.attn_factor, angles.sin() * self.attn_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x (B, T, [H,] R) by cos/sin (B, T, R/2); computed in fp32, returned in x.dtype."""
    if x.dim() == 4:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.float().unflatten(-1, (-1, 2))  # (..., R/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
