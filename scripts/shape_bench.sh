#!/usr/bin/env bash
# Ours against the PyTorch twin at one model shape: training tokens/s, model TFLOP/s and MFU, back
# to back on one GPU (run on the GPU host as a scripts/gpu-run.sh step, after the bundle is unpacked):
#
#   "sh scripts/shape_bench.sh [CONFIG] [BATCH] [STEPS] [A/B FLAGS]"   (a gpu-run.sh step, which runs it with bash)
#   bash scripts/shape_bench.sh [CONFIG] [BATCH] [STEPS] [A/B FLAGS]   (directly; default: scripts/gpt2_small_config.json 16 10)
# Exits non-zero when any row failed.
#
# CONFIG is a twin config (the LLaMA recipe's sizes: vocab_size, max_seq_len, d_model, n_layers,
# n_heads, n_kv_heads, d_ff, rope_theta). Rows: ours `t0810_kv_cache train-bench` in bf16-mixed
# (bf16 compute, f32 master weights and moments) and in bf16, FlashAttention; the twin with bf16
# autocast + AdamW(fused=True), eager and under torch.compile (its strongest configuration).
# A/B FLAGS (optional, one word per flag joined by commas, e.g. --upstream-matmul-grads): one more
# row of ours in bf16-mixed with those train-bench flags, to measure a change in the same run.
# Writes $OUT/shape-<config name>.tgz (every log and json) beside shape-<config name>-summary.json
# and -summary.txt (the table; MFU from ours' FLOPs per token, PaLM's 6·N + 12·L·d·T, over
# 989.4 TFLOP/s dense bf16).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cfg=${1:-scripts/gpt2_small_config.json}; B=${2:-16}; STEPS=${3:-10}; ab=${4:-}
name=$(basename "$cfg" .json)
dest=${OUT:-$root/gpu-results}; mkdir -p "$dest"
out=/tmp/shape-$name; rm -rf "$out"; mkdir -p "$out"
bin=/tmp/gpu/bin
REMOTE_ENV_QUIET=1 source .gpu/remote-env.sh
export MODULE08_CACHE=/tmp/module08-cache
args=$(python3 - "$cfg" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
print(f"--vocab {c['vocab_size']} --ctx {c['max_seq_len']} --d-model {c['d_model']} --d-ff {c['d_ff']} "
      f"--layers {c['n_layers']} --heads {c['n_heads']} --kv-heads {c['n_kv_heads']} --theta {c['rope_theta']}")
PY
) && [ -n "$args" ] || { echo "cannot read the sizes of $cfg" >&2; exit 1; }
status=0
echo "== $name: $args, batch $B, $STEPS steps" | tee "$out/summary.txt"
variants="bf16-mixed bf16"; [ -n "$ab" ] && variants="$variants ab"
for v in $variants; do
  dt=$v; flags=""
  [ "$v" = ab ] && { dt=bf16-mixed; flags=${ab//,/ }; }
  rm -rf "$out/ours-$v"
  $bin/t0810_kv_cache --device cuda --dtype $dt --attention flash --out "$out/ours-$v" train-bench $args --batch $B --steps $STEPS --warmup 3 $flags > "$out/ours_$v.log" 2>&1
  cp "$out/ours-$v/t0810_kv_cache/train_bench/results.json" "$out/ours_$v.json" 2>/dev/null || { status=1; echo "ours $v failed: $(tail -3 "$out/ours_$v.log")" | tee -a "$out/summary.txt"; }
done
python3 scripts/pytorch_twin.py train-bench --config "$cfg" --batch $B --steps $STEPS --dtype bf16 --amp --fused-adamw --device cuda --json "$out/twin_eager.json" > "$out/twin_eager.log" 2>&1 || { status=1; echo "twin eager failed: $(tail -2 "$out/twin_eager.log")" | tee -a "$out/summary.txt"; }
python3 scripts/pytorch_twin.py train-bench --config "$cfg" --batch $B --steps $STEPS --dtype bf16 --amp --fused-adamw --compile --device cuda --json "$out/twin_compile.json" > "$out/twin_compile.log" 2>&1 || { status=1; echo "twin compile failed: $(tail -2 "$out/twin_compile.log")" | tee -a "$out/summary.txt"; }
python3 - "$out" "$ab" <<'PY' | tee -a "$out/summary.txt" || status=1
import json, os, sys
out, ab = sys.argv[1], sys.argv[2]
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None
ours = {dt: load(f"ours_{dt}.json") for dt in ["bf16-mixed", "bf16"]}
if ab:
    ours["bf16-mixed " + ab.replace(",", " ")] = load("ours_ab.json")
twin = {k: load(f"twin_{k}.json") for k in ["eager", "compile"]}
ref = next((o for o in ours.values() if o), None)
if ref is None:
    sys.exit("no run of ours finished")
fpt, peak = ref["metrics"]["bench.flops_per_token"], ref["config"]["peak_tflops"]
rows = [(f"ours {dt}", o["metrics"]["bench.tokens_per_s"]) for dt, o in ours.items() if o]
rows += [(f"twin autocast + fused AdamW, {k}", t["tokens_per_s"]) for k, t in twin.items() if t]
best_twin = max((t["tokens_per_s"] for t in twin.values() if t), default=None)
summary = {"flops_per_token": fpt, "peak_tflops": peak, "params": ref["config"]["params"], "rows": []}
print(f"{'':52s} {'tokens/s':>12s} {'TFLOP/s':>8s} {'MFU':>6s} {'vs best twin':>12s}")
for label, tps in rows:
    tf = fpt * tps / 1e12
    ratio = tps / best_twin if best_twin else None
    summary["rows"].append({"label": label, "tokens_per_s": tps, "model_tflops": tf, "mfu": tf / peak, "vs_best_twin": ratio})
    print(f"{label:52s} {tps:12,.0f} {tf:8.1f} {100 * tf / peak:5.1f}% {('%.2f' % ratio) if ratio else '-':>12s}")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
PY
cp "$out/summary.txt" "$dest/shape-$name-summary.txt"; cp "$out/summary.json" "$dest/shape-$name-summary.json" 2>/dev/null
tar -czf "$dest/shape-$name.tgz" -C /tmp "shape-$name"
exit $status
