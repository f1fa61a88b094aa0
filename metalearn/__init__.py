"""metalearn: meta-learned loss functions in JAX.

The public API, everything pure and jit-able:

- the bilevel heart (`metalearn.bilevel`): the inner `Problem`, the gradient
  estimators (`Unrolled`, `Truncated`, `FirstOrder`, `LastWindow`, `ES`, `PES`,
  `Implicit`, `OneStep`) and `estimator_from_config`, `inner_step`, `unroll`,
  `windowed_meta_steps`, `meta_step`, `momentum_lookahead`;
- its states: `InnerState`, `MetaState`, `init_inner_state`, `init_meta_state`;
- learned losses ℓ_φ and their portable artifacts (`init_learned_loss`,
  `learned_loss_fn`, `save_learned_loss`, `load_learned_loss`, ...) and task losses;
- optimizers from a config (`make_optimizer`, `make_schedule`, `make_lookahead`) and the MLP.

The algorithms built on them are in `metalearn.algorithms` (ml3, adalfl, self_loss).
"""

from metalearn.bilevel import (
    ES,
    ESTIMATORS,
    PES,
    Estimator,
    EstimatorState,
    FirstOrder,
    Implicit,
    LastWindow,
    OneStep,
    Problem,
    Truncated,
    Unrolled,
    check_differentiable_optimizer,
    check_estimator_name,
    check_estimator_object,
    estimator_from_config,
    inner_step,
    meta_step,
    meta_step_metrics,
    momentum_lookahead,
    unprobed,
    unroll,
    windowed_meta_steps,
)
from metalearn.losses import (
    apply_learned_loss,
    default_loss_net_config,
    init_learned_loss,
    learned_loss_fn,
    load_learned_loss,
    make_loss_network,
    mse,
    reinforce,
    save_learned_loss,
    softmax_cross_entropy,
)
from metalearn.models.mlp import MLP, smooth_leaky_relu
from metalearn.optim import make_lookahead, make_optimizer, make_schedule
from metalearn.state import InnerState, MetaState, init_inner_state, init_meta_state

__all__ = [
    "ES",
    "ESTIMATORS",
    "MLP",
    "PES",
    "Estimator",
    "EstimatorState",
    "FirstOrder",
    "Implicit",
    "InnerState",
    "LastWindow",
    "MetaState",
    "OneStep",
    "Problem",
    "Truncated",
    "Unrolled",
    "apply_learned_loss",
    "check_differentiable_optimizer",
    "check_estimator_object",
    "check_estimator_name",
    "default_loss_net_config",
    "estimator_from_config",
    "init_inner_state",
    "init_learned_loss",
    "init_meta_state",
    "inner_step",
    "learned_loss_fn",
    "load_learned_loss",
    "make_lookahead",
    "make_loss_network",
    "make_optimizer",
    "make_schedule",
    "meta_step",
    "meta_step_metrics",
    "momentum_lookahead",
    "mse",
    "reinforce",
    "save_learned_loss",
    "smooth_leaky_relu",
    "softmax_cross_entropy",
    "unprobed",
    "unroll",
    "windowed_meta_steps",
]
