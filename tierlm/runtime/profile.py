"""Routing profiles recorded from real runs: how often each routed expert is chosen, per layer.

``tierlm run|chat|serve --record-profile`` counts the router's choices and saves them beside the model
(``MODEL.routing.json``); the planner then ranks experts by that use instead of uniformly, so the hottest experts
go to the GPU. Counting is a forward hook on each router: one bincount per MoE layer per step, on the device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tierlm.model.moe import Gate


class ProfileRecorder:
    def __init__(self, module: torch.nn.Module):
        self.counts: dict[int, torch.Tensor] = {}
        self._handles = []
        for name, sub in module.named_modules():
            if isinstance(sub, Gate):
                layer = int(name.split(".")[2])  # model.layers.N.mlp.gate
                self._handles.append(sub.register_forward_hook(self._hook(layer, sub.cfg.n_routed_experts)))

    def _hook(self, layer: int, n_experts: int):
        def count(_module, _inputs, output):
            ids = output[0]
            c = torch.bincount(ids.flatten(), minlength=n_experts)
            self.counts[layer] = self.counts[layer] + c if layer in self.counts else c
        return count

    def as_dict(self) -> dict:
        return {"layers": {str(k): v.tolist() for k, v in sorted(self.counts.items())}}

    def save(self, path: str | Path) -> Path:
        """Add this run's counts to the profile at ``path`` (created if absent)."""
        path = Path(path)
        merged = self.as_dict()["layers"]
        if path.exists():
            try:
                old = json.loads(path.read_text()).get("layers", {})
            except (OSError, ValueError):
                old = {}  # a damaged profile is replaced, not merged
            for k, row in old.items():
                if k in merged and len(row) == len(merged[k]):
                    merged[k] = [a + b for a, b in zip(merged[k], row)]
        path.write_text(json.dumps({"layers": merged}))
        return path

    def close(self) -> None:
        for h in self._handles:
            h.remove()
