"""Predicted decode and prefill speed of a placement, from bytes, FLOPs and bandwidths.

Decode (memory-bound). For each decode step of B sequences, each tier serves bytes:

- a GPU: the always-active weights of its layers (+ the head on the last one, one embedding row per sequence),
  its layers' KV cache up to the decode context, and its cached routed experts that the step uses;
- the CPU: routed experts held in RAM, and those read from disk (computed on the CPU in both cases); in a
  CPU-only plan also every always-active weight and the KV cache;
- the disk: routed experts it holds that the step uses.

Expert ``e`` of a layer, used by a token with probability ``p_e`` (k/E when uniform), is needed by a step of B tokens
with probability ``1 − (1 − p_e)^B``. A tier's time is its bytes over its bandwidth × an efficiency (below).

**Serial, no overlap between tiers.** A step's time is the *sum* of the tiers' times plus fixed per-layer costs.
At batch 1, a layer's routed experts are known only after its router ran, and the next layer needs this layer's
output, so the GPU, the CPU and the disk wait on each other layer by layer; prefetching disk experts ahead of the
router is speculative and not assumed. Sums also match how llama.cpp's measured decode splits between GPU and
CPU (PEERS.md). The perfectly overlapped figure (the slowest tier alone) is reported beside it as an upper bound,
and the bottleneck is the tier with the largest share.

Prefill (of one chunk of ``PREFILL_CHUNK`` prompt tokens, layer by layer). Every routed expert is computed on the
GPU that owns its layer; experts not cached there are streamed once per chunk over PCIe (from disk through RAM
when they live on disk). Here the streams are predictable (nearly every expert is touched), so reading, copying and
computing pipeline: the chunk takes the *maximum* of compute, PCIe and disk time. Compute = 2 FLOPs per weight per
token (+ absorbed-MLA attention over half the chunk on average) at the GPU's fp16 rate × an efficiency. Without
GPUs, the CPU computes at the hardware's CPU rate and the disk streams its experts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tierlm.config import ModelConfig
from tierlm.plan.hardware import GB, Hardware
from tierlm.plan.inventory import Inventory
from tierlm.plan.memory import PREFILL_CHUNK, kv_bytes_per_token_layer

GPU_EFFICIENCY = 0.5          # quantized decode as measured on an H200 (bench/results/kernels-NVIDIA_H200-int8.md):
                              # fused MoE at 1/1.87 of the experts' read time, dense matvecs 40-56% of copy bandwidth
                              # (the DESIGN.md target is 0.8; the planner predicts what the kernels do today)
CPU_EFFICIENCY = 0.6          # CPU expert matvec at ~61% of measured DRAM read (PEERS.md, int4 on 16 cores)
DISK_EFFICIENCY = 0.7         # experts are 8–30 MB contiguous slices: 0.70 of the sequential read speed, measured
                              # in tiered decode through the memory map (bench/results/tiered-h200x2.md, second
                              # run); with today's parallel preadv reader the tiered runs on H200 hosts came out
                              # within -22%..+18% of the plan (tiered-h200x2-22gib.md, tiered-h200-12gib.md)
GPU_COMPUTE_EFFICIENCY = 0.5  # prefill GEMMs (dequantize + cuBLAS fp16) at half the fp16 tensor peak
GPU_LAYER_OVERHEAD_S = 50e-6  # ~15 kernel launches and the router's top-k per layer per step
CPU_EXPERT_SYNC_S = 100e-6    # per MoE layer with experts off the GPU: hidden state to host, CPU dispatch, back
CPU_LAYER_OVERHEAD_S = 20e-6  # CPU-only: thread-pool synchronisation per layer
STAGE_HOP_S = 20e-6           # pipeline hand-off of one token's hidden state between GPUs
DECODE_CONTEXT = 4096         # decode speed is predicted with this many tokens already in the cache


@dataclass
class Layout:
    """Where things are, as the cost model needs it (built by the planner)."""

    stage_of_layer: list[int | None]    # GPU index of each layer; None = computed on the CPU
    head_gpu: int | None                # GPU of the output head and the embedding (None = CPU)
    embed_gpu: int | None
    expert_tier: dict[int, list[str]]   # layer → "gpu" / "ram" / "disk" per routed expert
    usage: dict[int, list[float]]       # layer → expected uses per token of each routed expert
    expert_bytes: dict[int, list[int]]


@dataclass
class TierTime:
    tier: str                   # "cuda:0", "cpu", "disk", or "overhead"
    bytes_per_token: float
    gbps: float                 # effective bandwidth used (measured × efficiency); 0 for "overhead"
    seconds_per_token: float
    share: float = 0.0


def _used(p: float, b: int) -> float:
    return 1.0 - (1.0 - min(p, 1.0)) ** b


def _layer_bytes(inv: Inventory) -> tuple[dict[int, int], dict[int, int], int, int, int]:
    """Always-active bytes and parameters per layer, the embedding's bytes per row, head bytes, head params."""
    per_layer: dict[int, int] = {}
    numel: dict[int, int] = {}
    embed_row = head = head_numel = 0
    for t in inv.tensors:
        if t.role in ("routed_expert", "mtp"):
            continue
        if t.role == "embed":
            embed_row = t.nbytes // max(t.shape[0], 1)
        elif t.layer is None:  # head and final norm
            head += t.nbytes
            head_numel += t.numel
        else:
            per_layer[t.layer] = per_layer.get(t.layer, 0) + t.nbytes
            numel[t.layer] = numel.get(t.layer, 0) + t.numel
    return per_layer, numel, embed_row, head, head_numel


