"""Checkpoint loading: sharded files, FP8 block dequantization, and the errors for broken checkpoints."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

import tierlm
from conftest import tiny_config, write_tiny
from tierlm.errors import CheckpointError, ConfigError
from tierlm.weights.fp8 import dequant_fp8_block, quant_fp8_block


def test_fp8_block_dequant_exact_against_loop_reference():
    g = torch.Generator().manual_seed(0)
    M, N, bm, bn = 300, 200, 128, 128  # edge blocks on both axes
    w = (torch.randn(M, N, generator=g) * 3).to(torch.float8_e4m3fn)
    s = torch.rand(-(-M // bm), -(-N // bn), generator=g) + 0.01
    ref = torch.empty(M, N)
    for i in range(M):  # straightforward: every element times its block's scale
        for j0 in range(0, N, bn):
            ref[i, j0:j0 + bn] = w[i, j0:j0 + bn].float() * s[i // bm, j0 // bn]
    assert torch.equal(dequant_fp8_block(w, s, (bm, bn)), ref)


def test_fp8_quant_roundtrip_is_close():
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(1))
    q, s = quant_fp8_block(w, (128, 128))
    rel = ((dequant_fp8_block(q, s, (128, 128)) - w).norm() / w.norm()).item()
    assert rel < 0.04  # e4m3 has a 3-bit mantissa: ~2-3% relative error


def test_sharded_checkpoint_loads_like_single_file(tmp_path, tiny_ckpt):
    cfg = tiny_config()
    sharded = write_tiny(tmp_path / "sharded", cfg, max_shard_bytes=200_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = list(range(1, 17))
    a = tierlm.load(tiny_ckpt, dtype="float32").logits(ids)
    b = tierlm.load(sharded, dtype="float32").logits(ids)
    assert torch.equal(a, b)


def test_fp8_checkpoint_loads_dequantized(tmp_path):
    from tierlm.weights.hf_writer import random_hf_tensors, write_hf_checkpoint
    from tierlm.weights.safetensors_io import SafetensorsCheckpoint

    cfg = tiny_config()
    tensors = random_hf_tensors(cfg, seed=0, dtype=torch.bfloat16, std=0.1)
    folder = write_hf_checkpoint(tmp_path / "fp8", cfg, tensors, fp8=True)
    ck = SafetensorsCheckpoint(folder)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert ck.get(name).dtype == torch.float8_e4m3fn and name + "_scale_inv" in ck
    model = tierlm.load(folder, dtype="float32")
    want = dequant_fp8_block(ck.get(name), ck.get(name + "_scale_inv"), (128, 128))
    assert torch.equal(model.module.model.layers[1].mlp.experts.down_proj[3], want)
    assert model.module.model.layers[1].mlp.gate.weight.dtype == torch.float32  # router stays unquantized
    assert torch.isfinite(model.logits([1, 2, 3])).all()


@pytest.fixture
def broken(tmp_path):
    """A fresh sharded copy to break in each test."""
    return write_tiny(tmp_path / "ck", tiny_config(), max_shard_bytes=200_000)


def test_missing_shard(broken):
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"shard {victim.name}.*missing.*download"):
        tierlm.load(broken)


def test_truncated_shard(broken):
    victim = sorted(broken.glob("model-*.safetensors"))[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=f"{victim.name} is truncated: expected .* found .*re-download"):
        tierlm.load(broken)


def test_garbage_header(broken):
    victim = sorted(broken.glob("model-*.safetensors"))[0]
    victim.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=victim.name):
        tierlm.load(broken)


def test_missing_tensor(tmp_path):
    from tierlm.weights.hf_writer import random_hf_tensors, write_hf_checkpoint

    cfg = tiny_config()
    t = random_hf_tensors(cfg)
    del t["model.layers.2.self_attn.kv_b_proj.weight"]
    folder = write_hf_checkpoint(tmp_path / "m", cfg, t)
    with pytest.raises(CheckpointError, match="kv_b_proj.weight' is missing"):
        tierlm.load(folder)


def test_shape_mismatch_names_tensor_and_config(tmp_path):
    from tierlm.weights.hf_writer import random_hf_tensors, write_hf_checkpoint

    cfg = tiny_config()
    folder = write_hf_checkpoint(tmp_path / "m", cfg, random_hf_tensors(cfg))
    d = json.loads((folder / "config.json").read_text())
    d["moe_intermediate_size"] = 48  # config no longer matches the weights
    (folder / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"has shape \[.*\] but config.json implies"):
        tierlm.load(folder)


def test_integer_weight_is_rejected(tmp_path, tiny_ckpt):
    folder = tmp_path / "m"
    shutil.copytree(tiny_ckpt, folder)
    from safetensors.torch import load_file

    t = load_file(str(folder / "model.safetensors"))
    t["model.norm.weight"] = torch.ones(t["model.norm.weight"].shape, dtype=torch.int32)
    save_file(t, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.norm.weight.*int32"):
        tierlm.load(folder)


def test_fp8_weight_without_scale(tmp_path, tiny_ckpt):
    from tierlm.weights.hf_writer import random_hf_tensors, write_hf_checkpoint

    cfg = tiny_config()
    folder = write_hf_checkpoint(tmp_path / "m", cfg, random_hf_tensors(cfg), fp8=True)
    from safetensors.torch import load_file

    t = load_file(str(folder / "model.safetensors"))
    del t["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(t, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="o_proj.weight' is FP8 but .*_scale_inv' is missing"):
        tierlm.load(folder)


def test_unexpected_tensor_means_wrong_config(tmp_path, tiny_ckpt):
    folder = tmp_path / "m"
    shutil.copytree(tiny_ckpt, folder)
    d = json.loads((folder / "config.json").read_text())
    d["num_hidden_layers"] = 2  # the weights have 3 layers; layer 2 would be taken for an MTP layer…
    d["num_nextn_predict_layers"] = 0
    d["first_k_dense_replace"] = 1
    (folder / "config.json").write_text(json.dumps(d))
    model = tierlm.load(folder)  # …which is skipped, as DeepSeek's MTP layer is
    assert model.config.num_hidden_layers == 2


def test_missing_and_bad_config(tmp_path, tiny_ckpt):
    folder = tmp_path / "m"
    shutil.copytree(tiny_ckpt, folder)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        tierlm.load(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        tierlm.load(folder)


@pytest.mark.parametrize("field,value,message", [
    ("scoring_func", "relu", "scoring_func"),
    ("n_group", 3, "n_group.*divide"),
    ("topk_group", 9, "topk_group"),
    ("num_experts_per_tok", 0, "num_experts_per_tok"),
    ("hidden_act", "gelu", "hidden_act"),
    ("model_type", "llama", "model_type"),
    ("qk_rope_head_dim", 7, "qk_rope_head_dim.*even"),
    ("frobnicate", 1, "'frobnicate'.*not known"),
])
def test_config_errors_name_the_field(field, value, message):
    from conftest import TINY_V3
    from tierlm.config import ModelConfig

    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf({**TINY_V3, field: value})
