#!/usr/bin/env bash
# Ours vs the PyTorch twin, back to back on the same GPU (run on the GPU host after
# scripts/gpu-run.sh has unpacked the bundle, i.e. as a step: "bin ..." steps first, or directly):
#
#   bash scripts/compare_with_twin.sh [BATCH] [STEPS]     (TWIN_COMPILE=1 adds torch.compile rows)
#
# TRAIN_DTYPES (default "f32 bf16") and DECODE_DTYPES (default "bf16 f32") choose the rows' dtypes;
# with bf16 the training rows include ours in bf16-mixed (bf16 compute, f32 master weights and
# moments), the counterpart of the twin's autocast + fused AdamW.
#
# Needs in /tmp/gpu/bin: t0810_kv_cache, parity (t0810 example).
# Prints the table of ratios and leaves every log and json (summary.json: the table), the parity
# curves and their plots in one archive, $OUT/twin.tgz.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
B=${1:-64}; STEPS=${2:-20}
# Our implementation choices for the training and decoding rows, t0810's kernel flags
# (OURS_FLAGS="--kernels composed" / DECODE_FLAGS="--kernels composed" measure the composed ops;
# the training rows choose the attention kernel themselves).
OURS_FLAGS=${OURS_FLAGS---kernels fused}
DECODE_FLAGS=${DECODE_FLAGS---kernels fused --attention naive}
out=${OUT:-$root/gpu-results}/twin; mkdir -p "$out"
bin=/tmp/gpu/bin
REMOTE_ENV_QUIET=1 source .gpu/remote-env.sh
[ -d .gpu/data ] && export WIKITEXT2_DIR="$root/.gpu/data"
export MODULE08_CACHE=/tmp/module08-cache
[ -f .gpu/font.ttf ] && export MODULE08_FONT="$root/.gpu/font.ttf"
py=python3
cfg=$out/parity/config.json

bash scripts/parity.sh "$out"

for dt in ${TRAIN_DTYPES:-f32 bf16}; do
  echo "== training tokens/s, $dt, batch $B"
  for att in naive flash; do
    rm -f "$out/ours/t0810_kv_cache/train_bench/results.json"  # a failed run must not leave the previous one's
    $bin/t0810_kv_cache --device cuda --dtype $dt $OURS_FLAGS --attention $att --out "$out/ours" train-bench --batch $B --steps $STEPS --warmup 3 --profile > "$out/train_ours_${att}_$dt.log" 2>&1
    cp "$out/ours/t0810_kv_cache/train_bench/results.json" "$out/train_ours_${att}_$dt.json" 2>/dev/null || tail -5 "$out/train_ours_${att}_$dt.log"
  done
  if [ $dt = bf16 ]; then
    rm -f "$out/ours/t0810_kv_cache/train_bench/results.json"
    $bin/t0810_kv_cache --device cuda --dtype bf16-mixed $OURS_FLAGS --attention flash --out "$out/ours" train-bench --batch $B --steps $STEPS --warmup 3 --profile > "$out/train_ours_flashmixed_$dt.log" 2>&1
    cp "$out/ours/t0810_kv_cache/train_bench/results.json" "$out/train_ours_flashmixed_$dt.json" 2>/dev/null || tail -5 "$out/train_ours_flashmixed_$dt.log"
  fi
  # The same flash step with the host reading the loss and the gradient norm inside the step (the
  # trainer before its device-side gate): what the deferred step gains, on this machine.
  rm -f "$out/ours/t0810_kv_cache/train_bench/results.json"
  $bin/t0810_kv_cache --device cuda --dtype $dt $OURS_FLAGS --attention flash --out "$out/ours" train-bench --batch $B --steps $STEPS --warmup 3 --synchronous-step > "$out/train_ours_flashsync_$dt.log" 2>&1
  cp "$out/ours/t0810_kv_cache/train_bench/results.json" "$out/train_ours_flashsync_$dt.json" 2>/dev/null || tail -5 "$out/train_ours_flashsync_$dt.log"
  $py scripts/pytorch_twin.py train-bench --config "$cfg" --batch $B --steps $STEPS --dtype $dt --json "$out/train_twin_eager_$dt.json"
  # The twin with its attention written out (scores, mask, softmax, @V): the like-for-like row for our naive attention
  $py scripts/pytorch_twin.py train-bench --config "$cfg" --batch $B --steps $STEPS --dtype $dt --attention naive --json "$out/train_twin_eagernaive_$dt.json"
  # The strongest configuration a practitioner would choose: torch.compile, AdamW(fused=True),
  # and for bf16 autocast over f32 master weights and moments.
  amp=""; [ $dt = bf16 ] && amp="--amp"
  $py scripts/pytorch_twin.py train-bench --config "$cfg" --batch $B --steps $STEPS --dtype $dt $amp --fused-adamw --json "$out/train_twin_eagerbest_$dt.json"
  if [ -n "${TWIN_COMPILE:-}" ]; then
    $py scripts/pytorch_twin.py train-bench --config "$cfg" --batch $B --steps $STEPS --dtype $dt --compile --json "$out/train_twin_compile_$dt.json" 2>"$out/compile_$dt.err" || echo "torch.compile failed ($dt): $(tail -2 "$out/compile_$dt.err")"
    $py scripts/pytorch_twin.py train-bench --config "$cfg" --batch $B --steps $STEPS --dtype $dt $amp --fused-adamw --compile --json "$out/train_twin_best_$dt.json" 2>"$out/compilebest_$dt.err" || echo "torch.compile (best) failed ($dt): $(tail -2 "$out/compilebest_$dt.err")"
  fi
