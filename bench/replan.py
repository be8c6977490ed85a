"""Recompute the planner's predictions for the runs of a ``bench/tiered.py`` JSON, from the bandwidths that run
measured, with the current planner: for runs made before the JSON recorded the single-sequence figure.

    python bench/replan.py RESULTS.json MODEL.gguf [--gpu-gbps-halved]

MODEL must be the GGUF the run used, or a file with the same header (``tools/mkgguf.py``'s shapes; only the
header and the size are read, so a sparse copy serves). ``--gpu-gbps-halved`` reproduces runs whose bench
passed half the copy bandwidth as the GPU's (before this option's commit). Prints, per tiered run, the expert
placement (to check it is the one that ran), the batch throughput the plan printed, the single-sequence
prediction, the measured single-sequence speed and the error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tierlm.plan import make_hardware, make_plan  # noqa: E402
from tierlm.plan.command import resolve_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("model")
    ap.add_argument("--gpu-gbps-halved", action="store_true")
    args = ap.parse_args()
    r = json.loads(Path(args.results).read_text())
    bw = r["bandwidth"]
    config, tensors, name, _ = resolve_model(args.model, None)
    for run in r["runs"]:
        if "experts" not in run:
            continue
        gpus, ram = run["placement"].split(" + ")[:2]
        n, cap = (gpus.split("x gpu ") if "x gpu" in gpus else ("1", gpus.split("gpu ")[1]))
        on_gpu = run.get("devices", ["cuda"])[0] != "cpu"
        hw = make_hardware(gpus=",".join([cap] * int(n)) if on_gpu else "0", ram=ram.split("ram ")[1],
                           disk_gbps=bw["disk_read_gbps"],
                           gpu_gbps=bw["gpu_copy_gbps"] / (2 if args.gpu_gbps_halved else 1),
                           pcie_gbps=bw["pcie_h2d_gbps"], ram_gbps=bw["cpu_read_gbps"])
        pr = make_plan(config, hardware=hw, tensors=tensors, name=name, ctx=4096)
        p = pr.predicted
        print(json.dumps({"placement": run["placement"], "experts": {k: v for k, v in pr.expert_counts().items()
                                                                     if k in ("gpu", "ram", "disk")},
                          "experts_that_ran": {k: run["experts"][k] for k in ("gpu", "ram", "disk")},
                          "plan_batch": p["decode_batch"], "predicted_batch_tok_s": round(p["decode_tok_s"], 3),
                          "predicted_single_tok_s": round(p["decode_tok_s_single"], 3),
                          "measured_tok_s": round(run["decode_tok_s"], 3),
                          "error_single": round(p["decode_tok_s_single"] / run["decode_tok_s"] - 1, 3)}))


if __name__ == "__main__":
    main()
