"""Decode speed of tiered experts on a DeepSeek-V3-shaped GGUF, against the planner's prediction and the tier
roofline, measured side by side in one run.

    python bench/tiered.py MODEL.gguf --out results.json [--tokens 24] [--gpu-cap 22GiB] [--gpus 2]

1. Measures the machine: GPU copy bandwidth, pinned host→GPU copy, CPU read bandwidth, disk read.
2. For each placement (everything on the GPU; then plans for a capped GPU with all three tiers serving experts),
   decodes greedily and reports tok/s, the bytes each tier served per token (counted by the runtime), the tier
   roofline (those bytes over each tier's measured bandwidth), and the plan's prediction made from the same
   measured bandwidths.
3. Expert-cache hit rates for device caches from 5% to 50% of the experts.

With ``--gpus N`` the tiered plans are made for N GPUs of ``--gpu-cap`` each (layers split into pipeline stages
over the first N cards, each card's allocator capped at its plan), and every run's greedy tokens are compared
with those of the all-on-one-GPU run under the same routing draws.

Disk-tier experts are evicted from the page cache after each read (posix_fadvise DONTNEED): on a machine whose
RAM could cache the whole file this emulates a box whose RAM cannot, so "disk" bytes really come from the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tierlm  # noqa: E402
from tierlm.plan import make_hardware, make_plan  # noqa: E402
from tierlm.plan.command import resolve_model  # noqa: E402
from tierlm.runtime.experts import TieredExperts  # noqa: E402
from tierlm.runtime.generate import generate_batch  # noqa: E402
from tierlm.runtime.placement import DeviceMap, Placement  # noqa: E402
from tierlm.runtime.planned import cap_gpu_memory  # noqa: E402
from tierlm.runtime.sampling import SamplingParams  # noqa: E402

GB = 1e9


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timeit(fn, reps=5) -> float:
    fn()
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


def disk_read_gbps(path: Path, nbytes: int = 2 << 30) -> float:
    """The file's read speed from the disk: the better of 64 MB sequential reads and 8 MB reads at random
    offsets on 8 threads (the runtime's disk reader's pattern), each over ``nbytes`` dropped from the page
    cache first. A virtual disk's single-stream speed varies run to run; parallel reads are steadier."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    from tierlm.runtime.experts import pread_into

    fd = os.open(path, os.O_RDONLY)
    size = os.fstat(fd).st_size

    def read(off: int, n: int) -> None:
        pread_into(fd, off, torch.empty(n, dtype=torch.uint8))

    n = min(size, nbytes)
    os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
    t = time.perf_counter()
    for off in range(0, n - (64 << 20) + 1, 64 << 20):
        read(off, 64 << 20)
    seq = (n // (64 << 20) * (64 << 20)) / (time.perf_counter() - t) / GB
    rng = random.Random(0)
    offs = [rng.randrange(0, size - (8 << 20)) // 4096 * 4096 for _ in range(n // (8 << 20))]
    os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
    t = time.perf_counter()
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda o: read(o, 8 << 20), offs))
    par = len(offs) * (8 << 20) / (time.perf_counter() - t) / GB
    os.close(fd)
    return max(seq, par)


