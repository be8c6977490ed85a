"""What a single kernel launch can read on this GPU, against what the int8 decode kernels reach.

The decode kernels are judged against a 2 GiB device copy. This script measures, in one run and
with ``bench/kernels.py``'s timing (weights rotated past the L2, calls replayed from a CUDA graph):

1. ``empty``: a one-program kernel, i.e. the launch gap a graph leaves between kernels;
2. ``flat``: a plain read of the same number of bytes as each decode shape (16-byte loads, every
   thread's loads issued before its first use), for a few program sizes: the ceiling of one launch;
3. ``pattern``: the bytes of a Q4_K / Q6_K weight read with ``mmvq_kernel``'s own geometry and fetch
   helpers, summed without decoding: the cost of the access pattern alone;
4. ``mmvq``: the product kernel alone (activations quantized beforehand) with each load-cache hint
   (``triton_mmvq._ld``), and ``quant_matmul`` (quantizer included) as shipped;
5. the fused MoE at one token with each hint.

Every product is checked against ``quant_matmul_q8_ref`` / ``moe_quant_q8_ref``.

Usage: PYTHONPATH=. python bench/read_ceiling.py --out DIR
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import GB, MOE, copy_bandwidth, graph_time, moe_setup, n_copies, random_weight  # noqa: E402

from tierlm.kernels import triton_mmvq as tv  # noqa: E402
from tierlm.kernels.triton_q import row_stride  # noqa: E402
from tierlm.kernels.moe import MoEConfig  # noqa: E402
from tierlm.kernels.quant_matmul import (MMVQ_TILES, QMMConfig, quant_matmul, quant_matmul_q8_ref,  # noqa: E402
                                         quantize_q8)
from tierlm.weights.formats import GGMLType  # noqa: E402

T = GGMLType
SHAPES = [  # (name, N, K, type)
    ("expert gate/up 7168->2048", 2048, 7168, T.Q4_K),
    ("expert down 2048->7168", 7168, 2048, T.Q6_K),
    ("dense up 7168->18432", 18432, 7168, T.Q4_K),
    ("o_proj 16384->7168", 7168, 16384, T.Q4_K),
    ("head 7168->129280", 129280, 7168, T.Q6_K),
]
HINTS = {0: "none", 1: "weights evict_first", 2: "weights .cg", 4: "activations evict_last",
         5: "evict_first + act evict_last", 6: ".cg + act evict_last"}
FLAT = [(1, 1), (4, 1), (4, 4), (8, 2), (2, 8)]  # (warps, 16-byte loads per thread)


@triton.jit
def empty_kernel(out_ptr):
    tl.store(out_ptr, 1)


@triton.jit
def flat_read_kernel(p, out_ptr, n_words, WORDS: tl.constexpr, UNROLL: tl.constexpr):
    """Program i xors the words [i * WORDS * UNROLL, (i + 1) * WORDS * UNROLL) of an int32 buffer;
    WORDS = 4 words per thread, so every load is 16 bytes."""
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, WORDS)
    acc = tl.zeros([WORDS], dtype=tl.int32)
    for u in tl.static_range(UNROLL):
        o = pid * (WORDS * UNROLL) + u * WORDS + offs
        acc ^= tl.load(p + o, mask=o < n_words, other=0)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def pattern_kernel(w_ptr, out_ptr, N, row_bytes, nblocks, QTYPE: tl.constexpr, BN: tl.constexpr,
                   NBLK: tl.constexpr):
    """mmvq_kernel's walk over a Q4_K / Q6_K weight (same programs, steps and fetch helpers); the
    fetched words are xored together instead of multiplied."""
    row0 = tl.program_id(0) * BN
    rows = tl.minimum(row0 + tl.arange(0, BN), N - 1)
    wrow = w_ptr + rows.to(tl.int64) * row_stride(row_bytes, QTYPE)
    if QTYPE == 12:
        c = tl.arange(0, 4)
        wo = 8 * c[:, None] + tl.arange(0, 4)[None, :]
        acc = tl.zeros([BN, NBLK, 4, 4], dtype=tl.int32)
        for k in range(0, nblocks, NBLK):
            kb = tl.minimum(k + tl.arange(0, NBLK), nblocks - 1)
            w0, w1, w2, w3, q0, q1 = tv._q4k_fetch(wrow, kb, wo)
            acc ^= q0 ^ q1 ^ (w0 + w1 + w2 + w3)[:, :, :, None]
        r = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    else:
        h4 = tl.arange(0, 2)[None, :, None, None]
        w4 = tl.arange(0, 2)[None, None, :, None] * 4 + tl.arange(0, 4)[None, None, None, :]
        acc = tl.zeros([BN, NBLK, 2, 2, 4], dtype=tl.int32)
        for k in range(0, nblocks, NBLK):
            kb = tl.minimum(k + tl.arange(0, NBLK), nblocks - 1)
            A, B, H, d = tv._q6k_fetch(wrow, kb, h4, w4)
            acc ^= A ^ B ^ H ^ d.to(tl.int32, bitcast=True)[:, :, :, :, None]
        r = tl.sum(tl.sum(tl.sum(tl.sum(acc, axis=4), axis=3), axis=2), axis=1)
    tl.store(out_ptr + row0 + tl.arange(0, BN), r, mask=row0 + tl.arange(0, BN) < N)


def mmvq_alone(xq, xd, xs, w, t, N, K, bn, nblk, warps, hint, out):
    nblk, warps = tv.fit_step(nblk, warps, K)
    nblocks = K // tv.BLOCK_ELEMS[int(t)]
    tv.mmvq_kernel[(triton.cdiv(N, bn), 1)](xq, xd, xs, w, out, N, K, w.shape[1], nblocks, nblocks, N, N,
                                            QTYPE=int(t), BN=bn, NBLK=nblk, ASM=True, HINT=hint, num_warps=warps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--shapes", default="")
    args = ap.parse_args()
    dev = torch.cuda.get_device_properties(0)
    res = dict(card=dev.name, sms=dev.multi_processor_count, date=dt.date.today().isoformat(),
               torch=torch.__version__, triton=triton.__version__, command=" ".join(sys.argv), rows=[])
    bw = copy_bandwidth()
    res["copy_GBps"] = bw / GB
    print(f"{dev.name}: copy {bw / GB:.0f} GB/s", flush=True)

    def row(**kw):
        res["rows"].append(kw)
        pct = f"{kw['pct']:5.1f}%" if "pct" in kw else ""
        print(f"{kw['what']:<44} {kw.get('shape', ''):<28} {kw['us']:8.2f} us {pct} {kw.get('err', '')}", flush=True)

    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    row(what="empty kernel", us=graph_time([lambda: empty_kernel[(1,)](sink, num_warps=1)]) * 1e6)
    row(what="empty kernel x2 (dependent pair)",
        us=graph_time([lambda: (empty_kernel[(1,)](sink, num_warps=1), empty_kernel[(1,)](sink, num_warps=1))]) * 1e6)

    pick = [s for s in SHAPES if not args.shapes or any(k in s[0] for k in args.shapes.split(","))]
    for name, N, K, t in pick:
        copies = n_copies(N * K)  # upper bound on bytes: the same number of copies for every variant
        w = random_weight(t, N, K, copies)
        nbytes = w[0].numel()
        pct = lambda s: nbytes / s / bw * 100  # noqa: E731
        n_words = nbytes // 4
        for warps, unroll in FLAT:
            words = 4 * 32 * warps
            grid = (triton.cdiv(n_words, words * unroll),)
            out = torch.empty(grid[0], dtype=torch.int32, device="cuda")
            s = graph_time([lambda i=i: flat_read_kernel[grid](w[i].view(torch.int32).view(-1), out, n_words,
                                                                WORDS=words, UNROLL=unroll, num_warps=warps)
                            for i in range(copies)])
            row(what=f"flat read {warps}w x{unroll} ({words * unroll * 4} B/program)", shape=name, us=s * 1e6,
                pct=pct(s))
        bn, nblk, warps = MMVQ_TILES[t]
        nb, wp = tv.fit_step(nblk, warps, K)
        outp = torch.empty(N, dtype=torch.int32, device="cuda")
        s = graph_time([lambda i=i: pattern_kernel[(triton.cdiv(N, bn),)](w[i], outp, N, w.shape[2], K // 256,
                                                                          QTYPE=int(t), BN=bn, NBLK=nb, num_warps=wp)
                        for i in range(copies)])
        row(what=f"pattern read {bn}x{nb} {wp}w", shape=name, us=s * 1e6, pct=pct(s))
        x = torch.randn(1, K, device="cuda").half()
        xq, xd, xs = quantize_q8(x)
        ref = quant_matmul_q8_ref(x, w[0], t, K).float()
        out = torch.empty(1, N, dtype=torch.float16, device="cuda")
        for hint, label in HINTS.items():
            mmvq_alone(xq, xd, xs, w[0], t, N, K, bn, nblk, warps, hint, out)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            s = graph_time([lambda i=i: mmvq_alone(xq, xd, xs, w[i], t, N, K, bn, nblk, warps, hint, out)
                            for i in range(copies)])
            row(what=f"mmvq alone {bn}x{nblk} {warps}w, {label}", shape=name, us=s * 1e6, pct=pct(s), hint=hint,
                err=f"rel err {err:.1e}")
        s = graph_time([lambda i=i: quant_matmul(x, w[i], t, K) for i in range(copies)])
        row(what="quant_matmul (quantizer + mmvq, default)", shape=name, us=s * 1e6, pct=pct(s))
        cfg = QMMConfig("mmvq", warps, 1, block_n=bn, nblk=nblk, hint=2)
        s = graph_time([lambda i=i: quant_matmul(x, w[i], t, K, config=cfg) for i in range(copies)])
        row(what="quant_matmul, weights .cg", shape=name, us=s * 1e6, pct=pct(s))
        del w
        torch.cuda.empty_cache()

    for hint, label in HINTS.items():
        calls, per_expert, distinct, check = moe_setup(1, 32, MoEConfig(mmvq_hint=hint))
        err = check()
        s = graph_time(calls)
        read = distinct * per_expert / bw
        res["rows"].append(dict(what=f"moe T=1, {label}", us=s * 1e6, ratio=s / read, hint=hint, err=err))
        print(f"moe T=1 {label:<36} {s * 1e6:8.2f} us  {s / read:.2f}x read time  rel err {err:.1e}", flush=True)
        del calls
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"read-ceiling-{dev.name.replace(' ', '_')}.json"
    path.write_text(json.dumps(res, indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
