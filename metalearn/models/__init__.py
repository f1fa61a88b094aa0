"""Flax Linen modules: optimizees and the bodies of learned loss networks."""

from metalearn.models.mlp import MLP, SineFrequency, activation, smooth_leaky_relu

__all__ = ["MLP", "SineFrequency", "activation", "smooth_leaky_relu"]
