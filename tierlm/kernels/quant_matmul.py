"""y = x @ dequant(w).T straight from GGUF weight bytes, with a plain-PyTorch reference beside it.

``w`` is an (N, row_bytes) uint8 tensor: the bytes of an (N, K) GGUF weight, one row of K elements
per output. On CPU the product is the reference computation (dequantize, then matmul). On CUDA:

- Q4_K, Q6_K, Q8_0, Q5_0 with at most ``DECODE_MAX_M`` rows: the activation rows are quantized to
  int8 in groups of 32 (as llama.cpp does for its quantized matrix-vector kernels), then one launch
  reads each weight byte once, coalesced, and multiplies with ``dp4a`` (``triton_mmvq``); from 3-5
  rows on sm_80+ with 16-bit activations (``pick_config``), tensor-core tiles decode each weight once
  for all rows (``triton_mmq``). At one row on sm_90+ the quantizer and the product are programmatic dependent
  launches (``pdl_launch``). The float-activation kernels (``triton_gemv``,
  ``triton_q.qmm_kernel``) stay selectable by config;
- more rows (prefill): a Triton launch dequantizes the weight to x's dtype (Q4_K and Q6_K with
  ``triton_mmq``'s decode), then ``torch.matmul`` (cuBLAS, tensor cores from Turing on);
- other types: ``formats.dequantize`` then ``torch.matmul``.

Glossary: M = activation rows (all leading dims of x), N = outputs, K = inputs.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tierlm.errors import TierlmError
from tierlm.kernels.cpu_quant import TYPES as CPU_TYPES
from tierlm.kernels.cpu_quant import cpu_quant_matmul
from tierlm.kernels.q6k_layout import from_aligned
from tierlm.weights.formats import GGMLType, dequantize
from tierlm.weights.ggml_types import block_format, ggml_type, tensor_nbytes

FUSED_TYPES = (GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0, GGMLType.Q5_0)
TRITON_TYPES = FUSED_TYPES + (GGMLType.F16, GGMLType.BF16, GGMLType.F32)  # what the kernels can decode
DECODE_MAX_M = 16  # above this many rows the matmul is compute-bound: dequantize once, then cuBLAS
_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class KernelInputError(TierlmError, ValueError):
    """A kernel was called with tensors of the wrong shape, dtype, layout or device."""


@dataclass(frozen=True)
class QMMConfig:
    """One launch configuration of the decode product.

    kind "mmq": ``triton_mmq.mmq_kernel``, one program per (``block_n`` weight rows, split, 16
    activation rows), ``nblk`` 256-element blocks decoded to the activations' dtype per loop step and
    multiplied on tensor cores (float16 and bfloat16 activations only).
    kind "gemv": ``triton_gemv.qmv_kernel``, one program per (activation row, 32 * rows weight
    rows, split), ``num_warps`` warps walking interleaved parts of the rows, ``rows`` rows per
    thread. kind "tile": ``triton_q.qmm_kernel`` on (block_m, block_n) tiles decoded ``k_step``
    weights per loop step, with tl.dot (``use_dot``) or FMAs. split_k > 1 gives each output that
    many programs whose partial sums are added afterwards in a fixed order (no atomics: results do
    not vary run to run).
    """

    kind: str = "gemv"
    num_warps: int = 4
    split_k: int = 1
    block_m: int = 16
    block_n: int = 32
    k_step: int = 256
    use_dot: bool = True
    num_stages: int = 2
    rows: int = 1
    q4k_block: bool = False  # gemv on Q4_K: a whole block per step (see triton_gemv._gemv)
    nblk: int = 4  # mmvq: blocks of each row per loop step (block_n is its rows per program)
    prefetch: bool = False  # mmvq: load the next step's weights before computing this one's
    loads: int = 0  # mmvq on Q4_K: 1 header in one vector load, 2 (xd, xs) pairs in one, 4 eight threads per block
    # (triton_mmvq._q4k_rows, _q4k_rows32), 8 with 4 and 2: that step in fewer instructions (_q4k_rows32p); on
    # Q6_K: 4 sixteen threads per block (_q6k_rows16), 8: that step in fewer instructions (_q6k_rows16p)
    act_rows: int = 1  # mmvq, Q4_K with loads & 8: activation rows per program (up to 4, then no prefetch), the
    # weights read once for all of them


# The configurations bench/kernels.py times for decode; pick_config chooses among them.
GEMV_CONFIGS = tuple(
    QMMConfig("gemv", w, s, rows=r, q4k_block=b) for b in (False, True) for r in (1, 2) for w in (4, 8) for s in (1, 2, 4)
)  # q4k_block only changes Q4_K
TILE_CONFIGS = tuple(QMMConfig("tile", 4, s, 16, bn, 256, True) for bn in (32, 64) for s in (1, 4))  # tl.dot tiles
# (rows per program, 256-element blocks per step, warps): small programs looping over K, up to a step of a
# whole 4096-element row (fit_step trims a step to the row)
MMVQ_STEPS = ((4, 2, 1), (4, 4, 1), (4, 4, 2), (1, 4, 1), (1, 8, 1), (2, 4, 1), (2, 8, 2), (2, 2, 1), (8, 2, 2),
              (8, 4, 4), (4, 8, 4), (1, 16, 2))
MMVQ_CONFIGS = tuple(QMMConfig("mmvq", w, 1, block_n=bn, nblk=nb) for (bn, nb, w) in MMVQ_STEPS) + (
    QMMConfig("mmvq", 1, 2, block_n=4, nblk=2, prefetch=True), QMMConfig("mmvq", 2, 1, block_n=4, nblk=4, loads=3),
    QMMConfig("mmvq", 1, 1, block_n=1, nblk=8, loads=6), QMMConfig("mmvq", 2, 1, block_n=1, nblk=8, loads=6),
    QMMConfig("mmvq", 1, 1, block_n=4, nblk=2, loads=6), QMMConfig("mmvq", 1, 1, block_n=2, nblk=2, loads=4),
    QMMConfig("mmvq", 1, 1, block_n=1, nblk=8, loads=14), QMMConfig("mmvq", 1, 1, block_n=4, nblk=2, loads=14),
    QMMConfig("mmvq", 1, 1, block_n=2, nblk=4, loads=14), QMMConfig("mmvq", 1, 1, block_n=2, nblk=2, loads=12),
    QMMConfig("mmvq", 1, 1, block_n=1, nblk=4, loads=12),
    QMMConfig("mmvq", 1, 1, block_n=1, nblk=8, loads=14, act_rows=4),
    QMMConfig("mmvq", 1, 1, block_n=2, nblk=4, loads=14, act_rows=2),
    QMMConfig("mmvq", 1, 1, block_n=4, nblk=2, loads=14, act_rows=4),
    QMMConfig("mmvq", 2, 1, block_n=1, nblk=8, loads=14), QMMConfig("mmvq", 2, 1, block_n=2, nblk=4, loads=14),
    QMMConfig("mmvq", 2, 1, block_n=4, nblk=2, loads=14),
    QMMConfig("mmvq", 2, 1, block_n=2, nblk=4, loads=14, act_rows=2), QMMConfig("mmvq", 2, 1, block_n=2, nblk=2, loads=12))
# tensor-core decode tiles of 32, 64 and 16 rows per program (4, 8, 2 warps), without and with split-K
MMQ_CONFIGS = tuple(QMMConfig("mmq", w, s, block_n=bn, nblk=1) for (bn, w) in ((32, 4), (64, 8), (16, 2))
                    for s in (1, 3))
DECODE_CONFIGS = GEMV_CONFIGS + TILE_CONFIGS + MMVQ_CONFIGS + MMQ_CONFIGS
DEQUANT_CONFIG = (16, 256, 4)  # prefill dequantization: (rows, elements per program, warps)
# Q4_K's and Q6_K's (triton_mmq.q4k_dequant_kernel, q6k_dequant_kernel): (rows, 256-element blocks, warps)
KQUANT_DEQUANT_CONFIG = {GGMLType.Q4_K: (64, 2, 4), GGMLType.Q6_K: (64, 1, 4)}


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> tuple[tuple[int, int], int]:
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


def device_info(device: torch.device) -> tuple[tuple[int, int], int]:
    """(compute capability, multiprocessor count) of a CUDA device."""
    return _device_info(device.index if device.index is not None else torch.cuda.current_device())


PDL = os.environ.get("TIERLM_PDL", "1") != "0"  # TIERLM_PDL=0 turns programmatic dependent launch off
# PDL only at one activation row (one token in the MoE): H200, against launches without it in the same run
# (bench/results/pdl-NVIDIA_H200-all-rows.json, -prefetch.json): 1.01-1.22x faster at one row on every DeepSeek-V3
# shape, the MoE layer 1.03x (1.32 -> 1.27-1.28x its read time); at 4 rows 0.75-1.15x (the aligned Q6_K expert down
# and the 4-token MoE slower), at 16 rows within 3% either way
PDL_MAX_ROWS = 1


def pdl_launch(device: torch.device, rows: int) -> dict:
    """Launch options of the int8 decode kernels (the quantizer, the products, the MoE's launches) for ``rows``
    activation rows (tokens, in the MoE): on sm_90+ up to ``PDL_MAX_ROWS``, programmatic dependent launch
    (``triton_q.pdl_enter``), so that each launch is scheduled while the one before it runs; nothing elsewhere (the
    instructions are sm_90's), in Triton's interpreter, with ``PDL`` off or on a Triton without grid dependency
    control. Called at every decode launch: the cheap checks first, Triton's support looked up once."""
    if (rows > PDL_MAX_ROWS or not PDL or device.type != "cuda" or device_info(device)[0] < (9, 0)
            or _interpreting() or not _has_pdl()):
        return {}
    return {"PDL": True, "launch_pdl": True}


@functools.lru_cache(maxsize=None)
def _has_pdl() -> bool:
    from tierlm.kernels.triton_q import HAS_PDL

    return HAS_PDL


# Default int8 decode tiles (rows per program, 256-element blocks per step, warps) per weight type at
# one activation row, the best geometric mean over DeepSeek-V3's shapes in the H200 sweep
# (bench/results/kernels-NVIDIA_H200-int8.md); Q4_K at 1-4 rows and Q6_K at one: the steps below.
MMVQ_TILES = {GGMLType.Q4_K: (4, 4, 2), GGMLType.Q6_K: (4, 2, 1), GGMLType.Q8_0: (1, 4, 1), GGMLType.Q5_0: (1, 4, 1)}
# Q4_K at 1-4 rows: the lean eight-threads-per-block step (loads 14, triton_mmvq._q4k_rows32p) in two-warp programs
# of one 16-byte piece per thread, eight block lines per step: 40-48 registers, so 42 or more resident warps per
# multiprocessor on sm_90 against 32 for one-warp programs of two pieces. Its (rows, blocks, warps) follow the row
# (q4k_row_step), at one activation row and, with 2 or 4 of them per program (act_rows), at 2-4:
# - MMVQ_Q4K_STEP, one row x 8 blocks, where 8 divides the row's blocks (o_proj, 64) or the rows are few;
# - MMVQ_Q4K_PAIR_STEP, two rows x 4 blocks, where only 4 does (7168 elements: 28 blocks, so one row x 8 would end
#   on a half-empty step) and there are at least MMVQ_Q4K_PAIR_PROGRAMS two-row programs per multiprocessor;
# - MMVQ_Q4K_SHORT_STEP, four rows x 2 blocks, for rows shorter than MMVQ_Q4K_SHORT_K (one step per program).
# H200, quantizer included (bench/results/kernels-NVIDIA_H200-int8.md, "Two-warp steps"): one row 1.04-1.14x
# faster than the one-warp steps before on DeepSeek-V3's Q4_K shapes (dense up 66 -> 75% of copy bandwidth; the
# product alone 81%), two rows up to 1.13x, three or four rows on the experts up to 1.08x
MMVQ_Q4K_STEP = (1, 8, 2)
MMVQ_Q4K_PAIR_STEP = (2, 4, 2)
MMVQ_Q4K_PAIR_PROGRAMS = 16
MMVQ_Q4K_LOADS = 14
MMVQ_Q4K_SHORT_K = 4096
MMVQ_Q4K_SHORT_STEP = (4, 2, 2)
# Q6_K at one row: the lean sixteen-threads-per-block step (loads 12, triton_mmvq._q6k_rows16p), two rows x 2 blocks
# per two-warp program, one lane per thread at 32 registers (full occupancy); H200, quantizer included: 31 / 54 /
# 65% of copy bandwidth on an expert's down / dense down / head against 29 / 46 / 61% for the one-warp (2, 2, 1)
# step of loads 4 before (bench/results/kernels-NVIDIA_H200-int8.md, "Two-warp steps")
MMVQ_Q6K_STEP = (2, 2, 2)
MMVQ_Q6K_LOADS = 12
# Q6_K in the aligned layout (kernels.q6k_layout): (rows, blocks, warps) per words read at once by a lane
# (q6k_words: 4 where rows are 16-byte multiples, 2 where 8-byte), one lane per thread. H200, one row, quantizer
# included, beside the GGUF-layout step above in the same run: 84 / 92 / 39% of copy bandwidth on the dense down /
# head / an expert's down against 53 / 63 / 31% (bench/results/kernels-NVIDIA_H200-int8.md, "Ninth round")
MMVQ_Q6K_ALIGNED_STEPS = {4: (2, 4, 1), 2: (2, 2, 1), 1: (2, 2, 2)}
# ... run once per activation row (the rows after the first find the weights in L2) up to these many rows, where it
# beat the tensor-core tiles on aligned rows (H200, bench/results/q6k-layout-rows-NVIDIA_H200-narrow.json): up to 8
# rows on matrices under MMQ_MIN_WEIGHTS weights (an expert's down: 24.4 against 25.0 us at 8 rows, 33.9 against
# 25.8 at 12), up to 4 on larger ones (dense down: 98 against 141 us at 4 rows, 143 against 139 at 6; the head: 691
# against 843 at 4, 1015 against 830 at 6)
MMVQ_Q6K_ALIGNED_MAX_M = 8
MMVQ_Q6K_ALIGNED_MAX_M_LARGE = 4
MMQ_BM = 16  # activation rows per mmq program (the smallest tl.dot tile)
# Tensor-core decode tiles (triton_mmq) per type: (weight rows per program, warps, programs per multiprocessor
# that split-K aims at, fewest 256-element blocks per split), the best of the H200 sweep over DeepSeek-V3's shapes
# at 4 and 16 rows (bench/results/decode-rows-NVIDIA_H200.md): Q4_K 31-33% of copy bandwidth on dense up and
# o_proj at 16 rows against 6-7% for the earlier tiles
MMQ_TILES = {GGMLType.Q4_K: (64, 4, 8, 4), GGMLType.Q6_K: (32, 2, 4, 2), GGMLType.Q8_0: (32, 2, 4, 2),
             GGMLType.Q5_0: (32, 2, 4, 2)}
MMVQ_MAX_M = 4  # above this many rows the tensor-core tiles are faster for every type (on sm_80+)
# At 3-4 rows the tiles win on Q6_K and Q8_0, and on Q4_K matrices of at least MMQ_MIN_WEIGHTS weights (dense up,
# o_proj, q_b: 1.2-1.3x); the int8 kernels keep Q4_K's experts and Q5_0. At 2 rows the int8 kernels win except on
# a matrix as tall as the output head (TILE_MIN_N_MULTI_ROW).
MMQ_MIN_WEIGHTS = 1 << 24
TILE_MIN_N_MULTI_ROW = 65536  # the 129280-row head: tiles beat int8 already at 2 rows


def mmvq_loads(qtype: GGMLType, loads: int, *weights: torch.Tensor) -> int:
    """The ``QMMConfig.loads`` bits an int8 product over ``weights`` of ``qtype`` launches with: all of them
    for Q4_K (8 with 2: its lean step reads (xd, xs) pairs), less the eight-thread steps (4, 8) on weights
    that are not 16-byte aligned (those steps tell the compiler they are); only the sixteen-thread steps
    (4, and 8: its lean form) for Q6_K; none for the other types."""
    if qtype == GGMLType.Q4_K:
        loads |= 2 if loads & 8 else 0
        return loads & 3 if any(w.data_ptr() % 16 for w in weights) else loads
    return loads & 12 if qtype == GGMLType.Q6_K else 0


def q6k_row_words(K: int) -> int:
    """The 4-byte words a lane of the aligned-layout Q6_K product can read at once on rows of K elements, as far as
    the rows go: 4 where each row is a 16-byte multiple (8 blocks), 2 where an 8-byte one (4 blocks), else 1."""
    nb = K // 256
    if nb % 2:
        raise KernelInputError(f"aligned Q6_K: rows of K={K} elements ({nb} blocks) start on 2-byte boundaries only; "
                               "keep such weights in GGUF's layout (q6k_layout.alignable)")
    return 4 if nb % 8 == 0 else 2 if nb % 4 == 0 else 1


def q6k_words(K: int, *weights: torch.Tensor) -> int:
    """The words a lane reads at once (the kernel's ALIGNED): ``q6k_row_words``, fewer where the weights' bytes start
    on a narrower boundary than 4 W bytes."""
    words = q6k_row_words(K)
    if any(t.data_ptr() % 4 for t in weights):
        raise KernelInputError("aligned Q6_K: the weight's bytes start off a 4-byte boundary (a view at an odd "
                               "offset?); pass a copy (.clone()), whose storage is aligned")
    while any(t.data_ptr() % (4 * words) for t in weights):
        words //= 2
    return words


def aligned_step(K: int, *weights: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, blocks per step, warps, words per load) of the aligned-layout Q6_K product on rows of K elements."""
    words = q6k_words(K, *weights)
    return (*MMVQ_Q6K_ALIGNED_STEPS[words], words)


def pick_config(qtype: GGMLType, M: int, N: int, K: int, dtype: torch.dtype,
                capability: tuple[int, int], sms: int, aligned: bool = False) -> QMMConfig:
    """The decode configuration for an (M <= DECODE_MAX_M, N, K) product on a given card.

    Up to ``MMVQ_MAX_M`` rows (or on cards without tensor-core tiles for this dtype): the
    int8-activation kernel with the measured tile of its type (for Q4_K, the lean eight-thread step shaped
    by ``q4k_row_step``, with 2 or 4 activation rows per program from 2 rows; for one Q6_K row, the lean
    sixteen-thread step ``MMVQ_Q6K_STEP``). More
    rows with 16-bit activations on sm_80+ (from 3 rows on the types and sizes where that measured faster,
    from 2 on a matrix as tall as the output head): the tensor-core tiles ``MMQ_TILES``, which decode each
    weight once for all rows, split along K to fill the card. ``aligned`` (Q6_K in the aligned layout): the step
    of ``MMVQ_Q6K_ALIGNED_STEPS`` for the rows' alignment (the launch re-checks the pointers) up to
    ``MMVQ_Q6K_ALIGNED_MAX_M`` rows (``MMVQ_Q6K_ALIGNED_MAX_M_LARGE`` on a matrix of ``MMQ_MIN_WEIGHTS`` weights or
    more), then the tiles.
    """
    tiles_ok = capability >= (8, 0) and dtype != torch.float32
    wide = M > MMVQ_MAX_M or (M > 1 and N >= TILE_MIN_N_MULTI_ROW) or (M > 2 and (
        qtype in (GGMLType.Q6_K, GGMLType.Q8_0) or (qtype == GGMLType.Q4_K and N * K >= MMQ_MIN_WEIGHTS)))
    if qtype == GGMLType.Q6_K and aligned:  # the aligned int8 step, once per row, beats the tiles on these rows
        wide = M > (MMVQ_Q6K_ALIGNED_MAX_M_LARGE if N * K >= MMQ_MIN_WEIGHTS else MMVQ_Q6K_ALIGNED_MAX_M)
    if tiles_ok and wide:
        bn, warps, waves, min_steps = MMQ_TILES[qtype]
        return QMMConfig("mmq", warps, mmq_splits(N, K, bn, sms, waves, min_steps), block_n=bn, nblk=1)
    bn, nb, w = MMVQ_TILES[qtype]
    loads, act_rows = 0, 1
    if qtype == GGMLType.Q6_K and aligned:  # as at one row (on cards without tiles: up to 16 rows)
        bn, nb, w = MMVQ_Q6K_ALIGNED_STEPS[q6k_row_words(K)]
    elif qtype == GGMLType.Q4_K:
        (bn, nb, w), loads = q4k_row_step(N, K, sms), MMVQ_Q4K_LOADS
        act_rows = 1 if M == 1 else 2 if M == 2 else 4
    elif qtype == GGMLType.Q6_K and M == 1:
        (bn, nb, w), loads = MMVQ_Q6K_STEP, MMVQ_Q6K_LOADS
    return QMMConfig("mmvq", w, 1, block_n=bn, nblk=nb, loads=loads, act_rows=act_rows)


def q4k_row_step(N: int, K: int, sms: int) -> tuple[int, int, int]:
    """(rows, blocks per step, warps) of the int8 Q4_K product on an (N, K) weight (see MMVQ_Q4K_STEP)."""
    nblocks = K // 256
    if K < MMVQ_Q4K_SHORT_K:
        return MMVQ_Q4K_SHORT_STEP
    pair_rows, pair_blocks, _ = MMVQ_Q4K_PAIR_STEP
    if nblocks % MMVQ_Q4K_STEP[1] and nblocks % pair_blocks == 0 and N // pair_rows >= MMVQ_Q4K_PAIR_PROGRAMS * sms:
        return MMVQ_Q4K_PAIR_STEP
    return MMVQ_Q4K_STEP


def mmq_splits(N: int, K: int, block_n: int, sms: int, waves: int, min_steps: int = 1) -> int:
    """Split-K factor of an mmq launch that gives about ``waves`` programs per multiprocessor, with at least
    ``min_steps`` 256-element blocks of K per split (each split costs fp32 partial sums and their sum)."""
    return max(1, min(K // 256 // min_steps, triton_cdiv(waves * sms, triton_cdiv(N, block_n))))


def check_inputs(x: torch.Tensor, w: torch.Tensor, qtype, K: int, name: str = "quant_matmul") -> GGMLType:
    """Validate x (..., K) and w (N, row_bytes) for a product; returns the normalised type."""
    qtype = ggml_type(qtype)
    fmt = block_format(qtype)
    if not isinstance(x, torch.Tensor) or x.dtype not in _ACT_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise KernelInputError(f"{name}: x must be a float16, bfloat16 or float32 tensor, got {got}")
    if not isinstance(w, torch.Tensor) or w.dtype != torch.uint8 or w.dim() != 2:
        got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise KernelInputError(f"{name}: w must be a 2-D uint8 tensor of GGUF bytes (N, row_bytes), got {got}")
    if K <= 0 or K % fmt.block_size:
        raise KernelInputError(f"{name}: K={K} is not a positive multiple of the {qtype.name} block size {fmt.block_size}")
    if x.dim() == 0 or x.shape[-1] != K:
        raise KernelInputError(f"{name}: x has shape {tuple(x.shape)} but its last dim must be K={K}")
    row_bytes = tensor_nbytes(qtype, (1, K))
    if w.shape[1] != row_bytes:
        raise KernelInputError(
            f"{name}: a {qtype.name} row of K={K} elements is {row_bytes} bytes, but w has rows of {w.shape[1]}; "
            "the weight's type or K does not match its bytes"
        )
    if w.shape[0] > 0 and (w.stride(1) != 1 or w.stride(0) != row_bytes):
        raise KernelInputError(f"{name}: w must be contiguous (strides {w.stride()}); call .contiguous() first")
    if x.device != w.device:
        raise KernelInputError(f"{name}: x is on {x.device} but w is on {w.device}; move them to one device")
    if x.is_cuda and x.dtype == torch.bfloat16 and device_info(x.device)[0] < (8, 0):
        raise KernelInputError(f"{name}: bfloat16 needs compute capability 8.0+; use float16 on this GPU")
    return qtype


def quant_matmul_ref(x: torch.Tensor, w: torch.Tensor, qtype, K: int) -> torch.Tensor:
    """Reference: dequantize w to float32 and ``F.linear`` in float32; returns float32 (..., N)."""
    qtype = check_inputs(x, w, qtype, K, "quant_matmul_ref")
    wd = dequantize(w, qtype, (w.shape[0], K), torch.float32)
    return F.linear(x.to(torch.float32), wd)


def dequantize_rows(w: torch.Tensor, qtype, K: int, dtype: torch.dtype, aligned: bool = False) -> torch.Tensor:
    """(N, row_bytes) GGUF bytes -> (N, K) in ``dtype``: one Triton launch on CUDA for TRITON_TYPES. ``aligned``: Q6_K
    rows in the aligned layout (``kernels.q6k_layout``)."""
    qtype = ggml_type(qtype)
    N = w.shape[0]
    aligned = aligned and qtype == GGMLType.Q6_K
    if not w.is_cuda or qtype not in TRITON_TYPES or N == 0:
        return dequantize(from_aligned(w) if aligned else w, qtype, (N, K), dtype)
    from tierlm.kernels import triton_q as tq

    out = torch.empty((N, K), dtype=dtype, device=w.device)
    if qtype in KQUANT_DEQUANT_CONFIG:  # (32, rows) tiles as the tensor-core decode tiles take them, wide loads
        from tierlm.kernels import triton_mmq as tk

        bn, nb, warps = KQUANT_DEQUANT_CONFIG[qtype]
        grid = (triton_cdiv(N, bn), triton_cdiv(K // 256, nb))
        if qtype == GGMLType.Q4_K:
            tk.q4k_dequant_kernel[grid](_word_aligned(w), out, N, K, w.shape[1], BN=bn, NB=nb,
                                        OUT_KIND=_dot_kind(dtype), ASM=not _interpreting(), num_warps=warps)
        else:
            tk.q6k_dequant_kernel[grid](w, out, N, K, w.shape[1], BN=bn, NB=nb, ALIGNED=aligned, num_warps=warps)
        return out
    bn, k_step, warps = DEQUANT_CONFIG
    block = tq.BLOCK_ELEMS[int(qtype)]
    nb = max(1, k_step // block)
    nblocks = K // block
    grid = (triton_cdiv(N, bn), triton_cdiv(nblocks, nb))
    tq.dequant_kernel[grid](w, out, N, K, nblocks, w.shape[1], QTYPE=int(qtype), BLOCK=block, BLOCK_N=bn, NB=nb,
                            num_warps=warps)
    return out


def _word_aligned(w: torch.Tensor) -> torch.Tensor:
    """w itself, or a copy where its bytes do not start on a 4-byte boundary: the Q4_K tiles read block headers
    as 32-bit words. GGUF aligns tensor data to 32 bytes and rows are 144-byte multiples, so the copy is for views
    made some other way."""
    return w if w.data_ptr() % 4 == 0 else w.clone()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dot_kind(dtype: torch.dtype) -> int:
    return {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def quantize_q8_ref(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of the int8 activation groups: x2 (M, K) -> xq int8 (M, K), xd and xs float32
    (M, K/32) with x ~= xd * xq per group of 32 and xs = xd * sum(xq).

    Computed on the CPU with the kernel's roundings, so the two agree bit for bit: 127 / max|x|
    and max|x| / 127 correctly rounded in float32 (PyTorch's CUDA division by a scalar multiplies
    by a reciprocal, one ulp off at times), x * inv rounded to float32, then to the nearest
    integer with ties to even. Ties are common: with 16-bit inputs a value of exactly half its
    group's maximum lands on 63.5 give or take an ulp.
    """
    M, K = x2.shape
    v = x2.detach().to("cpu", torch.float32).reshape(M, K // 32, 32)
    amax = v.abs().amax(-1)
    c127 = torch.full_like(amax, 127.0)
    inv = torch.where(amax > 0, c127 / amax.clamp_min(1e-30), torch.zeros_like(amax))
    q = torch.round(v * inv[..., None]).clamp(-127, 127)
    xd = amax / c127
    xs = xd * q.sum(-1).to(torch.float32)
    return q.to(torch.int8).reshape(M, K).to(x2.device), xd.to(x2.device), xs.to(x2.device)


def quantize_q8(x2: torch.Tensor, pack: bool = False,
                pdl_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quantize_q8_ref`` as one Triton launch (on CUDA, or in Triton's interpreter). ``pack``: xd and
    xs interleaved in one (M, K/32, 2) tensor, returned in both places (the layout of
    ``QMMConfig.loads & 2``). ``pdl_rows``: the activation rows of the launch it feeds (``pdl_launch``; x2's rows
    by default)."""
    M, K = x2.shape
    if K % 32:
        raise KernelInputError(f"quantize_q8: K={K} is not a multiple of 32")
    if not (x2.is_cuda or _interpreting()):
        xq, xd, xs = quantize_q8_ref(x2)
        if pack:
            xd = xs = torch.stack([xd, xs], -1)
        return xq, xd, xs
    from tierlm.kernels import triton_mmvq as tv

    xq = torch.empty((M, K), dtype=torch.int8, device=x2.device)
    if pack:
        xd = xs = torch.empty((M, K // 32, 2), dtype=torch.float32, device=x2.device)
    else:
        xd = torch.empty((M, K // 32), dtype=torch.float32, device=x2.device)
        xs = torch.empty_like(xd)
    G = 8
    tv.quantize_q8_kernel[(M, triton_cdiv(K // 32, G))](x2, xq, xd, xs, K, x2.stride(0), G=G, ASM=not _interpreting(),
                                                         PACK=pack, num_warps=1,
                                                         **pdl_launch(x2.device, M if pdl_rows is None else pdl_rows))
    return xq, xd, xs


def quant_matmul_q8_ref(x: torch.Tensor, w: torch.Tensor, qtype, K: int) -> torch.Tensor:
    """Reference of the int8-activation product: the weight dequantized times the activations as
    their int8 groups hold them (``quantize_q8_ref``), float32 (..., N). The kernels match it up
    to float summation order."""
    qtype = check_inputs(x, w, qtype, K, "quant_matmul_q8_ref")
    x2 = x.reshape(-1, K)
    xq, xd, _ = quantize_q8_ref(x2)
    xdq = (xq.to(torch.float32).reshape(-1, K // 32, 32) * xd[..., None]).reshape(x2.shape)
    out = F.linear(xdq, dequantize(w, qtype, (w.shape[0], K), torch.float32))
    return out.reshape(*x.shape[:-1], w.shape[0])


def _qmm_launch(x2: torch.Tensor, w: torch.Tensor, qtype: GGMLType, K: int, cfg: QMMConfig,
                aligned: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused decode product of x2 (M, K), stride 1 along K -> (M, N) in ``out_dtype`` (x2's by default; the int8
    launch writes it itself) (``aligned``: Q6_K rows in the aligned layout)."""
    M, N = x2.shape[0], w.shape[0]
    out_dtype = out_dtype or x2.dtype
    if aligned and cfg.kind == "gemv":
        raise KernelInputError("the gemv decode reads Q6_K in GGUF's layout only; use kind 'mmvq', 'mmq' or 'tile' "
                               "for aligned Q6_K weights")
    if cfg.kind == "mmvq":
        from tierlm.kernels import triton_mmvq as tv

        if qtype not in FUSED_TYPES:
            raise KernelInputError(f"mmvq has no {qtype.name} path; use kind 'gemv'")
        if cfg.act_rows < 1:
            raise KernelInputError(f"QMMConfig.act_rows={cfg.act_rows}: give 1 (one activation row per program) "
                                   "to 4")
        words = q6k_words(K, w) if aligned else 0
        loads = 0 if aligned else mmvq_loads(qtype, cfg.loads, w)
        xq, xd, xs = quantize_q8(x2, pack=bool(loads & 2))
        nblk, warps = tv.fit_step(cfg.nblk, cfg.num_warps, K)
        nblocks = K // tv.BLOCK_ELEMS[int(qtype)]
        step = nblk * 256 // tv.BLOCK_ELEMS[int(qtype)]  # blocks per loop step
        per_split, splits = _splits(nblocks, cfg.split_k, step)
        out = _out_buffer(x2, M, N, splits, out_dtype)
        mr = min(cfg.act_rows, M) if qtype == GGMLType.Q4_K and loads & 8 else 1
        mr = 4 if mr > 2 else mr  # 1, 2 or 4 compiled forms
        grid = (triton_cdiv(M, mr) * triton_cdiv(N, cfg.block_n), splits)
        tv.mmvq_kernel[grid](xq, xd, xs, w, out, N, K, w.shape[1], nblocks, per_split, N, M * N, M,
                             QTYPE=int(qtype), BN=cfg.block_n, NBLK=nblk, ASM=not _interpreting(), PF=cfg.prefetch,
                             LOADS=loads, MR=mr, ALIGNED=words,
                             num_warps=warps, num_stages=cfg.num_stages, **pdl_launch(x2.device, M))
    elif cfg.kind == "mmq":
        return mmq_launch(x2, w, qtype, K, cfg, aligned=aligned).to(out_dtype)
    elif cfg.kind == "gemv":
        from tierlm.kernels import triton_gemv as tg

        units = tg.units_per_row(int(qtype), K, cfg.q4k_block)
        per_split = triton_cdiv(units, cfg.split_k)
        splits = triton_cdiv(units, per_split)
        out = _out_buffer(x2, M, N, splits)
        grid = (M, triton_cdiv(N, 32 * cfg.rows), splits)
        tg.qmv_kernel[grid](x2, w, out, N, units, w.shape[1], x2.stride(0), N, per_split, M * N,
                            QTYPE=int(qtype), W=cfg.num_warps, R=cfg.rows, ASM=not _interpreting(),
                            Q4K_BLOCK=cfg.q4k_block,
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        from tierlm.kernels import triton_q as tq

        block = tq.BLOCK_ELEMS[int(qtype)]
        if cfg.k_step % block:
            raise KernelInputError(f"config k_step={cfg.k_step} is not a multiple of the {qtype.name} block ({block})")
        nb = cfg.k_step // block
        nblocks = K // block
        per_split, splits = _splits(nblocks, cfg.split_k, nb)
        out = _out_buffer(x2, M, N, splits)
        grid = (triton_cdiv(N, cfg.block_n), triton_cdiv(M, cfg.block_m), splits)
        tq.qmm_kernel[grid](
            x2, w, out, M, N, nblocks, w.shape[1], x2.stride(0), N, M * N, per_split,
            QTYPE=int(qtype), BLOCK=block, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NB=nb,
            USE_DOT=cfg.use_dot, DOT_KIND=_dot_kind(x2.dtype), DOT_PREC="ieee", ALIGNED=aligned,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return (out if out.dim() == 2 else out.sum(0)).to(out_dtype)


def _splits(nblocks: int, split_k: int, step: int) -> tuple[int, int]:
    """(blocks per split, splits) for ``split_k`` splits of whole ``step``-block loop steps over ``nblocks``."""
    per_split = triton_cdiv(triton_cdiv(nblocks, split_k), step) * step
    return per_split, triton_cdiv(nblocks, per_split)


def mmq_launch(x2: torch.Tensor, w: torch.Tensor, qtype: GGMLType, K: int, cfg: QMMConfig,
               asm: bool = True, aligned: bool = False) -> torch.Tensor:
    """The tensor-core decode product (``triton_mmq.mmq_kernel``) of x2 (M, K) -> (M, N) in x2's dtype; ``asm=False``
    takes the plain-Triton Q4_K decode instead of inline PTX (the benchmarks compare the two); ``aligned``: Q6_K
    rows in the aligned layout."""
    from tierlm.kernels import triton_mmq as tk

    if qtype not in FUSED_TYPES or x2.dtype == torch.float32:
        raise KernelInputError(f"mmq multiplies {', '.join(t.name for t in FUSED_TYPES)} weights with float16 or "
                               f"bfloat16 activations, got {qtype.name} and {x2.dtype}; use kind 'mmvq'")
    M, N = x2.shape[0], w.shape[0]
    nb = tk.step_blocks(int(qtype), cfg.nblk)  # GGUF blocks per loop step
    w = _word_aligned(w) if qtype == GGMLType.Q4_K else w
    nblocks = K // tk.BLOCK_ELEMS[int(qtype)]
    per_split, splits = _splits(nblocks, cfg.split_k, nb)
    out = _out_buffer(x2, M, N, splits)
    grid = (triton_cdiv(N, cfg.block_n), splits, triton_cdiv(M, MMQ_BM))
    tk.mmq_kernel[grid](x2, w, out, M, N, nblocks, w.shape[1], x2.stride(0), N, M * N, per_split,
                        QTYPE=int(qtype), BM=MMQ_BM, BN=cfg.block_n, NB=nb, DOT_KIND=_dot_kind(x2.dtype),
                        ASM=asm and not _interpreting(), ALIGNED=aligned and qtype == GGMLType.Q6_K,
                        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out if out.dim() == 2 else out.sum(0).to(x2.dtype)


def _out_buffer(x2: torch.Tensor, M: int, N: int, splits: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    if splits == 1:
        return torch.empty((M, N), dtype=dtype or x2.dtype, device=x2.device)
    return torch.empty((splits, M, N), dtype=torch.float32, device=x2.device)  # partial sums


def quant_matmul(x: torch.Tensor, w: torch.Tensor, qtype, K: int, *, config: QMMConfig | None = None,
                 aligned: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (..., K) float16/bfloat16/float32 times the (N, K) GGUF weight in ``w`` -> (..., N) in ``out_dtype`` (x's
    dtype by default; the int8 decode launch writes it without a cast launch).

    ``config`` forces a decode launch configuration (used by benchmarks); by default ``pick_config``
    chooses one for M <= DECODE_MAX_M, and prefill dequantizes and calls cuBLAS. ``aligned``: a Q6_K weight's rows
    are in the aligned layout (``kernels.q6k_layout``; ignored for the other types, which have one layout).
    """
    qtype = check_inputs(x, w, qtype, K)
    aligned = aligned and qtype == GGMLType.Q6_K
    N = w.shape[0]
    lead = x.shape[:-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    x2 = x.reshape(-1, K)  # (M, K)
    M = x2.shape[0]
    out_dtype = out_dtype or x.dtype
    if out_dtype not in _ACT_DTYPES:
        raise KernelInputError(f"quant_matmul: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    if M == 0 or N == 0:
        return x.new_zeros((*lead, N), dtype=out_dtype)
    if not x.is_cuda:
        w = from_aligned(w) if aligned else w
        if M <= DECODE_MAX_M and qtype in CPU_TYPES and w.is_contiguous():
            # the C++ kernel on the GGUF bytes, float32 arithmetic (the reference's numbers up to summation order)
            return cpu_quant_matmul(x2, w, qtype, K, mode="f32").to(out_dtype).reshape(*lead, N)
        return (x2 @ dequantize(w, qtype, (N, K), x.dtype).T).to(out_dtype).reshape(*lead, N)
    if qtype in FUSED_TYPES and (M <= DECODE_MAX_M or config is not None):
        if config is None:
            cap, sms = device_info(x.device)
            config = pick_config(qtype, M, N, K, x.dtype, cap, sms, aligned)
        return _qmm_launch(x2, w, qtype, K, config, aligned, out_dtype).reshape(*lead, N)
    wd = dequantize_rows(w, qtype, K, x.dtype, aligned)  # (N, K)
    return torch.matmul(x2, wd.T).to(out_dtype).reshape(*lead, N)
