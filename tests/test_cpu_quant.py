"""CPU quantized matmul (``tierlm.kernels.cpu_quant``) against exact products of the dequantized weights.

Tolerances, with u = 2**-24 (float32 unit roundoff) and ŵ_i the reference's dequantized weights:

- mode "f32": the kernel computes each weight as one fused multiply-add (Q4_K: d*sc*q - dmin*m) and
  sums K products in float32, so ``|y - Σ ŵ_i x_i| <= (K + 8) u Σ a_i |x_i|``, where a_i = |d sc q| +
  |dmin m| bounds both the weight and its rounding (a_i = |ŵ_i| for Q6_K and Q8_0, which decode
  identically). A single wrong weight moves y by about Σ|ŵ x| / K, far above this for K <= 512.
- mode "q8": x is replaced by x̂ (int8 times one float scale per 256, or per 32 for Q8_0; emulated
  below exactly as the kernel rounds) and the dot products are integers; the result is checked
  against Σ ŵ_i x̂_i with the same float32 bound, and against the exact product with the activation
  rounding bound ``Σ_blocks max|x_block| / 254 * Σ_block |ŵ|`` added.

Every build in ``ISAS`` that this CPU can run is checked (AVX-512, AVX2 and the portable C++ paths).
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierlm.kernels import cpu_quant as cq
from tierlm.weights.formats import FORMATS, GGMLType, dequantize
from tierlm.weights.ggml_types import tensor_nbytes

T = GGMLType
U = 2.0**-24
FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _cpu_flags() -> set[str]:
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
        return set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


RUNNABLE = [i for i in cq.ISAS if i != "avx2" or {"avx2", "fma", "f16c"} <= _cpu_flags()]


@pytest.fixture(scope="module", autouse=True)
def built():
    """Compile every build once, in parallel (each is a few seconds of g++)."""
    with ThreadPoolExecutor(len(RUNNABLE)) as ex:
        libs = dict(zip(RUNNABLE, ex.map(cq._library, RUNNABLE)))
    assert all(lib is not None for lib in libs.values()), "the CPU kernels must compile where tests run"
    return libs


def random_weight(t: GGMLType, N: int, K: int, seed: int) -> torch.Tensor:
    """(N, row_bytes) random blocks: every bit pattern of quants and sub-scales, finite fp16 d/dmin."""
    rng = np.random.default_rng(seed)
    fmt = FORMATS[t]
    raw = rng.integers(0, 256, size=(N * K // fmt.block_size, fmt.type_size), dtype=np.uint8)
    for name, a, b in fmt.field_offsets():
        if name in ("d", "dmin"):  # about 2^-10 .. 2^-4 with random sign: keeps y well inside float32
            bits = rng.integers(0x1400, 0x2C00, size=len(raw)).astype(np.uint16) | (rng.integers(0, 2, len(raw)) << 15).astype(np.uint16)
            raw[:, a:b] = bits.astype("<u2").view(np.uint8).reshape(-1, 2)
    return torch.from_numpy(raw.reshape(N, -1))


def decoded_terms(w: torch.Tensor, t: GGMLType, N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ŵ, a): the reference's dequantized weight and a_i = |d sc q| + |dmin m| (= |ŵ| unless Q4_K), float64."""
    wd = dequantize(w, t, (N, K)).double()
    if t != T.Q4_K:
        return wd, wd.abs()
    b = w.clone().view(-1, 144)
    b[:, 2:4] = 0  # dmin = 0 leaves d*sc*q
    scaled = dequantize(b.view_as(w), t, (N, K)).double()
    return wd, scaled.abs() + (scaled - wd).abs()


