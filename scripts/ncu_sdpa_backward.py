"""PyTorch's SDPA forward + backward once, at the shape of scripts/flash_hopper_bwd_probe.cu's
`profile` (bf16, 64 heads, 4,096 queries and keys, d 64, no mask), between cudaProfilerStart and
Stop, so that Nsight Compute records only that step of the backend named on the command line
(cudnn or flash) for a side-by-side profile with our kernels:

    ncu --set full --profile-from-start off python3 scripts/ncu_sdpa_backward.py cudnn
"""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[sys.argv[1]]
torch.manual_seed(0)
q, k, v, d_o = (torch.randn(1, 64, 4096, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
q, k, v = (t.requires_grad_() for t in (q, k, v))
with sdpa_kernel(backend):
    for profiled in (False, False, True):
        if profiled:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
        F.scaled_dot_product_attention(q, k, v).backward(d_o)
        torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
print(f"profiled SDPA ({sys.argv[1]}) forward + backward: bf16, 64 heads, 4096 x 4096, d 64")
