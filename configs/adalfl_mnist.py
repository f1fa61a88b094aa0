"""AdaLFL on MNIST, LeNet-5 by default.

The ML³ initialisation (meta.init_steps steps), then online adaptation: one
inner step on the learned loss and one meta step on the task loss, in lock-step,
for the whole run (Raymond et al., Algorithms 1-2).

    python -m experiments.run --config=configs/adalfl_mnist.py
    python -m experiments.run --config=configs/adalfl_mnist.py:resnet44   # another model
    python -m experiments.run --config=configs/adalfl_mnist.py:smoke      # about a minute

Offline, `:shared` reads the prepared tfds folder ../shared/data/tfds (or set
TFDS_DATA_DIR); `:smoke` reads real data from --config.data.data_dir, else
$TFDS_DATA_DIR, else ../shared/data/tfds.

Variants (comma-separated): a model name (lenet5, vgg16, allcnn_c, resnet8, resnet20,
resnet44, resnet56, wrn16_8, wrn28_10), `smoke`, `shared`, `subset`. Every field is
described in configs/_image.py; runtimes measured on CPU and GPU are in docs/speed.md.
"""

import ml_collections

from configs._image import image_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return image_config("adalfl", "mnist", arg)
