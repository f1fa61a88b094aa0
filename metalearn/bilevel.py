"""The bilevel heart: inner steps, scanned unrolls and meta-gradients through them.

Every algorithm in metalearn is the same two-level loop:

    inner:  θ_{k+1} = θ_k + optax_update(∇_θ L_inner(θ_k, φ; batch_k))
    outer:  φ ← φ − η ∇_φ L_outer(θ_K(φ); outer_batch)

This module holds that loop as pure, jit-, vmap- and scan-able functions and nothing
else: it knows nothing of images, text, files or flags. Losses are passed in as
functions with the signatures in `metalearn.types`:

    inner_loss(params, model_state, meta_params, batch, key) -> (loss, (model_state, metrics))
    outer_loss(params, model_state, batch, key) -> loss

Gradient estimators (`ESTIMATORS`), always chosen explicitly by name:

- ``"unrolled"``: exact backpropagation through every inner step since θ was reset.
- ``"truncated"``: exact backpropagation through a window of inner steps, with a meta
  update after each window. The inner state is carried from one window to the next as a
  plain input, so no gradient crosses a window boundary (`windowed_meta_steps`).
- ``"first_order"``: the inner gradient is evaluated at stop_gradient(θ), which drops
  every second-order term in θ (∂²L/∂θ²) while keeping the mixed term ∂²L/∂θ∂φ through
  which φ influences θ at all; without it the meta-gradient would be zero.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from metalearn.state import InnerState, MetaState
from metalearn.types import (
    Array,
    Batch,
    InnerLossFn,
    MetaParams,
    Metrics,
    OuterLossFn,
    PRNGKey,
)

ESTIMATORS = ("unrolled", "truncated", "first_order")


def check_estimator(name: str, window: int, episode_length: int) -> None:
    """Validates an estimator choice; raises ValueError saying how to fix it.

    Args:
      name: one of `ESTIMATORS`.
      window: inner steps differentiated through per meta step.
      episode_length: inner steps between two resets of θ.
    """
    if name not in ESTIMATORS:
        raise ValueError(f"Unknown gradient estimator {name!r}; choose one of {ESTIMATORS}.")
    if window < 1 or episode_length < 1:
        raise ValueError(f"window ({window}) and episode length ({episode_length}) must be >= 1.")
    if episode_length % window:
        raise ValueError(
            f"The episode length ({episode_length} inner steps between resets of θ) must be a "
            f"multiple of the window ({window}); change one of them."
        )
    if name == "unrolled" and window != episode_length:
        raise ValueError(
            f"estimator='unrolled' differentiates through the whole episode, so the window "
            f"({window}) must equal the episode length ({episode_length}); use "
            f"estimator='truncated' for shorter windows."
        )
    if name == "truncated" and window == episode_length:
        raise ValueError(
            "estimator='truncated' with a window equal to the episode length is the full "
            "unroll; say estimator='unrolled' instead so the choice is explicit."
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
      batch: the inner batch.
      key: PRNG key for this step (dropout and the like).
      inner_loss: `(params, model_state, meta_params, batch, key) -> (loss, (model_state,
        metrics))`.
      optimizer: any optax transformation (SGD, momentum, Adam with `eps_root > 0`, ...).
      first_order: evaluate the gradient at stop_gradient(θ) (the first-order estimator).

    Returns:
      The next inner state and metrics: `inner/loss` plus whatever the loss reports.
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


def meta_loss(
    meta_params: MetaParams,
    state: InnerState,
    batches: Batch,
    keys: PRNGKey,
    outer_batch: Batch,
    outer_key: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    estimator: str = "unrolled",
    remat: bool = False,
) -> tuple[Array, tuple[InnerState, Metrics]]:
    """The outer objective L_outer(θ_K(φ)) after unrolling K inner steps from `state`.

    `state` is an ordinary input: when a caller carries it across meta steps (the
    truncated estimator) no gradient flows back past it.

    Args:
      meta_params: φ, the argument differentiated.
      state: the inner state the window starts from.
      batches, keys: the K inner batches and keys (leading axis K).
      outer_batch, outer_key: what the outer loss is evaluated on, at θ_K.
      inner_loss, outer_loss, optimizer: see the module docstring.
      estimator: one of `ESTIMATORS`; only ``"first_order"`` changes the maths here.
      remat: as in `unroll`.

    Returns:
      `(loss, (final_state, inner_metrics))`, the metrics stacked over K.
    """
    final, metrics = unroll(
        state,
        meta_params,
        batches,
        keys,
        inner_loss=inner_loss,
        optimizer=optimizer,
        first_order=estimator == "first_order",
        remat=remat,
    )
    loss = outer_loss(final.params, final.model_state, outer_batch, outer_key)
    return loss, (final, metrics)


def meta_grad(
    meta_params: MetaParams, *args: Any, **kwargs: Any
) -> tuple[Array, MetaParams, InnerState, Metrics]:
    """∇_φ of `meta_loss`; takes exactly its arguments.

    Returns:
      `(loss, grads, final_inner_state, inner_metrics)`.
    """
    (loss, (final, metrics)), grads = jax.value_and_grad(meta_loss, has_aux=True)(
        meta_params, *args, **kwargs
    )
    return loss, grads, final, metrics


def one_step_meta_grad(
    meta_params: MetaParams,
    state: InnerState,
    batch: Batch,
    key: PRNGKey,
    outer_batch: Batch,
    outer_key: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
) -> tuple[Array, MetaParams, InnerState, Metrics]:
    """The exact meta-gradient of a one-step unroll, without backpropagating a backprop.

    For θ₁ = θ₀ + u(g), g = ∇_θ L_inner(θ₀, φ), with θ₀ a constant of φ:

        ∇_φ L_outer(θ₁) = ∇_φ ⟨g(φ), w⟩ = ∇_φ [d/dε L_inner(θ₀ + ε w, φ)]_{ε=0},
        w = (∂θ₁/∂g)ᵀ ∇_θ L_outer(θ₁),

    so it needs a backward pass at θ₀ (g), one at θ₁, a VJP of the optimizer's update
    (element-wise) and one forward-mode JVP of the inner loss at θ₀ along w, whose
    φ-dependent part is only where φ enters (the loss head for a learned loss). The
    same number as `meta_grad` over one step, which transposes the whole backward pass
    at θ₀ instead (much slower for convolutions on some backends).

    Args and returns as `meta_grad` with K = 1: `batch` and `key` are one step's (no
    leading step axis); metrics have no step axis.
    """
    params = state.params
    (loss, (model_state, metrics)), grads = jax.value_and_grad(inner_loss, has_aux=True)(
        params, state.model_state, meta_params, batch, key
    )

    def apply(g):
        updates, opt_state = optimizer.update(g, state.opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    new_params, apply_vjp, opt_state = jax.vjp(apply, grads, has_aux=True)
    outer, outer_grads = jax.value_and_grad(outer_loss)(
        new_params, model_state, outer_batch, outer_key
    )
    (direction,) = apply_vjp(outer_grads)

    def directional_derivative(phi):
        fn = lambda p: inner_loss(p, state.model_state, phi, batch, key)[0]  # noqa: E731
        return jax.jvp(fn, (params,), (direction,))[1]

    meta_grads = jax.grad(directional_derivative)(meta_params)
    final = InnerState(
        params=new_params, opt_state=opt_state, model_state=model_state, step=state.step + 1
    )
    return outer, meta_grads, final, {"inner/loss": loss, **metrics}


def meta_grad_over_tasks(
    meta_params: MetaParams,
    states: InnerState,
    batches: Batch,
    keys: PRNGKey,
    outer_batches: Batch,
    outer_keys: PRNGKey,
    **kwargs: Any,
) -> tuple[Array, MetaParams, InnerState, Metrics]:
    """Meta-gradient of the mean outer loss over T independent tasks sharing one φ.

    Each task has its own inner state, batches and outer batch (leading task axis T on
    every argument but `meta_params`); the tasks run side by side under `jax.vmap`.
    Keyword arguments are those of `meta_loss`.

    Returns:
      `(mean_loss, grads, final_states [T], inner_metrics [T, K])`.
    """

    def mean_loss(phi: MetaParams) -> tuple[Array, tuple[InnerState, Metrics]]:
        per_task = functools.partial(meta_loss, **kwargs)
        losses, aux = jax.vmap(per_task, in_axes=(None, 0, 0, 0, 0, 0))(
            phi, states, batches, keys, outer_batches, outer_keys
        )
        return losses.mean(), aux

    (loss, (finals, metrics)), grads = jax.value_and_grad(mean_loss, has_aux=True)(meta_params)
    return loss, grads, finals, metrics


def windowed_meta_steps(
    meta_state: MetaState,
    states: InnerState,
    batches: Batch,
    keys: PRNGKey,
    outer_batches: Batch,
    outer_keys: PRNGKey,
    *,
    window: int,
    meta_optimizer: optax.GradientTransformation,
    **kwargs: Any,
) -> tuple[MetaState, InnerState, Metrics]:
    """K inner steps of T tasks in windows of `window`, one meta update after each window.

    With `window == K` this is one meta step on the full unroll; with a shorter window it
    is truncated backpropagation: each window starts from the state the previous one
    left, as a constant, and φ is updated between windows. AdaLFL's online lock-step is
    `window=1` over the whole run.

    Args:
      meta_state: φ and its optimizer state.
      states: the inner states of the T tasks (leading axis T).
      batches, keys: inner data [T, K, ...] and keys [T, K].
      outer_batches, outer_keys: one outer batch and key per window, [T, K // window, ...].
      window: inner steps per meta update; must divide K.
      meta_optimizer: the outer optax optimizer.
      **kwargs: `inner_loss`, `outer_loss`, `optimizer`, `estimator`, `remat` of `meta_loss`.

    Returns:
      `(meta_state, final_states, metrics)`, metrics stacked over the K // window windows:
      `meta/loss`, `meta/grad_norm` and the inner metrics averaged over tasks and steps.
    """
    num_steps = jax.tree.leaves(keys)[0].shape[1]
    if num_steps % window:
        raise ValueError(
            f"The window ({window}) must divide the number of inner steps ({num_steps})."
        )
    num_windows = num_steps // window

    def by_window(x):  # [T, K, ...] -> [K // W, T, W, ...]
        x = x.reshape(x.shape[0], num_windows, window, *x.shape[2:])
        return jnp.swapaxes(x, 0, 1)

    def body(carry, xs):
        meta_state, states = carry
        batch, key, outer_batch, outer_key = xs
        loss, grads, states, metrics = meta_grad_over_tasks(
            meta_state.params, states, batch, key, outer_batch, outer_key, **kwargs
        )
        meta_state = meta_step(meta_state, grads, meta_optimizer=meta_optimizer)
        metrics = {
            "meta/loss": loss,
            "meta/grad_norm": optax.global_norm(grads),
            **{k: jnp.mean(v) for k, v in metrics.items()},
        }
        return (meta_state, states), metrics

    xs = (
        jax.tree.map(by_window, batches),
        by_window(keys),
        jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outer_batches),
        jnp.swapaxes(outer_keys, 0, 1),
    )
    (meta_state, states), metrics = jax.lax.scan(body, (meta_state, states), xs)
    return meta_state, states, metrics


def meta_step(
    meta_state: MetaState,
    grads: MetaParams,
    *,
    meta_optimizer: optax.GradientTransformation,
) -> MetaState:
    """Applies one outer optimizer step to φ given its meta-gradient."""
    updates, opt_state = meta_optimizer.update(grads, meta_state.opt_state, meta_state.params)
    return MetaState(
        params=optax.apply_updates(meta_state.params, updates),
        opt_state=opt_state,
        step=meta_state.step + 1,
    )
