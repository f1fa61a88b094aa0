"""Task samplers, data sources and environments.

Submodules: `sine` (sine tasks), `images` and `prepared` (tfds image data), `digit_pairs`
(binary MNIST tasks), `text` (byte tokens), `dynamics` (arms, point mass, mountain car),
`trajectories` (arm trajectories), `control` (rollouts, iLQR, expert demonstrations,
mountain-car losses), `replay` (replay buffers), `goal_envs` (brax's reacher and ant on
MuJoCo MJX as goal-reaching tasks; imports brax). The image and sine samplers are
re-exported here; import the others from their modules.
"""

from metalearn.tasks.images import (
    AUGMENTATIONS,
    DATASETS,
    DatasetInfo,
    ImageData,
    batch_indices,
    choose_on_device,
    device_batch_indices,
    eval_batches,
    host_batches,
    load_images,
    prefetch_to_device,
    preprocess,
)
from metalearn.tasks.sine import sample_frequency_tasks, sample_sine_tasks

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "DatasetInfo",
    "ImageData",
    "batch_indices",
    "choose_on_device",
    "device_batch_indices",
    "eval_batches",
    "host_batches",
    "load_images",
    "prefetch_to_device",
    "preprocess",
    "sample_frequency_tasks",
    "sample_sine_tasks",
]
