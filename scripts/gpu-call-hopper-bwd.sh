#!/usr/bin/env bash
# One device call of evidence for 8-09's Hopper backward (issues 17 and 18), on the GPU host with
# .gpu carried (command: bash scripts/gpu-call-hopper-bwd.sh; CALL_SECONDS=N fits it to the time the
# call has, 585 by default). .gpu holds: the bundle of scripts/gpu-build.sh (every CUDA test
# executable, t0809_flash_attention, t0810_kv_cache), the backward probe at
# .gpu/probe/flash_hopper_bwd_probe (nvcc -O3 -std=c++17 --use_fast_math -gencode
# arch=compute_90a,code=sm_90a -lcuda scripts/flash_hopper_bwd_probe.cu), optionally the forward
# probe .gpu/probe/flash_hopper_probe and both built from an earlier commit in .gpu/probe/before/,
# and a variant build at .gpu/variant.tar.xz (scripts/gpu-build-variant.sh). In order, each step
# bounded by the time left: the probe (correctness on 11 ragged shapes, then times of every
# variant); every CUDA test executable; the attention bench against FlashAttention-2 and cuDNN;
# compute-sanitizer on 8-09's property sweeps (SANITIZE, SANITIZE_TOOLS below); the before/after
# probes (PROBE_ORDER, PROBE_RESERVE); the same bench and 8-09's GPU tests with the variant build,
# if .gpu holds one, and the sanitizer on it; the LM step at GPT-2-small size with and without
# the Hopper kernels. Everything goes into one tarball, $OUT/call.tgz, rewritten after every step
# (the device tool returns few files, and a call stopped at its limit keeps what is there). Unpacked under reports/gpu-runs/<run>/callN/: a/ (tests), b/
# (bench; bench_results.json beside it), v/ (the variant; its results.json as
# variant_bench_results.json), s/ (sanitizer), c/ (shape bench), probe_bwd.txt, steps.txt; e.g.
# reports/gpu-runs/h100-2026-12-07/call1/.
set -u
O=${OUT:?}; W=/tmp/hopper-call; rm -rf $W; mkdir -p $W
T=${CALL_SECONDS:-585}
t0=$(date +%s)
left() { echo $(( T - ($(date +%s) - t0) )); }
pack() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $W/steps.txt; tar czf $O/call.tgz -C /tmp hopper-call; }
mkdir -p /tmp/pr && cp -r .gpu/probe/. /tmp/pr/ && chmod -R +x /tmp/pr
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader > $W/gpu.txt
timeout 70 stdbuf -oL /tmp/pr/flash_hopper_bwd_probe > $W/probe_bwd.txt 2>&1; pack "probe rc=$?"
OUT=$W/a TEST_TIMEOUT=120 timeout $(( $(left) - 60 )) bash scripts/gpu-run.sh tests > /dev/null 2>&1; pack "tests rc=$?"
OUT=$W/b timeout $(( $(left) - 40 )) bash scripts/gpu-run.sh "sh scripts/attention_bench.sh --seqs 1024,4096,16384" > /dev/null 2>&1; rc=$?
cp -r output/attention-bench $W/b/ 2>/dev/null; pack "bench rc=$rc"
# compute-sanitizer on 8-09's property sweeps with the bundle unpacked in /tmp/$1 (if there;
# SANITIZE=0 skips it; SANITIZE_TOOLS names the tools, racecheck and memcheck by default).
sanitize() {
  [ "${SANITIZE:-1}" = 1 ] && [ -d /tmp/$1 ] && [ "$(left)" -gt 75 ] || return 0
  OUT=$W/s SANITIZE_NAME=sanitize-$1 SANITIZE_BUNDLE=/tmp/$1 SANITIZE_SPLIT=1 SANITIZE_TOOLS="${SANITIZE_TOOLS:-racecheck memcheck}" \
    SANITIZE_TIMEOUT=$(( $(left) - 20 )) timeout $(( $(left) - 8 )) \
    bash scripts/sanitize.sh t0809_flash_attention__properties > $W/sanitize-$1.log 2>&1
  pack "sanitize $1 rc=$?"
}
sanitize gpu
# Before and after: with .gpu/probe/before/ (the two probes built from an earlier commit) the
# backward probe's shipped kernels and the forward probe run beside their "before" twins,
# alternating, each twice (probe_<which>.<n>.txt), so that a kernel change is timed within one call.
# PROBE_ORDER names the runs and their order; a run NAME_X takes its probes from .gpu/probe/X/
# (e.g. "mid" for a build between before and after).
if [ -d /tmp/pr/before ]; then
  for r in ${PROBE_ORDER:-bwd_before fwd fwd_before bwd_before bwd fwd_before fwd}; do
    [ "$(left)" -gt "${PROBE_RESERVE:-240}" ] || break  # seconds kept for the steps below
    case $r in bwd*) exe=flash_hopper_bwd_probe; args="shipped d128" ;; *) exe=flash_hopper_probe; args="" ;; esac
    case $r in *_*) exe=${r#*_}/$exe ;; esac
    n=$(ls $W | grep -c "^probe_$r\.")
    timeout 60 stdbuf -oL /tmp/pr/$exe $args > $W/probe_$r.$n.txt 2>&1; pack "probe $r rc=$?"
  done
fi
# A variant build (same environment as gpu-run.sh): unpacked into DIR, its bench into $W/NAME,
# then 8-09's GPU tests. Each bounded (a hang costs at most its step).
variant() {
  local name=$1 tarball=$2 dir=$3
  [ -f "$tarball" ] && [ "$(left)" -gt 70 ] || return 0
  rm -rf $dir && mkdir -p $dir && xz -dc $tarball | tar xf - -C $dir
  (
    REMOTE_ENV_QUIET=1 source .gpu/remote-env.sh
    export MODULE08_EXPECT_GPU=1 MODULE08_TEST_DEVICE=cuda MODULE08_CACHE=/tmp/module08-cache MODULE08_GIT_REV="$(cat $dir/git-rev.txt)"
    mkdir -p $W/$name
    timeout $(( $(left) - 30 < 150 ? $(left) - 30 : 150 )) $dir/bin/t0809_flash_attention --device cuda --out $W/$name \
      bench --seqs 1024,4096,16384 --no-naive > $W/$name/bench.log 2>&1
    echo "variant bench rc=$?" >> $W/$name/rc.txt
    (cd crates/t0809_flash_attention && timeout 90 $dir/tests/t0809_flash_attention__gpu --test-threads=1) > $W/$name/gpu_test.log 2>&1
    echo "variant gpu test rc=$?" >> $W/$name/rc.txt
  )
  pack "variant $name $(tr '\n' ' ' < $W/$name/rc.txt)"
}
variant v .gpu/variant.tar.xz /tmp/gpuv
sanitize gpuv
if [ "$(left)" -gt 80 ]; then
  OUT=$W/c timeout $(( $(left) - 5 )) bash scripts/gpu-run.sh "sh scripts/shape_bench.sh scripts/gpt2_small_config.json 16 10 --flash-kernels,mma-sync" > /dev/null 2>&1; rc=$?
  cp -r /tmp/shape-gpt2_small_config $W/c/ 2>/dev/null; pack "gpt2 rc=$rc"
fi
cat $W/steps.txt; grep -E "^correctness|time bwd d (64|128) causal 1 n 16384" $W/probe_bwd.txt
grep -hE "^test|^sh|rc=" $W/*/summary.txt 2>/dev/null | cut -c1-200 | head -40
grep -E "rc=" $W/v/rc.txt; grep -E "test result" $W/v/gpu_test.log
cut -c1-200 $W/s/sanitize-*summary.txt 2>/dev/null
