"""GGUF (llama.cpp ``deepseek2``) tensor names ↔ tierlm's parameter names (which mirror Hugging Face's).

Pure Python. Stacked expert tensors (``blk.N.ffn_*_exps``) map to tierlm's stacked ``mlp.experts.*_proj``;
``attn_k_b``/``attn_v_b`` (split MLA layout) and the legacy ``attn_kv_b`` both map to ``self_attn.kv_b_proj``.
"""

from __future__ import annotations

import re

_TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_exps.weight": "mlp.experts.gate_proj",
    "ffn_up_exps.weight": "mlp.experts.up_proj",
    "ffn_down_exps.weight": "mlp.experts.down_proj",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
}
_PARAM_TO_GGUF = {v: k for k, v in _LAYER.items()}
_BLK = re.compile(r"^blk\.(\d+)\.(.+)$")
_MODEL_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
SPLIT_KV = ("attn_k_b.weight", "attn_v_b.weight")


def param_name(gguf_name: str) -> str | None:
    """tierlm's parameter for a GGUF tensor (None for attn_k_b/attn_v_b, which combine into kv_b_proj,
    and for names tierlm does not know)."""
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    m = _BLK.match(gguf_name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    return None


def gguf_name(param: str) -> str:
    """The GGUF tensor name of a tierlm parameter (kv_b_proj: the legacy unsplit name)."""
    for g, p in _TOP.items():
        if p == param:
            return g
    m = _MODEL_LAYER.match(param)
    if m and m.group(2) in _PARAM_TO_GGUF:
        return f"blk.{m.group(1)}.{_PARAM_TO_GGUF[m.group(2)]}"
    raise KeyError(f"no GGUF name for parameter {param!r}")
