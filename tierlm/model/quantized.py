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
from tierlm.kernels.moe import moe_quant, swiglu_q8
from tierlm.kernels.q6k_layout import align_, aligns, alignable, from_aligned, to_aligned, unalign_
from tierlm.kernels.quant_matmul import FUSED_TYPES, quant_matmul
from tierlm.weights.formats import dequantize
from tierlm.weights.ggml_types import GGMLType, ggml_type


class AlignsQ6K(nn.Module):
    """Q6_K buffers (``_q6k``: their names) held in the aligned layout (``kernels.q6k_layout``) while they are on a
    CUDA device, where the one-row decode kernels read it 1.2-1.6x faster, and in GGUF's elsewhere. The bytes are
    converted in place when the layer is built or moved (``_apply``: ``.to``, ``.cuda``, ``.cpu``): a layer owns
    the tensors it is built from, as it does the loader's copies. ``aligned`` says which layout they are in now.
    ``state_dict`` gives, and ``load_state_dict`` takes, GGUF's layout."""

    ALIGNED_ON = ("cuda",)  # device types whose Q6_K bytes are held aligned
    _q6k: tuple[str, ...] = ()
    aligned = False

    def _init_layout(self, names: tuple[str, ...], rows_align: bool) -> None:
        """names: the Q6_K buffers; rows_align: whether their rows gain from the layout (``q6k_layout.alignable``)."""
        self._q6k = names if rows_align else ()
        self._register_state_dict_hook(AlignsQ6K._gguf_state)
        self._register_load_state_dict_pre_hook(self._align_state)
        self._set_layout()

    def _set_layout(self) -> None:
        want = bool(self._q6k) and getattr(self, self._q6k[0]).device.type in self.ALIGNED_ON
        if want != self.aligned:
            for name in self._q6k:
                (align_ if want else unalign_)(getattr(self, name))
            self.aligned = want

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._set_layout()
        return self

    @staticmethod
    def _gguf_state(module, state, prefix, local_metadata):
        if module.aligned:
            for name in module._q6k:
                state[prefix + name] = from_aligned(state[prefix + name])

    def _align_state(self, state, prefix, *args):
        if self.aligned:
            for name in self._q6k:
                if prefix + name in state:
                    state[prefix + name] = to_aligned(state[prefix + name].contiguous())


class QuantLinear(AlignsQ6K):
    def __init__(self, qweight: torch.Tensor, qtype: GGMLType | int, in_features: int, out_features: int):
        super().__init__()
        self.qtype, self.in_features, self.out_features = ggml_type(qtype), in_features, out_features
        self.register_buffer("qweight", qweight.reshape(out_features, -1))  # (N, RB) uint8
        self._init_layout(("qweight",), self.qtype == GGMLType.Q6_K and alignable(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, self.qweight, self.qtype, self.in_features, aligned=self.aligned)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as a dense (N, K) tensor."""
        w = from_aligned(self.qweight) if self.aligned else self.qweight
        return dequantize(w, self.qtype, (self.out_features, self.in_features), dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features} → {self.out_features}, {self.qtype.name}"


# Rows of activations up to which a SwiGLU MLP of quantized projections (the dense layers, the shared experts) takes
# its gate and up from one launch (``fused_mlp``): measured at one row only (bench/results/mlp-NVIDIA_H200*.json). At
# more rows that launch would read the matrices once per row.
FUSED_MLP_MAX_ROWS = 1


def fused_mlp(gate: nn.Module, up: nn.Module, down: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """down(silu(gate x) * up x) with gate and up in one launch (``kernels.moe.swiglu_q8``: x quantized once, then
    the MoE's int8 gate/up launch of one expert, Q4_K gate and up rows side by side), h kept in float32 for the down
    product (``quant_matmul``, which writes x's dtype). None where that path does not apply: projections other than plain
    ``QuantLinear``, gate and up not of the fused types, a CPU, more than FUSED_MLP_MAX_ROWS rows, a gradient asked
    for (the kernels have no backward), or mismatched shapes."""
    ms = (gate, up, down)
    if not x.is_cuda or any(type(m) is not QuantLinear for m in ms):
        return None
    rows = x.numel() // x.shape[-1]
    if (rows > FUSED_MLP_MAX_ROWS or not (gate.qtype in FUSED_TYPES and up.qtype in FUSED_TYPES)
            or (torch.is_grad_enabled() and x.requires_grad)):
        return None
    if gate.in_features != x.shape[-1] or up.in_features != gate.in_features or \
            up.out_features != gate.out_features or down.in_features != gate.out_features:
        return None
    if gate.qtype == up.qtype == GGMLType.Q6_K and gate.aligned != up.aligned:
        return None  # the one launch reads its Q6_K rows in one layout
    h = swiglu_q8(x.reshape(rows, -1), gate.qweight, up.qweight, gate.qtype, up.qtype,
                  aligned=gate.aligned or up.aligned)
    y = quant_matmul(h, down.qweight, down.qtype, down.in_features, aligned=down.aligned, out_dtype=x.dtype)
    return y.view(*x.shape[:-1], down.out_features)


class QuantEmbedding(nn.Module):
    """Token embeddings in a block format: only the looked-up rows are dequantized."""

    def __init__(self, qweight: torch.Tensor, qtype: GGMLType | int, num_embeddings: int, dim: int):
        super().__init__()
        self.qtype, self.num_embeddings, self.dim = ggml_type(qtype), num_embeddings, dim
        self.register_buffer("qweight", qweight.reshape(num_embeddings, -1))  # (V, RB) uint8

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[ids.flatten()]  # (n, RB)
        return dequantize(rows, self.qtype, (rows.shape[0], self.dim)).view(*ids.shape, self.dim)


class QuantRoutedExperts(AlignsQ6K):
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
        q6 = tuple(n for n, t in zip(("gate_q", "up_q", "down_q"), self.types) if t == GGMLType.Q6_K)
        self._init_layout(q6, aligns(self.types, (dim, dim, inter)))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        g = quant_matmul(x, self.gate_q[e], self.types[0], self.dim, aligned=self.aligned)
        u = quant_matmul(x, self.up_q[e], self.types[1], self.dim, aligned=self.aligned)
        return quant_matmul(F.silu(g) * u, self.down_q[e], self.types[2], self.inter, aligned=self.aligned)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """On a GPU with Q4_K/Q6_K/Q8_0/Q5_0 weights and a decode-sized batch: the fused MoE kernels (two
        launches for every expert of the layer). Otherwise one call per active expert."""
        from tierlm.model.moe import dispatch

        if x.is_cuda and self.fusable and ids.numel() < MOE_DEFAULT.sorted_min_pairs:
            return moe_quant(x, ids, weights.float(), self.gate_q, self.up_q, self.down_q, *self.types,
                             aligned=self.aligned)
        return dispatch(self.expert, self.n_experts, x, ids, weights)
