#!/usr/bin/env python3
"""Ratios of 8-09's attention benchmark, from the committed raw files of this folder.

For every callN/bench_results.json (t0809_flash_attention bench with PyTorch SDPA's FlashAttention-2
and cuDNN backends, same call, same card; bf16, 262,144 tokens per call) writes, per shape
d{64,128}_{full,causal}_{seq}, into ratios.json under "callN":
  fwd_vs_cudnn, fwd_vs_fa2        our forward against each backend's (time ratio, > 1 = we win)
  bwd_vs_mma_sync                 our backward against the mma.sync one, where the bench timed both
  bwd_vs_fa2, bwd_vs_cudnn        our backward against each backend's (its fwd+bwd minus its fwd)
  fwd_bwd_ms, fwd_bwd_vs_fa2, fwd_bwd_vs_cudnn   forward + backward (our ops called directly)
Under "probe_owner", per shape the call1 probe's backward times (probe_bwd.json: "owner", the
backward shipped since e73e4d7, and "shipped", the one before) against the backwards the bench
timed in the same call (call1/bench_results.json): the mma.sync backward (at 4,096 keys, where the
bench's backward was the mma.sync one; at 16,384 its "mma.sync bwd" column), PyTorch's
FlashAttention-2 and cuDNN backwards (fwd+bwd minus fwd), and the forward + backward of the
CS336 shape (1 x 16 heads, seq 16384, causal) with the bench's forward.
Run: python3 ratios.py (from this folder).
"""
import glob, json, os

out = {}
for path in sorted(glob.glob("call*/bench_results.json")):
    call = os.path.dirname(path)
    rows = {}
    for r in json.load(open(path))["metrics"]["bench"]:
        name = f"d{r['d_head']}_{'causal' if r['causal'] else 'full'}_{r['seq']}"
        fa2_bwd = r["pytorch_fwd_bwd_ms"] - r["pytorch_fwd_ms"]
        cudnn_bwd = r["cudnn_fwd_bwd_ms"] - r["cudnn_fwd_ms"]
        row = {
            "fwd_ms": r["flash_fwd_ms"],
            "bwd_ms": r["flash_bwd_ms"],
            "fwd_vs_cudnn": r["cudnn_fwd_ms"] / r["flash_fwd_ms"],
            "fwd_vs_fa2": r["pytorch_fwd_ms"] / r["flash_fwd_ms"],
            "bwd_vs_fa2": fa2_bwd / r["flash_bwd_ms"],
            "bwd_vs_cudnn": cudnn_bwd / r["flash_bwd_ms"],
            "fwd_bwd_ms": r["flash_fwd_bwd_ops_ms"],
            "fwd_bwd_vs_fa2": r["pytorch_fwd_bwd_ms"] / r["flash_fwd_bwd_ops_ms"],
            "fwd_bwd_vs_cudnn": r["cudnn_fwd_bwd_ms"] / r["flash_fwd_bwd_ops_ms"],
        }
        if r.get("mma_sync_bwd_ms"):
            row["bwd_vs_mma_sync"] = r["mma_sync_bwd_ms"] / r["flash_bwd_ms"]
        rows[name] = {k: round(v, 4) for k, v in row.items()}
    out[call] = rows
probe = json.load(open("call1/probe_bwd.json"))["ms"]
bench1 = {f"d{r['d_head']}_{'causal' if r['causal'] else 'full'}_{r['seq']}": r
          for r in json.load(open("call1/bench_results.json"))["metrics"]["bench"]}
owner = {}
for name, r in bench1.items():
    if name not in probe:
        continue
    ms = probe[name]["owner"]
    mma_sync = r["mma_sync_bwd_ms"] or r["flash_bwd_ms"]  # below the old threshold the bench's bwd was mma.sync's
    row = {
        "owner_ms": ms,
        "previous_ms": probe[name]["shipped"],
        "mma_sync_ms": mma_sync,
        "fa2_bwd_ms": r["pytorch_fwd_bwd_ms"] - r["pytorch_fwd_ms"],
        "cudnn_bwd_ms": r["cudnn_fwd_bwd_ms"] - r["cudnn_fwd_ms"],
        "owner_vs_previous": probe[name]["shipped"] / ms,
        "owner_vs_mma_sync": mma_sync / ms,
        "owner_vs_fa2": (r["pytorch_fwd_bwd_ms"] - r["pytorch_fwd_ms"]) / ms,
        "owner_vs_cudnn": (r["cudnn_fwd_bwd_ms"] - r["cudnn_fwd_ms"]) / ms,
        "fwd_plus_owner_ms": r["flash_fwd_ms"] + ms,
    }
    owner[name] = {k: round(v, 4) for k, v in row.items()}
out["probe_owner"] = owner
json.dump(out, open("ratios.json", "w"), indent=1)
for call, rows in out.items():
    print(call)
    for name, r in rows.items():
        print(f"  {name:20s} " + " ".join(f"{k}={v}" for k, v in r.items()))
