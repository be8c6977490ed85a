"""``tierlm convert``: a Hugging Face DeepSeek checkpoint (bf16/fp16/fp32 or FP8-block) → a ``deepseek2`` GGUF.

Written the way llama.cpp's own converter and ``llama-quantize`` write it: the same metadata keys and tensor
names, the split MLA layout (``attn_k_b``/``attn_v_b``), expert-group keys, a tokenizer section, and for
``Q4_K_M`` llama.cpp's type mix (plan/inventory.py holds the rules, shared with the planner). Tensors are
converted and written one at a time (streamed), so the model is never held in memory whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import torch

from tierlm.config import ModelConfig
from tierlm.errors import CheckpointError, ConfigError
from tierlm.plan.inventory import normalize_recipe, recipe_inventory
from tierlm.weights.ggml_types import GGMLType, tensor_nbytes
from tierlm.weights.gguf_names import param_name
from tierlm.weights.loader import HFReader
from tierlm.weights.quantize import quantize
from tierlm.weights.safetensors_io import SafetensorsCheckpoint

QUANTS = {"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
          "Q4_K_M": gguf.LlamaFileType.MOSTLY_Q4_K_M}


def convert(src: str | Path, dst: str | Path, quant: str = "Q4_K_M", split_max_size: int = 0,
            progress: Callable[[str, int, int], None] | None = None) -> list[Path]:
    """Convert the checkpoint folder ``src`` into ``dst`` (a .gguf path; with ``split_max_size`` bytes per
    shard, ``dst``'s stem gets ``-0000i-of-0000n``). Returns the files written."""
    quant = normalize_recipe(quant)
    if quant not in QUANTS:
        raise ConfigError(f"tierlm convert writes {', '.join(QUANTS)}; {quant} is not one of them")
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".gguf":
        raise ConfigError(f"{dst} must end in .gguf")
    cfg = ModelConfig.from_json(src / "config.json")
    ckpt = SafetensorsCheckpoint(src)
    reader = HFReader(ckpt, cfg)
    inventory = recipe_inventory(cfg, quant)

    writer = gguf.GGUFWriter(dst, "deepseek2", split_max_size=split_max_size)
    _write_metadata(writer, cfg, QUANTS[quant], src.name)
    _write_tokenizer(writer, src, cfg)
    for t in inventory.tensors:
        qtype = GGMLType[t.dtype]
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), tensor_nbytes(qtype, t.shape), raw_dtype=qtype)
    files = writer.format_shard_names(dst) if len(writer.tensors) > 1 else [dst]
    dst.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file(dst)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    total = sum(t.nbytes for t in inventory.tensors)
    done = 0
    for t in inventory.tensors:
        x = _source_tensor(reader, cfg, t.name)
        if tuple(x.shape) != tuple(t.shape):
            raise CheckpointError(f"{t.name}: the checkpoint gives shape {list(x.shape)}, the config implies "
                                  f"{list(t.shape)}; config.json does not match the weights")
        writer.write_tensor_data(_encode(x, GGMLType[t.dtype]))
        done += t.nbytes
        if progress:
            progress(t.name, done, total)
    writer.close()
    return files


def _encode(x: torch.Tensor, qtype: GGMLType) -> np.ndarray:
    if qtype == GGMLType.F32:
        return x.float().numpy()
    if qtype == GGMLType.F16:
        return x.to(torch.float16).numpy()
    return quantize(x.float(), qtype).numpy()


def _source_tensor(reader: HFReader, cfg: ModelConfig, name: str) -> torch.Tensor:
    """The float32 tensor the GGUF tensor ``name`` holds, built from the HF checkpoint."""
    if name.endswith(("attn_k_b.weight", "attn_v_b.weight")):
        layer = name.split(".")[1]
        kv_b = reader.read(f"model.layers.{layer}.self_attn.kv_b_proj.weight").float()
        w = kv_b.view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        if name.endswith("attn_k_b.weight"):
            return w[:, : cfg.qk_nope_head_dim].transpose(1, 2).contiguous()  # (H, C, Dn) = W_UKᵀ per head
        return w[:, cfg.qk_nope_head_dim:].contiguous()  # (H, Dv, C) = W_UV per head
    param = param_name(name)
    if param is None:
        raise CheckpointError(f"no source for GGUF tensor {name}")
    if ".mlp.experts." in param:  # stacked: one HF tensor per expert
        prefix, proj = param.rsplit(".", 1)
        return torch.stack([reader.read(f"{prefix}.{e}.{proj}.weight").float()
                            for e in range(cfg.n_routed_experts)])
    return reader.read(param).float()


