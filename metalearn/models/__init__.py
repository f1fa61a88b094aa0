"""Flax Linen modules: optimizees and the bodies of learned loss networks.

Submodules: `mlp`, `vision` (re-exported here), `transformer` (the self-loss LM),
`inertia` (a DeLaN inertia matrix), `ensemble` (ensemble dynamics models), `policy`
(Gaussian policies for policy-gradient learning).
"""

from metalearn.models.mlp import MLP, SineFrequency, activation, smooth_leaky_relu
from metalearn.models.vision import MODELS, apply_model, init_model, make_model

__all__ = ["MLP", "SineFrequency", "activation", "smooth_leaky_relu"]
__all__ += ["MODELS", "apply_model", "init_model", "make_model"]
