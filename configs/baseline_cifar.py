"""Baseline on CIFAR-10, VGG-16 with batch norm by default.

Cross-entropy with the optimizer, schedule and budget of the ML³ and AdaLFL
configs beside it: the control.

    python -m experiments.run --config=configs/baseline_cifar.py
    python -m experiments.run --config=configs/baseline_cifar.py:resnet44   # another model
    python -m experiments.run --config=configs/baseline_cifar.py:cpu        # minutes on a CPU
    python -m experiments.run --config=configs/baseline_cifar.py:smoke      # about a minute

Offline (no CIFAR-10 prepared for tfds), `:subset` reads the real 5,000-image
subset in ../shared/data/raw/cifar10_subset (4,000 train, 1,000 test).

`:cpu` (LeNet-5 on the subset, 3,000 steps, as `adalfl_cifar.py:cpu`): measured 3 min 47 s
on the project's 2-core CPU under a load of about 4, test error 42.5 %; GPU not measured.
The other variants' times: see configs/adalfl_cifar.py (this baseline's step is cheaper,
0.4× AdaLFL's for VGG-16 on an H200: 2.71 against 6.66 ms).

Variants (comma-separated): a model name (lenet5, vgg16, allcnn_c, resnet8, resnet20,
resnet44, resnet56, wrn16_8, wrn28_10), `smoke`, `shared`, `subset`, `cpu`. Every field
is described in configs/_image.py; runtimes measured on CPU and GPU are in docs/speed.md.
"""

import ml_collections

from configs._image import image_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return image_config("baseline", "cifar10", arg)
