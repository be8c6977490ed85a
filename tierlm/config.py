"""ModelConfig: the one description of a DeepSeek-V2/V3-family model.

Built from a Hugging Face ``config.json`` (``from_hf``) or GGUF metadata (weights/gguf_io.py), validated once,
then read everywhere (model/, plan/, runtime/). Pure Python: no torch import.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierlm.errors import ConfigError

MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")

# Fields of real DeepSeek / HF configs that do not change inference. Anything else unknown is an error, so a
# field that would change the math is never silently ignored.
_IGNORED_HF_KEYS = frozenset({
    "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "initializer_range",
    "aux_loss_alpha", "seq_aux", "ep_size", "pretraining_tp", "use_cache", "attention_dropout",
    "num_key_value_heads", "moe_layer_freq", "model_type", "pad_token_id", "_name_or_path", "output_router_logits",
    "router_aux_loss_coef", "head_dim", "rope_parameters", "use_mla", "mlp_bias", "num_experts", "n_experts",
    "layer_types", "sliding_window", "use_sliding_window", "max_window_layers", "output_attentions",
    "output_hidden_states", "return_dict", "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward",
    "problem_type", "id2label", "label2id", "num_local_experts",
})


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE extension parameters (``rope_scaling`` with type ``yarn``)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeepSeek-V2/V3 model. Field names follow HF ``config.json``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    model_type: str = "deepseek_v3"
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    rope_theta: float = 10000.0
    rope_scaling: YarnScaling | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (1,)
    fp8_block_size: tuple[int, int] | None = None
    num_nextn_predict_layers: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._validate()

    # ---- derived values -------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_gate_bias(self) -> bool:
        """DeepSeek-V3's aux-loss-free routing keeps an fp32 score-correction bias per expert."""
        return self.topk_method == "noaux_tc"

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times YaRN's mscale² when ``mscale_all_dim`` is set (as HF and llama.cpp do)."""
        scale = self.qk_head_dim ** -0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim and y.factor > 1:
            m = 0.1 * y.mscale_all_dim * math.log(y.factor) + 1.0
            scale *= m * m
        return scale

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts > 0 and i >= self.first_k_dense_replace
                and i % self.moe_layer_freq == 0)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face ``config.json`` dict (deepseek_v3 or deepseek_v2)."""
        d = dict(d)
        model_type = d.get("model_type", "deepseek_v3")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"config field 'model_type' is {model_type!r}; tierlm runs {', '.join(MODEL_TYPES)}")
        act = d.pop("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config field 'hidden_act' is {act!r}; DeepSeek models use 'silu'")
        if d.pop("attention_bias", False):
            raise ConfigError("config field 'attention_bias' is true; DeepSeek MLA has no attention biases")
        nkv = d.get("num_key_value_heads")
        if nkv is not None and nkv != d.get("num_attention_heads"):
            raise ConfigError(f"config field 'num_key_value_heads' ({nkv}) differs from num_attention_heads; "
                              "MLA checkpoints store one latent for all heads, so these must be equal")

        kw: dict[str, Any] = {"model_type": model_type}
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_scaling", "eos_token_ids", "fp8_block_size"}
        if model_type == "deepseek_v2":
            kw.update(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, rope_interleave=True)
        for key in list(d):
            if key in names:
                kw[key] = d.pop(key)
        if model_type == "deepseek_v2" and "n_group" in kw and kw.get("n_group") is None:
            kw["n_group"] = 1
        for key in ("n_group", "topk_group"):
            if kw.get(key) is None:
                kw.pop(key, None)
        kw["rope_scaling"] = _yarn_from_hf(d.pop("rope_scaling", None), d.get("rope_parameters"))
        eos = d.pop("eos_token_id", 1)
        kw["eos_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        q = d.pop("quantization_config", None)
        if q:
            kw["fp8_block_size"] = _fp8_block_from_hf(q)
        unknown = sorted(k for k in d if k not in _IGNORED_HF_KEYS)
        if unknown:
            raise ConfigError(f"config field(s) {', '.join(repr(k) for k in unknown)} are not known to tierlm; "
                              "if they change the architecture this model is not supported, otherwise remove them")
        try:
            return cls(**kw)
        except TypeError as e:  # a wrong type in a field, e.g. a string where a number is expected
            raise ConfigError(f"config has a field of the wrong type: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: a Hugging Face checkpoint folder needs its config.json") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); re-download it") from None
        try:
            return cls.from_hf(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict for this config (used to write checkpoints and in tests)."""
        d: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"],
            "model_type": self.model_type, "hidden_act": "silu", "attention_bias": False,
            "num_key_value_heads": self.num_attention_heads,
        }
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_scaling", "eos_token_ids", "fp8_block_size"):
                continue
            d[f.name] = getattr(self, f.name)
        d["eos_token_id"] = self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else list(self.eos_token_ids)
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        else:
            d["rope_scaling"] = None
        if self.fp8_block_size is not None:
            d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": list(self.fp8_block_size)}
        return d

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- validation -----------------------------------------------------------------------------------------
    def _validate(self) -> None:
        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"config field '{name}' = {getattr(self, name)!r}: {why}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "intermediate_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "must be a positive integer")
        need(isinstance(self.qk_nope_head_dim, int) and self.qk_nope_head_dim >= 0, "qk_nope_head_dim",
             "must be a non-negative integer")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", "must be a positive integer or null")
        need(self.model_type in MODEL_TYPES, "model_type", f"must be one of {MODEL_TYPES}")
        need(self.scoring_func in SCORING_FUNCS, "scoring_func", f"must be one of {SCORING_FUNCS}")
        need(self.topk_method in TOPK_METHODS, "topk_method", f"must be one of {TOPK_METHODS}")
        need(self.topk_method != "noaux_tc" or self.scoring_func == "sigmoid", "topk_method",
             "noaux_tc routing needs scoring_func 'sigmoid'")
        need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             "must lie between 0 and num_hidden_layers")
        need(isinstance(self.moe_layer_freq, int) and self.moe_layer_freq >= 1, "moe_layer_freq", "must be ≥ 1")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        if self.n_routed_experts:
            need(isinstance(self.moe_intermediate_size, int) and self.moe_intermediate_size > 0,
                 "moe_intermediate_size", "must be a positive integer when the model has routed experts")
            need(1 <= self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
                 f"must lie between 1 and n_routed_experts ({self.n_routed_experts})")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"must divide n_routed_experts ({self.n_routed_experts})")
            need(1 <= self.topk_group <= self.n_group, "topk_group", f"must lie between 1 and n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            need(self.topk_group * per_group >= self.num_experts_per_tok, "topk_group",
                 f"keeps {self.topk_group}×{per_group} experts, fewer than num_experts_per_tok "
                 f"({self.num_experts_per_tok})")
            if self.topk_method == "noaux_tc" and self.n_group > 1:
                need(per_group >= 2, "n_group", "noaux_tc scores a group by its top-2 experts: groups need ≥ 2")
        if self.fp8_block_size is not None:
            need(len(self.fp8_block_size) == 2 and all(b > 0 for b in self.fp8_block_size), "fp8_block_size",
                 "must be two positive integers")


