"""Algorithms, each a thin composition of the bilevel heart. `make(config)` picks one."""

import ml_collections

from metalearn.algorithms.image_classification import ImageClassification
from metalearn.algorithms.ml3_inverse_dynamics import InverseDynamics
from metalearn.algorithms.ml3_mbrl import ModelBasedRL
from metalearn.algorithms.ml3_mnist_binary import MnistBinary
from metalearn.algorithms.ml3_mountain_car import MountainCar
from metalearn.algorithms.ml3_reacher_demos import ReacherDemos
from metalearn.algorithms.ml3_shaped_sine import ShapedSine
from metalearn.algorithms.ml3_sine import SineRegression
from metalearn.algorithms.self_loss_lm import SelfLossLM

EXPERIMENTS = {
    ("ml3", "sine"): SineRegression,
    ("ml3", "shaped_sine"): ShapedSine,
    ("ml3", "mnist_binary"): MnistBinary,
    ("ml3", "reacher_demos"): ReacherDemos,
    ("ml3", "inverse_dynamics"): InverseDynamics,
    ("ml3", "mbrl"): ModelBasedRL,
    ("ml3", "mountain_car"): MountainCar,
    ("baseline", "image_classification"): ImageClassification,
    ("ml3", "image_classification"): ImageClassification,
    ("adalfl", "image_classification"): ImageClassification,
    ("self_loss", "lm"): SelfLossLM,
}


def make(config: ml_collections.ConfigDict, **kwargs):
    """The experiment named by `config.algorithm` and `config.task`.

    Keyword arguments go to the experiment (e.g. `mesh=` for image classification).
    """
    key = (config.algorithm, config.task)
    if key not in EXPERIMENTS:
        known = ", ".join(f"{a}/{t}" for a, t in EXPERIMENTS)
        raise ValueError(
            f"No experiment for algorithm={key[0]!r}, task={key[1]!r}; known: {known}."
        )
    return EXPERIMENTS[key](config, **kwargs)


__all__ = [
    "EXPERIMENTS",
    "ImageClassification",
    "InverseDynamics",
    "MnistBinary",
    "MountainCar",
    "ModelBasedRL",
    "ReacherDemos",
    "SelfLossLM",
    "ShapedSine",
    "SineRegression",
    "make",
]
