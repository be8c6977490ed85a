"""y = x @ dequant(w).T on the CPU for a few activation rows, straight from GGUF block bytes.

The decode path for routed experts that live in RAM: a (M, K) activation (M = 1..16) against an
(N, row_bytes) uint8 weight holding N rows of K elements in Q4_K, Q6_K or Q8_0 blocks, exactly as
the GGUF file stores them (an mmap'd expert slice works as is: no repacked copy). The work is done
by a small C++ library (``csrc/cpu_quant.cpp``) that this module compiles on first use with the
system C++ compiler into tierlm's cache folder and loads with ctypes; OpenMP threads split the
weight rows. Without a compiler the product falls back to ``cpu_quant_matmul_ref`` (dequantize,
then ``F.linear``) after a one-time warning.

Two ways to compute (``mode``), compared in ``bench/cpu_matvec.py`` (results in
``bench/results/cpu-matvec-*``):

- ``"q8"`` (default): x quantized to int8 (one scale per 256 elements, per 32 for Q8_0, like
  llama.cpp's q8_K / q8_0), then exact integer dot products: Q4_K 1.4-1.9x and Q6_K 2.1-2.4x
  faster than "f32" (Q8_0 about the same); the mode that keeps up with DRAM. Adds activation
  rounding, at most ``sum over blocks of max|x_block| / 254 * sum|w_block|``; measured 0.55-0.7%
  relative L2 error on Gaussian x (torch's int4 kernel with bf16 x: 0.3%).
- ``"f32"``: weights decoded to float32 in registers and multiplied with float32 x: the reference's
  numbers up to float32 summation order (relative error ~4e-7), for when a placement must not change
  results beyond rounding.

Glossary: M = activation rows, N = weight rows (outputs), K = inputs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from tierlm import paths
from tierlm.errors import TierlmError
from tierlm.weights.formats import GGMLType, dequantize
from tierlm.weights.ggml_types import block_format, ggml_type

TYPES = (GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0)
MODES = ("f32", "q8")
DEFAULT_MODE: Literal["f32", "q8"] = "q8"
# Builds the wrappers can load: the host's full instruction set, AVX2+FMA, and plain C++ (whatever
# the target is). The C++ source picks its code path from the compiler's target macros.
ISAS = {
    "native": ("-march=native",),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "portable": (),
}
_CFLAGS = ("-O3", "-std=c++17", "-fopenmp", "-fPIC", "-shared", "-fno-math-errno", "-Wno-psabi")
_SOURCE = Path(__file__).with_name("csrc") / "cpu_quant.cpp"
_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CPUKernelInputError(TierlmError, ValueError):
    """A CPU kernel was called with tensors of the wrong shape, dtype, layout or device."""


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$TIERLM_CACHE/cpu_quant`` (default ``~/.cache/tierlm``)."""
    return paths.cache_dir() / "cpu_quant"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _host_id() -> str:
    """What -march=native depends on: the CPU model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.processor() or platform.machine()


def _build(cxx: str, isa: str) -> Path:
    """Compile csrc/cpu_quant.cpp for ``isa`` unless a build of the same inputs is cached."""
    flags = (*_CFLAGS, *ISAS[isa])
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60, check=False).stdout
    key = hashlib.sha256(b"\0".join(s.encode() for s in (
        _SOURCE.read_text(), " ".join(flags), version, platform.machine(), _host_id() if isa == "native" else "",
    ))).hexdigest()[:16]
    out = cache_dir() / f"cpu_quant-{isa}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cxx, *flags, str(_SOURCE), "-o", tmp], capture_output=True, text=True, timeout=600,
                             check=False)
        if res.returncode:
            raise RuntimeError(f"{cxx} failed to build the CPU kernels ({isa}):\n{res.stderr[-2000:]}")
        os.replace(tmp, out)  # atomic: concurrent builders each leave a complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load(cxx: str, isa: str) -> ctypes.CDLL:
    # torch is imported first, so the library's libgomp.so.1 resolves to the OpenMP runtime torch
    # already loaded: one thread pool for both.
    lib = ctypes.CDLL(str(_build(cxx, isa)))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.tq_matmul.argtypes = [ctypes.c_int, ctypes.c_int, ptr, i64, i64, i64, ptr, i64, i64, ptr, i64, ctypes.c_int]
    lib.tq_matmul.restype = ctypes.c_int
    lib.tq_read.argtypes = [ptr, i64, ctypes.c_int]
    lib.tq_read.restype = ctypes.c_uint64
    lib.tq_isa.restype = ctypes.c_char_p
    return lib


@functools.cache
def _library(isa: str) -> ctypes.CDLL | None:
    """The compiled kernels for ``isa`` ("native" falls back to "portable" if the compiler rejects
    -march=native), or None, with one warning, when nothing can be built."""
    if isa not in ISAS:
        raise CPUKernelInputError(f"unknown isa {isa!r}; choose one of {', '.join(ISAS)}")
    cxx = _compiler()
    if cxx is None:
        errors = ["no C++ compiler found (tried $CXX, c++, g++, clang++)"]
    else:
        errors = []
        for attempt in (isa, "portable") if isa == "native" else (isa,):
            try:
                return _load(cxx, attempt)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                errors.append(str(e))
    warnings.warn("tierlm CPU quantized kernels are unavailable, using dequantize + matmul instead (much slower). "
                  "Install a C++ compiler with OpenMP (e.g. g++) to enable them. Cause: " + "; ".join(errors),
                  RuntimeWarning, stacklevel=3)
    return None


def kernel_isa(isa: str = "native") -> str | None:
    """The code path the ``isa`` build uses ("avx512vnni", "avx512", "avx2", "portable"), or None."""
    lib = _library(isa)
    return lib.tq_isa().decode() if lib is not None else None


@functools.cache
def _geometry(qtype) -> tuple[GGMLType, int, int]:
    """(type, block size, bytes per block) of a supported type; cached: decode calls are ~100 us."""
    t = ggml_type(qtype)
    if t not in TYPES:
        raise CPUKernelInputError(f"{t.name} has no CPU kernel; supported: {', '.join(x.name for x in TYPES)} "
                                  "(use dequantize + matmul)")
    fmt = block_format(t)
    return t, fmt.block_size, fmt.type_size


def check_inputs(x: torch.Tensor, w: torch.Tensor, qtype, K: int, name: str) -> GGMLType:
    """Validate x (M, K) and w (N, row_bytes) for a CPU product; returns the normalised type."""
    try:
        qtype, block, block_bytes = _geometry(qtype)
    except CPUKernelInputError as e:
        raise CPUKernelInputError(f"{name}: {e}") from None
    if not isinstance(x, torch.Tensor) or x.dtype not in _ACT_DTYPES or x.dim() != 2:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise CPUKernelInputError(f"{name}: x must be a 2-D float32/bfloat16/float16 tensor (M, K), got {got}")
    if not isinstance(w, torch.Tensor) or w.dtype != torch.uint8 or w.dim() != 2:
        got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise CPUKernelInputError(f"{name}: w must be a 2-D uint8 tensor of GGUF bytes (N, row_bytes), got {got}")
    if x.device.type != "cpu" or w.device.type != "cpu":
        raise CPUKernelInputError(f"{name}: x and w must be on the CPU, got {x.device} and {w.device}")
    if not isinstance(K, int) or K <= 0 or K % block:
        raise CPUKernelInputError(f"{name}: K={K} is not a positive multiple of the {qtype.name} block size {block}")
    if x.shape[1] != K:
        raise CPUKernelInputError(f"{name}: x has shape {tuple(x.shape)} but its last dim must be K={K}")
    row_bytes = K // block * block_bytes
    if w.shape[1] != row_bytes:
        raise CPUKernelInputError(
            f"{name}: a {qtype.name} row of K={K} elements is {row_bytes} bytes, but w has rows of {w.shape[1]}; "
            "the weight's type or K does not match its bytes")
    if w.shape[0] > 1 and (w.stride(1) != 1 or w.stride(0) < row_bytes):
        raise CPUKernelInputError(f"{name}: w's rows must each be contiguous bytes (strides {w.stride()}); "
                                  "call .contiguous() first")
    return qtype


def cpu_quant_matmul(x: torch.Tensor, w: torch.Tensor, qtype, K: int, *, mode: Literal["f32", "q8"] = DEFAULT_MODE,
                     threads: int | None = None, out: torch.Tensor | None = None, isa: str = "native") -> torch.Tensor:
    """x (M, K) float32/bf16/fp16 times the (N, K) GGUF weight in ``w`` (N, row_bytes) -> (M, N) float32.

    ``mode`` picks float32 decoding ("f32", the reference's numbers up to summation order) or int8
    activations ("q8", llama.cpp's arithmetic); ``threads`` defaults to ``torch.get_num_threads()``;
    ``out``, a contiguous float32 (M, N) tensor, receives the result; ``isa`` picks a build from
    ``ISAS`` (tests use it to run every code path). Falls back to ``cpu_quant_matmul_ref`` when no
    compiler is available. Each output is computed by one thread, so the thread count never changes
    a bit of the result.
    """
    qtype = check_inputs(x, w, qtype, K, "cpu_quant_matmul")
    if mode not in MODES:
        raise CPUKernelInputError(f"cpu_quant_matmul: mode must be one of {MODES}, got {mode!r}")
    threads = torch.get_num_threads() if threads is None else threads
    if not isinstance(threads, int) or threads < 1:
        raise CPUKernelInputError(f"cpu_quant_matmul: threads must be a positive int, got {threads!r}")
    M, N = x.shape[0], w.shape[0]
    if out is None:
        out = torch.empty((M, N), dtype=torch.float32)
    elif out.dtype != torch.float32 or out.shape != (M, N) or not out.is_contiguous() or out.device.type != "cpu":
        raise CPUKernelInputError(f"cpu_quant_matmul: out must be a contiguous float32 CPU tensor of shape {(M, N)}, "
                                  f"got {out.dtype} {tuple(out.shape)}")
    lib = _library(isa)
    if lib is None:
        return out.copy_(cpu_quant_matmul_ref(x, w, qtype, K))
    if M == 0 or N == 0:
        return out
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()  # (M, K): at most a few rows
    rc = lib.tq_matmul(int(qtype), MODES.index(mode), w.data_ptr(), N, w.stride(0) if N > 1 else w.shape[1], K,
                       x.data_ptr(), M, K, out.data_ptr(), N, threads)
    if rc:
        raise RuntimeError(f"cpu_quant_matmul: the CPU kernel returned error {rc} for {qtype.name} "
                           f"(M={M}, N={N}, K={K}); -3 means it could not allocate {M}x{K} bytes")
    return out


def cpu_quant_matmul_ref(x: torch.Tensor, w: torch.Tensor, qtype, K: int) -> torch.Tensor:
    """Reference: dequantize w to float32 (bit-exact with gguf) and ``F.linear`` in float32 -> (M, N)."""
    qtype = check_inputs(x, w, qtype, K, "cpu_quant_matmul_ref")
    wd = dequantize(w.contiguous(), qtype, (w.shape[0], K), torch.float32)  # (N, K)
    return F.linear(x.to(torch.float32), wd)


def read_bandwidth_probe(buf: torch.Tensor, threads: int | None = None, isa: str = "native") -> int:
    """Read every byte of a contiguous CPU tensor once with ``threads`` threads (for benchmarks)."""
    if not buf.is_contiguous() or buf.device.type != "cpu":
        raise CPUKernelInputError("read_bandwidth_probe: buf must be a contiguous CPU tensor")
    lib = _library(isa)
    if lib is None:
        return int(buf.view(torch.uint8).sum())
    return lib.tq_read(buf.data_ptr(), buf.numel() * buf.element_size(), threads or torch.get_num_threads())
