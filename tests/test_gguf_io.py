"""GGUF reading: tiny files written with gguf-py's GGUFWriter, read back by tierlm's own parser; every kind of
corrupt header gets a CheckpointError that names the file; random corruption never escapes as another exception."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given, settings
from hypothesis import strategies as st

from tierlm.config import ModelConfig
from tierlm.errors import CheckpointError, ConfigError
from tierlm.presets import known_config
from tierlm.weights import gguf_io
from tierlm.weights.gguf_config import config_from_gguf, gguf_layout, tokenizer_metadata
from tierlm.weights.gguf_io import GGUFFile

TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "a", "b", "ab", "Ġ", "Ġa", "1", "12", "123",
          "é", "毕", "<think>", "</think>", "<｜User｜>", "<｜Assistant｜>"]
MERGES = ["a b", "Ġ a", "1 2", "12 3"]


# ---- building files ---------------------------------------------------------------------------------------------
def add_model_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, *, legacy: bool = False, groups: bool = True) -> None:
    """Metadata as llama.cpp's converter writes it for a DeepSeek-V2/V3 config (shared reference §3.2)."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    w.add_head_count(cfg.num_attention_heads)
    if cfg.q_lora_rank is not None:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    if legacy:
        w.add_head_count_kv(cfg.num_attention_heads)
        w.add_key_length(cfg.qk_head_dim)
        w.add_value_length(cfg.v_head_dim)
    else:
        w.add_head_count_kv(1)
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
        w.add_rope_scaling_yarn_beta_fast(y.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(y.beta_slow)
        w.add_rope_scaling_yarn_log_mul(0.1 * y.mscale_all_dim)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    if groups:
        w.add_expert_group_count(cfg.n_group)
        w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    w.add_expert_weights_norm(cfg.norm_topk_prob)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if cfg.scoring_func == "sigmoid"
                             else gguf.ExpertGatingFuncType.SOFTMAX)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_ids[0])


def add_tokenizer(w: gguf.GGUFWriter) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-v3")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3] + [1] * (len(TOKENS) - 2))
    w.add_token_merges(MERGES)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")


def small_tensors(seed: int = 0) -> dict[str, tuple[np.ndarray, Q | None, tuple[int, ...]]]:
    """name -> (array to write, raw ggml type or None, shape in torch order)."""
    rng = np.random.default_rng(seed)

    def q8(shape):
        return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), Q.Q8_0), Q.Q8_0, shape

    def plain(shape, dtype):
        return rng.standard_normal(shape).astype(dtype), None, shape

    return {
        "token_embd.weight": plain((16, 64), np.float16),
        "blk.0.attn_norm.weight": plain((64,), np.float32),
        "blk.0.attn_kv_a_mqa.weight": q8((24, 64)),
        "blk.0.attn_k_b.weight": plain((2, 8, 16), np.float16),
        "blk.0.attn_v_b.weight": plain((2, 16, 8), np.float16),
        "blk.1.ffn_gate_exps.weight": q8((4, 16, 64)),
        "blk.1.exp_probs_b.bias": plain((4,), np.float32),
        "output.weight": q8((16, 64)),
    }


SMALL_CFG = ModelConfig(
    vocab_size=16, hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, q_lora_rank=32,
    first_k_dense_replace=1, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
    routed_scaling_factor=2.5, max_position_embeddings=256)


def write_gguf(path: Path, tensors=None, *, cfg: ModelConfig = SMALL_CFG, tokenizer: bool = True,
               extra=None, **writer_kw) -> Path:
    tensors = small_tensors() if tensors is None else tensors
    w = gguf.GGUFWriter(path, "deepseek2", **writer_kw)
    w.add_name("tiny test model")
    add_model_metadata(w, cfg)
    if tokenizer:
        add_tokenizer(w)
    if extra:
        extra(w)
    for name, (arr, raw, _) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _extra_keys(w: gguf.GGUFWriter) -> None:
    w.add_custom_alignment(32)  # the default value: the layout is unchanged, but the key can be patched
    w.add_uint32("test.aaaa", 1)
    w.add_uint32("test.bbbb", 2)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, bytes]:
    path = write_gguf(tmp_path_factory.mktemp("base") / "base.gguf", extra=_extra_keys)
    return path, path.read_bytes()


