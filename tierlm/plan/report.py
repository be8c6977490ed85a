"""A plan as text for people and as JSON for programs (``tierlm plan --json``; ``run``/``serve --plan``).

JSON schema, version 1 (stable: fields are only ever added; ``docs/plan-schema.md`` has the full description).
Bytes are integers, bandwidths GB/s (10⁹ B/s), times seconds.

    schema        "tierlm.plan"          version      1
    fits          bool: every tensor, the KV cache and the workspaces have a place
    model         {name, model_type, config (HF config.json dict), params, num_hidden_layers, moe_layers,
                   routed_experts, experts_per_token}
    quant         {recipe, source ("recipe"|"checkpoint"), total_bytes, always_active_bytes, routed_expert_bytes,
                   skipped_bytes (MTP), bits_per_weight, types {type: bytes}}
    hardware      {gpus [{name, memory_bytes, total_bytes, mem_gbps, pcie_gbps, fp16_tflops, compute_cap}],
                   ram_bytes, ram_total_bytes, ram_gbps, disk_gbps, cpu_cores, cpu_gflops, source, assumptions}
    devices       [{name ("cuda:N"|"cpu"|"disk"), kind ("gpu"|"cpu"|"disk"), model, capacity_bytes, used_bytes,
                    free_bytes, bandwidth_gbps, layers ([first, end) or null), holds (["embed"], ["head"]),
                    parts {weights, experts, kv, workspace, staging, overhead | reserve: bytes}}]
                  (disk: capacity_bytes is the checkpoint's size, used_bytes the experts read from it)
    experts       {gpu, ram, disk, total: counts; bytes {gpu, ram, disk}; profile (path or null);
                   layers [{layer, device, gpu [expert ids], ram [ids], disk [ids]}]}
    kv            {bytes_per_token, context, batch, dtype, bytes}
    workspace     {hidden, attention, ffn, dequant, logits, total, batch}
    predicted     {decode_tok_s, decode_tok_s_single, decode_tok_s_overlapped, decode_roofline_tok_s, decode_batch, decode_context,
                   bytes_per_token, bottleneck ("gpu"|"cpu"|"disk"|"overhead"), bottleneck_device,
                   tiers [{tier, bytes_per_token, gbps, seconds_per_token, share}],
                   prefill_tok_s, prefill_tokens, time_to_first_token_s, prefill_bottleneck,
                   prefill_floors_s {compute_s, pcie_s, disk_s, ram_s}, efficiencies {…}}
    problems      [str]: why it does not fit (empty when it fits)
    suggestions   [str]: what would fit (smaller quant, more RAM, shorter context) or run faster
    assumptions   [str]: every default that stood in for a measurement
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tierlm.config import ModelConfig
from tierlm.errors import TierlmError
from tierlm.plan.hardware import GB, GiB, Hardware, PlanError
from tierlm.plan.inventory import classify

SCHEMA, VERSION = "tierlm.plan", 1


# ---- the plan (built by planner.py) --------------------------------------------------------------------------------------------------
@dataclass
class Device:
    name: str                       # "cuda:0", "cpu", "disk"
    kind: str                       # "gpu", "cpu", "disk"
    model: str
    capacity_bytes: int
    used_bytes: int
    parts: dict[str, int]           # weights, experts, kv, workspace, staging, overhead / reserve
    bandwidth_gbps: float
    layers: list[int] | None = None  # pipeline stage [first, end) of a GPU (or of the CPU when it runs layers)
    holds: list[str] = field(default_factory=list)


@dataclass
class LayerExperts:
    layer: int
    device: str                     # where the layer runs (and its GPU-cached experts live)
    gpu: list[int]
    ram: list[int]
    disk: list[int]


@dataclass
class Plan:
    fits: bool
    model: dict                     # name, HF config, sizes
    quant: dict                     # recipe, bytes, bits per weight, types
    hardware: Hardware
    devices: list[Device]
    experts: list[LayerExperts]
    kv: dict
    workspace: dict
    predicted: dict
    profile: str | None = None
    problems: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    assumptions: list[str] = field(default_factory=list)

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_hf(self.model["config"])

    def expert_counts(self) -> dict[str, int]:
        return {t: sum(len(getattr(le, t)) for le in self.experts) for t in ("gpu", "ram", "disk")}

    def layer_device(self, layer: int | None, role: str = "attn") -> str:
        """The device that runs ``layer`` (embedding: first stage; head and final norm: last stage)."""
        for d in self.devices:
            if role in d.holds:
                return d.name
        for d in self.devices:
            if layer is not None and d.layers and d.layers[0] <= layer < d.layers[1]:
                return d.name
        raise PlanError(f"the plan places no device for layer {layer} ({role})")

    def device_for(self, name: str) -> str:
        """Where tensor ``name`` (GGUF or Hugging Face name) is loaded: a device name, or "skip" (MTP).
        A stacked expert tensor is split: ask ``expert_device`` for each expert."""
        role, layer, expert = classify(name, self.model["num_hidden_layers"])
        if role == "mtp":
            return "skip"
        if role == "routed_expert":
            if expert is None:
                raise PlanError(f"{name} holds all experts of layer {layer}: place each with expert_device()")
            return self.expert_device(layer, expert)
        if role in ("embed", "head") or (role == "norm" and layer is None):
            return self.layer_device(None, "embed" if role == "embed" else "head")
        return self.layer_device(layer)

    def expert_device(self, layer: int, expert: int) -> str:
        for le in self.experts:
            if le.layer == layer:
                if expert in le.gpu:
                    return le.device
                return "cpu" if expert in le.ram else "disk"
        raise PlanError(f"layer {layer} has no routed experts in this plan")


# ---- JSON ---------------------------------------------------------------------------------------------------------


def plan_to_json(plan: Plan) -> dict:
    """The plan as a JSON-ready dict (schema above)."""
    counts = plan.expert_counts()
    by_kind = {"gpu": sum(d.parts.get("experts", 0) for d in plan.devices if d.kind == "gpu"),
               "ram": sum(d.parts.get("experts", 0) for d in plan.devices if d.kind == "cpu"),
               "disk": sum(d.parts.get("experts", 0) for d in plan.devices if d.kind == "disk")}
    return {
        "schema": SCHEMA, "version": VERSION,
        "fits": plan.fits,
        "model": plan.model,
        "quant": plan.quant,
        "hardware": plan.hardware.to_dict(),
        "devices": [{"name": d.name, "kind": d.kind, "model": d.model, "capacity_bytes": d.capacity_bytes,
                     "used_bytes": d.used_bytes, "free_bytes": d.capacity_bytes - d.used_bytes,
                     "bandwidth_gbps": d.bandwidth_gbps, "layers": d.layers, "holds": list(d.holds),
                     "parts": dict(d.parts)} for d in plan.devices],
        "experts": {**counts, "total": sum(counts.values()), "bytes": by_kind, "profile": plan.profile,
                    "layers": [{"layer": le.layer, "device": le.device, "gpu": le.gpu, "ram": le.ram,
                                "disk": le.disk} for le in plan.experts]},
        "kv": plan.kv,
        "workspace": plan.workspace,
        "predicted": plan.predicted,
        "problems": list(plan.problems),
        "suggestions": list(plan.suggestions),
        "assumptions": list(plan.assumptions),
    }


def plan_from_json(d: dict) -> Plan:
    """Read a plan back from its JSON dict (as written by ``plan_to_json``)."""
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise PlanError(f"not a tierlm plan: expected \"schema\": \"{SCHEMA}\"; write one with tierlm plan --json")
    if not isinstance(d.get("version"), int) or d["version"] > VERSION:
        raise PlanError(f"plan version {d.get('version')!r} is newer than this tierlm reads ({VERSION}); "
                        "upgrade tierlm or re-plan")
    try:
        devices = [Device(x["name"], x["kind"], x["model"], int(x["capacity_bytes"]), int(x["used_bytes"]),
                          {k: int(v) for k, v in x["parts"].items()}, float(x["bandwidth_gbps"]),
                          list(x["layers"]) if x.get("layers") is not None else None, list(x.get("holds", [])))
                   for x in d["devices"]]
        experts = [LayerExperts(int(x["layer"]), x["device"], list(x["gpu"]), list(x["ram"]), list(x["disk"]))
                   for x in d["experts"]["layers"]]
        plan = Plan(fits=bool(d["fits"]), model=d["model"], quant=d["quant"],
                    hardware=Hardware.from_dict(d["hardware"]), devices=devices, experts=experts, kv=d["kv"],
                    workspace=d["workspace"], predicted=d["predicted"], profile=d["experts"].get("profile"),
                    problems=list(d.get("problems", [])), suggestions=list(d.get("suggestions", [])),
                    assumptions=list(d.get("assumptions", [])))
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"plan file is malformed: {type(e).__name__} {e}; re-create it with tierlm plan --json") from None
    try:
        ModelConfig.from_hf(plan.model["config"])
    except (TierlmError, KeyError, TypeError) as e:
        raise PlanError(f"plan file: its model config is invalid ({e}); re-create it with tierlm plan --json") from None
    return plan


# ---- text --------------------------------------------------------------------------------------------------------
def size_text(n: float) -> str:
    """Bytes for people: GiB with one decimal, MiB below 1 GiB (so small amounts do not read "0.0 GiB")."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / 2**20:.0f} MiB"


