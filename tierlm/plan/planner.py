"""Placement: which GPU runs which layers, where every routed expert lives, how much context fits.

1. Always-active weights (attention, norms, router, dense FFNs, shared experts, embedding, head) and the KV cache
   go to the GPUs as pipeline stages: contiguous layers per GPU, embedding on the first, head on the last,
   balanced so every GPU is equally full relative to its room (``_partition``).
2. The context (and batch) come from what is left, unless fixed: the KV cache may take ``KV_FRACTION`` of the GPU
   memory left after the always-active weights; the rest caches experts.
3. Routed experts are ranked by expected use — uniform, or from a routing profile (``load_profile``) — and filled
   into each GPU (experts of that GPU's own layers), then into pinned RAM, then left on disk (memory-mapped).
4. With no GPU, always-active weights, KV cache and the hottest experts go to RAM; the rest stay on disk.

Nothing here touches a device: the plan is data (see ``report.py`` for its JSON form).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from tierlm.config import ModelConfig
from tierlm.plan.cost import DECODE_CONTEXT, EFFICIENCIES, Layout, decode_cost, prefill_cost
from tierlm.plan.hardware import GiB, Hardware, PlanError, make_hardware
from tierlm.plan.inventory import Inventory, inventory_from_records, recipe_inventory
from tierlm.plan.memory import (KV_DTYPE_BYTES, RAM_RESERVE_FRACTION, RAM_RESERVE_MIN, gpu_overhead_bytes,
                                kv_bytes_per_token, kv_bytes_per_token_layer, ram_reserve_bytes, staging_bytes,
                                workspace_bytes)
from tierlm.plan.report import Device, LayerExperts, Plan, size_text

KV_FRACTION = 0.25        # share of the memory left after always-active weights that an automatic context may take
DEFAULT_CTX = 32768       # automatic context: this (or the model's maximum if smaller), halved until it fits
MIN_CTX = 2048
MAX_AUTO_BATCH = 8        # with --ctx fixed and no --batch: as many sequences as the KV share holds, at most this
SMALLER = {"F16": "Q8_0", "BF16": "Q8_0", "FP8": "Q8_0", "Q8_0": "Q4_K_M", "Q4_K_M": "Q3_K_M", "Q3_K_M": "Q2_K"}


# ---- routing profiles ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoutingProfile:
    """How often each routed expert was chosen: ``counts[layer][expert]`` (any scale; only ratios matter)."""

    counts: dict[int, list[float]]
    source: str = "profile"


def profile_from_dict(d: object, source: str = "profile") -> RoutingProfile:
    """Accepts ``{"layers": {"3": [c0, c1, ...]}}``, the inner mapping alone, per-layer ``{"expert": count}``
    mappings, or a list of ``[layer, expert, count]`` / ``{"layer", "expert", "count"}`` records."""
    sparse: dict[int, dict[int, float]] = {}
    try:
        if isinstance(d, dict) and "layers" in d:
            d = d["layers"]
        if isinstance(d, dict):
            for layer, row in d.items():
                items = row.items() if isinstance(row, dict) else enumerate(row)
                sparse[int(layer)] = {int(e): float(c) for e, c in items}
        elif isinstance(d, list):
            for rec in d:
                layer, e, c = (rec["layer"], rec["expert"], rec["count"]) if isinstance(rec, dict) else rec
                sparse.setdefault(int(layer), {})[int(e)] = sparse.get(int(layer), {}).get(int(e), 0.0) + float(c)
        else:
            raise TypeError("not a mapping or list")
    except (TypeError, ValueError, KeyError) as e:
        raise PlanError(f"routing profile {source}: not a per-(layer, expert) count table ({e}); write "
                        '{"layers": {"3": [count of expert 0, count of expert 1, ...], ...}}') from None
    counts = {}
    for layer, row in sparse.items():
        bad = [c for c in row.values() if not math.isfinite(c) or c < 0]
        if bad or any(e < 0 for e in row):
            raise PlanError(f"routing profile {source}: layer {layer} has a negative or non-finite entry")
        n = max(row, default=-1) + 1
        counts[layer] = [row.get(e, 0.0) for e in range(n)]
    return RoutingProfile(counts, source)


def load_profile(path: str | Path) -> RoutingProfile:
    """Read a routing profile JSON file (see ``profile_from_dict`` for the accepted layouts)."""
    try:
        return profile_from_dict(json.loads(Path(path).read_text()), str(path))
    except FileNotFoundError:
        raise PlanError(f"routing profile {path} not found") from None
    except json.JSONDecodeError as e:
        raise PlanError(f"routing profile {path} is not valid JSON ({e})") from None


def recorded_profile_path(model_path: str | Path) -> Path:
    """Where ``--record-profile`` saves a model's routing profile: beside it (``X.gguf`` → ``X.gguf.routing.json``,
    a checkpoint folder → ``folder/routing.json``)."""
    p = Path(model_path)
    return (p / "routing.json") if p.is_dir() else p.with_name(p.name + ".routing.json")


def default_profile(model_path: str | Path | None) -> RoutingProfile | None:
    """The profile recorded beside the model, if there is one."""
    if model_path is None:
        return None
    p = recorded_profile_path(model_path)
    return load_profile(p) if p.exists() else None


def expert_usage(config: ModelConfig, profile: RoutingProfile | None) -> dict[int, list[float]]:
    """Expected uses per token of each routed expert (sums to top-k per layer); uniform where not profiled."""
    E, k = config.n_routed_experts, config.num_experts_per_tok
    usage = {i: [k / E] * E for i in config.moe_layers}
    for layer, row in (profile.counts.items() if profile else ()):
        if layer not in usage:
            raise PlanError(f"routing profile {profile.source}: layer {layer} is not a MoE layer of this model "
                            f"(MoE layers: {config.moe_layers[0]}..{config.moe_layers[-1]})")
        if len(row) > E:
            raise PlanError(f"routing profile {profile.source}: layer {layer} names expert {len(row) - 1}, but the "
                            f"model has {E} routed experts per layer")
        total = sum(row)
        if total > 0:
            usage[layer] = [min(1.0, k * c / total) for c in row] + [0.0] * (E - len(row))
    return usage


# ---- placement -------------------------------------------------------------------------------------------------
def _partition(weights: list[int], first: int, last: int, caps: list[int]) -> list[tuple[int, int]] | None:
    """Contiguous layer ranges per GPU (``first``/``last``: embedding and head bytes on the first/last GPU).

    Cuts where each GPU's share of the load matches its share of the room; if that overfills a GPU (a very
    uneven set of cards), the cut minimising the fullest GPU's load/room ratio instead. None if nothing fits."""
    n, g_count = len(weights), len(caps)

    def loads(stages: list[tuple[int, int]]) -> list[int]:
        return [sum(weights[a:b]) + (first if g == 0 else 0) + (last if g == g_count - 1 else 0)
                for g, (a, b) in enumerate(stages)]

    total, room = first + last + sum(weights), sum(caps)
    cuts, acc, i = [0], first, 0
    for g in range(g_count - 1):
        target = total * sum(caps[:g + 1]) / room
        while i < n and abs(acc + weights[i] - target) <= abs(acc - target):
            acc += weights[i]
            i += 1
        cuts.append(i)
    stages = list(itertools.pairwise([*cuts, n]))
    if all(ld <= cap for ld, cap in zip(loads(stages), caps)):
        return stages

    def assign(r: float) -> list[tuple[int, int]] | None:
        out, i = [], 0
        for g, cap in enumerate(caps):
            load, start = (first if g == 0 else 0) + (last if g == g_count - 1 else 0), i
            if g == g_count - 1:
                load += sum(weights[i:])
                i = n
            else:
                while i < n and load + weights[i] <= r * cap:
                    load += weights[i]
                    i += 1
            if load > r * cap:
                return None
            out.append((start, i))
        return out

    if assign(1.0) is None:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if assign(mid) is not None else (mid, hi)
    return assign(hi)


