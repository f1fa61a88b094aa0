"""The impure edge: the experiment protocol, run loop, logging, checkpoints and progress."""

from metalearn.runtime.experiment import Experiment, ML3Experiment, scan_steps
from metalearn.runtime.loop import (
    DivergenceError,
    Interrupted,
    NonFiniteError,
    train_and_evaluate,
)

__all__ = [
    "DivergenceError",
    "Experiment",
    "Interrupted",
    "ML3Experiment",
    "NonFiniteError",
    "scan_steps",
    "train_and_evaluate",
]
