"""The MLA cache: per layer, per sequence slot, the normalized latent (C) and the RoPE'd shared key (R).

68.6 KiB per token for DeepSeek-V3 in bf16 (61 layers × 576 × 2 B), against 4.77 MiB for decompressed K/V.
Slots are rows; a sequence owns one slot for its lifetime. Capacity grows geometrically when a longer sequence
arrives (the copy is visible here, in ``reserve``).
"""

from __future__ import annotations

import torch

from tierlm.config import ModelConfig
from tierlm.model.attention import LayerCache


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize


class KVCache:
    def __init__(self, cfg: ModelConfig, n_slots: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.n_slots, self.capacity = n_slots, 0
        self.layers: list[LayerCache] = []
        self.reserve(capacity)

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` tokens per slot, keeping what is cached."""
        if capacity <= self.capacity:
            return
        new_cap = max(capacity, 2 * self.capacity)
        cfg = self.cfg
        layers = []
        for i in range(cfg.num_hidden_layers):
            kv = torch.zeros(self.n_slots, new_cap, cfg.kv_lora_rank, dtype=self.dtype, device=self.device)
            pe = torch.zeros(self.n_slots, new_cap, cfg.qk_rope_head_dim, dtype=self.dtype, device=self.device)
            if self.layers:  # device-to-device copy of what was cached
                kv[:, : self.capacity] = self.layers[i].kv
                pe[:, : self.capacity] = self.layers[i].pe
            layers.append(LayerCache(kv, pe))
        self.layers, self.capacity = layers, new_cap

    @property
    def nbytes(self) -> int:
        return sum(c.kv.nbytes + c.pe.nbytes for c in self.layers)
