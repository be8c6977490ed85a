"""What a single kernel launch can read on this GPU, against what the int8 decode kernels reach.

The decode kernels are judged against a 2 GiB device copy. This script measures, in one run and
with ``bench/kernels.py``'s timing (weights rotated past the L2, calls replayed from a CUDA graph):

1. ``empty``: a one-program kernel, i.e. the launch gap a graph leaves between kernels;
2. ``flat``: a plain read of the same number of bytes as each decode shape (16-byte loads, every
   thread's loads issued before its first use), for a few program sizes: the ceiling of one launch;
3. ``pattern``: the bytes of a Q4_K / Q6_K weight read with ``mmvq_kernel``'s own geometry and fetch
   helpers, summed without decoding: the cost of the access pattern alone;
4. ``mmvq``: the product kernel alone (activations quantized beforehand), and ``quant_matmul``
   (quantizer included) as shipped; ``--steps`` and ``--loads`` add other launch forms;
5. the fused MoE at one token.

Every product is checked against ``quant_matmul_q8_ref`` / ``moe_quant_q8_ref``.

Usage: PYTHONPATH=. python bench/read_ceiling.py --out DIR
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import GB, MOE, copy_bandwidth, graph_time, moe_setup, moe_weights, n_copies, random_weight  # noqa: E402

from tierlm.kernels import triton_mmvq as tv  # noqa: E402
from tierlm.kernels.triton_q import row_stride  # noqa: E402
from tierlm.kernels.moe import DEFAULT as MOE_DEFAULT  # noqa: E402
from tierlm.kernels.moe import MoEConfig  # noqa: E402
from tierlm.kernels.quant_matmul import (MMVQ_TILES, QMMConfig, quant_matmul, quant_matmul_q8_ref,  # noqa: E402
                                         quantize_q8)
from tierlm.weights.formats import GGMLType  # noqa: E402

T = GGMLType
SHAPES = [  # (name, N, K, type)
    ("expert gate/up 7168->2048", 2048, 7168, T.Q4_K),
    ("expert down 2048->7168", 7168, 2048, T.Q6_K),
    ("dense up 7168->18432", 18432, 7168, T.Q4_K),
    ("o_proj 16384->7168", 7168, 16384, T.Q4_K),
    ("head 7168->129280", 129280, 7168, T.Q6_K),
    ("dense down 18432->7168", 7168, 18432, T.Q6_K),
    ("q_b 1536->24576", 24576, 1536, T.Q4_K),
    ("expert down 2048->7168 (Q4_K)", 7168, 2048, T.Q4_K),
]
FLAT = [(1, 1), (4, 1), (4, 4), (8, 2), (2, 8)]  # (warps, 16-byte loads per thread)
# ((rows, blocks per step, warps), LOADS) timed with --loads (a bit 4, activations loaded once for all rows of
# a step, was measured slower everywhere and removed: commit 8f0e8da, read-ceiling-NVIDIA_H200-rows-in-registers.json)
# LOADS & 4: eight threads per Q4_K block (the default at one row); a loads value + 16: with prefetch
# LOADS & 8: the same steps in fewer instructions (_q4k_rows32p with 4 and 2; _q6k_rows16p); a third number:
# maxnreg (registers per thread), timed without the quantizer only
LOAD_VARIANTS = {T.Q4_K: [((1, 8, 1), 6), ((4, 2, 1), 6), ((1, 8, 1), 14), ((1, 8, 1), 30), ((4, 2, 1), 30),
                          ((2, 4, 1), 30), ((1, 16, 2), 14), ((1, 16, 2), 30), ((1, 16, 2), 14, 48),
                          ((1, 16, 2), 6, 40), ((2, 8, 2), 14, 48), ((1, 32, 4), 14, 48), ((4, 4, 2), 14, 48),
                          ((1, 8, 2), 14, 48), ((1, 8, 1), 14, 48)],
                 T.Q6_K: [((2, 2, 1), 4), ((4, 2, 1), 4), ((8, 2, 2), 4), ((2, 2, 1), 12), ((2, 1, 1), 12),
                          ((4, 2, 1), 4, 40), ((8, 2, 2), 4, 40), ((8, 4, 4), 4, 40), ((16, 2, 4), 4, 40),
                          ((4, 2, 2), 4, 40), ((2, 2, 1), 4, 40)]}
# (rows, blocks, warps, LOADS) of the gate/up launch (the down launch keeps the default)
MOE_LOADS = [(4, 2, 1, 14), (1, 8, 1, 14)]
# (rows, blocks, warps, LOADS) of the down launch (LOADS & 4: sixteen threads per Q6_K block, eight per Q4_K
# block; & 8: in fewer instructions)
MOE_DOWN = [(4, 2, 1, 14), (2, 2, 1, 14)]
# whole configurations: the lean steps in both launches (up, down, prefetch)
MOE_LEAN = [((4, 2, 1), (4, 2, 1, 14), False), ((4, 2, 1), (8, 2, 2, 14), False), ((4, 2, 1), (4, 2, 1, 14), True),
            ((2, 4, 1), (2, 2, 1, 14), False), ((1, 8, 1), (2, 2, 1, 14), True)]
PATTERN8 = [(1, 8, 1), (1, 4, 1), (1, 16, 2), (2, 8, 2)]  # (rows, blocks, warps) of the eight-thread walk
# (rows, blocks, warps) of the Q4_K lean step with several activation rows per program, timed with --multi
MULTI_STEPS = [(1, 8, 1), (2, 4, 1), (4, 2, 1), (1, 8, 2), (2, 4, 2), (4, 2, 2)]
MULTI_M = (2, 3, 4)
# ((rows, blocks per step, warps), LOADS) of one-row Q4_K steps timed with --candidates (each thread one 16-byte
# piece or more: rows x blocks x 8 >= 32 x warps), and (gate/up step, down step) of the MoE at one token
CANDIDATES = {T.Q4_K: [((1, 8, 1), 6), ((1, 8, 2), 14), ((2, 4, 2), 14), ((4, 2, 2), 14), ((4, 2, 1), 14),
                       ((1, 16, 2), 14), ((2, 8, 4), 14), ((4, 4, 4), 14)],
              T.Q6_K: [((2, 2, 1), 4), ((2, 2, 2), 4), ((1, 4, 2), 4), ((4, 1, 2), 4), ((2, 4, 4), 4), ((4, 2, 4), 4),
                       ((2, 2, 2), 12), ((1, 4, 2), 12), ((8, 1, 4), 12), ((1, 8, 4), 12)]}
# (gate/up step, down step) of the MoE at one token, timed with --candidates (run with more entries, and with gate and
# up in separate programs, in read-ceiling-NVIDIA_H200-candidates-run2.json and -moe-gate-up-split.json)
MOE_CANDIDATES = [((4, 2, 2), (4, 2, 1, 14)), ((2, 4, 2), (4, 2, 1, 14)), ((4, 2, 1), (4, 2, 2, 14)),
                  ((4, 2, 1), (8, 2, 2, 14))]
# --fused: the MoE with gate and up rows side by side in the gate/up launch (its (rows, blocks, warps); MOE_GU), with a
# token's slots side by side in the Q4_K down launch (MOE_SLOTS), and both (MOE_GU_SLOTS). The first run also timed h
# quantized by the gate/up launch in programs of 32 rows ((32, 2, 8), (32, 1, 4), (32, 1, 8), (32, 4, 16)): 2.5-13 us
# slower than the default (read-ceiling-NVIDIA_H200-fused.json), so that form was removed again
MOE_SLOTS = [(4, 2, 8), (2, 2, 4)]
MOE_GU = [(1, 4, 1), (2, 2, 1), (1, 8, 2)]
MOE_GU_SLOTS = [((2, 2, 1), (4, 2, 8)), ((1, 4, 1), (2, 2, 4)), ((1, 2, 1), (4, 2, 8))]
# (The first --fused run also timed one-row Q4_K steps that load the next step's weights first, LOADS 30, in two- and
# four-warp programs: 61-73% of copy bandwidth on dense up and 54-71% on o_proj, against 78% and 73% for the defaults
# in the same run, read-ceiling-NVIDIA_H200-fused.json.)
# --moe-parts: (rows, blocks, warps) of the Q4_K down launch with a token's slots side by side (MoEConfig.down_slots),
# and steps of the aligned Q6_K down launch (MoEConfig.aligned_step)
MOE_SLOT_STEPS = [(1, 1, 1), (1, 2, 1), (2, 1, 1), (1, 2, 2), (2, 1, 2), (4, 1, 4), (2, 2, 2), (4, 2, 4), (8, 1, 8),
                  (4, 1, 8)]
# (read-ceiling-NVIDIA_H200-down-walk-runs.json timed (1, 8, 1), (4, 2, 1), (1, 4, 1), (2, 8, 2), (4, 4, 2) and
# (2, 2, 1): all slower than the default (2, 4, 1))
# ... with G blocks of rows per program sharing their activation loads: (rows, blocks, warps, G)
MOE_SLOT_GROUPS = [(4, 2, 8), (1, 1, 1, 2), (4, 1, 4, 2), (2, 1, 2, 2), (1, 2, 2, 2), (2, 2, 4, 2), (4, 1, 4, 3),
                   (4, 1, 4, 4), (2, 1, 1, 2), (4, 1, 2, 2), (2, 1, 2, 4)]
# (read-ceiling-NVIDIA_H200-slots-groups-ids.json also timed (1, 2, 1, 2), (4, 1, 8, 4) and (2, 1, 4, 4): at most 78%)
# (read-ceiling-NVIDIA_H200-slots-groups-early.json also timed (8, 1, 8, 2) and (1, 1, 2, 2): 43-71%)
# (read-ceiling-NVIDIA_H200-slots-groups.json also timed (4, 1, 8, 2), (4, 2, 8, 2), (2, 2, 4, 2), (1, 1, 1, 4) and
# (2, 1, 4, 2) with ids alone read before the wait: 59-71% of copy bandwidth, against 79.5-79.9% for (1, 1, 1, 2))
# ... with each step's next weights loaded before its math (MoEConfig.slots_pf)
MOE_SLOT_PF_STEPS = [(4, 2, 8), (4, 1, 8), (4, 2, 4), (2, 2, 4), (4, 1, 4)]
# ... (step, next weights loaded first, registers per thread capped at)
MOE_SLOT_CAPS = [((4, 2, 8), False, 40), ((4, 2, 8), False, 32), ((4, 2, 8), True, 48), ((4, 1, 8), True, 40),
                 ((4, 1, 4, 2), False, 64), ((4, 1, 4, 2), False, 56), ((2, 1, 2, 2), False, 64),
                 ((1, 1, 1, 2), False, 64)]
# ... (step, next weights loaded first, (weight loads' cache modifier, activation loads' eviction policy))
MOE_SLOT_CACHES = [((4, 2, 8), False, (1, 0)), ((4, 2, 8), False, (1, 1)),
                   ((4, 2, 8), False, (0, 1)), ((4, 2, 8), False, (2, 0)),
                   ((4, 2, 8), True, (1, 0)), ((4, 1, 8), False, (1, 0)), ((8, 1, 8), False, (1, 0)),
                   ((2, 2, 4), False, (1, 0)), ((1, 1, 1), False, (1, 0)), ((1, 2, 2), False, (1, 0)),
                   ((8, 2, 8), False, (1, 0)), ((16, 1, 8), False, (1, 0))]
# bare walks of the slots' launch (slots_walk_kernel): (step, activations read too, next weights loaded first,
# the weight loads' cache modifier)
MOE_SLOT_WALKS = [((4, 2, 8), False, False, 0), ((4, 2, 8), True, False, 0), ((4, 2, 8), True, False, 1),
                  ((4, 1, 8), True, True, 0), ((4, 1, 8), True, True, 1)]
CACHE_MODIFIERS, EVICTION = {0: "plain", 1: ".cg", 2: "evict_first"}, {0: "plain", 1: "evict_last"}
MOE_Q6K_STEPS = [(2, 4, 2), (1, 8, 2), (1, 4, 2), (2, 8, 4)]
MOE_Q6K_SLOT_CAPS = [((1, 2, 2, 2), 64), ((1, 2, 2, 2), 56), ((1, 2, 2, 2), 48), ((1, 1, 1, 2), 64),
                     ((1, 1, 1, 2), 56), ((2, 2, 4, 2), 64)]  # ... (step, registers per thread capped at)
MOE_Q6K_LAYER = [(1, 2, 2, 2), (2, 2, 4, 2), (1, 1, 1, 2)]  # ... timed in whole layers too
# ... (rows, blocks, warps, G) of the aligned Q6_K down launch with a token's slots side by side
# (MoEConfig.down_slots_aligned): 16 / W lanes a block (4 on DeepSeek-V3's down rows), G blocks of rows a program
MOE_Q6K_SLOTS = [(1, 2, 2, 2), (2, 2, 4, 2), (1, 1, 1, 2), (2, 2, 2), (1, 2, 2, 4)]
# (programs per multiprocessor, rows a step[, next step loaded first]) of the down launch that holds its slots'
# activations in registers and walks its rows (MoEConfig.down_held), for either down type
MOE_HELD = [(3, 2, True), (4, 2), (4, 1, True), (4, 2, True, 64), (4, 1)]
# (read-ceiling-NVIDIA_H200-held-3.json also timed (5, 1, True, 48): 79.4-80.0%)
MOE_HELD_LAYER = [(3, 2, True), (4, 2), (4, 1, True)]  # ... timed in whole layers
# and after h's quantizer too
# (read-ceiling-NVIDIA_H200-held-2.json also timed (5, 2, False, 48), (3, 3), (3, 4), (2, 4), (4, 4, False, 64) and
# (4, 3, False, 64): 69.5-84.8%)
# (read-ceiling-NVIDIA_H200-held.json also timed (3, 1), (3, 2), (2, 1), (2, 2), (4, 1), (3, 1, True),
# (2, 2, True) and (6, 1): 66-85%, against 87.7-89.4% for (3, 2, True))
# (read-ceiling-NVIDIA_H200-q6k-slots-2.json also timed (2, 1, 2, 2), (4, 1, 4, 2), (2, 1, 1, 2), (1, 2, 2, 3),
# (2, 2, 4, 3), (1, 2, 1, 1), (4, 2, 8, 2) and (2, 1, 2, 3): 67-77%, against 81.6-82.7% for (1, 2, 2, 2))
# (read-ceiling-NVIDIA_H200-q6k-slots.json also timed (1, 4, 4), (1, 8, 8), (1, 2, 2), (2, 4, 8), (2, 2, 4),
# (1, 4, 2), (1, 4, 4, 2), (1, 8, 8, 2), (1, 4, 2, 2), (2, 2, 2, 2), (1, 2, 1, 2), (1, 4, 4, 4), (1, 1, 1, 4) and
# (2, 4, 8, 2): 60-77% of copy bandwidth, against 78.6-80.6% for (1, 2, 2, 2), (2, 2, 4, 2) and (1, 1, 1, 2))
# extra (rows, blocks per step, warps) of the product kernel, timed with --steps
STEPS = {T.Q4_K: [(4, 8, 2), (8, 4, 2), (4, 8, 1), (2, 8, 1), (4, 4, 1), (8, 8, 4), (4, 16, 4), (8, 8, 2)],
         T.Q6_K: [(4, 4, 1), (8, 2, 1), (4, 4, 2), (2, 4, 1), (8, 4, 2), (8, 2, 2)]}


@triton.jit
def empty_kernel(out_ptr):
    tl.store(out_ptr, 1)


@triton.jit
def flat_read_kernel(p, out_ptr, n_words, WORDS: tl.constexpr, UNROLL: tl.constexpr):
    """Program i xors the words [i * WORDS * UNROLL, (i + 1) * WORDS * UNROLL) of an int32 buffer;
    WORDS = 4 words per thread, so every load is 16 bytes."""
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, WORDS)
    acc = tl.zeros([WORDS], dtype=tl.int32)
    for u in tl.static_range(UNROLL):
        o = pid * (WORDS * UNROLL) + u * WORDS + offs
        acc ^= tl.load(p + o, mask=o < n_words, other=0)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def pattern_kernel(w_ptr, out_ptr, N, row_bytes, nblocks, QTYPE: tl.constexpr, BN: tl.constexpr,
                   NBLK: tl.constexpr):
    """mmvq_kernel's walk over a Q4_K / Q6_K weight (same programs, steps and fetch helpers); the
    fetched words are xored together instead of multiplied."""
    row0 = tl.program_id(0) * BN
    rows = tl.minimum(row0 + tl.arange(0, BN), N - 1)
    wrow = w_ptr + rows.to(tl.int64) * row_stride(row_bytes, QTYPE)
    if QTYPE == 12:
        c = tl.arange(0, 4)
        wo = 8 * c[:, None] + tl.arange(0, 4)[None, :]
        acc = tl.zeros([BN, NBLK, 4, 4], dtype=tl.int32)
        for k in range(0, nblocks, NBLK):
            kb = tl.minimum(k + tl.arange(0, NBLK), nblocks - 1)
            w0, w1, w2, w3, q0, q1 = tv._q4k_fetch(wrow, kb, wo)
            acc ^= q0 ^ q1 ^ (w0 + w1 + w2 + w3)[:, :, :, None]
        r = tl.sum(tl.sum(tl.sum(acc, axis=3), axis=2), axis=1)
    else:
        h4 = tl.arange(0, 2)[None, :, None, None]
        w4 = tl.arange(0, 2)[None, None, :, None] * 4 + tl.arange(0, 4)[None, None, None, :]
        acc = tl.zeros([BN, NBLK, 2, 2, 4], dtype=tl.int32)
        for k in range(0, nblocks, NBLK):
            kb = tl.minimum(k + tl.arange(0, NBLK), nblocks - 1)
            A, B, H, d = tv._q6k_fetch(wrow, kb, h4, w4)
            acc ^= A ^ B ^ H ^ d.to(tl.int32, bitcast=True)[:, :, :, :, None]
        r = tl.sum(tl.sum(tl.sum(tl.sum(acc, axis=4), axis=3), axis=2), axis=1)
    tl.store(out_ptr + row0 + tl.arange(0, BN), r, mask=row0 + tl.arange(0, BN) < N)


@triton.jit
def pattern8_kernel(w_ptr, out_ptr, N, row_bytes, nblocks, BN: tl.constexpr, NBLK: tl.constexpr):
    """The Q4_K walk of ``triton_mmvq._q4k_rows32`` (eight threads per block, (NBLK * BN, 32 words)
    steps, the header as one vector for each), the fetched words xored together."""
    L: tl.constexpr = NBLK * BN
    i = tl.arange(0, L)
    w = tl.arange(0, 32)[None, :]
    rows = tl.minimum(tl.program_id(0) * BN + i % BN, N - 1)
    acc = tl.zeros([L, 32], dtype=tl.int32)
    for k in range(0, nblocks, NBLK):
        kb = tl.minimum(k + i // BN, nblocks - 1)
        blk = tl.multiple_of((w_ptr + rows.to(tl.int64) * row_bytes + kb * 144)[:, None].to(tl.pointer_type(tl.int32)),
                             [16, 16])
        acc ^= tl.load(blk + w % 4) + tl.load(blk + 4 + w)
    tl.store(out_ptr + tl.program_id(0), tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def slots_walk_kernel(hq_ptr, hd_ptr, down_ptr, out_ptr, ids_ptr, E, I, D, nb_d, rb_d, es_d, TOPK, KP: tl.constexpr,
                      BN: tl.constexpr, NBLK: tl.constexpr, ACTS: tl.constexpr, PF: tl.constexpr,
                      WCM: tl.constexpr = 0):
    """``triton_mmvq.moe_down_slots_q8_kernel``'s walk (same programs, lines and steps: its experts' weight words and,
    with ACTS, each slot's activation words and (xd, xs) pairs) with the words xored together instead of multiplied:
    the launch's ceiling for its access pattern. PF: each step's next weight words loaded before this one's xor; WCM:
    the weight loads' cache modifier (``triton_mmvq._ld``'s CM)."""
    t = tl.program_id(0).to(tl.int64)
    row0 = tl.program_id(1) * BN
    r = tl.arange(0, KP * BN)
    slot = r // BN
    p = t * TOPK + tl.minimum(slot, TOPK - 1)
    e = tl.load(ids_ptr + p)
    e = tl.where((e >= 0) & (e < E), e, 0).to(tl.int64)
    wrow = down_ptr + e * es_d + tl.minimum(row0 + r % BN, D - 1).to(tl.int64) * rb_d
    L: tl.constexpr = NBLK * KP * BN
    pw, kb = tv._q4k_lines(wrow, 0, KP * BN, NBLK)
    w = tl.arange(0, 32)[None, :]
    px, pd = tv._q4k_act_ptrs((hq_ptr + p * I).to(tl.pointer_type(tl.int32)), hd_ptr + p * (I // 16), kb, KP * BN,
                              NBLK, True)
    acc = tl.zeros([L, 32], dtype=tl.int32)
    if PF:
        hv, q = tv._ld(pw + w % 4, None, False, WCM), tv._ld(pw + 4 + w, None, False, WCM)
    for k in range(0, nb_d, NBLK):  # nb_d a multiple of NBLK here (I = 2048)
        if PF:
            nk = tl.minimum(k + NBLK, nb_d - NBLK)
            nhv, nq = tv._ld(pw + nk * 36 + w % 4, None, False, WCM), tv._ld(pw + nk * 36 + 4 + w, None, False, WCM)
        else:
            hv, q = tv._ld(pw + k * 36 + w % 4, None, False, WCM), tv._ld(pw + k * 36 + 4 + w, None, False, WCM)
        acc ^= hv + q
        if ACTS:
            acc ^= tl.load(px + k * 64) + tl.load(px + k * 64 + 8) + tl.load(pd + k * 16)
        if PF:
            hv, q = nhv, nq
    tl.store(out_ptr + t * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(acc, axis=1), axis=0))


def mmvq_alone(xq, xd, xs, w, t, N, K, bn, nblk, warps, out, loads=0, pf=False, maxnreg=None):
    """The product kernel on activations quantized beforehand (packed (xd, xs) pairs when loads & 2);
    ``maxnreg``: a cap on its registers per thread (more warps per SM). Returns the compiled kernel (its
    ``n_regs``: registers per thread); the product is in ``out``."""
    nblk, warps = tv.fit_step(nblk, warps, K)
    nblocks = K // tv.BLOCK_ELEMS[int(t)]
    return tv.mmvq_kernel[(triton.cdiv(N, bn), 1)](xq, xd, xs, w, out, N, K, w.shape[1], nblocks, nblocks, N, N, 1,
                                                   QTYPE=int(t), BN=bn, NBLK=nblk, ASM=True, LOADS=loads,
                                                   PF=pf, num_warps=warps, maxnreg=maxnreg)


def flat_calls(bufs, warps: int, unroll: int) -> list:
    """One ``flat_read_kernel`` launch per int32 buffer of ``bufs`` (all of one size): programs of ``warps`` warps,
    each thread ``unroll`` 16-byte loads."""
    n_words, words = bufs[0].numel(), 4 * 32 * warps
    grid = (triton.cdiv(n_words, words * unroll),)
    sink = torch.empty(grid[0], dtype=torch.int32, device=bufs[0].device)
    return [lambda b=b: flat_read_kernel[grid](b, sink, n_words, WORDS=words, UNROLL=unroll, num_warps=warps)
            for b in bufs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--shapes", default="", help="comma-separated parts of shape names to keep")
    ap.add_argument("--steps", action="store_true", help="also time the product kernel with STEPS")
    ap.add_argument("--loads", action="store_true", help="also time the LOADS forms of LOAD_VARIANTS, and "
                    "the MoE with them")
    ap.add_argument("--multi", action="store_true", help="also time Q4_K products of 2-4 activation rows: the "
                    "default launch, and MULTI_STEPS with all rows in one program")
    ap.add_argument("--candidates", action="store_true", help="also time the one-row Q4_K steps of CANDIDATES "
                    "and the MoE with MOE_CANDIDATES")
    ap.add_argument("--fused", action="store_true", help="also time the MoE with MOE_GU, MOE_SLOTS and MOE_GU_SLOTS "
                    "at 1 and 4 tokens (Q6_K down experts aligned, as the layers hold them)")
    ap.add_argument("--moe-parts", action="store_true", help="also time the int8 MoE at one token launch by launch")
    ap.add_argument("--down-types", default="Q6_K,Q4_K", help="--moe-parts: the down experts' types")
    ap.add_argument("--allocations", type=int, default=1, help="--moe-parts: run it this many times, each on newly "
                    "allocated experts (how much where the weights land moves the launches)")
    ap.add_argument("--skip", default="", help="comma-separated parts: flat,pattern,moe")
    ap.add_argument("--profile", default="", help="launch one kernel a few times for ncu and exit: "
                    "flat | pattern | mmvq[:rows,blocks,warps[,loads (+16: prefetch)]] on the first shape kept | "
                    "moe[:rows,blocks,warps,loads of the gate/up launch] | moe-q4k[:down_slots] | "
                    "moe-q6k-aligned[:down_slots_aligned | none]")
    args = ap.parse_args()
    down_types = [n.strip().upper() for n in args.down_types.split(",")]
    if bad := [n for n in down_types if n not in ("Q4_K", "Q6_K")]:
        ap.error(f"--down-types: {', '.join(bad)} is not a down experts' type the MoE timings build; use Q4_K, Q6_K "
                 "or both, comma-separated")
    if args.allocations < 1:
        ap.error(f"--allocations must be 1 or more (got {args.allocations})")
    if args.profile:
        return profile_launch(args)
    dev = torch.cuda.get_device_properties(0)
    res = dict(card=dev.name, sms=dev.multi_processor_count, date=dt.date.today().isoformat(),
               torch=torch.__version__, triton=triton.__version__, command=" ".join(sys.argv), rows=[])
    bw = copy_bandwidth()
    res["copy_GBps"] = bw / GB
    print(f"{dev.name}: copy {bw / GB:.0f} GB/s", flush=True)

    def row(**kw):
        res["rows"].append(kw)
        pct = f"{kw['pct']:5.1f}%" if "pct" in kw else ""
        print(f"{kw['what']:<44} {kw.get('shape', ''):<28} {kw['us']:8.2f} us {pct} {kw.get('err', '')}", flush=True)

    sink = torch.zeros(1, dtype=torch.int32, device="cuda")
    row(what="empty kernel", us=graph_time([lambda: empty_kernel[(1,)](sink, num_warps=1)]) * 1e6)
    row(what="empty kernel x2 (dependent pair)",
        us=graph_time([lambda: (empty_kernel[(1,)](sink, num_warps=1), empty_kernel[(1,)](sink, num_warps=1))]) * 1e6)

    pick = [s for s in SHAPES if not args.shapes or any(k in s[0] for k in args.shapes.split(","))]
    for name, N, K, t in pick:
        copies = n_copies(N * K)  # upper bound on bytes: the same number of copies for every variant
        w = random_weight(t, N, K, copies)
        nbytes = w[0].numel()
        pct = lambda s: nbytes / s / bw * 100  # noqa: E731
        for warps, unroll in FLAT if "flat" not in args.skip else ():
            s = graph_time(flat_calls([w[i].view(torch.int32).view(-1) for i in range(copies)], warps, unroll))
            row(what=f"flat read {warps}w x{unroll} ({4 * 32 * warps * unroll * 4} B/program)", shape=name,
                us=s * 1e6, pct=pct(s))
        bn, nblk, warps = MMVQ_TILES[t]
        nb, wp = tv.fit_step(nblk, warps, K)
        outp = torch.empty(N, dtype=torch.int32, device="cuda")
        s = 0 if "pattern" in args.skip else graph_time([lambda i=i: pattern_kernel[(triton.cdiv(N, bn),)](w[i], outp, N, w.shape[2], K // 256,
                                                                          QTYPE=int(t), BN=bn, NBLK=nb, num_warps=wp)
                        for i in range(copies)])
        if s:
            row(what=f"pattern read {bn}x{nb} {wp}w", shape=name, us=s * 1e6, pct=pct(s))
        for bn8, nb8, wp8 in PATTERN8 if t == T.Q4_K and "pattern" not in args.skip else ():
            nb8, wp8 = tv.fit_step(nb8, wp8, K)
            s = graph_time([lambda i=i: pattern8_kernel[(triton.cdiv(N, bn8),)](
                w[i], outp, N, w.shape[2], K // 256, BN=bn8, NBLK=nb8, num_warps=wp8) for i in range(copies)])
            row(what=f"pattern read 8 threads/block {bn8}x{nb8} {wp8}w", shape=name, us=s * 1e6, pct=pct(s))
        x = torch.randn(1, K, device="cuda").half()
        xq, xd, xs = quantize_q8(x)
        ref = quant_matmul_q8_ref(x, w[0], t, K).float()
        out = torch.empty(1, N, dtype=torch.float16, device="cuda")
        variants = [(bn, nblk, warps, "default", 0)]
        variants += [(b_, n_, w_, "", 0) for (b_, n_, w_) in STEPS[t]] if args.steps else []
        if args.candidates:
            variants += [(*v[0], f"loads={v[1]}", v[1]) for v in CANDIDATES[t]]
        if args.loads:
            variants += [(*v[0], f"loads={v[1]}" + (f" maxnreg={v[2]}" if v[2:] else ""), *v[1:])
                         for v in LOAD_VARIANTS.get(t, ())]
        xqp, xdp, _ = quantize_q8(x, pack=True)
        for bn_, nblk_, warps_, label, ld, *mr in variants:
            a = (xqp, xdp, xdp) if ld & 2 else (xq, xd, xs)
            mr = mr[0] if mr else None
            kernel = mmvq_alone(*a, w[0], t, N, K, bn_, nblk_, warps_, out, ld & 15, bool(ld & 16), mr)
            regs = getattr(kernel, "n_regs", None)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            s = graph_time([lambda i=i: mmvq_alone(*a, w[i], t, N, K, bn_, nblk_, warps_, out, ld & 15, bool(ld & 16),
                                                   mr) for i in range(copies)])
            row(what=f"mmvq alone {bn_}x{nblk_} {warps_}w, {label} ({regs} regs)", shape=name, us=s * 1e6,
                pct=pct(s), loads=ld, maxnreg=mr, regs=regs, step=[bn_, nblk_, warps_], err=f"rel err {err:.1e}")
        s = graph_time([lambda i=i: quant_matmul(x, w[i], t, K) for i in range(copies)])
        row(what="quant_matmul (quantizer + mmvq, default)", shape=name, us=s * 1e6, pct=pct(s))
        for M in MULTI_M if args.multi and t == T.Q4_K else ():
            xm = torch.randn(M, K, device="cuda").half()
            refm = quant_matmul_q8_ref(xm, w[0], t, K).float()
            cfgs = [("default", None)] + [(f"{b_}x{n_} {w_}w loads=14 act_rows={ar}", QMMConfig(
                "mmvq", w_, 1, block_n=b_, nblk=n_, loads=14, act_rows=ar)) for (b_, n_, w_) in MULTI_STEPS
                for ar in sorted({1, 4 if M > 2 else 2})]
            for label, cfg in cfgs:
                err = ((quant_matmul(xm, w[0], t, K, config=cfg).float() - refm).norm() / refm.norm()).item()
                s = graph_time([lambda i=i: quant_matmul(xm, w[i], t, K, config=cfg) for i in range(copies)])
                row(what=f"quant_matmul M={M} {label}", shape=name, us=s * 1e6, pct=pct(s), M=M,
                    err=f"rel err {err:.1e}")
        for (b_, n_, w_), ld in CANDIDATES[t] if args.candidates else ():
            cfg = QMMConfig("mmvq", w_, 1, block_n=b_, nblk=n_, loads=ld & 15, prefetch=bool(ld & 16))
            s = graph_time([lambda i=i: quant_matmul(x, w[i], t, K, config=cfg) for i in range(copies)])
            err = ((quant_matmul(x, w[0], t, K, config=cfg).float() - ref).norm() / ref.norm()).item()
            row(what=f"quant_matmul {b_}x{n_} {w_}w loads={ld}", shape=name, us=s * 1e6, pct=pct(s), loads=ld,
                step=[b_, n_, w_], err=f"rel err {err:.1e}")
        if args.loads:
            for (b_, n_, w_), ld, *mr in LOAD_VARIANTS.get(t, ()):
                if mr:
                    continue
                cfg = QMMConfig("mmvq", w_, 1, block_n=b_, nblk=n_, loads=ld & 15, prefetch=bool(ld & 16))
                s = graph_time([lambda i=i: quant_matmul(x, w[i], t, K, config=cfg) for i in range(copies)])
                err = ((quant_matmul(x, w[0], t, K, config=cfg).float() - ref).norm() / ref.norm()).item()
                row(what=f"quant_matmul {b_}x{n_} {w_}w loads={ld}", shape=name, us=s * 1e6, pct=pct(s), loads=ld,
                    step=[b_, n_, w_], err=f"rel err {err:.1e}")
        del w
        torch.cuda.empty_cache()

    if args.moe_parts:
        # Q6_K experts aligned, as the layers hold them on a GPU
        moe_parts(bw, row, aligned=True, down_types=[T[n] for n in down_types] * args.allocations)
    moe_cfgs = [("default", MOE_DEFAULT)]
    if args.loads:
        moe_cfgs += [(f"up {r}x{nb} {wp}w loads={ld}", replace(MOE_DEFAULT, mmvq_loads=ld, mmvq_up=(r, nb, wp)))
                     for (r, nb, wp, ld) in MOE_LOADS]
        moe_cfgs += [(f"down {r}x{nb} {wp}w loads={ld}", replace(MOE_DEFAULT, mmvq_down=(r, nb, wp, ld)))
                     for (r, nb, wp, ld) in MOE_DOWN]
        moe_cfgs += [(f"lean up {u[0]}x{u[1]} {u[2]}w, down {d[0]}x{d[1]} {d[2]}w l{d[3]}{' prefetch' if pf else ''}",
                      MoEConfig(mmvq_loads=14, mmvq_up=u, mmvq_down=d, mmvq_pf=pf)) for u, d, pf in MOE_LEAN]
    if args.candidates:
        moe_cfgs += [(f"up {u} down {d}", replace(MOE_DEFAULT, mmvq_up=u, mmvq_down=d)) for u, d in MOE_CANDIDATES]
    for down_type in (T.Q6_K, T.Q4_K) if "moe" not in args.skip else ():  # Q4_K_M's "more bits" layers, the rest
        weights = moe_weights(types=(T.Q4_K, T.Q4_K, down_type))
        moe_rows(res, bw, weights, moe_cfgs)
        del weights
        torch.cuda.empty_cache()
    for down_type in (T.Q6_K, T.Q4_K) if args.fused else ():
        plain = replace(MOE_DEFAULT, gate_up_lines=(), down_slots=())
        cfgs = [("default", MOE_DEFAULT), ("before: one matrix after the other, slots summed by a launch", plain)]
        cfgs += [(f"gate/up side by side {u}", replace(plain, gate_up_lines=u)) for u in MOE_GU]
        if down_type == T.Q4_K:
            cfgs += [(f"slots side by side {d}", replace(plain, down_slots=d, slots_max_tokens=64)) for d in MOE_SLOTS]
            cfgs += [(f"gate/up side by side {u}, slots {d}", replace(MOE_DEFAULT, gate_up_lines=u, down_slots=d))
                     for u, d in MOE_GU_SLOTS]
        cfgs.append(("default again", MOE_DEFAULT))
        weights = moe_weights(types=(T.Q4_K, T.Q4_K, down_type), aligned=True)
        moe_rows(res, bw, weights, cfgs, tokens=(1, 4), aligned=True)
        del weights
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"read-ceiling-{dev.name.replace(' ', '_')}.json"
    path.write_text(json.dumps(res, indent=1))
    print("wrote", path)


def moe_rows(res: dict, bw: float, weights, cfgs, tokens=(1,), copies: int = 32, aligned: bool = False) -> None:
    """The MoE layer on ``weights`` (``moe_weights``) with each (label, MoEConfig) of ``cfgs`` at each number of
    tokens, against the time to read its experts at copy bandwidth, checked against the int8 reference; ``aligned``:
    the weights' Q6_K experts are in the aligned layout."""
    for T_ in tokens:
        for label, cfg in cfgs:
            calls, per_expert, distinct, check = moe_setup(T_, copies, cfg, weights=weights, aligned=aligned)
            err = check()
            s = graph_time(calls)
            read = distinct * per_expert / bw
            what = f"moe T={T_}, down {weights[3][2].name}, {label}"
            res["rows"].append(dict(what=what, us=s * 1e6, ratio=s / read, err=err))
            print(f"{what:<56} {s * 1e6:8.2f} us  {s / read:.3f}x read time  rel err {err:.1e}", flush=True)
            del calls


