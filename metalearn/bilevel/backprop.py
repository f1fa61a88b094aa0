"""Meta-gradients by backpropagation through one unroll (`meta_loss`, `meta_grad`) and
over T tasks side by side (`meta_grad_over_tasks`); "es" and "implicit" are handed to
`forward`."""

import functools

import jax
import jax.numpy as jnp
import optax

from metalearn.bilevel.checks import _NOT_BACKPROP, _check_one_unroll
from metalearn.bilevel.forward import _estimated_grad
from metalearn.bilevel.probe import check_differentiable_optimizer
from metalearn.bilevel.unroll import _num_steps, unroll
from metalearn.estimators import EstimatorOptions
from metalearn.state import InnerState
from metalearn.types import (
    Array,
    Batch,
    InnerLossFn,
    MetaParams,
    Metrics,
    OuterLossFn,
    PRNGKey,
)


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
    window: int | None = None,
    remat: bool = False,
) -> tuple[Array, tuple[InnerState, Metrics]]:
    """The outer objective L_outer(θ_K(φ)) after unrolling K inner steps from `state`.

    `state` is an ordinary input: when a caller carries it across meta steps (the
    truncated estimator) no gradient flows back past it; when the caller builds it from
    what it differentiates (θ₀ = φ, MAML-like), the gradient flows through it too.

    With ``estimator="last_window"`` the first K − W steps run forward (no remat), and the
    last W start from their result with the optimizer and model state under
    `stop_gradient` and the parameters as `θ₀ + stop_gradient(θ_{K−W} − θ₀)`: the value of
    θ_{K−W}, the Jacobian of the identity with respect to θ₀ (zero when θ₀ is a constant of
    what is differentiated). Only the last W steps are differentiated.

    Args:
      meta_params: φ, the argument differentiated.
      state: the inner state the unroll starts from.
      batches: the K inner batches, leaves [K, ...].
      keys: the K inner keys, [K] (typed) or [K, 2].
      outer_batch, outer_key: what the outer loss is evaluated on at θ_K (no step axis).
      inner_loss, outer_loss, optimizer: see the module docstring.
      estimator: "unrolled", "first_order" or "last_window" (see `ESTIMATORS`);
        "truncated" belongs to `windowed_meta_steps` and is refused here.
      window: for "last_window" only, the W last steps differentiated, 1 <= W < K.
      remat: as in `unroll` (the differentiated steps).

    Returns:
      `(loss, (final_state, inner_metrics))`: a scalar loss, the state after K steps and
      the metrics stacked over K (leaves [K]).

    Raises:
      ValueError: for an unknown or inapplicable estimator, a bad `window`, or an
        optimizer whose update has a NaN derivative (Adam without `eps_root`).
    """
    num_steps = _num_steps(keys)
    _check_one_unroll(estimator, window, num_steps)
    if estimator in _NOT_BACKPROP:
        raise ValueError(
            f"estimator={estimator!r} computes the meta-gradient itself instead of "
            "differentiating meta_loss: call meta_grad, meta_grad_over_tasks or "
            "windowed_meta_steps with it."
        )
    check_differentiable_optimizer(optimizer, state.params)
    head_metrics = None
    if estimator == "last_window":
        cut = num_steps - window
        head, head_metrics = unroll(
            state,
            meta_params,
            jax.tree.map(lambda x: x[:cut], batches),
            keys[:cut],
            inner_loss=inner_loss,
            optimizer=optimizer,
        )
        # Straight-through: the value of the head's θ, the identity Jacobian to the input θ.
        start = jax.tree.map(
            lambda p, q: p + jax.lax.stop_gradient(q - p), state.params, head.params
        )
        state = head.replace(
            params=start,
            opt_state=jax.lax.stop_gradient(head.opt_state),
            model_state=jax.lax.stop_gradient(head.model_state),
        )
        batches, keys = jax.tree.map(lambda x: x[cut:], batches), keys[cut:]
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
    if head_metrics is not None:
        metrics = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), head_metrics, metrics)
    return loss, (final, metrics)


