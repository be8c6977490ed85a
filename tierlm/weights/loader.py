"""Fill a meta-built DeepseekForCausalLM from a Hugging Face checkpoint.

Names map one to one (the model mirrors HF's module names) except for the routed experts, which are stacked per
layer. Conversions done here, tensor by tensor: FP8 e4m3 block dequantization, the compute dtype, and the RoPE
row permutation for checkpoints written for the half-split ("rotate_half") layout.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from tierlm.config import ModelConfig
from tierlm.errors import CheckpointError
from tierlm.model.deepseek import FP32_PARAM_SUFFIXES, DeepseekForCausalLM
from tierlm.runtime.placement import device_of
from tierlm.weights.fp8 import dequant_fp8_block
from tierlm.weights.safetensors_io import SafetensorsCheckpoint

_EXPERT_PARAM = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$|weight_scale_inv$")


def rope_rows_to_adjacent(w: torch.Tensor, n_heads: int, head_dim: int, rope_dim: int) -> torch.Tensor:
    """Reorder the rope rows of each head from half-split (x_i pairs with x_{i+R/2}) to adjacent pairs."""
    half = rope_dim // 2
    perm = torch.arange(rope_dim).view(2, half).t().flatten()  # [0, R/2, 1, R/2+1, …]
    w = w.view(n_heads, head_dim, -1).clone()
    w[:, head_dim - rope_dim:] = w[:, head_dim - rope_dim:][:, perm]
    return w.view(n_heads * head_dim, -1)


class HFReader:
    """Reads one HF tensor as float (FP8 dequantized) with its conversions applied."""

    def __init__(self, ckpt: SafetensorsCheckpoint, cfg: ModelConfig):
        self.ckpt, self.cfg = ckpt, cfg
        self.used: set[str] = set()

    def read(self, name: str) -> torch.Tensor:
        t = self.ckpt.get(name)
        self.used.add(name)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_name = name + "_scale_inv"
            if scale_name not in self.ckpt:
                raise CheckpointError(f"tensor {name!r} is FP8 but {scale_name!r} is missing; the checkpoint is "
                                      "incomplete, re-download it")
            if self.cfg.fp8_block_size is None:
                raise CheckpointError(f"tensor {name!r} is FP8 but config.json has no quantization_config; "
                                      "use the checkpoint's own config.json")
            self.used.add(scale_name)
            t = dequant_fp8_block(t, self.ckpt.get(scale_name), self.cfg.fp8_block_size)
        elif not t.is_floating_point():
            raise CheckpointError(f"tensor {name!r} has dtype {t.dtype}; expected a floating-point weight")
        cfg = self.cfg
        if not cfg.rope_interleave and cfg.model_type == "deepseek_v3":
            if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
                t = rope_rows_to_adjacent(t, cfg.num_attention_heads, cfg.qk_head_dim, cfg.qk_rope_head_dim)
            elif name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
                t = rope_rows_to_adjacent(t, 1, cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim)
        return t


def _check_shape(name: str, got: tuple, want: tuple, file: str) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"tensor {name!r} in {file} has shape {list(got)} but config.json implies "
                              f"{list(want)}; the config does not match the weights")


def load_hf_weights(model: DeepseekForCausalLM, ckpt: SafetensorsCheckpoint, device,
                    dtype: torch.dtype, progress: Callable[[int], None] | None = None) -> None:
    """Materialize every parameter of ``model`` (built on the meta device) from ``ckpt``, on ``device`` (one
    device, or a runtime.placement.DeviceMap that spreads the layers over GPUs)."""
    cfg = model.config
    model.dtype = dtype
    reader = HFReader(ckpt, cfg)
    for pname, param in list(model.named_parameters()):
        want_dtype = torch.float32 if pname.endswith(FP32_PARAM_SUFFIXES) else dtype
        m = _EXPERT_PARAM.match(pname)
        if m:
            value = _load_experts(reader, m.group(1), m.group(2), tuple(param.shape), device_of(device, pname),
                                  want_dtype)
        else:
            src = pname
            if pname == "lm_head.weight" and cfg.tie_word_embeddings and src not in ckpt:
                src = "model.embed_tokens.weight"
            entry = ckpt.entry(src)
            _check_shape(src, entry.shape, param.shape, entry.file.name)
            value = reader.read(src).to(device=device_of(device, pname), dtype=want_dtype)
        set_param(model, pname, value)
        if progress:
            progress(value.numel() * value.element_size())
    extra = [n for n in ckpt.names() if n not in reader.used and not _IGNORED.search(n)
             and not _is_mtp(n, cfg)]
    if extra:
        raise CheckpointError(f"the checkpoint has {len(extra)} tensor(s) the model does not use, e.g. "
                              f"{extra[0]!r}; config.json does not match the weights")


def _load_experts(reader: HFReader, prefix: str, proj: str, shape: tuple, device, dtype) -> torch.Tensor:
    E = shape[0]
    ckpt = reader.ckpt
    fused = f"{prefix}.gate_up_proj" if proj != "down_proj" else f"{prefix}.down_proj"
    if f"{prefix}.0.{proj}.weight" not in ckpt and fused in ckpt:  # transformers v5 stores experts fused
        t = reader.read(fused)
        if proj != "down_proj":
            t = t.view(E, 2, shape[1], shape[2])[:, 0 if proj == "gate_proj" else 1]
        _check_shape(fused, t.shape, shape, ckpt.entry(fused).file.name)
        return t.to(device=device, dtype=dtype)
    out = torch.empty(shape, device=device, dtype=dtype)
    for e in range(E):
        name = f"{prefix}.{e}.{proj}.weight"
        entry = ckpt.entry(name)
        _check_shape(name, entry.shape, shape[1:], entry.file.name)
        out[e].copy_(reader.read(name))
    return out


def _is_mtp(name: str, cfg: ModelConfig) -> bool:
    """Multi-token-prediction layers are stored after the last decoder layer; inference ignores them."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return m is not None and int(m.group(1)) >= cfg.num_hidden_layers


def set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the (meta) parameter ``name`` by ``value``, frozen: inference never trains it."""
    module_name, _, leaf = name.rpartition(".")
    model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(value, requires_grad=False)
