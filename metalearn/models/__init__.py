"""Flax Linen modules: optimizees and the bodies of learned loss networks."""

from metalearn.models.mlp import MLP, SineFrequency, activation, smooth_leaky_relu
from metalearn.models.vision import MODELS, apply_model, init_model, make_model

__all__ = ["MLP", "SineFrequency", "activation", "smooth_leaky_relu"]
__all__ += ["MODELS", "apply_model", "init_model", "make_model"]
