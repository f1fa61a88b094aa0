"""Task losses and learned loss networks."""

from metalearn.losses.learned import (
    apply_learned_loss,
    default_loss_net_config,
    init_learned_loss,
    learned_loss_fn,
    load_learned_loss,
    make_loss_network,
    save_learned_loss,
)
from metalearn.losses.task import mse, reinforce, softmax_cross_entropy

__all__ = [
    "apply_learned_loss",
    "default_loss_net_config",
    "init_learned_loss",
    "learned_loss_fn",
    "load_learned_loss",
    "make_loss_network",
    "mse",
    "reinforce",
    "save_learned_loss",
    "softmax_cross_entropy",
]
