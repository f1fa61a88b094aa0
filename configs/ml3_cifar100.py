"""ML³ on CIFAR-100, WRN-28-10 by default.

An offline learned loss: S_init = meta.init_steps ML³ steps, each from a fresh
model with one inner step, then a full training run with the loss frozen.

    python -m experiments.run --config=configs/ml3_cifar100.py
    python -m experiments.run --config=configs/ml3_cifar100.py:resnet44   # another model
    python -m experiments.run --config=configs/ml3_cifar100.py:smoke      # about a minute

Offline, set TFDS_DATA_DIR (or --config.data.data_dir) to a prepared tfds folder.
`:smoke` uses synthetic data (random pixels; `:smoke,shared` reads real data from
../shared/data/tfds instead): it checks the pipeline, not accuracy.

Variants (comma-separated): a model name (lenet5, vgg16, allcnn_c, resnet8, resnet20,
resnet44, resnet56, wrn16_8, wrn28_10), `smoke`, `shared`, `subset`. Every field is
described in configs/_image.py; runtimes measured on CPU and GPU are in docs/speed.md.
"""

import ml_collections

from configs._image import image_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return image_config("ml3", "cifar100", arg)
