"""Triton kernels of the fused MoE layer over stacked GGUF expert weights.

Two launches per layer compute y[p] = w_p * down_e(silu(gate_e x_t) * up_e x_t) for every
(token, slot) pair p = t * TOPK + k routed to expert e; the caller sums y over the TOPK slots.

- Decode (``SORTED=False``): program (p, row block) is one pair and 32 weight rows, computed by the
  one-row-per-thread kernel of ``triton_gemv``; the expert comes straight from ``ids``, so no
  sorting launches run, and with one token every pair has its own expert anyway.
- Prefill (``SORTED=True``): a "tile" is up to BLOCK_M pairs of one expert, taken from the
  expert-sorted pair order (``order``), so an expert's weights are read once per tile and
  multiplied with ``tl.dot``: with ``MMQ``, the decode of ``triton_mmq`` (Q4_K, Q6_K, Q8_0, Q5_0);
  otherwise ``triton_q._mac`` (every type).

An expert id outside [0, E) contributes nothing and reads no weights.

Glossary: T = tokens, TOPK = experts per token, P = T * TOPK pairs, E = experts, D = hidden size,
I = expert intermediate size; h rows are in sorted order ("rows"), y rows in pair order.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tierlm.kernels.triton_gemv import _gemv
from tierlm.kernels.triton_mmq import mmq_mac
from tierlm.kernels.triton_q import _mac, row_stride


@triton.jit
def _tile_rows(t, E, ids_ptr, order_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
               SORTED: tl.constexpr, BLOCK_M: tl.constexpr):
    """A tile's rows, their pair ids, which rows exist, its expert (clamped), and whether it is real."""
    if SORTED:
        e = tl.load(tile_e_ptr + t)  # -1 past the last tile
        lo = tl.load(tile_lo_ptr + t)
        hi = tl.load(tile_hi_ptr + t)
        rows = lo + tl.arange(0, BLOCK_M)
        rmask = rows < hi
        pair = tl.load(order_ptr + rows, mask=rmask, other=0)
    else:
        rows = t + tl.arange(0, BLOCK_M)  # BLOCK_M == 1: tile t is pair t, which always writes its row
        e = tl.load(ids_ptr + t)
        rmask = rows >= 0
        pair = rows
    valid = (e >= 0) & (e < E)
    return rows, pair, rmask, tl.where(valid, e, 0).to(tl.int64), valid