def _gb(n: float) -> str:
    return f"{n / GB:.2f} GB" if n < 10 * GB else f"{n / GB:.1f} GB"


def _rate(x: float) -> str:
    return f"{x:.3g}" if x < 10 else f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def format_plan(plan: Plan) -> str:
    """The plan as a table for the terminal."""
    m, q, kv, pr = plan.model, plan.quant, plan.kv, plan.predicted
    lines = [f"{m['name']} at {q['recipe']}: {'fits' if plan.fits else 'DOES NOT FIT'}", ""]
    lines.append(f"  model     {m['params'] / 1e9:.1f} B parameters, {m['num_hidden_layers']} layers "
                 f"({m['moe_layers']} MoE × {m['routed_experts']} experts, {m['experts_per_token']} per token)")
    lines.append(f"  weights   {_gb(q['total_bytes'])} ({size_text(q['total_bytes'])}), {q['bits_per_weight']:.2f} bits "
                 f"per weight: always-active {_gb(q['always_active_bytes'])}, routed experts "
                 f"{_gb(q['routed_expert_bytes'])}")
    lines.append(f"  context   {kv['context']} tokens × {kv['batch']} sequence(s); KV cache {kv['bytes_per_token']:,} "
                 f"B/token ({kv['dtype']}) = {size_text(kv['bytes'])}")
    lines.append("")
    header = ("device", "model", "layers", "capacity", "used", "weights", "experts", "kv", "work+stage",
              "overhead")
    rows = [header]
    for d in plan.devices:
        p = d.parts
        layers = f"{d.layers[0]}-{d.layers[1] - 1}" if d.layers and d.layers[1] > d.layers[0] else "-"
        if d.holds:
            layers += " +" + "+".join(d.holds)
        rows.append((d.name, d.model[:28], layers, size_text(d.capacity_bytes) if d.kind != "disk" else "-",
                     size_text(d.used_bytes), *(size_text(x) if x else "-" for x in (
                         p.get("weights", 0), p.get("experts", 0), p.get("kv", 0),
                         p.get("workspace", 0) + p.get("staging", 0), p.get("overhead", p.get("reserve", 0))))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        lines.append("  " + "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    counts = plan.expert_counts()
    total = max(sum(counts.values()), 1)
    lines.append("")
    lines.append("  experts   " + "   ".join(f"{t} {n} ({100 * n / total:.1f}%)" for t, n in counts.items())
                 + f"   [{'routing profile ' + plan.profile if plan.profile else 'uniform routing'}]")
    lines.append("")
    lines.append(f"  decode    {_rate(pr['decode_tok_s'])} tok/s (batch {pr['decode_batch']}, {pr['decode_context']} "
                 f"tokens in context; {_rate(pr['decode_tok_s_overlapped'])} if tiers overlapped perfectly) — "
                 f"bottleneck: {pr['bottleneck']}")
    if pr["decode_batch"] > 1 and "decode_tok_s_single" in pr:
        lines.append(f"            {_rate(pr['decode_tok_s_single'])} tok/s for one sequence decoding alone")
    tiers = [("tier", "bytes/token", "GB/s", "ms/token", "share")]
    for t in pr["tiers"]:
        tiers.append((t["tier"], _gb(t["bytes_per_token"]) if t["bytes_per_token"] else "-",
                      f"{t['gbps']:.1f}" if t["gbps"] else "-", f"{1e3 * t['seconds_per_token']:.1f}",
                      f"{100 * t['share']:.1f}%"))
    tw = [max(len(r[i]) for r in tiers) for i in range(5)]
    for r in tiers:
        lines.append("            " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                              for i, (c, w) in enumerate(zip(r, tw))))
    fl = pr["prefill_floors_s"]
    lines.append(f"  prefill   {_rate(pr['prefill_tok_s'])} tok/s over a {pr['prefill_tokens']}-token prompt "
                 f"({pr['time_to_first_token_s']:.1f} s) — bottleneck: {pr['prefill_bottleneck']} "
                 f"(compute {fl['compute_s']:.1f} s, PCIe {fl['pcie_s']:.1f} s, disk {fl['disk_s']:.1f} s, "
                 f"RAM {fl['ram_s']:.1f} s)")
    for title, items in (("problems", plan.problems), ("suggestions", plan.suggestions),
                         ("assumptions", plan.assumptions)):
        if items:
            lines.append("")
            lines.append(f"  {title}:")
            lines += [f"    - {x}" for x in items]
    return "\n".join(lines)
