"""Fill a meta-built DeepseekForCausalLM from a ``deepseek2`` GGUF file (single or split).

Quantized tensors stay quantized: their modules are swapped for the block-format layers of model/quantized.py
(the raw bytes are copied from the memory map to the device once). F32/F16/BF16 tensors become dense
parameters. Norms, the router and its bias are kept in fp32. MLA's kv_b projection is rebuilt dense from
``attn_k_b``/``attn_v_b`` (or the legacy ``attn_kv_b``): the absorbed attention multiplies by it per head.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from tierlm.errors import CheckpointError
from tierlm.model.deepseek import FP32_PARAM_SUFFIXES, DeepseekForCausalLM
from tierlm.model.quantized import QuantEmbedding, QuantLinear, QuantRoutedExperts
from tierlm.runtime.placement import device_of
from tierlm.weights.formats import dequantize
from tierlm.weights.ggml_types import GGMLType
from tierlm.weights.gguf_io import GGUFFile
from tierlm.weights.gguf_names import gguf_name
from tierlm.weights.loader import set_param

DENSE_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


def load_gguf_weights(model: DeepseekForCausalLM, gf: GGUFFile, device: torch.device | str, dtype: torch.dtype,
                      progress: Callable[[int], None] | None = None, keep_quantized: bool = True,
                      placement=None, stats=None) -> None:
    """``placement`` (runtime.placement.Placement): routed experts go to tiers (device, RAM, disk) instead of
    all onto ``device``; ``stats`` (runtime.experts.TierStats) then counts their use."""
    cfg = model.config
    model.dtype = dtype
    used: set[str] = set()

    def raw(name: str, dev) -> tuple[torch.Tensor, object]:
        info = gf.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{gf.path.name} has no tensor {name!r}; the file is incomplete or not a "
                                  "DeepSeek model")
        used.add(name)
        data = torch.from_numpy(np.asarray(gf.tensor_bytes(name)).copy())  # one tensor at a time off the map
        return data.to(dev), info

    def dense(name: str, shape: tuple, want: torch.dtype, dev) -> torch.Tensor:
        data, info = raw(name, dev)
        if tuple(info.shape) != tuple(shape):
            raise CheckpointError(f"{name} in {info.file.name} has shape {list(info.shape)} but the metadata "
                                  f"implies {list(shape)}; the file is inconsistent")
        return dequantize(data, info.ggml_type, info.shape, want)

    quantized_done: set[str] = set()
    for pname, param in list(model.named_parameters()):
        if pname in quantized_done:
            continue
        want = torch.float32 if pname.endswith(FP32_PARAM_SUFFIXES) else dtype
        dev = device_of(device, pname)
        if pname.endswith("self_attn.kv_b_proj.weight"):
            value = _kv_b(cfg, pname, gf, lambda *a: dense(*a, dev), dtype)
        elif ".mlp.experts." in pname and placement is not None:
            _tiered_experts(model, cfg, pname, gf, dev, placement, stats, used, quantized_done, progress)
            continue
        elif ".mlp.experts." in pname:
            value = _experts(model, cfg, pname, gf, lambda n: raw(n, dev), lambda *a: dense(*a, dev), dtype,
                             keep_quantized, quantized_done)
            if value is None:
                continue
        else:
            name = gguf_name(pname)
            if pname == "lm_head.weight" and name not in gf.tensors and cfg.tie_word_embeddings:
                name = "token_embd.weight"
            info = gf.tensors.get(name)
            if info is not None and keep_quantized and info.ggml_type not in DENSE_TYPES and want == dtype:
                _swap_quantized(model, pname, raw(name, dev)[0], info)
                if progress:
                    progress(info.nbytes)
                continue
            value = dense(name, tuple(param.shape), want, dev)
        set_param(model, pname, value)
        if progress:
            progress(value.numel() * value.element_size())
    extra = sorted(n for n in gf.tensors if n not in used and not _is_mtp(n, cfg.num_hidden_layers))
    if extra:
        raise CheckpointError(f"{gf.path.name} has {len(extra)} tensor(s) the model does not use, e.g. "
                              f"{extra[0]!r}; the metadata does not match the tensors")


def _kv_b(cfg, pname: str, gf: GGUFFile, dense, dtype) -> torch.Tensor:
    layer = pname.split(".")[2]
    H, dn, dv, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    if f"blk.{layer}.attn_k_b.weight" in gf.tensors:
        k_b = dense(f"blk.{layer}.attn_k_b.weight", (H, C, dn), torch.float32)  # W_UKᵀ per head
        v_b = dense(f"blk.{layer}.attn_v_b.weight", (H, dv, C), torch.float32)  # W_UV per head
        return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(H * (dn + dv), C).to(dtype)
    return dense(f"blk.{layer}.attn_kv_b.weight", (H * (dn + dv), C), dtype)


def _experts(model, cfg, pname, gf, raw, dense, dtype, keep_quantized, done) -> torch.Tensor | None:
    prefix = pname.rsplit(".", 1)[0]  # model.layers.N.mlp.experts
    names = [gguf_name(f"{prefix}.{p}") for p in ("gate_proj", "up_proj", "down_proj")]
    infos = [gf.tensors.get(n) for n in names]
    if any(i is None for i in infos):
        missing = names[infos.index(None)]
        raise CheckpointError(f"{gf.path.name} has no tensor {missing!r}; the file is incomplete")
    if keep_quantized and all(i.ggml_type not in DENSE_TYPES for i in infos):
        E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        want = [(E, I, D), (E, I, D), (E, D, I)]
        for n, i, w in zip(names, infos, want):
            if tuple(i.shape) != w:
                raise CheckpointError(f"{n} has shape {list(i.shape)} but the metadata implies {list(w)}")
        gate, up, down = (raw(n)[0] for n in names)
        mod = QuantRoutedExperts(gate, up, down, tuple(i.ggml_type for i in infos), E, D, I)
        parent = model.get_submodule(prefix.rsplit(".", 1)[0])
        parent.experts = mod
        done.update(f"{prefix}.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
        return None
    param = model.get_parameter(pname)
    return dense(gguf_name(pname), tuple(param.shape), dtype)


def _tiered_experts(model, cfg, pname, gf: GGUFFile, device, placement, stats, used, done, progress) -> None:
    """One MoE layer's experts into a TieredExperts: device slots filled from the file, RAM copies made,
    disk experts left as views of the memory map."""
    import warnings

    from tierlm.runtime.experts import HostExpert, TieredExperts, file_descriptor

    prefix = pname.rsplit(".", 1)[0]  # model.layers.N.mlp.experts
    layer = int(prefix.split(".")[2])
    names = [gguf_name(f"{prefix}.{p}") for p in ("gate_proj", "up_proj", "down_proj")]
    infos = [gf.tensors.get(n) for n in names]
    if any(i is None for i in infos):
        raise CheckpointError(f"{gf.path.name} has no tensor {names[infos.index(None)]!r}; the file is incomplete")
    E, I, D = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
    rows = (I, I, D)
    per_expert = [i.nbytes // E for i in infos]
    row_bytes = tuple(pe // r for pe, r in zip(per_expert, rows))
    tiers = placement.tiers[layer]
    mod = TieredExperts(layer, tuple(i.ggml_type for i in infos), E, D, I, torch.device(device),
                        placement.slots[layer], stats, row_bytes, gpu_batch_threshold=placement.copy_threshold)
    maps = [gf.tensor_bytes(n) for n in names]
    pin = torch.cuda.is_available()
    with warnings.catch_warnings():  # the map is read-only and is never written through these views
        warnings.simplefilter("ignore", UserWarning)
        for e in range(E):
            views = [torch.from_numpy(m[e * pe:(e + 1) * pe]).view(r, rb)
                     for m, pe, r, rb in zip(maps, per_expert, rows, row_bytes)]
            if tiers[e] == "ram":
                host = tuple(torch.empty(v.shape, dtype=torch.uint8, pin_memory=pin).copy_(v) for v in views)
                mod.put_host(e, HostExpert("ram", host))  # disk → RAM
            else:  # device experts keep their disk view too: evicted, they are read from there again
                extents = tuple((file_descriptor(str(i.file)), i.offset + e * pe, pe)
                                for i, pe in zip(infos, per_expert))
                mod.put_host(e, HostExpert("disk", tuple(views), extents))
                if tiers[e] == "device":
                    mod.put_device(e, *views)  # disk → device
    used.update(names)
    model.get_submodule(prefix.rsplit(".", 1)[0]).experts = mod
    done.update(f"{prefix}.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
    if progress:
        progress(sum(i.nbytes for i in infos))


def _swap_quantized(model: nn.Module, pname: str, data: torch.Tensor, info) -> None:
    """Replace the dense module owning ``pname`` by its block-format twin."""
    module_name = pname.rsplit(".", 1)[0]
    parent_name, _, leaf = module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, leaf)
    if isinstance(old, nn.Linear):
        new = QuantLinear(data, info.ggml_type, old.in_features, old.out_features)
        if tuple(info.shape) != (old.out_features, old.in_features):
            raise CheckpointError(f"{info.name} has shape {list(info.shape)} but the metadata implies "
                                  f"{[old.out_features, old.in_features]}")
    elif isinstance(old, nn.Embedding):
        new = QuantEmbedding(data, info.ggml_type, old.num_embeddings, old.embedding_dim)
    else:
        raise CheckpointError(f"{info.name} is {info.ggml_type.name}, which tierlm cannot use for {pname}")
    setattr(parent, leaf, new)


def _is_mtp(name: str, n_layers: int) -> bool:
    return name.startswith("blk.") and int(name.split(".")[1]) >= n_layers

