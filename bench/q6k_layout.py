"""Would Q6_K decode run faster from an aligned layout of the same bytes? A measurement, not a product path.

A Q6_K block is 210 bytes (ql 128, qh 64, scales 16, d 2), so blocks after the first sit only on 2-byte
boundaries and the shipped kernels read them in 2-byte pieces. The "planar" layout keeps every byte but
moves the 2-byte d of each block to a plane after the matrix: the 208-byte rest of block b of a matrix
starts at 208 * b (16-byte aligned), its d at 208 * nblocks_total + 2 * b. The experiment kernel reads
that layout with W words (4 * W bytes) per load, 16 / W threads per block, and is timed beside the
shipped step (activations quantized beforehand, weights rotated past the L2, CUDA-graph replay):

- on the dense Q6_K shapes (dense down, head) and one expert's down;
- as the MoE's down launch at one token (8 experts of 256, one program row per pair);
- as a bare read (the same loads xored, no arithmetic): the ceiling of each layout's walk;
- with ``--rows``, at 2-16 activation rows: the tensor-core tiles on either layout (on the aligned one also with a
  single pipeline stage) against the aligned int8 step;
- with ``--moe``, the fused MoE on aligned Q6_K experts, its down launch with and without the slots' sum in it.

Usage: PYTHONPATH=. python bench/q6k_layout.py --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import graph_time, n_copies, random_weight, start_run, write_run  # noqa: E402

from tierlm.kernels import triton_mmvq as tv  # noqa: E402
from tierlm.kernels.quant_matmul import quant_matmul_q8_ref, quantize_q8  # noqa: E402
from tierlm.weights.formats import GGMLType  # noqa: E402

T = GGMLType
SHAPES = [("dense down 18432->7168", 7168, 18432), ("head 7168->129280", 129280, 7168),
          ("expert down 2048->7168", 7168, 2048)]
# (rows, blocks per step, warps, words per load); warps * 32 = rows * blocks * 16 / words
VARIANTS = [(2, 2, 2, 1), (4, 2, 4, 1), (2, 2, 1, 2), (2, 4, 2, 2), (4, 2, 2, 2), (8, 2, 4, 2), (2, 4, 1, 4),
            (4, 4, 2, 4), (2, 8, 2, 4), (8, 4, 4, 4), (4, 8, 4, 4)]
E, I, D, K = 256, 2048, 7168, 8


def planar(w: torch.Tensor) -> torch.Tensor:
    """(..., rows, row_bytes) Q6_K bytes -> the same shape in the planar layout, per matrix."""
    b = w.reshape(-1, w.shape[-2] * w.shape[-1] // 210, 210)
    return torch.cat([b[..., :208].flatten(1), b[..., 208:].flatten(1)], 1).view(w.shape)


@triton.jit
def q6p_kernel(xq_ptr, xd_ptr, w_ptr, out_ptr, ids_ptr, N, nblocks, es,
               BN: tl.constexpr, NBLK: tl.constexpr, W: tl.constexpr, PLANAR: tl.constexpr, BARE: tl.constexpr,
               ASM: tl.constexpr = True):
    """out[p, n] = row n of matrix ids[p] . activation row p (Q6_K, int8 activations, xd per 32)."""
    p = tl.program_id(1)
    row0 = tl.program_id(0) * BN
    base = w_ptr + tl.load(ids_ptr + p).to(tl.int64) * es
    xq32 = xq_ptr.to(tl.pointer_type(tl.int32)) + p * nblocks * 64
    xdp = xd_ptr + p * nblocks * 8
    LPB: tl.constexpr = 16 // W  # lanes per block
    t = tl.arange(0, NBLK * BN * LPB)
    line = t // LPB
    j = t % LPB
    h = j // (LPB // 2)
    wq = (j % (LPB // 2)) * W
    rows = tl.minimum(row0 + line % BN, N - 1).to(tl.int64)
    kb = line // BN
    wv = tl.arange(0, W)[None, :]
    if PLANAR:
        blk = base + (rows * nblocks + kb) * 208
        pa = (blk + 64 * h + 4 * wq).to(tl.pointer_type(tl.int32))[:, None] + wv
        ph = (blk + 128 + 32 * h + 4 * wq).to(tl.pointer_type(tl.int32))[:, None] + wv
        ps = (blk + 192 + 8 * h + (wq >> 2)).to(tl.pointer_type(tl.int8))
        pdd = (base + N * nblocks * 208).to(tl.pointer_type(tl.uint16)) + rows * nblocks + kb
    else:
        tl.static_assert(W == 1, "the GGUF layout is read one word per lane")
        blk = base + rows * nblocks * 210 + kb * 210
        pa = (blk + 64 * h + 4 * wq).to(tl.pointer_type(tl.uint16))[:, None]
        ph = (blk + 128 + 32 * h + 4 * wq).to(tl.pointer_type(tl.uint16))[:, None]
        ps = (blk + 192 + 8 * h + (wq >> 2)).to(tl.pointer_type(tl.int8))
        pdd = (blk + 208).to(tl.pointer_type(tl.uint16))
    px = xq32 + (kb * 64 + 32 * h + wq)[:, None] + wv
    pd = tl.multiple_of(xdp + kb * 8 + 4 * h, 16)
    j4 = tl.arange(0, 4)[None, :]
    acc = tl.zeros([NBLK * BN * LPB], dtype=tl.float32)
    bits = tl.zeros([NBLK * BN * LPB, W], dtype=tl.int32)
    for k in range(0, nblocks, NBLK):
        if PLANAR:
            A, B, H = tl.load(pa + k * 52), tl.load(pa + k * 52 + 8), tl.load(ph + k * 52)
            d = tv._f16(tl.load(pdd + k).to(tl.int32))
            s8 = ps + k * 208
        else:
            A, B, H = tv._u32(pa + k * 105), tv._u32(pa + k * 105 + 16), tv._u32(ph + k * 105)
            d = tv._f16(tl.load(pdd + k * 105).to(tl.int32))
            s8 = ps + k * 210
        if BARE:
            sc = tl.load(s8) ^ tl.load(s8 + 2) ^ tl.load(s8 + 4) ^ tl.load(s8 + 6)
            bits ^= A ^ B ^ H ^ (d.to(tl.int32, bitcast=True) ^ sc.to(tl.int32))[:, None]
        else:
            xi = tl.load(pd[:, None] + k * 8 + j4).to(tl.int32, bitcast=True)
            part = tl.zeros([NBLK * BN * LPB], dtype=tl.float32)
            for i in tl.static_range(4):
                s = tl.sum(tv._dp4a(tv._q6k_quad(A, B, H, i), tl.load(px + k * 64 + 8 * i), True, ASM), axis=1)
                xdi = tl.sum(tl.where(j4 == i, xi, 0), axis=1).to(tl.float32, bitcast=True)
                part += (tl.load(s8 + 2 * i).to(tl.int32) * s).to(tl.float32) * xdi
            acc += d * part
    if BARE:
        acc += tl.sum(bits, axis=1).to(tl.float32)
    r = tl.sum(tl.sum(tl.reshape(acc, [NBLK, BN, LPB]), axis=2), axis=0)
    n = row0 + tl.arange(0, BN)
    tl.store(out_ptr + p * N + n, r, mask=n < N)


def launch(xq, xd, w, out, ids, N, nblocks, es, step, pl, bare=False, asm=True):
    bn, nblk, warps, words = step
    q6p_kernel[(triton.cdiv(N, bn), ids.numel())](xq, xd, w, out, ids, N, nblocks, es, BN=bn, NBLK=nblk, W=words,
                                                  PLANAR=pl, BARE=bare, ASM=asm,
                                                  num_warps=warps)


def rows_sweep(res, bw, row) -> None:
    """2-16 activation rows on Q6_K: the tensor-core tiles (pick_config's choice there) on GGUF's layout and on the
    aligned one, against the aligned int8 step run once per activation row (its weights then come from L2)."""
    from dataclasses import replace

    from tierlm.kernels.quant_matmul import MMVQ_Q6K_ALIGNED_STEPS, QMMConfig, pick_config, quant_matmul
    from tierlm.kernels.quant_matmul import quant_matmul_ref
    from tierlm.kernels.q6k_layout import align_

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cap = torch.cuda.get_device_capability()
    for name, N, Kd in SHAPES:
        copies = n_copies(N * Kd // 256 * 210)
        w = random_weight(T.Q6_K, N, Kd, copies)
        wa = align_(w.clone())
        nbytes = w[0].numel()
        words = 4 if Kd % 2048 == 0 else 2
        bn, nb, warps = MMVQ_Q6K_ALIGNED_STEPS[words]
        for M in (2, 3, 4, 6, 8, 12, 16):
            x = torch.randn(M, Kd, device="cuda").half()
            ref = quant_matmul_ref(x, w[0], T.Q6_K, Kd)
            tiles = pick_config(T.Q6_K, M, N, Kd, torch.float16, cap, sms)
            # one stage: no cp.async pipelining of the aligned weight loads (see the ninth round's notes)
            cands = [("tiles gguf", tiles, w, False), ("tiles aligned", tiles, wa, True),
                     ("tiles aligned, 1 stage", replace(tiles, num_stages=1), wa, True),
                     ("int8 aligned", QMMConfig("mmvq", warps, 1, block_n=bn, nblk=nb), wa, True)]
            for label, cfg, ws, al in cands:
                err = ((quant_matmul(x, ws[0], T.Q6_K, Kd, config=cfg, aligned=al).float() - ref).norm()
                       / ref.norm()).item()
                s = graph_time([lambda i=i: quant_matmul(x, ws[i], T.Q6_K, Kd, config=cfg, aligned=al)
                                for i in range(copies)])
                row(f"M={M} {label}", name, s, nbytes, err)
        del w, wa
        torch.cuda.empty_cache()


def moe_sweep(res, bw) -> None:
    """The fused MoE with aligned Q6_K down experts at 1, 4 and 16 tokens: the default against the down launch that
    adds each token's slots itself (MoEConfig.down_sum), and at one token launch by launch
    (``read_ceiling.moe_rows`` and ``moe_parts`` on aligned weights)."""
    from dataclasses import replace

    from kernels import moe_weights
    from read_ceiling import moe_parts, moe_rows

    from tierlm.kernels import moe as moe_mod

    cfgs = [("default", moe_mod.DEFAULT), ("down sums slots", replace(moe_mod.DEFAULT, down_sum=True))]
    for down_type in (T.Q6_K, T.Q4_K):
        weights = moe_weights(types=(T.Q4_K, T.Q4_K, down_type), aligned=True)
        moe_rows(res, bw, weights, cfgs, tokens=(1, 4, 16), copies=16, aligned=True)
        del weights
        torch.cuda.empty_cache()

    def row(**kw):
        res["rows"].append(kw)
        pct = f"{kw['pct']:5.1f}%" if "pct" in kw else ""
        print(f"{kw['what']:<56} {kw['us']:8.2f} us {pct}", flush=True)

    moe_parts(bw, row, aligned=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--rows", action="store_true", help="only time 2-16 activation rows (rows_sweep)")
    ap.add_argument("--moe", action="store_true", help="only time the MoE with aligned Q6_K experts (moe_sweep)")
    args = ap.parse_args()
    res, bw = start_run()
    if args.moe:
        moe_sweep(res, bw)
        print("wrote", write_run(res, args.out, "q6k-layout-moe"))
        return

    def row(what, shape, s, nbytes, err=None):
        res["rows"].append(dict(what=what, shape=shape, us=s * 1e6, pct=nbytes / s / bw * 100, err=err))
        e = f"rel err {err:.1e}" if err is not None else ""
        print(f"{what:<40} {shape:<26} {s * 1e6:8.2f} us {nbytes / s / bw * 100:5.1f}% {e}", flush=True)

    if args.rows:
        rows_sweep(res, bw, row)
        print("wrote", write_run(res, args.out, "q6k-layout-rows"))
        return
    zero = torch.zeros(1, dtype=torch.int32, device="cuda")
    for name, N, Kd in SHAPES:
        nb = Kd // 256
        copies = n_copies(N * nb * 210)
        w = random_weight(T.Q6_K, N, Kd, copies)
        wp = torch.stack([planar(w[i]) for i in range(copies)])
        nbytes = w[0].numel()
        x = torch.randn(1, Kd, device="cuda").half()
        xq, xd, xs = quantize_q8(x)
        ref = quant_matmul_q8_ref(x, w[0], T.Q6_K, Kd).float()
        out = torch.empty(1, N, dtype=torch.float32, device="cuda")
        out16 = torch.empty(1, N, dtype=torch.float16, device="cuda")

        def rel():
            return ((out.float() - ref).norm() / ref.norm()).item()

        tv.mmvq_kernel[(triton.cdiv(N, 2), 1)](xq, xd, xs, w[0], out16, N, Kd, w.shape[2], nb, nb, N, N, 1, QTYPE=14,
                                               BN=2, NBLK=2, ASM=True, LOADS=12, num_warps=2)
        err = ((out16.float() - ref).norm() / ref.norm()).item()
        s = graph_time([lambda i=i: tv.mmvq_kernel[(triton.cdiv(N, 2), 1)](
            xq, xd, xs, w[i], out16, N, Kd, w.shape[2], nb, nb, N, N, 1, QTYPE=14, BN=2, NBLK=2, ASM=True, LOADS=12,
            num_warps=2) for i in range(copies)])
        row("shipped 2x2 2w loads=12", name, s, nbytes, err)
        for pl in (False, True):
            for step in VARIANTS:
                if (not pl and step[3] != 1) or nb % step[1]:
                    continue
                launch(xq, xd, (wp if pl else w)[0], out, zero, N, nb, 0, step, pl)
                err = rel()
                s = graph_time([lambda i=i: launch(xq, xd, (wp if pl else w)[i], out, zero, N, nb, 0, step, pl)
                                for i in range(copies)])
                row(f"{'planar' if pl else 'gguf'} {step[0]}x{step[1]} {step[2]}w W={step[3]}", name, s, nbytes, err)
            for step in [v for v in VARIANTS if v[3] == 1 or pl][:: (3 if pl else 1)]:
                if nb % step[1]:
                    continue
                s = graph_time([lambda i=i: launch(xq, xd, (wp if pl else w)[i], out, zero, N, nb, 0, step, pl, True)
                                for i in range(copies)])
                row(f"bare {'planar' if pl else 'gguf'} {step[0]}x{step[1]} {step[2]}w W={step[3]}", name, s, nbytes)
        del w, wp
        torch.cuda.empty_cache()

    # the MoE's down launch at one token: 8 of 256 experts, one activation row per pair
    from tierlm.kernels import moe as moe_mod
    nb = I // 256
    down = random_weight(T.Q6_K, E * D, I).view(E, D, -1)
    downp = planar(down)
    es = D * nb * 210
    g = torch.Generator(device="cuda").manual_seed(0)
    sets = [torch.randperm(E, device="cuda", generator=g)[:K].to(torch.int32) for _ in range(32)]
    h = torch.randn(K, I, device="cuda").half()
    hq, hd, hs = quantize_q8(h)
    wts = torch.ones(K, device="cuda")
    out = torch.empty(K, D, dtype=torch.float32, device="cuda")
    ref = torch.stack([quant_matmul_q8_ref(h[p:p + 1], down[int(sets[0][p])], T.Q6_K, I)[0].float()
                       for p in range(K)])
    nbytes = K * es
    cfg = moe_mod.DEFAULT
    types, dims = (T.Q4_K, T.Q4_K, T.Q6_K), (E, I, D, K)
    _, ld = moe_mod.q8_loads(cfg, types, down, down, down)
    y = moe_mod.q8_down(hq, hd, hs, sets[0].long(), wts, down, types, dims, cfg, ld)
    s = graph_time([lambda ids=ids: moe_mod.q8_down(hq, hd, hs, ids.long(), wts, down, types, dims, cfg, ld)
                    for ids in sets])
    row(f"shipped moe down {cfg.mmvq_down}", "8 experts down", s, nbytes, ((y - ref).norm() / ref.norm()).item())
    for pl in (False, True):
        for step in VARIANTS:
            if not pl and step[3] != 1:
                continue
            wd = downp if pl else down
            launch(hq, hd, wd, out, sets[0], D, nb, es, step, pl)
            err = ((out - ref).norm() / ref.norm()).item()
            s = graph_time([lambda ids=ids: launch(hq, hd, wd, out, ids, D, nb, es, step, pl) for ids in sets])
            row(f"moe down {'planar' if pl else 'gguf'} {step[0]}x{step[1]} {step[2]}w W={step[3]}", "8 experts down",
                s, nbytes, err)
        for step in (VARIANTS[0], VARIANTS[4], VARIANTS[7]) if pl else (VARIANTS[0],):
            wd = downp if pl else down
            s = graph_time([lambda ids=ids: launch(hq, hd, wd, out, ids, D, nb, es, step, pl, True) for ids in sets])
            row(f"bare moe down {'planar' if pl else 'gguf'} {step[0]}x{step[1]} {step[2]}w W={step[3]}",
                "8 experts down", s, nbytes)
    print("wrote", write_run(res, args.out, "q6k-layout"))


if __name__ == "__main__":
    main()
