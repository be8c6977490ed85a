"""The MLA cache: per layer, per sequence slot, the normalized latent (C) and the RoPE'd shared key (R).

68.6 KiB per token for DeepSeek-V3 in bf16 (61 layers × 576 × 2 B), against 4.77 MiB for decompressed K/V.
Slots are rows; a sequence owns one slot for its lifetime. Capacity grows geometrically when a longer sequence
arrives (the copy is visible here, in ``reserve``).

Glossary: N slots, L layers, Smax capacity (tokens per slot), C kv_lora_rank, R rope dims, B batch, T tokens.
"""

from __future__ import annotations

import torch

from tierlm.config import ModelConfig


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype.itemsize


class KVCache:
    def __init__(self, cfg: ModelConfig, n_slots: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.n_slots, self.capacity = n_slots, 0
        self.kv = torch.empty(0)  # (L, N, Smax, C)
        self.pe = torch.empty(0)  # (L, N, Smax, R)
        self.reserve(capacity)

    def reserve(self, capacity: int) -> None:
        """Make room for ``capacity`` tokens per slot, keeping what is cached."""
        if capacity <= self.capacity:
            return
        new_cap = max(capacity, 2 * self.capacity)
        cfg, L, N = self.cfg, self.cfg.num_hidden_layers, self.n_slots
        kv = torch.zeros(L, N, new_cap, cfg.kv_lora_rank, dtype=self.dtype, device=self.device)
        pe = torch.zeros(L, N, new_cap, cfg.qk_rope_head_dim, dtype=self.dtype, device=self.device)
        if self.capacity:  # device-to-device copy of what was cached
            kv[:, :, : self.capacity] = self.kv
            pe[:, :, : self.capacity] = self.pe
        self.kv, self.pe, self.capacity = kv, pe, new_cap

    def view(self, slots: torch.Tensor) -> "SlotView":
        """The cache as seen by a batch whose row b owns slot ``slots[b]``."""
        return SlotView(self, slots)

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + self.pe.nbytes


class SlotView:
    def __init__(self, cache: KVCache, slots: torch.Tensor):
        self.cache, self.slots = cache, slots

    def write(self, layer: int, positions: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor) -> None:
        rows = self.slots[:, None].expand_as(positions)  # (B, T)
        self.cache.kv[layer, rows, positions] = kv.to(self.cache.dtype)
        self.cache.pe[layer, rows, positions] = pe.to(self.cache.dtype)

    def read(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.kv[layer, self.slots, :length], self.cache.pe[layer, self.slots, :length]
