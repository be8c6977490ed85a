"""Quantized matmul and fused MoE kernels against their plain-PyTorch references.

CPU tests always run: the wrappers' reference paths, input checks, the PTX snippets against their
Triton-op twins (by emulating the few PTX instructions they use), and the Triton kernels in
Triton's interpreter. Tests marked ``gpu`` run the compiled kernels on CUDA.

Error bounds are on ||out - ref|| / ||ref|| against float32 references built from the same
quantized bytes:
- float32 FMA paths (gemv for every dtype, the MoE decode path): only the summation order
  differs, ~sqrt(K) * 2**-24, under 1e-5; the result is then rounded to x.dtype, which adds up
  to 2**-11 (fp16) or 2**-8 (bf16) relative.
- tensor-core tiles and prefill (dequantize to x.dtype + cuBLAS): each weight is rounded to
  x.dtype first (2**-11 fp16, 2**-8 bf16), errors that average out over K, plus the output rounding.
- the MoE prefill path multiplies float32 intermediates in tf32 (10-bit mantissa, 2**-11).
- int8-activation decode (``triton_mmvq``, the default for Q4_K/Q6_K/Q8_0/Q5_0 with up to 16
  rows): against ``quant_matmul_q8_ref`` (the same int8 activation groups) only the float order
  differs, as for the FMA paths; against the exact reference the activation rounding adds about
  0.5% relative (half a step of 1/127 of each group's largest value), bounded here by Q8_TOL.
"""

from __future__ import annotations

import os
from dataclasses import replace
import random
import struct
import sys

import pytest
import torch

from tierlm.kernels.moe import DECODE_CONFIGS as MOE_DECODE_CONFIGS
from tierlm.kernels.moe import MoEConfig, moe_dense, moe_quant, moe_quant_q8_ref, moe_quant_ref, swiglu_q8
from tierlm.kernels.q6k_layout import to_aligned
from tierlm.kernels.quant_matmul import (
    DECODE_CONFIGS,
    MMVQ_Q6K_ALIGNED_STEPS,
    FUSED_TYPES,
    KernelInputError,
    QMMConfig,
    dequantize_rows,
    pick_config,
    quant_matmul,
    quant_matmul_q8_ref,
    quant_matmul_ref,
    quantize_q8,
    quantize_q8_ref,
)
from tierlm.weights.formats import FORMATS, GGMLType, dequantize, quantize

T = GGMLType
QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q5_0, T.Q4_K, T.Q5_K, T.Q6_K]
# output rounding to x.dtype, on top of float32 arithmetic (see the module docstring)
FMA_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
TILE_TOL = {torch.float32: 5e-3, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}
Q8_TOL = 2e-2  # int8 activations against the exact float32 reference (measured 0.4-0.7%)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_weight(t: GGMLType, n: int, k: int, seed: int, device="cpu") -> torch.Tensor:
    """GGUF bytes of an (n, k) weight: quantized Gaussian data, or for Q2_K/Q3_K (which tierlm cannot
    write) random bytes with small finite fp16 scales."""
    g = torch.Generator().manual_seed(seed)
    if t in QUANTIZABLE:
        return quantize(torch.randn(n, k, generator=g) * 0.02, t).to(device)
    fmt = FORMATS[t]
    raw = torch.randint(0, 256, (n * k // fmt.block_size, fmt.type_size), generator=g, dtype=torch.uint8)
    for name, a, b in fmt.field_offsets():
        if name in ("d", "dmin"):
            raw[:, a:b] = (torch.rand(raw.shape[0], 1, generator=g) * 1e-3).half().view(torch.uint8)
    return raw.reshape(n, -1).to(device)


# ---------------------------------------------------------------- CPU: reference paths and checks


@pytest.mark.parametrize("t", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_path_is_dequantize_then_matmul(t, dtype):
    """On the CPU: the C++ kernel for a few rows of Q4_K/Q6_K/Q8_0 (float32 arithmetic on the blocks),
    otherwise exactly dequantize + matmul."""
    from tierlm.kernels.cpu_quant import TYPES as CPU_TYPES

    N, K = 7, 512
    w = random_weight(t, N, K, seed=1)
    x = torch.randn(2, 3, K).to(dtype)
    out = quant_matmul(x, w, t, K)
    assert out.shape == (2, 3, N) and out.dtype == dtype
    want = x.reshape(-1, K) @ dequantize(w, t, (N, K), dtype).T
    if t in CPU_TYPES:
        exact = (x.reshape(-1, K).float() @ dequantize(w, t, (N, K)).T).to(dtype)
        assert rel(out.reshape(-1, N).float(), exact.float()) <= {torch.float32: 1e-6}.get(dtype, 1e-2)
    else:
        assert torch.equal(out.reshape(-1, N), want)
    wide = quant_matmul(x, w, t, K, out_dtype=torch.float32)  # the same product, written in another dtype
    assert wide.dtype == torch.float32 and torch.equal(wide.to(dtype), out)
    with pytest.raises(KernelInputError, match="out_dtype must be"):
        quant_matmul(x, w, t, K, out_dtype=torch.int8)
    ref = quant_matmul_ref(x, w, t, K)
    assert ref.dtype == torch.float32
    assert torch.allclose(ref.reshape(-1, N), x.reshape(-1, K).float() @ dequantize(w, t, (N, K)).T, rtol=1e-5, atol=1e-6)
    assert rel(out.float(), ref) <= FMA_TOL[dtype] * 2


def test_empty_and_strided_inputs():
    w = random_weight(T.Q8_0, 5, 64, seed=2)
    assert quant_matmul(torch.randn(0, 64), w, T.Q8_0, 64).shape == (0, 5)
    x = torch.randn(64, 3).T  # (3, 64) with stride 1 along dim 0: copied, not rejected
    assert torch.allclose(quant_matmul(x, w, T.Q8_0, 64), quant_matmul(x.contiguous(), w, T.Q8_0, 64))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda w: quant_matmul(torch.randn(2, 64).int(), w, T.Q8_0, 64), "float16, bfloat16 or float32"),
        (lambda w: quant_matmul(torch.randn(2, 64), w.float(), T.Q8_0, 64), "uint8"),
        (lambda w: quant_matmul(torch.randn(2, 63), w, T.Q8_0, 63), "multiple of the Q8_0 block size"),
        (lambda w: quant_matmul(torch.randn(2, 32), w, T.Q8_0, 32), "rows of 68"),
        (lambda w: quant_matmul(torch.randn(2, 64), w, T.Q4_K, 64), "multiple of the Q4_K"),
        (lambda w: quant_matmul(torch.randn(2, 128), w, T.Q8_0, 64), "last dim must be K=64"),
        (lambda w: quant_matmul(torch.randn(2, 64), torch.cat([w, w], 1)[:, :68], T.Q8_0, 64), "contiguous"),
        (lambda w: quant_matmul(torch.randn(2, 64), w, 99, 64), "unknown GGML type"),
    ],
)
def test_bad_inputs_have_clear_errors(call, match):
    w = random_weight(T.Q8_0, 4, 64, seed=3)
    with pytest.raises(ValueError, match=match):
        call(w)


def _naive_moe(x, ids, wts, gate, up, down, types):
    """Token by token, slot by slot: the definition the fused layer must match."""
    E, I, D = gate.shape[0], gate.shape[1], x.shape[1]
    out = torch.zeros(x.shape[0], D)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if not 0 <= e < E:
                continue
            g = dequantize(gate[e], types[0], (I, D)) @ x[t].float()
            u = dequantize(up[e], types[1], (I, D)) @ x[t].float()
            out[t] += wts[t, k] * (dequantize(down[e], types[2], (D, I)) @ (torch.nn.functional.silu(g) * u))
    return out


def _moe_inputs(types, T_, seed, E=16, I=512, D=768, K=8):
    """A MoE layer's stacked random experts on the GPU (seed) and a float16 x, K distinct expert ids and weights for
    T_ tokens (seed + 1)."""
    gate, up, down = _moe_weights(types, E, I, D, seed=seed, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randn(T_, D, device="cuda", generator=g).half()
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(T_)])
    return gate, up, down, x, ids, torch.rand(T_, K, device="cuda", generator=g)


def _moe_weights(types, E, I, D, seed, device="cpu"):
    gate = random_weight(types[0], E * I, D, seed).view(E, I, -1).to(device)
    up = random_weight(types[1], E * I, D, seed + 1).view(E, I, -1).to(device)
    down = random_weight(types[2], E * D, I, seed + 2).view(E, D, -1).to(device)
    return gate, up, down


def test_moe_reference_matches_naive_loop():
    types = (T.Q4_K, T.Q4_K, T.Q6_K)
    E, I, D, K = 6, 256, 256, 3
    gate, up, down = _moe_weights(types, E, I, D, seed=4)
    x = torch.randn(5, D).half()
    ids = torch.randint(0, E, (5, K))
    ids[0, 1] = -1  # no expert
    ids[1, 2] = 17  # out of range: no expert either
    wts = torch.rand(5, K)
    out = moe_quant(x, ids, wts, gate, up, down, *types)  # CPU: the reference
    assert out.dtype == torch.float32 and out.shape == (5, D)
    assert torch.allclose(out, _naive_moe(x, ids, wts, gate, up, down, types), rtol=1e-4, atol=1e-5)