def _yarn_from_hf(rs: dict | None, rope_parameters: dict | None) -> YarnScaling | None:
    rs = rs or rope_parameters
    if not rs:
        return None
    kind = rs.get("type", rs.get("rope_type"))
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise ConfigError(f"config field 'rope_scaling.type' is {kind!r}; DeepSeek models use 'yarn' (or none)")
    try:
        return YarnScaling(
            factor=float(rs["factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            beta_fast=float(rs.get("beta_fast", 32.0)), beta_slow=float(rs.get("beta_slow", 1.0)),
            mscale=float(rs.get("mscale", 1.0)), mscale_all_dim=float(rs.get("mscale_all_dim", 0.0) or 0.0))
    except KeyError as e:
        raise ConfigError(f"config field 'rope_scaling' lacks {e.args[0]!r}, needed for YaRN") from None


def _fp8_block_from_hf(q: dict) -> tuple[int, int] | None:
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"config field 'quantization_config.quant_method' is {method!r}; tierlm reads 'fp8' "
                          "block-quantized checkpoints (or unquantized ones: remove quantization_config)")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"config field 'quantization_config.fmt' is {fmt!r}; only 'e4m3' is supported")
    block = q.get("weight_block_size")
    if not block or len(block) != 2:
        raise ConfigError("config field 'quantization_config.weight_block_size' must be [rows, cols], e.g. [128, 128]")
    return (int(block[0]), int(block[1]))
