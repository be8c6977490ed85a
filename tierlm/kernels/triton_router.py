"""The Triton kernel of ``kernels.router``: DeepSeek-V3's expert choice for one token per program."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def route_kernel(logits_ptr, bias_ptr, ids_ptr, wts_ptr, scale, E: tl.constexpr, G: tl.constexpr,
                 TOPK_GROUP: tl.constexpr, K: tl.constexpr, NORM: tl.constexpr):
    """Token t: s = sigmoid(logits[t]) (E,); c = s + bias picks; groups (G of E/G) ranked by the sum of their two
    best c, the TOPK_GROUP best kept; the K best c among them, in descending order, to ids[t]; their s, normalized
    (NORM) and times ``scale``, to wts[t]. Selection by repeated argmax: the lowest index wins a tie."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, E)
    s = tl.sigmoid(tl.load(logits_ptr + t * E + offs))
    c = s + tl.load(bias_ptr + offs)
    if TOPK_GROUP < G:
        EG: tl.constexpr = E // G
        cg = tl.reshape(c, (G, EG))
        col = tl.arange(0, EG)[None, :]
        first = tl.argmax(cg, axis=1)
        best = tl.max(cg, axis=1)
        second = tl.max(tl.where(col == first[:, None], float("-inf"), cg), axis=1)
        gs = best + second  # (G,)
        grp = tl.arange(0, G)
        keep = grp < 0
        for _ in tl.static_range(TOPK_GROUP):
            g = tl.argmax(gs, axis=0)
            keep = keep | (grp == g)
            gs = tl.where(grp == g, float("-inf"), gs)
        kept = tl.reshape(tl.broadcast_to(keep[:, None], (G, EG)), (E,))
        c = tl.where(kept, c, float("-inf"))
    kk = tl.arange(0, K)
    ids = kk * 0
    w = tl.zeros((K,), dtype=tl.float32)
    for k in tl.static_range(K):
        i = tl.argmax(c, axis=0)
        ids = tl.where(kk == k, i, ids)
        w = tl.where(kk == k, tl.sum(tl.where(offs == i, s, 0.0), axis=0), w)
        c = tl.where(offs == i, float("-inf"), c)
    if NORM:
        w = w / (tl.sum(w, axis=0) + 1e-20)
    tl.store(ids_ptr + t * K + kk, ids.to(tl.int64))
    tl.store(wts_ptr + t * K + kk, w * scale)
