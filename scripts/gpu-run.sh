#!/usr/bin/env bash
# Run on the GPU host (through the device tool, from the repository root, with .gpu carried):
#
#   bash scripts/gpu-run.sh tests                # every CUDA test executable in the bundle
#   bash scripts/gpu-run.sh bin NAME [ARGS...]   # one topic binary, output/ copied to $OUT
#
# Unpacks .gpu/bundle.tar.xz into /tmp/gpu (once per machine), sources remote-env.sh, and
# copies logs and output/ to $OUT (or ./gpu-results when $OUT is unset).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dest=${OUT:-$root/gpu-results}
mkdir -p "$dest" /tmp/gpu
if [ ! -f /tmp/gpu/manifest.txt ]; then
  xz -dc .gpu/bundle.tar.xz | tar xf - -C /tmp/gpu || { echo "cannot unpack .gpu/bundle.tar.xz (was .gpu carried?)" >&2; exit 1; }
fi
# shellcheck disable=SC1091
source .gpu/remote-env.sh /tmp/gpu/bin/* >/dev/null 2>&1 || source .gpu/remote-env.sh
export MODULE08_EXPECT_GPU=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$dest/gpu.txt"
mode=${1:-tests}; shift || true
case "$mode" in
  tests)
    fail=0
    while read -r kind pkg path; do
      [ "$kind" = test ] || continue
      filter=${1:-}
      echo "== $path" | tee -a "$dest/tests.log"
      # Integration tests need the workspace layout: run from the repository root's crate folder.
      dir="$root"; [ -d "crates/$pkg" ] && dir="$root/crates/$pkg"; [ "$pkg" = shared ] && dir="$root/shared"
      (cd "$dir" && /tmp/gpu/$path $filter --test-threads=1 --nocapture 2>&1) | tee -a "$dest/tests.log" | grep -E "^test result|FAILED|panicked" 
      [ "${PIPESTATUS[0]}" -eq 0 ] || fail=1
    done < /tmp/gpu/manifest.txt
    echo "== all test executables: $([ $fail = 0 ] && echo PASSED || echo FAILED)" | tee -a "$dest/tests.log"
    ;;
  bin)
    name=$1; shift
    /tmp/gpu/bin/$name "$@" 2>&1 | tee -a "$dest/$name.log"
    if [ -d output ]; then tar -C output -czf "$dest/output-$name.tgz" .; fi
    ;;
  *) echo "usage: gpu-run.sh tests [FILTER] | bin NAME [ARGS...]" >&2; exit 2 ;;
esac
