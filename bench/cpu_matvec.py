"""CPU quantized matvec (decode) candidates against the CPU's measured DRAM read bandwidth.

Each candidate multiplies x (M, K) by one DeepSeek-V3 expert matrix per call, rotating through
enough distinct matrices (>= 4x the last-level cache) that every call reads its weight from DRAM.
Bandwidth is measured the same way, with the same thread count: ``torch.sum`` over a large float32
buffer and a plain streaming read (``read_bandwidth_probe``); the larger is the denominator.

Candidates:
  dequant+linear   dequantize to float32, then F.linear (the reference; any type)
  torch-int4pack   Q4_K repacked for torch's CPU int4 kernel (group 32, bf16 scale and zero, bf16 x)
  cpp-f32          tierlm.kernels.cpu_quant, weights decoded to float32 in registers
  cpp-q8           tierlm.kernels.cpu_quant, x quantized to int8, integer dot products
  dense-bf16       F.linear on a bf16 copy (3.6x the bytes of Q4_K; context for what torch reaches)

Usage: PYTHONPATH=. python bench/cpu_matvec.py [--threads N] [--json PATH] [--llc-multiple 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tierlm.kernels import cpu_quant as cq
from tierlm.weights.formats import GGMLType, dequantize, quantize
from tierlm.weights.ggml_types import block_format, tensor_nbytes

Q4_K, Q6_K, Q8_0 = GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0
# (type, N, K): expert gate/up (2048 x 7168) and down (7168 x 2048) of DeepSeek-V3
CASES = [(Q4_K, 2048, 7168), (Q4_K, 7168, 2048), (Q6_K, 2048, 7168), (Q6_K, 7168, 2048), (Q8_0, 2048, 7168)]
ROWS = (1, 4)
SCALE_FIELDS = {Q4_K: (0, 2), Q6_K: (208,), Q8_0: (0,)}  # byte offsets of fp16 d / dmin in a block
GB = 1e9


# ---------------------------------------------------------------------------------------------- machine


def llc_bytes() -> int:
    """Size of the largest (last-level) cache, from sysfs; 0 when unknown."""
    best = (0, 0)
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((idx / "level").read_text())
            size = (idx / "size").read_text().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
        best = max(best, (level, int(size.rstrip("KMG")) * mult))
    return best[1]


def machine() -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    cxx = cq._compiler()
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "llc_bytes": llc_bytes(),
        "loadavg_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "compiler": subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout.splitlines()[0]
        if cxx else None,
        "kernel_isa": cq.kernel_isa(),
        "kernel_source_sha256": hashlib.sha256(cq._SOURCE.read_bytes()).hexdigest()[:16],
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def read_bandwidth(nbytes: int, threads: int, reps: int = 5) -> dict:
    """Best-of-``reps`` GB/s of torch.sum and of a plain streaming read over ``nbytes``."""
    buf = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    out = {}
    for name, fn in (("torch_sum", lambda: buf.sum()), ("stream_read", lambda: cq.read_bandwidth_probe(buf, threads))):
        fn()
        best = min(_timed(fn) for _ in range(reps))
        out[name] = buf.numel() * 4 / best / GB
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------------------------------------- weights


def expert_set(buf: torch.Tensor, qtype: GGMLType, N: int, K: int) -> list[torch.Tensor]:
    """View ``buf`` (random bytes) as distinct (N, row_bytes) matrices with finite, normal fp16 scales."""
    row = tensor_nbytes(qtype, (1, K))
    E = buf.numel() // (N * row)
    mats = buf[: E * N * row].view(E, N, row)
    blocks = mats.view(-1, block_format(qtype).type_size)
    for off in SCALE_FIELDS[qtype]:  # fp16 0x1c00..0x1cff: about 0.004, like real expert scales (never
        blocks[:, off + 1] = 0x1C  # subnormal: float math on subnormals is far slower)
    return list(mats.unbind(0))


def q4k_to_int4pack(w: torch.Tensor, N: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K bytes -> torch's CPU int4 layout: w = (q - 8) * scale + zero per 32, scale = d*sc, zero = 8*d*sc - dmin*m."""
    b = w.reshape(-1, 144)  # (NB, 144)
    d = b[:, 0:2].contiguous().view(torch.float16).float()  # (NB, 1)
    dmin = b[:, 2:4].contiguous().view(torch.float16).float()
    s = b[:, 4:16].to(torch.int32)
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], 1).float()  # (NB, 8)
    mn = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1).float()
    qs = b[:, 16:].reshape(-1, 4, 1, 32).to(torch.int32)  # (NB, chunk, 1, 32)
    q = torch.cat([qs & 15, qs >> 4], 2).reshape(N, K)  # element 64c + 32h + l
    scale, zero = d * sc, 8 * d * sc - dmin * mn  # (NB, 8)
    sz = torch.stack([scale, zero], -1).reshape(N, K // 32, 2).transpose(0, 1).contiguous()  # (K/32, N, 2)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    return packed, sz.to(torch.bfloat16)


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)


