"""Layers whose weights stay in a GGUF block format (Q4_K, Q6_K, Q8_0, …) in memory.

Same math as the dense layers they replace; the matmul goes through ``kernels.quant_matmul`` (fused Triton
kernels on GPUs, dequantize-and-multiply on the CPU). Raw bytes are buffers, not parameters: they are not trained.

Glossary: N output rows, K input features, E experts, I expert intermediate size, RB bytes per row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tierlm.kernels.moe import DEFAULT as MOE_DEFAULT
from tierlm.kernels.moe import moe_quant
from tierlm.kernels.quant_matmul import FUSED_TYPES, quant_matmul
from tierlm.weights.formats import dequantize
from tierlm.weights.ggml_types import GGMLType, ggml_type


class QuantLinear(nn.Module):
    def __init__(self, qweight: torch.Tensor, qtype: GGMLType | int, in_features: int, out_features: int):
        super().__init__()
        self.qtype, self.in_features, self.out_features = ggml_type(qtype), in_features, out_features
        self.register_buffer("qweight", qweight.reshape(out_features, -1))  # (N, RB) uint8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self.qweight, self.qtype, self.in_features)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense (N, K) tensor."""
        return dequantize(self.qweight, self.qtype, (self.out_features, self.in_features), dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} → {self.out_features}, {self.qtype.name}"


class QuantEmbedding(nn.Module):
    """Token embeddings in a block format: only the looked-up rows are dequantized."""

    def __init__(self, qweight: torch.Tensor, qtype: GGMLType | int, num_embeddings: int, dim: int):
        super().__init__()
        self.qtype, self.num_embeddings, self.dim = ggml_type(qtype), num_embeddings, dim
        self.register_buffer("qweight", qweight.reshape(num_embeddings, -1))  # (V, RB) uint8

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[ids.flatten()]  # (n, RB)
        return dequantize(rows, self.qtype, (rows.shape[0], self.dim)).view(*ids.shape, self.dim)


class QuantRoutedExperts(nn.Module):
    """All routed experts of one layer in block formats (GGUF's stacked ``ffn_*_exps``). Same dispatch as
    ``moe.RoutedExperts``: tokens grouped per expert, each active expert run once."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 types: tuple[int, int, int], n_experts: int, dim: int, inter: int):
        super().__init__()
        self.types = tuple(ggml_type(t) for t in types)
        self.fusable = all(t in FUSED_TYPES for t in self.types)  # the fused MoE kernels decode these types
        self.dim, self.inter, self.n_experts = dim, inter, n_experts
        self.register_buffer("gate_q", gate.reshape(self.n_experts, inter, -1))  # (E, I, RB)
        self.register_buffer("up_q", up.reshape(self.n_experts, inter, -1))  # (E, I, RB)
        self.register_buffer("down_q", down.reshape(self.n_experts, dim, -1))  # (E, D, RB)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        g = quant_matmul(x, self.gate_q[e], self.types[0], self.dim)
        u = quant_matmul(x, self.up_q[e], self.types[1], self.dim)
        return quant_matmul(F.silu(g) * u, self.down_q[e], self.types[2], self.inter)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """On a GPU with Q4_K/Q6_K/Q8_0/Q5_0 weights and a decode-sized batch: the fused MoE kernels (two
        launches for every expert of the layer). Otherwise one call per active expert."""
        from tierlm.model.moe import dispatch

        if x.is_cuda and self.fusable and ids.numel() < MOE_DEFAULT.sorted_min_pairs:
            return moe_quant(x, ids, weights.float(), self.gate_q, self.up_q, self.down_q, *self.types)
        return dispatch(self.expert, self.n_experts, x, ids, weights)
