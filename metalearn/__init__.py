"""metalearn: meta-learned loss functions in JAX.

The public API: the bilevel heart (`inner_step`, `unroll`, `meta_loss`, `meta_grad`,
`meta_grad_over_tasks`, `meta_step`), its states, learned losses and their artifacts.
"""

from metalearn.bilevel import (
    ESTIMATORS,
    check_estimator,
    inner_step,
    meta_grad,
    meta_grad_over_tasks,
    meta_loss,
    meta_step,
    unroll,
)
from metalearn.losses import (
    apply_learned_loss,
    default_loss_net_config,
    init_learned_loss,
    learned_loss_fn,
    load_learned_loss,
    make_loss_network,
    mse,
    save_learned_loss,
    softmax_cross_entropy,
)
from metalearn.models import MLP, smooth_leaky_relu
from metalearn.optim import make_optimizer
from metalearn.state import InnerState, MetaState, init_inner_state, init_meta_state

__all__ = [
    "ESTIMATORS",
    "MLP",
    "InnerState",
    "MetaState",
    "apply_learned_loss",
    "check_estimator",
    "default_loss_net_config",
    "init_inner_state",
    "init_learned_loss",
    "init_meta_state",
    "inner_step",
    "learned_loss_fn",
    "load_learned_loss",
    "make_loss_network",
    "make_optimizer",
    "meta_grad",
    "meta_grad_over_tasks",
    "meta_loss",
    "meta_step",
    "mse",
    "save_learned_loss",
    "smooth_leaky_relu",
    "softmax_cross_entropy",
    "unroll",
]
