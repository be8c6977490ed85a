"""Every Triton kernel compiles ahead of time for Turing (sm_75) and Hopper (sm_90), with no GPU.

Turing has no bf16, and Triton's tl.dot gets no tensor cores there; what matters is that the
fp16/fp32 forms the wrappers launch on such a card build to PTX and cubin (ptxas ships with
Triton) and that their PTX holds no bf16 instruction. The sm_90 build of a tensor-core tile must
use mma. ``aot.variants`` lists every form; these tests compile one of each kernel and weight
type (the MoE kernels for Q4_K/Q6_K and one float type), which covers every code path.
"""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
aot = pytest.importorskip("tierlm.kernels.aot", reason="this triton cannot compile ahead of time")

BF16_PTX = re.compile(r"\bbf16|\.bf16")


def _representative(capability: int) -> list:
    """One variant per (kernel, weight type, path, load form); MoE kernels for Q4_K/Q6_K and F16 only."""
    seen, out = set(), []
    for v in aot.variants(capability):
        moe = v.fn.__name__.startswith("moe")
        if moe and v.tags.get("qtype") not in (12, 14, 1):
            continue
        key = (v.fn.__name__, v.tags.get("qtype"), v.constexprs.get("SORTED"), v.constexprs.get("USE_DOT"),
               v.constexprs.get("Q4K_BLOCK"), v.constexprs.get("LOADS"), v.constexprs.get("MR"),
               v.constexprs.get("MMQ"), v.constexprs.get("ALIGNED"), v.constexprs.get("PDL"),
               v.constexprs.get("SUM"), v.constexprs.get("ADD"), v.constexprs.get("TOPK_GROUP"),
               v.constexprs.get("PF") if v.fn is aot.tv.moe_down_held_q8_kernel else None)  # its early weights
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def _ids(vs):
    return [v.name for v in vs]


SM75 = _representative(75)
SM90 = [v for v in _representative(90) if v.tags.get("act") in ("fp16", "bf16")]


@pytest.mark.parametrize("v", SM75, ids=_ids(SM75))
def test_compiles_for_turing_without_bf16(v):
    k = aot.compile_variant(v, 75)
    ptx = k.asm["ptx"]
    assert ".target sm_75" in ptx
    assert not BF16_PTX.search(ptx), f"{v.name}: bf16 in the sm_75 PTX"
    assert "wgmma" not in ptx and "cp.async.bulk" not in ptx
    assert len(k.asm["cubin"]) > 0


@pytest.mark.parametrize("v", SM90, ids=_ids(SM90))
def test_compiles_for_hopper(v):
    k = aot.compile_variant(v, 90)
    ptx = k.asm["ptx"]
    assert ".target sm_90" in ptx and len(k.asm["cubin"]) > 0
    if (v.constexprs.get("USE_DOT") or v.fn.__name__ == "mmq_kernel") and v.tags.get("act") != "fp32":
        assert "mma" in ptx, f"{v.name}: a tensor-core tile without mma"


PDL90 = [v for v in _representative(90) if v.constexprs.get("PDL")]


def test_only_hopper_forms_use_pdl():
    assert PDL90 and {v.fn for v in PDL90} == set(aot.PDL_KERNELS)
    assert not any(v.constexprs.get("PDL") for v in aot.variants(75))  # griddepcontrol is sm_90's


# what a kernel launched with EARLY may read before its grid-dependency wait: the expert ids and weights (written two
# launches before it or earlier) and the weights themselves
EARLY_READS = {"ids_ptr", "wts_ptr", "down_ptr"}
_REG = re.compile(r"%[a-z]+\d+")


def _loads_before_wait(v, body: str, wait: int) -> list[str]:
    """The global loads of ``body`` (PTX) before offset ``wait`` whose address derives from a pointer argument
    outside EARLY_READS: each instruction's destination registers take the taint of its sources."""
    params = {f"{v.fn.__name__}_param_{i}" for i, (name, t) in enumerate(v.types.items())
              if t.startswith("*") and name not in EARLY_READS}
    tainted, bad = set(), []
    for line in body[:wait].splitlines():
        ins = re.sub(r"^@!?%p\d+\s+", "", line.split("//")[0].strip())
        if not ins or ins.startswith((".", "$", "{", "}")):
            continue
        op, _, args = ins.partition(" ")
        if op.startswith("ld.param"):
            if any(p + "]" in args for p in params):
                tainted.update(_REG.findall(args)[:1])
            continue
        dst = _REG.findall(args.split("}")[0]) if args.lstrip().startswith("{") else _REG.findall(args)[:1]
        srcs = [r for r in _REG.findall(args) if r not in dst]
        if op.startswith("ld.global"):
            if any(r in tainted for r in srcs):
                bad.append(ins)
        elif any(r in tainted for r in srcs):
            tainted.update(dst)
    return bad


