"""Write Hugging Face-format DeepSeek checkpoints: random weights from a seed (the demo model, test fixtures),
optionally sharded and optionally in DeepSeek's FP8 block format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from tierlm.config import ModelConfig
from tierlm.weights.fp8 import quant_fp8_block


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF DeepSeek checkpoint (per-expert names), with its shape."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, D)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (D,)
        shapes[p + "post_attention_layernorm.weight"] = (D,)
        a = p + "self_attn."
        if cfg.q_lora_rank is None:
            shapes[a + "q_proj.weight"] = (H * cfg.qk_head_dim, D)
        else:
            shapes[a + "q_a_proj.weight"] = (cfg.q_lora_rank, D)
            shapes[a + "q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            shapes[a + "q_b_proj.weight"] = (H * cfg.qk_head_dim, cfg.q_lora_rank)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D)
        shapes[a + "kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
        shapes[a + "kv_b_proj.weight"] = (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        shapes[a + "o_proj.weight"] = (D, H * cfg.v_head_dim)
        m = p + "mlp."
        if cfg.is_moe_layer(i):
            I = cfg.moe_intermediate_size
            shapes[m + "gate.weight"] = (cfg.n_routed_experts, D)
            if cfg.has_gate_bias:
                shapes[m + "gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
            for e in range(cfg.n_routed_experts):
                for proj, shape in (("gate_proj", (I, D)), ("up_proj", (I, D)), ("down_proj", (D, I))):
                    shapes[f"{m}experts.{e}.{proj}.weight"] = shape
            if cfg.n_shared_experts:
                Is = I * cfg.n_shared_experts
                for proj, shape in (("gate_proj", (Is, D)), ("up_proj", (Is, D)), ("down_proj", (D, Is))):
                    shapes[f"{m}shared_experts.{proj}.weight"] = shape
        else:
            for proj, shape in (("gate_proj", (cfg.intermediate_size, D)), ("up_proj", (cfg.intermediate_size, D)),
                                ("down_proj", (D, cfg.intermediate_size))):
                shapes[f"{m}{proj}.weight"] = shape
    shapes["model.norm.weight"] = (D,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, D)
    return shapes


def random_hf_tensors(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                      std: float = 0.02) -> dict[str, torch.Tensor]:
    """Random weights with a fixed seed: projections N(0, std²), norms near 1, router bias positive (as V3's)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in hf_tensor_shapes(cfg).items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            t = 0.1 * torch.rand(shape, generator=g)
        elif name.endswith("embed_tokens.weight"):
            t = torch.randn(shape, generator=g)
        else:
            t = std * torch.randn(shape, generator=g)
        keep_fp32 = name.endswith(("gate.weight", "e_score_correction_bias"))
        out[name] = t.to(torch.float32 if keep_fp32 else dtype)
    return out


def write_hf_checkpoint(folder: str | Path, cfg: ModelConfig, tensors: dict[str, torch.Tensor], *,
                        max_shard_bytes: int | None = None, fp8: bool = False,
                        tokenizer_dir: str | Path | None = None) -> Path:
    """Write config.json, the weights (sharded with an index when ``max_shard_bytes`` is set) and, when given,
    the tokenizer files. With ``fp8``, every 2-D projection is stored as FP8 e4m3 with 128×128 block scales."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fp8:
        cfg = cfg.replace(fp8_block_size=(128, 128))
        converted: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if t.dim() == 2 and name.endswith(("proj.weight", "proj_with_mqa.weight")):
                converted[name], converted[name + "_scale_inv"] = quant_fp8_block(t, cfg.fp8_block_size)
            else:
                converted[name] = t
        tensors = converted
    (folder / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2))
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    if tokenizer_dir is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            src = Path(tokenizer_dir) / f
            if src.exists():
                shutil.copy(src, folder / f)
    return folder
