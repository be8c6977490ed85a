"""Plan, then load: the flags of ``tierlm run|chat|serve`` that place a model (--gpus, --ram, --plan, …) turn
into a plan (plan/), which is printed, checked, and executed as a Placement of the routed experts."""

from __future__ import annotations

import json
from pathlib import Path

from tierlm.errors import ConfigError, TierlmError


def add_placement_arguments(p) -> None:
    p.add_argument("--gpus", help="GPU memory to use, e.g. 1x22GiB or 22GiB,11GiB (caps each detected card); "
                                  "0 for none. Turns on tiered experts (GGUF models)")
    p.add_argument("--gpu-mem", help="cap every detected GPU at this much memory, e.g. 22GiB (a big card then "
                                     "behaves like a smaller one); same as --gpus 22GiB,22GiB,… for each card")
    p.add_argument("--ram", help="RAM for routed experts, e.g. 64GiB (default: detected available RAM)")
    p.add_argument("--disk-gbps", help="disk read GB/s for the cost model (default: measured)")
    p.add_argument("--plan", help="a plan written by `tierlm plan --json` to execute instead of planning again")
    p.add_argument("--stats", action="store_true", help="print expert hits and bytes read per tier at the end")
    p.add_argument("--record-profile", action="store_true",
                   help="count which experts the router picks and add the counts to MODEL.routing.json, which "
                        "later plans use to put the hottest experts on the GPU")


def wants_plan(args) -> bool:
    return any(getattr(args, k, None) for k in ("gpus", "gpu_mem", "ram", "disk_gbps", "plan"))


def make_run_plan(args, ctx: int | None = None):
    """The plan for ``args.model`` under the placement flags, or the one ``--plan`` names."""
    from tierlm.plan import make_hardware, make_plan
    from tierlm.plan.command import resolve_model
    from tierlm.plan.report import plan_from_json

    if args.model is None or Path(args.model).suffix != ".gguf":
        raise ConfigError("tiered experts (--gpus/--ram/--plan) need a GGUF model file; convert a checkpoint with "
                          "`tierlm convert SRC model.gguf --quant Q4_K_M`")
    if args.plan:
        try:
            return plan_from_json(json.loads(Path(args.plan).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--plan {args.plan}: not a plan written by `tierlm plan --json` ({e})") from None
    from tierlm.plan.planner import default_profile

    gpus = args.gpus
    if getattr(args, "gpu_mem", None):
        import torch

        if gpus:
            raise ConfigError("--gpu-mem and --gpus both set GPU memory: pass one of them")
        n = torch.cuda.device_count()
        if n == 0:
            raise ConfigError("--gpu-mem caps detected GPUs, and none is detected; plan for GPUs this machine "
                              "lacks with --gpus (e.g. --gpus 4x22GiB)")
        gpus = ",".join([args.gpu_mem] * n)
    config, tensors, name, path = resolve_model(args.model, None)
    hw = make_hardware(gpus=gpus, ram=args.ram, disk_gbps=args.disk_gbps, model_path=path)
    return make_plan(config, hardware=hw, ctx=ctx, tensors=tensors, name=name, profile=default_profile(path))


def load_planned(args, progress=None, ctx: int | None = None):
    """(model, plan): fail before loading when the plan does not fit."""
    from tierlm.runtime.engine import load
    from tierlm.runtime.placement import Placement

    plan = make_run_plan(args, ctx)
    if not plan.fits:
        reasons = "; ".join(plan.problems) or "not enough memory"
        fixes = "; ".join(plan.suggestions[:2])
        raise TierlmError(f"the plan does not fit: {reasons}" + (f". Try: {fixes}" if fixes else ""))
    from tierlm.runtime.placement import DeviceMap

    cap_gpu_memory(plan)
    device = DeviceMap.from_plan(plan, plan.config.num_hidden_layers)
    if len(device.devices) == 1:
        device = device.devices[0]
    model = load(args.model, device=device, dtype=args.dtype, progress=progress,
                 placement=Placement.from_plan(plan))
    return model, plan


def cap_gpu_memory(plan) -> None:
    """Hold each GPU to the capacity the plan was made for (``--gpus 22GiB`` on a bigger card emulates the
    smaller one): allocations past it fail as they would there, and the OOM recovery handles them."""
    import torch

    for d in plan.devices:
        if d.kind == "gpu" and torch.cuda.is_available():
            index = torch.device(d.name).index or 0
            total = torch.cuda.get_device_properties(index).total_memory
            if d.capacity_bytes < total:
                torch.cuda.set_per_process_memory_fraction(d.capacity_bytes / total, index)