def decode_cost(config: ModelConfig, inv: Inventory, hw: Hardware, lay: Layout, batch: int,
                ctx_fill: int) -> dict:
    """Predicted decode tokens/s and each tier's share (see the module docstring)."""
    per_layer, _, embed_row, head, _ = _layer_bytes(inv)
    kv_layer = kv_bytes_per_token_layer(config) * ctx_fill * batch
    gpu_bytes = [0.0] * len(hw.gpus)
    cpu_bytes = disk_bytes = 0.0

    def add(dev: int | None, nbytes: float) -> None:
        nonlocal cpu_bytes
        if dev is None:
            cpu_bytes += nbytes
        else:
            gpu_bytes[dev] += nbytes

    add(lay.embed_gpu, embed_row * batch)
    add(lay.head_gpu, head)
    overhead = 0.0
    prev = lay.embed_gpu
    for i in range(config.num_hidden_layers):
        dev = lay.stage_of_layer[i]
        add(dev, per_layer.get(i, 0) + kv_layer)
        overhead += GPU_LAYER_OVERHEAD_S if dev is not None else CPU_LAYER_OVERHEAD_S
        if dev != prev and dev is not None and prev is not None:
            overhead += STAGE_HOP_S
        prev = dev
        if i not in lay.expert_tier:
            continue
        off_gpu = False
        for tier, p, b in zip(lay.expert_tier[i], lay.usage[i], lay.expert_bytes[i]):
            need = _used(p, batch) * b
            if tier == "gpu":
                add(dev, need)
                continue
            cpu_bytes += need
            off_gpu = True
            if tier == "disk":
                disk_bytes += need
        if off_gpu and dev is not None:
            overhead += CPU_EXPERT_SYNC_S

    tiers = [TierTime(f"cuda:{g}", b / batch, hw.gpus[g].mem_gbps * GPU_EFFICIENCY,
                      b / (hw.gpus[g].mem_gbps * GPU_EFFICIENCY * GB) / batch)
             for g, b in enumerate(gpu_bytes) if b > 0]
    if cpu_bytes:
        bw = hw.ram_gbps * CPU_EFFICIENCY
        tiers.append(TierTime("cpu", cpu_bytes / batch, bw, cpu_bytes / (bw * GB) / batch))
    if disk_bytes:
        bw = hw.disk_gbps * DISK_EFFICIENCY
        tiers.append(TierTime("disk", disk_bytes / batch, bw, disk_bytes / (bw * GB) / batch))
    tiers.append(TierTime("overhead", 0.0, 0.0, overhead / batch))
    total = sum(t.seconds_per_token for t in tiers)
    for t in tiers:
        t.share = t.seconds_per_token / total if total else 0.0
    roofline = sum(b / (hw.gpus[g].mem_gbps * GB) for g, b in enumerate(gpu_bytes))
    roofline += cpu_bytes / (hw.ram_gbps * GB) + disk_bytes / (hw.disk_gbps * GB)
    slowest = max(tiers, key=lambda t: t.seconds_per_token)
    return {
        "decode_tok_s": 1.0 / total if total else 0.0,
        "decode_tok_s_overlapped": 1.0 / slowest.seconds_per_token if slowest.seconds_per_token else 0.0,
        "decode_roofline_tok_s": batch / roofline if roofline else 0.0,
        "decode_batch": batch,
        "decode_context": ctx_fill,
        "bytes_per_token": sum(t.bytes_per_token for t in tiers),
        "bottleneck": slowest.tier if slowest.tier in ("cpu", "disk", "overhead") else "gpu",
        "bottleneck_device": slowest.tier,
        "tiers": [asdict(t) for t in tiers],
    }


