"""Fused MoE over stacked GGUF expert weights, with a plain-PyTorch reference beside it.

out[t] = sum_k weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t), e = ids[t, k], in float32.

On CUDA this is two Triton launches plus one sum over the k slots, whatever the number of experts:
decode (few token-expert pairs) runs each pair as a matrix-vector product straight from ``ids``
(with int8 activations: x and h quantized first; Q4_K gate and up rows side by side in one loop; at
one token the down launch adds the slots itself, so no sum launch); prefill sorts the pairs by expert
so each expert's weights are read once per tile of up to ``block_m`` pairs and multiplied with
tensor-core tiles. On CPU it is the reference (a loop over the experts that are used, each dequantized).
``moe_dense`` runs the same kernels on unquantized fp16/bf16/fp32 stacked weights.

Glossary: T = tokens, K = experts per token, P = T * K (token, slot) pairs, E = experts,
D = hidden size, I = expert intermediate size.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tierlm.kernels.quant_matmul import (FUSED_TYPES, MMVQ_STEPS, KernelInputError, _interpreting, _word_aligned,
                                         aligned_step, device_info, mmvq_loads, pdl_launch, q6k_words, quantize_q8,
                                         quantize_q8_ref)
from tierlm.kernels.q6k_layout import from_aligned
from tierlm.weights.formats import GGMLType, dequantize
from tierlm.weights.ggml_types import block_format, ggml_type, tensor_nbytes

_FLOAT_TYPES = {torch.float16: GGMLType.F16, torch.bfloat16: GGMLType.BF16, torch.float32: GGMLType.F32}


@dataclass(frozen=True)
class MoEConfig:
    """Launch configuration of the two MoE kernels.

    sorted_min_pairs: from this many pairs on, pairs are sorted by expert and run as tiles of
    block_m pairs x block_n rows (tl.dot); below it, each pair is a matrix-vector product over
    32 * rows weight rows per program with num_warps warps (q4k_block: see triton_gemv._gemv).
    Defaults from the H200 measurements in bench/results: int8 decode with one warp of 4 rows x 2
    blocks per program was the fastest decode form (1.87x the experts' read time at one token,
    against 3.4x for the best float kernel), and at 16 tokens (128 pairs) the matrix-vector path
    beat the sorted tiles 1.9x. ``num_warps``/``rows`` apply to both decode kernels.
    """

    num_warps: int = 1
    rows: int = 2
    sorted_min_pairs: int = 256
    block_m: int = 16
    block_n: int = 64
    k_step: int = 256
    tile_warps: int = 4
    q4k_block: bool = False
    q8: bool = True  # decode with int8 activations (triton_mmvq), else the float gemv kernels
    mmvq_rows: int = 4  # int8 decode: weight rows per program
    mmvq_nblk: int = 2  # int8 decode: 256-element blocks of a row per loop step
    mmvq_pf: bool = False  # int8 decode: load the next step's weights before computing this one's
    mmvq_loads: int = 0  # int8 decode, Q4_K gate/up: QMMConfig.loads (quant_matmul.mmvq_loads keeps those of a type)
    mmvq_up: tuple = ()  # int8 decode: (rows, blocks, warps) of the gate/up launch, if not those above
    mmvq_down: tuple = ()  # int8 decode: (rows, blocks, warps, loads) of the down launch, if not those above
    sorted_mmq: bool = True  # sorted tiles on sm_80+: triton_mmq's decode for Q4_K/Q6_K/Q8_0/Q5_0 experts
    aligned_step: tuple = ()  # int8 decode of Q6_K experts in the aligned layout: (rows, blocks, warps), if not
    # quant_matmul.MMVQ_Q6K_ALIGNED_STEPS's for the rows' alignment
    down_sum: bool = False  # int8 decode: the down launch adds each token's K slots in registers (no sum launch)
    down_sum_aligned: bool = True  # ... at one token where the down experts are Q6_K in the aligned layout: H200,
    # 71.4 us (1.32x the read time) against 73.5 us; with Q4_K down experts it was slower, 70.5 against 66.9 us, as at
    # 4 tokens (bench/results/q6k-layout-moe-NVIDIA_H200-fold.json)

    gate_up_lines: tuple = ()  # int8 decode of Q4_K gate and up with the lean step (loads 14): (rows, blocks,
    # warps) of a gate/up launch whose steps hold a program's gate rows and up rows side by side, one loop over both
    # matrices (the rows count those of each); instead of mmvq_up
    down_slots: tuple = ()  # int8 decode of Q4_K down experts: (rows, blocks, warps) of a down launch that runs a
    # token's K slots side by side (K times the rows in a step) and adds them in a fixed order: no sum launch; a
    # fourth number G > 1: G blocks of those rows per program, sharing their activation loads
    down_slots_aligned: tuple = ()  # ... of aligned Q6_K down experts (down_slots' form, on the aligned step)
    down_held: tuple = ()  # where down_slots or down_slots_aligned applies: (programs per multiprocessor, G[, PF[,
    # registers per thread at most]]) of the down launch that holds its slots' activations in registers and walks
    # its rows (moe_down_held_q8_kernel), G rows a step (PF: the next step's loaded first), instead of the slots'
    # launch
    slots_max_tokens: int = 1  # ... up to this many tokens
    early: bool = True  # the slots' down launch reads ids and wts and loads its first step's weights before the
    # grid-dependency wait of a programmatic dependent launch (moe_down_slots_q8_kernel's EARLY): H200, 22.09 against
    # 23.72 us at one token (bench/results/read-ceiling-NVIDIA_H200-early.json)
    early_weights: bool = True  # ... early: the first step's weights too (else ids and wts alone; with two groups of
    # rows a program, ids alone measured 19.54-19.81 us against 20.41-20.52 us, read-ceiling-NVIDIA_H200-slots-*.json)
    slots_pf: bool = False  # the slots' down launch loads each step's next weights before its math (PF; no gain on an
    # H200: 70.8-73.7% of copy bandwidth against 70.3-73.2%)
    slots_cache: tuple = (0, 0)  # the slots' down launch: its weight loads' cache modifier and its activation loads'
    # eviction policy (moe_down_slots_q8_kernel's WCM, AEV: triton_mmvq._ld's codes; no gain on an H200)

    def gate_up_step(self, types, loads: int) -> tuple | None:
        """The (rows, blocks, warps) of the side-by-side gate/up launch where it applies (see gate_up_lines)."""
        ok = self.gate_up_lines and types[0] == types[1] == GGMLType.Q4_K and loads & 8
        return self.gate_up_lines if ok else None

    def slots_down(self, types, tokens: int, aligned: bool = False) -> bool:
        """Whether the int8 down launch is ``moe_down_slots_q8_kernel`` (see down_slots, down_slots_aligned)."""
        return bool(self.slots_step(types, aligned)) and tokens <= self.slots_max_tokens

    def held_form(self) -> tuple[int, int, bool, int | None]:
        """``down_held`` with its defaults: (programs per SM, rows a step, PF, register cap or None)."""
        per_sm, g, *more = self.down_held
        pf, cap = bool(more and more[0]), (more[1] if len(more) > 1 else None)
        if per_sm < 1 or not 1 <= g <= (2 if pf else 4):
            raise KernelInputError(f"MoEConfig.down_held={self.down_held}: programs per SM must be 1 or more and rows "
                                   "a step 1 to 4 (1 or 2 with the next step loaded first, PF)")
        return per_sm, g, pf, cap

    def slots_step(self, types, aligned: bool = False) -> tuple:
        """The (rows, blocks, warps[, groups]) of the slots' down launch for these down experts, or ()."""
        if types[2] == GGMLType.Q4_K:
            return self.down_slots
        return self.down_slots_aligned if aligned and types[2] == GGMLType.Q6_K else ()

    def sums_slots(self, types, aligned: bool, tokens: int) -> bool:
        """Whether the int8 down launch adds each token's slots itself (see down_slots, down_sum, down_sum_aligned)."""
        return self.slots_down(types, tokens, aligned) or self.down_sum or (
            self.down_sum_aligned and aligned and types[2] == GGMLType.Q6_K and tokens == 1)

    def up_step(self) -> tuple[int, int, int, int]:
        """(rows, blocks per step, warps, loads) of the int8 gate/up launch."""
        return (*(self.mmvq_up or (self.mmvq_rows, self.mmvq_nblk, self.num_warps)), self.mmvq_loads)

    def down_step(self) -> tuple[int, int, int, int]:
        """(rows, blocks per step, warps, loads) of the int8 down launch."""
        return self.mmvq_down or (self.mmvq_rows, self.mmvq_nblk, self.num_warps, 0)


