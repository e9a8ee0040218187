#!/usr/bin/env bash
# Where a step's host time goes: Nsight Systems over `t0810_kv_cache ARGS…` on the GPU host, and
# its summaries of the CUDA driver/runtime calls (time inside each API function) and of the
# kernels, as a scripts/gpu-run.sh step:
#
#   "sh scripts/host_profile.sh --device cuda --dtype bf16-mixed train-bench --steps 20"
#
# Writes $OUT/host-profile.txt (the two summaries) and $OUT/host-profile.nsys-rep.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
dest=${OUT:-$root/gpu-results}; mkdir -p "$dest"
REMOTE_ENV_QUIET=1 source .gpu/remote-env.sh
export MODULE08_CACHE=/tmp/module08-cache
nsys=$(command -v nsys || ls /usr/local/cuda*/bin/nsys /opt/nvidia/nsight-systems*/bin/nsys 2>/dev/null | head -1)
[ -n "$nsys" ] || { echo "no nsys on this host"; exit 1; }
"$nsys" profile -o /tmp/host-profile --force-overwrite true --trace cuda,osrt --sample none \
  /tmp/gpu/bin/t0810_kv_cache "$@" > /tmp/host-profile.log 2>&1 || { tail -20 /tmp/host-profile.log; exit 1; }
tail -8 /tmp/host-profile.log
"$nsys" stats --report cuda_api_sum --report osrt_sum --format column /tmp/host-profile.nsys-rep > "$dest/host-profile.txt" 2>&1
cp /tmp/host-profile.nsys-rep "$dest/" 2>/dev/null
head -60 "$dest/host-profile.txt"
