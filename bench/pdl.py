"""Decode with and without programmatic dependent launch (PDL), side by side in one run.

On sm_90+ the int8 decode launches of one activation row (the quantizer and the product, the MoE's launches at one
token) are launched with PDL (``quant_matmul.pdl_launch``): each launch is scheduled while the one before it runs and
waits in its first instruction for that one's writes, so the gap between dependent kernels is spent while the earlier
one runs. This script times every decode product of DeepSeek-V3's shapes at 1, 4 and 16 rows with the default
configuration (``pick_config``, Q6_K in the aligned layout as the layers hold it on a GPU) and the fused MoE layer
at 1 and 4 tokens, each with PDL off and on (``quant_matmul.PDL``; on means ``pdl_launch``'s rule, one row, or with
``--all-rows`` every launch), against copy bandwidth (``bench/kernels.py``'s
timing: weights rotated past the L2, calls replayed from a CUDA graph), and checks each against its reference.

Usage: PYTHONPATH=. python bench/pdl.py --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import (SHAPES, graph_time, layouts, moe_setup, moe_weights, n_copies, random_weight,  # noqa: E402
                     start_run, write_run)

from tierlm.kernels import quant_matmul as qm  # noqa: E402
from tierlm.kernels.q6k_layout import align_  # noqa: E402
from tierlm.weights.formats import FORMATS  # noqa: E402
from tierlm.weights.formats import GGMLType as T  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--rows", default="1,4,16", help="activation rows of the products")
    ap.add_argument("--tokens", default="1,4", help="tokens of the MoE layer")
    ap.add_argument("--all-rows", action="store_true", help="PDL on at every row count (pdl_launch's rule lifted)")
    args = ap.parse_args()
    if args.all_rows:
        qm.PDL_MAX_ROWS = 1 << 30
    res, bw = start_run(pdl_available=bool(qm.pdl_launch(torch.device("cuda", 0), 1)))
    rows_m = [int(m) for m in args.rows.split(",")]

    def timed(calls, check) -> dict:
        """PDL off, then on, then off and on again: {PDL: [(seconds, relative error) of each run]}."""
        out = {}
        for rep in range(2):
            for pdl in (False, True):
                qm.PDL = pdl
                err = check()
                s = graph_time(calls)
                out.setdefault(pdl, []).append((s, err))
        qm.PDL = True
        return out

    for name, N, K, t in SHAPES:
        aligned = layouts(t, K)[0]
        copies = n_copies(N * K // FORMATS[t].block_size * FORMATS[t].type_size)
        w = random_weight(t, N, K, copies)
        ref_w = w[0].clone()
        if aligned:
            align_(w)
        nbytes = w[0].numel()
        for M in rows_m:
            x = torch.randn(M, K, device="cuda").half()
            ref = qm.quant_matmul_ref(x, ref_w, t, K)
            calls = [lambda i=i: qm.quant_matmul(x, w[i], t, K, aligned=aligned) for i in range(copies)]

            def check():
                return ((calls[0]().float() - ref).norm() / ref.norm()).item()

            out = timed(calls, check)
            for pdl, runs in out.items():
                for s, err in runs:
                    res["rows"].append(dict(what=f"M={M}", shape=name, pdl=pdl, us=s * 1e6, pct=nbytes / s / bw * 100,
                                            err=err))
            off, on = (min(s for s, _ in out[p]) for p in (False, True))
            print(f"{name:<32} M={M:<3} off {off * 1e6:8.2f} us {nbytes / off / bw * 100:5.1f}%  on {on * 1e6:8.2f} us "
                  f"{nbytes / on / bw * 100:5.1f}%  {off / on:.3f}x  err {out[True][0][1]:.1e}", flush=True)
        w = ref_w = None  # free before the next shape's copies
        torch.cuda.empty_cache()

    for down_type in (T.Q6_K, T.Q4_K):
        weights = moe_weights(types=(T.Q4_K, T.Q4_K, down_type), aligned=True)
        for T_ in [int(t) for t in args.tokens.split(",")]:
            calls, per_expert, distinct, check = moe_setup(T_, 32, weights=weights, aligned=True)
            read = distinct * per_expert / bw
            out = timed(calls, check)
            for pdl, runs in out.items():
                for s, err in runs:
                    res["rows"].append(dict(what=f"moe T={T_}, down {down_type.name}", pdl=pdl, us=s * 1e6,
                                            ratio=s / read, err=err))
            off, on = (min(s for s, _ in out[p]) for p in (False, True))
            print(f"moe T={T_} down {down_type.name:<20} off {off * 1e6:8.2f} us {off / read:.3f}x  on "
                  f"{on * 1e6:8.2f} us {on / read:.3f}x read time  {off / on:.3f}x  err {out[True][0][1]:.1e}",
                  flush=True)
            calls = None
        weights = None
        torch.cuda.empty_cache()
    print("wrote", write_run(res, args.out, "pdl"))


if __name__ == "__main__":
    main()
