"""ModelConfig, attention layout and tokenizer data from the metadata of a llama.cpp ``deepseek2`` GGUF.

Key names and their HF meaning follow the shared reference §3.2. Where a key is optional, the default is the one
llama.cpp's loader uses, so a file means here what it means to llama.cpp. Pure Python: no torch import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from gguf import ExpertGatingFuncType, Keys

from tierlm.config import ModelConfig, YarnScaling
from tierlm.errors import ConfigError

ARCHITECTURE = "deepseek2"
Layout = Literal["split", "legacy"]
_REQUIRED = object()
_ATTN_TENSOR = re.compile(r"^blk\.\d+\.attn_(k_b|v_b|kv_b)\.weight$")


class _Meta:
    """Typed reads of GGUF metadata; every error names the key."""

    def __init__(self, metadata: dict[str, Any], prefix: str = ""):
        self.md, self.prefix = metadata, prefix

    def get(self, key: str, kind: type, default: Any = _REQUIRED, why: str = "") -> Any:
        full = self.prefix + key
        if full not in self.md:
            if default is _REQUIRED:
                raise ConfigError(f"GGUF metadata lacks {full!r}{why}; the file is not a complete {ARCHITECTURE} "
                                  "model (re-convert it with a current llama.cpp)")
            return default
        v = self.md[full]
        if isinstance(v, np.ndarray) and kind is not list and v.ndim == 1 and v.size and (v == v[0]).all():
            v = v[0].item()  # a per-layer array with one value for every layer (e.g. head_count_kv)
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if kind is int and (not isinstance(v, int) or isinstance(v, bool)):
            raise ConfigError(f"GGUF metadata {full!r} = {v!r} is not an integer")
        if kind is int and v < 0:
            raise ConfigError(f"GGUF metadata {full!r} = {v} is negative")
        if kind is not int and not isinstance(v, kind):
            raise ConfigError(f"GGUF metadata {full!r} = {v!r} is not a {kind.__name__}")
        return v


def config_from_gguf(metadata: dict[str, Any], tensor_names: Iterable[str] | None = None) -> ModelConfig:
    """The ``ModelConfig`` of a ``deepseek2`` GGUF (DeepSeek-V2/V2.5/V3/R1) from its metadata.

    ``tensor_names`` (the file's tensor table) settles what metadata cannot: whether the router has the
    score-correction bias (``exp_probs_b`` → ``noaux_tc`` routing) and whether the output head is tied to the
    embedding. Without it, a sigmoid-gated model is assumed to have the bias, as every DeepSeek-V3/R1 file does.
    """
    arch = metadata.get(Keys.General.ARCHITECTURE)
    if arch != ARCHITECTURE:
        raise ConfigError(f"GGUF architecture is {arch!r}; tierlm runs {ARCHITECTURE!r} files "
                          "(DeepSeek-V2, V2.5, V3, R1)")
    m = _Meta(metadata, f"{ARCHITECTURE}.")
    names = set(tensor_names) if tensor_names is not None else None

    heads = m.get("attention.head_count", int)
    rope_dim = m.get("rope.dimension_count", int)
    key_mla, value_mla = m.get("attention.key_length_mla", int, 0), m.get("attention.value_length_mla", int, 0)
    if key_mla and value_mla:
        qk_head_dim, v_head_dim = key_mla, value_mla
    else:
        # Files converted before llama.cpp's MLA rework store per-head sizes in key_length/value_length and
        # head_count_kv = head_count. Current files write MLA as one KV head and need the *_mla keys.
        kv_heads = m.get("attention.head_count_kv", int, heads)
        if kv_heads <= 1:
            raise ConfigError(f"GGUF metadata has {ARCHITECTURE}.attention.head_count_kv = {kv_heads} (MLA stored as "
                              "one KV head) but lacks attention.key_length_mla / value_length_mla; re-convert the "
                              "model with a current llama.cpp")
        qk_head_dim = m.get("attention.key_length", int)
        v_head_dim = m.get("attention.value_length", int)
    if qk_head_dim < rope_dim:
        raise ConfigError(f"GGUF metadata: the query/key head size ({qk_head_dim}) is smaller than "
                          f"rope.dimension_count ({rope_dim}); the file is corrupt")

    gating = m.get("expert_gating_func", int, 0)
    if gating in (0, ExpertGatingFuncType.SOFTMAX):  # 0 = unset: DeepSeek-V2/V2.5 files predate the key
        scoring = "softmax"
    elif gating == ExpertGatingFuncType.SIGMOID:
        scoring = "sigmoid"
    else:
        raise ConfigError(f"GGUF metadata {ARCHITECTURE}.expert_gating_func = {gating} is not known "
                          "(1 = softmax, 2 = sigmoid)")
    # No group keys means no group-limited routing, as in llama.cpp (many early V3/R1 files lack them).
    n_group = m.get("expert_group_count", int, 0) or 1
    topk_group = m.get("expert_group_used_count", int, 0) or n_group
    if scoring == "sigmoid":
        has_bias = names is None or any(n.endswith(".exp_probs_b.bias") for n in names)
        topk_method = "noaux_tc" if has_bias else "greedy"
    else:
        topk_method = "group_limited_greedy" if n_group > 1 else "greedy"

    vocab = m.get("vocab_size", int, None)
    if vocab is None:
        tokens = metadata.get(Keys.Tokenizer.LIST)
        if not isinstance(tokens, list) or not tokens:
            raise ConfigError(f"GGUF metadata has neither {ARCHITECTURE}.vocab_size nor a token list "
                              f"({Keys.Tokenizer.LIST}), so the vocabulary size is unknown")
        vocab = len(tokens)

    n_blocks = m.get("block_count", int)
    nextn = m.get("nextn_predict_layers", int, 0)  # where present, block_count includes the MTP layers
    tied = names is not None and "output.weight" not in names and "token_embd.weight" in names
    bos = _Meta(metadata).get(Keys.Tokenizer.BOS_ID, int, None)
    eos = _Meta(metadata).get(Keys.Tokenizer.EOS_ID, int, None)
    try:
        return ModelConfig(
            model_type="deepseek_v3" if scoring == "sigmoid" else "deepseek_v2",
            vocab_size=vocab,
            hidden_size=m.get("embedding_length", int),
            intermediate_size=m.get("feed_forward_length", int),
            moe_intermediate_size=m.get("expert_feed_forward_length", int, 0),
            num_hidden_layers=n_blocks - nextn,
            num_nextn_predict_layers=nextn,
            first_k_dense_replace=m.get("leading_dense_block_count", int, 0),
            num_attention_heads=heads,
            q_lora_rank=m.get("attention.q_lora_rank", int, 0) or None,
            kv_lora_rank=m.get("attention.kv_lora_rank", int),
            qk_nope_head_dim=qk_head_dim - rope_dim,
            qk_rope_head_dim=rope_dim,
            v_head_dim=v_head_dim,
            n_routed_experts=m.get("expert_count", int, 0),
            n_shared_experts=m.get("expert_shared_count", int, 0),
            num_experts_per_tok=m.get("expert_used_count", int, 0),
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=m.get("expert_weights_scale", float, 1.0),
            scoring_func=scoring,
            topk_method=topk_method,
            norm_topk_prob=m.get("expert_weights_norm", bool, False),
            rope_theta=m.get("rope.freq_base", float, 10000.0),
            rope_scaling=_yarn(m),
            rope_interleave=True,  # llama.cpp rotates adjacent pairs for deepseek2, the official layout
            max_position_embeddings=m.get("context_length", int),
            rms_norm_eps=m.get("attention.layer_norm_rms_epsilon", float),
            tie_word_embeddings=tied,
            bos_token_id=bos,
            eos_token_ids=(eos,) if eos is not None else (),
        )
    except ConfigError as e:
        raise ConfigError(f"GGUF metadata gives an invalid config: {e}") from None


def _yarn(m: _Meta) -> YarnScaling | None:
    kind = m.get("rope.scaling.type", str, "none")
    if kind == "none":
        return None
    if kind != "yarn":
        raise ConfigError(f"GGUF metadata {m.prefix}rope.scaling.type is {kind!r}; DeepSeek models use 'yarn' "
                          "(or none)")
    # The converter stores 0.1 · mscale_all_dim and llama.cpp divides by 0.1 on load
    # ([TAG_DEEPSEEK2_YARN_LOG_MUL_FIX], llama.cpp PR 17945), so mscale_all_dim = log_mul / 0.1. llama.cpp then
    # uses mscale = mscale_all_dim for deepseek2 (V3: 1.0 and 1.0; V2-Lite: 0.707 and 0.707, as in its config).
    # The value went through float32 (0.1 · 0.707 is stored as 0.0707000017…); 6 significant digits undo that
    # rounding and keep every digit a real config has.
    log_mul = m.get("rope.scaling.yarn_log_multiplier", float, 0.0)
    mscale_all_dim = float(f"{log_mul / 0.1:.6g}")
    return YarnScaling(
        factor=m.get("rope.scaling.factor", float, why=" (needed for YaRN)"),
        original_max_position_embeddings=m.get("rope.scaling.original_context_length", int, why=" (needed for YaRN)"),
        beta_fast=m.get("rope.scaling.yarn_beta_fast", float, 32.0),
        beta_slow=m.get("rope.scaling.yarn_beta_slow", float, 1.0),
        mscale=mscale_all_dim if mscale_all_dim else 1.0,
        mscale_all_dim=mscale_all_dim,
    )


def gguf_layout(source: Any) -> Layout:
    """How a deepseek2 file stores MLA's up-projection: ``"split"`` (``attn_k_b`` + ``attn_v_b``, current llama.cpp)
    or ``"legacy"`` (one ``attn_kv_b``, files converted before the MLA rework).

    ``source`` is a ``GGUFFile`` or an iterable of tensor names. Files that carry both (some third-party quants)
    count as split: the split tensors are what the absorbed attention path uses.
    """
    names = source.tensors.keys() if hasattr(source, "tensors") else source
    kinds = {m.group(1) for n in names if (m := _ATTN_TENSOR.match(n))}
    if {"k_b", "v_b"} <= kinds:
        return "split"
    if "kv_b" in kinds:
        return "legacy"
    raise ConfigError("the GGUF has neither blk.N.attn_k_b/attn_v_b nor blk.N.attn_kv_b tensors, so it is not a "
                      f"complete {ARCHITECTURE} model; re-download or re-convert it")


@dataclass(frozen=True)
class TokenizerMetadata:
    """The ``tokenizer.ggml.*`` section of a GGUF. ``model`` "gpt2" is byte-level BPE (DeepSeek's);
    ``pre`` names the pre-tokenizer regex set ("deepseek-v3")."""

    model: str
    pre: str | None
    tokens: tuple[str, ...]
    token_types: tuple[int, ...] | None
    merges: tuple[str, ...]
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    pad_id: int | None
    add_bos: bool | None
    add_eos: bool | None
    chat_template: str | None


def tokenizer_metadata(metadata: dict[str, Any]) -> TokenizerMetadata:
    """The tokenizer section of GGUF metadata (token list, types, merges, special ids, pre-tokenizer name)."""
    m = _Meta(metadata)
    T = Keys.Tokenizer
    tokens = m.get(T.LIST, list, why=" (the token list)")
    merges = m.get(T.MERGES, list, [])
    for key, items in ((T.LIST, tokens), (T.MERGES, merges)):
        if not all(isinstance(s, str) for s in items):
            raise ConfigError(f"GGUF metadata {key!r} must be an array of strings")
    types = metadata.get(T.TOKEN_TYPE)
    if types is not None:
        if not isinstance(types, np.ndarray) or types.dtype.kind not in "iu" or len(types) != len(tokens):
            raise ConfigError(f"GGUF metadata {T.TOKEN_TYPE!r} must be an integer array with one entry per token "
                              f"({len(tokens)})")
        types = tuple(types.tolist())
    ids = {key: m.get(key, int, None) for key in (T.BOS_ID, T.EOS_ID, T.EOT_ID, T.PAD_ID)}
    for key, v in ids.items():
        if v is not None and v >= len(tokens):
            raise ConfigError(f"GGUF metadata {key!r} = {v} is outside the {len(tokens)}-token vocabulary")
    return TokenizerMetadata(
        model=m.get(T.MODEL, str, why=" (the tokenizer kind)"), pre=m.get(T.PRE, str, None),
        tokens=tuple(tokens), token_types=types, merges=tuple(merges),
        bos_id=ids[T.BOS_ID], eos_id=ids[T.EOS_ID], eot_id=ids[T.EOT_ID], pad_id=ids[T.PAD_ID],
        add_bos=m.get(T.ADD_BOS, bool, None), add_eos=m.get(T.ADD_EOS, bool, None),
        chat_template=m.get(T.CHAT_TEMPLATE, str, None))
