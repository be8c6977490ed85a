"""HF checkpoint → GGUF (F16, Q8_0, Q4_K_M) → tierlm: the file's contents and the model's logits."""


import numpy as np
import pytest
import torch

import tierlm
from conftest import write_gguf_source
from tierlm.weights.convert import convert
from tierlm.weights.formats import dequantize
from tierlm.weights.gguf_io import GGUFFile

IDS = list(range(5, 60))


@pytest.fixture(scope="session")
def gguf_models(tmp_path_factory):
    """The tiny HF checkpoint and its three GGUF conversions."""
    root = tmp_path_factory.mktemp("gguf")
    src = write_gguf_source(root / "hf", seed=3)
    files = {q: convert(src, root / f"tiny-{q}.gguf", q)[0] for q in ("F16", "Q8_0", "Q4_K_M")}
    return src, files


def test_metadata_and_types_follow_llama_cpp(gguf_models):
    src, files = gguf_models
    gf = GGUFFile.open(files["Q4_K_M"])
    m = gf.metadata
    assert m["general.architecture"] == "deepseek2" and m["general.file_type"] == 15
    assert m["deepseek2.attention.key_length"] == 256 + 32 and m["deepseek2.attention.key_length_mla"] == 96
    assert m["deepseek2.expert_group_count"] == 4 and m["deepseek2.expert_group_used_count"] == 2
    assert m["deepseek2.expert_gating_func"] == 2 and m["tokenizer.ggml.pre"] == "gpt-2"  # the tiny tokenizer's regex
    t = {n: i.ggml_type.name for n, i in gf.tensors.items()}
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K"
    assert t["blk.2.ffn_down_exps.weight"] == "Q6_K" and t["blk.1.ffn_down_exps.weight"] == "Q4_K"
    assert t["blk.1.attn_k_b.weight"] == "Q5_0"  # rows of 64: not whole K-quant blocks → llama.cpp's fallback
    assert t["blk.1.ffn_gate_inp.weight"] == "F32" and t["blk.1.exp_probs_b.bias"] == "F32"
    assert "blk.1.attn_kv_b.weight" not in t  # split MLA layout


def test_split_kv_b_rebuilds_the_hf_weight(gguf_models):
    src, files = gguf_models
    from tierlm.weights.safetensors_io import SafetensorsCheckpoint

    ref = SafetensorsCheckpoint(src).get("model.layers.1.self_attn.kv_b_proj.weight").float()
    model = tierlm.load(files["F16"], dtype="float32")
    got = model.module.model.layers[1].self_attn.kv_b_proj.weight
    assert torch.allclose(got, ref.half().float(), atol=0, rtol=0)  # exactly the fp16-rounded weight


def test_stored_blocks_decode_to_the_source(gguf_models):
    src, files = gguf_models
    from tierlm.weights.safetensors_io import SafetensorsCheckpoint

    w = SafetensorsCheckpoint(src).get("model.layers.1.mlp.experts.5.down_proj.weight").float()
    gf = GGUFFile.open(files["Q8_0"])
    info = gf.tensors["blk.1.ffn_down_exps.weight"]
    stacked = dequantize(torch.from_numpy(np.array(gf.tensor_bytes(info.name))), info.ggml_type, info.shape)
    rel = ((stacked[5] - w).norm() / w.norm()).item()
    assert rel < 0.01  # Q8_0: 8-bit levels per 32 values