# ---- reading back -----------------------------------------------------------------------------------------------
def test_reads_metadata_shapes_and_bytes(tmp_path):
    tensors = small_tensors()
    path = write_gguf(tmp_path / "m.gguf", tensors)
    with GGUFFile.open(path) as f:
        assert f.version == 3 and f.shards == [path]
        assert f.metadata["general.architecture"] == "deepseek2"
        assert f.metadata["general.name"] == "tiny test model"
        assert f.metadata["deepseek2.block_count"] == 2
        assert f.metadata["deepseek2.attention.layer_norm_rms_epsilon"] == 1e-6  # float32 read back as written
        assert f.metadata["tokenizer.ggml.tokens"] == TOKENS
        np.testing.assert_array_equal(f.metadata["tokenizer.ggml.token_type"], [3, 3] + [1] * 14)
        assert list(f.tensors) == list(tensors)
        for name, (arr, raw, shape) in tensors.items():
            info = f.tensors[name]
            assert info.shape == shape, name
            assert info.ggml_type == (raw or {np.dtype(np.float16): Q.F16, np.dtype(np.float32): Q.F32}[arr.dtype])
            assert info.file == path and info.offset % 32 == 0 and info.nbytes == arr.nbytes
            view = f.tensor_bytes(name)
            assert isinstance(view, np.memmap) and view.dtype == np.uint8 and not view.flags.writeable
            assert view.tobytes() == arr.tobytes(), name
        # a float view of an F16 tensor in torch order is the array that was written
        k_b = f.tensor_bytes("blk.0.attn_k_b.weight").view(np.float16).reshape(f.tensors["blk.0.attn_k_b.weight"].shape)
        np.testing.assert_array_equal(k_b, tensors["blk.0.attn_k_b.weight"][0])
        with pytest.raises(CheckpointError, match="no tensor 'nope'"):
            f.tensor_bytes("nope")


def test_matches_gguf_reader(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    ref = gguf.GGUFReader(path)
    f = GGUFFile.open(path)
    for t in ref.tensors:
        info = f.tensors[t.name]
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
        assert info.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert info.ggml_type == t.tensor_type


def test_version_2_is_accepted(base, tmp_path):
    _, data = base
    path = tmp_path / "v2.gguf"
    path.write_bytes(_patched(data, 4, "<I", 2))
    assert GGUFFile.open(path).version == 2


def test_tokenizer_metadata(tmp_path):
    f = GGUFFile.open(write_gguf(tmp_path / "m.gguf"))
    tok = tokenizer_metadata(f.metadata)
    assert tok.model == "gpt2" and tok.pre == "deepseek-v3"
    assert tok.tokens == tuple(TOKENS) and tok.merges == tuple(MERGES)
    assert tok.token_types == (3, 3) + (1,) * 14
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.add_bos) == (0, 1, None, True)
    assert tok.chat_template.startswith("{{ bos_token }}")
    with pytest.raises(ConfigError, match="tokenizer.ggml.tokens"):
        tokenizer_metadata({"general.architecture": "deepseek2"})


# ---- split files ------------------------------------------------------------------------------------------------
@pytest.fixture()
def split_model(tmp_path) -> tuple[list[Path], dict]:
    tensors = small_tensors()
    write_gguf(tmp_path / "model.gguf", tensors, split_max_tensors=3)
    shards = sorted(tmp_path.glob("model-*-of-00003.gguf"))
    assert [p.name for p in shards] == [f"model-{i:05d}-of-00003.gguf" for i in (1, 2, 3)]
    return shards, tensors


def test_split_opens_from_first_shard(split_model):
    shards, tensors = split_model
    f = GGUFFile.open(shards[0])
    assert f.shards == shards
    assert f.metadata["deepseek2.embedding_length"] == 64 and f.metadata["split.count"] == 3
    assert list(f.tensors) == list(tensors)
    assert {f.tensors[n].file for n in tensors} == set(shards)
    for name, (arr, _, shape) in tensors.items():
        assert f.tensors[name].shape == shape
        assert f.tensor_bytes(name).tobytes() == arr.tobytes()
    assert config_from_gguf(f.metadata, f.tensors) == SMALL_CFG