def q8_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x̂ in float64, rounded as the kernel rounds: scale amax/127, rint(x * (127/amax)) clamped to ±127."""
    M, K = x.shape
    xb = x.reshape(M, K // block, block)
    amax = xb.abs().amax(-1, keepdim=True)
    d = torch.div(amax, torch.tensor(127.0))
    inv = torch.where(amax > 0, torch.div(torch.tensor(127.0), amax), torch.zeros(()))
    q = torch.round(xb * inv).clamp(-127, 127)
    return (q.double() * d.double()).reshape(M, K)


def f32_bound(a: torch.Tensor, x: torch.Tensor, K: int) -> torch.Tensor:
    return (K + 8) * U * (x.double().abs() @ a.T)  # (M, N)


def make_x(M: int, K: int, seed: int, kind: str = "gauss") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    if kind == "outlier":
        x[:, :: max(1, K // 7)] *= 40
    elif kind == "saturate":  # every int8 activation at ±127: the widest integer sums
        x = torch.sign(x) * 3.0
    return x


# ---------------------------------------------------------------------------------------------- results


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("t", cq.TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("M", [1, 3, 16])
def test_f32_mode_within_float32_rounding(isa, t, M):
    N, K = 37, 512 if t != T.Q8_0 else 96  # odd N: tiles of 4 rows leave a tail; Q8_0: an odd block count
    w = random_weight(t, N, K, seed=M)
    x = make_x(M, K, seed=M + 1)
    wd, a = decoded_terms(w, t, N, K)
    y = cq.cpu_quant_matmul(x, w, t, K, mode="f32", isa=isa)
    assert y.shape == (M, N) and y.dtype == torch.float32
    err = (y.double() - x.double() @ wd.T).abs()
    assert (err <= f32_bound(a, x, K)).all(), f"max err / bound {(err / f32_bound(a, x, K)).max():.3g}"
    ref = cq.cpu_quant_matmul_ref(x, w, t, K)
    assert (y - ref).abs().max() <= 2 * f32_bound(a, x, K).max()


@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("t", cq.TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("M,kind", [(1, "gauss"), (3, "outlier"), (16, "saturate")])
def test_q8_mode_is_exact_integer_dot_on_rounded_activations(isa, t, M, kind):
    N, K = 37, 512 if t != T.Q8_0 else 96
    w = random_weight(t, N, K, seed=10 + M)
    x = make_x(M, K, seed=M, kind=kind)
    wd, a = decoded_terms(w, t, N, K)
    xh = q8_activations(x, 32 if t == T.Q8_0 else 256)
    y = cq.cpu_quant_matmul(x, w, t, K, mode="q8", isa=isa)
    err = (y.double() - xh @ wd.T).abs()
    bound = f32_bound(a, xh, K)
    assert (err <= bound).all(), f"max err / bound {(err / bound).max():.3g}"
    # the stated error vs the exact product: activation rounding, at most max|x_block| / 254 per element
    block = 32 if t == T.Q8_0 else 256
    step = x.abs().reshape(M, K // block, block).amax(-1).double() / 254  # (M, blocks)
    act = step @ wd.abs().reshape(N, K // block, block).sum(-1).T  # (M, N)
    assert ((y.double() - x.double() @ wd.T).abs() <= act * (1 + 1e-5) + bound + 2 * f32_bound(a, x, K)).all()


@pytest.mark.parametrize("t", cq.TYPES, ids=lambda t: t.name)
@FAST
@given(M=st.integers(1, 16), N=st.integers(1, 11), blocks=st.integers(1, 4), seed=st.integers(0, 2**31),
       mode=st.sampled_from(cq.MODES))
def test_random_shapes(t, M, N, blocks, seed, mode):
    K = blocks * FORMATS[t].block_size
    w = random_weight(t, N, K, seed)
    x = make_x(M, K, seed)
    wd, a = decoded_terms(w, t, N, K)
    xh = x.double() if mode == "f32" else q8_activations(x, 32 if t == T.Q8_0 else 256)
    err = (cq.cpu_quant_matmul(x, w, t, K, mode=mode).double() - xh @ wd.T).abs()
    assert (err <= f32_bound(a, xh, K)).all()


@pytest.mark.parametrize("mode", cq.MODES)
def test_same_bits_for_any_thread_count(mode):
    """Each output is computed by one thread in a fixed order: thread count never changes a bit."""
    N, K = 53, 768
    w = random_weight(T.Q4_K, N, K, 3)
    x = make_x(4, K, 4)
    ys = [cq.cpu_quant_matmul(x, w, T.Q4_K, K, mode=mode, threads=n) for n in (1, 2, 3)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])


def test_16_bit_activations_are_widened_exactly():
    K = 256
    w = random_weight(T.Q6_K, 5, K, 0)
    x = make_x(2, K, 0)
    for dtype in (torch.bfloat16, torch.float16):
        xl = x.to(dtype)
        assert torch.equal(cq.cpu_quant_matmul(xl, w, T.Q6_K, K), cq.cpu_quant_matmul(xl.float(), w, T.Q6_K, K))


def test_strided_rows_and_expert_slices():
    """Rows may sit further apart than their length (a view into a wider buffer, one expert of many)."""
    K, N = 256, 6
    rb = tensor_nbytes(T.Q4_K, (1, K))
    experts = torch.stack([random_weight(T.Q4_K, N, K, s) for s in range(3)])  # (E, N, row_bytes)
    x = make_x(1, K, 0)
    for e in range(3):
        assert torch.equal(cq.cpu_quant_matmul(x, experts[e], T.Q4_K, K), cq.cpu_quant_matmul(x, experts[e].clone(), T.Q4_K, K))
    wide = torch.zeros(N, rb + 16, dtype=torch.uint8)
    wide[:, :rb] = experts[0]
    assert torch.equal(cq.cpu_quant_matmul(x, wide[:, :rb], T.Q4_K, K), cq.cpu_quant_matmul(x, experts[0], T.Q4_K, K))


def test_out_receives_the_result():
    K = 256
    w = random_weight(T.Q4_K, 7, K, 0)
    x = make_x(3, K, 0)
    out = torch.full((3, 7), float("nan"))
    assert cq.cpu_quant_matmul(x, w, T.Q4_K, K, out=out) is out
    assert torch.equal(out, cq.cpu_quant_matmul(x, w, T.Q4_K, K))
    with pytest.raises(ValueError, match=r"out must be a contiguous float32 CPU tensor of shape \(3, 7\)"):
        cq.cpu_quant_matmul(x, w, T.Q4_K, K, out=torch.empty(7, 3))


def test_empty_inputs():
    K = 256
    w = random_weight(T.Q8_0, 4, K, 0)
    assert cq.cpu_quant_matmul(torch.zeros(0, K), w, T.Q8_0, K).shape == (0, 4)
    assert cq.cpu_quant_matmul(torch.zeros(2, K), w[:0], T.Q8_0, K).shape == (2, 0)


# ---------------------------------------------------------------------------------------------- wrapper


def test_wrapper_rejects_bad_inputs_with_the_cause():
    K = 256
    w = random_weight(T.Q4_K, 4, K, 0)
    x = torch.randn(1, K)
    cases = [
        (lambda: cq.cpu_quant_matmul(x, w, T.Q5_K, K), "Q5_K has no CPU kernel"),
        (lambda: cq.cpu_quant_matmul(x, w, T.Q4_K, 100), "K=100 is not a positive multiple of the Q4_K block size 256"),
        (lambda: cq.cpu_quant_matmul(x, w, T.Q4_K, 512), r"x has shape \(1, 256\) but its last dim must be K=512"),
        (lambda: cq.cpu_quant_matmul(x, w[:, :-1], T.Q4_K, K), "row of K=256 elements is 144 bytes, but w has rows of 143"),
        (lambda: cq.cpu_quant_matmul(x.double(), w, T.Q4_K, K), "x must be a 2-D float32/bfloat16/float16"),
        (lambda: cq.cpu_quant_matmul(x[0], w, T.Q4_K, K), "x must be a 2-D"),
        (lambda: cq.cpu_quant_matmul(x, w.view(torch.int8), T.Q4_K, K), "w must be a 2-D uint8 tensor"),
        (lambda: cq.cpu_quant_matmul(x, w.t().contiguous().t(), T.Q4_K, K), "rows must each be contiguous"),
        (lambda: cq.cpu_quant_matmul(x, w, T.Q4_K, K, mode="int8"), "mode must be one of"),
        (lambda: cq.cpu_quant_matmul(x, w, T.Q4_K, K, threads=0), "threads must be a positive int"),
        (lambda: cq.cpu_quant_matmul(x, w, T.Q4_K, K, isa="sse9"), "unknown isa 'sse9'"),
        (lambda: cq.cpu_quant_matmul_ref(x, w, 9999, K), "unknown GGML type id 9999"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=msg):
            call()


def test_falls_back_to_reference_with_one_warning_without_a_compiler(monkeypatch):
    K = 256
    w = random_weight(T.Q4_K, 3, K, 0)
    x = make_x(2, K, 0)
    monkeypatch.setattr(cq, "_compiler", lambda: None)
    cq._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
            y = cq.cpu_quant_matmul(x, w, T.Q4_K, K)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cq.cpu_quant_matmul(x, w, T.Q4_K, K)  # no second warning
        assert torch.equal(y, cq.cpu_quant_matmul_ref(x, w, T.Q4_K, K))
        assert cq.kernel_isa() is None
    finally:
        cq._library.cache_clear()


def test_native_falls_back_to_portable_when_the_compiler_rejects_its_flags(monkeypatch):
    monkeypatch.setitem(cq.ISAS, "native", ("-march=no-such-cpu",))
    cq._library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cq.kernel_isa("native") == "portable"
    finally:
        cq._library.cache_clear()


def test_builds_are_cached_by_content(tmp_path, monkeypatch):
    first = sorted(cq.cache_dir().glob("cpu_quant-*.so"))
    assert {p.name.split("-")[1] for p in first} >= set(RUNNABLE)
    cq._library.cache_clear()
    try:
        cq._library("portable")
        assert sorted(cq.cache_dir().glob("cpu_quant-*.so")) == first  # found, not rebuilt
    finally:
        cq._library.cache_clear()


def test_kernel_isa_names_the_code_path():
    assert cq.kernel_isa("portable") == "portable"
    assert cq.kernel_isa("native") in ("avx512vnni", "avx512", "avx2", "portable")
    if "avx2" in RUNNABLE:
        assert cq.kernel_isa("avx2") == "avx2"


def test_read_probe_reads_everything():
    buf = torch.randint(0, 1 << 62, (1 << 12,), dtype=torch.int64)
    want = int(np.bitwise_xor.reduce(buf.numpy().astype(np.uint64)))  # XOR of every 8-byte word
    assert cq.read_bandwidth_probe(buf, threads=2) == want
