"""ML³ (Bechtle et al.): learn a loss offline, then train fresh models with it frozen.

The pieces every ML³ experiment shares, as pure functions over one problem (vmap them
over seeds):

- `regression_inner_loss`: the inner objective of a supervised optimizee, either a
  learned loss L_φ(y, f_θ(x)[, extra]) or a fixed task loss.
- `meta_train_episode`: Algorithm 1 — from fresh θ, unroll K inner steps on L_φ for
  each of T tasks, stepping φ on the mean task loss at the new θ after every window
  (`bilevel.windowed_meta_steps`).
- `episode`: `meta_train_episode` with its [T, K] and [T, K // window] keys drawn from
  two keys, the one ML³ meta iteration the experiments call.
- `fit`: Algorithm 2 (meta-test) — train θ for K full-batch steps with a frozen loss and
  return an evaluation trace at θ_0 … θ_K.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from metalearn import bilevel
from metalearn.state import InnerState, MetaState
from metalearn.types import Array, Batch, InnerLossFn, MetaParams, Params, PRNGKey

# loss(meta_params, y, y_hat, batch) -> scalar; `batch` gives access to extra inputs.
SupervisedLoss = Callable[[MetaParams, Array, Array, Batch], Array]


def regression_inner_loss(
    apply_fn: Callable[[Params, Array], Array], loss: SupervisedLoss
) -> InnerLossFn:
    """The inner objective `loss(φ, y, f_θ(x), batch)` for a batch {'x', 'y', ...}.

    Args:
      apply_fn: `f(params, x [B, ...]) -> y_hat [B, C]`.
      loss: `(φ, y [B, C], y_hat [B, C], batch) -> scalar`, a learned loss or a fixed one
        that ignores φ.

    Returns:
      An `InnerLossFn` that also reports `task/mse` of the same predictions, for free.
    """

    def inner_loss(params, model_state, meta_params, batch, key):
        del key
        y_hat = apply_fn(params, batch["x"])
        value = loss(meta_params, batch["y"], y_hat, batch)
        return value, (model_state, {"task/mse": jnp.mean((y_hat - batch["y"]) ** 2)})

    return inner_loss


def repeat(tree: Batch, k: int) -> Batch:
    """Stacks `tree` k times along a new leading axis (a fixed batch for every step).

    Args:
      tree: a batch, leaves [...].
      k: the number of steps.

    Returns:
      The batch broadcast to leaves [k, ...] (no copy until used).
    """
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (k, *x.shape)), tree)


def fit(
    params: Params,
    meta_params: MetaParams,
    batch: Batch,
    key: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    evaluate: Callable[[Params], Array],
) -> tuple[Params, Array]:
    """Algorithm 2 (meta-test): `num_steps` full-batch steps on a frozen loss.

    Args:
      params: θ₀.
      meta_params: the frozen φ (ignored by fixed task losses).
      batch: the training data, reused at every step.
      key: PRNG key (split per step).
      inner_loss: the objective θ is trained on.
      optimizer: the optax optimizer.
      num_steps: K.
      evaluate: `params -> scalar`, the quantity traced (e.g. task MSE), or a pytree of
        arrays (several quantities, each traced alike).

    Returns:
      `(θ_K, trace)` with trace [K + 1] = evaluate(θ_0), …, evaluate(θ_K) (a pytree of
      such traces, leaves [K + 1, ...], when `evaluate` returns one).
    """
    state = InnerState(params, optimizer.init(params), {}, jnp.zeros((), jnp.int32))

    def traced_loss(p, model_state, phi, b, k):
        value, (model_state, metrics) = inner_loss(p, model_state, phi, b, k)
        return value, (model_state, {**metrics, "trace": evaluate(p)})

    final, metrics = bilevel.unroll(
        state,
        jax.lax.stop_gradient(meta_params),
        repeat(batch, num_steps),
        jax.random.split(key, num_steps),
        inner_loss=traced_loss,
        optimizer=optimizer,
    )
    trace = jax.tree.map(
        lambda t, last: jnp.concatenate([t, last[None]]), metrics["trace"], evaluate(final.params)
    )
    return final.params, trace


def meta_train_episode(
    meta_state: MetaState,
    fresh_states: InnerState,
    batches: Batch,
    keys: PRNGKey,
    outer_batches: Batch,
    outer_keys: PRNGKey,
    *,
    problem: bilevel.Problem,
    estimator: bilevel.Estimator,
    meta_optimizer: optax.GradientTransformation,
    return_final_states: bool = False,
) -> tuple[MetaState, dict[str, Array]]:
    """Algorithm 1 for T tasks sharing φ: one episode from freshly initialised θ.

    The episode's K inner steps run in the estimator's windows, with a meta update on the
    mean task loss at the new θ after each window (`bilevel.windowed_meta_steps`): after
    every inner step (`Truncated(window=1)`) or after the whole unroll (`Unrolled()`).

    Args:
      meta_state: φ and its optimizer state.
      fresh_states: newly initialised θ of each task [T].
      batches, keys: inner data [T, K, ...] and keys [T, K].
      outer_batches, outer_keys: task-loss data and keys [T, K // W, ...], W the
        estimator's window (K if None).
      problem: the learned inner loss, the task loss and the inner optimizer.
      estimator: a `bilevel.Estimator` (from a config: `bilevel.estimator_from_config`).
      meta_optimizer: the outer optax optimizer.
      return_final_states: also return the tasks' inner states at the episode's end.

    Returns:
      `(meta_state, metrics)`, metrics averaged over the episode's meta updates; with
      `return_final_states`, `(meta_state, final_states [T], metrics)`.
    """
    bilevel.check_estimator_object(estimator)
    # Each episode is a whole unroll from fresh θ: PES's particles start afresh too.
    meta_state, final, metrics = bilevel.windowed_meta_steps(
        meta_state,
        estimator.init_tasks(meta_state.params, fresh_states),
        batches,
        keys,
        outer_batches,
        outer_keys,
        problem=problem,
        estimator=estimator,
        meta_optimizer=meta_optimizer,
    )
    final_states = final.inner
    metrics = {k: jnp.mean(v) for k, v in metrics.items()}
    return (meta_state, final_states, metrics) if return_final_states else (meta_state, metrics)


def episode(
    meta_state: MetaState,
    fresh_states: InnerState,
    batches: Batch,
    outer_batches: Batch,
    inner_key: PRNGKey,
    outer_key: PRNGKey,
    *,
    problem: bilevel.Problem,
    estimator: bilevel.Estimator,
    meta_optimizer: optax.GradientTransformation,
    return_final_states: bool = False,
) -> tuple[MetaState, dict[str, Array]]:
    """One ML³ meta iteration of T tasks: `meta_train_episode` with its keys drawn here.

    Args:
      meta_state: φ and its optimizer state.
      fresh_states: newly initialised θ of each task [T].
      batches: inner data [T, K, ...].
      outer_batches: task-loss data [T, K // W, ...], W the estimator's window.
      inner_key: split into the [T, K] inner-step keys.
      outer_key: split into the [T, K // W] task-loss keys.
      problem, estimator, meta_optimizer, return_final_states: as in
        `meta_train_episode`.

    Returns:
      `(meta_state, metrics)`, metrics averaged over the episode's meta updates; with
      `return_final_states`, `(meta_state, final_states [T], metrics)`.
    """
    bilevel.check_estimator_object(estimator)
    num_tasks, length = jax.tree.leaves(batches)[0].shape[:2]
    window = estimator.window or length
    if length % window:
        raise ValueError(
            f"The window ({window}) must divide the episode length ({length} inner steps)."
        )
    return meta_train_episode(
        meta_state,
        fresh_states,
        batches,
        jax.random.split(inner_key, (num_tasks, length)),
        outer_batches,
        jax.random.split(outer_key, (num_tasks, length // window)),
        problem=problem,
        estimator=estimator,
        meta_optimizer=meta_optimizer,
        return_final_states=return_final_states,
    )