# What bench/kernels.py times for the decode layer; DEFAULT is what moe_quant uses.
DECODE_CONFIGS = tuple(MoEConfig(num_warps=w, rows=r, q8=False) for r in (1, 2) for w in (4, 8)) + tuple(
    MoEConfig(num_warps=w, rows=2, q4k_block=True, q8=False) for w in (4, 8)) + tuple(
    MoEConfig(num_warps=w, mmvq_rows=bn, mmvq_nblk=nb) for (bn, nb, w) in MMVQ_STEPS) + (
    MoEConfig(mmvq_pf=True), MoEConfig(mmvq_loads=3), MoEConfig(mmvq_loads=6, mmvq_up=(1, 8, 1)),
    MoEConfig(mmvq_down=(4, 2, 1, 4)), MoEConfig(mmvq_down=(8, 2, 2, 4)),
    MoEConfig(mmvq_loads=6, mmvq_up=(4, 2, 1), mmvq_down=(4, 2, 1, 4)),
    MoEConfig(mmvq_loads=14, mmvq_up=(4, 2, 1), mmvq_down=(4, 2, 1, 12)),
    MoEConfig(mmvq_loads=14, mmvq_up=(2, 4, 1), mmvq_down=(2, 2, 1, 14)),
    MoEConfig(mmvq_loads=14, mmvq_up=(4, 2, 1), mmvq_down=(8, 2, 2, 14)),
    MoEConfig(mmvq_loads=14, mmvq_up=(4, 2, 1), mmvq_down=(4, 2, 1, 14), mmvq_pf=True),
    MoEConfig(mmvq_loads=14, mmvq_up=(4, 2, 1), mmvq_down=(4, 2, 1, 14), down_sum=True),
    MoEConfig(mmvq_loads=14, mmvq_up=(4, 2, 1), mmvq_down=(4, 2, 1, 14), down_slots=(4, 2, 8), slots_max_tokens=64),
    MoEConfig(mmvq_loads=14, mmvq_up=(4, 2, 1), mmvq_down=(4, 2, 1, 14), gate_up_lines=(4, 2, 4),
              down_slots=(2, 2, 4), slots_max_tokens=64))