def _choose_ctx_batch(config: ModelConfig, kv_per_token: int, budget: float, ctx: int | None,
                      batch: int | None) -> tuple[int, int]:
    if ctx is None:
        b = batch or 1
        c = min(config.max_position_embeddings, DEFAULT_CTX)
        while c > MIN_CTX and b * c * kv_per_token > budget:
            c //= 2
        return max(c, min(MIN_CTX, config.max_position_embeddings)), b
    if batch is None:
        return ctx, int(max(1, min(MAX_AUTO_BATCH, budget // max(ctx * kv_per_token, 1))))
    return ctx, batch


def make_plan(config: ModelConfig, recipe: str = "Q4_K_M", hardware: Hardware | None = None,
              ctx: int | None = None, batch: int | None = None, profile: RoutingProfile | None = None,
              tensors: list | None = None, name: str | None = None, suggest: bool = True) -> Plan:
    """Plan ``config`` at ``recipe`` (or the checkpoint's own ``tensors``) on ``hardware`` (None: detect).

    ``ctx``/``batch`` fix the context per sequence and the sequences decoded together; left None, they are
    chosen from the memory that remains. A plan that does not fit says why in ``problems`` and what would fit
    in ``suggestions``.
    """
    if ctx is not None and ctx < 1 or batch is not None and batch < 1:
        raise PlanError(f"context ({ctx}) and batch ({batch}) must be positive")
    inv = inventory_from_records(tensors, config) if tensors is not None else recipe_inventory(config, recipe)
    hw = hardware if hardware is not None else make_hardware()
    usage = expert_usage(config, profile)
    ebytes = inv.expert_bytes()
    n_layers = config.num_hidden_layers
    problems: list[str] = []
    if ctx is not None and ctx > config.max_position_embeddings:
        problems.append(f"context {ctx} exceeds the model's maximum ({config.max_position_embeddings} tokens)")

    layer_w = [0] * n_layers
    embed = head = 0
    for t in inv.always_active():
        if t.role == "embed":
            embed += t.nbytes
        elif t.layer is None:
            head += t.nbytes
        else:
            layer_w[t.layer] += t.nbytes
    aa_total = embed + head + sum(layer_w)
    experts_total = sum(sum(v) for v in ebytes.values())
    max_expert = max((max(v) for v in ebytes.values()), default=0)
    kvpt, kv_layer = kv_bytes_per_token(config), kv_bytes_per_token_layer(config)
    ws = workspace_bytes(config, inv, batch or 1, ctx or config.max_position_embeddings)
    gpus = hw.gpus
    reserve = ram_reserve_bytes(hw.ram_total_bytes)
    ram_staging = staging_bytes(config, max_expert) if experts_total else 0

    # Memory left after always-active weights, on the GPUs (or in RAM without GPUs): the KV share comes from it.
    if gpus:
        over = [gpu_overhead_bytes(g.total_bytes) for g in gpus]
        staging = staging_bytes(config, max_expert)
        room0 = [g.memory_bytes - o - ws["total"] for g, o in zip(gpus, over)]
        if sum(room0) - aa_total >= experts_total:
            staging = 0  # every expert will sit on a GPU: nothing is streamed in
        room = [r - staging for r in room0]
        left = sum(room) - aa_total
    else:
        left = hw.ram_bytes - reserve - ram_staging - ws["total"] - aa_total
    ctx, batch = _choose_ctx_batch(config, kvpt, KV_FRACTION * max(left, 0), ctx, batch)
    ws = workspace_bytes(config, inv, batch, ctx)
    kv_total = kvpt * ctx * batch

    stage_of_layer: list[int | None] = [None] * n_layers
    devices: list[Device] = []
    tier = {i: ["disk"] * len(ebytes[i]) for i in ebytes}
    # Hottest first; ties (uniform routing) interleave layers, so every layer keeps a share of each tier.
    ranked = [(i, e) for _, e, i in sorted((-p, e, i) for i in usage for e, p in enumerate(usage[i]))]
    if gpus:
        room = [g.memory_bytes - o - ws["total"] - staging for g, o in zip(gpus, over)]
        weights = [w + kv_layer * ctx * batch for w in layer_w]
        stages = _partition(weights, embed, head, room)
        if stages is None:
            problems.append(f"the always-active weights ({size_text(aa_total)}) and the KV cache for {ctx} tokens × "
                            f"{batch} ({size_text(kv_total)}) do not fit in the GPUs' usable "
                            f"{size_text(max(sum(room), 0))} (after CUDA context, margin and workspace)")
            stages = _even_stages(n_layers, len(gpus))
        for g, (a, b) in enumerate(stages):
            for i in range(a, b):
                stage_of_layer[i] = g
        for g, gpu in enumerate(gpus):
            a, b = stages[g]
            holds = (["embed"] if g == 0 else []) + (["head"] if g == len(gpus) - 1 else [])
            fixed = sum(layer_w[a:b]) + (embed if g == 0 else 0) + (head if g == len(gpus) - 1 else 0)
            kv = kv_layer * ctx * batch * (b - a)
            free = room[g] - fixed - kv
            used_experts = 0
            for i, e in ranked:
                if a <= i < b and ebytes[i][e] <= free:
                    tier[i][e] = "gpu"
                    free -= ebytes[i][e]
                    used_experts += ebytes[i][e]
            parts = {"weights": fixed, "experts": used_experts, "kv": kv, "workspace": ws["total"],
                     "staging": staging, "overhead": over[g]}
            devices.append(Device(f"cuda:{g}", "gpu", gpu.name, gpu.memory_bytes, sum(parts.values()), parts,
                                  gpu.mem_gbps, [a, b], holds))
        ram_fixed = {"reserve": reserve, "staging": ram_staging}
    else:
        ram_fixed = {"reserve": reserve, "staging": ram_staging, "weights": aa_total, "kv": kv_total,
                     "workspace": ws["total"]}
    ram_free = hw.ram_bytes - sum(ram_fixed.values())
    if ram_free < 0:
        problems.append(f"RAM ({size_text(hw.ram_bytes)}) is smaller than the {size_text(sum(ram_fixed.values()))} needed "
                        f"before any expert is placed ({', '.join(f'{k} {size_text(v)}' for k, v in ram_fixed.items())})")
    ram_experts = 0
    for i, e in ranked:
        if tier[i][e] == "disk" and ebytes[i][e] <= ram_free:
            tier[i][e] = "ram"
            ram_free -= ebytes[i][e]
            ram_experts += ebytes[i][e]
    ram_parts = {**ram_fixed, "experts": ram_experts}
    devices.append(Device("cpu", "cpu", "RAM", hw.ram_bytes, sum(ram_parts.values()), ram_parts, hw.ram_gbps,
                          None if gpus else [0, n_layers], [] if gpus else ["embed", "head"]))
    disk_experts = sum(ebytes[i][e] for i in tier for e, t in enumerate(tier[i]) if t == "disk")
    devices.append(Device("disk", "disk", "checkpoint (memory-mapped)", inv.total_bytes(include_mtp=True),
                          disk_experts, {"experts": disk_experts}, hw.disk_gbps))
    if kv_total > 0 and ctx * batch * kvpt > 0 and not gpus and ram_free < 0 and not problems:
        problems.append("the KV cache does not fit in RAM")

    layout = Layout(stage_of_layer, len(gpus) - 1 if gpus else None, 0 if gpus else None, tier, usage, ebytes)
    single = decode_cost(config, inv, hw, layout, 1, min(ctx, DECODE_CONTEXT))  # one sequence alone, same layout
    predicted = {**decode_cost(config, inv, hw, layout, batch, min(ctx, DECODE_CONTEXT)),
                 "decode_tok_s_single": single["decode_tok_s"], "bottleneck_single": single["bottleneck"],
                 **prefill_cost(config, inv, hw, layout, ctx), "efficiencies": dict(EFFICIENCIES)}
    layers = [LayerExperts(i, f"cuda:{stage_of_layer[i]}" if stage_of_layer[i] is not None else "cpu",
                           *[[e for e, t in enumerate(tier[i]) if t == want] for want in ("gpu", "ram", "disk")])
              for i in sorted(tier)]
    plan = Plan(
        fits=not problems,
        model=_model_info(config, name, inv),
        quant=_quant_info(inv, aa_total, experts_total),
        hardware=hw, devices=devices, experts=layers,
        kv={"bytes_per_token": kvpt, "context": ctx, "batch": batch, "dtype": "f16" if KV_DTYPE_BYTES == 2 else "f32",
            "bytes": kv_total},
        workspace={**ws, "batch": batch},
        predicted=predicted,
        profile=profile.source if profile else None,
        problems=problems,
        assumptions=list(hw.assumptions),
    )
    if suggest:
        plan.suggestions = suggestions(plan, config, recipe, hw, ctx, batch, profile, tensors, name)
    return plan


def _even_stages(n: int, g: int) -> list[tuple[int, int]]:
    cuts = [round(k * n / g) for k in range(g + 1)]
    return list(itertools.pairwise(cuts))


def _model_info(config: ModelConfig, name: str | None, inv: Inventory) -> dict:
    return {"name": name or config.model_type, "model_type": config.model_type, "config": config.to_hf(),
            "params": inv.numel(), "num_hidden_layers": config.num_hidden_layers, "moe_layers": len(config.moe_layers),
            "routed_experts": config.n_routed_experts, "experts_per_token": config.num_experts_per_tok}


def _quant_info(inv: Inventory, aa: int, experts: int) -> dict:
    total = inv.total_bytes()
    types = inv.bytes_by_type()
    label = inv.recipe or f"checkpoint (mostly {next(iter(types), '?')})"
    return {"recipe": label, "source": inv.source, "total_bytes": total,
            "always_active_bytes": aa, "routed_expert_bytes": experts,
            "skipped_bytes": inv.total_bytes(include_mtp=True) - total,
            "bits_per_weight": 8 * total / max(inv.numel(), 1), "types": types}


def suggestions(plan: Plan, config: ModelConfig, recipe: str, hw: Hardware, ctx: int, batch: int,
                profile: RoutingProfile | None, tensors: list | None, name: str | None) -> list[str]:
    """What would make a plan fit, or (when it fits) what would make it faster."""
    out: list[str] = []

    def again(**kw) -> Plan:
        args = {"recipe": recipe, "hardware": hw, "ctx": ctx, "batch": batch, "profile": profile,
                "tensors": tensors, "name": name}
        return make_plan(config, **{**args, **kw}, suggest=False)

    speed = plan.predicted["decode_tok_s"]
    if not plan.fits:
        r = recipe.upper() if tensors is None else None
        while r in SMALLER:
            r = SMALLER[r]
            p = again(recipe=r)
            if p.fits:
                out.append(f"use a smaller quantization: --quant {r} ({p.quant['total_bytes'] / 1e9:.1f} GB) fits, "
                           f"predicted {p.predicted['decode_tok_s']:.2f} tok/s")
                break
        c = ctx
        while c > 256:
            c //= 2
            if again(ctx=c).fits:
                out.append(f"use a shorter context: --ctx {c} fits")
                break
        if hw.gpus and again(hardware=replace(hw, gpus=())).fits:
            out.append("plan for the CPU alone (--gpus 0): it fits in RAM and on disk")
        ram_need = plan.devices[-2].used_bytes - hw.ram_bytes
        if ram_need > 0:
            more = _round_gib(hw.ram_total_bytes + ram_need)
            out.append(f"add RAM: --ram {more}GiB is enough for the weights that must be in RAM")
        if hw.gpus and not out:
            out.append("add GPU memory: the always-active weights and the KV cache must fit on the GPUs")
    elif plan.expert_counts()["disk"]:
        disk = plan.devices[-1].used_bytes
        ram = plan.devices[-2]
        need = ram.used_bytes - ram.parts["reserve"] + disk  # everything in RAM now, plus the disk experts
        more = _round_gib(max(need + RAM_RESERVE_MIN, need / (1 - RAM_RESERVE_FRACTION)))
        bigger = replace(hw, ram_bytes=hw.ram_bytes + more * GiB - hw.ram_total_bytes, ram_total_bytes=more * GiB)
        p = again(hardware=bigger)
        if not p.expert_counts()["disk"]:
            out.append(f"{plan.expert_counts()['disk']} experts ({disk / 1e9:.0f} GB) are read from disk each time "
                       f"they are used; with --ram {more}GiB none would be: predicted "
                       f"{p.predicted['decode_tok_s']:.2f} tok/s instead of {speed:.2f}")
        r = SMALLER.get(recipe.upper()) if tensors is None else None
        if r:
            p = again(recipe=r)
            if p.fits and p.predicted["decode_tok_s"] > 1.2 * speed:
                out.append(f"--quant {r} would put fewer experts on disk: predicted "
                           f"{p.predicted['decode_tok_s']:.2f} tok/s (at lower quality)")
    return out


def _round_gib(n: float) -> int:
    """Round up to a size RAM is sold in (a multiple of 16 GiB)."""
    return int(math.ceil(n / (16 * GiB)) * 16)
