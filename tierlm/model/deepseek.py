"""The DeepSeek-V2/V3 decoder: embeddings, MLA + (dense | MoE) blocks, final norm, head.

Module names mirror Hugging Face checkpoints (``model.layers.3.self_attn.q_a_proj``…) so loading is a name
lookup; routed experts are stacked per layer (``model.layers.3.mlp.experts.gate_proj`` is (E, I, D)).

The residual stream is kept in fp32 whatever the compute dtype: DeepSeek's activations exceed fp16's range in
places, and Turing GPUs have no bf16. Each block's input is normalized in fp32 and cast to the compute dtype.

Glossary: B batch, T tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tierlm.config import ModelConfig
from tierlm.errors import NumericalError
from tierlm.model.attention import MLA, AttnImpl, CacheView
from tierlm.model.layers import MLP, RMSNorm, linear
from tierlm.model.moe import MoE
from tierlm.model.rope import Rope

# Parameters kept in fp32 whatever the compute dtype (norm weights, router weight and bias).
FP32_PARAM_SUFFIXES = ("layernorm.weight", "norm.weight", "gate.weight", "e_score_correction_bias")


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        self.index = index
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, positions, cos, sin, cache: CacheView, impl: AttnImpl,
                dtype: torch.dtype) -> torch.Tensor:
        """h (B, T, D) fp32 residual → same."""
        a = self.self_attn(self.input_layernorm(h, dtype), positions, cos, sin, cache, self.index, impl)
        h, x = self.post_attention_layernorm.add(h, a, dtype)  # the residual h + a, and its norm
        return h + self.mlp(x).float()


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """Build on the meta device and let the loader fill the weights (weights/loader.py)."""

    def __init__(self, cfg: ModelConfig, attn_impl: AttnImpl = "absorb"):
        super().__init__()
        self.config = cfg
        self.attn_impl: AttnImpl = attn_impl
        self.model = Decoder(cfg)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size)
        self.rope = Rope(cfg)
        self.dtype = torch.float32  # the compute dtype; set by the loader
        self.layer_devices: list[torch.device] | None = None  # set by the loader when layers span devices


    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: CacheView,
                pick: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions (B, T); ``cache`` the batch's view of the KV cache.
        Returns float32 logits (B, T, V), or (B, V) at index ``pick[b]`` of each row when ``pick`` (B,) is given
        (rows of different lengths are right-padded, so each row's last real token sits elsewhere).
        Raises ``NumericalError`` where a layer or the head made inf/NaN."""
        logits, finite = self.run(tokens, positions, cache, pick)
        self.check_finite(finite, logits)
        return logits

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, cache: CacheView,
            pick: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` without the check, and without a device sync when ``cache.span`` is set (what a CUDA graph
        captures): (logits, finite), ``finite`` (L,) bool saying which layers' outputs were all finite."""
        dtype = self.dtype
        h = self.model.embed_tokens(tokens).float()  # (B, T, D) fp32 residual
        cos, sin = self.rope.cos_sin(positions)
        finite = []
        for i, layer in enumerate(self.model.layers):
            dev = self.layer_devices[i] if self.layer_devices else h.device
            if h.device != dev:  # pipeline: the activations move to the next stage's GPU
                h, positions, cos, sin = h.to(dev), positions.to(dev), cos.to(dev), sin.to(dev)
            # kernels (Triton) launch on the current CUDA device: make it the layer's own
            with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
                h = layer(h, positions, cos, sin, cache, self.attn_impl, dtype)
            finite.append(torch.isfinite(h).all().to(tokens.device))
        if pick is not None:
            h = h[torch.arange(h.shape[0], device=h.device), pick.to(h.device)]  # (B, D)
        head = self.model.norm.weight.device
        if h.device != head:
            h = h.to(head)  # to the last stage, which holds the head
        with torch.cuda.device(head) if head.type == "cuda" else contextlib.nullcontext():
            logits = self.lm_head(self.model.norm(h, dtype)).float()
        # back where the tokens came from (the first stage), for sampling
        return logits.to(tokens.device), torch.stack(finite)

    def check_finite(self, finite: torch.Tensor, logits: torch.Tensor) -> None:
        """Raise ``NumericalError`` naming the first layer (or the head) that made inf/NaN: one device sync."""
        if bool(finite.all()) and bool(torch.isfinite(logits).all()):
            return
        bad = int((~finite).nonzero()[0]) if not bool(finite.all()) else None
        where = f"in layer {bad}" if bad is not None else "in the output head"
        fix = ("use --dtype bfloat16 (Ampere or newer) or --dtype float32"
               if self.dtype == torch.float16 else "check the checkpoint's weights for inf/NaN")
        raise NumericalError(f"the forward pass produced inf/NaN {where} (compute dtype {self.dtype}); {fix}")
