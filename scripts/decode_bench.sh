#!/usr/bin/env bash
# Decoding speed, ours against the PyTorch twin, back to back on one GPU (run on the GPU host as
# a scripts/gpu-run.sh step, after the bundle is unpacked):
#
#   "sh scripts/decode_bench.sh [DTYPES] [BATCHES]"   (a gpu-run.sh step; default "bf16" "1 32")
#
# CS336 shape (scripts/cs336_config.json: vocab 10,000, d_model 512, d_ff 1,344, 4 layers, 16
# heads), prompt 128 + 512 new tokens, greedy. Rows for each dtype and batch:
#   ours eager        t0810_kv_cache decode-bench, fused ops, naive attention reading the cache in place
#   ours graphs       the same with --graphs: the static cache, the step captured into a CUDA graph
#   twin eager        scripts/pytorch_twin.py decode-bench
#   twin graphs       its static cache under torch.compile(mode="reduce-overhead") (CUDA graphs)
# Writes $OUT/decode.tgz (every log and json) beside decode-summary.txt and decode-summary.json
# (the table; ratios to the twin's graphs). Exits non-zero when a row failed.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
DTYPES=${1:-bf16}; BATCHES=${2:-1 32}
dest=${OUT:-$root/gpu-results}; mkdir -p "$dest"
out=/tmp/decode-bench; rm -rf "$out"; mkdir -p "$out"
bin=/tmp/gpu/bin
REMOTE_ENV_QUIET=1 source .gpu/remote-env.sh
export MODULE08_CACHE=/tmp/module08-cache
cfg=scripts/cs336_config.json
status=0
for dt in $DTYPES; do
  for b in $BATCHES; do
    for mode in eager graphs; do
      flag=""; suffix=""; [ $mode = graphs ] && { flag="--graphs"; suffix="_graphs"; }
      rm -rf "$out/ours-$mode"
      $bin/t0810_kv_cache --device cuda --dtype $dt --kernels fused --attention naive --out "$out/ours-$mode" \
        decode-bench --batch $b --prompt 128 --new 512 $flag > "$out/ours_${mode}_${dt}_b$b.log" 2>&1
      cp "$out/ours-$mode/t0810_kv_cache/decode_bench_b${b}_$dt$suffix/results.json" "$out/ours_${mode}_${dt}_b$b.json" 2>/dev/null \
        || { status=1; echo "ours $mode $dt batch $b failed: $(tail -3 "$out/ours_${mode}_${dt}_b$b.log")"; }
    done
    python3 scripts/pytorch_twin.py decode-bench --config $cfg --batch $b --prompt 128 --new 512 --dtype $dt \
      --json "$out/twin_eager_${dt}_b$b.json" > "$out/twin_eager_${dt}_b$b.log" 2>&1 || { status=1; echo "twin eager failed: $(tail -2 "$out/twin_eager_${dt}_b$b.log")"; }
    python3 scripts/pytorch_twin.py decode-bench --config $cfg --batch $b --prompt 128 --new 512 --dtype $dt --graphs \
      --json "$out/twin_graphs_${dt}_b$b.json" > "$out/twin_graphs_${dt}_b$b.log" 2>&1 || { status=1; echo "twin graphs failed: $(tail -2 "$out/twin_graphs_${dt}_b$b.log")"; }
  done
done
python3 - "$out" "$DTYPES" "$BATCHES" <<'PY' | tee "$out/summary.txt" || status=1
import json, os, sys
out, dtypes, batches = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None
rows, table = [], []
print(f"{'':10s} {'batch':>5s} {'row':14s} {'ms/step':>8s} {'tokens/s':>10s} {'vs twin graphs':>15s}")
for dt in dtypes:
    for b in batches:
        ours = {m: load(f"ours_{m}_{dt}_b{b}.json") for m in ["eager", "graphs"]}
        twin = {m: load(f"twin_{m}_{dt}_b{b}.json") for m in ["eager", "graphs"]}
        ref = twin["graphs"]["tokens_per_s"] if twin["graphs"] else None
        entries = [(f"ours {m}", o["metrics"]["tokens_per_s"], o["metrics"]["ms_per_token_step"]) for m, o in ours.items() if o]
        entries += [(f"twin {m}", t["tokens_per_s"], t["ms_per_token_step"]) for m, t in twin.items() if t]
        for label, tps, ms in entries:
            ratio = f"{tps / ref:.2f}x" if ref else "-"
            print(f"{dt:10s} {b:>5s} {label:14s} {ms:8.3f} {tps:10,.0f} {ratio:>15s}")
            table.append({"dtype": dt, "batch": int(b), "row": label, "tokens_per_s": tps, "ms_per_step": ms,
                          "vs_twin_graphs": tps / ref if ref else None})
device = next((t["device"] for dt in dtypes for b in batches for m in ["graphs", "eager"]
               if (t := load(f"twin_{m}_{dt}_b{b}.json"))), None)
json.dump({"device": device, "rows": table}, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(f"card: {device}")
PY
cp "$out/summary.txt" "$dest/decode-summary.txt"; cp "$out/summary.json" "$dest/decode-summary.json"
rm -rf "$out"/ours-*/t0810_kv_cache/*/figures
tar -czf "$dest/decode.tgz" -C /tmp decode-bench
exit $status
