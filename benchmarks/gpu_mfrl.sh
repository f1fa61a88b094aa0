#!/usr/bin/env bash
# ML³ model-free RL on a machine with a GPU: the goal environments' env steps/s at GPU batch
# sizes, then AntGoal at full scale (configs/ml3_mfrl_ant.py: 3 seeds, 10 held-out goals,
# brax's PPO on the same goals and budget). Writes under runs/gpu_mfrl/ and prints the
# tables the README's GPU rows come from.
# Usage: bash benchmarks/gpu_mfrl.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=runs/gpu_mfrl
mkdir -p "$root"
python -m benchmarks.goal_envs --batch=256,1024,4096 --steps=100 | tee "$root/env_steps.txt"
python -m experiments.run --config=configs/ml3_mfrl_ant.py --workdir="$root/ant" \
  | tee "$root/ant.txt"
