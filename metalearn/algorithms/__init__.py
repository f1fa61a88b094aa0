"""Algorithms, each a thin composition of the bilevel heart. `make(config)` picks one."""

import ml_collections

from metalearn.algorithms.ml3_shaped_sine import ShapedSine
from metalearn.algorithms.ml3_sine import SineRegression

EXPERIMENTS = {
    ("ml3", "sine"): SineRegression,
    ("ml3", "shaped_sine"): ShapedSine,
}


def make(config: ml_collections.ConfigDict):
    """The experiment named by `config.algorithm` and `config.task`."""
    key = (config.algorithm, config.task)
    if key not in EXPERIMENTS:
        known = ", ".join(f"{a}/{t}" for a, t in EXPERIMENTS)
        raise ValueError(
            f"No experiment for algorithm={key[0]!r}, task={key[1]!r}; known: {known}."
        )
    return EXPERIMENTS[key](config)


__all__ = ["EXPERIMENTS", "ShapedSine", "SineRegression", "make"]
