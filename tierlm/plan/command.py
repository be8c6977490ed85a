"""``tierlm plan``: the arguments and the command, for the CLI to mount.

MODEL is a known name (``deepseek-ai/DeepSeek-V3``: planned from its built-in config before any download), a
Hugging Face checkpoint folder (``config.json`` + safetensors), or a GGUF file (its first shard). A checkpoint is
planned from its own tensor table; ``--quant`` instead plans the model converted to that recipe.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
from pathlib import Path

from tierlm.config import ModelConfig
from tierlm.errors import CheckpointError, TierlmError
from tierlm.plan.hardware import PlanError, make_hardware
from tierlm.plan.inventory import RECIPES
from tierlm.plan.planner import default_profile, load_profile, make_plan
from tierlm.plan.report import format_plan, plan_to_json
from tierlm.presets import known_config
from tierlm.weights.safetensors_header import read_header


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return v


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    """Add ``tierlm plan``'s arguments to ``p``."""
    p.add_argument("model", nargs="?", default="demo",
                   help="known model name (e.g. deepseek-ai/DeepSeek-V3), checkpoint folder, or .gguf file "
                        "(default: the built-in demo model)")
    p.add_argument("--quant", choices=RECIPES, type=str.upper,
                   help="quantization recipe to plan (default: the checkpoint's own tensors, or Q4_K_M for a "
                        "known model name)")
    p.add_argument("--gpus", help="GPU memory: 4x22GiB, 22GiB,22GiB,11GiB, or 0 for none (default: detected)")
    p.add_argument("--ram", help="RAM for tierlm, e.g. 128GiB (default: detected available RAM)")
    p.add_argument("--disk-gbps", help="disk read GB/s (default: measured on the checkpoint's disk)")
    p.add_argument("--gpu-gbps", help="GPU memory bandwidth GB/s (default: from the GPU model)")
    p.add_argument("--pcie-gbps", help="host-to-GPU copy GB/s (default: from the PCIe link)")
    p.add_argument("--ram-gbps", help="RAM read GB/s (default: 40, an assumption)")
    p.add_argument("--ctx", type=_positive_int, help="context tokens per sequence (default: from what is left)")
    p.add_argument("--batch", type=_positive_int, help="sequences decoded together (default: from what is left)")
    p.add_argument("--profile", help="routing profile JSON: per-(layer, expert) counts; hot experts go to GPU")
    p.add_argument("--no-detect", action="store_true",
                   help="use only declared values and defaults: plan for another machine")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (see docs/plan-schema.md)")


def plan_command(args: argparse.Namespace) -> int:
    """Run ``tierlm plan``: 0 if the plan fits, 1 if it does not, 2 on bad input."""
    try:
        config, tensors, name, path = resolve_model(args.model, args.quant)
        hw = make_hardware(gpus=args.gpus, ram=args.ram, disk_gbps=args.disk_gbps, gpu_gbps=args.gpu_gbps,
                           pcie_gbps=args.pcie_gbps, ram_gbps=args.ram_gbps, detect=not args.no_detect,
                           model_path=path)
        profile = load_profile(args.profile) if args.profile else default_profile(path)
        plan = make_plan(config, args.quant or "Q4_K_M", hw, ctx=args.ctx, batch=args.batch, profile=profile,
                         tensors=tensors, name=name)
    except TierlmError as e:
        print(f"tierlm plan: {e}", file=sys.stderr)
        return 2
    print(json.dumps(plan_to_json(plan), indent=1) if args.json else format_plan(plan))
    return 0 if plan.fits else 1


def resolve_model(model: str, quant: str | None) -> tuple[ModelConfig, list | None, str, Path | None]:
    """(config, tensor records or None for a recipe plan, display name, path whose disk holds the weights)."""
    path = Path(model).expanduser()
    if not path.exists():
        return known_config(model), None, model, None
    if path.is_dir() or path.name == "config.json":
        folder = path if path.is_dir() else path.parent
        if not (folder / "config.json").exists():
            ggufs = sorted(folder.glob("*.gguf"))
            hint = f"; for a GGUF model pass its file, e.g. {ggufs[0]}" if ggufs else ""
            raise PlanError(f"{folder} has no config.json, so it is not a Hugging Face checkpoint{hint}")
        config = ModelConfig.from_json(folder / "config.json")
        records = None if quant else safetensors_records(folder)
        return config, records, folder.name, folder
    if path.suffix == ".gguf":
        config, records = _gguf(path)
        return config, None if quant else records, path.name, path
    raise PlanError(f"{path} is neither a checkpoint folder (with config.json) nor a .gguf file")


def _gguf(path: Path) -> tuple[ModelConfig, list]:
    if importlib.util.find_spec("tierlm.weights.gguf_io") is None:
        raise PlanError("GGUF planning needs tierlm.weights.gguf_io")
    gguf_io = importlib.import_module("tierlm.weights.gguf_io")
    gguf_config = importlib.import_module("tierlm.weights.gguf_config")
    with gguf_io.GGUFFile.open(path) as f:
        records = list(f.tensors.values())
        return gguf_config.config_from_gguf(f.metadata, [t.name for t in records]), records


def safetensors_records(folder: Path) -> list[tuple[str, tuple[int, ...], str, int]] | None:
    """(name, shape, dtype, nbytes) of every tensor in a folder's safetensors files, from their headers only.

    None when the folder has no safetensors (a config-only folder: plan with the default recipe)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is malformed ({e}); re-download it") from None
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        return None
    out = []
    for fname in files:
        f = folder / fname
        if not f.exists():
            raise CheckpointError(f"shard {fname} listed in {index.name} is missing from {folder}; re-download it")
        out += [(e.name, e.shape, e.dtype, e.nbytes) for e in read_header(f).values()]
    return out