def test_split_missing_shard(split_model):
    shards, _ = split_model
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.gguf.*missing.*re-download it"):
        GGUFFile.open(shards[0])


def test_split_non_first_shard_points_at_first(split_model):
    shards, _ = split_model
    with pytest.raises(CheckpointError, match=r"shard 2 of 3.*open the first shard.*model-00001-of-00003\.gguf"):
        GGUFFile.open(shards[1])
    renamed = shards[1].with_name("renamed.gguf")  # a renamed shard is still recognised by its split.no
    shutil.copy(shards[1], renamed)
    with pytest.raises(CheckpointError, match=r"renamed\.gguf is shard 2 of 3.*first shard"):
        GGUFFile.open(renamed)


def test_split_shards_mixed_up(split_model):
    shards, _ = split_model
    tmp = shards[1].with_name("tmp")
    shards[1].rename(tmp)
    shards[2].rename(shards[1])
    tmp.rename(shards[2])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00003\.gguf says it is shard 2 of 3.*expected 1 of 3"):
        GGUFFile.open(shards[0])


def test_split_tensor_count_checked(split_model):
    shards, _ = split_model
    data = shards[0].read_bytes()
    at = _value_at(data, "split.tensors.count")
    shards[0].write_bytes(_patched(data, at, "<i", 9))
    with pytest.raises(CheckpointError, match=r"declares 9 tensors.*hold 8"):
        GGUFFile.open(shards[0])


def test_split_first_shard_renamed(split_model):
    shards, _ = split_model
    renamed = shards[0].with_name("model.gguf")
    shards[0].rename(renamed)
    with pytest.raises(CheckpointError, match=r"first of 3 shards.*-00001-of-00003\.gguf"):
        GGUFFile.open(renamed)