def _write_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, ftype: int, name: str) -> None:
    w.add_name(name)
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA written as one shared latent "head", as llama.cpp's converter does
    if cfg.q_lora_rank is not None:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    y = cfg.rope_scaling
    if y is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(y.factor)
        w.add_rope_scaling_orig_ctx_len(y.original_max_position_embeddings)
        w.add_rope_scaling_yarn_log_mul(0.1 * y.mscale_all_dim)
        w.add_rope_scaling_yarn_beta_fast(y.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(y.beta_slow)
    if cfg.n_routed_experts:
        w.add_expert_count(cfg.n_routed_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_shared_count(cfg.n_shared_experts)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_weights_scale(cfg.routed_scaling_factor)
        w.add_expert_weights_norm(cfg.norm_topk_prob)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
        if cfg.topk_method != "greedy" and cfg.n_group > 1:
            w.add_expert_group_count(cfg.n_group)
            w.add_expert_group_used_count(cfg.topk_group)


def _looks_like_control(token: str) -> bool:
    """Control tokens some checkpoints leave unflagged (DeepSeek's <｜User｜>…), marked CONTROL as llama.cpp does."""
    return (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<|") and token.endswith("|>"))


def _pre_tokenizer_name(tj: dict, folder: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer regexes: DeepSeek-V3's, or GPT-2's byte-level one."""
    from tierlm.weights.gguf_tokenizer import deepseek_pretokenizer

    pre = tj.get("pre_tokenizer") or {}
    if pre == deepseek_pretokenizer():
        return "deepseek-v3"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise CheckpointError(f"{folder / 'tokenizer.json'}: its pre-tokenizer is neither DeepSeek-V3's nor GPT-2's "
                          "byte-level one; tierlm cannot describe it in a GGUF")


def _write_tokenizer(w: gguf.GGUFWriter, src: Path, cfg: ModelConfig) -> None:
    """The ``tokenizer.ggml.*`` section from the checkpoint's tokenizer.json (byte-level BPE, as DeepSeek's)."""
    from tierlm.runtime.demo import tokenizer_files_dir

    folder = src if (src / "tokenizer.json").exists() else tokenizer_files_dir()
    tj = json.loads((folder / "tokenizer.json").read_text())
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise CheckpointError(f"{folder / 'tokenizer.json'} is not a BPE tokenizer; DeepSeek GGUFs need one")
    vocab: dict[str, int] = dict(model["vocab"])
    special: set[int] = set()
    user_defined: set[int] = set()  # added tokens matched literally in text, but not control tokens
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        (special if t.get("special") or _looks_like_control(t["content"]) else user_defined).add(t["id"])
    if max(vocab.values()) >= cfg.vocab_size:
        raise CheckpointError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's vocab_size "
                              f"{cfg.vocab_size}; the tokenizer belongs to another model")
    by_id = {i: tok for tok, i in vocab.items()}
    tokens, types = [], []
    for i in range(cfg.vocab_size):  # ids without a token are padding of the embedding table
        tok = by_id.get(i)
        tokens.append(tok if tok is not None else f"[PAD{i}]")
        types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i in user_defined
                     else gguf.TokenType.NORMAL if tok is not None else gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tc_file = folder / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text()) if tc_file.exists() else {}

    def special_id(key: str, fallback: int | None) -> int | None:
        """The tokenizer's own BOS/EOS when tokenizer_config.json names them, else config.json's id."""
        tok = tc.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return vocab.get(tok, fallback) if isinstance(tok, str) else fallback

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer_name(tj, folder))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    bos = special_id("bos_token", cfg.bos_token_id)
    eos = special_id("eos_token", cfg.eos_token_ids[0] if cfg.eos_token_ids else None)
    if bos is not None:
        w.add_bos_token_id(bos)
    if eos is not None:
        w.add_eos_token_id(eos)
    w.add_add_bos_token(bool(tc.get("add_bos_token", True)))
    w.add_add_eos_token(False)
    if isinstance(tc.get("chat_template"), str):
        w.add_chat_template(tc["chat_template"])
