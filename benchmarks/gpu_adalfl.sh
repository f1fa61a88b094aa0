#!/usr/bin/env bash
# The AdaLFL reproduction at the paper's budgets, for a machine with a GPU (one H200 ran
# 9 LeNet-5 jobs at once in about 4 minutes before). Writes under runs/gpu_adalfl/ and
# prints the tables the README's GPU rows come from:
#   1. MNIST and Fashion-MNIST, LeNet-5, the paper's protocol (plain SGD, lr 0.01,
#      S_init = 2,500, 10,000 model steps), seeds 0-4, with the strongest cross-entropy
#      baseline (Nesterov + weight decay, best learning rate on validation);
#   2. the CIFAR-10 subset (real images, 4,000 train / 1,000 test) with VGG-16 and
#      ResNet-20, the paper's CIFAR protocol (Nesterov 0.9, weight decay 5e-4, lr 0.01),
#      shortened to 10,000 model steps, seeds 0-2;
# and first, in a few minutes, parts a and b of benchmarks/gpu.sh (without its time guard):
# the step rate of LeNet-5 and ResNet-20 (baseline, AdaLFL) through the experiment's
# train_chunk with host batches and with device-resident data, and the AdaLFL / baseline
# step-time ratio of every image model with a profile of the worst (table in
# runs/gpu_adalfl-bench/gpu.md).
# Usage: bash benchmarks/gpu_adalfl.sh [jobs at once, default 8]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${1:-8}
root=runs/gpu_adalfl
mkdir -p runs
bash benchmarks/gpu.sh --parts=a,b --budget=0 --out="$root-bench"
python -m experiments.reproduce_images --datasets=mnist,fashion_mnist --seeds=0,1,2,3,4 \
  --steps=10000 --init_steps=2500 --eval_every=500 --data_dir=../shared/data/tfds \
  --ce_search=0.01,0.03,0.1 --jobs="$jobs" --root="$root/lenet5" | tee "$root-lenet5.txt"
for model in vgg16 resnet20; do
  python -m experiments.reproduce_images --datasets=cifar10 --variant=subset --model="$model" \
    --seeds=0,1,2 --steps=10000 --init_steps=2500 --eval_every=500 \
    --override=--config.inner.optimizer.schedule.name=constant \
    --ce_search=0.01,0.03,0.1 --jobs="$jobs" --root="$root/$model" | tee "$root-$model.txt"
done