def meta_grad(
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
    window: int | None = None,
    remat: bool = False,
    options: EstimatorOptions | None = None,
    noise_key: PRNGKey | None = None,
) -> tuple[Array, MetaParams, InnerState, Metrics]:
    """∇_φ of `meta_loss`, with its value: the meta-gradient of one K-step unroll.

    Args:
      As `meta_loss`: `meta_params` φ; `state` the starting inner state; `batches` leaves
      [K, ...] and `keys` [K]; `outer_batch`, `outer_key` for the outer loss at θ_K; the
      losses, inner optimizer, `estimator` ("unrolled", "first_order", "last_window",
      or "es" and "implicit", which do not backpropagate through the unroll), `window`
      (for "last_window") and `remat`.
      options: σ and pairs of "es", CG iterations and damping of "implicit"
        (`EstimatorOptions`; defaults if None).
      noise_key: the key of ES's perturbations; by default derived from `outer_key`.

    Returns:
      `(loss, grads, final_state, inner_metrics)`: scalar loss, grads shaped like φ, the
      state after K steps and metrics stacked over K ("es" adds `meta/es_loss_spread`,
      the std of the perturbed losses; "implicit" `meta/cg_residual`, the relative
      residual of its linear solve, each broadcast over K).
    """
    _check_one_unroll(estimator, window, _num_steps(keys))
    if estimator in _NOT_BACKPROP:
        return _estimated_grad(
            meta_params,
            state,
            batches,
            keys,
            outer_batch,
            outer_key,
            noise_key,
            inner_loss=inner_loss,
            outer_loss=outer_loss,
            optimizer=optimizer,
            estimator=estimator,
            options=EstimatorOptions.from_config(options),
        )
    fn = functools.partial(
        meta_loss,
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=optimizer,
        estimator=estimator,
        window=window,
        remat=remat,
    )
    (loss, (final, metrics)), grads = jax.value_and_grad(fn, has_aux=True)(
        meta_params, state, batches, keys, outer_batch, outer_key
    )
    return loss, grads, final, metrics


def meta_grad_over_tasks(
    meta_params: MetaParams,
    states: InnerState,
    batches: Batch,
    keys: PRNGKey,
    outer_batches: Batch,
    outer_keys: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    estimator: str = "unrolled",
    window: int | None = None,
    remat: bool = False,
    options: EstimatorOptions | None = None,
) -> tuple[Array, MetaParams, InnerState, Metrics]:
    """Meta-gradient of the mean outer loss over T independent tasks sharing one φ.

    Each task has its own inner state, batches and outer batch; the tasks run side by
    side under `jax.vmap` of `meta_loss`.

    Args:
      meta_params: φ, shared by the tasks (no task axis).
      states: the T inner states, leaves [T, ...].
      batches: inner batches, leaves [T, K, ...]; keys: [T, K].
      outer_batches: one outer batch per task, leaves [T, ...]; outer_keys: [T].
      inner_loss, outer_loss, optimizer, estimator, window, remat, options: as in
        `meta_grad`; ES draws each task's perturbations from a key derived from its
        outer key.

    Returns:
      `(mean_loss, grads, final_states, inner_metrics)`: the scalar mean over tasks, grads
      shaped like φ, final states with leaves [T, ...], metrics [T, K].
    """
    if estimator in _NOT_BACKPROP:
        _check_one_unroll(estimator, window, jax.tree.leaves(keys)[0].shape[1])
        one = functools.partial(
            meta_grad,
            inner_loss=inner_loss,
            outer_loss=outer_loss,
            optimizer=optimizer,
            estimator=estimator,
            options=EstimatorOptions.from_config(options),
        )
        losses, grads, finals, metrics = jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0))(
            meta_params, states, batches, keys, outer_batches, outer_keys
        )
        return losses.mean(), jax.tree.map(lambda g: g.mean(0), grads), finals, metrics
    per_task = functools.partial(
        meta_loss,
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=optimizer,
        estimator=estimator,
        window=window,
        remat=remat,
    )

    def mean_loss(phi: MetaParams) -> tuple[Array, tuple[InnerState, Metrics]]:
        losses, aux = jax.vmap(per_task, in_axes=(None, 0, 0, 0, 0, 0))(
            phi, states, batches, keys, outer_batches, outer_keys
        )
        return losses.mean(), aux

    (loss, (finals, metrics)), grads = jax.value_and_grad(mean_loss, has_aux=True)(meta_params)
    return loss, grads, finals, metrics
