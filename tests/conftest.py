import os
import tempfile

import pytest
import torch

# Tests never write into the user's cache folder: the demo model is built once per run in a temp folder.
os.environ.setdefault("TIERLM_CACHE", tempfile.mkdtemp(prefix="tierlm-test-cache-"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from tierlm.config import ModelConfig  # noqa: E402
from tierlm.weights.hf_writer import random_hf_tensors, write_hf_checkpoint  # noqa: E402

# Tiny DeepSeek-V3 configs that differ where the math differs: grouping, top-k, dense layers, q_lora, YaRN.
TINY_V3 = dict(
    model_type="deepseek_v3", vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
    routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
    q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    max_position_embeddings=512, rope_theta=10000.0,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
)


# Row lengths are multiples of 256 so the K-quants apply (else llama.cpp's fallbacks would); three layers so
# that Q4_K_M's "more bits" rule gives Q6_K to layer 2's ffn_down only.
GGUF_TINY = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_attention_heads=2,
                 num_key_value_heads=2, q_lora_rank=256, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                 v_head_dim=128, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2, vocab_size=320,
                 num_hidden_layers=3)


def tiny_config(**changes) -> ModelConfig:
    return ModelConfig.from_hf({**TINY_V3, **changes})


def write_tiny(path, cfg: ModelConfig, seed: int = 0, dtype=torch.float32, **kw):
    return write_hf_checkpoint(path, cfg, random_hf_tensors(cfg, seed=seed, dtype=dtype, std=0.1), **kw)


def write_gguf_source(path, seed: int):
    """The tiny HF checkpoint (GGUF_TINY, weights N(0, 0.03²): activations stay O(1)) with a tokenizer, ready for
    ``convert``."""
    from tinytok import write_tiny_tokenizer

    cfg = tiny_config(**GGUF_TINY)
    src = write_hf_checkpoint(path, cfg, random_hf_tensors(cfg, seed=seed, dtype=torch.float32, std=0.03))
    write_tiny_tokenizer(src, cfg.vocab_size)
    return src


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny fp32 DeepSeek-V3 checkpoint with grouped routing."""
    return write_tiny(tmp_path_factory.mktemp("tiny"), tiny_config())


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run on GPU machines only."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