@pytest.mark.parametrize("quant", ["F16", "Q8_0", "Q4_K_M"])
def test_quantized_layers_equal_their_dequantized_weights(gguf_models, quant):
    """Weights kept in block formats compute exactly what the same weights dequantized compute."""
    _, files = gguf_models
    from tierlm.weights.gguf_loader import load_gguf_weights
    from tierlm.model.deepseek import DeepseekForCausalLM
    from tierlm.weights.gguf_config import config_from_gguf

    kept = tierlm.load(files[quant], dtype="float32")
    gf = GGUFFile.open(files[quant])
    with torch.device("meta"):
        dense = DeepseekForCausalLM(config_from_gguf(gf.metadata, gf.tensors))
    load_gguf_weights(dense, gf, "cpu", torch.float32, keep_quantized=False)
    with torch.no_grad():
        from tierlm.runtime.kv_cache import KVCache

        cache = KVCache(dense.config, 1, len(IDS), torch.float32, "cpu")
        ref = dense(torch.tensor([IDS]), torch.arange(len(IDS))[None], cache.view(torch.tensor([0])))[0]
    assert (kept.logits(IDS) - ref).abs().max() <= 1e-4


# Measured on this model (relative L2 error of all logits vs the fp32 HF checkpoint): F16 0.03%, Q8_0 1.8%,
# Q4_K_M 9.6%. Per-weight errors are 0.03%, 0.5% and ~5% (Q4_K 7% on Gaussian data, Q6_K 1.8%); MoE routing
# flips amplify them. Bounds are ~2× the measured values.
@pytest.mark.parametrize("quant,bound", [("F16", 1e-3), ("Q8_0", 0.04), ("Q4_K_M", 0.2)])
def test_gguf_logits_close_to_hf_checkpoint(gguf_models, quant, bound):
    src, files = gguf_models
    ref = tierlm.load(src, dtype="float32").logits(IDS)
    got = tierlm.load(files[quant], dtype="float32").logits(IDS)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < bound, f"{quant}: relative error {rel:.4f}"


def test_gguf_tokenizer_matches_checkpoint_tokenizer(gguf_models):
    src, files = gguf_models
    a = tierlm.load(src).tokenizer
    b = tierlm.load(files["F16"]).tokenizer
    for text in ["Hello, world! 1 + 1 = 2", "毕老师 🙂 The quick brown fox"]:
        assert a.encode(text, add_bos=True) == b.encode(text, add_bos=True)
        assert b.decode(b.encode(text)) == text
    assert a.bos_id == b.bos_id and a.eos_id == b.eos_id


def test_split_gguf_loads_like_single_file(gguf_models, tmp_path):
    src, files = gguf_models
    parts = convert(src, tmp_path / "split.gguf", "Q8_0", split_max_size=1_500_000)
    assert len(parts) > 2 and parts[0].name == "split-00001-of-0000%d.gguf" % len(parts)
    a = tierlm.load(files["Q8_0"], dtype="float32").logits(IDS)
    b = tierlm.load(parts[0], dtype="float32").logits(IDS)
    assert torch.equal(a, b)


def test_demo_model_converts_with_the_real_tokenizer(tmp_path):
    from tierlm.runtime.demo import ensure_demo

    demo = ensure_demo()
    path = convert(demo, tmp_path / "demo-q8.gguf", "Q8_0")[0]
    model = tierlm.load(path)
    assert GGUFFile.open(path).metadata["tokenizer.ggml.pre"] == "deepseek-v3"
    text = "<｜User｜>Hello 毕老师！1 + 1 = 2"
    ref = tierlm.load(demo).tokenizer
    assert model.tokenizer.encode(text) == ref.encode(text)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <｜Assistant｜>"}]
    assert model.tokenizer.encode_chat(chat) == ref.encode_chat(chat)  # control tokens stay single ids
    assert model.tokenizer.encode_chat(chat).count(128804) == 1
    out = "".join(e.text for e in model.generate([{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0))
    assert isinstance(out, str)


def test_convert_rejects_bad_arguments(gguf_models, tmp_path):
    from tierlm.errors import ConfigError

    src, _ = gguf_models
    with pytest.raises(ConfigError, match="Q3_K_M is not one of"):
        convert(src, tmp_path / "x.gguf", "Q3_K_M")
    with pytest.raises(ConfigError, match="must end in .gguf"):
        convert(src, tmp_path / "x.bin", "F16")
