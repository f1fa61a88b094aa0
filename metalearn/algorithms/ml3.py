"""ML³ (Bechtle et al.): learn a loss offline, then train fresh models with it frozen.

The pieces every ML³ experiment shares, as pure functions over one problem (vmap them
over seeds):

- `regression_inner_loss`: the inner objective of a supervised optimizee, either a
  learned loss L_φ(y, f_θ(x)[, extra]) or a fixed task loss.
- `meta_train_episode`: Algorithm 1 — from fresh θ, unroll K inner steps on L_φ for
  each of T tasks, stepping φ on the mean task loss at the new θ after every window.
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

    Also reports `task/mse` of the same predictions, for free, as a metric.
    """

    def inner_loss(params, model_state, meta_params, batch, key):
        del key
        y_hat = apply_fn(params, batch["x"])
        value = loss(meta_params, batch["y"], y_hat, batch)
        return value, (model_state, {"task/mse": jnp.mean((y_hat - batch["y"]) ** 2)})

    return inner_loss


def repeat(tree: Batch, k: int) -> Batch:
    """Stacks `tree` k times along a new leading axis (a fixed batch for every step)."""
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
      evaluate: `params -> scalar`, the quantity traced (e.g. task MSE).

    Returns:
      `(θ_K, trace)` with trace [K + 1] = evaluate(θ_0), …, evaluate(θ_K).
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
    trace = jnp.concatenate([metrics["trace"], evaluate(final.params)[None]])
    return final.params, trace


def meta_train_episode(
    meta_state: MetaState,
    fresh_states: InnerState,
    batches: Batch,
    keys: PRNGKey,
    outer_batches: Batch,
    outer_keys: PRNGKey,
    *,
    window: int,
    meta_optimizer: optax.GradientTransformation,
    **meta_loss_kwargs,
) -> tuple[MetaState, dict[str, Array]]:
    """Algorithm 1 for T tasks sharing φ: one episode from freshly initialised θ.

    The episode's K inner steps run in windows of `window`, with a meta update on the mean
    task loss at the new θ after each window (`bilevel.windowed_meta_steps`): after every
    inner step (window 1) or after the whole unroll (window K).

    Args:
      meta_state: φ and its optimizer state.
      fresh_states: newly initialised θ of each task [T].
      batches, keys: inner data [T, K, ...] and keys [T, K].
      outer_batches, outer_keys: task-loss data and keys [T, K // window, ...].
      window: inner steps per meta update.
      meta_optimizer: the outer optax optimizer.
      **meta_loss_kwargs: `inner_loss`, `outer_loss`, `optimizer`, `estimator`, `remat`.

    Returns:
      `(meta_state, metrics)`, metrics averaged over the episode's meta updates.
    """
    meta_state, _, metrics = bilevel.windowed_meta_steps(
        meta_state,
        fresh_states,
        batches,
        keys,
        outer_batches,
        outer_keys,
        window=window,
        meta_optimizer=meta_optimizer,
        **meta_loss_kwargs,
    )
    return meta_state, {k: jnp.mean(v) for k, v in metrics.items()}
