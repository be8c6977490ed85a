"""GPU-resident decode speed of a GGUF: steps replayed from CUDA graphs against eager steps, side by side in one
run, and against the roofline of the bytes a token reads at the card's measured copy bandwidth.

    python bench/decode.py MODEL.gguf --out OUT_DIR [--tokens 64] [--batches 1,4] [--peer llama-bench.json]

For each batch size and mode (eager, graphs), one scheduler generates ``--tokens`` greedy tokens from the same
prompts twice: the first pass compiles kernels and captures graphs, the second is timed (decode steps only, as
``tierlm run`` reports them). The two modes' greedy tokens are compared.

Bytes per token at batch 1: every tensor of the file except the routed experts and the token embedding, plus one
embedding row and ``num_experts_per_tok`` of each MoE layer's routed experts. The roofline is those bytes at the
copy bandwidth (a 2 GiB device-to-device copy, read + write bytes over time).

``--profile``: kernels per decode step and their summed GPU time, from the torch profiler over eager steps.
``--peer``: llama-bench's JSON (``-o json``) for the same file on the same machine; its decode rate is set beside
(``--peer-name`` records how that llama.cpp was built and run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tierlm  # noqa: E402
from kernels import GB, start_run, write_run  # noqa: E402
from tierlm.runtime.generate import Stats  # noqa: E402
from tierlm.runtime.sampling import SamplingParams  # noqa: E402
from tierlm.runtime.scheduler import Scheduler  # noqa: E402
from tierlm.weights.gguf_io import GGUFFile  # noqa: E402


def bytes_per_token(path: Path) -> dict:
    """What one batch-1 decode token reads, by kind, from the file's tensor records."""
    gf = GGUFFile.open(path)
    n_used = int(gf.metadata["deepseek2.expert_used_count"])
    n_experts = int(gf.metadata["deepseek2.expert_count"])
    out = dict(routed_experts=0, embedding_row=0, rest=0)
    for name, t in gf.tensors.items():
        if "_exps." in name:
            out["routed_experts"] += t.nbytes * n_used // n_experts
        elif name.startswith("token_embd."):
            out["embedding_row"] += t.nbytes // t.shape[0]  # (vocab, hidden): one row
        else:
            out["rest"] += t.nbytes
    gf.close()
    out["total"] = sum(out.values())
    return out


def run_pass(sched: Scheduler, prompts, tokens: int) -> tuple[Stats, list[list[int]]]:
    sched.stats = Stats()
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        sched.submit(p, params, index=i)
    out = [[] for _ in prompts]
    while sched.busy:
        for ev in sched.step():
            out[ev.seq].append(ev.token_id)
    return sched.stats, out


def profile_steps(sched: Scheduler, prompts, steps: int = 8) -> dict:
    """Kernels per eager decode step and their summed GPU time (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=0, max_tokens=steps + 4, ignore_eos=True)
    for i, p in enumerate(prompts):
        sched.submit(p, params, index=i)
    sched.step()  # prefill
    sched.step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            sched.step()
        torch.cuda.synchronize()
    while sched.busy:
        sched.step()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels) / steps
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        c = by_name.setdefault(e.name[:100], [0, 0.0])
        c[0] += 1
        c[1] += e.device_time
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:25]
    return dict(kernels_per_step=len(kernels) / steps, kernel_us_per_step=gpu_us,
                top_kernels=[dict(name=n, per_step=c / steps, us_per_step=t / steps) for n, (c, t) in top])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--peer", help="llama-bench -o json output on the same file")
    ap.add_argument("--peer-name", default="llama.cpp (llama-bench)", help="what built the peer, for the record")
    args = ap.parse_args()

    path = Path(args.model)
    res, bw = start_run(model=path.name, tokens=args.tokens, prompt_tokens=args.prompt_tokens)
    per_token = bytes_per_token(path)
    res["bytes_per_token"] = per_token
    roofline = bw / per_token["total"]
    res["roofline_tok_s"] = roofline
    print(f"{per_token['total'] / GB:.3f} GB per token -> roofline {roofline:.0f} tok/s", flush=True)

    t0 = time.perf_counter()
    model = tierlm.load(path, device="cuda", dtype=args.dtype)
    res["load_s"] = time.perf_counter() - t0
    vocab = model.config.vocab_size
    for B in [int(b) for b in args.batches.split(",")]:
        prompts = [[(1000 + 7919 * (b * args.prompt_tokens + i)) % vocab for i in range(args.prompt_tokens)]
                   for b in range(B)]
        row = dict(batch=B)
        tokens = {}
        for mode in ("eager", "graphs"):
            sched = Scheduler(model, max_batch=B, max_prefill_tokens=None, raise_errors=True,
                              kv_tokens=B * (args.prompt_tokens + args.tokens + 16), cuda_graphs=mode == "graphs")
            t = time.perf_counter()
            run_pass(sched, prompts, args.tokens)  # compiles kernels, captures graphs
            first_s = time.perf_counter() - t
            stats, tokens[mode] = run_pass(sched, prompts, args.tokens)
            rate = stats.decode_tok_s
            row[mode] = dict(decode_tok_s=rate, first_pass_s=first_s, tok_s_per_seq=rate / B)
            if B == 1:
                row[mode]["pct_of_roofline"] = 100 * rate / roofline
            if mode == "graphs":
                g = sched.graphs
                row[mode].update(captures=g.captures if g else 0, replays=g.replays if g else 0,
                                 failed=g.failed if g else "not used")
            elif args.profile:
                try:
                    row[mode].update(profile_steps(sched, prompts))
                except Exception as e:  # the profiler's event API moves between torch versions
                    row[mode]["profile_error"] = f"{type(e).__name__}: {e}"
            print(B, mode, json.dumps({k: v for k, v in row[mode].items() if k != "top_kernels"}), flush=True)
            for k in row[mode].get("top_kernels", []):
                print(f"   {k['us_per_step']:8.1f} us {k['per_step']:6.1f}x  {k['name']}", flush=True)
            del sched
            torch.cuda.empty_cache()
        row["graphs_speedup"] = row["graphs"]["decode_tok_s"] / row["eager"]["decode_tok_s"]
        row["same_tokens"] = tokens["graphs"] == tokens["eager"]
        res["rows"].append(row)
        print(f"batch {B}: graphs {row['graphs_speedup']:.2f}x eager; same greedy tokens: {row['same_tokens']}",
              flush=True)
    if args.peer:
        peer = [r for r in json.loads(Path(args.peer).read_text()) if r.get("n_gen", 0) > 0]
        if peer:
            rate = peer[0]["avg_ts"]
            res["peer"] = dict(name=args.peer_name, n_gen=peer[0]["n_gen"],
                               decode_tok_s=rate, pct_of_roofline=100 * rate / roofline)
            ours = res["rows"][0]["graphs"]["decode_tok_s"]
            res["peer"]["tierlm_speedup"] = ours / rate
            print(f"llama.cpp {rate:.1f} tok/s; tierlm (graphs, batch {res['rows'][0]['batch']}) "
                  f"{ours / rate:.2f}x", flush=True)
    print(write_run(res, args.out, "decode"))


if __name__ == "__main__":
    main()
