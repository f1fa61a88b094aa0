#!/usr/bin/env bash
# Every GPU figure the project lacks, in one run of at most --budget seconds (default 600:
# ten minutes on one H100), as one markdown table on stdout and in OUT/gpu.md (issue 29):
#   a. image steps/s through the experiment's train_chunk, host-fed vs device-resident
#      data, batch 128: LeNet-5 and ResNet-20, baseline and AdaLFL (benchmarks/image_loop.py);
#   b. the AdaLFL / baseline step-time ratio of the 8 image models, batch 128
#      (benchmarks/image_step.py), then a profile of the worst: XLA's cost analysis and a
#      jax.profiler trace (OUT/b_profile/, for ui.perfetto.dev) with its costliest ops;
#   c. the self-loss transformer's steps at the `gpu` size, bfloat16 and float32: MFU,
#      ms/step, peak memory (benchmarks/transformer_step.py);
#   d. AntGoal env steps/s at batch 1,024 and 4,096 (benchmarks/goal_envs.py);
#   e. in the time left, AntGoal ML³ vs PPO at full scale (configs/ml3_mfrl_ant.py), run
#      in OUT/e_run: cut by the time guard it checkpoints, and re-running this script on
#      the same OUT (or `python -m experiments.run` on that workdir) resumes it.
# Each part runs under its own time limit (the smaller of its cap and the time left); one
# that fails or runs out of time gets a FAILED / TIMEOUT row with the tail of its log
# (OUT/<part>.log) and the run goes on. The rows measured before a time-out are kept.
#
# Usage: bash benchmarks/gpu.sh [--dry] [--out=DIR] [--budget=SECONDS] [--parts=a,b,c,d,e]
#   --dry      every part at a tiny size, a few steps, most XLA optimisations off: checks
#              the whole path on a CPU in about a minute (tests/benchmarks/test_gpu_script.py)
#   --out      results folder (default $OUT if set, else runs/gpu); its part files are
#              replaced, e_run/ is kept so that part e resumes
#   --budget   seconds for the whole run (0: no limits at all, e.g. to finish part e)
#   --parts    which parts to run (the others get a NOT RUN row)
# $PYTHON picks the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
out=${OUT:-runs/gpu}
budget=600
parts=a,b,c,d,e
for arg in "$@"; do
  case $arg in
    --dry) dry=1 ;;
    --out=*) out=${arg#*=} ;;
    --budget=*) budget=${arg#*=} ;;
    --parts=*) parts=${arg#*=} ;;
    *) echo "gpu.sh: unknown argument $arg (see the usage at the top of the script)" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-python}
