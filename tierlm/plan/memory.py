"""Bytes the runtime will need besides the weights: MLA KV cache, activation workspace, GPU overhead, margins.

Each constant below is an assumption about the runtime, stated with its reason; the plan reports the numbers it
used, so a measured allocation that differs points at the constant to change.

Dimension names: B = sequences decoded together (batch), C = context tokens per sequence, H = hidden size,
Tq = query tokens of one attention chunk, Tp = prompt tokens held across a layer during prefill.
"""

from __future__ import annotations

from tierlm.config import ModelConfig
from tierlm.plan.ggml_sizes import tensor_nbytes  # noqa: F401  (re-exported: bytes of a tensor in its format)
from tierlm.plan.inventory import Inventory

MiB, GiB = 2**20, 2**30

KV_DTYPE_BYTES = 2            # fp16 latent cache: Turing has no bf16, and fp16 holds normalised latents well
GPU_CONTEXT_BYTES = 500 * MiB  # CUDA context + cuBLAS handle and workspace + loaded kernels, per GPU (typical
                              # of torch on recent drivers; 300–600 MiB depending on the card and CUDA version)
GPU_MARGIN_FRACTION = 0.04    # allocator fragmentation and NCCL/p2p buffers: 4% of each card, 256 MiB to 2 GiB
GPU_MARGIN_MIN = 256 * MiB     # (fragmentation grows with the number of live allocations, not with the card)
GPU_MARGIN_MAX = 2 * GiB
RAM_RESERVE_FRACTION = 0.06   # OS, Python, the tokenizer, page cache for disk reads: 6% of RAM, at least 4 GiB
RAM_RESERVE_MIN = 4 * GiB      # (or a quarter of RAM, for the small budgets that emulate a box in tests)
ATTN_CHUNK = 256              # Tq: query tokens per attention chunk during prefill
KEY_BLOCK = 1024              # keys per attention score block (flash-style: scores never span the whole context)
PREFILL_CHUNK = 4096          # Tp: prompt tokens run through one layer before the next (experts streamed once per Tp)
STAGING_EXPERTS_PER_TOPK = 2  # double buffer: one layer's routed experts copied while the previous ones compute


def kv_bytes_per_token_layer(config: ModelConfig, dtype_bytes: int = KV_DTYPE_BYTES) -> int:
    """One layer's MLA cache per token: the normalised latent c_kv and the shared RoPE key k_pe."""
    return (config.kv_lora_rank + config.qk_rope_head_dim) * dtype_bytes


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int = KV_DTYPE_BYTES) -> int:
    """MLA (absorbed) cache per token: layers × (kv_lora_rank + qk_rope_head_dim) × element size.

    DeepSeek-V3 at fp16: 61 × 576 × 2 = 70,272 bytes (the MTP layer is not run, so it has no cache)."""
    return config.num_hidden_layers * kv_bytes_per_token_layer(config, dtype_bytes)


def gpu_overhead_bytes(capacity: int) -> int:
    """Bytes of a GPU that never hold weights: CUDA context plus the safety margin."""
    return GPU_CONTEXT_BYTES + min(GPU_MARGIN_MAX, max(GPU_MARGIN_MIN, int(GPU_MARGIN_FRACTION * capacity)))


def ram_reserve_bytes(ram: int) -> int:
    return max(min(RAM_RESERVE_MIN, ram // 4), int(RAM_RESERVE_FRACTION * ram))


def largest_layer_matrix_numel(inv: Inventory) -> int:
    """Elements of the biggest per-layer matrix that prefill dequantizes to fp16 for a cuBLAS GEMM."""
    return max((t.numel for t in inv.tensors
                if t.role in ("attn", "dense_ffn", "shared_expert") and len(t.shape) >= 2), default=0)


def workspace_bytes(config: ModelConfig, inv: Inventory, batch: int, ctx: int) -> dict[str, int]:
    """Peak activation memory of one pipeline stage, fp32 unless noted; returns the parts and their ``total``.

    Prefill dominates decode. Its peak is the prompt's hidden states held across a layer, plus the larger of the
    attention phase and the FFN phase (they are never live together), plus one dequantized weight matrix:

    - hidden:    Tp × H × 2 B × 3 (residual, normed input, layer output; fp16)
    - attention: Tq × heads × ((kv_lora + rope) + kv_lora) × 4 (absorbed q and output latents)
                 + Tq × heads × min(C, KEY_BLOCK) × 4 (one score block)
    - ffn:       routed: one expert's tokens (≤ Tp) × (H + 2 × moe_inter) × 4 plus its weights in fp16;
                 dense: Tq × 2 × intermediate × 4
    - dequant:   the largest attention / dense / shared matrix in fp16
    - logits:    B × vocab × 4 (last position of each sequence only)
    """
    c = config
    tq = max(batch, min(ATTN_CHUNK, ctx))
    tp = max(batch, min(PREFILL_CHUNK, ctx))
    heads, H = c.num_attention_heads, c.hidden_size
    hidden = tp * H * 2 * 3
    attn = tq * heads * (2 * c.kv_lora_rank + c.qk_rope_head_dim) * 4 + tq * heads * min(ctx, KEY_BLOCK) * 4
    ffn = tq * 2 * c.intermediate_size * 4
    if c.n_routed_experts:
        expert_numel = 3 * H * c.moe_intermediate_size
        ffn = max(ffn, tp * (H + 2 * c.moe_intermediate_size) * 4 + expert_numel * 2)
    dequant = largest_layer_matrix_numel(inv) * 2
    logits = batch * c.vocab_size * 4
    parts = {"hidden": hidden, "attention": attn, "ffn": ffn, "dequant": dequant, "logits": logits}
    parts["total"] = hidden + max(attn, ffn) + dequant + logits
    return parts


def staging_bytes(config: ModelConfig, max_expert_bytes: int) -> int:
    """Buffers for routed experts copied in from RAM or disk: a double buffer of one layer's top-k experts."""
    return STAGING_EXPERTS_PER_TOPK * config.num_experts_per_tok * max_expert_bytes