done
for dt in ${DECODE_DTYPES:-bf16 f32}; do
  for b in 1 32; do
    echo "== decoding, $dt, batch $b, prompt 128, 512 new tokens"
    rm -f "$out/ours/t0810_kv_cache/decode_bench_b${b}_$dt/results.json"
    $bin/t0810_kv_cache --device cuda --dtype $dt $DECODE_FLAGS --out "$out/ours" decode-bench --batch $b --prompt 128 --new 512 > "$out/decode_ours_${dt}_b$b.log" 2>&1
    cp "$out/ours/t0810_kv_cache/decode_bench_b${b}_$dt/results.json" "$out/decode_ours_${dt}_b$b.json" 2>/dev/null || tail -5 "$out/decode_ours_${dt}_b$b.log"
    $py scripts/pytorch_twin.py decode-bench --config "$cfg" --batch $b --prompt 128 --new 512 --dtype $dt --json "$out/decode_twin_${dt}_b$b.json"
    $py scripts/pytorch_twin.py decode-bench --config "$cfg" --batch $b --prompt 128 --new 512 --dtype $dt --graphs --json "$out/decode_twingraphs_${dt}_b$b.json" 2>"$out/graphs_${dt}_b$b.err" || echo "CUDA-graph decoding failed ($dt, batch $b): $(tail -2 "$out/graphs_${dt}_b$b.err")"
  done
done
$py - "$out" <<'PYEOF'
import json, os, sys
d = sys.argv[1]
def load(name):
    p = os.path.join(d, name)
    return json.load(open(p)) if os.path.exists(p) else None
rows = []
for dt in ("f32", "bf16"):
    for att in ("naive", "flash"):
        ours = load(f"train_ours_{att}_{dt}.json")
        o = ours["metrics"]["bench.tokens_per_s"] if ours else float("nan")
        twins = (("eagernaive", "eager naive"), ("eager", "eager SDPA")) if att == "naive" else (
            ("eager", "eager SDPA"), ("compile", "compile SDPA"), ("eagerbest", "eager best (amp, fused AdamW)"), ("best", "compile best (amp, fused AdamW)"))
        for impl, label in twins:
            t = load(f"train_twin_{impl}_{dt}.json")
            if t:
                rows.append((f"train {dt} {att} vs torch {label}", o, t["tokens_per_s"]))
mixed = load("train_ours_flashmixed_bf16.json")
if mixed:
    for impl, label in (("eagerbest", "eager best (amp, fused AdamW)"), ("best", "compile best (amp, fused AdamW)")):
        t = load(f"train_twin_{impl}_bf16.json")
        if t:
            rows.append((f"train bf16-mixed flash vs torch {label}", mixed["metrics"]["bench.tokens_per_s"], t["tokens_per_s"]))
for dt in ("f32", "bf16"):
    sync, deferred = load(f"train_ours_flashsync_{dt}.json"), load(f"train_ours_flash_{dt}.json")
    if sync and deferred:
        rows.append((f"train {dt} flash: deferred vs synchronous step", deferred["metrics"]["bench.tokens_per_s"], sync["metrics"]["bench.tokens_per_s"]))
for dt in ("bf16", "f32"):
    for b in (1, 32):
        ours = load(f"decode_ours_{dt}_b{b}.json"); o = ours["metrics"]["tokens_per_s"] if ours else float("nan")
        for impl, label in (("twin", "eager"), ("twingraphs", "CUDA graphs")):
            t = load(f"decode_{impl}_{dt}_b{b}.json")
            rows.append((f"decode {dt} batch {b} vs torch {label}", o, t["tokens_per_s"] if t else float("nan")))
print(f"{'measurement':44s} {'ours tok/s':>12s} {'twin tok/s':>12s} {'ours/twin':>9s}")
for name, o, t in rows:
    print(f"{name:44s} {o:12,.0f} {t:12,.0f} {o / t if t == t and t else float('nan'):9.2f}")
print(f"{'memory (GiB)':44s} {'ours':>12s} {'twin':>12s}")
for dt in ("f32", "bf16"):
    for att in ("naive", "flash"):
        ours = load(f"train_ours_{att}_{dt}.json"); t = load(f"train_twin_{'eagernaive' if att == 'naive' else 'eager'}_{dt}.json")
        m = ours["metrics"] if ours else {}; o = m.get("bench.peak_device_memory_gib", float("nan"))
        print(f"{'train ' + dt + ' ' + att:44s} {o:12.2f} {t['peak_gib'] if t else float('nan'):12.2f}")
best = load("train_twin_eagerbest_bf16.json")
if mixed:
    print(f"{'train bf16-mixed flash (twin: amp, fused AdamW)':44s} {mixed['metrics'].get('bench.peak_device_memory_gib', float('nan')):12.2f} {best['peak_gib'] if best else float('nan'):12.2f}")
print("(ours: the peak of the CUDA memory pool's in-use counter over the profiled steps; twin: torch.cuda.max_memory_allocated)")
p = load("parity_twin.json")
if p:
    print(f"loss parity over {len(p['rust_losses'])} steps: max relative difference {p['max_rel_diff']:.3%}, mean {p['mean_rel_diff']:.3%}")
json.dump({"rows": rows, "parity": p}, open(os.path.join(d, "summary.json"), "w"), indent=1)
PYEOF
# One archive instead of many files ($OUT returns a limited number of files): twin.tgz holds
# every log, json and the parity plots.
tar -czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
