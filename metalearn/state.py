"""Immutable states carried by the bilevel loop.

`InnerState` is what an inner optimizer evolves (θ, its optimizer state and any
non-trainable model state); `MetaState` is what the outer loop evolves (φ and its
optimizer state). Both are `flax.struct` dataclasses, so they are pytrees that jit, vmap,
scan and orbax handle directly.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from metalearn.types import MetaParams, ModelState, Params


@flax.struct.dataclass
class InnerState:
    """The optimizee: parameters θ, inner optimizer state, model state, step count."""

    params: Params
    opt_state: optax.OptState
    model_state: ModelState
    step: jax.Array


@flax.struct.dataclass
class MetaState:
    """The meta-learner: parameters φ, outer optimizer state, meta step count."""

    params: MetaParams
    opt_state: optax.OptState
    step: jax.Array


def init_inner_state(
    params: Params, optimizer: optax.GradientTransformation, model_state: Any = None
) -> InnerState:
    """Returns a fresh `InnerState` for `params` under `optimizer`.

    Args:
      params: initial parameters θ₀ (any pytree of arrays).
      optimizer: the inner optax optimizer.
      model_state: non-trainable collections (e.g. batch statistics); `{}` if None.

    Returns:
      `InnerState(params, optimizer.init(params), model_state, step=0)`, step an int32
      scalar. Stack several with `jax.vmap(lambda p: init_inner_state(p, opt))(params_T)`.
    """
    return InnerState(
        params=params,
        opt_state=optimizer.init(params),
        model_state={} if model_state is None else model_state,
        step=jnp.zeros((), jnp.int32),
    )


def init_meta_state(params: MetaParams, optimizer: optax.GradientTransformation) -> MetaState:
    """Returns a fresh `MetaState` for meta-parameters φ under the outer optimizer.

    Args:
      params: φ, e.g. `init_learned_loss(...)`'s loss-network parameters.
      optimizer: the outer (meta) optax optimizer.

    Returns:
      `MetaState(params, optimizer.init(params), step=0)`, step an int32 scalar.
    """
    return MetaState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))
