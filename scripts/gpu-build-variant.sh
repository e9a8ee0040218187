#!/usr/bin/env bash
# A variant build of 8-09's kernels for an A/B through Candle in the same device call as the
# shipped build: the kernel file with exact text substitutions (each must occur once), 8-09's
# binary and its GPU and property tests built with --features cuda, packed into
# .gpu/variant.tar.xz (bin/, tests/, git-rev.txt naming the substitutions). The kernel file is
# restored afterwards, whatever happens. Run after scripts/gpu-build.sh (which empties .gpu).
#
#   scripts/gpu-build-variant.sh 'OLD=>NEW' ['OLD=>NEW' ...]
#   e.g. (the d 64 backward adding dQ from its registers instead of staging it for the TMA
#   unit's bulk reduce-add):
#   scripts/gpu-build-variant.sh 'hopper::bwd_wgmma<T, D, NS>(&tmQ=>hopper::bwd_wgmma<T, D, NS, true>(&tmQ'
#   (A substitution may also bring a whole kernel in: reports/gpu-runs/h100-2026-12-07 ran one
#   with the kernel added to the file and src/cuda.rs's shared memory changed to match.)
#
# Build variants in this checkout. A second checkout of the workspace (a git worktree) built with
# the same CARGO_TARGET_DIR shares its build-script output folders (Cargo hashes workspace
# packages by their path relative to the root), and a later build here whose kernel file has not
# changed keeps the PTX that checkout left (reports/gpu-runs/h100-2026-12-07/README.md, call2/).
#
# On the GPU host, unpack with `xz -dc .gpu/variant.tar.xz | tar xf - -C /tmp/gpuv`; the tests
# run under scripts/sanitize.sh with SANITIZE_BUNDLE=/tmp/gpuv, the binary as
# /tmp/gpuv/bin/t0809_flash_attention bench … (its results.json as callN/variant_bench_results.json
# gives scripts/gpu_run_ratios.py's variant_vs_shipped).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
[ $# -gt 0 ] || { echo "usage: $0 'OLD=>NEW' ..." >&2; exit 2; }
if ! command -v nvcc >/dev/null 2>&1; then
  eval "$("$root/../shared/gpu/setup-cuda-toolkit.sh")"
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target-cuda}"
export RUSTFLAGS="${RUSTFLAGS-}"
unset CARGO_ENCODED_RUSTFLAGS
kernel=crates/t0809_flash_attention/kernels/flash_attn_hopper.cu
saved=$(mktemp)
cp "$kernel" "$saved"
trap 'cp "$saved" "$kernel"; rm -f "$saved"' EXIT
python3 - "$kernel" "$@" <<'PY'
import sys
path, subs = sys.argv[1], sys.argv[2:]
text = open(path).read()
for sub in subs:
    old, sep, new = sub.partition("=>")
    if not sep or text.count(old) != 1:
        sys.exit(f"'{old}' must occur exactly once in {path} (found {text.count(old)})")
    text = text.replace(old, new)
open(path, "w").write(text)
PY
stage=$(mktemp -d)
mkdir -p "$stage/bin" "$stage/tests" .gpu
cargo build --release --features cuda -p t0809_flash_attention --bin t0809_flash_attention 2>&1 | tail -1 >&2
cp "$CARGO_TARGET_DIR/release/t0809_flash_attention" "$stage/bin/"
for t in gpu properties; do
  exe=$(cargo test --release --features cuda -p t0809_flash_attention --test "$t" --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["profile"]["test"]: print(m["executable"])' | tail -1)
  [ -n "$exe" ] || { echo "build of t0809_flash_attention/$t failed" >&2; exit 1; }
  cp "$exe" "$stage/tests/t0809_flash_attention__$t"
done
echo "$(git describe --always --dirty) with $*" > "$stage/git-rev.txt"
strip "$stage"/bin/* "$stage"/tests/*
# ~7 MB: the Candle kernels each executable embeds, stored once by the long window
tar -C "$stage" -cf - . | xz -T1 -9e --lzma2=dict=512MiB > .gpu/variant.tar.xz
rm -rf "$stage"
ls -la .gpu/variant.tar.xz >&2
