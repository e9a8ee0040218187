#!/usr/bin/env bash
# Loss parity on the GPU host (f32, 200 steps, batch 16 on WikiText-2): ours (the `parity` example
# of t0810_kv_cache), then the PyTorch twin from the same initial weights and the same batches;
# the two curves and their difference as PNGs. A scripts/gpu-run.sh step, "sh scripts/parity.sh",
# or called by scripts/compare_with_twin.sh with its output folder.
#
# Writes DIR/parity_twin.json (max and mean relative difference), DIR/parity_rust.log, DIR/plots/
# (DIR: the first argument, default $OUT/parity-run).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-${OUT:-$root/gpu-results}/parity-run}; mkdir -p "$out"
bin=/tmp/gpu/bin
REMOTE_ENV_QUIET=1 source .gpu/remote-env.sh
[ -d .gpu/data ] && export WIKITEXT2_DIR="$root/.gpu/data"
export MODULE08_CACHE=/tmp/module08-cache
[ -f .gpu/font.ttf ] && export MODULE08_FONT="$root/.gpu/font.ttf"
echo "== loss parity (f32, 200 steps, batch 16): ours, then the twin from the same weights and batches"
$bin/parity --device cuda --dump "$out/parity" --steps 200 --batch 16 > "$out/parity_rust.log" 2>&1 || echo "parity (ours) failed: $(tail -3 "$out/parity_rust.log")"
NVIDIA_TF32_OVERRIDE=0 python3 scripts/pytorch_twin.py parity "$out/parity" --device cuda --dtype f32 --json "$out/parity_twin.json"
# The two curves and their difference as PNGs, next to the json (few files: $OUT returns a limited number)
$bin/parity --plot "$out/parity_twin.json" --dump "$out/plots" || echo "parity plot failed"
rm -f "$out/parity/batches.safetensors" "$out/parity/init.safetensors"
