#!/usr/bin/env bash
# Run on the GPU host (through the device tool, from the repository root, with .gpu carried).
#
#   bash scripts/gpu-run.sh STEP [STEP ...]
#     STEP = tests            every CUDA test executable in the bundle (TESTS_MATCH=REGEX: those whose path matches)
#          | "bin NAME ARGS"  one topic binary (quote the whole step)
#          | "sh SCRIPT ARGS" a script of the repository (e.g. scripts/compare_with_twin.sh)
#          | "env VAR=VALUE …"  export variables for the steps after it (e.g. MODULE08_EMBEDDING=index-select)
#          | "ncu NAME ARGS"  one topic binary under Nsight Compute, recording only the region the
#                             binary brackets with cuProfilerStart/Stop (e.g. t0810_kv_cache train-bench --profile):
#                             GPU time per kernel, summarised by scripts/ncu_summary.py
#
# Unpacks .gpu/bundle.tar.xz into /tmp/gpu (again whenever the bundle changed), sources remote-env.sh, points
# WIKITEXT2_DIR at the carried data, runs the steps in order (a failing step does not stop the
# others; STEP_TIMEOUT=SECONDS stops a binary that runs longer, TEST_TIMEOUT=SECONDS a test
# executable (rc 124 in the summary: a hang costs one executable, not the call), and leaves in $OUT (./gpu-results without the device tool): summary.txt, and
# results.tgz with every log and the output/ folder.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dest=${OUT:-$root/gpu-results}
logs=/tmp/gpu-logs
# A machine can come back with an earlier session's /tmp: unpack whenever the carried bundle
# differs from the one unpacked, and start every call with an empty log folder.
rm -rf "$logs"
mkdir -p "$dest" /tmp/gpu "$logs"
bundle_sum=$(sha256sum .gpu/bundle.tar.xz 2>/dev/null | cut -d' ' -f1)
if [ -z "$bundle_sum" ]; then echo "no .gpu/bundle.tar.xz (was .gpu carried?)" >&2; exit 1; fi
if [ "$(cat /tmp/gpu/bundle.sha256 2>/dev/null)" != "$bundle_sum" ]; then
  rm -rf /tmp/gpu && mkdir -p /tmp/gpu
  xz -dc .gpu/bundle.tar.xz | tar xf - -C /tmp/gpu || { echo "cannot unpack .gpu/bundle.tar.xz" >&2; exit 1; }
  echo "$bundle_sum" > /tmp/gpu/bundle.sha256
fi
# shellcheck disable=SC1091
REMOTE_ENV_QUIET=1 source .gpu/remote-env.sh
# libnccl.so.2 for executables built with --features nccl (GPU_FEATURES=nccl): PyTorch's wheel has it
for p in $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
  if [ -e "$p/nvidia/nccl/lib/libnccl.so.2" ]; then export LD_LIBRARY_PATH="$p/nvidia/nccl/lib:$LD_LIBRARY_PATH"; break; fi
done
export MODULE08_EXPECT_GPU=1 MODULE08_TEST_DEVICE=cuda MODULE08_CACHE=/tmp/module08-cache
[ -d .gpu/data ] && export WIKITEXT2_DIR="$root/.gpu/data"
[ -f .gpu/font.ttf ] && export MODULE08_FONT="$root/.gpu/font.ttf"
summary="$dest/summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$summary"
# The revision the executables were built from (this copy's git state can be another one).
export MODULE08_GIT_REV="${MODULE08_GIT_REV:-$(cat /tmp/gpu/git-rev.txt 2>/dev/null || echo unknown)}"
echo "executables built from $MODULE08_GIT_REV" | tee -a "$summary"
status=0
n=0
for step in "$@"; do
  n=$((n + 1))
  set -- $step
  kind=$1; shift
  started=$(date +%s)
  case "$kind" in
    tests)
      while read -r k pkg path; do
        [ "$k" = test ] || continue
        [ -z "${TESTS_MATCH:-}" ] || [[ "$path" =~ $TESTS_MATCH ]] || continue  # e.g. 't0809|t0810'
        dir="$root"; [ -d "crates/$pkg" ] && dir="$root/crates/$pkg"; [ "$pkg" = shared ] && dir="$root/shared"
        log="$logs/$(basename "$path").log"
        (cd "$dir" && timeout "${TEST_TIMEOUT:-1800}" "/tmp/gpu/$path" --test-threads=1 --nocapture) > "$log" 2>&1
        rc=$?
        echo "test $path: rc=$rc $(grep -E '^test result' "$log" | tail -1)" | tee -a "$summary"
        [ $rc -eq 0 ] || { status=1; grep -E "FAILED|panicked" "$log" | head -5 | tee -a "$summary"; }
      done < /tmp/gpu/manifest.txt
      ;;
    bin)
      name=$1; shift
      log="$logs/$n-$name.log"
      timeout "${STEP_TIMEOUT:-36000}" "/tmp/gpu/bin/$name" "$@" > "$log" 2>&1
      rc=$?
      echo "bin $name $*: rc=$rc ($(( $(date +%s) - started )) s)" | tee -a "$summary"
      tail -25 "$log" | sed 's/^/    /' >> "$summary"
      [ $rc -eq 0 ] || status=1
      ;;
    env)
      export "$@"
      echo "env $*" | tee -a "$summary"
      ;;
    ncu)
      name=$1; shift
      csvlog="$logs/$n-ncu-$name.csv"
      ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
        --log-file "$csvlog" "/tmp/gpu/bin/$name" "$@" > "$logs/$n-ncu-$name.out" 2>&1
      rc=$?
      echo "ncu $name $*: rc=$rc ($(( $(date +%s) - started )) s)" | tee -a "$summary"
      python3 scripts/ncu_summary.py "$csvlog" --top 40 2>&1 | sed 's/^/    /' >> "$summary"
      tail -12 "$logs/$n-ncu-$name.out" | sed 's/^/    /' >> "$summary"
      [ $rc -eq 0 ] || status=1
      ;;
    sh)
      log="$logs/$(basename "$1").log"
      bash "$@" > "$log" 2>&1
      rc=$?
      echo "sh $*: rc=$rc ($(( $(date +%s) - started )) s)" | tee -a "$summary"
      tail -40 "$log" | sed 's/^/    /' >> "$summary"
      [ $rc -eq 0 ] || status=1
      ;;
    *) echo "unknown step '$kind'" | tee -a "$summary"; status=2 ;;
  esac
done
tar -czf "$dest/results.tgz" --exclude="*.safetensors" --exclude="checkpoints" -C / "${logs#/}" $( [ -d "$root/output" ] && echo "-C $root output" )
cat "$summary"
exit $status