def prefill_cost(config: ModelConfig, inv: Inventory, hw: Hardware, lay: Layout, ctx: int) -> dict:
    """Predicted prefill tokens/s over one chunk of ``min(ctx, PREFILL_CHUNK)`` prompt tokens."""
    tokens = max(1, min(ctx, PREFILL_CHUNK))
    _, numel, _, _, head_numel = _layer_bytes(inv)
    expert_numel = inv.expert_numel()
    c = config
    attn_flops_per_layer = 2 * tokens * (tokens / 2) * c.num_attention_heads * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
    flops = [0.0] * len(hw.gpus)
    cpu_flops = 0.0
    pcie_bytes = [0.0] * len(hw.gpus)
    disk_bytes = ram_read = 0.0
    for i in range(c.num_hidden_layers):
        dev = lay.stage_of_layer[i]
        f = 2 * tokens * numel.get(i, 0) + attn_flops_per_layer
        f += 2 * tokens * c.num_experts_per_tok * expert_numel.get(i, 0)
        if dev is None:
            cpu_flops += f
        else:
            flops[dev] += f
        for tier, p, b in zip(lay.expert_tier.get(i, ()), lay.usage.get(i, ()), lay.expert_bytes.get(i, ())):
            touched = _used(p, tokens) * b
            if tier == "disk":
                disk_bytes += touched
            if dev is not None and tier != "gpu":
                pcie_bytes[dev] += touched
            elif dev is None:
                ram_read += touched
    if lay.head_gpu is None:
        cpu_flops += 2 * head_numel
    else:
        flops[lay.head_gpu] += 2 * head_numel
    compute_s = sum(f / (hw.gpus[g].fp16_tflops * 1e12 * GPU_COMPUTE_EFFICIENCY) for g, f in enumerate(flops))
    compute_s += cpu_flops / (hw.cpu_gflops * 1e9)
    pcie_s = sum(b / (hw.gpus[g].pcie_gbps * GB) for g, b in enumerate(pcie_bytes))
    disk_s = disk_bytes / (hw.disk_gbps * DISK_EFFICIENCY * GB)
    ram_s = ram_read / (hw.ram_gbps * CPU_EFFICIENCY * GB)
    floors = {"compute_s": compute_s, "pcie_s": pcie_s, "disk_s": disk_s, "ram_s": ram_s}
    chunk_s = max(floors.values())
    bottleneck = max(floors, key=floors.get)[:-2]
    return {
        "prefill_tok_s": tokens / chunk_s if chunk_s else 0.0,
        "prefill_tokens": tokens,
        "time_to_first_token_s": chunk_s,
        "prefill_bottleneck": bottleneck,
        "prefill_floors_s": floors,
    }


EFFICIENCIES = {"gpu_memory": GPU_EFFICIENCY, "cpu_memory": CPU_EFFICIENCY, "disk": DISK_EFFICIENCY,
                "gpu_compute": GPU_COMPUTE_EFFICIENCY}
