"""Task samplers and data sources."""

from metalearn.tasks.images import (
    AUGMENTATIONS,
    DATASETS,
    DatasetInfo,
    ImageData,
    batch_indices,
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
    "eval_batches",
    "host_batches",
    "load_images",
    "prefetch_to_device",
    "preprocess",
    "sample_frequency_tasks",
    "sample_sine_tasks",
]
