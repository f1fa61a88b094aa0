"""Stochastic policies for policy-gradient learning: a diagonal Gaussian over actions.

`GaussianPolicy` maps an observation to the mean (tanh of an MLP's output, inside the
action box [-1, 1]) and a state-independent log standard deviation (a parameter). The
action an environment receives is a sample clipped to the box; log-probabilities are of
the unclipped sample (`sample` returns both).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metalearn.models.mlp import MLP
from metalearn.types import Array, Params, PRNGKey


class GaussianPolicy(nn.Module):
    """π_θ(a | s) = N(tanh(MLP_θ(s)), diag(exp(log_std)²)).

    Attributes:
      hidden: hidden widths of the mean's MLP.
      action_dim: the action dimension.
      activation: hidden activation.
      init_log_std: the initial log standard deviation of every action dimension.
    """

    hidden: Sequence[int]
    action_dim: int
    activation: str = "tanh"
    init_log_std: float = -0.5

    @nn.compact
    def __call__(self, obs: Array) -> tuple[Array, Array]:
        mean = MLP((*self.hidden, self.action_dim), self.activation, output_activation="tanh")(obs)
        log_std = self.param(
            "log_std", nn.initializers.constant(self.init_log_std), (self.action_dim,)
        )
        return mean, jnp.broadcast_to(log_std, mean.shape)


def gaussian_log_prob(mean: Array, log_std: Array, action: Array) -> Array:
    """log N(action; mean, exp(log_std)²), summed over the last axis."""
    z = (action - mean) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


def log_prob(module: GaussianPolicy, params: Params, obs: Array, action: Array) -> Array:
    """log π_θ(action | obs) for batches [..., O] and [..., A] -> [...]."""
    mean, log_std = module.apply(params, obs)
    return gaussian_log_prob(mean, log_std, action)


def sample(
    module: GaussianPolicy, params: Params, obs: Array, key: PRNGKey, noise_scale: Array = 1.0
) -> Array:
    """An unclipped sample a ~ π_θ(· | obs) (clip it to [-1, 1] for the environment).

    `noise_scale` multiplies the standard deviation: 0 gives the mean action.
    """
    mean, log_std = module.apply(params, obs)
    return mean + noise_scale * jnp.exp(log_std) * jax.random.normal(key, mean.shape)


def mean_action(module: GaussianPolicy, params: Params, obs: Array) -> Array:
    """The deterministic action tanh(MLP_θ(obs)) (evaluation)."""
    return module.apply(params, obs)[0]