mkdir -p "$out"
rm -rf "$out"/*.status "$out"/*.log "$out"/*.jsonl "$out"/gpu.md "$out"/device.txt "$out"/b_profile

if (( dry )); then
  # Compiling is most of a tiny run's time: most optimisations off, and XLA:CPU's older
  # emitters, which compile faster (as the tests do, tests/conftest.py).
  export JAX_DISABLE_MOST_OPTIMIZATIONS=1
  [[ "${XLA_FLAGS:-}" == *xla_cpu_use_fusion_emitters* ]] ||
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_cpu_use_fusion_emitters=false"
  a_args=(--models=lenet5 --algorithms=baseline --batch_size=8 --chunk=2 --chunks=1 --examples=64)
  b_args=(--models=lenet5 --batch_size=8 --steps=2 --profile_steps=2)
  c_args=(--sizes=small --kinds=ce --steps=1 --warmup=0)
  d_args=(--batch=2 --steps=2 --repeats=1)
  e_config=configs/ml3_mfrl_ant.py:smoke
  declare -A cap=([a]=90 [b]=90 [b-profile]=60 [c-bf16]=60 [c-f32]=60 [d]=90 [e]=10)
else
  a_args=(--models=lenet5,resnet20 --algorithms=baseline,adalfl --batch_size=128 --chunk=100
    --chunks=3 --examples=8192)
  b_args=(--batch_size=128 --steps=10 --profile_steps=5)
  c_args=(--sizes=gpu --steps=10 --warmup=2)
  d_args=(--batch=1024,4096 --steps=100 --repeats=3)
  e_config=configs/ml3_mfrl_ant.py
  # Caps sum to 525 s; part e gets whatever the others leave of the budget.
  declare -A cap=([a]=110 [b]=180 [b-profile]=50 [c-bf16]=70 [c-f32]=55 [d]=60 [e]=100000)
fi

start=$(date +%s)
# A part that ignores SIGTERM (XLA compiling holds the interpreter) is killed this long
# after it; the reserve keeps that and the table within the budget.
grace=$(( dry ? 2 : 10 ))
reserve=$(( grace + 5 ))
{
  echo "dry $dry"
  echo "budget_s $budget"
  echo "parts $parts"
  echo "e_config $e_config"
  echo "started $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$out/settings.txt"

# run_part ID COMMAND...: runs COMMAND with its output in OUT/ID.log under the part's time
# limit and writes OUT/ID.status ("rc seconds limit_s", or "skipped why"); never fails.
run_part() {
  local id=$1 limit rc=0 t0
  shift
  [[ ",$parts," == *",${id%%-*},"* ]] || return 0
  if (( budget > 0 )); then
    limit=$(( start + budget - reserve - $(date +%s) ))
    (( limit < ${cap[$id]} )) || limit=${cap[$id]}
    if (( limit < 10 )); then
      echo "skipped only ${limit} s of the ${budget} s budget were left" >"$out/$id.status"
      echo "[$id] skipped: no time left"
      return 0
    fi
  else
    limit=0  # timeout 0: no limit
  fi
  echo "[$id] running ($( (( limit )) && echo "limit $limit s" || echo "no limit")): $*"
  t0=$(date +%s)
  # The group's stderr dropped: bash's own "Killed" notice for a killed part is noise here.
  { timeout --kill-after="$grace" "$limit" "$@" >"$out/$id.log" 2>&1; } 2>/dev/null || rc=$?
  echo "$rc $(( $(date +%s) - t0 )) $limit" >"$out/$id.status"
  echo "[$id] exit $rc after $(( $(date +%s) - t0 )) s"
}

# The device, before anything else: nvidia-smi where there is one, and what JAX sees.
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    >>"$out/device.txt" 2>&1 || echo "nvidia-smi failed" >>"$out/device.txt"
  nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || true
else
  echo "no nvidia-smi" >>"$out/device.txt"
fi
timeout 120 "$py" -c 'import jax; print(f"jax {jax.__version__}: {jax.devices()}")' \
  >>"$out/device.txt" 2>&1 || echo "JAX failed to list its devices (see above)" >>"$out/device.txt"
cat "$out/device.txt"

run_part a "$py" -m benchmarks.image_loop "${a_args[@]}" --paths=host,device --json="$out/a.jsonl"
run_part b "$py" -m benchmarks.image_step "${b_args[@]}" --skip_backprop --json="$out/b.jsonl"
if [[ -s "$out/b.jsonl" ]]; then
  run_part b-profile "$py" -m benchmarks.image_step "${b_args[@]}" --rows_from="$out/b.jsonl" \
    --profile="$out/b_profile" --json="$out/b-profile.jsonl"
elif [[ ",$parts," == *,b,* ]]; then
  echo "skipped part b measured no model to profile" >"$out/b-profile.status"
fi
run_part c-bf16 "$py" -m benchmarks.transformer_step "${c_args[@]}" --dtype=bfloat16 \
  --json="$out/c-bf16.jsonl"
run_part c-f32 "$py" -m benchmarks.transformer_step "${c_args[@]}" --dtype=float32 \
  --json="$out/c-f32.jsonl"
run_part d "$py" -m benchmarks.goal_envs --envs=ant "${d_args[@]}" --json="$out/d.jsonl"
run_part e "$py" -m experiments.run --config="$e_config" --workdir="$out/e_run"

"$py" -m benchmarks.gpu_table "$out"
echo "whole run: $(( $(date +%s) - start )) s; table in $out/gpu.md"
