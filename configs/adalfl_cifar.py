"""AdaLFL on CIFAR-10, VGG-16 with batch norm by default.

The ML³ initialisation (meta.init_steps steps), then online adaptation: one
inner step on the learned loss and one meta step on the task loss, in lock-step,
for the whole run (Raymond et al., Algorithms 1-2).

    python -m experiments.run --config=configs/adalfl_cifar.py
    python -m experiments.run --config=configs/adalfl_cifar.py:resnet44   # another model
    python -m experiments.run --config=configs/adalfl_cifar.py:cpu        # 12 min on a CPU
    python -m experiments.run --config=configs/adalfl_cifar.py:smoke      # a minute on a CPU

Offline (no CIFAR-10 prepared for tfds), `:subset` reads the real 5,000-image
subset in ../shared/data/raw/cifar10_subset (4,000 train, 1,000 test); `:cpu` is that
subset with LeNet-5, 500 offline steps and 3,000 model steps (configs/_image.py's
`CPU_BUDGET`), a real result a CPU finishes.

Expected times. CPU: this project's 2-core machine, under a load of about 4 from other
jobs; GPU: one H200. "Estimate" marks a figure extrapolated from a measured step rate.

- default (VGG-16, 2,500 offline + 150,000 model steps; downloads CIFAR-10 first):
  CPU estimate about 5 months (one offline step of the `:subset` run took 88 s, after
  3 min 07 s to compile and run the first; every step costs as much). GPU estimate
  about 17 min of step time (6.66 ms per AdaLFL step, docs/speed.md's
  `benchmarks.image_step` table) plus compilation and 61 evaluations; not measured
  end to end.
- `:subset` (the same run on the 5,000-image subset): as the default, on both.
- `:resnet44`: CPU not measured (months); GPU estimate about 51 min of step time
  (19.9 ms per step in the same table); not measured end to end.
- `:cpu` (LeNet-5 on the subset, 500 + 3,000 steps): CPU measured 12 min wall
  (32 s to compile and run the first step, then 5.2-6.0 steps/s), test error 44.6 %
  (chance 90 %; cross-entropy under the same budget, `baseline_cifar.py:cpu`: 42.5 % in
  3 min 47 s. One seed; under momentum AdaLFL does not beat cross-entropy, see
  docs/known_problems.md); GPU not measured.
- `:smoke` (ResNet-8 on the subset, 20 + 40 steps): CPU measured 48 s wall; GPU not
  measured.

Every run prints progress from its first second (what it compiles, then steps, steps/s
and ETA, and the phase: offline ML³ or AdaLFL). Ctrl-C stops it and says where the last
checkpoint is; the same command resumes from it.

Variants (comma-separated): a model name (lenet5, vgg16, allcnn_c, resnet8, resnet20,
resnet44, resnet56, wrn16_8, wrn28_10), `smoke`, `shared`, `subset`, `cpu`. Every field
is described in configs/_image.py.
"""

import ml_collections

from configs._image import image_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return image_config("adalfl", "cifar10", arg)
