"""The fused MoE at prefill sizes (expert-sorted tiles): ``triton_mmq``'s decode against the general tile decode
(``MoEConfig.sorted_mmq``), 256 DeepSeek-V3-shaped experts, 8 per token; time against reading the distinct experts'
bytes at the measured copy bandwidth, and the relative error against ``moe_quant_q8_ref`` (the int8 decode path's
reference: it includes the activations' int8 rounding, about 0.5%, which the tiles do not have).

Usage: PYTHONPATH=. python bench/moe_prefill.py [--out DIR] [--tokens 64,512,2048]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import graph_time, moe_setup, moe_weights, start_run, write_run  # noqa: E402

from tierlm.kernels.moe import MoEConfig  # noqa: E402
from tierlm.weights.formats import GGMLType  # noqa: E402

T = GGMLType


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tokens", default="64,512,2048")
    args = ap.parse_args()
    res, bw = start_run()
    for down in (T.Q6_K, T.Q4_K):
        weights = moe_weights(types=(T.Q4_K, T.Q4_K, down))
        for n in (int(v) for v in args.tokens.split(",")):
            for label, cfg in (("mmq decode", MoEConfig(sorted_min_pairs=1)),
                               ("general decode", MoEConfig(sorted_min_pairs=1, sorted_mmq=False))):
                calls, per_expert, distinct, check = moe_setup(n, 2, cfg, weights=weights)
                err = check()
                s = graph_time(calls, reps=5, min_calls=2)
                read = distinct * per_expert / bw
                r = dict(what=label, down=down.name, tokens=n, us=s * 1e6, read_us=read * 1e6, ratio=s / read, err=err)
                res["rows"].append(r)
                print(f"down {down.name} T={n:<5} {label:<15} {s * 1e6:10.1f} us = {s / read:5.2f}x read time "
                      f"({distinct:.0f} experts)  rel err {err:.1e}", flush=True)
                del calls
        del weights
        torch.cuda.empty_cache()
    print("wrote", write_run(res, args.out, "moe-prefill"))


if __name__ == "__main__":
    main()
