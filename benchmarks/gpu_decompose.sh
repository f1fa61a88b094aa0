#!/usr/bin/env bash
# Schedule or shape (docs/adalfl.md), for a machine with a GPU: every row of
# experiments/reproduce_decomposition.py at the paper's full budget (S_init = 2,500, 10,000
# model steps), seeds 0-4, on
#   1. Fashion-MNIST and MNIST, LeNet-5;
#   2. the CIFAR-10 subset (real images, 4,000 train / 1,000 test) with VGG-16 and
#      ResNet-20, the paper's CIFAR models.
# Writes under runs/gpu_decompose/ (a rerun reuses finished jobs and resumes the rest)
# and prints one table per dataset and model, the rows of the docs page.
# Usage: bash benchmarks/gpu_decompose.sh [jobs at once, default 8]
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${1:-8}
root=runs/gpu_decompose
mkdir -p runs
python -m experiments.reproduce_decomposition --datasets=fashion_mnist,mnist \
  --data_dir=../shared/data/tfds --jobs="$jobs" --root="$root/lenet5" | tee "$root-lenet5.txt"
for model in vgg16 resnet20; do
  python -m experiments.reproduce_decomposition --datasets=cifar10 --variant=subset --model="$model" \
    --jobs="$jobs" --root="$root/$model" | tee "$root-$model.txt"
done