# the lean eight-thread Q4_K step for gate/up and the lean Q6_K / Q4_K step for down, 4 rows x 2 blocks each:
# 1.48-1.50x the read time at one token with Q6_K down experts and 1.40-1.42x with Q4_K ones, against 1.58-1.61x
# and 1.50-1.52x for the earlier default MoEConfig(mmvq_loads=6, mmvq_up=(4, 2, 1), mmvq_down=(4, 2, 1, 4)) and
# 1.88-1.91x for MoEConfig() (H200, bench/results/kernels-NVIDIA_H200-int8.md, "Seventh round")
# (GGUF layout). With the Q6_K down experts in the aligned layout, as the layers hold them on a GPU, the down launch
# takes MMVQ_Q6K_ALIGNED_STEPS's step and adds the slots itself at one token: 1.32x (H200, "Ninth round"); with the
# launches of one token programmatic dependent launches (quant_matmul.pdl_launch) 1.27x, and 1.38-1.40x with Q4_K down
# experts ("Tenth round")
# With Q4_K gate and up side by side in each step of their launch (one row of each x 4 blocks, one warp) and, at one
# token, a token's slots side by side in a Q4_K down launch (4 rows x 2 blocks x 8 slots, 8 warps): about 1.28-1.30x
# the read time with Q4_K down experts at one token (1.39-1.40x before), 1.23-1.24x with aligned Q6_K ones (1.28x)
# (H200, bench/results/kernels-NVIDIA_H200-int8.md, "Eleventh round"; the slots side by side were 1-3% slower at 4
# tokens, so they stop at one). That down launch in two groups of 4 rows x 1 block x 8 slots, 4 warps, sharing their
# activation loads, the ids read before the grid-dependency wait: 79.7-82.2% of copy bandwidth against 70.7-73.2% for
# one group (1.12x), the layer 1.19-1.24x the read time against 1.25-1.29x ("Fourteenth round")
# The aligned Q6_K down launch (Q4_K_M's more-bits layers) with a token's slots side by side too, in two groups of one
# row x 2 blocks x 8 slots, two warps: 79.1-82.7% of copy bandwidth against 74.4-77.6% for the launch that adds the
# slots in turn, each repeated (four runs; 28.3-29.0 against 30.3-30.8 us); after h's quantizer, as the layer runs it,
# 0.3-0.4 us faster, and the layer the same (66.5-67.2 us) ("Fifteenth round")
# At one token the down launch of either type then holds its slots' activations in registers and walks its rows, four
# programs of 8 warps per SM, 2 rows a step (moe_down_held_q8_kernel): alone, repeated, 81.6-84.8% of copy bandwidth
# with aligned Q6_K down experts and 82.4-85.6% with Q4_K ones, against 79.2-80.1% and 76.7-77.6% for the slots'
# launch; after h's quantizer, as the layer runs it, 0.4-1.2 us and 1.7-2.1 us faster; the layer -0.1-1.7 us (Q6_K)
# and 1.0-1.8 us (Q4_K) faster: 1.21-1.24x and 1.22x its read time (H200, four runs, seven allocations; "Sixteenth
# round")
DEFAULT = MoEConfig(mmvq_loads=14, mmvq_up=(4, 2, 1), mmvq_down=(4, 2, 1, 14), gate_up_lines=(1, 4, 1),
                    down_slots=(4, 1, 4, 2), early_weights=False, down_slots_aligned=(1, 2, 2, 2), down_held=(4, 2))


