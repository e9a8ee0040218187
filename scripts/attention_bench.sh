#!/usr/bin/env bash
# The attention benchmark of 8-09 with both PyTorch references, on the GPU host in one call
# (as a step of scripts/gpu-run.sh: "sh scripts/attention_bench.sh [BENCH ARGS]"):
#   1. PyTorch SDPA, FlashAttention-2 backend  -> output/attention-bench/pytorch_flash.json
#   2. PyTorch SDPA, cuDNN backend             -> output/attention-bench/pytorch_cudnn.json
#   3. ours: t0809_flash_attention bench --pytorch … --pytorch-cudnn … (the same shapes)
#      -> output/attention-bench/t0809_flash_attention/bench/results.json, the table and the plots
# Extra arguments go to all three (e.g. --seqs 4096,16384 --d-heads 64).
set -uo pipefail
out=output/attention-bench
mkdir -p "$out"
python3 scripts/bench_attention_pytorch.py --backend flash --out "$out/pytorch_flash.json" "$@" || echo "PyTorch flash backend failed"
python3 scripts/bench_attention_pytorch.py --backend cudnn --out "$out/pytorch_cudnn.json" "$@" || echo "PyTorch cuDNN backend failed"
args=()
[ -s "$out/pytorch_flash.json" ] && args+=(--pytorch "$out/pytorch_flash.json")
[ -s "$out/pytorch_cudnn.json" ] && args+=(--pytorch-cudnn "$out/pytorch_cudnn.json")
/tmp/gpu/bin/t0809_flash_attention --device cuda --out "$out" bench "${args[@]}" "$@"
