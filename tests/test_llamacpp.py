"""tierlm against llama.cpp (through llama-cpp-python) on the same GGUF files: logits and quantization quality."""

import ctypes

import numpy as np
import pytest
import torch

import tierlm
from test_gguf_model import IDS, gguf_models  # noqa: F401  (session fixture)
from tierlm.weights.formats import dequantize
from tierlm.weights.gguf_io import GGUFFile

llama_cpp = pytest.importorskip("llama_cpp")


@llama_cpp.llama_log_callback
def _quiet(level, text, user_data):  # llama.cpp's logs would flood the test output
    pass


llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))


def llama_logits(path, ids) -> torch.Tensor:
    """llama.cpp's logits for every position. Extra CPU buffer types (AMX/repacked weights) are turned off:
    with them this llama.cpp build aborts on DeepSeek's MLA graph (a node no backend accepts)."""
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert model, f"llama.cpp could not load {path}"
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 256, 256, 256
    cparams.n_threads = cparams.n_threads_batch = 2
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    try:
        n = len(ids)
        batch = llama_cpp.llama_batch_init(n, 0, 1)
        for i, t in enumerate(ids):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, 1
        batch.n_tokens = n
        assert llama_cpp.llama_decode(ctx, batch) == 0
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        rows = [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).copy()
                for i in range(n)]
        llama_cpp.llama_batch_free(batch)
        return torch.from_numpy(np.stack(rows))
    finally:
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# Measured (relative L2 error over all positions' logits): tierlm vs llama.cpp F16 0.02%, Q8_0 1.2%, Q4_K_M 0.8%;
# every position's argmax agrees. llama.cpp quantizes activations to 8 bits before quantized matmuls (q8_0 for
# Q8_0 weights, q8_K for K-quants) while tierlm multiplies in fp32, so the gap is that activation noise amplified
# by MoE routing, the same size as each engine's distance to the fp32 checkpoint (F16 0.04%, Q8_0 2%, Q4_K_M 9.6%).
@pytest.mark.parametrize("quant,bound", [("F16", 1e-3), ("Q8_0", 0.03), ("Q4_K_M", 0.03)])
def test_logits_match_llama_cpp(gguf_models, quant, bound):  # noqa: F811
    src, files = gguf_models
    ours = tierlm.load(files[quant], dtype="float32").logits(IDS)
    theirs = llama_logits(files[quant], IDS)
    assert theirs.shape == ours.shape
    assert rel(ours, theirs) < bound, f"{quant}: {rel(ours, theirs):.4f}"
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() >= 0.95


def test_demo_gguf_with_real_tokenizer_matches_llama_cpp(tmp_path):
    from tierlm.runtime.demo import ensure_demo
    from tierlm.weights.convert import convert

    path = convert(ensure_demo(), tmp_path / "demo-f16.gguf", "F16")[0]
    ids = [0, 128803, 19923, 3, 223, 5464, 5008, 128804] + list(range(1000, 1030))
    ours = tierlm.load(path, dtype="float32").logits(ids)
    assert rel(ours, llama_logits(path, ids)) < 1e-3  # measured 0.02%


def _quantize_with_llama_cpp(src, dst):
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    p.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0


def _decoded(gf: GGUFFile, name: str) -> torch.Tensor:
    info = gf.tensors[name]
    return dequantize(torch.from_numpy(np.array(gf.tensor_bytes(name))), info.ggml_type, info.shape)


def test_quantization_error_no_worse_than_llama_cpp(gguf_models, tmp_path):  # noqa: F811
    """Same F16 tensors quantized by llama.cpp's llama-quantize (Q4_K_M) and by tierlm's convert: tierlm's
    reconstruction error is at most 1.05× llama.cpp's, for every K-quant tensor (measured: ratios 0.9996–1.0008)."""
    src, files = gguf_models
    theirs_path = tmp_path / "llama-q4km.gguf"
    _quantize_with_llama_cpp(files["F16"], theirs_path)
    f16, ours, theirs = GGUFFile.open(files["F16"]), GGUFFile.open(files["Q4_K_M"]), GGUFFile.open(theirs_path)
    checked = {"Q4_K": 0, "Q5_K": 0, "Q6_K": 0}
    for name, info in ours.tensors.items():
        kind = info.ggml_type.name
        if kind not in checked:
            continue
        assert theirs.tensors[name].ggml_type == info.ggml_type, f"{name}: types differ"
        x = _decoded(f16, name)
        e_ours, e_theirs = rel(_decoded(ours, name), x), rel(_decoded(theirs, name), x)
        assert e_ours <= 1.05 * e_theirs, f"{name} ({kind}): tierlm {e_ours:.5f} vs llama.cpp {e_theirs:.5f}"
        checked[kind] += 1
    assert checked["Q4_K"] > 5 and checked["Q6_K"] > 1 and checked["Q5_K"] > 1
