"""The aligned Q6_K layout: the same bytes as GGUF's, each row reordered so the GPU reads them in wide loads.

A GGUF Q6_K block is 210 bytes (ql 128, qh 64, scales 16, d 2), so every block after a row's first starts on a
2-byte boundary only and the decode kernels must read it in 2-byte pieces. In the aligned layout each row holds
its blocks' 208-byte bodies (ql, qh, scales) back to back, then their 2-byte ``d`` in block order:

    GGUF:     [b0: ql qh sc d][b1: ql qh sc d] ...                 block b at 210 b, its d at 210 b + 208
    aligned:  [b0: ql qh sc][b1: ql qh sc] ... [d0][d1] ...         block b at 208 b, its d at 208 nb + 2 b

Nothing is added or dropped (a row keeps its 210 nb bytes, so shapes, row slices and expert slices are the same),
and a body starts wherever its row does plus a multiple of 16: on 16-byte boundaries when the row does (nb a
multiple of 8: 2048, 18432 elements), on 8-byte ones when nb is a multiple of 4 (7168). The kernels take an
``aligned`` flag; the quantized layers keep their Q6_K weights in this layout while they are on a CUDA device
(``model.quantized``). On an H200 the one-row Q6_K products run 1.23-1.58x faster from it (84% and 92% of the
copy bandwidth on DeepSeek-V3's dense down and head) and the MoE layer 1.14x; the tensor-core tiles of 3-16 rows
read it within 4% of GGUF's speed (``bench/results/kernels-NVIDIA_H200-int8.md``, "Ninth round", "Tenth round").
"""

from __future__ import annotations

import torch

from tierlm.errors import TierlmError

Q6_K = 14  # its GGML type id
BLOCK_BYTES = 210
BODY_BYTES = 208
CHUNK_BYTES = 64 << 20  # in-place conversions work through rows in chunks of about this many bytes


class LayoutError(TierlmError, ValueError):
    """A tensor handed to a layout conversion is not a contiguous block of Q6_K rows."""


def _rows(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    if not isinstance(w, torch.Tensor) or w.dtype != torch.uint8 or w.dim() == 0:
        got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise LayoutError(f"Q6_K layout: expected a uint8 tensor of Q6_K rows (..., row_bytes), got {got}")
    rb = w.shape[-1]
    if rb % BLOCK_BYTES:
        raise LayoutError(f"Q6_K layout: rows of {rb} bytes are not whole 210-byte Q6_K blocks; is the type Q6_K?")
    if not w.is_contiguous():
        raise LayoutError("Q6_K layout: the tensor must be contiguous; call .contiguous() first")
    return w.view(-1, rb // BLOCK_BYTES, BLOCK_BYTES), rb // BLOCK_BYTES


def alignable(K: int) -> bool:
    """Whether rows of K elements gain from the aligned layout: an even number of blocks, so that every row starts
    on a 4-byte boundary (the decode kernels' narrowest load)."""
    return K % 512 == 0


def aligns(types, ks) -> bool:
    """Whether a layer whose matrices have these GGML types and row lengths keeps its Q6_K ones in the aligned
    layout on a GPU: some are Q6_K, and every Q6_K one is ``alignable`` (so one flag describes the layer)."""
    q6 = [k for t, k in zip(types, ks) if int(t) == Q6_K]
    return bool(q6) and all(alignable(k) for k in q6)


def to_aligned(w: torch.Tensor) -> torch.Tensor:
    """GGUF Q6_K rows (..., row_bytes) -> a new tensor of the same shape in the aligned layout."""
    v, _ = _rows(w)
    return torch.cat([v[..., :BODY_BYTES].reshape(v.shape[0], -1), v[..., BODY_BYTES:].reshape(v.shape[0], -1)],
                     1).view(w.shape)


def from_aligned(w: torch.Tensor) -> torch.Tensor:
    """Aligned Q6_K rows (..., row_bytes) -> a new tensor of the same shape in GGUF's layout."""
    v, nb = _rows(w)
    flat = v.view(v.shape[0], -1)
    body = flat[:, :nb * BODY_BYTES].reshape(-1, nb, BODY_BYTES)
    d = flat[:, nb * BODY_BYTES:].reshape(-1, nb, BLOCK_BYTES - BODY_BYTES)
    return torch.cat([body, d], 2).view(w.shape)


def _in_place(w: torch.Tensor, fn) -> torch.Tensor:
    v, nb = _rows(w)
    flat = v.view(v.shape[0], -1)
    step = max(1, CHUNK_BYTES // flat.shape[1])
    for r in range(0, flat.shape[0], step):
        flat[r:r + step] = fn(flat[r:r + step])
    return w


def align_(w: torch.Tensor) -> torch.Tensor:
    """``to_aligned`` in place, a chunk of rows at a time (the extra memory is one chunk); returns w."""
    return _in_place(w, to_aligned)


def unalign_(w: torch.Tensor) -> torch.Tensor:
    """``from_aligned`` in place, a chunk of rows at a time; returns w."""
    return _in_place(w, from_aligned)
