"""Planning: where every tensor goes and what speed that gives, before anything is loaded. Pure Python (no torch).

    inventory  → every tensor's name, shape, type, bytes and role (from a config + recipe, or a checkpoint)
    hardware   → GPUs / RAM / disk with bandwidths (detected with nvidia-smi and /proc, or declared)
    memory     → KV cache per token, workspace, overheads
    planner    → pipeline stages, KV context, expert tiers (GPU → RAM → disk by expected use)
    cost       → predicted decode and prefill tokens/s, and the bottleneck
    report     → text table and the JSON schema (``plan_to_json`` / ``plan_from_json``)
"""

from tierlm.plan.hardware import Hardware, PlanError, declared_hardware, make_hardware, parse_gpus, parse_size
from tierlm.plan.inventory import Inventory, Tensor, inventory_from_records, recipe_inventory
from tierlm.plan.memory import kv_bytes_per_token
from tierlm.plan.planner import Plan, RoutingProfile, load_profile, make_plan
from tierlm.plan.report import format_plan, plan_from_json, plan_to_json

__all__ = [
    "Hardware", "Inventory", "Plan", "PlanError", "RoutingProfile", "Tensor", "declared_hardware", "format_plan",
    "inventory_from_records", "kv_bytes_per_token", "load_profile", "make_hardware", "make_plan", "parse_gpus",
    "parse_size", "plan_from_json", "plan_to_json", "recipe_inventory",
]
