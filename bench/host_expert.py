"""One RAM-tier expert (Q4_K gate/up, Q6_K down, DeepSeek-V3 shapes) computed by the CPU kernel with int8
activations, as the tiered runtime does for a GPU model: kernels alone, then with the hidden state coming
from / the result going to the GPU. 24 distinct experts are cycled so the weights come from DRAM.

Usage (needs CUDA): PYTHONPATH=. python bench/host_expert.py
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

from tierlm.kernels.cpu_quant import cpu_quant_matmul
from tierlm.weights.formats import GGMLType as T
from bench.kernels import random_weight
torch.manual_seed(0)
mats = [random_weight(T.Q4_K, 2048, 7168, device="cpu")[0], random_weight(T.Q4_K, 2048, 7168, device="cpu")[0],
        random_weight(T.Q6_K, 7168, 2048, device="cpu")[0]]
experts = [tuple(m.clone() for m in mats) for _ in range(24)]  # 690 MB: past the cache
xg = torch.randn(1, 7168, device="cuda", dtype=torch.bfloat16)
def one(e, with_gpu):
    g, u, d = e
    x = xg.to("cpu", torch.float32) if with_gpu else xg.cpu().float()
    a = cpu_quant_matmul(x, g, T.Q4_K, 7168, mode="q8"); b = cpu_quant_matmul(x, u, T.Q4_K, 7168, mode="q8")
    y = cpu_quant_matmul(F.silu(a) * b, d, T.Q6_K, 2048, mode="q8")
    return y.to("cuda", non_blocking=True) if with_gpu else y
def kern_only(e):
    g, u, d = e
    x = torch.randn(1, 7168)
    cpu_quant_matmul(x, g, T.Q4_K, 7168, mode="q8"); cpu_quant_matmul(x, u, T.Q4_K, 7168, mode="q8")
    cpu_quant_matmul(torch.randn(1, 2048), d, T.Q6_K, 2048, mode="q8")
for name, fn in [("kernels only", lambda e: kern_only(e)), ("host path, cpu x", lambda e: one(e, False)),
                 ("host path, gpu x", lambda e: one(e, True))]:
    for e in experts[:4]: fn(e)
    torch.cuda.synchronize(); t = time.perf_counter()
    for r in range(3):
        for e in experts: fn(e)
    torch.cuda.synchronize()
    print(f"{os.environ.get('TAG','')} torch threads {torch.get_num_threads()}: {name}: {(time.perf_counter()-t)/72*1e3:.2f} ms per expert (28.6 MB)", flush=True)
