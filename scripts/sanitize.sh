#!/usr/bin/env bash
# Every CUDA kernel of the project under compute-sanitizer (memcheck, racecheck, initcheck), through
# the GPU tests that launch them. Run on the GPU host after scripts/gpu-run.sh has unpacked the
# bundle (as a step: "sh scripts/sanitize.sh"), or directly:
#
#   bash scripts/sanitize.sh [TEST ...]      (default: the tests below)
#   SANITIZE_TOOLS="memcheck racecheck initcheck" (default; any compute-sanitizer tool, e.g.
#   synccheck), SANITIZE_TIMEOUT=SECONDS per run (600)
#   SANITIZE_SPLIT=1: each test function of an executable in its own sanitizer process, up to
#   SANITIZE_JOBS (4) at a time, each with its own limit (one summary line per test function; a
#   slow function no longer stops the others, though contention makes each slower)
#
# The tests and the kernels they reach:
#   shared__gpu                      embedding, cross-entropy, AdamW + step gate, head swap
#   t0806_modern_blocks__gpu         fused RMSNorm, SwiGLU gate, causal softmax
#   t0806_modern_blocks__layernorm   fused LayerNorm (forward, backward, [dg | db] reduction), bias + GELU
#   t0806_modern_blocks__properties  fused RMSNorm, SwiGLU gate, bias + GELU, causal softmax, random shapes
#   t0808_rope__rope                 fused RoPE (with MODULE08_TEST_DEVICE=cuda)
#   t0809_flash_attention__gpu       FlashAttention: tensor-core, register-tiled and simple kernels
#   t0809_flash_attention__properties  every family again over random shapes, and with key padding
# Writes sanitize-summary.txt (one line per tool and test) and sanitize-logs.tgz into $OUT (or
# ./gpu-results); SANITIZE_NAME=NAME names them NAME-summary.txt and NAME-logs.tgz instead.
# SANITIZE_BUNDLE=DIR takes the test executables from DIR/tests (default /tmp/gpu, where
# gpu-run.sh unpacks the bundle).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dest=${OUT:-$root/gpu-results}
mkdir -p "$dest"
REMOTE_ENV_QUIET=1 source .gpu/remote-env.sh
# MODULE08_SANITIZER: the FlashAttention sweeps run one shape instead of eight (tests/gpu.rs)
# and the property tests fewer cases (8-06 a fifth, 8-09 a third)
export MODULE08_TEST_DEVICE=cuda MODULE08_EXPECT_GPU=1 MODULE08_CACHE=/tmp/module08-cache MODULE08_SANITIZER=1
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
tests=${*:-"shared__gpu t0806_modern_blocks__gpu t0806_modern_blocks__layernorm t0806_modern_blocks__properties t0808_rope__rope t0809_flash_attention__gpu t0809_flash_attention__properties"}
# SANITIZE_NAME=NAME: write NAME-summary.txt and NAME-logs.tgz (two runs in one call keep both)
label=${SANITIZE_NAME:-sanitize}
bundle=${SANITIZE_BUNDLE:-/tmp/gpu}
summary="$dest/$label-summary.txt"
echo "compute-sanitizer: $($sanitizer --version 2>&1 | tail -1)" | tee "$summary"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$summary"
# One sanitizer run: tool $1, test executable $2, log $3, then the test-name filter (if any).
run_one() {
  local tool=$1 t=$2 log=$3; shift 3
  local pkg=${t%%__*} dir started rc errors tests_line
  dir="$root/crates/$pkg"; [ "$pkg" = shared ] && dir="$root/shared"
  started=$(date +%s)
  (cd "$dir" && timeout "${SANITIZE_TIMEOUT:-600}" "$sanitizer" --tool "$tool" --error-exitcode 99 \
    "$bundle/tests/$t" --test-threads=1 "$@") > "$log" 2>&1
  rc=$?
  errors=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
  tests_line=$(grep -E "^test result" "$log" | tail -1)
  echo "$t${1:+ $1} $tool: rc=$rc ($(( $(date +%s) - started )) s) ${errors:-no summary} | ${tests_line:-no test result}" | tee -a "$summary"
}
# Tool by tool (memcheck over every test first), so that a run cut short still covers every kernel
# with the first tools.
for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck}; do
  for t in $tests; do
    exe=$bundle/tests/$t
    [ -x "$exe" ] || { echo "$t: not in the bundle" | tee -a "$summary"; continue; }
    if [ -n "${SANITIZE_SPLIT:-}" ]; then
      names=$("$exe" --list --format terse 2>&1 | sed -n 's/: test$//p')
      [ -n "$names" ] || { echo "$t $tool: no tests listed" | tee -a "$summary"; continue; }
      for name in $names; do
        while [ "$(jobs -rp | wc -l)" -ge "${SANITIZE_JOBS:-4}" ]; do wait -n; done
        run_one "$tool" "$t" "/tmp/sanitize-$label-$t-$name-$tool.log" "$name" --exact &
      done
      wait
    else
      run_one "$tool" "$t" "/tmp/sanitize-$label-$t-$tool.log"
    fi
  done
done
tar -czf "$dest/$label-logs.tgz" -C /tmp $(cd /tmp && ls "sanitize-$label-"*.log 2>/dev/null)