def test_moe_checks_shapes_and_types():
    types = (T.Q8_0, T.Q8_0, T.Q8_0)
    gate, up, down = _moe_weights(types, 4, 64, 32, seed=5)
    x, ids, wts = torch.randn(2, 32), torch.zeros(2, 2, dtype=torch.int64), torch.ones(2, 2)
    with pytest.raises(KernelInputError, match="do not stack"):
        moe_quant(x, ids, wts, gate, up[:, :32].contiguous(), down, *types)
    with pytest.raises(KernelInputError, match="not Q4_0 rows"):
        moe_quant(x, ids, wts, gate, up, down, T.Q8_0, T.Q8_0, T.Q4_0)
    with pytest.raises(KernelInputError, match="float32 with the shape of ids"):
        moe_quant(x, ids, wts.half(), gate, up, down, *types)
    with pytest.raises(KernelInputError, match="one float16/bfloat16/float32 dtype"):
        moe_dense(x, ids, wts, torch.randn(4, 8, 32), torch.randn(4, 8, 32).half(), torch.randn(4, 32, 8))


def _emulate_ptx(asm: str, inputs: list[int], n_out: int) -> list[int]:
    """Run the straight-line PTX the kernels use (shl, shr.u32, and, mov, lop3) on 32-bit ints."""
    regs = {f"${n_out + i}": v & 0xFFFFFFFF for i, v in enumerate(inputs)}

    def val(tok):
        return regs[tok] if tok in regs else int(tok, 0) & 0xFFFFFFFF

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(("{", "}", ".reg")):
            continue
        op, rest = line.split(None, 1)
        d, *a = [s.strip() for s in rest.split(",")]
        if op == "shl.b32":
            r = val(a[0]) << int(a[1])
        elif op == "shr.u32":
            r = val(a[0]) >> int(a[1])
        elif op == "and.b32":
            r = val(a[0]) & val(a[1])
        elif op == "mov.b32":
            r = val(a[0])
        elif op == "lop3.b32":  # LUT bit index = (a << 2) | (b << 1) | c, as PTX defines it
            x, y, z, lut = val(a[0]), val(a[1]), val(a[2]), int(a[3], 0)
            r = sum(((lut >> (((x >> i) & 1) << 2 | ((y >> i) & 1) << 1 | (z >> i) & 1)) & 1) << i for i in range(32))
        else:
            raise AssertionError(f"unexpected PTX op {op}")
        regs[d] = r & 0xFFFFFFFF
    return [regs[f"${i}"] for i in range(n_out)]


def test_inline_ptx_matches_its_triton_twin():
    triton = pytest.importorskip("triton")  # noqa: F841
    from tierlm.kernels import triton_gemv as tg

    def f(bits):
        return struct.unpack("<f", struct.pack("<I", bits))[0]

    rnd = random.Random(0)
    for _ in range(300):
        b = [rnd.randrange(256) for _ in range(12)]
        word = b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24
        out = _emulate_ptx(tg._Q4_ASM.value, [word], 8)
        assert [f(o) for o in out] == [1 + (v & 15) / 16 for v in b[:4]] + [1 + (v >> 4) / 16 for v in b[:4]]
        out = _emulate_ptx(tg._Q8_ASM.value, [b[0] | b[1] << 8], 2)
        assert [f(o) for o in out] == [1 + ((v ^ 0x80) / 256) for v in b[:2]]
        qa, qb, qh = b[4:6], b[6:8], b[8:10]
        out = _emulate_ptx(tg._Q6_ASM.value, [qa[0] | qa[1] << 8, qb[0] | qb[1] << 8, qh[0] | qh[1] << 8], 8)
        for k in range(2):
            q = [(qa[k] & 15) | (qh[k] & 3) << 4, (qb[k] & 15) | (qh[k] >> 2 & 3) << 4,
                 qa[k] >> 4 | (qh[k] >> 4 & 3) << 4, qb[k] >> 4 | (qh[k] >> 6) << 4]
            assert [f(out[2 * r + k]) for r in range(4)] == [1 + v / 64 for v in q]


def test_eight_thread_q4k_step_needs_16_byte_aligned_weights(monkeypatch):
    """The eight-thread Q4_K step tells the compiler its rows are 16-byte aligned; a weight view that is
    not (a byte offset into a larger buffer) is launched with the four-thread form instead."""
    from tierlm.kernels import triton_mmvq as tv
    from tierlm.kernels.quant_matmul import _qmm_launch

    launches = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append(kw["LOADS"])

    monkeypatch.setattr(tv, "mmvq_kernel", Recorder())
    K, N = 512, 4
    row = 144 * K // 256  # bytes of a Q4_K row
    buf = torch.zeros(N * row + 16, dtype=torch.uint8)
    x = torch.randn(1, K)
    for loads in (6, 14):  # the eight-thread step, and its lean form
        cfg = QMMConfig("mmvq", 1, 1, block_n=1, nblk=8, loads=loads)
        for off in (0, 8):
            w = buf[off:off + N * row].view(N, row)
            assert (w.data_ptr() % 16 == 0) == (off == 0)
            _qmm_launch(x, w, T.Q4_K, K, cfg)
    assert launches == [6, 2, 14, 2]
    launches.clear()  # the fused MoE's gate/up launch: the same rule
    from tierlm.kernels import moe

    monkeypatch.setattr(tv, "moe_up_q8_kernel", Recorder())
    monkeypatch.setattr(tv, "moe_down_q8_kernel", Recorder())
    E, I, D = 2, 256, 512  # gate/up (E, I, D) Q4_K, down (E, D, I) Q6_K: one block per down row
    ids, wts = torch.zeros(1, dtype=torch.int64), torch.ones(1)
    down = torch.zeros(E, D, 210, dtype=torch.uint8)
    big = torch.zeros(E * I * row + 16, dtype=torch.uint8)
    for off in (0, 8):
        gate = big[off:off + E * I * row].view(E, I, row)
        moe._moe_pairs_q8(torch.randn(1, D), ids, wts, gate, gate, down, [T.Q4_K, T.Q4_K, T.Q6_K], (E, I, D, 1),
                          moe.DEFAULT)
    assert moe.DEFAULT.mmvq_loads == 14 and launches[0::2] == [14, 2]


def test_pdl_only_at_one_row_on_hopper(monkeypatch):
    """Programmatic dependent launch: on sm_90+ at one activation row only (where it measured faster), never on older
    cards (griddepcontrol is sm_90's), in the interpreter, on the CPU or with TIERLM_PDL=0's switch off."""
    from tierlm.kernels import quant_matmul as qm

    cap = [(9, 0)]
    monkeypatch.setattr(qm, "device_info", lambda device: (cap[0], 132))
    monkeypatch.setattr(qm, "_interpreting", lambda: False)
    monkeypatch.setattr(qm, "PDL", True)
    cuda = torch.device("cuda", 0)
    assert qm.pdl_launch(cuda, 1) == {"PDL": True, "launch_pdl": True}
    assert qm.pdl_launch(cuda, qm.PDL_MAX_ROWS + 1) == {} and qm.pdl_launch(torch.device("cpu"), 1) == {}
    cap[0] = (8, 9)
    assert qm.pdl_launch(cuda, 1) == {}
    cap[0] = (10, 0)
    assert qm.pdl_launch(cuda, 1)
    monkeypatch.setattr(qm, "PDL", False)
    assert qm.pdl_launch(cuda, 1) == {}
    monkeypatch.setattr(qm, "PDL", True)
    monkeypatch.setattr(qm, "_interpreting", lambda: True)
    assert qm.pdl_launch(cuda, 1) == {}


def test_mmvq_rejects_act_rows_below_one():
    from tierlm.kernels.quant_matmul import _qmm_launch

    w = torch.zeros(4, 144, dtype=torch.uint8)
    with pytest.raises(KernelInputError, match="act_rows=0"):
        _qmm_launch(torch.randn(2, 256), w, T.Q4_K, 256, QMMConfig("mmvq", 1, 1, block_n=1, nblk=1, loads=14, act_rows=0))


