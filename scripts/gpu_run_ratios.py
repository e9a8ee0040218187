#!/usr/bin/env python3
"""Ratios of 8-09's attention benchmark and of the shape benches, from the committed raw files of a
run folder (reports/gpu-runs/<folder>/).

For every callN/bench_results.json (t0809_flash_attention bench with PyTorch SDPA's FlashAttention-2
and cuDNN backends, same call, same card; bf16, 262,144 tokens per call) writes, per shape
d{64,128}_{full,causal}_{seq}, into ratios.json under "callN":
  fwd_ms, bwd_ms                  our forward and backward (the kernels Auto picks)
  fwd_vs_cudnn, fwd_vs_fa2        our forward against each backend's (time ratio, > 1 = we win)
  bwd_vs_fa2, bwd_vs_cudnn        our backward against each backend's (its fwd+bwd minus its fwd)
  fa2_bwd_ms, cudnn_bwd_ms        each backend's backward (its fwd+bwd minus its fwd)
  hopper_bwd_vs_mma_sync          at d 64 and 128: the Hopper backward against the mma.sync one, both timed
                                  at this length (the evidence for HOPPER_BACKWARD_MIN_KEYS)
  hopper_bwd_vs_fa2, hopper_bwd_vs_cudnn   the Hopper backward against each backend's,
                                  whichever backward the op picked at this length (bwd_ms)
  fwd_bwd_ms, fwd_bwd_vs_fa2, fwd_bwd_vs_cudnn   forward + backward (our ops called directly)
from each callN/P_bench_results.json (the same bench by a variant build P of the kernels, e.g.
variant_bench_results.json), per shape: P_hopper_bwd_ms, P_vs_shipped (the call's Hopper backward
over the variant's, > 1 = the variant is faster), P_bwd_vs_fa2, P_bwd_vs_cudnn (against the call's
PyTorch backends), P_fwd_bwd_ms; and, from each callN/shape-*-summary.json (scripts/shape_bench.sh:
ours in bf16-mixed as the first row, the A/B row of ours third), under "callN"."ab_<config>": ours_vs_ab = tokens/s of ours over
the A/B row's (> 1: the default is faster than the row with the flag), with the flag's label.
With several calls, "callN_vs_call1": per shape and time (fwd, bwd, fwd_bwd, hopper_bwd,
mma_sync_bwd, fa2_bwd, cudnn_bwd), the first call's milliseconds over callN's; and
"probe_callN_vs_call1" likewise from callN/probe_bwd.json (scripts/parse_bwd_probe.py) per kernel.
Run: python3 scripts/gpu_run_ratios.py reports/gpu-runs/<folder> (writes <folder>/ratios.json).
"""
import glob, json, os, sys

os.chdir(sys.argv[1])

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
            "fa2_bwd_ms": fa2_bwd,
            "cudnn_bwd_ms": cudnn_bwd,
            "fwd_bwd_ms": r["flash_fwd_bwd_ops_ms"],
            "fwd_bwd_vs_fa2": r["pytorch_fwd_bwd_ms"] / r["flash_fwd_bwd_ops_ms"],
            "fwd_bwd_vs_cudnn": r["cudnn_fwd_bwd_ms"] / r["flash_fwd_bwd_ops_ms"],
        }
        if r.get("mma_sync_bwd_ms") and r.get("hopper_bwd_ms"):
            row["hopper_bwd_ms"] = r["hopper_bwd_ms"]
            row["mma_sync_bwd_ms"] = r["mma_sync_bwd_ms"]
            row["hopper_bwd_vs_mma_sync"] = r["mma_sync_bwd_ms"] / r["hopper_bwd_ms"]
            row["hopper_bwd_vs_fa2"] = fa2_bwd / r["hopper_bwd_ms"]
            row["hopper_bwd_vs_cudnn"] = cudnn_bwd / r["hopper_bwd_ms"]
        rows[name] = {k: round(v, 4) for k, v in row.items()}
    out[call] = rows
# The same bench run by a variant build of the kernels (no PyTorch rows): its Hopper backward
# against the shipped one of the same call (> 1: the variant is faster), against the call's
# PyTorch backends, and its forward + backward.
for path in sorted(glob.glob("call*/*_bench_results.json")):
    call, prefix = os.path.dirname(path), os.path.basename(path)[: -len("_bench_results.json")]
    for r in json.load(open(path))["metrics"]["bench"]:
        name = f"d{r['d_head']}_{'causal' if r['causal'] else 'full'}_{r['seq']}"
        row = out.get(call, {}).get(name)
        if row and r.get("hopper_bwd_ms") and "hopper_bwd_ms" in row:
            v = r["hopper_bwd_ms"]
            row[f"{prefix}_hopper_bwd_ms"] = round(v, 4)
            row[f"{prefix}_vs_shipped"] = round(row["hopper_bwd_ms"] / v, 4)
            row[f"{prefix}_bwd_vs_fa2"] = round(row["fa2_bwd_ms"] / v, 4)
            row[f"{prefix}_bwd_vs_cudnn"] = round(row["cudnn_bwd_ms"] / v, 4)
            row[f"{prefix}_fwd_bwd_ms"] = round(r["flash_fwd_bwd_ops_ms"], 4)
for path in sorted(glob.glob("call*/shape-*-summary.json")):
    call = os.path.dirname(path)
    name = os.path.basename(path)[len("shape-"):-len("-summary.json")]
    rows = json.load(open(path))["rows"]
    out.setdefault(call, {})["ab_" + name] = {
        "ab_label": rows[2]["label"],
        "ours_vs_ab": round(rows[0]["tokens_per_s"] / rows[2]["tokens_per_s"], 4),
    }
# Calls of one folder against its first (the same bench on other executables, or another card of
# the same kind): "callN_vs_call1" per shape, the first call's time over callN's (> 1 = callN faster).
first = out.get("call1", {})
for call in sorted(k for k in out if k.startswith("call") and k != "call1"):
    for shape, r in out[call].items():
        a = first.get(shape)
        if not isinstance(r, dict) or not isinstance(a, dict):
            continue
        for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms", "hopper_bwd_ms", "mma_sync_bwd_ms", "fa2_bwd_ms", "cudnn_bwd_ms"):
            if r.get(key) and a.get(key):
                ratio = round(a[key] / r[key], 4)
                out.setdefault(f"{call}_vs_call1", {}).setdefault(shape, {})[key.removesuffix("_ms")] = ratio
# The backward probe of each call against the first's (callN/probe_bwd.json, by
# scripts/parse_bwd_probe.py): "probe_callN_vs_call1" per shape and kernel, the first call's ms over callN's.
probe1 = json.load(open("call1/probe_bwd.json"))["ms"] if os.path.exists("call1/probe_bwd.json") else {}
for path in sorted(glob.glob("call*/probe_bwd.json")):
    call = path.split("/")[0]
    if call == "call1" or not probe1:
        continue
    for shape, kernels in json.load(open(path))["ms"].items():
        for kernel, ms in kernels.items():
            if probe1.get(shape, {}).get(kernel):
                ratio = round(probe1[shape][kernel] / ms, 4)
                out.setdefault(f"probe_{call}_vs_call1", {}).setdefault(shape, {})[kernel] = ratio
json.dump(out, open("ratios.json", "w"), indent=1)
for call, rows in out.items():
    print(call)
    for name, r in rows.items():
        print(f"  {name:20s} " + " ".join(f"{k}={v}" for k, v in r.items()))