def moe_parts(bw: float, row, aligned: bool = False, down_types=(T.Q6_K, T.Q4_K)) -> None:
    """The default int8 MoE decode at one token launch by launch (x quantized, gate/up, h quantized, down, down with
    the slots summed in it, the slots summed, and where the default runs them side by side, the slots' down launch)
    beside the whole call, each launch's weight bytes against copy bandwidth; ``aligned``: Q6_K experts in the aligned
    layout, as the layers hold them on a GPU. A down type listed again runs again on newly allocated experts."""
    import statistics

    from tierlm.kernels import moe as moe_mod

    spacers = []  # kept: each set of experts is allocated past those of the sets before it, on other pages
    for i, down_type in enumerate(down_types):
        spacers.append(torch.empty((i + 1) * (48 << 20), dtype=torch.uint8, device="cuda"))
        gate, up, down, types = moe_weights(types=(T.Q4_K, T.Q4_K, down_type), aligned=aligned)
        E, I, D, K = gate.shape[0], gate.shape[1], MOE["D"], MOE["K"]
        g = torch.Generator(device="cuda").manual_seed(0)
        sets = [torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(32)]
        x = torch.randn(1, D, device="cuda").half()
        wts = torch.rand(K, device="cuda")
        dims, cfg = (E, I, D, K), replace(MOE_DEFAULT, down_held=())  # the slots' down launch, which most rows vary
        distinct = statistics.mean(len(set(ids.tolist())) for ids in sets)
        up_bytes, down_bytes = distinct * (gate[0].numel() + up[0].numel()), distinct * down[0].numel()
        lu, ld = moe_mod.q8_loads(cfg, types, gate, up, down, aligned)
        xq, xd, xs = quantize_q8(x, pack=bool(lu & 2))
        h = moe_mod.q8_gate_up(xq, xd, xs, sets[0], gate, up, types, dims, cfg, lu, aligned)
        hq, hd, hs = quantize_q8(h, pack=bool(ld & 2))
        pq, pd, _ = quantize_q8(h, pack=True)  # h as the slots' launch takes it
        y = moe_mod.q8_down(hq, hd, hs, sets[0], wts, down, types, dims, cfg, ld, aligned)

        def down_calls(sums: bool):
            return [lambda ids=ids: moe_mod.q8_down(hq, hd, hs, ids, wts, down, types, dims, cfg, ld, aligned, sums)
                    for ids in sets]

        def pair(ids, c):
            """h quantized then the down launch, as the layer launches them (programmatic dependent launches; h packed
            as ``moe._moe_pairs_q8`` packs it)."""
            slots, q6 = c.slots_down(types, 1, aligned), types[2] == T.Q6_K
            q, dq, sq = quantize_q8(h, pack=(slots and not q6) or bool(ld & 2), pdl_rows=1)
            if slots:
                return moe_mod.q8_down_slots(q, dq, ids, wts, down, dims, c, c.early, aligned_q6k=q6)
            return moe_mod.q8_down(q, dq, sq, ids, wts, down, types, dims, c, ld, aligned, True)

        def slots_parts():
            """The default's down at one token where it is the slots' launch (Q4_K down experts), and the same sums
            in the steps of MOE_SLOT_STEPS; for aligned Q6_K down experts, the launch that adds the slots in turn with
            the steps of MOE_Q6K_STEPS and the slots' launch with those of MOE_Q6K_SLOTS and MOE_Q6K_SLOT_CAPS."""
            if types[2] == T.Q6_K:
                steps = [replace(cfg, aligned_step=s) for s in MOE_Q6K_STEPS] if aligned else []
                slots = [replace(cfg, down_slots_aligned=s) for s in MOE_Q6K_SLOTS] if aligned else []
                if slots:
                    ref = moe_mod.q8_down(hq, hd, hs, sets[0], wts, down, types, dims, cfg, ld, aligned, True)
                held = [replace(cfg, down_held=s) for s in MOE_HELD] if aligned else []
                for c in slots + held:  # the same sums in another order: float rounding apart
                    got = moe_mod.q8_down_slots(hq, hd, sets[0], wts, down, dims, c, aligned_q6k=True)
                    assert ((got - ref).norm() / ref.norm()).item() < 1e-5, (c.down_slots_aligned, c.down_held)
                return [*[(f"down, slots summed in it, step {c.aligned_step}",
                           [lambda ids=ids, c=c: moe_mod.q8_down(hq, hd, hs, ids, wts, down, types, dims, c, ld,
                                                                 aligned, True) for ids in sets], down_bytes)
                          for c in steps],
                        *[(f"down, the slots side by side, step {c.down_slots_aligned}{early}",
                           [lambda ids=ids, c=c, e=e: moe_mod.q8_down_slots(hq, hd, ids, wts, down, dims, c, e,
                                                                            aligned_q6k=True) for ids in sets],
                           down_bytes) for c in slots for e, early in ((True, ""), (False, ", ids after the wait"))
                          if e or c is slots[0]],
                        *[(f"down, activations held, {c.down_held}",
                           [lambda ids=ids, c=c: moe_mod.q8_down_slots(hq, hd, ids, wts, down, dims, c, True,
                                                                       aligned_q6k=True) for ids in sets],
                           down_bytes) for c in held],
                        *[(f"down, the slots side by side, step {st}, registers capped at {cap}",
                           capped_calls(st, False, cap, True), down_bytes) for st, cap in MOE_Q6K_SLOT_CAPS
                          if aligned],
                        *[(f"h quantized, then down, {what}", [lambda ids=ids, c=c: pair(ids, c) for ids in sets],
                           down_bytes) for what, c in (("slots added in turn", replace(cfg, down_slots_aligned=())),
                                                       ("slots side by side", cfg),
                                                       *[(f"activations held, {s}", replace(cfg, down_held=s))
                                                         for s in MOE_HELD_LAYER]) if aligned]]

            ref = moe_mod.q8_down_slots(pq, pd, sets[0], wts, down, dims, cfg)
            one = replace(cfg, early_weights=True)  # one group of rows a program: its first weights loaded early
            steps = [replace(one, down_slots=s) for s in MOE_SLOT_STEPS]
            pf = [replace(one, down_slots=s, slots_pf=True) for s in MOE_SLOT_PF_STEPS]
            caches = [replace(one, down_slots=s, slots_pf=f, slots_cache=c) for s, f, c in MOE_SLOT_CACHES]
            groups = [replace(cfg, down_slots=s, early=early, early_weights=ew) for s in MOE_SLOT_GROUPS
                      for early, ew in ((True, True), (True, False), (False, True))]
            held = [replace(cfg, down_held=s) for s in MOE_HELD]
            for c in steps + pf + caches + groups + held:  # the same sums in another order: float rounding apart
                got = moe_mod.q8_down_slots(pq, pd, sets[0], wts, down, dims, c)
                assert ((got - ref).norm() / ref.norm()).item() < 1e-5, (c.down_slots, c.down_held)

            return [("h quantized, packed for the slots' launch", [lambda: quantize_q8(h, pack=True)], 0),
                    *[(f"down, activations held, {c.down_held}",
                       [lambda ids=ids, c=c: moe_mod.q8_down_slots(pq, pd, ids, wts, down, dims, c, True)
                        for ids in sets], down_bytes) for c in held],
                    *[(f"h quantized, then down, {what}", [lambda ids=ids, c=c: pair(ids, c) for ids in sets],
                       down_bytes) for what, c in (("slots side by side", cfg),
                                                   *[(f"activations held, {s}", replace(cfg, down_held=s))
                                                     for s in MOE_HELD_LAYER])],
                    *[(f"down, the slots side by side{' (early as the default)' if early == cfg.early else ''}"
                       f"{'' if early else ', weights not loaded before the wait'}",
                       [lambda ids=ids, early=early: moe_mod.q8_down_slots(pq, pd, ids, wts, down, dims, cfg, early)
                        for ids in sets], down_bytes) for early in (cfg.early, not cfg.early)],
                    *[(f"down, the slots side by side, step {c.down_slots}",
                       [lambda ids=ids, c=c: moe_mod.q8_down_slots(pq, pd, ids, wts, down, dims, c) for ids in sets],
                       down_bytes) for c in steps],
                    *[(f"down, the slots side by side, step {c.down_slots}, next weights loaded first (PF)",
                       [lambda ids=ids, c=c: moe_mod.q8_down_slots(pq, pd, ids, wts, down, dims, c, c.early)
                        for ids in sets], down_bytes) for c in pf],
                    *[(f"down, the slots side by side, step {c.down_slots} (groups sharing activations"
                       f"{'; ids alone read before the wait' if c.early and not c.early_weights else ''}"
                       f"{'' if c.early else '; weights not loaded before the wait'})",
                       [lambda ids=ids, c=c: moe_mod.q8_down_slots(pq, pd, ids, wts, down, dims, c, c.early)
                        for ids in sets], down_bytes) for c in groups],
                    *[(f"down, the slots side by side, step {st}{', PF' if pf_ else ''}, registers capped at {cap}",
                       capped_calls(st, pf_, cap), down_bytes) for st, pf_, cap in MOE_SLOT_CAPS],
                    *[(f"down, the slots side by side, step {c.down_slots}{', PF' if c.slots_pf else ''}, weight loads "
                       f"{CACHE_MODIFIERS[c.slots_cache[0]]}, activation loads {EVICTION[c.slots_cache[1]]}",
                       [lambda ids=ids, c=c: moe_mod.q8_down_slots(pq, pd, ids, wts, down, dims, c, c.early)
                        for ids in sets], down_bytes) for c in caches],
                    *[(f"bare walk of the slots' launch, step {st}{', activations too' if acts else ''}"
                       f"{', PF' if wpf else ''}{', weight loads ' + CACHE_MODIFIERS[wcm] if wcm else ''}",
                       walk_calls(st, acts, wpf, wcm), down_bytes) for st, acts, wpf, wcm in MOE_SLOT_WALKS]]

        def layer_cfgs() -> list:
            """The whole layers timed: the default, and forms of its down launch for these down experts."""
            held = [replace(cfg, down_held=s) for s in MOE_HELD_LAYER if replace(cfg, down_held=s) != MOE_DEFAULT]
            if types[2] == T.Q6_K:
                return [MOE_DEFAULT, cfg, replace(cfg, down_slots_aligned=()), *held,
                        *[replace(cfg, down_slots_aligned=s, early=e) for s in MOE_Q6K_LAYER for e in (True, False)
                          if s != cfg.down_slots_aligned or not e]]
            return [MOE_DEFAULT, cfg, *held, replace(cfg, early=not cfg.early),
                    replace(cfg, down_slots=(4, 2, 8), early_weights=True),
                    replace(cfg, down_slots=(1, 1, 1, 2), early_weights=False),
                    replace(cfg, down_slots=(1, 2, 2, 2), early_weights=True)]

        def layer_label(c) -> str:
            """How a whole layer's MoEConfig differs from the default's, for its row's name."""
            if c == MOE_DEFAULT:
                return f" (default: activations held {c.down_held})" if c.down_held else ""
            if c == cfg:
                return ", the slots' down launch"
            if c.down_held:
                return f", down launch with activations held {c.down_held}"
            if types[2] == T.Q6_K and (c.down_slots_aligned != cfg.down_slots_aligned or not c.early):
                return (f", aligned Q6_K slots launch step {c.down_slots_aligned or None}"
                        f"{'' if c.early or not c.down_slots_aligned else ', ids after the wait'}")
            if not c.early:
                return ", weights not loaded before the wait"
            ids = ", ids alone read before the wait" if not c.early_weights else ""
            return f", slots launch step {c.down_slots}{ids}"

        def capped_calls(step, pf_: bool, cap: int, q6: bool = False):
            """The slots' launch (early: with one group of rows its first weights, with several the ids alone; ``q6``:
            the aligned Q6_K one, ids alone) with its registers per thread capped at ``cap``: more programs per SM, if
            it does not spill."""
            if q6:
                c, a = replace(cfg, down_slots_aligned=step), (hq, hd)
            else:
                c, a = replace(cfg, down_slots=step, slots_pf=pf_, early_weights=len(step) < 4), (pq, pd)
            want = moe_mod.q8_down_slots(*a, sets[0], wts, down, dims, c, True, aligned_q6k=q6)
            got = moe_mod.q8_down_slots(*a, sets[0], wts, down, dims, c, True, maxnreg=cap, aligned_q6k=q6)
            assert ((got - want).norm() / want.norm()).item() < 1e-6, (step, pf_, cap)
            return [lambda ids=ids: moe_mod.q8_down_slots(*a, ids, wts, down, dims, c, True, maxnreg=cap,
                                                          aligned_q6k=q6) for ids in sets]

        def walk_calls(step, acts: bool, pf_: bool, wcm: int):
            """``slots_walk_kernel`` launches on each set of ids: the slots' launch's loads, xored (registers capped at
            48, as many programs per SM as the launch holds)."""
            bn, nb, warps = step
            nblk, warps = tv.fit_step(nb, warps, I)
            grid = (1, -(-D // bn))
            sink = torch.empty(grid[1], dtype=torch.int32, device="cuda")
            return [lambda ids=ids: slots_walk_kernel[grid](pq, pd, down, sink, ids, E, I, D, I // 256, down.shape[2],
                                                             down[0].numel(), K, KP=8, BN=bn, NBLK=nblk, ACTS=acts,
                                                             PF=pf_, WCM=wcm, num_warps=warps, maxnreg=48)
                    for ids in sets]

        def flat_parts():
            """A flat read of the down launch's bytes (and of the gate/up launch's) in one launch: their ceiling."""
            out = []
            for what, nbytes in (("down", down_bytes), ("gate/up", up_bytes)):
                bufs = [torch.empty(int(nbytes) // 4, dtype=torch.int32, device="cuda") for _ in range(4)]
                out += [(f"flat read of the {what} launch's bytes {warps}w x{unroll}", flat_calls(bufs, warps, unroll),
                         nbytes) for warps, unroll in ((4, 4), (8, 2), (1, 1))]
            return out

        def default_down():
            """The default's down launch at one token where it is the slots' launch or the held one."""
            if not MOE_DEFAULT.slots_down(types, 1, aligned):
                return []
            q6 = types[2] == T.Q6_K
            a = (hq, hd) if q6 else (pq, pd)
            return [(f"down (default{f': activations held {MOE_DEFAULT.down_held}' if MOE_DEFAULT.down_held else ''})",
                     [lambda ids=ids: moe_mod.q8_down_slots(*a, ids, wts, down, dims, MOE_DEFAULT, MOE_DEFAULT.early,
                                                            aligned_q6k=q6) for ids in sets], down_bytes),
                    ("h quantized, then down (default)",
                     [lambda ids=ids: pair(ids, MOE_DEFAULT) for ids in sets], down_bytes)]

        parts = [("x quantized", [lambda: quantize_q8(x, pack=bool(lu & 2))], 0),
                 ("gate/up", [lambda ids=ids: moe_mod.q8_gate_up(xq, xd, xs, ids, gate, up, types, dims, cfg, lu,
                                                                 aligned) for ids in sets], up_bytes),
                 ("h quantized", [lambda: quantize_q8(h, pack=bool(ld & 2))], 0),
                 ("down", down_calls(False), down_bytes),
                 ("down, slots summed in it", down_calls(True), down_bytes),
                 ("slots summed", [lambda: y.view(1, K, D).sum(1)], 0),
                 *default_down(),
                 *slots_parts(),
                 *flat_parts(),
                 *[(f"whole layer{layer_label(c)}",
                    [lambda ids=ids, c=c: moe_mod.moe_quant(x, ids[None], wts[None], gate, up, down, *types, config=c,
                                                            aligned=aligned) for ids in sets], up_bytes + down_bytes)
                   for c in layer_cfgs()]]
        for what, calls, nbytes in parts:
            s = graph_time(calls)
            kw = dict(pct=nbytes / s / bw * 100) if nbytes else {}
            row(what=f"moe part, down {down_type.name}: {what}", us=s * 1e6, allocation=int(gate.data_ptr()), **kw)
        del gate, up, down
        torch.cuda.empty_cache()


def profile_launch(args) -> None:
    """A few launches of one kernel on the first shape kept, for ``ncu --launch-skip 2 --launch-count 1``."""
    name, N, K, t = [s for s in SHAPES if not args.shapes or any(k in s[0] for k in args.shapes.split(","))][0]
    w = random_weight(t, N, K, 1)[0]
    what, _, geo = args.profile.partition(":")
    if what in ("moe-q4k", "moe-q6k-aligned"):  # the default at one token, Q4_K or aligned Q6_K down experts; a
        # geometry: the slots' down launch's down_slots (Q4_K) or down_slots_aligned (Q6_K; "none": the slots added in
        # turn) instead of the default's
        aligned = what.endswith("aligned")
        step = () if geo == "none" else tuple(map(int, geo.split(","))) if geo else None
        cfg = MOE_DEFAULT if step is None else replace(MOE_DEFAULT, down_held=(), **{
            "down_slots_aligned" if aligned else "down_slots": step})  # a geometry of the slots' launch
        weights = moe_weights(types=(T.Q4_K, T.Q4_K, T.Q6_K if aligned else T.Q4_K), aligned=aligned)
        calls, *_ = moe_setup(1, 3, cfg, weights=weights, aligned=aligned)
        for c in calls:
            c()
        torch.cuda.synchronize()
        print(f"profiled the MoE at one token: {what} {geo}")
        return
    bn, nblk, warps, loads = (list(map(int, geo.split(","))) + [0])[:4] if geo else (*MMVQ_TILES[t], 0)
    if what == "moe":  # three one-token MoE layers; the kernels of the third are the ones to read
        calls, *_ = moe_setup(1, 3, MoEConfig(mmvq_loads=loads, mmvq_up=(bn, nblk, warps)) if geo else None)
        for c in calls:
            c()
        torch.cuda.synchronize()
        print("profiled the MoE at one token")
        return
    for _ in range(3):
        if what == "flat":
            n_words = w.numel() // 4
            grid = (triton.cdiv(n_words, 512 * 4),)
            out = torch.empty(grid[0], dtype=torch.int32, device="cuda")
            flat_read_kernel[grid](w.view(torch.int32).view(-1), out, n_words, WORDS=512, UNROLL=4, num_warps=4)
        elif what == "pattern":
            nb, wp = tv.fit_step(nblk, warps, K)
            out = torch.empty(N, dtype=torch.int32, device="cuda")
            pattern_kernel[(triton.cdiv(N, bn),)](w, out, N, w.shape[1], K // 256, QTYPE=int(t), BN=bn, NBLK=nb,
                                                  num_warps=wp)
        else:
            xq, xd, xs = quantize_q8(torch.randn(1, K, device="cuda").half(), pack=bool(loads & 2))
            mmvq_alone(xq, xd, xs, w, t, N, K, bn, nblk, warps, torch.empty(1, N, dtype=torch.float16, device="cuda"),
                       loads & 15, bool(loads & 16))
    torch.cuda.synchronize()
    print(f"profiled {what} {bn}x{nblk} {warps}w on {name}")


if __name__ == "__main__":
    main()