def test_pick_config_follows_the_measured_rules():
    """Decode launch choice (bench/results/kernels-NVIDIA_H200-int8.md, decode-rows-NVIDIA_H200.md): int8
    kernels up to 4 rows with the tile measured best per type; tensor-core tiles above, from 3 rows where they
    measured faster, from 2 for the 129280-row head; no tiles without sm_80 or with float32 activations."""
    h, f16 = (9, 0), torch.float16
    # Q4_K: two-warp lean steps shaped by the row (28 blocks of 7168: two rows x 4 blocks where there are rows
    # enough, one row x 8 on an expert's 2048 rows; 64 blocks of 16384: one row x 8; short rows: four x 2)
    assert pick_config(T.Q4_K, 1, 2048, 7168, f16, h, 132) == QMMConfig("mmvq", 2, 1, block_n=1, nblk=8, loads=14)
    assert pick_config(T.Q4_K, 1, 18432, 7168, f16, h, 132) == QMMConfig("mmvq", 2, 1, block_n=2, nblk=4, loads=14)
    assert pick_config(T.Q4_K, 1, 7168, 16384, f16, h, 132) == QMMConfig("mmvq", 2, 1, block_n=1, nblk=8, loads=14)
    assert pick_config(T.Q4_K, 1, 24576, 1536, f16, h, 132) == QMMConfig("mmvq", 2, 1, block_n=4, nblk=2, loads=14)
    assert pick_config(T.Q6_K, 1, 7168, 2048, f16, h, 132) == QMMConfig("mmvq", 2, 1, block_n=2, nblk=2, loads=12)
    assert pick_config(T.Q6_K, 2, 7168, 2048, f16, h, 132) == QMMConfig("mmvq", 1, 1, block_n=4, nblk=2)
    assert pick_config(T.Q8_0, 1, 7168, 16384, f16, h, 132) == QMMConfig("mmvq", 1, 1, block_n=1, nblk=4)
    assert pick_config(T.Q4_K, 4, 2048, 7168, f16, h, 132) == QMMConfig("mmvq", 2, 1, block_n=1, nblk=8, loads=14,
                                                                        act_rows=4)
    assert pick_config(T.Q4_K, 2, 24576, 1536, f16, h, 132) == QMMConfig("mmvq", 2, 1, block_n=4, nblk=2, loads=14,
                                                                         act_rows=2)
    assert pick_config(T.Q4_K, 2, 18432, 7168, f16, h, 132) == QMMConfig("mmvq", 2, 1, block_n=2, nblk=4, loads=14,
                                                                         act_rows=2)
    assert pick_config(T.Q4_K, 1, 2048, 7168, f16, h, 16).block_n == 2  # few multiprocessors: an expert's rows
    # fill them in pairs
    assert pick_config(T.Q6_K, 2, 129280, 7168, f16, h, 132) == QMMConfig("mmq", 2, 1, block_n=32, nblk=1)
    # dense up at 16 rows: 288 programs of 64 rows, split in 4 for 8 programs per multiprocessor
    assert pick_config(T.Q4_K, 16, 18432, 7168, f16, h, 132) == QMMConfig("mmq", 4, 4, block_n=64, nblk=1)
    assert pick_config(T.Q4_K, 8, 24576, 1536, f16, h, 132).split_k == 1  # q_b: 6 blocks, at least 4 per split
    assert pick_config(T.Q4_K, 16, 2048, 7168, f16, h, 132).kind == "mmq"
    assert pick_config(T.Q4_K, 4, 7168, 16384, f16, h, 132).kind == "mmq"  # o_proj: tiles from 3 rows
    assert pick_config(T.Q6_K, 3, 7168, 2048, f16, h, 132).kind == "mmq"
    assert pick_config(T.Q5_0, 4, 2048, 7168, f16, h, 132).kind == "mmvq"
    assert pick_config(T.Q4_K, 16, 2048, 7168, f16, (7, 5), 68).kind == "mmvq"  # Turing: no tiles
    assert pick_config(T.Q6_K, 4, 129280, 7168, torch.float32, h, 132).kind == "mmvq"
    # Q6_K in the aligned layout: its int8 step up to 8 rows (4 on the head), shaped by the rows' alignment, then
    # the tiles
    assert pick_config(T.Q6_K, 1, 7168, 2048, f16, h, 132, aligned=True) == QMMConfig("mmvq", 1, 1, block_n=2, nblk=4)
    assert pick_config(T.Q6_K, 4, 129280, 7168, f16, h, 132, aligned=True) == QMMConfig("mmvq", 1, 1, block_n=2,
                                                                                      nblk=2)
    assert pick_config(T.Q6_K, 1, 64, 512, f16, h, 132, aligned=True) == QMMConfig("mmvq", 2, 1, block_n=2, nblk=2)
    assert pick_config(T.Q6_K, 8, 7168, 2048, f16, h, 132, aligned=True).kind == "mmvq"
    assert pick_config(T.Q6_K, 9, 7168, 2048, f16, h, 132, aligned=True).kind == "mmq"
    assert pick_config(T.Q6_K, 4, 7168, 18432, f16, h, 132, aligned=True).kind == "mmvq"
    assert pick_config(T.Q6_K, 5, 7168, 18432, f16, h, 132, aligned=True).kind == "mmq"
    assert pick_config(T.Q6_K, 5, 129280, 7168, f16, h, 132, aligned=True).kind == "mmq"


@pytest.mark.parametrize("group", ["gemv", "tile", "moe", "mmvq", "moe8", "moe8k", "aligned"])
def test_triton_kernels_in_interpreter(group, interpreter_runs):
    """The kernels in Triton's CPU interpreter (this file run as a script, since TRITON_INTERPRET must
    be set before the kernels are defined); they take the Triton-op twins of their inline PTX. The groups run in the
    background from the start of the session (conftest's InterpreterRuns); this test reads a group's result."""
    from conftest import interpreter_skip_reason

    if reason := interpreter_skip_reason():
        pytest.skip(reason)
    code, tail = interpreter_runs.result(group)
    assert code == 0, tail


# ---------------------------------------------------------------- GPU: compiled kernels


def _poison_cache():
    """Fill freed allocator blocks with NaN so an output element a kernel never writes shows up."""
    junk = torch.full((64 << 20,), float("nan"), device="cuda")
    del junk


SHAPES = [(300, 1024), (1000, 2560), (64, 256)]  # non-power-of-two N; K = whole K-quant blocks


