"""Compile the Triton kernels ahead of time for a chosen GPU, on any machine (no GPU needed).

Used by the tests to prove every kernel builds for Turing (sm_75) and Hopper (sm_90) and to read
the generated PTX. ``variants()`` lists the launches the wrappers can make, one per kernel, type
and activation dtype; ``compile_variant`` turns one into PTX/cubin for ``GPUTarget("cuda", cc, 32)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tierlm.kernels import triton_gemv as tg
from tierlm.kernels import triton_mmq as tk
from tierlm.kernels import triton_mmvq as tv
from tierlm.kernels import triton_moe as tm
from tierlm.kernels import triton_q as tq
from tierlm.kernels.moe import DEFAULT as MOE_DEFAULT
from tierlm.kernels.moe import MoEConfig
from tierlm.kernels.quant_matmul import (MMQ_TILES, MMVQ_Q4K_LOADS, MMVQ_Q4K_PAIR_STEP, MMVQ_Q4K_SHORT_STEP,
                                         MMVQ_Q4K_STEP, MMVQ_Q6K_ALIGNED_STEPS, MMVQ_Q6K_LOADS, MMVQ_Q6K_STEP,
                                         MMVQ_TILES, mmvq_loads, q6k_row_words)

_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
QUANT = (tq.Q4_K, tq.Q6_K, tq.Q8_0, tq.Q5_0)


@dataclass
class Variant:
    """One compiled form of a kernel: its signature types, constexprs, and launch options."""

    name: str
    fn: object
    types: dict  # argument name -> Triton type string, "constexpr" for constants
    constexprs: dict
    aligned: tuple = ()  # integer arguments launched with values divisible by 16
    num_warps: int = 4
    num_stages: int = 2
    tags: dict = field(default_factory=dict)


def _geometry(qtype: int, k_step: int = 256) -> dict:
    block = tq.BLOCK_ELEMS[qtype]
    return dict(BLOCK=block, NB=max(1, k_step // block))


def qmv_variant(qtype: int, act: str, num_warps: int = 4, rows: int = 1, split: bool = False,
                q4k_block: bool = False) -> Variant:
    types = dict(x_ptr=_PTR[act], w_ptr="*u8", out_ptr=_PTR["fp32" if split else act], N="i32", units="i32",
                 row_bytes="i32", stride_xm="i32", stride_om="i32", units_per_split="i32", stride_os="i32")
    const = dict(QTYPE=qtype, W=num_warps, R=rows, ASM=True, Q4K_BLOCK=q4k_block)
    aligned = ("stride_xm",) + (("row_bytes",) if tq.BLOCK_BYTES[qtype] % 16 == 0 else ())
    return Variant(f"qmv_{qtype}_{act}_w{num_warps}_r{rows}{'_blk' if q4k_block else ''}", tg.qmv_kernel, types, const, aligned, num_warps,
                   tags=dict(act=act, qtype=qtype))


def qmm_variant(qtype: int, act: str, block_m: int, block_n: int, use_dot: bool, num_warps: int = 4) -> Variant:
    g = _geometry(qtype)
    types = dict(x_ptr=_PTR[act], w_ptr="*u8", out_ptr=_PTR[act if block_m else "fp32"],
                 M="i32", N="i32", nblocks="i32", row_bytes="i32", stride_xm="i32", stride_om="i32",
                 stride_os="i32", blocks_per_split="i32")
    dot_kind = {"fp32": tq.DOT_F32, "fp16": tq.DOT_F16, "bf16": tq.DOT_BF16}[act]
    const = dict(QTYPE=qtype, BLOCK=g["BLOCK"], BLOCK_M=block_m, BLOCK_N=block_n, NB=g["NB"],
                 USE_DOT=use_dot, DOT_KIND=dot_kind, DOT_PREC="ieee")
    aligned = ("stride_xm",) + (("row_bytes",) if tq.BLOCK_BYTES[qtype] % 16 == 0 else ())
    return Variant(f"qmm_{qtype}_{act}_m{block_m}_n{block_n}_{'dot' if use_dot else 'fma'}", tq.qmm_kernel,
                   types, const, aligned, num_warps, tags=dict(act=act, qtype=qtype))


def dequant_variant(qtype: int, out: str) -> Variant:
    g = _geometry(qtype)
    types = dict(w_ptr="*u8", out_ptr=_PTR[out], N="i32", K="i32", nblocks="i32", row_bytes="i32")
    const = dict(QTYPE=qtype, BLOCK=g["BLOCK"], BLOCK_N=16, NB=g["NB"])
    aligned = ("K",) + (("row_bytes",) if tq.BLOCK_BYTES[qtype] % 16 == 0 else ())
    return Variant(f"dequant_{qtype}_{out}", tq.dequant_kernel, types, const, aligned, tags=dict(act=out, qtype=qtype))


def moe_variants(q_up: int, q_down: int, act: str, sorted_: bool, dot_prec: str, mmq: bool = False) -> list[Variant]:
    """The up and down kernels of one MoE layer: decode (pairs, gemv) or prefill (sorted tiles; ``mmq``: with
    ``triton_mmq``'s decode, as sm_80+ launches them for quantized experts)."""
    gu, gd = (_geometry(q_up), _geometry(q_down)) if sorted_ else (dict(BLOCK=32, NB=1),) * 2
    bm, bn = (16, 64) if sorted_ else (1, 64)
    dot_kind = {"fp32": tq.DOT_F32, "fp16": tq.DOT_F16, "bf16": tq.DOT_BF16}[act]
    tiles = dict(order_ptr="*i32", tile_e_ptr="*i32", tile_lo_ptr="*i32", tile_hi_ptr="*i32")
    if not sorted_:
        tiles = {k: "*i64" for k in tiles}
    flags = dict(BLOCK_M=bm, BLOCK_N=bn, SORTED=sorted_, USE_DOT=sorted_, DOT_PREC=dot_prec, W=4,
                 R=1 if sorted_ else 2, ASM=not sorted_ or mmq, Q4K_BLOCK=False, MMQ=mmq)
    up_types = dict(x_ptr=_PTR["fp32" if not sorted_ else act], gate_ptr="*u8", up_ptr="*u8", h_ptr="*fp32",
                    ids_ptr="*i64", **tiles, E="i32", I="i32", nb_g="i32", nb_u="i32", rb_g="i32", rb_u="i32",
                    es_g="i64", es_u="i64", stride_xt="i32", TOPK="i32")
    up_const = dict(GATE_T=q_up, BLOCK_G=gu["BLOCK"], NB_G=gu["NB"], UP_T=q_up, BLOCK_U=gu["BLOCK"], NB_U=gu["NB"],
                    DOT_KIND=dot_kind, **flags)
    down_types = dict(h_ptr="*fp32", down_ptr="*u8", y_ptr="*fp32", wts_ptr="*fp32", ids_ptr="*i64", **tiles,
                      E="i32", I="i32", D="i32", nb_d="i32", rb_d="i32", es_d="i64")
    down_const = dict(DOWN_T=q_down, BLOCK_D=gd["BLOCK"], NB_D=gd["NB"], DOT_KIND=tq.DOT_F32, **flags)
    tag = ("sorted_mmq" if mmq else "sorted") if sorted_ else "pairs"
    aligned_up = ("stride_xt",) + (("rb_g", "rb_u") if tq.BLOCK_BYTES[q_up] % 16 == 0 else ())
    aligned_down = ("rb_d",) if tq.BLOCK_BYTES[q_down] % 16 == 0 else ()
    return [
        Variant(f"moe_up_{q_up}_{act}_{tag}", tm.moe_up_kernel, up_types, up_const, aligned_up,
                tags=dict(act=act, qtype=q_up)),
        Variant(f"moe_down_{q_down}_{tag}", tm.moe_down_kernel, down_types, down_const, aligned_down,
                tags=dict(act="fp32", qtype=q_down)),
    ]


def variants(capability: int) -> list[Variant]:
    """Every kernel form the wrappers launch on a card of this compute capability (e.g. 75, 90)."""
    acts = ["fp16", "fp32"] + (["bf16"] if capability >= 80 else [])
    out = []
    for q in QUANT:
        for act in acts:
            out.append(qmv_variant(q, act, 4, 2))
            if q == tq.Q4_K:
                out.append(qmv_variant(q, act, 4, 2, q4k_block=True))
            out.append(qmm_variant(q, act, 4, 8, False))
            if act != "fp32":
                out.append(qmm_variant(q, act, 16, 32, True))
                out.append(dequant_variant(q, act))
    dot_prec = "tf32" if capability >= 80 else "ieee"
    for act in acts:
        out += moe_variants(tq.Q4_K, tq.Q6_K, act, False, dot_prec)
        out += moe_variants(tq.Q4_K, tq.Q6_K, act, True, dot_prec)
        if capability >= 80:
            out += moe_variants(tq.Q4_K, tq.Q6_K, act, True, dot_prec, mmq=True)
    for q in QUANT:
        bn, nblk, warps = MMVQ_TILES[q]  # the default launch, then the prefetching form
        out += [mmvq_variant(q, bn, nblk, warps, out=act) for act in acts] + [mmvq_variant(q, 2, 4, 1, prefetch=True)]
        if q == tq.Q4_K:  # the defaults (the lean eight-thread step in its three shapes), the first eight-thread
            # step, and the vector loads of four
            steps = (MMVQ_Q4K_STEP, MMVQ_Q4K_PAIR_STEP, MMVQ_Q4K_SHORT_STEP)  # q4k_row_step's three shapes
            out += [mmvq_variant(q, *step, out=act, loads=MMVQ_Q4K_LOADS) for act in acts for step in steps]
            out += [mmvq_variant(q, 1, 8, 1, loads=6), mmvq_variant(q, 1, 8, 2, loads=4),
                    mmvq_variant(q, bn, nblk, warps, loads=3)]
            out += [mmvq_variant(q, *step, out=act, loads=MMVQ_Q4K_LOADS, act_rows=ar) for act in acts  # 2-4 rows
                    for step in steps for ar in (2, 4)]
        if q == tq.Q6_K:  # the one-row default: sixteen threads per block, lean
            out += [mmvq_variant(q, *MMVQ_Q6K_STEP, out=act, loads=MMVQ_Q6K_LOADS) for act in acts]
            out += [mmvq_variant(q, 2, 2, 1, loads=4)]  # the sixteen-thread step before its lean form
    for q in QUANT:  # tensor-core decode tiles, as pick_config launches them (fp32 out: split-K partial sums)
        bn, warps, _, _ = MMQ_TILES[q]
        out += [mmq_variant(q, act, bn, 1, warps, split) for act in acts if act != "fp32" for split in (False, True)]
    out += [kquant_dequant_variant(q, act) for q in (tq.Q4_K, tq.Q6_K) for act in acts]
    out += [quantize_q8_variant(act) for act in acts] + [quantize_q8_variant("fp16", pack=True)]
    out += [rms_norm_variant(act, add) for act in acts for add in (False, True)]
    out += [route_variant(), route_variant(topk_group=8)]
    out += moe_q8_variants(tq.Q4_K, tq.Q6_K) + moe_q8_variants(tq.Q4_K, tq.Q6_K, MoEConfig())  # default, plain
    out += moe_q8_variants(tq.Q4_K, tq.Q6_K, MoEConfig(mmvq_loads=6, mmvq_up=(4, 2, 1), mmvq_down=(4, 2, 1, 4)))
    out += moe_q8_variants(tq.Q4_K, tq.Q4_K)  # the default with Q4_K down (Q4_K_M outside its more-bits layers)
    slots = replace(MOE_DEFAULT, down_held=())  # the slots' down launch, and the held one with its next rows first
    out += [v for v in moe_q8_variants(tq.Q4_K, tq.Q4_K, slots) if v.fn is tv.moe_down_slots_q8_kernel]
    out += [v for v in moe_q8_variants(tq.Q4_K, tq.Q6_K, slots, aligned=True) if v.fn is tv.moe_down_slots_q8_kernel]
    out += [v for v in moe_q8_variants(tq.Q4_K, tq.Q6_K, replace(MOE_DEFAULT, down_held=(3, 2, True)), aligned=True)
            if v.fn is tv.moe_down_held_q8_kernel]
    out += moe_q8_variants(tq.Q8_0, tq.Q5_0)
    out += moe_variants(tq.Q8_0, tq.Q5_0, "fp16", False, dot_prec)
    out += moe_variants(tq.Q8_0, tq.Q5_0, "fp16", True, dot_prec)
    if capability >= 80:
        out += moe_variants(tq.Q8_0, tq.Q5_0, "fp16", True, dot_prec, mmq=True)
    # Q6_K in the aligned layout (what the layers hold on a GPU): every kernel the wrappers launch on it
    q6 = tq.Q6_K
    out += [aligned_q6k(mmvq_variant(q6, *MMVQ_Q6K_ALIGNED_STEPS[w], out=act), w) for w in (4, 2, 1) for act in acts]
    out += moe_q8_variants(tq.Q4_K, q6, aligned=True) + moe_q8_variants(q6, q6, aligned=True)[:1]
    out += [aligned_q6k(mmq_variant(q6, act, MMQ_TILES[q6][0], 1, MMQ_TILES[q6][1], split)) for act in acts
            if act != "fp32" for split in (False, True)]
    out += [aligned_q6k(kquant_dequant_variant(q6, act)) for act in acts]
    out += [aligned_q6k(qmm_variant(q6, act, 4, 8, False)) for act in acts]
    out += [aligned_q6k(v) for v in moe_variants(tq.Q4_K, q6, "fp16", True, dot_prec)]
    if capability >= 80:
        out += [aligned_q6k(v) for v in moe_variants(tq.Q4_K, q6, "fp16", True, dot_prec, mmq=True)]
    for w in (tq.F16, tq.BF16, tq.F32):  # moe_dense (bf16 weights are widened by a shift everywhere)
        out += moe_variants(w, w, "fp16", False, dot_prec)
        out += moe_variants(w, w, "fp16", True, dot_prec)
    if capability >= 90:  # at one row the int8 launches are programmatic dependent launches (quant_matmul.pdl_launch)
        out += [with_pdl(v) for v in out if v.fn in PDL_KERNELS and v.constexprs.get("MR", 1) == 1]
    return out


PDL_KERNELS = (tv.quantize_q8_kernel, tv.mmvq_kernel, tv.moe_up_q8_kernel, tv.moe_down_q8_kernel,
               tv.moe_down_slots_q8_kernel, tv.moe_down_held_q8_kernel)


def with_pdl(v: Variant) -> Variant:
    """``v`` as launched with programmatic dependent launch (sm_90+; ``triton_q.pdl_enter``)."""
    return replace(v, name=f"{v.name}_pdl", constexprs={**v.constexprs, "PDL": True})


def aligned_q6k(v: Variant, words: int | bool = True) -> Variant:
    """``v`` reading Q6_K in the aligned layout (``kernels.q6k_layout``): ALIGNED = words per lane for the int8
    decode kernels, True for the others. With 4 words the wrappers launch only rows of 16-byte multiples, which
    Triton sees (an integer argument divisible by 16 is specialized)."""
    rows = {"row_bytes", "rb_g", "rb_u", "rb_d"} & set(v.types) if words == 4 else set()
    return replace(v, name=f"{v.name}_a{int(words)}", constexprs={**v.constexprs, "ALIGNED": words},
                   aligned=tuple(v.aligned) + tuple(sorted(rows)))


def compile_variant(v: Variant, capability: int):
    """Compile one variant for ``GPUTarget("cuda", capability, 32)``; returns Triton's CompiledKernel."""
    fn = v.fn
    types = dict(v.types)
    # constexprs the variant leaves out take the kernel's defaults, as a launch that leaves them out does
    consts = {p.name: p.default for p in fn.params if p.is_constexpr and p.default is not inspect.Parameter.empty}
    consts.update(v.constexprs)
    for k in consts:
        types[k] = "constexpr"
    order = {name: i for i, name in enumerate(fn.arg_names)}
    attrs = {(order[k],): [["tt.divisibility", 16]] for k, t in types.items() if t.startswith("*")}
    attrs.update({(order[k],): [["tt.divisibility", 16]] for k in v.aligned})
    src = ASTSource(fn=fn, signature=types, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options=dict(num_warps=v.num_warps, num_stages=v.num_stages))


def mmvq_variant(qtype: int, bn: int = 4, nblk: int = 4, num_warps: int = 4, out: str = "fp16",
                 num_stages: int = 2, prefetch: bool = False, loads: int = 0, act_rows: int = 1) -> Variant:
    """The int8-activation decode product (``triton_mmvq.mmvq_kernel``)."""
    types = dict(xq_ptr="*i8", xd_ptr="*fp32", xs_ptr="*fp32", w_ptr="*u8", out_ptr=_PTR[out], N="i32", K="i32",
                 row_bytes="i32", nblocks="i32", blocks_per_split="i32", stride_om="i32", stride_os="i32", M="i32")
    const = dict(QTYPE=qtype, BN=bn, NBLK=nblk, ASM=True, PF=prefetch, LOADS=loads, MR=act_rows)
    aligned = ("K",) + (("row_bytes",) if tq.BLOCK_BYTES[qtype] % 16 == 0 else ())
    name = (f"mmvq_{qtype}_{out}_n{bn}_b{nblk}_w{num_warps}{'_pf' if prefetch else ''}{f'_l{loads}' if loads else ''}"
            f"{f'_m{act_rows}' if act_rows > 1 else ''}")
    return Variant(name, tv.mmvq_kernel, types, const, aligned, num_warps,
                   num_stages, tags=dict(act=out, qtype=qtype))


def mmq_variant(qtype: int, act: str = "fp16", bn: int = 64, nblk: int = 1, num_warps: int = 4, split: bool = False,
                num_stages: int = 2, asm: bool = True) -> Variant:
    """The tensor-core decode product of 2-16 activation rows (``triton_mmq.mmq_kernel``)."""
    types = dict(x_ptr=_PTR[act], w_ptr="*u8", out_ptr=_PTR["fp32" if split else act], M="i32", N="i32",
                 nblocks="i32", row_bytes="i32", stride_xm="i32", stride_om="i32", stride_os="i32",
                 blocks_per_split="i32")
    dot_kind = {"fp16": tq.DOT_F16, "bf16": tq.DOT_BF16}[act]
    const = dict(QTYPE=qtype, BM=16, BN=bn, NB=tk.step_blocks(qtype, nblk), DOT_KIND=dot_kind, ASM=asm)
    aligned = ("stride_xm",) + (("row_bytes",) if tq.BLOCK_BYTES[qtype] % 16 == 0 else ())
    name = f"mmq_{qtype}_{act}_n{bn}_b{nblk}_w{num_warps}{'_split' if split else ''}{'' if asm else '_plain'}"
    return Variant(name, tk.mmq_kernel, types, const, aligned, num_warps, num_stages, tags=dict(act=act, qtype=qtype))


def kquant_dequant_variant(qtype: int, out: str) -> Variant:
    """Prefill's Q4_K / Q6_K dequantizers (``triton_mmq.q4k_dequant_kernel``, ``q6k_dequant_kernel``)."""
    types = dict(w_ptr="*u8", out_ptr=_PTR[out], N="i32", K="i32", row_bytes="i32")
    if qtype == tq.Q4_K:
        fn, const = tk.q4k_dequant_kernel, dict(BN=64, NB=2, OUT_KIND={"fp32": 0, "fp16": 1, "bf16": 2}[out], ASM=True)
    else:
        fn, const = tk.q6k_dequant_kernel, dict(BN=64, NB=1)
    aligned = ("K",) + (("row_bytes",) if qtype == tq.Q4_K else ())
    return Variant(f"dequant_{qtype}_{out}_tiles", fn, types, const, aligned, tags=dict(act=out, qtype=qtype))


def quantize_q8_variant(act: str, pack: bool = False) -> Variant:
    types = dict(x_ptr=_PTR[act], xq_ptr="*i8", xd_ptr="*fp32", xs_ptr="*fp32", K="i32", stride_xm="i32")
    return Variant(f"quantize_q8_{act}{'_pack' if pack else ''}", tv.quantize_q8_kernel, types,
                   dict(G=8, ASM=True, PACK=pack), ("K", "stride_xm"), 1, tags=dict(act=act))


def rms_norm_variant(act: str, add: bool, block: int = 8192) -> Variant:
    """``norm.rms_norm`` as the model launches it on DeepSeek-V3's hidden rows (output in the activation dtype)."""
    from tierlm.kernels import triton_norm

    types = dict(x_ptr=_PTR[act], res_ptr="*fp32", h_ptr="*fp32", w_ptr="*fp32", y_ptr=_PTR[act], D="i32",
                 stride_x="i32", stride_r="i32", eps="fp32")
    return Variant(f"rms_norm_{act}{'_add' if add else ''}", triton_norm.rms_norm_kernel, types,
                   dict(ADD=add, BLOCK=block), ("D", "stride_x", "stride_r"), 8, tags=dict(act=act))


def route_variant(topk_group: int = 4) -> Variant:
    """``router.route`` on DeepSeek-V3's routing (256 experts in 8 groups, 8 per token); all groups kept: none."""
    from tierlm.kernels import triton_router

    types = dict(logits_ptr="*fp32", bias_ptr="*fp32", ids_ptr="*i64", wts_ptr="*fp32", scale="fp32")
    return Variant(f"route_g{topk_group}", triton_router.route_kernel, types,
                   dict(E=256, G=8, TOPK_GROUP=topk_group, K=8, NORM=True), (), 4, tags=dict(act="fp32"))


def moe_q8_variants(q_up: int, q_down: int, cfg: MoEConfig = MOE_DEFAULT, aligned: bool = False) -> list[Variant]:
    """The up and down kernels of the int8-activation MoE decode path, as ``cfg`` launches them (``aligned``: with Q6_K
    experts in the aligned layout, for DeepSeek-V3's rows)."""
    up = dict(xq_ptr="*i8", xd_ptr="*fp32", xs_ptr="*fp32", gate_ptr="*u8", up_ptr="*u8", h_ptr="*fp32",
              ids_ptr="*i64", E="i32", I="i32", D="i32", nb_g="i32", nb_u="i32", rb_g="i32", rb_u="i32",
              es_g="i64", es_u="i64", TOPK="i32")
    down = dict(hq_ptr="*i8", hd_ptr="*fp32", hs_ptr="*fp32", down_ptr="*u8", y_ptr="*fp32", wts_ptr="*fp32",
                ids_ptr="*i64", E="i32", I="i32", D="i32", nb_d="i32", rb_d="i32", es_d="i64", TOPK="i32")
    a_up = ("D",) + (("rb_g", "rb_u") if tq.BLOCK_BYTES[q_up] % 16 == 0 else ())
    a_down = ("I",) + (("rb_d",) if tq.BLOCK_BYTES[q_down] % 16 == 0 else ())
    ub, unb, uw, ul = cfg.up_step()
    db, dnb, dw, dl = cfg.down_step()
    ul, dl = mmvq_loads(q_up, ul), mmvq_loads(q_down, dl)  # the load forms moe._moe_pairs_q8 launches
    side = cfg.gate_up_step((q_up, q_up, q_down), ul)
    if side:
        ub, unb, uw = side
    w_up, w_down = q6k_row_words(7168), q6k_row_words(2048)  # DeepSeek-V3's rows: gate/up of D, down of I
    if aligned and q_up == tq.Q6_K:
        (ub, unb, uw), ul = MMVQ_Q6K_ALIGNED_STEPS[w_up], 0
    if aligned and q_down == tq.Q6_K:
        (db, dnb, dw), dl = MMVQ_Q6K_ALIGNED_STEPS[w_down], 0
    types = (q_up, q_up, q_down)
    sums = sorted({cfg.sums_slots(types, aligned, 1), cfg.sums_slots(types, aligned, 2)})  # at one token and more
    out = [Variant(f"moe_up_q8_{q_up}{f'_l{ul}' if ul else ''}", tv.moe_up_q8_kernel, up,
                   dict(GATE_T=q_up, UP_T=q_up, BN=ub, NBLK=unb, ASM=True, PF=cfg.mmvq_pf, LOADS=ul, GU=bool(side)),
                   a_up, uw, tags=dict(act="fp32", qtype=q_up))]
    slots = dict(hq_ptr="*i8", hd_ptr="*fp32", down_ptr="*u8", y_ptr="*fp32", wts_ptr="*fp32", ids_ptr="*i64",
                 E="i32", I="i32", D="i32", nb_d="i32", rb_d="i32", es_d="i64", TOPK="i32")
    q6 = q_down == tq.Q6_K  # aligned, where a slots' launch takes it
    if cfg.slots_down(types, 1, aligned) and cfg.down_held:  # its words a lane are its own constant, W
        _, g, pf, _ = cfg.held_form()
        out.append(Variant(f"moe_down_held_q8_{q_down}_g{g}{'_pf' if pf else ''}",
                           tv.moe_down_held_q8_kernel, {**slots, "NPROG": "i32"},
                           dict(KP=8, NB=8, W=w_down if q6 else 4, G=g, ASM=True, EARLY=cfg.early, FULL=True,
                                PF=pf, DOWN_T=q_down), ("I", "rb_d"), 8,
                           tags=dict(act="fp32", qtype=q_down)))
    elif cfg.slots_down(types, 1, aligned):
        sb, snb, sw, *groups = cfg.slots_step(types, aligned)
        out.append(Variant(f"moe_down_slots_q8_{q_down}", tv.moe_down_slots_q8_kernel, slots,
                           dict(KP=8, BN=sb, NBLK=snb, ASM=True, EARLY=cfg.early,
                                PRELOAD=cfg.early_weights and not q6, G=groups[0] if groups else 1, DOWN_T=q_down),
                           ("I", "rb_d"), sw,
                           tags=dict(act="fp32", qtype=q_down)))
    out += [Variant(f"moe_down_q8_{q_down}{f'_l{dl}' if dl else ''}{'_sum' if sm else ''}", tv.moe_down_q8_kernel,
                    down, dict(DOWN_T=q_down, BN=db, NBLK=dnb, ASM=True, PF=cfg.mmvq_pf, LOADS=dl, SUM=sm), a_down,
                    dw, tags=dict(act="fp32", qtype=q_down)) for sm in sums]
    if aligned:  # ALIGNED on the launches of Q6_K weights
        out = [aligned_q6k(v, w_up if v.fn is tv.moe_up_q8_kernel else w_down)
               if v.tags["qtype"] == tq.Q6_K and v.fn is not tv.moe_down_held_q8_kernel else v for v in out]
    return out
