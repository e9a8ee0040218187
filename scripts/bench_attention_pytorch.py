#!/usr/bin/env python3
"""PyTorch's scaled_dot_product_attention on the shapes of `t0809_flash_attention bench`.

Run on the same card as our benchmark, in the same device call, so the ratios mean something:

    python3 scripts/bench_attention_pytorch.py --out $OUT/pytorch_sdpa.json
    .../t0809_flash_attention bench --pytorch $OUT/pytorch_sdpa.json

Shapes follow the Rust benchmark: batch*heads = max(1, tokens // seq), heads = min(16, batch*heads),
layout (batch, heads, seq, d_head), bf16 by default. The backend is forced with
torch.nn.attention.sdpa_kernel (FLASH_ATTENTION by default; the JSON names the one used).
FLOPs: 4*b*h*n^2*d forward (halved when causal), backward 2.5x forward.
Timing: CUDA events, warm-up, median of --reps. Memory: torch.cuda.max_memory_allocated
above what the inputs hold, for forward+backward. With --naive, the matmul-softmax-matmul path
is measured too (OOM is recorded, not fatal).
"""
import argparse
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def flops_fwd(bh, n, d, causal):
    f = 4.0 * bh * n * n * d
    return f / 2 if causal else f


def time_ms(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def naive_attention(q, k, v, causal):
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if causal:
        n_q, n_k = s.shape[-2], s.shape[-1]
        mask = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def measure(attn, q, k, v, do, warmup, reps, fwd_only):
    """(fwd_ms, fwd_bwd_ms, peak extra bytes of fwd+bwd)."""
    with torch.no_grad():
        fwd = time_ms(lambda: attn(q, k, v), warmup, reps)
    if fwd_only:
        return fwd, None, None
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

    def step():
        o = attn(qg, kg, vg)
        o.backward(do)
        qg.grad = kg.grad = vg.grad = None

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return fwd, time_ms(step, warmup, reps), peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="512,1024,2048,4096,8192,16384,32768")
    p.add_argument("--d-heads", default="64,128")
    p.add_argument("--causal", default="both", choices=["both", "causal", "full"])
    p.add_argument("--tokens", type=int, default=16 * 16384)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    p.add_argument("--backend", default="flash", choices=sorted(BACKENDS))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fwd-only", action="store_true")
    p.add_argument("--naive", action="store_true", help="also time PyTorch matmul-softmax-matmul")
    p.add_argument("--out", default="pytorch_sdpa.json")
    a = p.parse_args()

    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark is for the GPU host")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    backend = BACKENDS[a.backend]
    seqs = [int(s) for s in a.seqs.split(",")]
    d_heads = [int(d) for d in a.d_heads.split(",")]
    causals = {"both": [False, True], "causal": [True], "full": [False]}[a.causal]
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    print(f"PyTorch {torch.__version__} on {name}; SDPA backend {backend.name}; {a.dtype}; "
          f"{a.tokens} tokens per call; median of {a.reps} after {a.warmup} warm-up")

    results = []
    for d in d_heads:
        for causal in causals:
            for n in seqs:
                bh = max(1, a.tokens // n)
                h = min(bh, 16)
                b = max(1, bh // h)
                g = torch.Generator(device=dev).manual_seed(0)
                q, k, v, do = (torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=g) for _ in range(4))
                row = {"seq": n, "d_head": d, "causal": causal, "batch": b, "heads": h,
                       "fwd_flops": flops_fwd(b * h, n, d, causal)}

                def sdpa(q_, k_, v_):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal)

                try:
                    fwd, fb, mem = measure(sdpa, q, k, v, do, a.warmup, a.reps, a.fwd_only)
                except RuntimeError as e:  # a shape the backend refuses, or out of memory
                    status = "OOM" if isinstance(e, torch.cuda.OutOfMemoryError) else f"refused: {str(e).splitlines()[0]}"
                    print(f"seq {n} d {d} causal {causal}: {backend.name} {status}")
                    row.update({"fwd_ms": None, "fwd_bwd_ms": None, "status": status})
                    results.append(row)
                    del q, k, v, do
                    torch.cuda.empty_cache()
                    continue
                row.update({"fwd_ms": fwd, "fwd_bwd_ms": fb, "fwd_bwd_peak_bytes": mem,
                            "fwd_tflops": row["fwd_flops"] / fwd / 1e9,
                            "fwd_bwd_tflops": 3.5 * row["fwd_flops"] / fb / 1e9 if fb else None})
                if a.naive:
                    try:
                        nf, nfb, nmem = measure(lambda q_, k_, v_: naive_attention(q_, k_, v_, causal),
                                                q, k, v, do, min(a.warmup, 1), min(a.reps, 5), a.fwd_only)
                        row.update({"naive_fwd_ms": nf, "naive_fwd_bwd_ms": nfb, "naive_fwd_bwd_peak_bytes": nmem})
                    except torch.cuda.OutOfMemoryError:
                        row["naive_status"] = "OOM"
                        torch.cuda.empty_cache()
                results.append(row)
                del q, k, v, do
                torch.cuda.empty_cache()

    hdr = f"{'seq':>6} {'d':>4} {'causal':>6} {'b x h':>7} {'fwd ms':>9} {'TFLOP/s':>8} {'f+b ms':>9} {'TFLOP/s':>8} {'MiB':>7}"
    if a.naive:
        hdr += f" {'naive fwd':>10} {'naive f+b':>10}"
    print(hdr)
    for r in results:
        if r.get("fwd_ms") is None:
            print(f"{r['seq']:>6} {r['d_head']:>4} {str(r['causal']):>6} {r['batch']:>3}x{r['heads']:<3} {r['status']}")
            continue
        line = (f"{r['seq']:>6} {r['d_head']:>4} {str(r['causal']):>6} {r['batch']:>3}x{r['heads']:<3} "
                f"{r['fwd_ms']:>9.3f} {r['fwd_tflops']:>8.1f} "
                f"{(r['fwd_bwd_ms'] or float('nan')):>9.3f} {(r['fwd_bwd_tflops'] or float('nan')):>8.1f} "
                f"{(r['fwd_bwd_peak_bytes'] or 0) / 2**20:>7.0f}")
        if a.naive:
            line += (f" {r.get('naive_fwd_ms', float('nan')):>10.3f} {r.get('naive_fwd_bwd_ms') or float('nan'):>10.3f}"
                     if "naive_status" not in r else f" {'OOM':>10} {'OOM':>10}")
        print(line)
    out = {"device": name, "torch": torch.__version__, "backend": backend.name, "dtype": a.dtype,
           "tokens": a.tokens, "reps": a.reps, "warmup": a.warmup, "results": results}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