@triton.jit
def moe_up_kernel(x_ptr, gate_ptr, up_ptr, h_ptr, ids_ptr, order_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
                  E, I, nb_g, nb_u, rb_g, rb_u, es_g, es_u, stride_xt, TOPK,
                  GATE_T: tl.constexpr, BLOCK_G: tl.constexpr, NB_G: tl.constexpr,
                  UP_T: tl.constexpr, BLOCK_U: tl.constexpr, NB_U: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SORTED: tl.constexpr, USE_DOT: tl.constexpr,
                  DOT_KIND: tl.constexpr, DOT_PREC: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
                  ASM: tl.constexpr, Q4K_BLOCK: tl.constexpr = False, MMQ: tl.constexpr = False,
                  ALIGNED: tl.constexpr = False):
    """h[row, n] = silu(gate_e[n] . x[token]) * (up_e[n] . x[token]), float32 (P, I).

    Grid: (tiles, cdiv(I, BLOCK_N)). nb_*: blocks per row for tiles, units per row for decode;
    es_*: bytes of one expert's matrix. ALIGNED (tiles only): Q6_K experts in the aligned layout.
    """
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows, pair, rmask, e, valid = _tile_rows(t, E, ids_ptr, order_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
                                             SORTED, BLOCK_M)
    xrow = x_ptr + (pair // TOPK).to(tl.int64) * stride_xt
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SORTED:
        nmask = offs_n < I  # an invalid expert runs no loop iteration (kend = 0)
        gw = gate_ptr + e * es_g + offs_n.to(tl.int64) * row_stride(rb_g, GATE_T)
        uw = up_ptr + e * es_u + offs_n.to(tl.int64) * row_stride(rb_u, UP_T)
        if MMQ:
            g = mmq_mac(xrow, rmask, gw, nmask, 0, tl.where(valid, nb_g, 0), GATE_T, NB_G, BLOCK_M, BLOCK_N,
                        DOT_KIND, ASM, ALIGNED, nb_g * 208)
            u = mmq_mac(xrow, rmask, uw, nmask, 0, tl.where(valid, nb_u, 0), UP_T, NB_U, BLOCK_M, BLOCK_N,
                        DOT_KIND, ASM, ALIGNED, nb_u * 208)
        else:
            g = _mac(xrow, rmask, gw, nmask, 0, tl.where(valid, nb_g, 0), GATE_T, NB_G, BLOCK_G,
                     BLOCK_M, BLOCK_N, USE_DOT, DOT_KIND, DOT_PREC, ALIGNED, nb_g * 208)
            u = _mac(xrow, rmask, uw, nmask, 0, tl.where(valid, nb_u, 0), UP_T, NB_U, BLOCK_U,
                     BLOCK_M, BLOCK_N, USE_DOT, DOT_KIND, DOT_PREC, ALIGNED, nb_u * 208)
    else:
        tl.static_assert(not ALIGNED, "the float matrix-vector decode reads GGUF's Q6_K layout only")
        xr = x_ptr + (t // TOPK).to(tl.int64) * stride_xt  # pair t's token row, as a scalar pointer
        g = _gemv(xr, gate_ptr + e * es_g, pid_n * BLOCK_N, I, rb_g, 0, tl.where(valid, nb_g, 0),
                  GATE_T, W, R, ASM, Q4K_BLOCK)[None, :]
        u = _gemv(xr, up_ptr + e * es_u, pid_n * BLOCK_N, I, rb_u, 0, tl.where(valid, nb_u, 0),
                  UP_T, W, R, ASM, Q4K_BLOCK)[None, :]
    h = g / (1.0 + tl.exp(-g)) * u
    hptr = h_ptr + rows[:, None].to(tl.int64) * I + offs_n[None, :]
    tl.store(hptr, h, mask=rmask[:, None] & (offs_n < I)[None, :])


@triton.jit
def moe_down_kernel(h_ptr, down_ptr, y_ptr, wts_ptr, ids_ptr, order_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
                    E, I, D, nb_d, rb_d, es_d,
                    DOWN_T: tl.constexpr, BLOCK_D: tl.constexpr, NB_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SORTED: tl.constexpr, USE_DOT: tl.constexpr,
                    DOT_KIND: tl.constexpr, DOT_PREC: tl.constexpr, W: tl.constexpr, R: tl.constexpr,
                    ASM: tl.constexpr, Q4K_BLOCK: tl.constexpr = False, MMQ: tl.constexpr = False,
                    ALIGNED: tl.constexpr = False):
    """y[pair, n] = wts[pair] * (down_e[n] . h[row]), float32 (P, D) (ALIGNED, tiles only: Q6_K experts in the
    aligned layout). Grid: (tiles, cdiv(D, BLOCK_N))."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows, pair, rmask, e, valid = _tile_rows(t, E, ids_ptr, order_ptr, tile_e_ptr, tile_lo_ptr, tile_hi_ptr,
                                             SORTED, BLOCK_M)
    hrow = h_ptr + rows.to(tl.int64) * I
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if SORTED:
        nmask = offs_n < D
        dw = down_ptr + e * es_d + offs_n.to(tl.int64) * row_stride(rb_d, DOWN_T)
        if MMQ:  # h is float32: tf32 tiles
            acc = mmq_mac(hrow, rmask, dw, nmask, 0, tl.where(valid, nb_d, 0), DOWN_T, NB_D, BLOCK_M, BLOCK_N,
                          DOT_KIND, ASM, ALIGNED, nb_d * 208)
        else:
            acc = _mac(hrow, rmask, dw, nmask, 0, tl.where(valid, nb_d, 0), DOWN_T, NB_D, BLOCK_D,
                       BLOCK_M, BLOCK_N, USE_DOT, DOT_KIND, DOT_PREC, ALIGNED, nb_d * 208)
    else:
        tl.static_assert(not ALIGNED, "the float matrix-vector decode reads GGUF's Q6_K layout only")
        acc = _gemv(h_ptr + t.to(tl.int64) * I, down_ptr + e * es_d, pid_n * BLOCK_N, D, rb_d, 0,
                    tl.where(valid, nb_d, 0), DOWN_T, W, R, ASM, Q4K_BLOCK)[None, :]
    wt = tl.load(wts_ptr + pair, mask=rmask, other=0.0)
    yptr = y_ptr + pair[:, None].to(tl.int64) * D + offs_n[None, :]
    tl.store(yptr, acc * wt[:, None], mask=rmask[:, None] & (offs_n < D)[None, :])
