"""The driver of meta-training over a long unroll (`windowed_meta_steps`): K inner steps
of T tasks in the windows of an estimator, a meta update after each window."""

import jax
import jax.numpy as jnp
import optax

from metalearn.bilevel.problem import (
    Estimator,
    EstimatorState,
    Problem,
    check_estimator_object,
    check_problem,
)
from metalearn.bilevel.unroll import meta_step, meta_step_metrics
from metalearn.state import MetaState
from metalearn.types import Batch, Metrics, PRNGKey


def windowed_meta_steps(
    meta_state: MetaState,
    state: EstimatorState,
    batches: Batch,
    keys: PRNGKey,
    outer_batches: Batch,
    outer_keys: PRNGKey,
    *,
    problem: Problem,
    estimator: Estimator,
    meta_optimizer: optax.GradientTransformation,
    keep_estimates: bool = False,
) -> tuple[MetaState, EstimatorState, Metrics]:
    """K inner steps of T tasks in the estimator's windows, one meta update after each.

    The estimator's `window` W (None: all K steps, one meta update) cuts the K steps into
    K // W windows; each window's estimate (`estimator.estimate_tasks`) is applied to φ
    by `meta_optimizer` before the next window runs from the state the previous left.
    So `Truncated(window=W)` is truncated backpropagation, `PES(window=W)` persistent
    ES, `Unrolled()` one meta step on the full unroll, AdaLFL's online lock-step
    `Truncated(window=1)` over the whole run.

    Args:
      meta_state: φ and its optimizer state.
      state: the estimator's state over T tasks: `estimator.init_tasks(φ, inner_states)`
        at the start of an unroll, or what the previous call of the same unroll returned
        (a run split into any number of calls then gives the numbers of one call).
      batches: inner data, leaves [T, K, ...]; keys: [T, K].
      outer_batches: one outer batch per window, leaves [T, K // W, ...]; outer_keys:
        [T, K // W].
      problem: the inner and outer losses and the inner optimizer.
      estimator: any `Estimator` (`Unrolled`, `Truncated`, `FirstOrder`, `ES`, `PES`,
        `Implicit`, ...).
      meta_optimizer: the outer optax optimizer.
      keep_estimates: also return each window's estimate (shaped like φ, stacked over
        the windows) as `metrics["meta/estimate"]`.

    Returns:
      `(meta_state, state, metrics)`: φ after K // W updates, the estimator's state after
      K steps (its `inner` the tasks' inner states), and metrics stacked over the
      windows: `meta/loss`, `meta/grad_norm`, `meta/finite` (1 where the estimate and the
      window's loss are finite, 0 where not: the update then made φ non-finite), and the
      inner and estimator metrics averaged over tasks and steps.
    """
    check_estimator_object(estimator)
    check_problem(problem)
    num_steps = jax.tree.leaves(keys)[0].shape[1]
    window = estimator.window or num_steps
    if num_steps % window:
        raise ValueError(
            f"{type(estimator).__name__}(window={window}) needs a number of inner steps that "
            f"it divides; this call has {num_steps}: give a multiple of {window}."
        )
    num_windows = num_steps // window
    outer = jax.tree.leaves(outer_keys)[0].shape[:2]
    if outer[1:] != (num_windows,):
        raise ValueError(
            f"{num_steps} inner steps in windows of {window} are {num_windows} meta updates, "
            f"each with its outer batch and key: outer_keys must be [T, {num_windows}]; got "
            f"{list(jnp.shape(jax.tree.leaves(outer_keys)[0]))}."
        )

    def by_window(x):  # [T, K, ...] -> [K // W, T, W, ...]
        x = x.reshape(x.shape[0], num_windows, window, *x.shape[2:])
        return jnp.swapaxes(x, 0, 1)

    def body(carry, xs):
        meta_state, state = carry
        grads, state, metrics = estimator.estimate_tasks(problem, meta_state.params, state, *xs)
        loss = metrics.pop("meta/loss")
        meta_state = meta_step(meta_state, grads, meta_optimizer=meta_optimizer)
        metrics = {
            **meta_step_metrics(loss, grads),
            **{k: jnp.mean(v) for k, v in metrics.items()},
            **({"meta/estimate": grads} if keep_estimates else {}),
        }
        return (meta_state, state), metrics

    xs = (
        jax.tree.map(by_window, batches),
        by_window(keys),
        jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outer_batches),
        jnp.swapaxes(outer_keys, 0, 1),
    )
    (meta_state, state), metrics = jax.lax.scan(body, (meta_state, state), xs)
    return meta_state, state, metrics
