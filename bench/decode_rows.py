"""Decode products of 1-16 activation rows on DeepSeek-V3's shapes: the default launch against the tensor-core
``mmq`` configurations and against dequantize + cuBLAS, in % of the card's copy bandwidth.

For each shape and row count M it times, with ``kernels.py``'s method (weights rotated past the L2, calls
replayed from a CUDA graph):
- ``quant_matmul`` as shipped (``pick_config``);
- the same with bf16 activations (converted before the timed calls);
- ``MMQ_STEPS`` launches of ``triton_mmq.mmq_kernel`` with split-K chosen for 2, 4 or 8 programs per SM
  (at least two 256-element blocks per split), with the packed-fp16 Q4_K decode and its plain twin;
- at M = 16, the prefill path: the Triton dequantizer to fp16, then cuBLAS.
Each product is checked against ``quant_matmul_ref`` (relative error in the JSON).

Usage: PYTHONPATH=. python bench/decode_rows.py [--out DIR] [--shapes a,b] [--m 1,2,4,8,16] [--workers 14]
       [--defaults-only]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import SHAPES, graph_time, n_copies, random_weight, start_run, write_run  # noqa: E402

from tierlm.kernels.quant_matmul import (QMMConfig, dequantize_rows, mmq_launch, mmq_splits,  # noqa: E402
                                         quant_matmul, quant_matmul_ref)
from tierlm.weights.formats import GGMLType  # noqa: E402

T = GGMLType
# (rows per program, 256-element blocks per step, warps, stages, inline PTX): the defaults (MMQ_TILES) first
MMQ_STEPS = {
    T.Q4_K: [(64, 1, 4, 2, 1), (32, 1, 4, 2, 1), (64, 1, 8, 2, 1), (128, 1, 8, 2, 1), (64, 1, 4, 3, 1),
             (64, 1, 4, 2, 0)],
    T.Q6_K: [(32, 1, 2, 2, 1), (64, 1, 4, 2, 1), (16, 1, 1, 2, 1), (32, 2, 2, 2, 1)],
    T.Q8_0: [(32, 1, 2, 2, 1), (16, 1, 1, 2, 1), (32, 1, 4, 2, 1)],
    T.Q5_0: [(32, 1, 2, 2, 1), (16, 1, 1, 2, 1), (32, 1, 4, 2, 1)],
}
WAVES = (2, 4, 8)


def jobs(shapes, ms, sms):
    """(label, shape, M, call maker) for every timed product."""
    out = []
    for name, N, K, t in shapes:
        for M in ms:
            out.append(("default", name, M, None))
            out.append(("default bf16", name, M, ("bf16",)))
            if M == 1:
                continue
            for bn, nb, wp, st, asm in MMQ_STEPS[t]:
                for waves in WAVES:
                    split = mmq_splits(N, K, bn, sms, waves, 2)
                    cfg = QMMConfig("mmq", wp, split, block_n=bn, nblk=nb, num_stages=st)
                    out.append((f"mmq{'' if asm else ' plain'} {bn}x{nb} {wp}w s{st} x{split} ({waves}/SM)", name, M,
                                (cfg, bool(asm))))
            if M == 16:
                out.append(("dequantize + cuBLAS", name, M, "cublas"))
    return out


def call(x, w, t, K, cfg):
    """One product; ``x`` is already in the dtype the job names (bf16 for ("bf16",))."""
    if cfg is None or cfg == ("bf16",):
        return quant_matmul(x, w, t, K)
    if isinstance(cfg, str):
        return x @ dequantize_rows(w, t, K, x.dtype).T
    return mmq_launch(x, w, t, K, *cfg)  # (config, inline PTX or not)


def _warm(chunk):
    torch.cuda.init()
    for label, name, M, cfg in chunk:
        _, N, K, t = next(s for s in SHAPES if s[0] == name)
        try:
            dtype = torch.bfloat16 if cfg == ("bf16",) else torch.float16
            call(torch.randn(M, K, device="cuda").to(dtype), random_weight(t, N, K)[0], t, K, cfg)
            torch.cuda.synchronize()
        except Exception as e:  # reported again when the main process runs it
            print(f"warm {label} {name} M={M}: {type(e).__name__}: {e}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--shapes", default="", help="comma-separated parts of shape names to keep")
    ap.add_argument("--m", default="1,2,4,8,16", help="activation rows")
    ap.add_argument("--workers", type=int, default=14, help="processes compiling the kernels first")
    ap.add_argument("--defaults-only", action="store_true", help="only the default launch (fp16 and bf16)")
    args = ap.parse_args()
    dev = torch.cuda.get_device_properties(0)
    shapes = [s for s in SHAPES if not args.shapes or any(k in s[0] for k in args.shapes.split(","))]
    todo = jobs(shapes, [int(m) for m in args.m.split(",")], dev.multi_processor_count)
    if args.defaults_only:
        todo = [j for j in todo if j[0] in ("default", "default bf16")]
    t0 = time.time()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_warm, args=(todo[i::args.workers],)) for i in range(args.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    res, bw = start_run(sms=dev.multi_processor_count, compile_s=time.time() - t0)
    print(f"compiled in {res['compile_s']:.0f} s", flush=True)
    for name, N, K, t in shapes:
        copies = n_copies(N * K)
        w = random_weight(t, N, K, copies)
        nbytes = w[0].numel()
        for M in sorted({j[2] for j in todo if j[1] == name}):
            x = torch.randn(M, K, device="cuda").half()
            ref = quant_matmul_ref(x, w[0], t, K)
            xb = x.to(torch.bfloat16)  # converted before timing: the bf16 rows time the product alone
            refb = quant_matmul_ref(xb, w[0], t, K)
            for label, _, _, cfg in [j for j in todo if j[1] == name and j[2] == M]:
                xx, rr = (xb, refb) if cfg == ("bf16",) else (x, ref)
                try:
                    err = ((call(xx, w[0], t, K, cfg).float() - rr).norm() / rr.norm()).item()
                    s = graph_time([lambda i=i: call(xx, w[i], t, K, cfg) for i in range(copies)])
                except Exception as e:
                    print(f"{label} {name} M={M}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                    continue
                r = dict(what=label, shape=name, type=t.name, M=M, us=s * 1e6, pct=nbytes / s / bw * 100, err=err)
                if isinstance(cfg, tuple) and len(cfg) == 2:
                    c = cfg[0]
                    r["config"] = [c.block_n, c.nblk, c.num_warps, c.num_stages, c.split_k, cfg[1]]
                res["rows"].append(r)
                print(f"{name:<30} M={M:<3} {label:<42} {s * 1e6:9.2f} us {r['pct']:5.1f}%  err {err:.1e}", flush=True)
        del w
        torch.cuda.empty_cache()
        path = write_run(res, args.out, "decode-rows")  # after every shape: a cut-short run keeps what it timed
    print("wrote", path)


if __name__ == "__main__":
    main()
