"""One inner step, a scanned unroll of K of them, and one outer step of φ."""

import functools

import jax
import optax

from metalearn.state import InnerState, MetaState
from metalearn.types import (
    Batch,
    InnerLossFn,
    MetaParams,
    Metrics,
    PRNGKey,
)


def inner_step(
    state: InnerState,
    meta_params: MetaParams,
    batch: Batch,
    key: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    optimizer: optax.GradientTransformation,
    first_order: bool = False,
) -> tuple[InnerState, Metrics]:
    """One optax step of θ on the inner objective.

    Args:
      state: the inner state (θ, optimizer state, model state, step).
      meta_params: φ, held fixed here but differentiable through.
      batch: the inner batch (no step axis).
      key: PRNG key for this step (dropout and the like).
      inner_loss: `(params, model_state, meta_params, batch, key) -> (loss, (model_state,
        metrics))`.
      optimizer: any optax transformation (SGD, momentum, Adam with `eps_root > 0`, ...).
      first_order: evaluate the gradient at stop_gradient(θ) (the first-order estimator).

    Returns:
      The next inner state (step + 1) and scalar metrics: `inner/loss` plus whatever the
      loss reports.
    """
    params = jax.lax.stop_gradient(state.params) if first_order else state.params
    (loss, (model_state, metrics)), grads = jax.value_and_grad(inner_loss, has_aux=True)(
        params, state.model_state, meta_params, batch, key
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = InnerState(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        model_state=model_state,
        step=state.step + 1,
    )
    return new_state, {"inner/loss": loss, **metrics}


def unroll(
    state: InnerState,
    meta_params: MetaParams,
    batches: Batch,
    keys: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    optimizer: optax.GradientTransformation,
    first_order: bool = False,
    remat: bool = False,
) -> tuple[InnerState, Metrics]:
    """K inner steps as one `lax.scan`; compile time does not grow with K.

    Args:
      state: the starting inner state.
      meta_params: φ.
      batches: a pytree whose leaves have a leading axis of length K (one batch a step).
      keys: K PRNG keys, shape [K] (typed) or [K, 2].
      inner_loss, optimizer, first_order: as in `inner_step`.
      remat: rematerialise each step on the backward pass (`jax.checkpoint`), so memory
        for the meta-gradient stays O(1) in K instead of O(K) activations.

    Returns:
      The final inner state and per-step metrics, each with a leading axis of length K.
    """
    step_fn = functools.partial(
        inner_step, inner_loss=inner_loss, optimizer=optimizer, first_order=first_order
    )

    def body(carry: InnerState, xs: tuple[Batch, PRNGKey]) -> tuple[InnerState, Metrics]:
        batch, key = xs
        return step_fn(carry, meta_params, batch, key)

    if remat:
        body = jax.checkpoint(body)
    return jax.lax.scan(body, state, (batches, keys))


def _num_steps(keys: PRNGKey) -> int:
    return jax.tree.leaves(keys)[0].shape[0]


def meta_step(
    meta_state: MetaState,
    grads: MetaParams,
    *,
    meta_optimizer: optax.GradientTransformation,
) -> MetaState:
    """Applies one outer optimizer step to φ given its meta-gradient.

    Args:
      meta_state: φ, its optimizer state and step count.
      grads: ∇_φ, shaped like φ.
      meta_optimizer: the outer optax optimizer (its state is `meta_state.opt_state`).

    Returns:
      The next `MetaState` (step + 1).
    """
    updates, opt_state = meta_optimizer.update(grads, meta_state.opt_state, meta_state.params)
    return MetaState(
        params=optax.apply_updates(meta_state.params, updates),
        opt_state=opt_state,
        step=meta_state.step + 1,
    )
