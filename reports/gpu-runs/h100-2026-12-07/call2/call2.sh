# Call 2 of reports/gpu-runs/h100-2026-12-07: every CUDA test executable (bundle of 4ed04f2), the
# fused test 10 more times, Nsight Compute on the d 64 backwards (probe of a7b6557: shipped, q128,
# q128 pf) and on PyTorch's cuDNN and FlashAttention-2 SDPA at the same shape.
set -u
O=${OUT:?}; W=/tmp/c2; rm -rf $W; mkdir -p $W
t0=$(date +%s)
pack() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $W/steps.txt; tar czf $O/call2.tgz -C /tmp c2; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader > $W/gpu.txt
OUT=$W/a TEST_TIMEOUT=120 timeout 300 bash scripts/gpu-run.sh tests > /dev/null 2>&1; pack "tests rc=$?"
REMOTE_ENV_QUIET=1 source .gpu/remote-env.sh
export MODULE08_EXPECT_GPU=1 MODULE08_TEST_DEVICE=cuda MODULE08_CACHE=/tmp/module08-cache
(cd crates/t0806_modern_blocks && for i in $(seq 10); do timeout 30 /tmp/gpu/tests/t0806_modern_blocks__fused --test-threads=1 residual_adds 2>&1 | grep "test result"; done) > $W/fused-repeats.txt 2>&1; pack "fused repeats"
mkdir -p /tmp/pr && cp .gpu/probe/flash_hopper_bwd_probe /tmp/pr/ && chmod +x /tmp/pr/flash_hopper_bwd_probe
timeout 90 ncu --set full -k regex:bwd /tmp/pr/flash_hopper_bwd_probe profile shipped q128 'q128 pf' > $W/ncu_bwd.txt 2>&1; pack "ncu probe rc=$?"
for b in cudnn flash; do timeout $([ $b = cudnn ] && echo 70 || echo 45) ncu --set full --profile-from-start off python3 scripts/ncu_sdpa_backward.py $b > $W/ncu_sdpa_$b.txt 2>&1; pack "ncu sdpa $b rc=$?"; done
cat $W/steps.txt; grep -h "test result\|rc=" $W/a/summary.txt | cut -c1-140; cat $W/fused-repeats.txt
grep -h "==PROF== Profiling\|  Duration" $W/ncu*.txt | head -60
