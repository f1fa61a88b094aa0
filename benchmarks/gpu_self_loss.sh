#!/usr/bin/env bash
# The self-loss measurements for a machine with a GPU (issue 13), in one go:
#   1. the transformer step benchmark at the `gpu` size (6 layers, d = 384, context 256,
#      batch 64) and the medium one, bfloat16 and float32: CE step MFU, Phase 1 meta step
#      and Phase 2 step against the CE step;
#   2. the key variants of the sweep at the `gpu` size (1,000 Phase 1 + 3,000 Phase 2
#      steps each): the trust-gain critic frozen, refreshed and stop-gradient, the free
#      embedding critic, and the live critic with detection and return to meta-training.
# Writes under runs/gpu_self_loss/ and prints the tables the README's GPU rows come from.
# Usage: bash benchmarks/gpu_self_loss.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=runs/gpu_self_loss
mkdir -p "$root"
python -m benchmarks.transformer_step --sizes=medium,gpu --dtype=bfloat16 --steps=20 \
  | tee "$root/step_bf16.txt"
python -m benchmarks.transformer_step --sizes=gpu --dtype=float32 --steps=10 \
  | tee "$root/step_f32.txt"
python -m experiments.sweep_self_loss --suffix=gpu,shared --root="$root/sweep" \
  --override=--config.detector.window=40 \
  --variants=gain+frozen,gain+refresh,gain+same_sg,observed+frozen,gain+meta \
  | tee "$root/sweep.txt"
