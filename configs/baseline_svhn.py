"""Baseline on SVHN (cropped digits), All-CNN-C by default.

Cross-entropy with the optimizer, schedule and budget of the ML³ and AdaLFL
configs beside it: the control.

    python -m experiments.run --config=configs/baseline_svhn.py
    python -m experiments.run --config=configs/baseline_svhn.py:resnet44   # another model
    python -m experiments.run --config=configs/baseline_svhn.py:smoke      # about a minute

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
    return image_config("baseline", "svhn_cropped", arg)
