"""Prefill's dequantizer on DeepSeek-V3's shapes: ``dequantize_rows`` (Q4_K: ``triton_mmq.q4k_dequant_kernel``)
against the general ``triton_q.dequant_kernel``, in GB/s of bytes read + written and % of the copy bandwidth;
then a 512-row prefill product (dequantize + cuBLAS) against cuBLAS alone on an fp16 weight.

Usage: PYTHONPATH=. python bench/dequant.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import SHAPES, graph_time, random_weight, start_run, write_run  # noqa: E402

from tierlm.kernels import triton_q as tq  # noqa: E402
from tierlm.kernels.quant_matmul import DEQUANT_CONFIG, dequantize_rows, quant_matmul  # noqa: E402
from tierlm.weights.formats import dequantize  # noqa: E402


def general(w, t, K, dtype):
    """``triton_q.dequant_kernel``: what ``dequantize_rows`` launched for every type before."""
    N = w.shape[0]
    out = torch.empty((N, K), dtype=dtype, device=w.device)
    bn, k_step, warps = DEQUANT_CONFIG
    block = tq.BLOCK_ELEMS[int(t)]
    nb = max(1, k_step // block)
    tq.dequant_kernel[(triton.cdiv(N, bn), triton.cdiv(K // block, nb))](
        w, out, N, K, K // block, w.shape[1], QTYPE=int(t), BLOCK=block, BLOCK_N=bn, NB=nb, num_warps=warps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    res, bw = start_run()
    for name, N, K, t in SHAPES[:8]:
        w = random_weight(t, N, K, 2)
        ref = dequantize(w[0].cpu(), t, (N, K)).cuda()
        moved = w[0].numel() + N * K * 2  # bytes read + fp16 written
        for label, fn in (("dequantize_rows", lambda i: dequantize_rows(w[i], t, K, torch.float16)),
                          ("triton_q.dequant_kernel", lambda i: general(w[i], t, K, torch.float16))):
            err = ((fn(0).float() - ref).norm() / ref.norm()).item()
            s = graph_time([lambda i=i: fn(i) for i in range(2)], min_calls=4)
            r = dict(what=label, shape=name, type=t.name, us=s * 1e6, pct=moved / s / bw * 100, err=err)
            res["rows"].append(r)
            print(f"{name:<30} {label:<26} {s * 1e6:9.1f} us {r['pct']:5.1f}% of copy  err {err:.1e}", flush=True)
        x = torch.randn(512, K, device="cuda").half()
        wd = ref.half()
        s_mm = graph_time([lambda: x @ wd.T], min_calls=4)
        s_q = graph_time([lambda i=i: quant_matmul(x, w[i], t, K) for i in range(2)], min_calls=4)
        res["rows"].append(dict(what="prefill M=512", shape=name, type=t.name, us=s_q * 1e6, cublas_us=s_mm * 1e6))
        print(f"{name:<30} prefill M=512: {s_q * 1e6:9.1f} us, cuBLAS alone {s_mm * 1e6:8.1f} us "
              f"({s_q / s_mm:.1f}x)", flush=True)
        del w, ref, wd
        torch.cuda.empty_cache()
    print("wrote", write_run(res, args.out, "dequant"))


if __name__ == "__main__":
    main()