# One call of each candidate on one weight (the first argument, so ``rotate`` can cycle weights).
def _cpp(w, *, x, qtype, K, mode, out):
    return cq.cpu_quant_matmul(x, w, qtype, K, mode=mode, out=out)


def _ref(w, *, x, qtype, K):
    return cq.cpu_quant_matmul_ref(x, w, qtype, K)


def _int4(packed_sz, *, x):
    return int4pack_mm(x, *packed_sz)


def _dense(w, *, x):
    return F.linear(x, w)


# ---------------------------------------------------------------------------------------------- timing


def rotate(fn, mats: list, min_s: float, repeats: int, min_passes: int = 2) -> float:
    """Seconds per call of fn(mat), cycling through every matrix at least ``min_passes`` times; the
    best of ``repeats`` such runs (other processes on a shared machine only ever slow a run down)."""
    for m in mats[:4]:
        fn(m)
    best = float("inf")
    for _ in range(repeats):
        calls, t0 = 0, time.perf_counter()
        while calls < min_passes * len(mats) or time.perf_counter() - t0 < min_s:
            for m in mats:
                fn(m)
            calls += len(mats)
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def timed_calls(fn, mats: list, max_s: float) -> float:
    """Seconds per call for slow candidates: distinct matrices until ``max_s`` has passed (at least 2)."""
    fn(mats[-1])
    t0, calls = time.perf_counter(), 0
    for m in mats:
        fn(m)
        calls += 1
        if calls >= 2 and time.perf_counter() - t0 >= max_s:
            break
    return (time.perf_counter() - t0) / calls


# ---------------------------------------------------------------------------------------------- accuracy


