#!/usr/bin/env bash
# The PyTorch twin's training tokens/s at the CS336 shape (scripts/cs336_config.json), on the GPU
# host, as a gpu-run.sh step next to ours:  "sh scripts/twin_train_bench.sh DTYPE BATCH [STEPS]"
set -euo pipefail
cd "$(dirname "$0")/.."
dt=${1:-bf16}; b=${2:-64}; steps=${3:-10}
python3 scripts/pytorch_twin.py train-bench --config scripts/cs336_config.json --batch "$b" --steps "$steps" --warmup 3 --dtype "$dt" --device cuda