def measure(gguf: Path) -> dict:
    n = 1 << 30 if DEVICE == "cuda" else 1 << 28
    a = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    gpu = 2 * n / timeit(lambda: b.copy_(a)) / GB  # read + write bytes
    h = torch.empty(n // 4, dtype=torch.uint8, pin_memory=DEVICE == "cuda")
    pcie = h.numel() / timeit(lambda: a[: h.numel()].copy_(h, non_blocking=True)) / GB
    c = torch.ones(n // 4, dtype=torch.float32)
    t = time.perf_counter()
    for _ in range(5):
        c.sum()
    cpu = 5 * c.numel() * 4 / (time.perf_counter() - t) / GB
    disk = disk_read_gbps(gguf)
    del a, b, h, c
    empty_cache()
    return {"gpu_copy_gbps": gpu, "pcie_h2d_gbps": pcie, "cpu_read_gbps": cpu, "disk_read_gbps": disk,
            "threads": torch.get_num_threads()}


def empty_cache() -> None:
    import gc

    gc.collect()  # the tiered layers link to each other: free a model's GPU memory before the next loads
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def evict_disk_reads() -> None:
    """After a disk-tier expert is computed, drop its pages so the next use reads the disk again: first this
    process's mapping of them (madvise DONTNEED: the page cache keeps pages that are mapped), then the page
    cache (posix_fadvise DONTNEED)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    original = TieredExperts.forward

    def unmap(t: torch.Tensor) -> None:
        start = t.data_ptr() // page * page
        end = -(-(t.data_ptr() + t.numel()) // page) * page
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED

    def forward(self, x, ids, weights):
        out = original(self, x, ids, weights)
        for e in self.last_ids:
            h = self.host.get(e)
            if h is not None and h.tier == "disk" and self.slot_of[e] < 0:
                for m in h.mats:
                    unmap(m)
                for fd, off, nbytes in h.extents:
                    os.posix_fadvise(fd, off, nbytes, os.POSIX_FADV_DONTNEED)
        return out

    TieredExperts.forward = forward


ROUTE = {"main": torch.Generator(), "guess": torch.Generator(), "in_guess": False}


def random_routing() -> None:
    """Route each token to K experts drawn uniformly at random. A synthetic file's random blocks share one mean,
    so its hidden states point one way and any router sends every token to the same experts, which any cache
    holds; uniform draws are what the planner assumes without a routing profile. Expert compute stays real.
    The prefetcher's look-ahead calls of the next router draw from their own generator, so every placement
    sees the same routing sequence (``decode`` reseeds both) and their tokens can be compared."""
    from tierlm.model.moe import Gate

    def forward(self, x):
        N, E, K = x.shape[0], self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        g = ROUTE["guess"] if ROUTE["in_guess"] else ROUTE["main"]
        ids = torch.rand(N, E, generator=g).topk(K, dim=-1).indices.to(x.device)
        weights = torch.full((N, K), self.cfg.routed_scaling_factor / K, device=x.device)
        return ids, weights

    Gate.forward = forward
    original = TieredExperts._prefetch_next

    def prefetch_next(self, x):
        ROUTE["in_guess"] = True
        try:
            original(self, x)
        finally:
            ROUTE["in_guess"] = False

    TieredExperts._prefetch_next = prefetch_next


def storage_read_bytes() -> int:
    """Bytes this process has caused to be read from storage (Linux /proc/self/io; 0 elsewhere): the disk
    traffic of used experts, of prefetch hints (the kernel's readahead runs in this process) and of faults."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def decode(model, tokens: int, prompt_len: int = 32) -> dict:
    ids = list(range(1000, 1000 + prompt_len))
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    list(generate_batch(model, [ids], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)))  # warm-up
    ROUTE["main"].manual_seed(0)
    ROUTE["guess"].manual_seed(1)
    sync()
    t0, times, toks, io0 = time.perf_counter(), [], [], 0
    for ev in generate_batch(model, [ids], params):
        sync()
        times.append(time.perf_counter())
        toks.append(ev)
        if len(times) == 1:  # the prompt is done: from here on, decode steps alone are counted
            io0 = storage_read_bytes()
            if model.expert_stats is not None:
                model.expert_stats.reset()
    steps = len(times) - 1
    out = {"decode_tok_s": steps / (times[-1] - times[0]), "ttft_s": times[0] - t0, "tokens": token_ids(toks),
           "storage_read_bytes_per_token": (storage_read_bytes() - io0) / steps}
    if model.expert_stats is not None:
        s = model.expert_stats.as_dict()
        out.update(hit_rate=s["hit_rate"], expert_bytes_per_token=s["bytes_per_token"],
                   promotions=s["promotions"], prefetched=s["prefetched"], prefetch_used=s["prefetch_used"],
                   bytes_prefetched_per_token=s["bytes_prefetched"] / max(s["tokens"], 1))
    return out


def position_logits(model, n: int = 16) -> torch.Tensor:
    """Float32 logits (n, V) of every position of a fixed n-token prompt, under a fixed routing draw. The
    synthetic weights make every greedy token the same id, but the logit vectors still differ from position
    to position, so placements are compared on them."""
    ROUTE["main"].manual_seed(2)
    ROUTE["guess"].manual_seed(3)
    return model.logits(list(range(2000, 2000 + n))).float().cpu()


def compare_logits(got: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"logits_rel_diff": ((got - ref).norm() / ref.norm()).item(),
            "logits_argmax_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def profiled(fn, top: int = 30) -> list[str]:
    """The ``top`` functions by own time while ``fn`` runs (cProfile; its overhead inflates Python-heavy lines)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    root = str(Path(__file__).resolve().parent.parent) + os.sep
    return [line.replace(root, "") for line in text.getvalue().splitlines() if line.strip()]


def token_ids(steps) -> list[int]:
    """The token ids of generate_batch's steps (lists of TokenEvent)."""
    return [ev.token_id for step in steps for ev in step]


def always_active_bytes(model) -> int:
    """Bytes of the weights every token reads: all but the routed experts and the embedding table (one row)."""
    n = 0
    for name, t in list(model.module.named_parameters()) + list(model.module.named_buffers()):
        if ".experts." not in name and "embed_tokens" not in name:
            n += t.numel() * t.element_size()
    return n


def expert_bytes(model) -> int:
    """Bytes of one routed expert (gate + up + down) as stored."""
    cfg = model.config
    total = sum(t.numel() for n, t in model.module.named_buffers() if ".experts." in n)
    return total // (len(cfg.moe_layers) * cfg.n_routed_experts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--gpu-cap", default="22GiB")
    ap.add_argument("--ram-caps", default="8GiB,3GiB", help="RAM budgets of the tiered runs")
    ap.add_argument("--no-cache-sweep", action="store_true", help="skip the expert-cache hit-rate runs")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run (the GPU tier is then the CPU)")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs (each capped at --gpu-cap) in the tiered plans")
    ap.add_argument("--profile", action="store_true",
                    help="after each tiered run, decode a few more tokens under cProfile and keep the top functions")
    ap.add_argument("--prefetch", choices=("adaptive", "always"), default="adaptive",
                    help="always: take every prefetch hint, however rarely the hinted experts are used")
    args = ap.parse_args()
    if args.prefetch == "always":
        import tierlm.runtime.experts as experts_mod

        experts_mod.PREFETCH_MIN_PRECISION = 0.0
    global DEVICE
    DEVICE = args.device
    path = Path(args.gguf)
    report = {"card": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "command": " ".join(sys.argv), "model": path.name, "runs": []}

    def save():
        Path(args.out).write_text(json.dumps(report, indent=1))

    random_routing()
    bw = measure(path)
    report["bandwidth"] = bw
    print("bandwidth", bw, flush=True)
    save()

    base = tierlm.load(path, device=DEVICE, dtype="bfloat16" if DEVICE == "cuda" else "float32")
    r = decode(base, args.tokens)
    ref_tokens = r["tokens"]
    ref_logits = position_logits(base)
    # how much the reference's logit vectors differ between positions: what the comparisons below can resolve
    r["logits_position_spread"] = ((ref_logits - ref_logits.mean(0)).norm() / ref_logits.norm()).item()
    cfg = base.config
    per_token = always_active_bytes(base) + len(cfg.moe_layers) * cfg.num_experts_per_tok * expert_bytes(base)
    r.update(placement="all on the GPU", bytes_per_token=per_token,
             roofline_tok_s=bw["gpu_copy_gbps"] * GB / per_token)  # copy GB/s (read + write bytes), as in kernels.py
    r["roofline_fraction"] = r["decode_tok_s"] / r["roofline_tok_s"]
    report["runs"].append(r)
    print(r, flush=True)
    save()
    del base
    empty_cache()

    evict_disk_reads()
    config, tensors, name, _ = resolve_model(str(path), None)
    for ram in args.ram_caps.split(","):
        gpus = ",".join([args.gpu_cap] * args.gpus)
        hw = make_hardware(gpus=gpus if DEVICE == "cuda" else "0", ram=ram, disk_gbps=bw["disk_read_gbps"],
                           gpu_gbps=bw["gpu_copy_gbps"], pcie_gbps=bw["pcie_h2d_gbps"],
                           ram_gbps=bw["cpu_read_gbps"])
        plan = make_plan(config, hardware=hw, tensors=tensors, name=name, ctx=4096)
        if not plan.fits:
            report["runs"].append({"placement": f"{args.gpus}x gpu {args.gpu_cap} + ram {ram}", "fits": False,
                                   "problems": plan.problems})
            print(report["runs"][-1], flush=True)
            save()
            continue
        device = DeviceMap.from_plan(plan, config.num_hidden_layers) if DEVICE == "cuda" else DEVICE
        if DEVICE == "cuda":
            cap_gpu_memory(plan)
        model = tierlm.load(path, device=device, dtype="bfloat16" if DEVICE == "cuda" else "float32",
                            placement=Placement.from_plan(plan))
        r = decode(model, args.tokens)
        r["same_tokens"] = r["tokens"] == ref_tokens
        r["tokens_matching_prefix"] = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref_tokens)) if a != b),
                                           min(len(r["tokens"]), len(ref_tokens)))
        r["devices"] = sorted(set(device.layers)) if DEVICE == "cuda" else [DEVICE]
        r.update(compare_logits(position_logits(model), ref_logits))
        pred = plan.predicted
        tiers = {"device": bw["gpu_copy_gbps"], "ram": bw["cpu_read_gbps"], "disk": bw["disk_read_gbps"]}
        eb = r["expert_bytes_per_token"]
        aa_t = always_active_bytes(model)
        roof_s = aa_t / (tiers["device"] * GB) + sum(eb[t] / (tiers[t] * GB) for t in ("device", "ram", "disk"))
        # the runs decode one sequence: compare with the plan's single-sequence figure, not its batch throughput
        r.update(placement=f"{args.gpus}x gpu {args.gpu_cap} + ram {ram} + disk", experts=plan.expert_counts(),
                 predicted_decode_tok_s=pred["decode_tok_s_single"], predicted_bottleneck=pred["bottleneck_single"],
                 plan_batch=pred["decode_batch"], predicted_batch_tok_s=pred["decode_tok_s"],
                 roofline_tok_s=1 / roof_s)
        r["roofline_fraction"] = r["decode_tok_s"] / r["roofline_tok_s"]
        r["prediction_error"] = pred["decode_tok_s_single"] / r["decode_tok_s"] - 1
        if args.profile:
            r["profile"] = profiled(lambda: decode(model, 4))
        report["runs"].append(r)
        print(r, flush=True)
        save()
        del model
        empty_cache()

    if DEVICE == "cuda":  # the cache sweep below runs on one uncapped GPU
        for i in range(torch.cuda.device_count()):
            torch.cuda.set_per_process_memory_fraction(1.0, i)

    # Expert-cache hit rates: a device cache of f·E experts per layer, the rest in RAM.
    report["cache"] = []
    for f in () if args.no_cache_sweep else (0.05, 0.1, 0.25, 0.5):
        model = tierlm.load(path, device=DEVICE, dtype="bfloat16" if DEVICE == "cuda" else "float32", placement=Placement.by_fraction(config, f, 1 - f))
        r = decode(model, max(8, args.tokens // 2))
        report["cache"].append({"device_fraction": f, "hit_rate_device": r["hit_rate"]["device"],
                                "decode_tok_s": r["decode_tok_s"], "promotions": r["promotions"]})
        print(report["cache"][-1], flush=True)
        save()
        del model
        empty_cache()


if __name__ == "__main__":
    main()
