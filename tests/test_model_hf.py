"""The model's logits against Hugging Face transformers' DeepseekV3/V2 on the same random weights (fp32, CPU)."""

import pytest
import torch

import tierlm
from conftest import tiny_config, write_tiny

transformers = pytest.importorskip("transformers")

V3_CONFIGS = {
    # 4 groups keep 2, top-4, one dense layer, q_lora, YaRN ×4
    "grouped": {},
    # no groups, top-2, no dense layer, no q_lora, no YaRN
    "plain": dict(n_group=1, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=0, q_lora_rank=None,
                  rope_scaling=None),
    # 8 groups keep 3, top-6, two dense layers, YaRN ×40 with mscale ≠ mscale_all_dim (cos/sin scaled),
    # checkpoint in the half-split RoPE layout (rope_interleave false)
    "wide": dict(n_group=8, topk_group=3, num_experts_per_tok=6, first_k_dense_replace=2, q_lora_rank=24,
                 num_hidden_layers=4, rope_interleave=False,
                 rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 32,
                               "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}),
}


def _compare(tmp_path, cfg, hf_cls, n_tokens=40):
    write_tiny(tmp_path, cfg, seed=7)
    ids = torch.randint(0, cfg.vocab_size, (n_tokens,), generator=torch.Generator().manual_seed(1))
    ref_model = hf_cls.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = ref_model(ids[None]).logits[0].float()
    model = tierlm.load(tmp_path, dtype="float32", device="cpu")
    for impl in ("absorb", "naive"):
        model.module.attn_impl = impl
        ours = model.logits(ids)
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-4, f"{impl}: max abs diff {diff} vs transformers (logits up to {ref.abs().max():.2f})"


@pytest.mark.parametrize("name", list(V3_CONFIGS))
def test_v3_logits_match_transformers(tmp_path, name):
    _compare(tmp_path, tiny_config(**V3_CONFIGS[name]), transformers.DeepseekV3ForCausalLM)


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_v2_logits_match_transformers(tmp_path, topk_method):
    cfg = tiny_config(model_type="deepseek_v2", scoring_func="softmax", topk_method=topk_method,
                      norm_topk_prob=False, routed_scaling_factor=1.0, q_lora_rank=None,
                      n_group=4, topk_group=2, num_experts_per_tok=3,
                      rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                                    "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
    _compare(tmp_path, cfg, transformers.DeepseekV2ForCausalLM)