@pytest.mark.parametrize("v", PDL90, ids=_ids(PDL90))
def test_pdl_kernels_wait_before_touching_memory(v):
    """A kernel launched with programmatic dependent launch may start while the launch before it still runs: it must
    wait (griddepcontrol.wait) before its first global load, store or atomic, or it reads what that launch has not
    written yet, or overwrites what it still reads (a freed buffer the allocator handed on). With EARLY (the MoE's
    slots' down launch) it loads ids, wts and its first weights before the wait, and nothing else: no
    load before the wait has an address made from another pointer argument (the activations), and nothing is
    written."""
    ptx = aot.compile_variant(v, 90).asm["ptx"]
    body = ptx[ptx.index(".entry"):]
    wait = body.index("griddepcontrol.wait")
    first = min(m.start() for m in re.finditer(r"\b(ld|st|atom|red|cp\.async)\.global", body))
    if v.constexprs.get("EARLY"):
        assert first < wait, f"{v.name}: nothing loaded before the wait"
        assert not re.search(r"\b(st|atom|red|cp\.async)\.global", body[:wait]), v.name
        assert _loads_before_wait(v, body, wait) == [], v.name
        late = replace(v, constexprs={**v.constexprs, "EARLY": False})  # the check itself sees activation loads
        late_body = aot.compile_variant(late, 90).asm["ptx"]
        late_body = late_body[late_body.index(".entry"):]
        assert _loads_before_wait(v, late_body, len(late_body)), v.name
    else:
        assert wait < first, v.name
    assert "griddepcontrol.launch_dependents" in body
    plain = aot.compile_variant(replace(v, constexprs={**v.constexprs, "PDL": False}), 90).asm["ptx"]
    assert "griddepcontrol" not in plain


def test_turing_tiles_have_no_tensor_core_instructions():
    """Documents why prefill on Turing dequantizes and calls cuBLAS: Triton's tl.dot becomes FMAs there."""
    tile = next(v for v in aot.variants(75) if v.fn.__name__ == "qmm_kernel" and v.constexprs["USE_DOT"])
    assert "mma" not in aot.compile_variant(tile, 75).asm["ptx"]


@pytest.mark.parametrize("words, wide", [(4, "ld.global.v4.b32"), (2, "ld.global.v2.b32")])
def test_aligned_q6k_decode_reads_whole_words(words, wide):
    """The point of the aligned Q6_K layout: the int8 decode reads the weight's ql and qh words W at a time, and
    no 2-byte piece but each block's d (GGUF's layout reads every word as two 2-byte halves: 8 loads or more)."""
    from tierlm.kernels.quant_matmul import MMVQ_Q6K_ALIGNED_STEPS, MMVQ_Q6K_LOADS, MMVQ_Q6K_STEP

    new = aot.aligned_q6k(aot.mmvq_variant(14, *MMVQ_Q6K_ALIGNED_STEPS[words]), words)
    old = aot.mmvq_variant(14, *MMVQ_Q6K_STEP, loads=MMVQ_Q6K_LOADS)
    for cc in (75, 90):
        ptx, ptx_old = aot.compile_variant(new, cc).asm["ptx"], aot.compile_variant(old, cc).asm["ptx"]
        # d: one load in the whole steps' body, one in the masked last step
        assert ptx.count("ld.global.b16") == 2 < ptx_old.count("ld.global.b16"), (cc, ptx_old.count("ld.global.b16"))
        assert ptx.count(wide) >= 3, (cc, ptx.count(wide))  # ql of quarters 0 and 1, qh (the activations: more)


@pytest.mark.parametrize("kind", ["mmq", "dequant"])
def test_aligned_q6k_tiles_load_like_gguf_tiles(kind):
    """The tiles and prefill's dequantizer on aligned Q6_K rows of 16-byte multiples load the block bodies as they do
    GGUF's, two bytes at a time (``triton_q.q6k_block``): with 16-byte loads Triton pipelines them through shared
    memory, which measured 1.1-1.4x slower on an H200."""
    from collections import Counter

    from tierlm.kernels.quant_matmul import MMQ_TILES

    bn, warps = MMQ_TILES[14][:2]
    make = (lambda: aot.mmq_variant(14, "fp16", bn, 1, warps)) if kind == "mmq" else (
        lambda: aot.kquant_dequant_variant(14, "fp16"))

    def loads(v):
        ptx = aot.compile_variant(v, 90).asm["ptx"]
        widths = Counter(re.findall(r"ld\.global(?:\.\w+)*?\.((?:v\d\.)?[bu]\d+)", ptx))
        return widths, len(re.findall(r"cp\.async\.c[ag]", ptx))

    assert loads(aot.aligned_q6k(make(), 4)) == loads(make())
