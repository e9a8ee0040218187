#!/usr/bin/env bash
# Data parallelism, ours against PyTorch DDP, at several world sizes on one machine (one process
# per GPU), back to back (run on the GPU host as a scripts/gpu-run.sh step, after a bundle built
# with GPU_FEATURES=nccl and --bins "t0810_kv_cache shared/launch" is unpacked):
#
#   "sh scripts/dp_bench.sh [CONFIG] [BATCH] [STEPS] [WORLD ...]"   (a gpu-run.sh step, run with bash)
#   bash scripts/dp_bench.sh [CONFIG] [BATCH] [STEPS] [WORLD ...]   (directly)
#   default: scripts/cs336_config.json 64 20 1 2 4 8; CONFIG relative to the repository root
#
# A world larger than the machine's GPUs is skipped; each run stops after DP_TIMEOUT seconds
# (900), so a group that hangs costs one row, not the call. Efficiencies need world 1 in the list.
#
# BATCH is per rank (weak scaling: the global batch is BATCH × N). For each world size N:
#   ours   shared's `launch --world N` starting N copies of `t0810_kv_cache train-bench`
#          (bf16-mixed, FlashAttention); rank r runs on cuda:r, the ranks average their gradients
#          over NCCL in buckets that leave during the backward (shared::data_parallel)
#   twin   `torchrun --nproc_per_node N scripts/pytorch_twin.py train-bench --ddp`: bf16 autocast,
#          AdamW(fused=True), DistributedDataParallel, under torch.compile (TWIN_COMPILE=0: eager)
# Tokens/s count every rank's tokens. Scaling efficiency at N = tokens/s at N ÷ (N × tokens/s at 1),
# each side against its own world of one. NVLink multicast (NVLS) stays off (NCCL_NVLS_ENABLE=0).
#
# Environment: BIN (the executables; default /tmp/gpu/bin), DEVICE (cuda; `cpu` runs the same on
# the CPU, ours over TCP and the twin over gloo, as a smoke test of the script).
# Writes $OUT/dp-<config name>-summary.txt and -summary.json (the table) and dp-<config name>.tgz
# (every log and json). Exits non-zero when a row failed.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cfg=${1:-scripts/cs336_config.json}; B=${2:-64}; STEPS=${3:-20}
shift $(( $# < 3 ? $# : 3 )); WORLDS=${*:-1 2 4 8}
name=$(basename "$cfg" .json)
dest=${OUT:-$root/gpu-results}; mkdir -p "$dest"
out=/tmp/dp-$name; rm -rf "$out"; mkdir -p "$out"
bin=${BIN:-/tmp/gpu/bin}
device=${DEVICE:-cuda}
[ "$device" = cuda ] && [ -f .gpu/remote-env.sh ] && REMOTE_ENV_QUIET=1 source .gpu/remote-env.sh
export MODULE08_CACHE=/tmp/module08-cache NCCL_NVLS_ENABLE=0
args=$(python3 - "$cfg" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
print(f"--vocab {c['vocab_size']} --ctx {c['max_seq_len']} --d-model {c['d_model']} --d-ff {c['d_ff']} "
      f"--layers {c['n_layers']} --heads {c['n_heads']} --kv-heads {c['n_kv_heads']} --theta {c['rope_theta']}")
PY
) && [ -n "$args" ] || { echo "cannot read the sizes of $cfg" >&2; exit 1; }
if [ "$device" = cuda ]; then
  ours_dtype=bf16-mixed; twin_flags="--dtype bf16 --amp --fused-adamw"
  [ "${TWIN_COMPILE:-1}" = 1 ] && twin_flags="$twin_flags --compile"
else
  ours_dtype=f32; twin_flags="--dtype f32"
fi
status=0
if [ "$device" = cuda ]; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); else gpus=1024; fi
limit=${DP_TIMEOUT:-900}
echo "== $name: $args, batch $B per rank, $STEPS steps, worlds $WORLDS, $device" | tee "$out/summary.txt"
for n in $WORLDS; do
  if [ "$n" -gt "$gpus" ]; then
    echo "world $n skipped: this machine has $gpus GPUs" | tee -a "$out/summary.txt"; continue
  fi
  timeout "$limit" "$bin/launch" --world "$n" -- "$bin/t0810_kv_cache" --device "$device" --dtype $ours_dtype --attention flash \
    --out "$out/ours-$n" train-bench $args --batch "$B" --steps "$STEPS" --warmup 3 > "$out/ours_$n.log" 2>&1
  cp "$out/ours-$n/t0810_kv_cache/train_bench/results.json" "$out/ours_$n.json" 2>/dev/null \
    || { status=1; echo "ours, world $n, failed: $(tail -3 "$out/ours_$n.log")" | tee -a "$out/summary.txt"; }
  timeout "$limit" python3 -m torch.distributed.run --standalone --nproc_per_node "$n" scripts/pytorch_twin.py train-bench \
    --config "$cfg" --batch "$B" --steps "$STEPS" --warmup 3 --device "$device" $twin_flags --ddp \
    --json "$out/twin_$n.json" > "$out/twin_$n.log" 2>&1 \
    || { status=1; echo "twin, world $n, failed: $(tail -3 "$out/twin_$n.log")" | tee -a "$out/summary.txt"; }
done
python3 - "$out" "$WORLDS" <<'PY' | tee -a "$out/summary.txt" || status=1
import json, os, sys
out, worlds = sys.argv[1], [int(w) for w in sys.argv[2].split()]
def rate(side, n):
    p = os.path.join(out, f"{side}_{n}.json")
    if not os.path.exists(p):
        return None
    j = json.load(open(p))
    return j["metrics"]["bench.tokens_per_s"] if side == "ours" else j["tokens_per_s"]
rows = []
base = {s: rate(s, 1) for s in ["ours", "twin"]}
print(f"{'ranks':>5} {'ours tokens/s':>14} {'efficiency':>10} {'DDP tokens/s':>14} {'efficiency':>10} {'ours / DDP':>10}")
for n in worlds:
    o, t = rate("ours", n), rate("twin", n)
    eff = {s: (r / (n * base[s]) if r and base[s] else None) for s, r in [("ours", o), ("twin", t)]}
    ratio = o / t if o and t else None
    fmt = lambda v, f: format(v, f) if v is not None else "-"
    print(f"{n:>5} {fmt(o, ',.0f'):>14} {fmt(eff['ours'], '.1%'):>10} {fmt(t, ',.0f'):>14} {fmt(eff['twin'], '.1%'):>10} {fmt(ratio, '.2f'):>10}")
    rows.append({"world": n, "ours_tokens_per_s": o, "ours_efficiency": eff["ours"],
                 "ddp_tokens_per_s": t, "ddp_efficiency": eff["twin"], "ours_vs_ddp": ratio})
json.dump({"rows": rows}, open(os.path.join(out, "summary.json"), "w"), indent=1)
if not any(r["ours_tokens_per_s"] for r in rows):
    sys.exit("no run of ours finished")
PY
cp "$out/summary.txt" "$dest/dp-$name-summary.txt"
cp "$out/summary.json" "$dest/dp-$name-summary.json" 2>/dev/null
tar -C /tmp -czf "$dest/dp-$name.tgz" "dp-$name"
exit $status
