"""The estimators that do not backpropagate through the unroll ("es", "implicit"): the
unperturbed unroll runs forward only, and the meta-gradient comes from
`metalearn.estimators`."""

import functools

import jax
import jax.numpy as jnp
import optax

from metalearn import estimators
from metalearn.bilevel.unroll import _num_steps, unroll
from metalearn.estimators import EstimatorOptions
from metalearn.state import InnerState
from metalearn.streams import OuterKey
from metalearn.types import (
    Array,
    Batch,
    InnerLossFn,
    MetaParams,
    Metrics,
    OuterLossFn,
    PRNGKey,
)


def _noise_key(noise_key: PRNGKey | None, outer_key: PRNGKey) -> PRNGKey:
    return jax.random.fold_in(outer_key, OuterKey.ES_NOISE) if noise_key is None else noise_key


def _window_loss(
    meta_params, state, batches, keys, outer_batch, outer_key, *, inner_loss, outer_loss, optimizer
):
    """A forward unroll and its outer loss: `(loss, (final_state, metrics))`."""
    final, metrics = unroll(
        state, meta_params, batches, keys, inner_loss=inner_loss, optimizer=optimizer
    )
    return outer_loss(final.params, final.model_state, outer_batch, outer_key), (final, metrics)


def es_diagnostics(losses: Array, stderr: Array | None, grads: MetaParams) -> dict[str, Array]:
    """What ES and PES report of an estimate: the spread of the perturbed losses, the norm
    of the estimate's standard error, and that relative to the estimate's norm (near or
    above 1: mostly noise; raise `pairs`). With one pair (stderr None) the spread only."""
    out = {"meta/es_loss_spread": jnp.std(losses)}
    if stderr is not None:
        out["meta/es_stderr"] = stderr
        out["meta/es_rel_stderr"] = stderr / jnp.maximum(optax.global_norm(grads), 1e-30)
    return out


def _estimated_grad(
    meta_params: MetaParams,
    state: InnerState,
    batches: Batch,
    keys: PRNGKey,
    outer_batch: Batch,
    outer_key: PRNGKey,
    noise_key: PRNGKey | None,
    *,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    estimator: str,
    options: EstimatorOptions,
) -> tuple[Array, MetaParams, InnerState, Metrics]:
    """`meta_grad` for "es" and "implicit": the unperturbed unroll runs forward only."""
    window_loss = functools.partial(
        _window_loss, inner_loss=inner_loss, outer_loss=outer_loss, optimizer=optimizer
    )
    phi = jax.lax.stop_gradient(meta_params)
    loss, (final, metrics) = window_loss(phi, state, batches, keys, outer_batch, outer_key)
    final = jax.lax.stop_gradient(final)
    if estimator == "es":
        grads, losses, stderr = estimators.antithetic_es(
            lambda f: window_loss(f, state, batches, keys, outer_batch, outer_key),
            phi,
            _noise_key(noise_key, outer_key),
            sigma=options.sigma,
            pairs=options.pairs,
        )
        extra = es_diagnostics(losses, stderr, grads)
    else:  # implicit, at the Hessian of the last inner batch
        last_batch = jax.tree.map(lambda x: x[-1], batches)

        def inner_grad(params, mp):
            fn = lambda p: inner_loss(p, final.model_state, mp, last_batch, keys[-1])[0]  # noqa: E731
            return jax.grad(fn)(params)

        outer_grad = jax.grad(outer_loss)(final.params, final.model_state, outer_batch, outer_key)
        grads, residual = estimators.implicit_hypergradient(
            inner_grad,
            final.params,
            meta_params,
            outer_grad,
            cg_iters=options.cg_iters,
            damping=options.damping,
        )
        # Whether θ_K is a fixed point at all, which the hypergradient assumes and the CG
        # residual cannot tell: the inner gradient at θ_K, and relative to that at θ_0.
        at_end = optax.global_norm(inner_grad(final.params, phi))
        at_start = optax.global_norm(inner_grad(jax.lax.stop_gradient(state.params), phi))
        extra = {
            "meta/cg_residual": residual,
            "meta/fixed_point_grad_norm": at_end,
            "meta/fixed_point_rel": at_end / jnp.maximum(at_start, 1e-30),
        }
    num_steps = _num_steps(keys)
    metrics = {**metrics, **{k: jnp.broadcast_to(v, (num_steps,)) for k, v in extra.items()}}
    return loss, grads, final, metrics
