"""Where a loaded model's routed experts go: per MoE layer, each expert's tier and the device slots.

Built from a plan (``from_plan``: the planner's GPU experts become device-resident, its RAM and disk experts stay
on the host) or given directly (tests emulate every tier on the CPU with ``by_fraction``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from tierlm.config import ModelConfig
from tierlm.errors import ConfigError

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class DeviceMap:
    """Which device runs each layer (a pipeline over GPUs), the embedding and the head."""

    layers: tuple[str, ...]
    embed: str
    head: str

    def of(self, param: str) -> str:
        """The device of a parameter, by name (tierlm/HF naming)."""
        m = _LAYER.match(param)
        if m:
            return self.layers[int(m.group(1))]
        return self.embed if param.startswith("model.embed_tokens") else self.head

    @property
    def devices(self) -> list[str]:
        return sorted(set(self.layers) | {self.embed, self.head})

    @classmethod
    def from_plan(cls, plan, n_layers: int) -> "DeviceMap":
        return cls(tuple(plan.layer_device(i) for i in range(n_layers)), plan.layer_device(None, "embed"),
                   plan.layer_device(None, "head"))

    @classmethod
    def split(cls, n_layers: int, devices: list[str]) -> "DeviceMap":
        """Layers in contiguous, even stages over ``devices`` (embedding on the first, head on the last)."""
        per = -(-n_layers // len(devices))
        return cls(tuple(devices[min(i // per, len(devices) - 1)] for i in range(n_layers)), devices[0],
                   devices[-1])


def copy_threshold(hw) -> int:
    """Tokens per expert from which copying a host expert to the GPU beats computing it on the CPU."""
    if not hw.gpus:
        return 1 << 30  # nowhere to copy to
    pcie = min(g.pcie_gbps for g in hw.gpus)
    passes = max(1, math.ceil(hw.ram_gbps * CPU_KERNEL_EFFICIENCY / pcie))  # CPU passes that cost one copy
    return passes * CPU_ROWS + 1


def device_of(device, param: str):
    """``device`` is one device for everything or a DeviceMap."""
    return device.of(param) if isinstance(device, DeviceMap) else device


CPU_ROWS = 16  # activation rows the CPU expert kernel takes per call (kernels/cpu_quant.py)
CPU_KERNEL_EFFICIENCY = 0.55  # share of the RAM bandwidth it reaches (bench/results/cpu-matvec.md: 52-68%)


@dataclass
class Placement:
    tiers: dict[int, list[str]]  # MoE layer → tier of each expert: "device" | "ram" | "disk"
    slots: dict[int, int]  # MoE layer → device slots (≥ its device experts; spare slots cache promotions)
    # Tokens from which a host expert is copied to the GPU rather than computed by the CPU. The CPU reads the
    # expert once per CPU_ROWS tokens; the copy reads it once over PCIe. Copy when
    # ceil(n / CPU_ROWS) · bytes / cpu_bw > bytes / pcie_bw.
    copy_threshold: int = 2 * CPU_ROWS

    def check(self, cfg: ModelConfig) -> None:
        if set(self.tiers) != set(cfg.moe_layers):
            raise ConfigError(f"the placement covers layers {sorted(self.tiers)}, the model's MoE layers are "
                              f"{cfg.moe_layers}; the plan was made for another model")
        for layer, tiers in self.tiers.items():
            bad = set(tiers) - {"device", "ram", "disk"}
            if len(tiers) != cfg.n_routed_experts or bad:
                raise ConfigError(f"layer {layer}: the placement must give one tier (device, ram, disk) for each of "
                                  f"{cfg.n_routed_experts} experts")
            if self.slots.get(layer, 0) < tiers.count("device"):
                raise ConfigError(f"layer {layer}: {tiers.count('device')} device experts but "
                                  f"{self.slots.get(layer, 0)} slots")

    @classmethod
    def from_plan(cls, plan) -> "Placement":
        tiers, slots = {}, {}
        for le in plan.experts:
            n = len(le.gpu) + len(le.ram) + len(le.disk)
            t = ["disk"] * n
            for e in le.ram:
                t[e] = "ram"
            for e in le.gpu:
                t[e] = "device"
            tiers[le.layer], slots[le.layer] = t, len(le.gpu)
        return cls(tiers, slots, copy_threshold(plan.hardware))

    @classmethod
    def by_fraction(cls, cfg: ModelConfig, device: float, ram: float, spare_slots: int = 0) -> "Placement":
        """Experts 0..a on the device, a..b in RAM, the rest on disk, in every MoE layer (for tests and demos)."""
        E = cfg.n_routed_experts
        a, b = round(E * device), round(E * (device + ram))
        t = ["device"] * a + ["ram"] * (b - a) + ["disk"] * (E - b)
        return cls({i: list(t) for i in cfg.moe_layers}, {i: a + spare_slots for i in cfg.moe_layers})
