"""Does compute-sanitizer's initcheck see the stores of cuBLAS's GEMMs on this card?

Run under initcheck, once per mode (on the GPU host, from the repository root):

    compute-sanitizer --tool initcheck python3 scripts/initcheck_cublas_probe.py gemm
    compute-sanitizer --tool initcheck python3 scripts/initcheck_cublas_probe.py copy

`gemm`: a bf16 matrix product (cuBLAS writes the output), then a cast kernel reads every element.
`copy`: the same cast over a buffer written by a device-to-device copy (the control). If initcheck reports
uninitialized reads in the cast after `gemm` and none after `copy`, it does not see the GEMM's
stores: its reports of reads of cuBLAS outputs in our tests (scripts/sanitize.sh) are that
artifact, not uninitialized memory.
"""
import sys

import torch

mode = sys.argv[1] if len(sys.argv) > 1 else "gemm"
n = 512
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
if mode == "gemm":
    written = a @ b  # every element written by cuBLAS
elif mode == "copy":
    written = torch.empty_like(a)
    written.copy_(a)  # every element written by a device-to-device copy, not cuBLAS
else:
    sys.exit(f"unknown mode {mode!r}: gemm or copy")
read = written.float()  # a plain kernel reads every element
torch.cuda.synchronize()
print(f"{mode}: {n}x{n} bf16, checksum {read.double().sum().item():.4f}")
