"""K inner steps of T tasks in windows, a meta update after each: truncated
backpropagation, truncated ES and implicit per window, and PES's particles carried
across windows."""

import functools

import jax
import jax.numpy as jnp
import optax

from metalearn import estimators
from metalearn.bilevel.backprop import meta_grad_over_tasks
from metalearn.bilevel.checks import _check_windowed
from metalearn.bilevel.forward import _noise_key, _window_loss, es_diagnostics
from metalearn.bilevel.unroll import _num_steps, meta_step
from metalearn.estimators import EstimatorOptions
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


def init_pes_over_tasks(states: InnerState, meta_params: MetaParams, pairs: int):
    """PES particles of T tasks at the start of an unroll: 2P copies of each task's state
    (leaves [T, 2P, ...]) and zero accumulated perturbations [T, P, n]."""
    return jax.vmap(lambda s: estimators.init_pes(s, meta_params, pairs))(states)


def pes_meta_grad_over_tasks(
    meta_params: MetaParams,
    states: InnerState,
    pes_states: estimators.PESState,
    batches: Batch,
    keys: PRNGKey,
    outer_batches: Batch,
    outer_keys: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    options: EstimatorOptions | None = None,
) -> tuple[Array, MetaParams, InnerState, estimators.PESState, Metrics]:
    """One window of PES for T tasks: the PES estimate of this window's mean outer loss.

    Summed over the windows of an unroll with φ fixed, the estimates are unbiased for
    the gradient of the summed window losses through the whole unroll
    (`metalearn.estimators`). The unperturbed states run alongside, forward only, for
    the loss and metrics reported and the states returned.

    Args:
      meta_params: φ (no task axis).
      states: the unperturbed inner states, leaves [T, ...].
      pes_states: the particles, from `init_pes_over_tasks` at the unroll's start.
      batches: this window's inner batches, leaves [T, W, ...]; keys: [T, W].
      outer_batches: one outer batch per task, leaves [T, ...]; outer_keys: [T] (each
        task's perturbations are drawn from a key derived from its outer key).
      inner_loss, outer_loss, optimizer, options: as in `meta_grad`.

    Returns:
      `(mean_loss, grads, states, pes_states, metrics)`, metrics [T, W] plus ES's
      diagnostics (`meta/es_loss_spread`, `meta/es_stderr`, `meta/es_rel_stderr`, per
      task; see `metalearn.estimators`).
    """
    options = EstimatorOptions.from_config(options)
    window_loss = functools.partial(
        _window_loss, inner_loss=inner_loss, outer_loss=outer_loss, optimizer=optimizer
    )
    phi = jax.lax.stop_gradient(meta_params)

    def one(state, pes_state, batch, key, outer_batch, outer_key):
        loss, (final, metrics) = window_loss(phi, state, batch, key, outer_batch, outer_key)

        def particle(f, s):
            value, (end, _) = window_loss(f, s, batch, key, outer_batch, outer_key)
            return value, end

        grads, pes_state, losses, stderr = estimators.pes_step(
            particle, phi, pes_state, _noise_key(None, outer_key), sigma=options.sigma
        )
        extra = es_diagnostics(losses, stderr, grads)
        metrics = {
            **metrics,
            **{k: jnp.broadcast_to(v, (_num_steps(key),)) for k, v in extra.items()},
        }
        return loss, grads, final, pes_state, metrics

    losses, grads, finals, pes_states, metrics = jax.vmap(one)(
        states, pes_states, batches, keys, outer_batches, outer_keys
    )
    return losses.mean(), jax.tree.map(lambda g: g.mean(0), grads), finals, pes_states, metrics


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
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    estimator: str,
    remat: bool = False,
    options: EstimatorOptions | None = None,
    estimator_state: estimators.PESState | tuple | None = None,
    keep_estimates: bool = False,
) -> tuple[MetaState, InnerState, Metrics, estimators.PESState | tuple]:
    """K inner steps of T tasks in windows of W, one meta update after each window.

    With W == K this is one meta step on the full unroll ("unrolled", "first_order",
    "es" or "implicit"); with a shorter window it is truncated backpropagation
    ("truncated", or "first_order", "es" or "implicit" within each window): each window
    starts from the state the previous one left, as a constant, and φ is updated between
    windows. "pes" (W < K) instead carries its perturbed particles across the windows
    too, which removes the truncation's bias. AdaLFL's online lock-step is W = 1 over
    the whole run.

    Args:
      meta_state: φ and its optimizer state.
      states: the inner states of the T tasks, leaves [T, ...].
      batches: inner data, leaves [T, K, ...]; keys: [T, K].
      outer_batches: one outer batch per window, leaves [T, K // W, ...]; outer_keys:
        [T, K // W].
      window: W, inner steps per meta update; must divide K.
      meta_optimizer: the outer optax optimizer.
      inner_loss, outer_loss, optimizer, remat: as in `meta_loss`.
      estimator: "unrolled" (W == K), "truncated" (W < K), or "first_order", "es",
        "implicit" or "pes" (any W: a call of one window continues the unroll of the
        `estimator_state` it is given).
      options: the settings of "es", "pes" and "implicit" (`EstimatorOptions`).
      estimator_state: what the estimator carries from one call to the next: for "pes"
        its particles (`PESState`, leaves [T, 2P, ...] and [T, P, n]) as the previous
        call returned them; None at the start of an unroll (fresh particles from
        `states`). Every other estimator carries nothing (None or ()). Passing the
        returned state on makes a run split into any number of calls give the numbers
        of one call; starting each call with None would restart PES's particles, which
        is truncated ES.
      keep_estimates: also return each window's meta-gradient estimate (shaped like φ,
        stacked over the windows) as `metrics["meta/estimate"]`.

    Returns:
      `(meta_state, final_states, metrics, estimator_state)`: φ after K // W updates, the
      inner states after K steps (leaves [T, ...]), metrics stacked over the K // W
      windows (`meta/loss`, `meta/grad_norm`, `meta/finite` (1 where the estimate and the
      window's loss are finite, 0 where not: the update then made φ non-finite) and the
      inner metrics averaged over tasks and steps), and the estimator state to pass to
      the next call that continues the same unroll.
    """
    num_steps = jax.tree.leaves(keys)[0].shape[1]
    _check_windowed(estimator, window, num_steps)
    num_windows = num_steps // window
    options = EstimatorOptions.from_config(options)
    losses = dict(inner_loss=inner_loss, outer_loss=outer_loss, optimizer=optimizer)
    per_window = functools.partial(
        meta_grad_over_tasks,
        **losses,
        # Each window is one exact unroll; the truncation is this scan's carry.
        estimator="unrolled" if estimator == "truncated" else estimator,
        remat=remat,
        options=options,
    )
    pes_window = functools.partial(pes_meta_grad_over_tasks, **losses, options=options)

    def by_window(x):  # [T, K, ...] -> [K // W, T, W, ...]
        x = x.reshape(x.shape[0], num_windows, window, *x.shape[2:])
        return jnp.swapaxes(x, 0, 1)

    def body(carry, xs):
        meta_state, states, pes_states = carry
        batch, key, outer_batch, outer_key = xs
        if estimator == "pes":
            loss, grads, states, pes_states, metrics = pes_window(
                meta_state.params, states, pes_states, batch, key, outer_batch, outer_key
            )
        else:
            loss, grads, states, metrics = per_window(
                meta_state.params, states, batch, key, outer_batch, outer_key
            )
        meta_state = meta_step(meta_state, grads, meta_optimizer=meta_optimizer)
        leaves_finite = [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]
        finite = jnp.isfinite(loss) & jnp.all(jnp.stack(leaves_finite))
        metrics = {
            "meta/loss": loss,
            "meta/grad_norm": optax.global_norm(grads),
            "meta/finite": finite.astype(loss.dtype),
            **{k: jnp.mean(v) for k, v in metrics.items()},
            **({"meta/estimate": grads} if keep_estimates else {}),
        }
        return (meta_state, states, pes_states), metrics

    xs = (
        jax.tree.map(by_window, batches),
        by_window(keys),
        jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outer_batches),
        jnp.swapaxes(outer_keys, 0, 1),
    )
    pes_states = _estimator_state(estimator_state, estimator, states, meta_state, options)
    (meta_state, states, pes_states), metrics = jax.lax.scan(
        body, (meta_state, states, pes_states), xs
    )
    return meta_state, states, metrics, pes_states


def _estimator_state(given, estimator, states, meta_state, options):
    """The estimator state a call starts from: `given`, checked, or a fresh one."""
    if estimator != "pes":
        if not (given is None or (isinstance(given, tuple) and not given)):
            raise ValueError(
                f"estimator={estimator!r} carries nothing between calls, but an "
                f"estimator_state was passed ({type(given).__name__}); pass None. Only "
                "'pes' has a state (its particles)."
            )
        return ()
    if given is None:
        return init_pes_over_tasks(states, meta_state.params, options.pairs)
    if not isinstance(given, estimators.PESState):
        raise TypeError(
            "estimator='pes' takes as estimator_state the PESState a previous call "
            f"returned (or None at the start of an unroll); got {type(given).__name__}."
        )
    tasks = jax.tree.leaves(states)[0].shape[0]
    pairs = given.accumulated.shape[1]
    if given.accumulated.shape[0] != tasks or pairs != options.pairs:
        raise ValueError(
            f"The PES state has {given.accumulated.shape[0]} tasks and {pairs} pairs, but "
            f"this call has {tasks} tasks and options.pairs={options.pairs}: pass the state "
            "the previous call of the same run returned, with the same options."
        )
    return given