def _check(x, ids, weights, gate, up, down, gate_type, up_type, down_type):
    """Validate shapes, dtypes and devices; returns the three normalised types and (E, I, D)."""
    types = [ggml_type(t) for t in (gate_type, up_type, down_type)]
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _FLOAT_TYPES:
        raise KernelInputError("moe: x must be a 2-D (T, D) float16/bfloat16/float32 tensor")
    T, D = x.shape
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != T or ids.dtype not in (torch.int64, torch.int32):
        raise KernelInputError(f"moe: ids must be an integer (T={T}, K) tensor, got {getattr(ids, 'shape', ids)}")
    if not isinstance(weights, torch.Tensor) or weights.shape != ids.shape or weights.dtype != torch.float32:
        raise KernelInputError(f"moe: weights must be float32 with the shape of ids {tuple(ids.shape)}")
    for name, w in (("gate", gate), ("up", up), ("down", down)):
        if not isinstance(w, torch.Tensor) or w.dtype != torch.uint8 or w.dim() != 3 or not w.is_contiguous():
            raise KernelInputError(f"moe: {name} must be a contiguous 3-D uint8 tensor (E, rows, row_bytes) of GGUF bytes")
    E, I = gate.shape[0], gate.shape[1]
    if up.shape[:2] != (E, I) or down.shape[:2] != (E, D):
        raise KernelInputError(
            f"moe: gate {tuple(gate.shape)}, up {tuple(up.shape)} and down {tuple(down.shape)} do not stack E experts "
            f"of (I, D) / (I, D) / (D, I) weights with D={D}"
        )
    for name, w, t, k in (("gate", gate, types[0], D), ("up", up, types[1], D), ("down", down, types[2], I)):
        fmt = block_format(t)
        if k % fmt.block_size or w.shape[2] != tensor_nbytes(t, (1, k)):
            raise KernelInputError(
                f"moe: {name} rows of {w.shape[2]} bytes are not {t.name} rows of {k} elements "
                f"({tensor_nbytes(t, (1, k)) if k % fmt.block_size == 0 else 'not a whole number of blocks'})"
            )
    devices = {t.device for t in (x, ids, weights, gate, up, down)}
    if len(devices) != 1:
        raise KernelInputError(f"moe: all tensors must be on one device, got {sorted(map(str, devices))}")
    if x.is_cuda and x.dtype == torch.bfloat16 and device_info(x.device)[0] < (8, 0):
        raise KernelInputError("moe: bfloat16 needs compute capability 8.0+; use float16 on this GPU")
    return types, (E, I, D)


