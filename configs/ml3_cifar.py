"""ML³ on CIFAR-10, VGG-16 with batch norm by default.

An offline learned loss: S_init = meta.init_steps ML³ steps, each from a fresh
model with one inner step, then a full training run with the loss frozen.

    python -m experiments.run --config=configs/ml3_cifar.py
    python -m experiments.run --config=configs/ml3_cifar.py:resnet44   # another model
    python -m experiments.run --config=configs/ml3_cifar.py:cpu        # minutes on a CPU
    python -m experiments.run --config=configs/ml3_cifar.py:smoke      # about a minute

Offline (no CIFAR-10 prepared for tfds), `:subset` reads the real 5,000-image
subset in ../shared/data/raw/cifar10_subset (4,000 train, 1,000 test).

`:cpu` (LeNet-5 on the subset, 500 offline + 3,000 model steps, as
`adalfl_cifar.py:cpu`): not measured; estimate under that run's 12 min on the project's
2-core CPU (the same offline phase, cheaper model steps on the frozen loss); GPU not
measured. The other variants' times: see configs/adalfl_cifar.py.

Variants (comma-separated): a model name (lenet5, vgg16, allcnn_c, resnet8, resnet20,
resnet44, resnet56, wrn16_8, wrn28_10), `smoke`, `shared`, `subset`, `cpu`. Every field
is described in configs/_image.py; runtimes measured on CPU and GPU are in docs/speed.md.
"""

import ml_collections

from configs._image import image_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return image_config("ml3", "cifar10", arg)