# ---- config -----------------------------------------------------------------------------------------------------
def _roundtrip_config(tmp_path, cfg: ModelConfig, tensors=None, **kw) -> ModelConfig:
    w = gguf.GGUFWriter(tmp_path / "c.gguf", "deepseek2")
    add_model_metadata(w, cfg, **kw)
    add_tokenizer(w)
    for name in tensors or []:
        w.add_tensor(name, np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile.open(tmp_path / "c.gguf")
    return config_from_gguf(f.metadata, f.tensors if tensors is not None else None)


V3_TENSORS = ["token_embd.weight", "output.weight", "blk.3.exp_probs_b.bias", "blk.0.attn_k_b.weight",
              "blk.0.attn_v_b.weight"]


def test_config_deepseek_v3(tmp_path):
    preset = known_config("deepseek-ai/DeepSeek-V3")
    got = _roundtrip_config(tmp_path, preset, V3_TENSORS)
    # GGUF carries no FP8 block size (weights are re-quantized) and the converter drops the MTP layer.
    assert got == preset.replace(fp8_block_size=None, num_nextn_predict_layers=0)
    assert got.rope_scaling == preset.rope_scaling
    assert got.softmax_scale == pytest.approx(0.1352338, abs=1e-7)


def test_config_deepseek_v2_lite_legacy(tmp_path):
    preset = known_config("deepseek-ai/DeepSeek-V2-Lite")
    got = _roundtrip_config(tmp_path, preset, ["token_embd.weight", "output.weight", "blk.0.attn_kv_b.weight"],
                            legacy=True)
    assert got == preset
    assert got.q_lora_rank is None and got.rope_scaling.mscale == got.rope_scaling.mscale_all_dim == 0.707


def test_config_defaults_of_early_v3_files(tmp_path):
    preset = known_config("deepseek-ai/DeepSeek-V3")
    # no group keys: no group-limited routing, as in llama.cpp; no exp_probs_b tensor: plain top-k
    got = _roundtrip_config(tmp_path, preset, ["token_embd.weight", "output.weight"], groups=False)
    assert (got.n_group, got.topk_group, got.topk_method) == (1, 1, "greedy")
    # without a tensor table, sigmoid gating means the V3 bias routing
    assert _roundtrip_config(tmp_path, preset, groups=False).topk_method == "noaux_tc"
    # no output.weight: the head is tied to the embedding
    assert _roundtrip_config(tmp_path, preset, ["token_embd.weight"]).tie_word_embeddings


def test_config_vocab_from_token_list_and_nextn():
    md = _v3_metadata()
    del md["deepseek2.vocab_size"]
    md["tokenizer.ggml.tokens"] = ["x"] * 1000
    md["deepseek2.nextn_predict_layers"] = 1
    md["deepseek2.block_count"] = 62
    cfg = config_from_gguf(md)
    assert (cfg.vocab_size, cfg.num_hidden_layers, cfg.num_nextn_predict_layers) == (1000, 61, 1)


def _v3_metadata() -> dict:
    """V3 metadata as a dict, the way GGUFFile returns it."""
    preset = known_config("deepseek-ai/DeepSeek-V3")
    with tempfile.TemporaryDirectory() as d:
        w = gguf.GGUFWriter(Path(d) / "c.gguf", "deepseek2")
        add_model_metadata(w, preset)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return dict(GGUFFile.open(Path(d) / "c.gguf").metadata)


def test_config_errors():
    md = _v3_metadata()
    with pytest.raises(ConfigError, match="architecture is 'llama'"):
        config_from_gguf({**md, "general.architecture": "llama"})
    bad = dict(md)
    del bad["deepseek2.block_count"]
    with pytest.raises(ConfigError, match="lacks 'deepseek2.block_count'"):
        config_from_gguf(bad)
    bad = {k: v for k, v in md.items() if "_mla" not in k}
    with pytest.raises(ConfigError, match="key_length_mla"):
        config_from_gguf(bad)
    with pytest.raises(ConfigError, match="expert_gating_func = 7"):
        config_from_gguf({**md, "deepseek2.expert_gating_func": 7})
    with pytest.raises(ConfigError, match="'deepseek2.embedding_length' = 'x' is not an integer"):
        config_from_gguf({**md, "deepseek2.embedding_length": "x"})
    with pytest.raises(ConfigError, match="rope.scaling.type is 'linear'"):
        config_from_gguf({**md, "deepseek2.rope.scaling.type": "linear"})
    with pytest.raises(ConfigError, match="invalid config.*num_experts_per_tok"):
        config_from_gguf({**md, "deepseek2.expert_used_count": 999})


def test_layout():
    assert gguf_layout(["blk.0.attn_k_b.weight", "blk.0.attn_v_b.weight"]) == "split"
    assert gguf_layout(["blk.0.attn_kv_b.weight"]) == "legacy"
    assert gguf_layout(["blk.0.attn_kv_b.weight", "blk.0.attn_k_b.weight", "blk.0.attn_v_b.weight"]) == "split"
    with pytest.raises(ConfigError, match="attn_kv_b"):
        gguf_layout(["token_embd.weight"])


def test_layout_of_file(tmp_path):
    assert gguf_layout(GGUFFile.open(write_gguf(tmp_path / "m.gguf"))) == "split"


# ---- hostile input: each case by patching one field of a valid file ---------------------------------------------
def _patched(data: bytes, at: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def _key_at(data: bytes, key: str) -> int:
    """Offset of the metadata key's string (its u64 length prefix)."""
    raw = key.encode()
    at = data.find(struct.pack("<Q", len(raw)) + raw)
    assert at >= 0, key
    return at


def _value_at(data: bytes, key: str) -> int:
    """Offset of the value of a scalar metadata entry (after key and type)."""
    return _key_at(data, key) + 8 + len(key) + 4


def _tensor_at(data: bytes, name: str) -> tuple[int, int]:
    """(offset of the tensor's n_dims field, n_dims)."""
    at = _key_at(data, name) + 8 + len(name)
    return at, struct.unpack_from("<I", data, at)[0]


def _dims_type_offset(data: bytes, name: str) -> tuple[int, int, int]:
    at, n = _tensor_at(data, name)
    return at + 4, at + 4 + 8 * n, at + 8 + 8 * n


def _check(tmp_path, data: bytes, pattern: str) -> CheckpointError:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=pattern) as e:
        GGUFFile.open(path)
    assert str(path) in str(e.value)  # every message names the file
    return e.value


def _array_header(data: bytes, key: str) -> tuple[int, int]:
    """(offset of the element type, offset of the length) of an array entry."""
    at = _value_at(data, key)
    return at, at + 4


HOSTILE = {
    "bad magic": (lambda d: b"GGUX" + d[4:], "bad magic"),
    "version 1": (lambda d: _patched(d, 4, "<I", 1), "version 1 is not supported"),
    "version 4": (lambda d: _patched(d, 4, "<I", 4), "version 4 is not supported"),
    "byte-swapped": (lambda d: _patched(d, 4, ">I", 3), "big-endian"),
    "tiny file": (lambda d: d[:10], "too small"),
    "absurd tensor count": (lambda d: _patched(d, 8, "<Q", 1 << 60), r"declares \d+ tensors"),
    "absurd kv count": (lambda d: _patched(d, 16, "<Q", 1 << 60), r"declares \d+ metadata entries"),
    "kv count past the end": (lambda d: _patched(d, 16, "<Q", 120), "metadata entry #41.*truncated or corrupt"),
    "string beyond file": (lambda d: _patched(d, _value_at(d, "general.name"), "<Q", 1 << 40),
                           r"metadata 'general.name' declares a length of \d+ bytes but only"),
    "key beyond file": (lambda d: _patched(d, _key_at(d, "test.aaaa"), "<Q", (1 << 64) - 1),
                        "key of metadata entry.*declares a length"),
    "invalid utf-8": (lambda d: d.replace(b"tiny test model", b"tiny test \xff\xfeel"), "not valid UTF-8"),
    "array beyond file": (lambda d: _patched(d, _array_header(d, "tokenizer.ggml.token_type")[1], "<Q", 1 << 40),
                          r"token_type' declares \d+ elements, more than"),
    "string array beyond file": (lambda d: _patched(d, _array_header(d, "tokenizer.ggml.tokens")[1], "<Q", 1 << 33),
                                 r"tokens' declares \d+ elements"),
    "unknown value type": (lambda d: _patched(d, _value_at(d, "test.aaaa") - 4, "<I", 13),
                           "'test.aaaa' has unknown value type 13"),
    "unknown array element type": (lambda d: _patched(d, _array_header(d, "tokenizer.ggml.merges")[0], "<I", 99),
                                   "elements of metadata 'tokenizer.ggml.merges' has unknown value type 99"),
    "nested array": (lambda d: _patched(d, _array_header(d, "tokenizer.ggml.merges")[0], "<I", 9), "array of arrays"),
    "duplicate key": (lambda d: d.replace(b"test.bbbb", b"test.aaaa"), "key 'test.aaaa' appears twice"),
    "alignment not a power of two": (lambda d: _patched(d, _value_at(d, "general.alignment"), "<I", 48),
                                     "'general.alignment' = 48 is not a power of two"),
    "tensor name too long": (lambda d: _patched(d, _key_at(d, "output.weight"), "<Q", 500), "above the limit of 64"),
    "duplicate tensor name": (lambda d: d.replace(b"blk.0.attn_v_b.weight", b"blk.0.attn_k_b.weight"),
                              "'blk.0.attn_k_b.weight' appears twice"),
    "n_dims 5": (lambda d: _patched(d, _tensor_at(d, "output.weight")[0], "<I", 5), "has 5 dimensions"),
    "n_dims 0": (lambda d: _patched(d, _tensor_at(d, "output.weight")[0], "<I", 0), "has 0 dimensions"),
    "zero dim": (lambda d: _patched(d, _dims_type_offset(d, "output.weight")[0] + 8, "<Q", 0),
                 "dimension 1 = 0; dimensions must be positive"),
    "negative dim": (lambda d: _patched(d, _dims_type_offset(d, "output.weight")[0], "<q", -64),
                     "dimension 0 = -64"),
    "overflowing dims": (lambda d: _patched(_patched(_patched(
        d, (p := _dims_type_offset(d, "blk.0.attn_k_b.weight")[0]), "<Q", 1 << 32), p + 8, "<Q", 1 << 32),
        p + 16, "<Q", 1 << 32), "overflows 64 bits"),
    "unknown ggml type": (lambda d: _patched(d, _dims_type_offset(d, "output.weight")[1], "<I", 4),
                          "unknown ggml type 4"),
    "unknown ggml type 999": (lambda d: _patched(d, _dims_type_offset(d, "output.weight")[1], "<I", 999),
                              "unknown ggml type 999"),
    "row not a block multiple": (lambda d: _patched(d, _dims_type_offset(d, "output.weight")[0], "<Q", 48),
                                 r"Q8_0\) has rows of 48 elements, not a multiple of the 32-element block"),
    "unaligned offset": (lambda d: _patched(d, (p := _dims_type_offset(d, "output.weight")[2]),
                                            "<Q", struct.unpack_from("<Q", d, p)[0] + 4),
                         "not a multiple of the alignment 32"),
    "offset outside file": (lambda d: _patched(d, _dims_type_offset(d, "output.weight")[2], "<Q", 1 << 40),
                            "'output.weight' ends at byte.*past the end of the file"),
    "offset near 2^64": (lambda d: _patched(d, _dims_type_offset(d, "output.weight")[2], "<Q", (1 << 64) - 32),
                         "past the end of the file"),
    "overlapping tensors": (lambda d: _patched(d, _dims_type_offset(d, "blk.0.attn_norm.weight")[2], "<Q", 0),
                            "tensors 'token_embd.weight' and 'blk.0.attn_norm.weight' overlap"),
    "truncated data": (lambda d: d[:-100], r"truncated or corrupt \(expected at least .+, found .+\); re-download it"),
    "truncated header": (lambda d: d[:_value_at(d, "tokenizer.ggml.merges") + 20], "truncated or corrupt"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_input(base, tmp_path, case):
    patch, pattern = HOSTILE[case]
    _check(tmp_path, patch(base[1]), pattern)


def test_caps_on_strings_and_arrays(base, tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_io, "MAX_STRING_BYTES", 12)
    _check(tmp_path, base[1], r"metadata 'general.name' is 15 bytes long, above the limit of 12")
    monkeypatch.setattr(gguf_io, "MAX_STRING_BYTES", 1 << 20)
    monkeypatch.setattr(gguf_io, "MAX_ARRAY_LEN", 8)
    _check(tmp_path, base[1], r"'tokenizer.ggml.tokens' declares 16 elements, above the limit of 8")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        GGUFFile.open(tmp_path / "nope.gguf")
    with pytest.raises(CheckpointError, match="not a file"):
        GGUFFile.open(tmp_path)


# ---- fuzzing ----------------------------------------------------------------------------------------------------
_EDGE = [0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 31, 32, 33, 255, 1 << 31, 1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
_position = st.integers(0, 1 << 20)  # taken modulo the file size
_mutation = st.one_of(
    st.tuples(st.just("byte"), _position, st.integers(0, 255)),
    st.tuples(st.just("u64"), _position, st.one_of(st.sampled_from(_EDGE), st.integers(0, (1 << 64) - 1))),
    st.tuples(st.just("u32"), _position, st.one_of(st.sampled_from(_EDGE[:15]), st.integers(0, (1 << 32) - 1))),
    st.tuples(st.just("cut"), _position, st.just(0)),
)


def _mutate(data: bytes, mutations) -> bytes:
    b = bytearray(data)
    for kind, pos, value in mutations:
        if not b:
            break
        pos %= len(b)
        if kind == "byte":
            b[pos] = value
        elif kind == "cut":
            del b[pos:]
        else:
            raw = struct.pack("<Q" if kind == "u64" else "<I", value)
            b[pos:pos + len(raw)] = raw[:len(b) - pos]
    return bytes(b)


@settings(max_examples=1000, deadline=None)
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_never_crashes_nor_overallocates(base, mutations):
    data = _mutate(base[1], mutations)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fuzz.gguf"
        path.write_bytes(data)
        tracemalloc.start()
        try:
            f = GGUFFile.open(path)
            for name in f.tensors:
                assert f.tensor_bytes(name).nbytes == f.tensors[name].nbytes
            f.close()
        except CheckpointError as e:
            assert str(path) in str(e)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
    # Python objects for decoded strings and lists cost a small multiple of their bytes in the file; a length or
    # count taken on trust would cost gigabytes.
    assert peak < 16 * len(base[1]) + (1 << 20), peak


def test_no_torch_import():
    code = ("import sys, tierlm.weights.gguf_io, tierlm.weights.gguf_config; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
