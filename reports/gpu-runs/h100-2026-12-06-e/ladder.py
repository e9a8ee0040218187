#!/usr/bin/env python3
"""The kernel ladder of 8-09's Hopper forward, from the committed raw files of this folder.

Writes ladder.json: for each (d, causal, seq) of the benchmark (bf16, 262,144 tokens per call, one
H100) the forward TFLOP/s of every step of the ladder and the ratios the lesson quotes.
  mma_sync, wgmma_v1        call3/bench_results.json (built from c6f088f: cp.async, CTA barriers)
  wgmma_ws, fa2, cudnn      call4/bench_results.json (built from 838e649: TMA, warp specialisation;
                            mma_sync again in the same run; PyTorch SDPA's two backends)
  hopper_bwd.{h100,h200}    call9 (H100, the backward at every length) and call10 (H200, from
                            8,192 keys): our backward, mma.sync's and PyTorch's backends
  probe ratios              call1/probe.txt (v0: no overlap) and call4/probe_pp.txt (ping-pong),
                            each against the kernel it replaced, in the same call
Run: python3 ladder.py (from this folder).
"""
import json, re

def tflops(row, ms):
    return row["fwd_flops"] / (ms * 1e-3) / 1e12 if ms else None

def bench(path):
    return {(r["d_head"], r["causal"], r["seq"]): r for r in json.load(open(path))["metrics"]["bench"]}

v1, ws = bench("call3/bench_results.json"), bench("call4/bench_results.json")
out = {}
for key, r in sorted(ws.items()):
    d, causal, seq = key
    name = f"d{d}_{'causal' if causal else 'full'}_{seq}"
    row = {
        "mma_sync_tflops": tflops(r, r["mma_sync_fwd_ms"]),
        "wgmma_v1_tflops": tflops(v1[key], v1[key]["flash_fwd_ms"]),
        "wgmma_ws_tflops": tflops(r, r["flash_fwd_ms"]),
        "fa2_tflops": tflops(r, r["pytorch_fwd_ms"]),
        "cudnn_tflops": tflops(r, r["cudnn_fwd_ms"]),
        "bwd_tflops": tflops(r, r["flash_bwd_ms"] / 2.5),
        "fwd_bwd_ms": r["flash_fwd_bwd_ops_ms"],
        "fa2_fwd_bwd_ms": r["pytorch_fwd_bwd_ms"],
        "cudnn_fwd_bwd_ms": r["cudnn_fwd_bwd_ms"],
    }
    row["ws_vs_mma_sync"] = row["wgmma_ws_tflops"] / row["mma_sync_tflops"]
    row["ws_vs_fa2"] = row["wgmma_ws_tflops"] / row["fa2_tflops"]
    row["ws_vs_cudnn"] = row["wgmma_ws_tflops"] / row["cudnn_tflops"]
    row["fwd_bwd_vs_fa2"] = row["fa2_fwd_bwd_ms"] / row["fwd_bwd_ms"]
    out[name] = row

def probe(path, pattern):
    rows = {}
    for line in open(path):
        m = re.match(r"time d +(\d+) causal (\d) n +(\d+)", line)
        if m:
            name = f"d{m[1]}_{'causal' if m[2] == '1' else 'full'}_{m[3]}"
            rows[name] = [float(x) for x in re.findall(pattern, line)]
    return rows

# call1: "mma.sync X ms Y TFLOP/s | wgmma X ms Y TFLOP/s": v0 (no overlap, CTA barriers) vs mma.sync.
for name, (a, b) in probe("call1/probe.txt", r"([\d.]+) TFLOP/s").items():
    out[name]["v0_vs_mma_sync_probe"] = b / a
# call4: "shipped bc128 X | pp bc128 Y | pp bc64 Z": ping-pong vs the warp-specialised kernel.
for name, v in probe("call4/probe_pp.txt", r"\| [a-z0-9 ]+ (\d+)").items():
    out[name]["pingpong_vs_ws_probe"] = v[1] / v[0]
# The Hopper backward (d 64): call9 on the H100 (every length), call10 on an H200 (8192, 16384),
# against the mma.sync backward and PyTorch's backends in the same run.
def backward(path, card):
    runs = {k: v for k, v in bench(path + "/bench_results.json").items() if v.get("mma_sync_bwd_ms")}
    pt = {(r["d_head"], r["causal"], r["seq"]): r for r in json.load(open(path + "/pytorch_flash.json"))["results"]}
    cd = {(r["d_head"], r["causal"], r["seq"]): r for r in json.load(open(path + "/pytorch_cudnn.json"))["results"]}
    for key, r in sorted(runs.items()):
        d, causal, seq = key
        fa2_bwd = pt[key]["fwd_bwd_ms"] - pt[key]["fwd_ms"]
        out.setdefault("hopper_bwd", {}).setdefault(card, {})[f"d{d}_{'causal' if causal else 'full'}_{seq}"] = {
            "bwd_ms": r["flash_bwd_ms"],
            "mma_sync_bwd_ms": r["mma_sync_bwd_ms"],
            "vs_mma_sync": r["mma_sync_bwd_ms"] / r["flash_bwd_ms"],
            "fa2_bwd_ms": fa2_bwd,
            "vs_fa2": fa2_bwd / r["flash_bwd_ms"],
            "cudnn_bwd_ms": cd[key]["fwd_bwd_ms"] - cd[key]["fwd_ms"],
            "fwd_bwd_ms": r["flash_fwd_bwd_ops_ms"],
            "fa2_fwd_bwd_ms": pt[key]["fwd_bwd_ms"],
            "cudnn_fwd_bwd_ms": cd[key]["fwd_bwd_ms"],
            "fwd_bwd_vs_fa2": pt[key]["fwd_bwd_ms"] / r["flash_fwd_bwd_ops_ms"],
        }

# The LM step at GPT-2-small size (d_head 64) with the Hopper forward over the mma.sync one.
lm = json.load(open("call8/shape-gpt2_small_config-summary.json"))["rows"]
out["lm_step_gpt2_small"] = {"hopper_vs_mma_sync": lm[0]["tokens_per_s"] / lm[2]["tokens_per_s"]}

backward("call9", "h100")
backward("call10", "h200")
json.dump(out, open("ladder.json", "w"), indent=1, sort_keys=True)
print(json.dumps(out["d64_causal_16384"], indent=1))