@pytest.mark.gpu
@pytest.mark.parametrize("t", FUSED_TYPES + (T.Q4_0, T.Q5_K, T.Q2_K, T.Q3_K, T.F16, T.BF16))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("M", [1, 3, 16, 64, 300])
def test_quant_matmul_matches_reference(t, dtype, M):
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bfloat16 needs sm_80+")
    for i, (N, K) in enumerate(SHAPES):
        w = random_weight(t, N, K, seed=10 + i, device="cuda")
        x = (torch.randn(M, K, device="cuda") * 2).to(dtype)
        ref = quant_matmul_ref(x, w, t, K)
        _poison_cache()
        out = quant_matmul(x, w, t, K)
        assert out.dtype == dtype and out.shape == (M, N)
        assert torch.isfinite(out).all(), (t, dtype, M, N, K)
        other = torch.float32 if dtype != torch.float32 else torch.bfloat16  # the int8 launch writes it itself
        also = quant_matmul(x, w, t, K, out_dtype=other)
        assert also.dtype == other and torch.equal(also.to(dtype), out) if other == torch.float32 else \
            torch.equal(also, out.to(other)), (t.name, dtype, M)
        cap = torch.cuda.get_device_capability()
        if t in FUSED_TYPES and M <= 16 and pick_config(t, M, N, K, dtype, cap, 1).kind == "mmvq":  # int8 decode
            assert rel(out, quant_matmul_q8_ref(x, w, t, K)) <= FMA_TOL[dtype], (t.name, dtype, M, N, K)
            assert rel(out, ref) <= Q8_TOL, (t.name, dtype, M, N, K, rel(out, ref))
        else:
            assert rel(out, ref) <= TILE_TOL[dtype], (t.name, dtype, M, N, K, rel(out, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("t", FUSED_TYPES)
@pytest.mark.parametrize("cfg", DECODE_CONFIGS, ids=str)
def test_every_decode_config(t, cfg):
    if cfg.q4k_block and t != T.Q4_K:
        pytest.skip("q4k_block only changes Q4_K")
    N, K = 200, 2048
    w = random_weight(t, N, K, seed=20, device="cuda")
    M = {"gemv": 1, "tile": 7, "mmvq": 3, "mmq": 7}[cfg.kind]
    x = torch.randn(M, K, device="cuda").half()
    _poison_cache()
    out = quant_matmul(x, w, t, K, config=cfg)
    if cfg.kind == "mmvq":
        assert rel(out, quant_matmul_q8_ref(x, w, t, K)) <= FMA_TOL[torch.float16]
        return
    tol = FMA_TOL if cfg.kind == "gemv" else TILE_TOL
    assert rel(out, quant_matmul_ref(x, w, t, K)) <= tol[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("t", FUSED_TYPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [2, 16, 20])
def test_mmq_matches_reference(t, dtype, M):
    """Tensor-core decode tiles: partial row blocks, split-K with a short last split, more rows than a tile."""
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tensor-core tiles need sm_80+")
    for i, ((N, K), split, bn) in enumerate([((300, 1024), 1, 32), ((1000, 2560), 3, 64), ((64, 256), 2, 16)]):
        w = random_weight(t, N, K, seed=30 + i, device="cuda")
        x = (torch.randn(M, K, device="cuda") * 2).to(dtype)
        _poison_cache()
        out = quant_matmul(x, w, t, K, config=QMMConfig("mmq", 4, split, block_n=bn, nblk=1))
        assert out.dtype == dtype and out.shape == (M, N)
        assert rel(out, quant_matmul_ref(x, w, t, K)) <= TILE_TOL[dtype], (t.name, dtype, M, N, K)
    # weight bytes that start off a 4-byte boundary (the Q4_K tiles read 32-bit header words): copied first
    buf = torch.zeros(w.numel() + 2, dtype=torch.uint8, device="cuda")
    odd = buf[2:].view(w.shape)
    odd.copy_(w)
    assert odd.data_ptr() % 4 == 2
    out = quant_matmul(x, odd, t, K, config=QMMConfig("mmq", 4, 2, block_n=32, nblk=1))
    assert rel(out, quant_matmul_ref(x, w, t, K)) <= TILE_TOL[dtype]
    assert rel(dequantize_rows(odd, t, K, dtype).float(), dequantize(w, t, w.shape[:1] + (K,), torch.float32)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_q8_matches_reference(dtype):
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bfloat16 needs sm_80+")
    x = (torch.randn(5, 4096, device="cuda") * 3).to(dtype)
    x[1, :32] = 0  # an all-zero group: scale 0, no division by zero
    got, ref = quantize_q8(x), quantize_q8_ref(x)
    assert torch.equal(got[0], ref[0]), (got[0].int() - ref[0].int()).abs().max()  # same roundings, ties included
    assert torch.equal(got[1], ref[1]) and got[1][1, 0] == 0 and torch.equal(got[2], ref[2])


@pytest.mark.gpu
@pytest.mark.parametrize("t", FUSED_TYPES + (T.F16, T.BF16, T.F32))
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dequantize_rows_matches_formats(t, dtype):
    N, K = 70, 1536
    w = random_weight(t, N, K, seed=30, device="cuda")
    _poison_cache()
    out = dequantize_rows(w, t, K, dtype)
    ref = dequantize(w, t, (N, K), torch.float32)
    if dtype == torch.float32:  # one rounding of A*f - B instead of the reference's d*sc*q - dmin*m: a few ulps
        assert torch.allclose(out, ref, rtol=2e-6, atol=1e-6 * ref.abs().max().item())
        return
    # 16-bit: Q4_K decodes in packed fp16 (its scales rounded to fp16 too, then one fma), so a weight can be off
    # by a few fp16 ulps of its 32-element group's largest value, not of its own (small ones cancel a * q - m)
    group_max = ref.abs().view(N, K // 32, 32).amax(-1, keepdim=True).expand(-1, -1, 32).reshape(N, K)
    assert ((out.float() - ref).abs() <= 4e-3 * group_max + 1e-7).all()


@pytest.mark.gpu
@pytest.mark.parametrize("types", [(T.Q4_K, T.Q4_K, T.Q6_K), (T.Q8_0, T.Q8_0, T.Q5_0), (T.Q4_K, T.Q4_K, T.Q4_K)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T_", [1, 4, 40])
def test_moe_matches_reference(types, dtype, T_):
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bfloat16 needs sm_80+")
    E, I, D, K = 16, 512, 768, 8
    gate, up, down = _moe_weights(types, E, I, D, seed=40, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(41)
    x = torch.randn(T_, D, device="cuda", generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(T_)])
    if T_ > 1:
        ids[0, 0] = -1  # no expert
    wts = torch.rand(T_, K, device="cuda", generator=g)
    ref = moe_quant_ref(x, ids, wts, gate, up, down, *types)
    _poison_cache()
    out = moe_quant(x, ids, wts, gate, up, down, *types)
    sorted_path = T_ * K >= MoEConfig().sorted_min_pairs
    if not sorted_path:  # int8 activations: against the same rounding of x and h; h itself may differ
        # in its last float bit, which can move one of its int8 values by a step
        q8_ref = moe_quant_q8_ref(x, ids, wts, gate, up, down, *types)
        assert rel(out, q8_ref) <= 1e-4 and rel(out, ref) <= Q8_TOL, (types, dtype, T_, rel(out, q8_ref), rel(out, ref))
        float_out = moe_quant(x, ids, wts, gate, up, down, *types, config=MoEConfig(q8=False))
        assert rel(float_out, ref) <= 1e-5, (types, dtype, T_, rel(float_out, ref))
        return
    tol = 1.5e-2 if dtype == torch.bfloat16 else 5e-3  # tiles: fp16/bf16/tf32 operands
    assert out.dtype == torch.float32 and rel(out, ref) <= tol, (types, dtype, T_, rel(out, ref))


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [c for c in MOE_DECODE_CONFIGS if c.q8], ids=str)
@pytest.mark.parametrize("down_type", [T.Q6_K, T.Q4_K], ids=lambda t: t.name)
def test_every_moe_decode_config(cfg, down_type):
    """Every int8 decode launch bench/kernels.py times gives the int8 reference's result (down in Q6_K
    on Q4_K_M's "more bits" layers, Q4_K on the others)."""
    types = (T.Q4_K, T.Q4_K, down_type)
    gate, up, down, x, ids, wts = _moe_inputs(types, 3, seed=42)
    ids[1, 2] = -1
    _poison_cache()
    out = moe_quant(x, ids, wts, gate, up, down, *types, config=cfg)
    assert rel(out, moe_quant_q8_ref(x, ids, wts, gate, up, down, *types)) <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("T_", [1, 3])
@pytest.mark.parametrize("down_type", [T.Q6_K, T.Q4_K], ids=lambda t: t.name)
def test_moe_side_by_side_forms_on_gpu(T_, down_type):
    """Q4_K gate and up side by side in one loop give the h of one matrix after the other, and the layer with them and
    with a token's slots side by side in the down launch (Q4_K down experts; at every token count here) gives the int8
    reference's result; at one token with programmatic dependent launches on sm_90+, Q6_K down experts aligned as the
    layers hold them."""
    from tierlm.kernels import moe

    types = [T.Q4_K, T.Q4_K, down_type]
    gate, up, down, x, ids, wts = _moe_inputs(types, T_, seed=44)
    ids[0, 3] = -1
    ref = moe_quant_q8_ref(x, ids, wts, gate, up, down, *types)
    aligned = down_type == T.Q6_K
    dn = to_aligned(down) if aligned else down
    dims = (gate.shape[0], gate.shape[1], x.shape[1], ids.shape[1])
    # down rows of I = 512 (2 blocks): with 2 blocks a step, only the first step, loaded before the wait (cfg.early,
    # early_weights) or after it; with 1, the first then a whole one; in one group of rows a program or in 2-3 groups
    # sharing their activation loads (the default's form)
    for side, slots, weights in (((2, 2, 1), (4, 2, 8), True), ((4, 2, 4), (2, 2, 4), False),
                                 ((1, 4, 1), (1, 2, 2), True), ((2, 1, 1), (1, 1, 1), True),
                                 ((1, 4, 1), (4, 1, 4, 2), False), ((2, 2, 1), (1, 2, 2, 2), True),
                                 ((2, 1, 1), (2, 1, 1, 3), True)):
        cfg = replace(moe.DEFAULT, gate_up_lines=side, down_slots=slots, early_weights=weights, slots_max_tokens=T_,
                      down_held=())
        loads = moe.q8_loads(cfg, types, gate, up, dn, aligned)
        xq, xd, xs = quantize_q8(x, pack=bool(loads[0] & 2))
        h = [moe.q8_gate_up(xq, xd, xs, ids.reshape(-1), gate, up, types, dims, c, loads[0])
             for c in (cfg, replace(cfg, gate_up_lines=()))]
        assert rel(h[0], h[1]) <= 1e-6, side
        _poison_cache()
        out = moe_quant(x, ids, wts, gate, up, dn, *types, config=cfg, aligned=aligned)
        assert out.shape == x.shape and rel(out, ref) <= 1e-4, (side, slots)
        late = moe_quant(x, ids, wts, gate, up, dn, *types, config=replace(cfg, early=False), aligned=aligned)
        assert torch.equal(out, late), (side, slots)  # the same sums, whenever the first weights were loaded
    if down_type == T.Q6_K:  # aligned: a token's slots side by side in the down launch too, in 1-3 groups of rows, on
        # down rows of 2, 6 and 8 blocks (1, 1 and 4 words a lane; a partial last step at 6), 1024 of them (three groups
        # of rows a program: the last program's past them clamped)
        for I, steps in ((512, [(1, 2, 2), (2, 1, 1, 3)]), (1536, [(1, 4, 4, 2)]), (2048, [(1, 4, 4, 2), (2, 2, 4)])):
            gate, up, down, x, ids, wts = _moe_inputs(types, T_, seed=46, I=I, D=1024)
            ids[0, 5] = 99  # an id past the experts adds nothing
            ref = moe_quant_q8_ref(x, ids, wts, gate, up, down, *types)
            dn = to_aligned(down)
            for step in steps:
                cfg = replace(moe.DEFAULT, down_slots_aligned=step, slots_max_tokens=T_, down_held=())
                assert cfg.sums_slots(types, True, T_) and not cfg.slots_down(types, T_, False)
                _poison_cache()
                out = moe_quant(x, ids, wts, gate, up, dn, *types, config=cfg, aligned=True)
                assert out.shape == x.shape and rel(out, ref) <= 1e-4, (I, step)
                late = moe_quant(x, ids, wts, gate, up, dn, *types, config=replace(cfg, early=False), aligned=True)
                assert torch.equal(out, late), (I, step)  # the ids read before the wait or after it: the same sums
    if down_type == T.Q4_K:  # down rows of 3 blocks, 2 a step: the first step, loaded before the wait, then a partial
        gate, up, down, x, ids, wts = _moe_inputs(types, T_, seed=45, I=768)
        for slots, weights in (((4, 2, 8), True), ((4, 1, 4, 2), False), ((2, 2, 4, 3), True)):
            cfg = replace(moe.DEFAULT, down_slots=slots, early_weights=weights, slots_max_tokens=T_, down_held=())
            out = moe_quant(x, ids, wts, gate, up, down, *types, config=cfg)
            assert rel(out, moe_quant_q8_ref(x, ids, wts, gate, up, down, *types)) <= 1e-4, slots
            late = moe_quant(x, ids, wts, gate, up, down, *types, config=replace(cfg, early=False))
            assert torch.equal(out, late), slots


@pytest.mark.gpu
@pytest.mark.parametrize("T_", [1, 3])
@pytest.mark.parametrize("down_type", [T.Q6_K, T.Q4_K], ids=lambda t: t.name)
def test_moe_held_down_launch_on_gpu(T_, down_type):
    """The down launch that holds its slots' activations in registers and walks its rows (the default at one token)
    gives the int8 reference's result in every form: 1 to 4 rows a step, the next step's loaded first, one program
    per SM or several; on down rows of 2, 3, 6 and 8 blocks (1, 4 or 16 lanes a block; NB past the row's blocks on 3
    and 6), 768 and 1024 output rows (rows shared out unevenly), an expert id past the experts and one of -1; the ids
    (and with PF the first weights) read before the grid-dependency wait or after it give the same bits. Its grid is
    one wave: the programs per SM it asks for, cut to what the compiled kernel's registers let one SM hold."""
    from tierlm.kernels import moe

    types = [T.Q4_K, T.Q4_K, down_type]
    aligned = down_type == T.Q6_K
    assert moe.DEFAULT.down_held and moe.DEFAULT.slots_down(types, 1, aligned)
    shapes = ((512, 1024), (1536, 768), (2048, 1024)) if aligned else ((512, 1024), (768, 768), (2048, 1024))
    for I, D in shapes:
        gate, up, down, x, ids, wts = _moe_inputs(types, T_, seed=47, I=I, D=D)
        ids[0, 3] = -1
        ids[0, 5] = 99
        ref = moe_quant_q8_ref(x, ids, wts, gate, up, down, *types)
        dn = to_aligned(down) if aligned else down
        for held in ((4, 2), (3, 2, True), (1, 1), (2, 3), (6, 4), (1, 1, True), (8, 2, True)):
            cfg = replace(moe.DEFAULT, down_held=held, slots_max_tokens=T_)
            _poison_cache()
            out = moe_quant(x, ids, wts, gate, up, dn, *types, config=cfg, aligned=aligned)
            assert out.shape == x.shape and rel(out, ref) <= 1e-4, (I, held)
            late = moe_quant(x, ids, wts, gate, up, dn, *types, config=replace(cfg, early=False), aligned=aligned)
            assert torch.equal(out, late), (I, held)
    # what one SM holds, as found after each form's first launch: an 8-warp program (rows of 8 blocks read 4 words a
    # lane: 32 lanes a slot) at most 8 at once (2048 threads), smaller ones more
    fits = {(nb * 16 // words, n) for (dev, kp, nb, words, *_), n in moe._HELD_RESIDENT.items() if dev.type == "cuda"}
    assert fits and all(n >= 1 for _, n in fits) and all(n <= 8 for lanes, n in fits if lanes == 32), fits
    props = torch.cuda.get_device_properties(0)
    assert moe._resident(torch.device("cuda"), 64, 8) == min(props.max_threads_per_multi_processor // 256, 4)
    assert moe._resident(torch.device("cuda"), 80, 8) == min(props.max_threads_per_multi_processor // 256, 3)


@pytest.mark.gpu
@pytest.mark.parametrize("types", [(T.Q4_K, T.Q6_K), (T.Q4_K, T.Q4_K), (T.Q8_0, T.Q6_K)],
                         ids=lambda ts: "-".join(t.name for t in ts))
def test_mlp_of_quantized_projections_takes_gate_and_up_from_one_launch(types, monkeypatch):
    """A SwiGLU MLP of quantized projections (a dense layer, a shared expert) at one row on a GPU takes its gate and
    up from one launch (swiglu_q8, once) and gives the int8 reference's result (its Q6_K down aligned, as the layer
    holds it); with two rows, or a gradient asked for, the three products as before, which agree within the int8
    rounding."""
    from tierlm.model import quantized as qz
    from tierlm.model.layers import MLP

    D, I = 768, 512
    types = (types[0], types[0], types[1])
    mats = [random_weight(t, n, k, seed) for t, n, k, seed in zip(types, (I, I, D), (D, D, I), (51, 52, 53))]
    mlp = MLP(D, I)
    for name, m, t, (n, k) in zip(("gate_proj", "up_proj", "down_proj"), mats, types, ((I, D), (I, D), (D, I))):
        setattr(mlp, name, qz.QuantLinear(m.clone(), t, k, n))
    mlp = mlp.cuda()
    assert mlp.down_proj.aligned == (types[2] == T.Q6_K)
    calls = []
    real = qz.swiglu_q8
    monkeypatch.setattr(qz, "swiglu_q8", lambda *a, **k: calls.append(k) or real(*a, **k))
    x = torch.randn(1, D, device="cuda", generator=torch.Generator(device="cuda").manual_seed(54)).half()
    with torch.no_grad():
        got = mlp(x)
        two = mlp(torch.cat([x, x]))
    assert len(calls) == 1 and got.dtype == x.dtype and got.shape == (1, D)
    ref = moe_quant_q8_ref(x, torch.zeros(1, 1, dtype=torch.long, device="cuda"), torch.ones(1, 1, device="cuda"),
                           *(m.view(1, n, -1).cuda() for m, n in zip(mats, (I, I, D))), *types)
    assert rel(got, ref) <= 2e-3  # float16 output
    assert rel(two[0], got[0]) <= Q8_TOL and rel(two[1], got[0]) <= Q8_TOL
    with torch.enable_grad():
        mlp(x.float().requires_grad_())  # no fused path where a gradient is asked for (its kernels have no backward)
    assert len(calls) == 1


def test_swiglu_q8_refuses_what_it_cannot_read():
    w = torch.zeros(64, 144, dtype=torch.uint8)
    with pytest.raises(KernelInputError, match="quant_matmul"):
        swiglu_q8(torch.zeros(1, 256), w, w, T.Q4_K, T.Q4_K)  # on the CPU
    with pytest.raises(KernelInputError, match="Q2_K"):
        swiglu_q8(torch.zeros(1, 256), w, w, T.Q2_K, T.Q4_K)
    with pytest.raises(KernelInputError, match="must be"):
        swiglu_q8(torch.zeros(1, 256), w, w[:32], T.Q4_K, T.Q4_K)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T_", [1, 40])
def test_moe_dense_matches_reference(dtype, T_):
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bfloat16 needs sm_80+")
    E, I, D, K = 8, 256, 512, 4
    gate = (torch.randn(E, I, D, device="cuda") * 0.02).to(dtype)
    up = (torch.randn(E, I, D, device="cuda") * 0.02).to(dtype)
    down = (torch.randn(E, D, I, device="cuda") * 0.02).to(dtype)
    x = torch.randn(T_, D, device="cuda").to(dtype)
    ids = torch.randint(0, E, (T_, K), device="cuda")
    wts = torch.rand(T_, K, device="cuda")
    t = {torch.float16: T.F16, torch.bfloat16: T.BF16}[dtype]
    rows = [w.view(torch.uint8) for w in (gate, up, down)]
    ref = moe_quant_ref(x, ids, wts, *rows, t, t, t)
    out = moe_dense(x, ids, wts, gate, up, down)
    assert rel(out, ref) <= (1e-5 if T_ * K < MoEConfig().sorted_min_pairs else 1.5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 2, 3, 16, 64])
def test_aligned_q6k_matches_gguf_layout(dtype, M):
    """Q6_K in the aligned layout through the default paths (int8 decode with 4, 2 and 1 words a lane, tensor-core
    tiles, prefill's dequantizer) against the references on GGUF's layout; rows 8 bytes off a 16-byte boundary
    read 2 words a lane."""
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bfloat16 needs sm_80+")
    cap = torch.cuda.get_device_capability()
    for i, (N, K) in enumerate([(70, 2048), (300, 1024), (64, 512), (129, 7168)]):
        w = random_weight(T.Q6_K, N, K, seed=50 + i, device="cuda")
        wa = to_aligned(w)
        x = (torch.randn(M, K, device="cuda") * 2).to(dtype)
        _poison_cache()
        out = quant_matmul(x, wa, T.Q6_K, K, aligned=True)
        assert out.dtype == dtype and out.shape == (M, N) and torch.isfinite(out).all()
        if M <= 16 and pick_config(T.Q6_K, M, N, K, dtype, cap, 1, aligned=True).kind == "mmvq":
            assert rel(out, quant_matmul_q8_ref(x, w, T.Q6_K, K)) <= FMA_TOL[dtype], (dtype, M, N, K)
        else:
            assert rel(out, quant_matmul_ref(x, w, T.Q6_K, K)) <= TILE_TOL[dtype], (dtype, M, N, K)
        assert torch.equal(dequantize_rows(wa, T.Q6_K, K, dtype, aligned=True), dequantize_rows(w, T.Q6_K, K, dtype))
    buf = torch.zeros(wa.numel() + 8, dtype=torch.uint8, device="cuda")
    off = buf[8:].view(wa.shape)
    off.copy_(wa)
    assert off.data_ptr() % 16 == 8
    out = quant_matmul(x[:1], off, T.Q6_K, K, aligned=True)
    assert rel(out, quant_matmul_q8_ref(x[:1], w, T.Q6_K, K)) <= FMA_TOL[dtype]
    odd = to_aligned(random_weight(T.Q6_K, 8, 768, seed=59, device="cuda"))  # 3 blocks: rows on 2-byte boundaries
    with pytest.raises(KernelInputError, match="2-byte boundaries"):
        quant_matmul(torch.randn(1, 768, device="cuda").to(dtype), odd, T.Q6_K, 768, aligned=True)


@pytest.mark.gpu
@pytest.mark.parametrize("types", [(T.Q4_K, T.Q4_K, T.Q6_K), (T.Q6_K, T.Q6_K, T.Q6_K)], ids=lambda t: t[0].name)
@pytest.mark.parametrize("T_", [1, 4, 40])
def test_aligned_moe_matches_gguf_layout(types, T_):
    """The fused MoE on Q6_K experts in the aligned layout (gate/up rows of 8 blocks, down rows of 4): the int8
    decode against its reference, the sorted tiles (40 tokens) against the float reference."""
    E, I, D, K = 16, 1024, 2048, 8
    gate, up, down = _moe_weights(types, E, I, D, seed=44, device="cuda")
    al = [to_aligned(m) if t == T.Q6_K else m for m, t in zip((gate, up, down), types)]
    g = torch.Generator(device="cuda").manual_seed(45)
    x = torch.randn(T_, D, device="cuda", generator=g).half()
    ids = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(T_)])
    wts = torch.rand(T_, K, device="cuda", generator=g)
    _poison_cache()
    out = moe_quant(x, ids, wts, *al, *types, aligned=True)
    if T_ * K < MoEConfig().sorted_min_pairs:
        assert rel(out, moe_quant_q8_ref(x, ids, wts, gate, up, down, *types)) <= 1e-4
    else:
        assert rel(out, moe_quant_ref(x, ids, wts, gate, up, down, *types)) <= 5e-3
    with pytest.raises(KernelInputError, match="GGUF's layout only"):
        moe_quant(x[:1], ids[:1], wts[:1], *al, *types, aligned=True, config=MoEConfig(q8=False))


@pytest.mark.gpu
def test_layers_hold_q6k_aligned_on_gpu():
    """A Q6_K linear layer, a layer's routed experts and the tiered experts' device slots hold their Q6_K bytes
    aligned on the GPU and compute what the GGUF-layout kernels compute; moved back, the bytes are GGUF's."""
    from tierlm.model.quantized import QuantLinear, QuantRoutedExperts
    from tierlm.runtime.experts import TieredExperts, TierStats

    w = random_weight(T.Q6_K, 96, 1024, seed=60)
    layer = QuantLinear(w.clone(), T.Q6_K, 1024, 96).cuda()
    assert layer.aligned and torch.equal(layer.qweight.cpu(), to_aligned(w))
    x = torch.randn(2, 1024, device="cuda").half()
    assert rel(layer(x), quant_matmul_q8_ref(x, w.cuda(), T.Q6_K, 1024)) <= FMA_TOL[torch.float16]
    assert torch.equal(layer.state_dict()["qweight"].cpu(), w)
    layer.cpu()
    assert not layer.aligned and torch.equal(layer.qweight, w)

    E, I, D = 8, 1024, 2048
    types = (T.Q4_K, T.Q4_K, T.Q6_K)
    gate, up, down = _moe_weights(types, E, I, D, seed=61)
    x = torch.randn(3, D, device="cuda").half()
    ids = torch.tensor([[0, 5], [3, 7], [5, 5]], device="cuda")
    wts = torch.rand(3, 2, device="cuda")
    ref = moe_quant_q8_ref(x, ids, wts, gate.cuda(), up.cuda(), down.cuda(), *types)
    experts = QuantRoutedExperts(gate.clone(), up.clone(), down.clone(), types, E, D, I).cuda()
    assert experts.aligned and torch.equal(experts.down_q.cpu(), to_aligned(down))
    assert rel(experts(x, ids, wts), ref) <= 1e-4
    tiered = TieredExperts(0, types, E, D, I, torch.device("cuda"), E, TierStats(),
                           (gate.shape[2], up.shape[2], down.shape[2]))
    for e in range(E):
        tiered.put_device(e, gate[e], up[e], down[e])
    assert tiered.aligned and torch.equal(tiered.slot_down[3].cpu(), to_aligned(down[3]))
    assert torch.equal(tiered.slot_gate[3].cpu(), gate[3])
    assert rel(tiered(x, ids, wts), ref) <= 1e-4


@pytest.mark.gpu
def test_pdl_chain_matches_launches_without_it(monkeypatch):
    """One-row products of every fused type and a one-token MoE layer, each reading what the launch before it wrote,
    run eagerly and replayed from a CUDA graph: with programmatic dependent launch (sm_90+) the results are bit for
    bit those without it (a launch that read its input before the one before it had written it would differ)."""
    from tierlm.kernels import quant_matmul as qm

    dev = torch.device("cuda")
    if torch.cuda.get_device_capability() < (9, 0):
        assert qm.pdl_launch(dev, 1) == {}
        pytest.skip("programmatic dependent launch needs sm_90+")
    assert qm.pdl_launch(dev, 1) == {"PDL": True, "launch_pdl": True} and qm.pdl_launch(dev, 2) == {}
    E, I, D, K = 16, 1024, 2048, 4
    types = (T.Q4_K, T.Q4_K, T.Q6_K)
    gate, up, down = _moe_weights(types, E, I, D, seed=70, device="cuda")
    down = to_aligned(down)
    ws = [(random_weight(T.Q4_K, 4096, D, seed=73, device="cuda"), T.Q4_K, D, False),
          (to_aligned(random_weight(T.Q6_K, D, 4096, seed=74, device="cuda")), T.Q6_K, 4096, True),
          (random_weight(T.Q8_0, 1024, D, seed=75, device="cuda"), T.Q8_0, D, False),
          (random_weight(T.Q5_0, D, 1024, seed=76, device="cuda"), T.Q5_0, 1024, False)]
    x = torch.randn(1, D, device="cuda").half()
    ids = torch.tensor([[1, 5, 9, 14]], device="cuda")
    wts = torch.rand(1, K, device="cuda")

    def chain():
        y = x
        for _ in range(3):
            for w, t, k, al in ws:
                y = quant_matmul(y, w, t, k, aligned=al)
            y = moe_quant(y, ids, wts, gate, up, down, *types, aligned=True).half()
        return y

    monkeypatch.setattr(qm, "PDL", False)
    plain = chain()
    monkeypatch.setattr(qm, "PDL", True)
    assert torch.isfinite(plain).all() and plain.abs().max() > 0
    assert torch.equal(chain(), plain)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        chain()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = chain()
    for _ in range(3):
        out.zero_()
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, plain)


# ---------------------------------------------------------------- interpreter runs (script mode)


def _interp_check(name: str, got: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    """float32 throughout: only the summation order differs from the reference (``tol`` for fp16 paths)."""
    err = rel(got, ref)
    print(f"{name}: {err:.2e}")
    if not err <= tol:
        raise SystemExit(f"FAIL {name}: relative error {err:.3e} > {tol:.0e}")


def _interp_weight(t: GGMLType, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen) * 0.05
    floats = {T.F16: torch.float16, T.BF16: torch.bfloat16, T.F32: torch.float32}
    return w.to(floats[t]).view(torch.uint8) if t in floats else quantize(w, t)


def _interp_gemv(gen: torch.Generator) -> None:
    from tierlm.kernels.quant_matmul import _qmm_launch

    for t in list(FUSED_TYPES) + [T.F16, T.BF16, T.F32]:
        N, K = 45, 768  # N not a multiple of a program's 32/64 rows; K = 3 K-quant blocks
        w = _interp_weight(t, N, K, gen)
        for cfg, m in [(QMMConfig("gemv", 2, 1, rows=1), 1), (QMMConfig("gemv", 4, 3, rows=2), 2),
                       (QMMConfig("gemv", 1, 2, rows=2), 1), (QMMConfig("gemv", 2, 2, rows=2, q4k_block=True), 1)]:
            x = torch.randn(m, K, generator=gen)
            _interp_check(f"gemv {t.name} {cfg.num_warps}w x{cfg.split_k} r{cfg.rows} M={m}",
                          _qmm_launch(x, w, t, K, cfg), quant_matmul_ref(x, w, t, K))


def _interp_tile(gen: torch.Generator) -> None:
    from tierlm.kernels import triton_q as tq
    from tierlm.kernels.quant_matmul import _qmm_launch

    for t in list(FUSED_TYPES) + [T.F16, T.BF16, T.F32]:
        N, K = 21, 768
        w = _interp_weight(t, N, K, gen)
        for cfg, m in [(QMMConfig("tile", 1, 1, 16, 16, 256, True), 5), (QMMConfig("tile", 1, 2, 4, 8, 512, False), 3)]:
            x = torch.randn(m, K, generator=gen)
            _interp_check(f"tile {t.name} dot={cfg.use_dot} M={m}", _qmm_launch(x, w, t, K, cfg),
                          quant_matmul_ref(x, w, t, K))
        if t in FUSED_TYPES:  # the tensor-core decode tiles (their plain-Triton decode: no PTX here)
            for cfg, m in [(QMMConfig("mmq", 1, 1, block_n=16, nblk=1), 5), (QMMConfig("mmq", 1, 2, block_n=32), 17)]:
                x = torch.randn(m, K, generator=gen).half()
                _interp_check(f"mmq {t.name} {cfg.block_n}x{cfg.split_k} M={m}", _qmm_launch(x, w, t, K, cfg),
                              quant_matmul_ref(x, w, t, K), TILE_TOL[torch.float16])
        if t == T.Q4_K:  # prefill's Q4_K dequantizer (the tiles' decode): float32 out is bit-exact
            from tierlm.kernels import triton_mmq as tk

            out = torch.full((N, K), float("nan"))
            tk.q4k_dequant_kernel[(-(-N // 16), -(-(K // 256) // 2))](w, out, N, K, w.shape[1], BN=16, NB=2,
                                                                     OUT_KIND=0, ASM=False)
            _interp_check("q4k dequant", out, dequantize(w, t, (N, K)))
        if t == T.Q6_K:
            from tierlm.kernels import triton_mmq as tk

            out = torch.full((N, K), float("nan"))
            tk.q6k_dequant_kernel[(-(-N // 16), -(-(K // 256) // 2))](w, out, N, K, w.shape[1], BN=16, NB=2)
            _interp_check("q6k dequant", out, dequantize(w, t, (N, K)))
        out = torch.full((N, K), float("nan"))  # every element must be written
        block = tq.BLOCK_ELEMS[int(t)]
        nb = max(1, 256 // block)
        grid = (-(-N // 16), -(-(K // block) // nb))
        tq.dequant_kernel[grid](w, out, N, K, K // block, w.shape[1], QTYPE=int(t), BLOCK=block, BLOCK_N=16, NB=nb)
        _interp_check(f"dequant {t.name}", out, dequantize(w, t, (N, K)))


def _interp_moe(gen: torch.Generator) -> None:
    from tierlm.kernels import moe

    E, D, K, n = 5, 256, 2, 3
    for gt, dt, I in [(T.Q4_K, T.Q6_K, 256), (T.Q8_0, T.Q5_0, 96), (T.BF16, T.F16, 64)]:
        gate = _interp_weight(gt, E * I, D, gen).view(E, I, -1)
        up = _interp_weight(gt, E * I, D, gen).view(E, I, -1)
        down = _interp_weight(dt, E * D, I, gen).view(E, D, -1)
        x = torch.randn(n, D, generator=gen)
        ids = torch.randint(0, E, (n, K), generator=gen)
        ids[1, 0] = -1  # no expert: adds nothing
        ids[2, 1] = ids[2, 0] = 3  # one expert twice for one token
        wts = torch.rand(n, K, generator=gen)
        ref = moe.moe_quant_ref(x, ids, wts, gate, up, down, gt, gt, dt)
        args = (x, ids.reshape(-1), wts.reshape(-1), gate, up, down, [gt, gt, dt], (E, I, D, K))
        pairs = moe._moe_pairs(*args, MoEConfig(num_warps=2, rows=1)).view(n, K, D).sum(1)
        pairs_block = moe._moe_pairs(*args, MoEConfig(num_warps=2, rows=2, q4k_block=True)).view(n, K, D).sum(1)
        tiles = moe._moe_sorted(*args, MoEConfig(block_m=16, block_n=32)).view(n, K, D).sum(1)  # mmq decode
        general = moe._moe_sorted(*args, MoEConfig(block_m=16, block_n=32, sorted_mmq=False)).view(n, K, D).sum(1)
        _interp_check(f"moe pairs {gt.name}/{dt.name}", pairs, ref)
        _interp_check(f"moe pairs q4k_block {gt.name}/{dt.name}", pairs_block, ref)
        _interp_check(f"moe sorted {gt.name}/{dt.name}", tiles, ref)
        _interp_check(f"moe sorted, general decode {gt.name}/{dt.name}", general, ref)
        if gt == T.Q4_K:  # two blocks per step: the Q4_K tiles still take one at a time
            wide = moe._moe_sorted(*args, MoEConfig(block_m=16, block_n=32, k_step=512)).view(n, K, D).sum(1)
            _interp_check(f"moe sorted, k_step 512 {gt.name}/{dt.name}", wide, ref)


def _interp_mmvq(gen: torch.Generator) -> None:
    """The int8-activation kernels (with the integer twin of dp4a) against the int8 references (the MoE's: moe8)."""
    from tierlm.kernels.quant_matmul import _qmm_launch

    x = torch.randn(3, 768, generator=gen) * 4
    x[0, :32] = 0
    got, ref = quantize_q8(x), quantize_q8_ref(x)
    if not (torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and torch.allclose(got[2], ref[2])):
        raise SystemExit("FAIL quantize_q8 differs from quantize_q8_ref")
    for t in FUSED_TYPES:
        N, K = 45, 768  # N not a multiple of the rows per program; K = 3 K-quant blocks (a partial step)
        w = _interp_weight(t, N, K, gen)
        cfgs = [(QMMConfig("mmvq", 4, 1, block_n=4, nblk=4), 1), (QMMConfig("mmvq", 2, 2, block_n=8, nblk=2), 2),
                (QMMConfig("mmvq", 1, 3, block_n=2, nblk=1, prefetch=True), 1),
                (QMMConfig("mmvq", 1, 1, block_n=4, nblk=2, prefetch=True), 1)]
        if t == T.Q4_K:  # the LOADS forms: vector loads, eight threads per block
            cfgs += [(QMMConfig("mmvq", 2, 1, block_n=4, nblk=2, loads=1), 2),
                     (QMMConfig("mmvq", 2, 1, block_n=2, nblk=4, loads=3), 3),
                     (QMMConfig("mmvq", 1, 1, block_n=4, nblk=2, loads=2, prefetch=True), 2),
                     (QMMConfig("mmvq", 1, 1, block_n=1, nblk=8, loads=6), 1),
                     (QMMConfig("mmvq", 2, 1, block_n=2, nblk=2, loads=4), 2),
                     # the lean step (on 9 rows: the interpreter is slow): a whole step then a partial one;
                     # prefetching; 3 activation rows in a program of 4; 2 + 1 rows in whole steps; split K
                     (QMMConfig("mmvq", 2, 1, block_n=2, nblk=2, loads=14), -1),
                     (QMMConfig("mmvq", 1, 1, block_n=2, nblk=2, loads=14, prefetch=True), -1),
                     (QMMConfig("mmvq", 1, 1, block_n=2, nblk=2, loads=14, act_rows=4), -3),
                     (QMMConfig("mmvq", 1, 1, block_n=4, nblk=1, loads=14, act_rows=2), -3),
                     (QMMConfig("mmvq", 1, 3, block_n=2, nblk=1, loads=14, act_rows=4), -4)]
        if t == T.Q6_K:  # sixteen threads per block
            cfgs += [(QMMConfig("mmvq", 1, 1, block_n=2, nblk=2, loads=4), 1),
                     (QMMConfig("mmvq", 2, 1, block_n=4, nblk=1, loads=4), 2),
                     (QMMConfig("mmvq", 1, 1, block_n=2, nblk=2, loads=12), -1),  # lean: whole step, then a partial one
                     (QMMConfig("mmvq", 1, 3, block_n=2, nblk=1, loads=12), -1)]  # lean, split K
        w9 = w[:9]  # M < 0 below: -M activation rows on these 9 weight rows
        for cfg, m in cfgs:
            x, wm = torch.randn(abs(m), K, generator=gen), w if m > 0 else w9
            out = _qmm_launch(x, wm, t, K, cfg)
            _interp_check(f"mmvq {t.name} n{cfg.block_n} b{cfg.nblk} x{cfg.split_k} M={abs(m)} N={wm.shape[0]}", out,
                          quant_matmul_q8_ref(x, wm, t, K))
            if not rel(out, quant_matmul_ref(x, wm, t, K)) <= Q8_TOL:
                raise SystemExit(f"FAIL mmvq {t.name}: int8 activations off the exact product by more than {Q8_TOL}")


MOE8_TYPES = [(T.Q4_K, T.Q6_K, 256), (T.Q8_0, T.Q5_0, 96), (T.Q4_K, T.Q4_K, 256)]  # (gate/up, down, I)


def _interp_moe8(gen: torch.Generator, pairs=MOE8_TYPES[:2]) -> None:
    """The int8-activation MoE launches (with the integer twin of dp4a) against the int8 references, for the expert
    types ``pairs``: groups of their own ("moe8" the first two, "moe8k" Q4_K down experts with the slots' launch), so
    that each interpreter run stays well inside its time limit on two cores and two can run side by side."""
    from tierlm.kernels import moe

    E, D, K, n = 5, 256, 2, 3
    for gt, dt, I in pairs:
        gate = _interp_weight(gt, E * I, D, gen).view(E, I, -1)
        up = _interp_weight(gt, E * I, D, gen).view(E, I, -1)
        down = _interp_weight(dt, E * D, I, gen).view(E, D, -1)
        x = torch.randn(n, D, generator=gen)
        ids = torch.randint(0, E, (n, K), generator=gen)
        ids[1, 0] = -1
        ids[2, 1] = ids[2, 0] = 3
        wts = torch.rand(n, K, generator=gen)
        args = (x, ids.reshape(-1), wts.reshape(-1), gate, up, down, [gt, gt, dt], (E, I, D, K))
        ref = moe_quant_q8_ref(x, ids, wts, gate, up, down, gt, gt, dt)
        # the four-thread steps with prefetch, and the default's forms (lean steps in both launches, Q4_K gate and
        # up side by side, at one token the slots side by side) in fewer programs than its own steps make (the
        # interpreter runs programs one by one); with Q4_K down experts, as Q4_K_M has outside its more-bits layers,
        # only the default's
        fast = replace(moe.DEFAULT, gate_up_lines=(8, 1, 1), down_slots=(8, 1, 1), down_held=())
        cfgs = [MoEConfig(num_warps=2, mmvq_rows=4, mmvq_nblk=2, mmvq_pf=True), fast]
        if dt == T.Q4_K:
            cfgs = [fast]
        elif dt == T.Q5_0:
            cfgs = cfgs[:1]
        for c in cfgs:
            got = moe._moe_pairs_q8(*args, c).view(n, K, D).sum(1)
            _interp_check(f"moe int8 up {c.up_step()} down {c.down_step()} {gt.name}/{dt.name}", got, ref)
        if gt != T.Q4_K:
            continue
        if dt != T.Q4_K:
            continue
        # the default runs Q4_K gate and up side by side in one loop: the same h as one matrix after the other (the
        # launch reads no down matrix: checked once, at one token's two pairs)
        types, dims = [gt, gt, dt], (E, I, D, K)
        loads = moe.q8_loads(moe.DEFAULT, types, gate, up, down)
        assert moe.DEFAULT.gate_up_step(types, loads[0]) and not moe.DEFAULT.gate_up_step([T.Q8_0] * 3, loads[0])
        xq, xd, xs = quantize_q8(x[:1], pack=bool(loads[0] & 2))
        h = [moe.q8_gate_up(xq, xd, xs, ids[0], gate, up, types, dims, c, loads[0])
             for c in (fast, replace(fast, gate_up_lines=()))]
        _interp_check(f"moe gate/up side by side {fast.gate_up_lines}", h[0], h[1])
        # at one token, a token's slots side by side in the Q4_K down launch, added there: (T, D)
        assert moe.DEFAULT.sums_slots(types, False, 1) and not moe.DEFAULT.sums_slots(types, False, 2)
        got = moe._moe_pairs_q8(x[:1], ids[0], wts[0], gate, up, down, types, dims, fast)
        _interp_check("moe int8, one token, slots side by side", got,
                      moe_quant_q8_ref(x[:1], ids[:1], wts[:1], gate, up, down, gt, gt, dt))
        # three slots in room for four, an unused expert id among them: those add nothing, whatever they read
        ids3 = torch.cat([ids, torch.randint(0, E, (n, 1), generator=gen)], 1)
        wts3 = torch.rand(n, 3, generator=gen)
        wide = replace(fast, slots_max_tokens=n)
        got = moe._moe_pairs_q8(x, ids3.reshape(-1), wts3.reshape(-1), gate, up, down, types, (E, I, D, 3), wide)
        _interp_check("moe int8, three slots side by side", got,
                      moe_quant_q8_ref(x, ids3, wts3, gate, up, down, gt, gt, dt))
        # groups of rows sharing their activation loads (down_slots' fourth number, as the default has): on rows of 3
        # blocks (whole steps, or one then a partial one) and 20 output rows (the last program's rows past them
        # clamped), with every group's first weights, or the ids alone, or nothing read before the wait: one result
        down20 = _interp_weight(T.Q4_K, E * 20, 768, gen).view(E, 20, -1)
        h = torch.randn(3, 768, generator=gen)
        hq, hd, _ = quantize_q8(h, pack=True)
        ids_g, wts_g = torch.tensor([4, -1, 2]), torch.rand(3, generator=gen)
        dims_g = (E, 768, 20, 3)
        one = moe.q8_down_slots(hq, hd, ids_g, wts_g, down20, dims_g, replace(fast, down_slots=(4, 1, 1)))
        want = sum(wts_g[k] * (quant_matmul_q8_ref(h[k:k + 1], down20[ids_g[k]], T.Q4_K, 768)) for k in (0, 2))
        _interp_check("moe int8 down, slots side by side, one group", one, want)
        for step, early, weights in (((4, 1, 1, 2), True, False), ((4, 2, 1, 3), True, True),
                                     ((4, 1, 1, 3), False, True)):
            c = replace(fast, down_slots=step, early_weights=weights)
            got = moe.q8_down_slots(hq, hd, ids_g, wts_g, down20, dims_g, c, early)
            _interp_check(f"moe int8 down, groups {step}, early {early}, weights early {weights}", got, one)
        # the default's down launch at one token: the slots' activations held in registers while each program walks
        # its rows (20 of them shared unevenly), 1 to 4 rows a step, the next step's loaded first or not, on rows of 3
        # blocks in lanes for 4 (the layer through it: test_moe_held_down_launch_on_gpu)
        for held in (moe.DEFAULT.down_held, (1, 3), (2, 1, True), (1, 2, True)):
            got = moe.q8_down_slots(hq, hd, ids_g, wts_g, down20, dims_g, replace(fast, down_held=held), True)
            _interp_check(f"moe int8 down, activations held {held}", got, one)


def _interp_aligned(gen: torch.Generator) -> None:
    """Every kernel that reads Q6_K in the aligned layout, on rows of 2, 4 and 8 blocks (a lane reads 1, 2 or 4
    words at once in the int8 decode), against the references on the same weights in GGUF's layout."""
    from tierlm.kernels import moe
    from tierlm.kernels import triton_mmq as tk
    from tierlm.kernels import triton_q as tq
    from tierlm.kernels.quant_matmul import _qmm_launch, aligned_step

    t = T.Q6_K
    for K, words in ((512, 1), (1024, 2), (2048, 4)):
        N = 9
        w = _interp_weight(t, N, K, gen)
        wa = to_aligned(w)
        assert aligned_step(K, wa)[3] == words, (K, aligned_step(K, wa))
        x = torch.randn(2, K, generator=gen)
        bn, nblk, warps = MMVQ_Q6K_ALIGNED_STEPS[words]  # the default step; a partial last step with split K
        cfgs = [(QMMConfig("mmvq", warps, 1, block_n=bn, nblk=nblk), 1)]
        cfgs += [(QMMConfig("mmvq", 1, 2, block_n=4, nblk=4), 2)] if K == 1024 else []
        for cfg, m in cfgs:
            out = _qmm_launch(x[:m], wa, t, K, cfg, aligned=True)
            _interp_check(f"aligned mmvq K={K} n{cfg.block_n} b{cfg.nblk} x{cfg.split_k} M={m}", out,
                          quant_matmul_q8_ref(x[:m], w, t, K))
        if K != 1024:
            continue  # the float kernels below read bytes one by one: one row length is enough
        for cfg, m in [(QMMConfig("mmq", 1, 2, block_n=16, nblk=1), 5), (QMMConfig("tile", 1, 2, 4, 8, 512, False), 3)]:
            xm = torch.randn(m, K, generator=gen)
            xm = xm.half() if cfg.kind == "mmq" else xm
            _interp_check(f"aligned {cfg.kind} K={K} M={m}", _qmm_launch(xm, wa, t, K, cfg, aligned=True),
                          quant_matmul_ref(xm, w, t, K), TILE_TOL[torch.float16])
        ref = dequantize(w, t, (N, K))
        out = torch.full((N, K), float("nan"))
        tk.q6k_dequant_kernel[(-(-N // 16), -(-(K // 256) // 2))](wa, out, N, K, wa.shape[1], BN=16, NB=2, ALIGNED=True)
        _interp_check(f"aligned q6k dequant K={K}", out, ref)
        out = torch.full((N, K), float("nan"))
        tq.dequant_kernel[(1, K // 256)](wa, out, N, K, K // 256, wa.shape[1], QTYPE=14, BLOCK=256, BLOCK_N=16, NB=1,
                                         ALIGNED=True)
        _interp_check(f"aligned dequant K={K}", out, ref)
    E, D, K, n = 5, 512, 2, 3
    for gt, dt, I in [(T.Q6_K, T.Q6_K, 1024)]:  # gate/up rows of 2 blocks (one word per lane), down rows of 4
        gate = _interp_weight(gt, E * I, D, gen).view(E, I, -1)
        up = _interp_weight(gt, E * I, D, gen).view(E, I, -1)
        down = _interp_weight(dt, E * D, I, gen).view(E, D, -1)
        al = [to_aligned(m) if ty == T.Q6_K else m for m, ty in ((gate, gt), (up, gt), (down, dt))]
        x = torch.randn(n, D, generator=gen)
        ids = torch.randint(0, E, (n, K), generator=gen)
        ids[1, 0] = -1
        ids[2, 1] = ids[2, 0] = 3
        wts = torch.rand(n, K, generator=gen)
        args = (x, ids.reshape(-1), wts.reshape(-1), *al, [gt, gt, dt], (E, I, D, K))
        big = replace(moe.DEFAULT, aligned_step=(64, 2, 4), down_slots_aligned=(8, 2, 4, 2))  # the default's
        # launches in fewer programs: the interpreter runs programs one by one
        q8_ref = moe_quant_q8_ref(x, ids, wts, gate, up, down, gt, gt, dt)
        got = moe._moe_pairs_q8(*args, big, True).view(n, K, D).sum(1)
        _interp_check(f"aligned moe int8 {gt.name}/{dt.name} I={I}", got, q8_ref)
        got = moe._moe_pairs_q8(*args, replace(big, down_sum=True), True)  # (n, D): the slots added in the launch
        _interp_check(f"aligned moe int8, down adds the slots {gt.name}/{dt.name} I={I}", got, q8_ref)
        one = (x[:1], ids[0], wts[0], *al, [gt, gt, dt], (E, I, D, K))  # one token: the default adds them too, its
        # slots side by side in the down launch (or in turn, as before)
        assert moe.DEFAULT.sums_slots([gt, gt, dt], True, 1) and not moe.DEFAULT.sums_slots([gt, gt, dt], True, 2)
        assert moe.DEFAULT.slots_down([gt, gt, dt], 1, True) and not moe.DEFAULT.slots_down([gt, gt, dt], 1, False)
        for c in (replace(big, down_held=()), big, replace(big, down_slots_aligned=())):
            got = moe._moe_pairs_q8(*one, c, True)
            _interp_check(f"aligned moe int8, one token {gt.name}/{dt.name} I={I}, slots' launch "
                          f"{c.down_slots_aligned or None}, activations held "
                          f"{c.down_held if c.slots_down([gt, gt, dt], 1, True) else None}", got,
                          moe_quant_q8_ref(x[:1], ids[:1], wts[:1], gate, up, down, gt, gt, dt))
        ref = moe.moe_quant_ref(x, ids, wts, gate, up, down, gt, gt, dt)
        for c in (MoEConfig(block_m=16, block_n=128), MoEConfig(block_m=16, block_n=128, sorted_mmq=False)):
            got = moe._moe_sorted(*args, c, True).view(n, K, D).sum(1)
            _interp_check(f"aligned moe sorted mmq={c.sorted_mmq} {gt.name}/{dt.name} I={I}", got, ref)


if __name__ == "__main__" and sys.argv[1:2] == ["interpret"]:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    {"gemv": _interp_gemv, "tile": _interp_tile, "moe": _interp_moe, "mmvq": _interp_mmvq, "moe8": _interp_moe8,
     "moe8k": lambda gen: _interp_moe8(gen, MOE8_TYPES[2:]), "aligned": _interp_aligned}[sys.argv[2]](
        torch.Generator().manual_seed(0))
    print("ok")

