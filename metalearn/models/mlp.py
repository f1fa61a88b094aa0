"""Small Flax modules: the configurable MLP and the one-parameter sine model.

The MLP serves both as an optimizee (sine regression) and as the body of every
learned loss network ℓ_φ. Initialisation is a named choice because reproductions need
the exact scheme of the code they compare against (PyTorch's default `nn.Linear` init
differs from Xavier, and ML³'s public code uses both).
"""

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from metalearn.types import Array


def smooth_leaky_relu(x: Array, beta: float = 1.0, gamma: float = 0.01) -> Array:
    """AdaLFL's smooth leaky ReLU: softplus_β(x)·(1 − γ) + γ·x.

    Smooth (C¹) like softplus and unbounded like leaky ReLU, so a loss built from it has
    no flat regions at large errors. β sets the smoothness, γ the leak.
    """
    return jax.nn.softplus(beta * x) / beta * (1.0 - gamma) + gamma * x


def activation(name: str, beta: float = 1.0, gamma: float = 0.01) -> Callable[[Array], Array]:
    """Returns the element-wise activation called `name` (β, γ: smooth leaky ReLU's).

    Names: relu, elu, tanh, softplus, smooth_leaky_relu, identity; others raise a
    ValueError listing them.
    """
    table = {
        "relu": jax.nn.relu,
        "elu": jax.nn.elu,
        "tanh": jnp.tanh,
        "softplus": jax.nn.softplus,
        "smooth_leaky_relu": functools.partial(smooth_leaky_relu, beta=beta, gamma=gamma),
        "identity": lambda x: x,
    }
    if name not in table:
        raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(table)}.")
    return table[name]


def _torch_bias_init(fan_in: int):
    bound = 1.0 / fan_in**0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


def dense_initializers(name: str, fan_in: int, bias_value: float = 0.0):
    """(kernel_init, bias_init) for a named scheme.

    Schemes: ``xavier_uniform``, ``lecun_normal``, ``he_normal`` (biases = `bias_value`),
    and ``torch_default`` (PyTorch's `nn.Linear`: U(±1/√fan_in) for weights and biases).
    """
    kernels = {
        "xavier_uniform": nn.initializers.xavier_uniform(),
        "lecun_normal": nn.initializers.lecun_normal(),
        "he_normal": nn.initializers.he_normal(),
        "torch_default": nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
    }
    if name not in kernels:
        raise ValueError(f"Unknown initialisation {name!r}; choose one of {sorted(kernels)}.")
    if name == "torch_default":
        return kernels[name], _torch_bias_init(fan_in)
    return kernels[name], nn.initializers.constant(bias_value)


class MLP(nn.Module):
    """A multilayer perceptron over the last axis: x [..., D] -> [..., features[-1]].

    Attributes:
      features: widths of every layer, the output layer last.
      activation: hidden activation name (see `activation`).
      output_activation: activation applied to the output layer.
      use_bias: whether layers have biases.
      initializer: initialisation scheme name (see `dense_initializers`).
      bias_init: constant bias initial value (schemes other than ``torch_default``).
      beta, gamma: smooth leaky ReLU parameters.
    """

    features: Sequence[int]
    activation: str = "relu"
    output_activation: str = "identity"
    use_bias: bool = True
    initializer: str = "lecun_normal"
    bias_init: float = 0.0
    beta: float = 1.0
    gamma: float = 0.01

    @nn.compact
    def __call__(self, x: Array) -> Array:
        hidden = activation(self.activation, self.beta, self.gamma)
        out = activation(self.output_activation, self.beta, self.gamma)
        for i, width in enumerate(self.features):
            kernel_init, bias_init = dense_initializers(
                self.initializer, x.shape[-1], self.bias_init
            )
            x = nn.Dense(
                width, use_bias=self.use_bias, kernel_init=kernel_init, bias_init=bias_init
            )(x)
            x = hidden(x) if i < len(self.features) - 1 else out(x)
        return x


class SineFrequency(nn.Module):
    """f_ω(x) = sin(ω·x) with a single learnable frequency ω (ML³'s shaping toy)."""

    init_freq: float = 0.1

    @nn.compact
    def __call__(self, x: Array) -> Array:
        freq = self.param("freq", nn.initializers.constant(self.init_freq), ())
        return jnp.sin(freq * x)