def moe_quant_ref(x, ids, weights, gate, up, down, gate_type, up_type, down_type) -> torch.Tensor:
    """Reference: for every expert that is used, dequantize its three matrices and apply it, in float32."""
    (gt, ut, dt), (E, I, D) = _check(x, ids, weights, gate, up, down, gate_type, up_type, down_type)
    xf = x.to(torch.float32)
    out = torch.zeros(x.shape[0], D, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        if not 0 <= e < E:
            continue  # an id outside [0, E) selects no expert
        tok, slot = (ids == e).nonzero(as_tuple=True)
        xe = xf[tok]  # (n, D)
        h = F.silu(xe @ dequantize(gate[e], gt, (I, D)).T) * (xe @ dequantize(up[e], ut, (I, D)).T)  # (n, I)
        y = h @ dequantize(down[e], dt, (D, I)).T  # (n, D)
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out


def moe_quant(x, ids, weights, gate, up, down, gate_type, up_type, down_type, *,
              config: MoEConfig | None = None, aligned: bool = False) -> torch.Tensor:
    """Fused MoE layer: x (T, D), ids/weights (T, K), gate/up (E, I, row bytes of D), down (E, D, row
    bytes of I) in GGUF types ``*_type`` -> (T, D) float32. An id outside [0, E) adds nothing. ``aligned``: the
    Q6_K ones among the three are in the aligned layout (``kernels.q6k_layout``)."""
    types, (E, I, D) = _check(x, ids, weights, gate, up, down, gate_type, up_type, down_type)
    aligned = aligned and GGMLType.Q6_K in types
    if not x.is_cuda:
        if aligned:
            gate, up, down = (from_aligned(w) if t == GGMLType.Q6_K else w for w, t in zip((gate, up, down), types))
        return moe_quant_ref(x, ids, weights, gate, up, down, *types)
    T, K = ids.shape
    P = T * K
    if P == 0:
        return torch.zeros(T, D, dtype=torch.float32, device=x.device)
    cfg = config or DEFAULT
    flat_ids = ids.reshape(P).to(torch.int64)
    flat_w = weights.reshape(P).contiguous()
    if P < cfg.sorted_min_pairs:
        if cfg.q8 and all(t in FUSED_TYPES for t in types):
            y = _moe_pairs_q8(x, flat_ids, flat_w, gate, up, down, types, (E, I, D, K), cfg, aligned)
            if K == 1 or cfg.sums_slots(types, aligned, T):
                return y  # (T, D) already
        elif aligned:
            raise KernelInputError("moe: the float matrix-vector decode (MoEConfig.q8=False) reads Q6_K in GGUF's "
                                   "layout only; use the int8 decode for aligned Q6_K experts")
        else:
            y = _moe_pairs(x, flat_ids, flat_w, gate, up, down, types, (E, I, D, K), cfg)
    else:
        y = _moe_sorted(x, flat_ids, flat_w, gate, up, down, types, (E, I, D, K), cfg, aligned)
    return y if K == 1 else y.view(T, K, D).sum(1)  # (T, D): the K slots added in a fixed order


def moe_dense(x, ids, weights, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, *,
              config: MoEConfig | None = None) -> torch.Tensor:
    """``moe_quant`` for unquantized stacked weights: gate/up (E, I, D), down (E, D, I), one float dtype."""
    if not all(isinstance(w, torch.Tensor) for w in (gate, up, down)) or len({gate.dtype, up.dtype, down.dtype}) != 1 \
            or gate.dtype not in _FLOAT_TYPES:
        raise KernelInputError("moe_dense: gate, up and down must share one float16/bfloat16/float32 dtype")
    t = _FLOAT_TYPES[gate.dtype]
    rows = [w.contiguous().view(torch.uint8) for w in (gate, up, down)]  # (E, rows, bytes)
    return moe_quant(x, ids, weights, *rows, t, t, t, config=config)


def _units(t: GGMLType, k: int, q4k_block: bool) -> int:
    from tierlm.kernels.triton_gemv import units_per_row

    return units_per_row(int(t), k, q4k_block)


def _moe_pairs(x, ids, wts, gate, up, down, types, dims, cfg: MoEConfig) -> torch.Tensor:
    """Decode: one program per (pair, 32 * rows weight rows); no sorting. Returns y (P, D)."""
    from tierlm.kernels import triton_moe as tm

    (gt, ut, dt), (E, I, D, K) = types, dims
    P = ids.numel()
    xf = x.to(torch.float32).contiguous()  # converted once for every expert that reads it
    h = torch.empty(P, I, dtype=torch.float32, device=x.device)
    y = torch.empty(P, D, dtype=torch.float32, device=x.device)
    bn = 32 * cfg.rows
    tiles = dict(order_ptr=ids, tile_e_ptr=ids, tile_lo_ptr=ids, tile_hi_ptr=ids)  # unused without SORTED
    common = dict(BLOCK_M=1, BLOCK_N=bn, SORTED=False, USE_DOT=False, DOT_KIND=0, DOT_PREC="ieee",
                  W=cfg.num_warps, R=cfg.rows, ASM=not _interpreting(), Q4K_BLOCK=cfg.q4k_block,
                  num_warps=cfg.num_warps)
    qb = cfg.q4k_block
    tm.moe_up_kernel[(P, -(-I // bn))](
        xf, gate, up, h, ids, *tiles.values(), E, I, _units(gt, D, qb), _units(ut, D, qb), gate.shape[2], up.shape[2],
        gate[0].numel(), up[0].numel(), xf.stride(0), K,
        GATE_T=int(gt), BLOCK_G=32, NB_G=1, UP_T=int(ut), BLOCK_U=32, NB_U=1, **common)
    tm.moe_down_kernel[(P, -(-D // bn))](
        h, down, y, wts, ids, *tiles.values(), E, I, D, _units(dt, I, qb), down.shape[2], down[0].numel(),
        DOWN_T=int(dt), BLOCK_D=32, NB_D=1, **common)
    return y


def _moe_pairs_q8(x, ids, wts, gate, up, down, types, dims, cfg: MoEConfig, aligned: bool = False) -> torch.Tensor:
    """Decode with int8 activations: x quantized once for every expert that reads it, gate and up in
    one launch (one program per pair and block of rows), h quantized, then down. Returns y (P, D), or (T, D) with
    ``cfg.sums_slots``."""
    loads = q8_loads(cfg, types, gate, up, down, aligned)
    slots = dims[3] > 1 and cfg.slots_down(types, x.shape[0], aligned)
    q6 = types[2] == GGMLType.Q6_K  # aligned, where the slots' launch takes them
    xq, xd, xs = quantize_q8(x.contiguous(), pack=bool(loads[0] & 2))
    h = q8_gate_up(xq, xd, xs, ids, gate, up, types, dims, cfg, loads[0], aligned)
    hq, hd, hs = quantize_q8(h, pack=(slots and not q6) or bool(loads[1] & 2), pdl_rows=x.shape[0])
    if slots:  # ids and wts were written before x's quantizer, and each launch waits for the one before it
        return q8_down_slots(hq, hd, ids, wts, down, dims, cfg, early=cfg.early, aligned_q6k=q6)
    return q8_down(hq, hd, hs, ids, wts, down, types, dims, cfg, loads[1], aligned,
                   cfg.sums_slots(types, aligned, ids.numel() // dims[3]))


def q8_loads(cfg: MoEConfig, types, gate, up, down, aligned: bool = False) -> tuple[int, int]:
    """The LOADS bits of the int8 gate/up and down launches (one for gate and up, as their launch is one); none
    for a launch whose Q6_K weights are aligned (their step reads unpacked xd)."""
    gt, ut, dt = types
    q6 = GGMLType.Q6_K
    up_loads = mmvq_loads(gt, cfg.up_step()[3], gate, up) if gt == ut and not (aligned and q6 in (gt, ut)) else 0
    return up_loads, (0 if aligned and dt == q6 else mmvq_loads(dt, cfg.down_step()[3], down))


def _aligned_words(aligned: bool, K: int, weights) -> tuple[int, tuple | None]:
    """(ALIGNED, the step's (rows, blocks, warps) or None) of an int8 launch over (type, weight) pairs."""
    q6 = [w for t, w in weights if t == GGMLType.Q6_K]
    if not (aligned and q6):
        return 0, None
    *step, words = aligned_step(K, *q6)
    return words, (tuple(step) if len(q6) == len(weights) else None)


def q8_gate_up(xq, xd, xs, ids, gate, up, types, dims, cfg: MoEConfig, loads: int,
               aligned: bool = False) -> torch.Tensor:
    """The int8 gate/up launch on quantized x: h (P, I) float32."""
    from tierlm.kernels import triton_mmvq as tv

    (gt, ut, dt), (E, I, D, K) = types, dims
    P = ids.numel()
    ub, unb, uw, _ = cfg.up_step()
    side = cfg.gate_up_step(types, loads)
    if side:
        ub, unb, uw = side
    words, step = _aligned_words(aligned, D, ((gt, gate), (ut, up)))
    if step:
        ub, unb, uw = cfg.aligned_step or step
    nblk, warps = tv.fit_step(unb, uw, D)
    h = torch.empty(P, I, dtype=torch.float32, device=xq.device)
    tv.moe_up_q8_kernel[(P, -(-I // ub))](
        xq, xd, xs, gate, up, h, ids, E, I, D, D // tv.BLOCK_ELEMS[int(gt)], D // tv.BLOCK_ELEMS[int(ut)],
        gate.shape[2], up.shape[2], gate[0].numel(), up[0].numel(), K, GATE_T=int(gt), UP_T=int(ut), BN=ub,
        NBLK=nblk, LOADS=loads, num_warps=warps, ASM=not _interpreting(), PF=cfg.mmvq_pf, ALIGNED=words,
        GU=bool(side), **pdl_launch(xq.device, P // K))
    return h


def swiglu_q8(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_type, up_type, *, aligned: bool = False,
              cfg: MoEConfig = DEFAULT) -> torch.Tensor:
    """h = silu(x gate^T) * (x up^T), (T, I) float32, for the rows of x (T, D) and one pair of quantized matrices
    gate, up (I, RB): x quantized once, then the int8 gate/up launch of a MoE of one expert (Q4_K gate and up side
    by side in each step, where ``cfg.gate_up_step`` says). The gate and up of a dense layer or a shared expert at one
    row (``model.quantized.fused_mlp``): one launch reads both matrices, where two products read one each."""
    types = (ggml_type(gate_type), ggml_type(up_type))
    if x.dim() != 2 or gate.dim() != 2 or gate.shape != up.shape:
        raise KernelInputError(f"swiglu_q8: x {tuple(x.shape)} must be (T, D) and gate {tuple(gate.shape)}, up "
                               f"{tuple(up.shape)} the same (I, RB)")
    if not all(t in FUSED_TYPES for t in types):
        raise KernelInputError(f"swiglu_q8: the int8 launch reads {sorted(t.name for t in FUSED_TYPES)}, not "
                               f"{types[0].name}/{types[1].name}; run the two products with quant_matmul")
    if not (x.is_cuda or _interpreting()):
        raise KernelInputError("swiglu_q8 runs Triton kernels: x must be on a CUDA device (or under "
                               "TRITON_INTERPRET=1); on the CPU run the two products with quant_matmul")
    (T, D), I = x.shape, gate.shape[0]
    gate, up = gate[None], up[None]  # one expert: (1, I, RB)
    types = (*types, types[0])  # no down matrix: its type only fills the triple the launch helpers take
    loads = q8_loads(cfg, types, gate, up, gate, aligned)[0]
    xq, xd, xs = quantize_q8(x.contiguous(), pack=bool(loads & 2))
    return q8_gate_up(xq, xd, xs, _zero_ids(x.device, T), gate, up, types, (1, I, D, 1), cfg, loads, aligned)


@functools.lru_cache(maxsize=None)
def _zero_ids(device: torch.device, n: int) -> torch.Tensor:
    """n expert ids, all 0 (int64), made once per device: not a fill launch in every decode step."""
    return torch.zeros(n, dtype=torch.int64, device=device)


def q8_down_slots(hq, hd, ids, wts, down, dims, cfg: MoEConfig, early: bool = False,
                  maxnreg: int | None = None, aligned_q6k: bool = False) -> torch.Tensor:
    """The int8 down launch of Q4_K experts with a token's K slots side by side (``moe_down_slots_q8_kernel``) on
    quantized h with packed (xd, xs) pairs ``hd``: y (T, D) float32, the slots weighted and added. ``early``: ids and
    wts were written before the launch that wrote hq (the kernel's EARLY). ``maxnreg``: a cap on the
    launch's registers per thread (timings). ``aligned_q6k``: the experts are Q6_K in the aligned layout and ``hd``
    h's unpacked xd (the step of ``cfg.down_slots_aligned``; ids alone read before the wait)."""
    from tierlm.kernels import triton_mmvq as tv

    E, I, D, K = dims
    P = ids.numel()
    T = P // K
    if cfg.down_held:
        return _q8_down_held(hq, hd, ids, wts, down, dims, cfg, early, maxnreg, aligned_q6k)
    bn, dnb, dw, *groups = cfg.down_slots_aligned if aligned_q6k else cfg.down_slots
    words = q6k_words(I, down) if aligned_q6k else 0
    g = groups[0] if groups else 1
    kp = 1 << (K - 1).bit_length()  # K rounded up to a power of two
    nblk, warps = tv.fit_step(dnb, dw, I)
    y = torch.empty(T, D, dtype=torch.float32, device=hq.device)
    tv.moe_down_slots_q8_kernel[(T, -(-D // (bn * g)))](
        hq, hd, down, y, wts, ids, E, I, D, I // tv.BLOCK_ELEMS[tv.Q4_K], down.shape[2], down[0].numel(), K, KP=kp,
        BN=bn, NBLK=nblk, ASM=not _interpreting(), num_warps=warps, EARLY=early,
        PRELOAD=cfg.early_weights and not aligned_q6k, PF=cfg.slots_pf, WCM=cfg.slots_cache[0],
        AEV=cfg.slots_cache[1], G=g, maxnreg=maxnreg, DOWN_T=tv.Q6_K if aligned_q6k else tv.Q4_K, ALIGNED=words,
        **pdl_launch(hq.device, T))
    return y


def _q8_down_held(hq, hd, ids, wts, down, dims, cfg: MoEConfig, early: bool, maxnreg: int | None,
                  aligned_q6k: bool) -> torch.Tensor:
    """``q8_down_slots`` through ``moe_down_held_q8_kernel`` (``cfg.down_held``): y (T, D). Its programs walk their
    rows in one wave, so the grid is the programs asked for per multiprocessor, cut to as many as fit one
    (``_resident``, from the compiled kernel's registers after its first launch: the decode graphs are captured after
    an eager step)."""
    from tierlm.kernels import triton_mmvq as tv

    E, I, D, K = dims
    T = ids.numel() // K
    per_sm, g, pf, cap = cfg.held_form()
    words = q6k_words(I, down) if aligned_q6k else 4
    nb = I // 256
    NB = 1 << (nb - 1).bit_length()
    kp = 1 << (K - 1).bit_length()
    lanes = NB * 16 // words  # a slot's lanes, and the most rows a program keeps
    if kp * lanes > 1024:
        raise KernelInputError(f"moe down (held activations): {kp} slots x {lanes} lanes a row (rows of {I} "
                               "elements) do not fit a program of 1024 threads; use the slots' launch "
                               "(MoEConfig.down_held=())")
    warps = max(1, kp * lanes // 32)
    key = (hq.device, kp, NB, words, g, pf, maxnreg or cap, aligned_q6k)
    units = -(-D // g)
    sms = device_info(hq.device)[1] if hq.device.type == "cuda" else 1
    nprog = min(units, max(-(-units // (lanes // g)), sms * min(per_sm, _HELD_RESIDENT.get(key, per_sm))))
    y = torch.empty(T, D, dtype=torch.float32, device=hq.device)
    kernel = tv.moe_down_held_q8_kernel[(T, nprog)](
        hq, hd, down, y, wts, ids, E, I, D, nb, down.shape[2], down[0].numel(), K, nprog, KP=kp, NB=NB, W=words, G=g,
        ASM=not _interpreting(), num_warps=warps, EARLY=early, FULL=nb == NB, PF=pf,
        DOWN_T=tv.Q6_K if aligned_q6k else tv.Q4_K, maxnreg=maxnreg or cap, **pdl_launch(hq.device, T))
    if key not in _HELD_RESIDENT and hq.device.type == "cuda":
        _HELD_RESIDENT[key] = _resident(hq.device, getattr(kernel, "n_regs", 0), warps)
    return y


_HELD_RESIDENT: dict = {}  # (device, the launch's constants) -> programs of moe_down_held_q8_kernel one SM holds


def _resident(device: torch.device, regs: int, warps: int) -> int:
    """Programs of ``warps`` warps at ``regs`` registers a thread that one multiprocessor holds at once (registers
    are given to a warp 256 at a time), as far as registers and threads go; large where ``regs`` is unknown (0)."""
    props = torch.cuda.get_device_properties(device)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps)
    if regs <= 0:
        return by_threads
    per_warp = -(-regs * 32 // 256) * 256
    return max(1, min(by_threads, getattr(props, "regs_per_multiprocessor", 65536) // (per_warp * warps)))


def q8_down(hq, hd, hs, ids, wts, down, types, dims, cfg: MoEConfig, loads: int, aligned: bool = False,
            sum_slots: bool = False) -> torch.Tensor:
    """The int8 down launch on quantized h: y (P, D) float32, each pair's row weighted; ``sum_slots``: each token's K
    rows added, y (T, D)."""
    from tierlm.kernels import triton_mmvq as tv

    (gt, ut, dt), (E, I, D, K) = types, dims
    P = ids.numel()
    bn, dnb, dw, _ = cfg.down_step()
    words, step = _aligned_words(aligned, I, ((dt, down),))
    if step:
        bn, dnb, dw = cfg.aligned_step or step
    nblk, warps = tv.fit_step(dnb, dw, I)
    rows = P // K if sum_slots else P
    y = torch.empty(rows, D, dtype=torch.float32, device=hq.device)
    tv.moe_down_q8_kernel[(rows, -(-D // bn))](
        hq, hd, hs, down, y, wts, ids, E, I, D, I // tv.BLOCK_ELEMS[int(dt)], down.shape[2], down[0].numel(), K,
        DOWN_T=int(dt), BN=bn, NBLK=nblk, ASM=not _interpreting(), PF=cfg.mmvq_pf,
        LOADS=loads, ALIGNED=words, SUM=sum_slots, num_warps=warps,
        **pdl_launch(hq.device, P // K))
    return y


def moe_quant_q8_ref(x, ids, weights, gate, up, down, gate_type, up_type, down_type) -> torch.Tensor:
    """Reference of the int8-activation decode path: ``moe_quant_ref`` with x and h rounded to their
    int8 groups (``quant_matmul.quantize_q8_ref``) before each product, float32 (T, D)."""
    (gt, ut, dt), (E, I, D) = _check(x, ids, weights, gate, up, down, gate_type, up_type, down_type)

    def q8(v):
        q, d, _ = quantize_q8_ref(v)
        return (q.to(torch.float32).view(v.shape[0], -1, 32) * d[..., None]).view(v.shape)

    xf = q8(x.to(torch.float32))
    out = torch.zeros(x.shape[0], D, dtype=torch.float32, device=x.device)
    for e in ids.unique().tolist():
        if not 0 <= e < E:
            continue
        tok, slot = (ids == e).nonzero(as_tuple=True)
        xe = xf[tok]
        h = F.silu(xe @ dequantize(gate[e], gt, (I, D)).T) * (xe @ dequantize(up[e], ut, (I, D)).T)
        y = q8(h) @ dequantize(down[e], dt, (D, I)).T
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out


def _route(ids: torch.Tensor, E: int, block_m: int):
    """Tiles of up to block_m pairs of one expert over the expert-sorted pair order, built on the
    device without a host sync: (order, tile_e, tile_lo, tile_hi), tile_e = -1 past the last tile."""
    P = ids.numel()
    key = torch.where((ids >= 0) & (ids < E), ids, E)  # ids outside [0, E) sort last and get no tile
    order = torch.sort(key, stable=True).indices  # (P,) pair ids, grouped by expert
    counts = torch.zeros(E + 1, dtype=torch.int64, device=ids.device).scatter_add_(0, key, torch.ones_like(key))[:E]
    tiles = (counts + block_m - 1) // block_m  # (E,)
    tile_end = torch.cumsum(tiles, 0)
    pair_start = torch.cumsum(counts, 0) - counts
    n_max = -(-P // block_m) + min(E, P)  # at most one partly filled tile per expert
    t = torch.arange(n_max, device=ids.device)
    te = torch.searchsorted(tile_end, t, right=True)  # expert of tile t; E past the last tile
    real = te < E
    ec = te.clamp(max=E - 1)
    lo = pair_start[ec] + (t - (tile_end[ec] - tiles[ec])) * block_m
    hi = pair_start[ec] + counts[ec]
    i32 = torch.int32
    return (order.to(i32), torch.where(real, te, -1).to(i32), torch.where(real, lo, 0).to(i32),
            torch.where(real, hi, 0).to(i32))


def _moe_sorted(x, ids, wts, gate, up, down, types, dims, cfg: MoEConfig, aligned: bool = False) -> torch.Tensor:
    """Prefill: expert-sorted tiles through tl.dot (tf32 for float32 operands on sm_80+). Returns y (P, D)."""
    from tierlm.kernels import triton_moe as tm
    from tierlm.kernels import triton_q as tq

    (gt, ut, dt), (E, I, D, K) = types, dims
    P = ids.numel()
    cap = device_info(x.device)[0] if x.is_cuda else (8, 0)
    order, tile_e, tile_lo, tile_hi = _route(ids, E, cfg.block_m)
    xc = x.contiguous()
    h = torch.empty(P, I, dtype=torch.float32, device=x.device)
    y = torch.zeros(P, D, dtype=torch.float32, device=x.device)  # pairs with no expert stay 0
    prec = "tf32" if cap >= (8, 0) else "ieee"
    mmq = cfg.sorted_mmq and cap >= (8, 0) and cfg.block_m >= 16 and all(t in FUSED_TYPES for t in types)
    if mmq:  # the Q4_K decode reads block headers as 32-bit words
        gate, up, down = (_word_aligned(w) if t == GGMLType.Q4_K else w for w, t in zip((gate, up, down), types))
    common = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, SORTED=True, USE_DOT=True, DOT_PREC=prec,
                  W=1, R=1, ASM=mmq and not _interpreting(), MMQ=mmq, ALIGNED=aligned, num_warps=cfg.tile_warps)

    def geo(t):
        block = tq.BLOCK_ELEMS[int(t)]
        return block, max(1, cfg.k_step // block)

    (bg, nbg), (bu, nbu), (bd, nbd) = geo(gt), geo(ut), geo(dt)
    n_tiles = tile_e.numel()
    tm.moe_up_kernel[(n_tiles, -(-I // cfg.block_n))](
        xc, gate, up, h, ids, order, tile_e, tile_lo, tile_hi, E, I, D // bg, D // bu, gate.shape[2], up.shape[2],
        gate[0].numel(), up[0].numel(), xc.stride(0), K,
        GATE_T=int(gt), BLOCK_G=bg, NB_G=nbg, UP_T=int(ut), BLOCK_U=bu, NB_U=nbu,
        DOT_KIND={torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[x.dtype], **common)
    tm.moe_down_kernel[(n_tiles, -(-D // cfg.block_n))](
        h, down, y, wts, ids, order, tile_e, tile_lo, tile_hi, E, I, D, I // bd, down.shape[2], down[0].numel(),
        DOWN_T=int(dt), BLOCK_D=bd, NB_D=nbd, DOT_KIND=0, **common)
    return y
