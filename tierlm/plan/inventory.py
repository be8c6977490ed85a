"""Every tensor of a model: GGUF-style name, shape, type, bytes and the role that decides where it may live.

Two sources give the same ``Inventory``:

* ``recipe_inventory(config, recipe)`` — what a checkpoint of ``config`` quantized with ``recipe`` holds, computed
  from the config alone, so a user can plan before downloading. Recipes (shared reference §3.7):
  ``F16``, ``BF16``, ``Q8_0``, ``Q4_K_M`` (llama.cpp's mix), ``Q3_K_M`` and ``Q2_K`` (llama.cpp's rules for
  those file types as they apply to ``deepseek2``), and ``FP8`` (the official Hugging Face block format).
* ``inventory_from_records(records, config)`` — a real checkpoint's tensor table, as the GGUF and safetensors
  readers list it: records of (name, shape, type[, nbytes]) as tuples, dicts or objects with those attributes.
  Both GGUF names (``blk.N.ffn_down_exps.weight``) and Hugging Face names (``model.layers.N.mlp.experts.E...``)
  are recognised.

Shapes are in torch order (last dim contiguous), as ``tierlm.weights`` reports them; a GGUF file stores the
reverse. Routed experts stacked in one tensor (GGUF ``*_exps``) carry ``expert=None``: each expert owns an equal
``1/n_routed_experts`` slice of it. The MTP layer (index ≥ ``num_hidden_layers``) is listed with role ``mtp``:
it is used only for speculative decoding, which tierlm does not run, so it is never placed (llama.cpp drops it too).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from tierlm.config import ModelConfig
from tierlm.errors import CheckpointError, ConfigError
from tierlm.plan.ggml_sizes import FP8, fits_blocks, tensor_nbytes, type_name

ROLES = ("embed", "attn", "dense_ffn", "shared_expert", "router", "routed_expert", "norm", "head", "mtp")
RECIPES = ("F16", "BF16", "Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K", "FP8")
ALWAYS_ACTIVE_ROLES = ("embed", "attn", "dense_ffn", "shared_expert", "router", "norm", "head")


@dataclass(frozen=True)
class Tensor:
    """One tensor. ``layer`` is None for the embedding, head and final norm; ``expert`` is set only for a tensor
    holding a single routed expert (Hugging Face layout)."""

    name: str
    shape: tuple[int, ...]
    dtype: str          # GGML type name ("Q4_K"), safetensors dtype ("F8_E4M3") or "FP8" (e4m3 + block scales)
    nbytes: int
    role: str
    layer: int | None = None
    expert: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Inventory:
    """The tensors of one model in one format, with the sums the planner needs."""

    tensors: list[Tensor]
    n_experts: int              # routed experts per MoE layer (a stacked tensor is split this many ways)
    source: str                 # "recipe" or "checkpoint"
    recipe: str | None = None

    def total_bytes(self, include_mtp: bool = False) -> int:
        return sum(t.nbytes for t in self.tensors if include_mtp or t.role != "mtp")

    def bytes_by_role(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for t in self.tensors:
            out[t.role] += t.nbytes
        return dict(out)

    def bytes_by_type(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for t in self.tensors:
            if t.role != "mtp":
                out[t.dtype] += t.nbytes
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def numel(self, include_mtp: bool = False) -> int:
        return sum(t.numel for t in self.tensors if include_mtp or t.role != "mtp")

    def expert_bytes(self) -> dict[int, list[int]]:
        """Bytes of each routed expert: ``{layer: [bytes of expert 0, 1, ...]}``."""
        out: dict[int, list[int]] = {}
        for t in self.tensors:
            if t.role != "routed_expert":
                continue
            row = out.setdefault(t.layer, [0] * self.n_experts)
            if t.expert is not None:
                if not 0 <= t.expert < self.n_experts:
                    raise CheckpointError(f"tensor {t.name} is expert {t.expert}, but the model has "
                                          f"{self.n_experts} routed experts per layer")
                row[t.expert] += t.nbytes
                continue
            share, rest = divmod(t.nbytes, self.n_experts)
            if rest:
                raise CheckpointError(f"tensor {t.name} ({t.nbytes} bytes) does not split evenly into "
                                      f"{self.n_experts} experts; the file is corrupt or not a DeepSeek MoE model")
            for e in range(self.n_experts):
                row[e] += share
        return out

    def expert_numel(self) -> dict[int, int]:
        """Parameters of one routed expert per layer (for FLOP counts)."""
        out: dict[int, int] = defaultdict(int)
        for t in self.tensors:
            if t.role == "routed_expert":
                out[t.layer] += t.numel
        return {layer: n // self.n_experts for layer, n in out.items()}

    def always_active(self) -> list[Tensor]:
        return [t for t in self.tensors if t.role in ALWAYS_ACTIVE_ROLES]


# ---- recipes -----------------------------------------------------------------------------------------------------
def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits (first and last eighth, every third in between)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# llama.cpp's ``tensor_type_fallback`` for rows that are not whole blocks, then F16 when even that fails.
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _fallback(t: str, shape: tuple[int, ...]) -> str:
    if t == FP8 or fits_blocks(t, shape):
        return t
    t = _FALLBACK.get(t, "F16")
    return t if fits_blocks(t, shape) else "F16"


def _matrix_type(recipe: str, category: str, layer: int | None, n_layers: int, n_experts: int) -> str:
    """The type of a quantizable weight (llama_tensor_get_type_impl for deepseek2: no attn_v/qkv)."""
    if recipe in ("F16", "BF16", "Q8_0"):
        return recipe
    if recipe == "FP8":
        return "BF16" if category in ("embed", "head") else FP8
    default = {"Q4_K_M": "Q4_K", "Q3_K_M": "Q3_K", "Q2_K": "Q2_K"}[recipe]
    if category == "head":
        return "Q6_K"
    if category == "ffn_down" and layer is not None:
        if recipe == "Q4_K_M":
            return "Q6_K" if use_more_bits(layer, n_layers) else default
        if recipe == "Q3_K_M":
            return "Q5_K" if layer < n_layers // 16 else "Q4_K"
        return "Q3_K"
    if category == "attn_output":
        if n_experts == 8:  # llama.cpp's rule for 8-expert models (Mixtral-like), whatever the architecture
            return "Q5_K"
        return {"Q3_K_M": "Q4_K", "Q2_K": "Q3_K"}.get(recipe, default)
    return default


def recipe_inventory(config: ModelConfig, recipe: str = "Q4_K_M") -> Inventory:
    """The tensors of ``config`` in GGUF layout (``FP8``: Hugging Face layout, i.e. ``attn_kv_b`` unsplit)."""
    recipe = normalize_recipe(recipe)
    c, n = config, config.num_hidden_layers
    out: list[Tensor] = []
    small = "BF16" if recipe == "FP8" else "F32"   # norms and router: never quantized

    def add(name: str, shape: tuple[int, ...], role: str, category: str = "matrix", layer: int | None = None,
            dtype: str | None = None) -> None:
        t = dtype or _fallback(_matrix_type(recipe, category, layer, n, c.n_routed_experts), shape)
        out.append(Tensor(name, shape, t, tensor_nbytes(t, shape), role, layer))

    H, heads = c.hidden_size, c.num_attention_heads
    add("token_embd.weight", (c.vocab_size, H), "embed", "embed")
    for i in range(n):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (H,), "norm", layer=i, dtype=small)
        if c.q_lora_rank:
            add(p + "attn_q_a.weight", (c.q_lora_rank, H), "attn", layer=i)
            add(p + "attn_q_a_norm.weight", (c.q_lora_rank,), "norm", layer=i, dtype=small)
            add(p + "attn_q_b.weight", (heads * c.qk_head_dim, c.q_lora_rank), "attn", layer=i)
        else:
            add(p + "attn_q.weight", (heads * c.qk_head_dim, H), "attn", layer=i)
        add(p + "attn_kv_a_mqa.weight", (c.kv_lora_rank + c.qk_rope_head_dim, H), "attn", layer=i)
        add(p + "attn_kv_a_norm.weight", (c.kv_lora_rank,), "norm", layer=i, dtype=small)
        if recipe == "FP8":
            add(p + "attn_kv_b.weight", (heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank), "attn",
                layer=i)
        else:
            add(p + "attn_k_b.weight", (heads, c.kv_lora_rank, c.qk_nope_head_dim), "attn", layer=i)
            add(p + "attn_v_b.weight", (heads, c.v_head_dim, c.kv_lora_rank), "attn", layer=i)
        add(p + "attn_output.weight", (H, heads * c.v_head_dim), "attn", "attn_output", layer=i)
        add(p + "ffn_norm.weight", (H,), "norm", layer=i, dtype=small)
        if not c.is_moe_layer(i):
            F = c.intermediate_size
            add(p + "ffn_gate.weight", (F, H), "dense_ffn", layer=i)
            add(p + "ffn_up.weight", (F, H), "dense_ffn", layer=i)
            add(p + "ffn_down.weight", (H, F), "dense_ffn", "ffn_down", layer=i)
            continue
        E, F = c.n_routed_experts, c.moe_intermediate_size
        add(p + "ffn_gate_inp.weight", (E, H), "router", layer=i, dtype=small)
        if c.has_gate_bias:
            add(p + "exp_probs_b.bias", (E,), "router", layer=i, dtype="F32")
        add(p + "ffn_gate_exps.weight", (E, F, H), "routed_expert", layer=i)
        add(p + "ffn_up_exps.weight", (E, F, H), "routed_expert", layer=i)
        add(p + "ffn_down_exps.weight", (E, H, F), "routed_expert", "ffn_down", layer=i)
        if c.n_shared_experts:
            S = F * c.n_shared_experts
            add(p + "ffn_gate_shexp.weight", (S, H), "shared_expert", layer=i)
            add(p + "ffn_up_shexp.weight", (S, H), "shared_expert", layer=i)
            add(p + "ffn_down_shexp.weight", (H, S), "shared_expert", "ffn_down", layer=i)
    add("output_norm.weight", (H,), "norm", dtype=small)
    if not c.tie_word_embeddings:
        add("output.weight", (c.vocab_size, H), "head", "head")
    return Inventory(out, max(c.n_routed_experts, 1), "recipe", recipe)


def normalize_recipe(recipe: str) -> str:
    for r in RECIPES:
        if r.lower() == str(recipe).lower():
            return r
    raise ConfigError(f"unknown quantization recipe {recipe!r}; choose one of {', '.join(RECIPES)}")


# ---- real checkpoints ----------------------------------------------------------------------------------------
_GGUF_LAYER = re.compile(r"^blk\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.")
_TOP = {
    "token_embd.weight": "embed", "output_norm.weight": "norm", "output.weight": "head",
    "model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "head",
}


def classify(name: str, num_hidden_layers: int) -> tuple[str, int | None, int | None]:
    """(role, layer, expert) of a GGUF or Hugging Face DeepSeek tensor name; scale tensors follow their weight."""
    if name in _TOP:
        return _TOP[name], None, None
    m = _GGUF_LAYER.match(name)
    if m:
        layer, rest = int(m[1]), m[2]
        if layer >= num_hidden_layers:
            return "mtp", layer, None
        if rest.endswith("norm.weight"):
            return "norm", layer, None
        if rest.startswith("attn_"):
            return "attn", layer, None
        if rest.startswith(("ffn_gate_inp.", "exp_probs_b.")):
            return "router", layer, None
        if "_exps." in rest:
            return "routed_expert", layer, None
        if "_shexp." in rest:
            return "shared_expert", layer, None
        if rest.startswith(("ffn_gate.", "ffn_up.", "ffn_down.")):
            return "dense_ffn", layer, None
        raise CheckpointError(f"tensor {name!r} is not part of a DeepSeek (deepseek2) model")
    m = _HF_LAYER.match(name)
    if m:
        layer, rest = int(m[1]), m[2]
        if layer >= num_hidden_layers:
            return "mtp", layer, None
        if "layernorm" in rest:
            return "norm", layer, None
        if rest.startswith("self_attn."):
            return "attn", layer, None
        if rest.startswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias")):
            return "router", layer, None
        e = _HF_EXPERT.match(rest)
        if e:
            return "routed_expert", layer, int(e[1])
        if rest.startswith("mlp.experts."):  # transformers v5 fused layout: one tensor for all experts
            return "routed_expert", layer, None
        if rest.startswith("mlp.shared_experts."):
            return "shared_expert", layer, None
        if rest.startswith(("mlp.gate_proj.", "mlp.up_proj.", "mlp.down_proj.")):
            return "dense_ffn", layer, None
    raise CheckpointError(f"tensor {name!r} is not part of a DeepSeek model (neither a GGUF deepseek2 nor a "
                          "Hugging Face DeepseekV3 name)")


def _field(rec: object, *names: str) -> object:
    for n in names:
        if isinstance(rec, dict) and n in rec:
            return rec[n]
        if hasattr(rec, n):
            return getattr(rec, n)
    return None


def inventory_from_records(records: Iterable[object], config: ModelConfig) -> Inventory:
    """An inventory from a checkpoint's tensor table.

    A record is a tuple ``(name, shape, type)`` or ``(name, shape, type, nbytes)``, or a dict / object with
    ``name``, ``shape`` (torch order) and ``ggml_type`` / ``dtype`` / ``type`` and optionally ``nbytes``. The type
    is a GGML name or id, a gguf enum, or a safetensors dtype; ``nbytes``, when given, is trusted as the size on
    disk (it must be, for formats the planner does not know).
    """
    out: list[Tensor] = []
    for rec in records:
        if isinstance(rec, (tuple, list)):
            if len(rec) not in (3, 4):
                raise CheckpointError(f"tensor record {rec!r} is not (name, shape, type[, nbytes])")
            name, shape, dtype, nbytes = (*rec, None) if len(rec) == 3 else rec
        else:
            name, shape = _field(rec, "name"), _field(rec, "shape")
            dtype, nbytes = _field(rec, "ggml_type", "dtype", "type"), _field(rec, "nbytes")
        if not isinstance(name, str) or shape is None or dtype is None:
            raise CheckpointError(f"tensor record {rec!r} lacks a name, shape or type")
        shape = tuple(int(s) for s in shape)
        dname = type_name(dtype)
        size = int(nbytes) if nbytes is not None else tensor_nbytes(dname, shape)
        role, layer, expert = classify(name, config.num_hidden_layers)
        out.append(Tensor(name, shape, dname, size, role, layer, expert))
    if not out:
        raise CheckpointError("the checkpoint lists no tensors")
    names = {t.name for t in out}
    if len(names) != len(out):
        raise CheckpointError("the checkpoint lists a tensor name twice; its shards do not belong together")
    inv = Inventory(out, max(config.n_routed_experts, 1), "checkpoint")
    missing = [i for i in config.moe_layers if i not in inv.expert_bytes()]
    if missing:
        raise CheckpointError(f"the checkpoint has no routed experts for MoE layer(s) {missing[:5]}"
                              f"{' …' if len(missing) > 5 else ''}; a shard is missing or the config does not match")
    return inv
