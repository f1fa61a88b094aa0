#!/usr/bin/env bash
# The self-loss measurements for a machine with a GPU (issue 13), in one go:
#   1. part c of benchmarks/gpu.sh (without its time guard): the transformer step benchmark
#      at the `gpu` size (6 layers, d = 384, context 256, batch 64), bfloat16 and float32:
#      CE step MFU, Phase 1 meta step and Phase 2 step against the CE step (table in
#      runs/gpu_self_loss/bench/gpu.md);
#   2. the key variants of the sweep at the `gpu` size (1,000 Phase 1 + 3,000 Phase 2
#      steps each): the trust-gain critic frozen, refreshed and stop-gradient, the free
#      embedding critic, and the live critic with detection and return to meta-training.
# Writes under runs/gpu_self_loss/ and prints the tables the README's GPU rows come from.
# Usage: bash benchmarks/gpu_self_loss.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=runs/gpu_self_loss
mkdir -p "$root"
bash benchmarks/gpu.sh --parts=c --budget=0 --out="$root/bench"
python -m experiments.sweep_self_loss --suffix=gpu,shared --root="$root/sweep" \
  --override=--config.detector.window=40 \
  --variants=gain+frozen,gain+refresh,gain+same_sg,observed+frozen,gain+meta \
  | tee "$root/sweep.txt"
