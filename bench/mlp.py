"""A DeepSeek-V3 SwiGLU MLP of quantized projections at one row on a GPU: its three products, against
``model.quantized.fused_mlp``, which takes gate and up from one launch (the MoE's gate/up launch of one expert).

Shapes: a dense layer (7168 -> 18432 -> 7168) and a shared expert (7168 -> 2048 -> 7168), gate and up Q4_K, down Q6_K
(Q4_K_M's "more bits" layers, held aligned as the layers hold Q6_K on a GPU) or Q4_K (its other layers). Each form is
timed as bench/kernels.py times kernels: the calls replayed from a CUDA graph, each reading a different copy of the
weights (past the L2). Besides the whole MLP, the fused path's gate/up launch alone (both matrices) and the product of
one up matrix as ``quant_matmul`` runs it (the "dense up" shape of bench/kernels.py), and the down product, against
the copy bandwidth.
Every fused result is checked against the unfused one (int8 rounding apart) and the int8 reference.

    PYTHONPATH=. python bench/mlp.py --out OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import graph_time, n_copies, random_weight, start_run, write_run  # noqa: E402

from tierlm.kernels import moe as moe_mod  # noqa: E402
from tierlm.kernels.q6k_layout import from_aligned  # noqa: E402
from tierlm.kernels.quant_matmul import quant_matmul, quantize_q8  # noqa: E402
from tierlm.model import quantized as qz  # noqa: E402
from tierlm.model.layers import MLP  # noqa: E402
from tierlm.weights.ggml_types import GGMLType as T  # noqa: E402
from tierlm.weights.ggml_types import tensor_nbytes  # noqa: E402

D = 7168
SHAPES = [("dense", 18432, T.Q6_K), ("dense", 18432, T.Q4_K), ("shared expert", 2048, T.Q6_K),
          ("shared expert", 2048, T.Q4_K)]


def mlps(I: int, down_type, copies: int) -> list[MLP]:
    """``copies`` MLPs of random quantized projections on the GPU (Q6_K held aligned, as the layers hold it)."""
    out = []
    g, u, d = random_weight(T.Q4_K, I, D, copies), random_weight(T.Q4_K, I, D, copies), random_weight(down_type, D, I,
                                                                                                      copies)
    for i in range(copies):
        m = MLP(D, I)
        m.gate_proj = qz.QuantLinear(g[i], T.Q4_K, D, I)
        m.up_proj = qz.QuantLinear(u[i], T.Q4_K, D, I)
        m.down_proj = qz.QuantLinear(d[i], down_type, I, D)
        out.append(m.cuda())
    return out


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    res, bw = start_run()
    torch.set_grad_enabled(False)
    x = torch.randn(1, D, device="cuda").bfloat16()

    def row(**kw):
        res["rows"].append(kw)
        pct = f"{kw['pct']:5.1f}% of copy bandwidth" if "pct" in kw else ""
        print(f"{kw['what']:<64} {kw['us']:8.2f} us  {pct} {kw.get('note', '')}", flush=True)

    for name, I, dt in SHAPES:
        b_gu = 2 * tensor_nbytes(T.Q4_K, (I, D))  # gate and up
        nbytes = b_gu + tensor_nbytes(dt, (D, I))
        copies = n_copies(nbytes)
        ms = mlps(I, dt, copies)
        what = f"{name} {D}->{I}->{D}, down {dt.name}"
        fused = ms[0](x)
        plain = ms[0].down_proj(torch.nn.functional.silu(ms[0].gate_proj(x)) * ms[0].up_proj(x))
        ids, wts = torch.zeros(1, 1, dtype=torch.long, device="cuda"), torch.ones(1, 1, device="cuda")
        mats = [m.qweight[None] for m in (ms[0].gate_proj, ms[0].up_proj, ms[0].down_proj)]
        if ms[0].down_proj.aligned:
            mats[2] = from_aligned(mats[2])
        ref = moe_mod.moe_quant_q8_ref(x, ids, wts, *mats, T.Q4_K, T.Q4_K, dt)
        note = f"fused against unfused: rel {rel(fused, plain):.1e}; against the int8 reference: {rel(fused, ref):.1e}"
        t_plain = graph_time([lambda m=m: m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))
                              for m in ms])
        t_fused = graph_time([lambda m=m: m(x) for m in ms])
        row(what=f"{what}: three products (before)", us=t_plain * 1e6, pct=nbytes / t_plain / bw * 100, shape=name,
            I=I, down=dt.name)
        row(what=f"{what}: fused_mlp (gate and up in one launch)", us=t_fused * 1e6, pct=nbytes / t_fused / bw * 100,
            shape=name, I=I, down=dt.name, speedup=t_plain / t_fused, note=note)
        if dt == T.Q6_K:  # the gate/up launch alone (the same for either down type), and one up product
            cfg = moe_mod.DEFAULT
            types = (T.Q4_K, T.Q4_K, dt)
            loads = moe_mod.q8_loads(cfg, types, mats[0], mats[1], mats[2])
            xq, xd, xs = quantize_q8(x, pack=bool(loads[0] & 2))
            gu = [(m.gate_proj.qweight[None], m.up_proj.qweight[None]) for m in ms]
            t_gu = graph_time([lambda g=g, u=u: moe_mod.q8_gate_up(xq, xd, xs, ids.view(-1), g, u, types, (1, I, D, 1),
                                                                   cfg, loads[0]) for g, u in gu])
            row(what=f"{name}: gate/up launch of the fused path, gate and up side by side", us=t_gu * 1e6,
                pct=b_gu / t_gu / bw * 100, shape=name, I=I, part="gate/up")
            t_guq = graph_time([lambda g=g, u=u: moe_mod.q8_gate_up(*quantize_q8(x, pack=bool(loads[0] & 2)),
                                                                     ids.view(-1), g, u, types, (1, I, D, 1), cfg,
                                                                     loads[0]) for g, u in gu])
            row(what=f"{name}: x quantized, then the gate/up launch", us=t_guq * 1e6,
                pct=b_gu / t_guq / bw * 100, shape=name, I=I, part="gate/up with its quantizer")
            t_up = graph_time([lambda m=m: quant_matmul(x, m.up_proj.qweight, T.Q4_K, D) for m in ms])
            row(what=f"{name}: one up product, quant_matmul (quantizer included)", us=t_up * 1e6,
                pct=b_gu / 2 / t_up / bw * 100, shape=name, I=I, part="up")
        # the down product as the fused path runs it: quant_matmul on h in float32, x's dtype out (quantizer included)
        h = torch.randn(1, I, device="cuda")
        b_dn = nbytes - b_gu
        t_dn = graph_time([lambda m=m: quant_matmul(h, m.down_proj.qweight, dt, I, aligned=m.down_proj.aligned,
                                                    out_dtype=x.dtype) for m in ms])
        row(what=f"{name}: one down product, quant_matmul ({dt.name}, quantizer included)", us=t_dn * 1e6,
            pct=b_dn / t_dn / bw * 100, shape=name, I=I, down=dt.name, part="down")
        del ms
        torch.cuda.empty_cache()
    print("wrote", write_run(res, args.out, "mlp"))


if __name__ == "__main__":
    main()
