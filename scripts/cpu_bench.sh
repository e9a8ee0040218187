#!/usr/bin/env bash
# The LM on the CPU against the PyTorch twin, back to back on this machine: training and decoding
# at the small LLaMA-recipe shape of reports/cpu-bench/config.json, ours (default kernels, and the
# composed ops) and PyTorch (eager, + fused AdamW, + torch.compile; the compiled decode step),
# ROUNDS times interleaved so that a noisy machine shows in every row alike. Writes the JSON of
# every run and summary.md into OUT (default reports/cpu-bench/runs/<date>).
#
#   scripts/cpu_bench.sh [OUT]          ROUNDS=3 by default; needs python3 with torch
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-reports/cpu-bench/runs/$(date -u +%Y-%m-%d)}
ROUNDS=${ROUNDS:-3}
mkdir -p "$OUT"
cargo build --release -p t0810_kv_cache
BIN=target/release/t0810_kv_cache
CFG=reports/cpu-bench/config.json
SHAPE="--vocab 1024 --d-model 128 --d-ff 384 --layers 2 --heads 4 --kv-heads 4"
TRAIN="train-bench $SHAPE --ctx 64 --batch 8 --steps 20 --warmup 3"
DECODE="decode-bench $SHAPE --batch 1 --prompt 32 --new 64"
TWIN="python3 scripts/pytorch_twin.py"
ours() { # name, kernel flags, command
  local name=$1 flags=$2; shift 2
  $BIN --device cpu $flags --out "$OUT/tmp" "$@" > "$OUT/$name.log" 2>&1
  cp "$(ls -t "$OUT"/tmp/t0810_kv_cache/*/results.json | head -1)" "$OUT/$name.json"
}
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r/$ROUNDS"
  ours "train_ours_r$r" "" $TRAIN
  ours "train_ours_composed_r$r" "--kernels composed" $TRAIN
  $TWIN train-bench --config $CFG --batch 8 --steps 20 --warmup 3 --device cpu --json "$OUT/train_twin_r$r.json"
  $TWIN train-bench --config $CFG --batch 8 --steps 20 --warmup 3 --device cpu --fused-adamw --json "$OUT/train_twin_fused_r$r.json"
  $TWIN train-bench --config $CFG --batch 8 --steps 20 --warmup 3 --device cpu --fused-adamw --compile --json "$OUT/train_twin_compile_r$r.json"
  ours "decode_ours_r$r" "" $DECODE
  ours "decode_ours_composed_r$r" "--kernels composed" $DECODE
  $TWIN decode-bench --config $CFG --batch 1 --prompt 32 --new 64 --device cpu --json "$OUT/decode_twin_r$r.json"
  $TWIN decode-bench --config $CFG --batch 1 --prompt 32 --new 64 --device cpu --graphs --json "$OUT/decode_twin_compiled_r$r.json"
done
rm -rf "$OUT/tmp"
python3 - "$OUT" <<'PY'
import json, glob, os, statistics, sys, subprocess
out = sys.argv[1]
def tps(path):
    d = json.load(open(path))
    if "tokens_per_s" in d:
        return d["tokens_per_s"]
    m = d.get("metrics", d)
    for k in ("tokens_per_s", "bench.tokens_per_s"):
        if k in m:
            return m[k]
    raise KeyError(f"no tokens/s in {path}")
rows = {}
for p in sorted(glob.glob(os.path.join(out, "*_r*.json"))):
    rows.setdefault(os.path.basename(p).rsplit("_r", 1)[0], []).append(tps(p))
med = {k: statistics.median(v) for k, v in rows.items()}
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
lines = [f"# CPU bench, {len(next(iter(rows.values())))} interleaved rounds, medians (tokens/s)", "",
         f"machine: {os.cpu_count()} logical CPUs; code at {rev}", "",
         "| run | median tokens/s | runs |", "|---|---|---|"]
for k in sorted(med):
    lines.append(f"| {k} | {med[k]:,.0f} | {', '.join(f'{v:,.0f}' for v in rows[k])} |")
lines += ["", "| ratio | value |", "|---|---|"]
ratios = {}
for a, b in [("train_ours", "train_twin"), ("train_ours", "train_twin_fused"), ("train_ours", "train_twin_compile"),
             ("decode_ours", "decode_twin"), ("decode_ours", "decode_twin_compiled")]:
    if a in med and b in med:
        ratios[f"{a}/{b}"] = med[a] / med[b]
        lines.append(f"| {a} / {b} | {med[a] / med[b]:.2f}x |")
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines) + "\n")
json.dump({"medians": med, "ratios": ratios, "runs": rows}, open(os.path.join(out, "summary.json"), "w"), indent=1)
print("\n".join(lines))
PY
