"""The Triton kernel of ``kernels.norm``: RMSNorm of one row per program, optionally after a residual add."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(x_ptr, res_ptr, h_ptr, w_ptr, y_ptr, D, stride_x, stride_r, eps, ADD: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Row r: v = x[r] (+ res[r], stored to h[r], with ADD), y[r] = v * rsqrt(mean(v²) + eps) * w, in float32."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < D
    v = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
    if ADD:
        v = tl.load(res_ptr + row * stride_r + offs, mask=m, other=0.0) + v
        tl.store(h_ptr + row * D + offs, v, mask=m)
    r = tl.math.rsqrt(tl.sum(v * v, axis=0) / D + eps)
    w = tl.load(w_ptr + offs, mask=m, other=0.0)
    tl.store(y_ptr + row * D + offs, (v * r * w).to(y_ptr.dtype.element_ty), mask=m)
