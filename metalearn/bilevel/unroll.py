"""One inner step, a scanned unroll of K of them, and one outer step of φ."""

import functools

import flax
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
    PRNGKey,
)

# What Flax raises when a module is applied to a tree that is not its variables.
_FLAX_SCOPE_ERRORS = (
    flax.errors.ScopeCollectionNotFound,
    flax.errors.ScopeParamNotFoundError,
    flax.errors.ScopeParamShapeError,
    flax.errors.ApplyScopeInvalidVariablesStructureError,
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
    (loss, (model_state, metrics)), grads = inner_value_and_grad(
        inner_loss, params, state.model_state, meta_params, batch, key
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = InnerState(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        model_state=model_state,
        step=state.step + 1,
    )
    return new_state, {"inner/loss": loss, **metrics}


def inner_value_and_grad(inner_loss: InnerLossFn, params, model_state, meta_params, batch, key):
    """`((loss, (model_state, metrics)), ∇_θ loss)` of the inner loss, with a clear error
    for a loss that is not a scalar and for one whose arguments are in another order."""
    try:
        return jax.value_and_grad(inner_loss, has_aux=True)(
            params, model_state, meta_params, batch, key
        )
    except TypeError as e:
        if "scalar-output" not in str(e):
            raise
        raise ValueError(
            "inner_loss must return (loss, (model_state, metrics)) with a scalar loss, but "
            f"its loss is not a scalar ({e}): reduce it over the batch, e.g. with jnp.mean."
        ) from None
    except _FLAX_SCOPE_ERRORS as e:
        raise ValueError(
            "inner_loss raised Flax's "
            f"{type(e).__name__} ({str(e).splitlines()[0]}): a model applied to the wrong "
            "tree, most often arguments in another order than the heart passes them, "
            "inner_loss(params, model_state, meta_params, batch, key): θ first, then the "
            "model state, then φ."
        ) from e


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
    _check_steps(batches, keys)
    step_fn = functools.partial(
        inner_step, inner_loss=inner_loss, optimizer=optimizer, first_order=first_order
    )

    def body(carry: InnerState, xs: tuple[Batch, PRNGKey]) -> tuple[InnerState, Metrics]:
        batch, key = xs
        return step_fn(carry, meta_params, batch, key)

    if remat:
        body = jax.checkpoint(body)
    return jax.lax.scan(body, state, (batches, keys))


def _check_steps(batches: Batch, keys: PRNGKey) -> None:
    """Refuses a single key where K are expected, and batches without the K axis."""
    k = _num_steps(keys)
    sizes = sorted({x.shape[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batches)}, key=str)
    if sizes and sizes != [k]:
        raise ValueError(
            f"An unroll of K = {k} steps (the keys' leading axis) takes batches whose every "
            f"leaf has a leading axis of K, one batch per step; got leading sizes {sizes}. "
            "Stack the K batches, e.g. jax.tree.map(lambda x: jnp.stack([x] * K), batch)."
        )


def _num_steps(keys: PRNGKey) -> int:
    """K, the keys' leading axis; a single key where K are expected is refused."""
    leaf = jax.tree.leaves(keys)[0]
    typed = jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    if leaf.ndim == (0 if typed else 1):
        raise ValueError(
            "An unroll takes one PRNG key per inner step, [K] typed keys or [K, 2] raw ones; "
            f"got a single key (shape {leaf.shape}): pass jax.random.split(key, K)."
        )
    return leaf.shape[0]


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


def meta_step_metrics(loss: Array, grads: MetaParams) -> dict[str, Array]:
    """What every meta step reports of its estimate: `meta/loss`, `meta/grad_norm` and
    `meta/finite` (1 where the estimate and the loss are finite, 0 where not: the
    update then made φ non-finite)."""
    leaves_finite = [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]
    finite = jnp.isfinite(loss) & jnp.all(jnp.stack(leaves_finite))
    return {
        "meta/loss": loss,
        "meta/grad_norm": optax.global_norm(grads),
        "meta/finite": finite.astype(loss.dtype),
    }
