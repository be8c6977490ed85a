"""DeepSeek's FP8 e4m3 block format: a weight W (M, N) stored as fp8 plus one fp32 ``weight_scale_inv`` per
(bm × bn) block, W[i, j] = W_fp8[i, j] · scale_inv[i // bm, j // bn]."""

from __future__ import annotations

import torch

from tierlm.errors import CheckpointError

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def dequant_fp8_block(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """(M, N) fp8 and (ceil(M/bm), ceil(N/bn)) fp32 scales → (M, N) float32."""
    bm, bn = block
    M, N = w.shape
    want = (-(-M // bm), -(-N // bn))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(f"FP8 scale has shape {list(scale_inv.shape)}, expected {list(want)} for a "
                              f"{M}×{N} weight in {bm}×{bn} blocks; the checkpoint is inconsistent")
    s = scale_inv.float().repeat_interleave(bm, 0).repeat_interleave(bn, 1)[:M, :N]
    return w.float() * s


def quant_fp8_block(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, N) float → (fp8 weight, fp32 scale_inv) with each block's absmax mapped to the fp8 maximum."""
    bm, bn = block
    M, N = w.shape
    gm, gn = -(-M // bm), -(-N // bn)
    padded = torch.zeros(gm * bm, gn * bn, dtype=torch.float32)
    padded[:M, :N] = w.float()
    blocks = padded.view(gm, bm, gn, bn)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # (gm, gn)
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).view(gm * bm, gn * bn)[:M, :N]
    return q.to(torch.float8_e4m3fn), scale_inv