def accuracy(K: int = 7168, N: int = 128, M: int = 4, seed: int = 0) -> list[dict]:
    """Error of each candidate vs the exact (float64) product of the dequantized weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    rows = []
    for qtype in (Q4_K, Q6_K, Q8_0):
        w = quantize(torch.randn(N, K, generator=g) * 0.02, qtype)
        wd = dequantize(w, qtype, (N, K)).double()
        exact = x.double() @ wd.T
        bound_scale = (x.double().abs() @ wd.abs().T)  # sum |w||x| per output
        cands = {"dequant+linear": cq.cpu_quant_matmul_ref(x, w, qtype, K),
                 "cpp-f32": cq.cpu_quant_matmul(x, w, qtype, K, mode="f32"),
                 "cpp-q8": cq.cpu_quant_matmul(x, w, qtype, K, mode="q8")}
        if qtype == Q4_K:
            packed, sz = q4k_to_int4pack(w, N, K)
            cands["torch-int4pack"] = int4pack_mm(x.to(torch.bfloat16), packed, sz).float()
        for name, y in cands.items():
            err = (y.double() - exact)
            rows.append({"type": qtype.name, "candidate": name,
                         "rel_l2": (err.norm() / exact.norm()).item(),
                         "max_err_over_sum_abs": (err.abs() / bound_scale).max().item()})
    return rows


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--llc-multiple", type=float, default=4.0, help="rotation set size, in last-level caches")
    ap.add_argument("--min-s", type=float, default=0.25, help="seconds per fast measurement (at least 2 passes)")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per candidate; the fastest is kept")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    info["threads"] = args.threads
    info["repeats"] = args.repeats
    llc = info["llc_bytes"] or 256 << 20
    rot_bytes = int(max(args.llc_multiple * llc, 512 << 20))
    info["rotation_bytes"] = rot_bytes
    print(f"# {info['cpu']} | {info['cpus']} cpus, {args.threads} threads | LLC {llc / 2**20:.0f} MiB | "
          f"rotation set {rot_bytes / 2**30:.2f} GiB | isa {info['kernel_isa']} | torch {info['torch']} | "
          f"load {info['loadavg_1min']:.2f}", flush=True)

    bw = read_bandwidth(rot_bytes, args.threads)
    ceiling = max(bw.values())
    print(f"# read bandwidth: torch.sum {bw['torch_sum']:.1f} GB/s, stream read {bw['stream_read']:.1f} GB/s "
          f"-> ceiling {ceiling:.1f} GB/s", flush=True)

    buf = torch.empty(rot_bytes, dtype=torch.uint8)
    buf.view(torch.int64).random_()
    results = []

    def record(cand, qtype, N, K, M, sec, nbytes, n_mats):
        r = {"candidate": cand, "type": qtype.name, "N": N, "K": K, "M": M, "threads": args.threads,
             "us_per_matrix": sec * 1e6, "bytes_per_matrix": nbytes, "gbps": nbytes / sec / GB,
             "pct_of_read_bw": 100 * nbytes / sec / GB / ceiling, "matrices": n_mats}
        results.append(r)
        print(f"{cand:15s} {qtype.name:5s} N={N:5d} K={K:5d} M={M:2d}  {r['us_per_matrix']:9.1f} us  "
              f"{r['gbps']:6.1f} GB/s  {r['pct_of_read_bw']:5.1f}%", flush=True)

    for qtype, N, K in CASES:
        mats = expert_set(buf, qtype, N, K)
        nbytes = mats[0].numel()
        for M in ROWS:
            x, y = torch.randn(M, K), torch.empty(M, N)
            for mode in cq.MODES:
                fn = functools.partial(_cpp, x=x, qtype=qtype, K=K, mode=mode, out=y)
                sec = rotate(fn, mats, args.min_s, args.repeats)
                record(f"cpp-{mode}", qtype, N, K, M, sec, nbytes, len(mats))
            if M == 1:
                sec = timed_calls(functools.partial(_ref, x=x, qtype=qtype, K=K), mats, 1.0)
                record("dequant+linear", qtype, N, K, M, sec, nbytes, len(mats))
        if qtype == Q4_K:  # one real repack, cloned: distinct memory, same bytes per call
            packed, sz = q4k_to_int4pack(mats[0], N, K)
            per = packed.numel() + sz.numel() * 2
            copies = [(packed.clone(), sz.clone()) for _ in range(max(2, rot_bytes // per))]
            for M in ROWS:
                xb = torch.randn(M, K).to(torch.bfloat16)
                sec = rotate(functools.partial(_int4, x=xb), copies, args.min_s, args.repeats)
                record("torch-int4pack", qtype, N, K, M, sec, per, len(copies))
            del copies
    del buf, mats
    # dense bf16 for scale: F.linear on bf16 copies of the gate shape
    N, K = 2048, 7168
    one = torch.empty(N, K, dtype=torch.bfloat16).normal_()
    dense = [one.clone() for _ in range(max(2, rot_bytes // (N * K * 2)))]
    for M in ROWS:
        xb = torch.randn(M, K).to(torch.bfloat16)
        sec = rotate(functools.partial(_dense, x=xb), dense, args.min_s, args.repeats)
        record("dense-bf16", GGMLType.BF16, N, K, M, sec, N * K * 2, len(dense))
    del dense

    acc = accuracy()
    print("\n# error vs the exact product (float64) of the dequantized weight, K=7168, M=4")
    for a in acc:
        print(f"{a['candidate']:15s} {a['type']:5s} rel L2 {a['rel_l2']:.2e}   max |err| / sum|w||x| "
              f"{a['max_err_over_sum_abs']:.2e}")
    summary = {"machine": info, "read_bandwidth_gbps": bw, "ceiling_gbps": ceiling, "results": results,
               "accuracy": acc}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
