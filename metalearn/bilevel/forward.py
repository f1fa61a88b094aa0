"""The estimators that do not backpropagate through the unroll: `ES` (antithetic
evolution strategies) and `Implicit` (implicit differentiation at a fixed point). The
unperturbed unroll runs forward only; the mathematics is in `metalearn.estimators`."""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from metalearn import estimators
from metalearn.bilevel.backprop import _check_state
from metalearn.bilevel.problem import (
    Estimator,
    EstimatorState,
    Problem,
    broadcast_steps,
    check_positive_int,
    check_positive_real,
)
from metalearn.bilevel.unroll import _num_steps, unroll
from metalearn.streams import OuterKey
from metalearn.types import Array, MetaParams, PRNGKey


def noise_key(outer_key: PRNGKey) -> PRNGKey:
    """The key of ES's and PES's perturbations, derived from the outer key."""
    return jax.random.fold_in(outer_key, OuterKey.ES_NOISE)


def window_loss(problem: Problem, meta_params, state, batches, keys, outer_batch, outer_key):
    """A forward unroll and its outer loss: `(loss, (final_state, metrics))`."""
    final, metrics = unroll(
        state,
        meta_params,
        batches,
        keys,
        inner_loss=problem.inner_loss,
        optimizer=problem.optimizer,
    )
    return problem.outer_loss(final.params, final.model_state, outer_batch, outer_key), (
        final,
        metrics,
    )


def es_diagnostics(losses: Array, stderr: Array | None, grads: MetaParams) -> dict[str, Array]:
    """What ES and PES report of an estimate: the spread of the perturbed losses, the norm
    of the estimate's standard error, and that relative to the estimate's norm (near or
    above 1: mostly noise; raise `pairs`). With one pair (stderr None) the spread only."""
    out = {"meta/es_loss_spread": jnp.std(losses)}
    if stderr is not None:
        out["meta/es_stderr"] = stderr
        out["meta/es_rel_stderr"] = stderr / jnp.maximum(optax.global_norm(grads), 1e-30)
    return out


def check_es_settings(owner: str, sigma, pairs) -> None:
    check_positive_real(owner, "sigma", sigma)
    check_positive_int(owner, "pairs", pairs)


_CHOOSING = """
    Choosing σ and pairs for n = dim(φ): the estimate's relative standard error is about
    √(n/P), its cosine with the true gradient about 1/√(1 + n/P), so P of the order of n
    for a usable direction (the default 1,801-parameter loss network: 8 pairs give a
    cosine near 0.05, 512 near 0.5), fewer when many meta steps average the noise out;
    σ small enough that the loss is near-linear within ±σ, large enough that
    L(φ + ε) − L(φ − ε) stays well above float rounding (see `metalearn.estimators`).
    Each estimate reports `meta/es_stderr` and `meta/es_rel_stderr` (near or above 1:
    mostly noise, raise `pairs`)."""


@dataclasses.dataclass(frozen=True)
class ES(Estimator):
    __doc__ = (
        """Antithetic evolution strategies on φ: 2P forward unrolls under φ ± ε, no
    backward pass, so memory does not grow with K and the inner loop need not be
    differentiable. The perturbations come from a key derived from the outer key.

    Attributes:
      sigma: σ, the per-coordinate standard deviation of the perturbations.
      pairs: P, antithetic pairs per estimate.
      window: None for one estimate over all the steps of a call; W for one per W
        steps, each window restarting its perturbations from the unperturbed state
        (truncated ES, biased like `Truncated`; `PES` removes the bias).
"""
        + _CHOOSING
    )

    name = "es"
    sigma: float = 0.01
    pairs: int = 8
    window: int | None = None

    def __post_init__(self):
        check_es_settings("ES", self.sigma, self.pairs)
        check_positive_int("ES", "window", self.window, allow_none=True)

    def estimate(self, problem, meta_params, state, batches, keys, outer_batch, outer_key):
        _check_state("ES", state, problem)
        self._check_window(_num_steps(keys))
        phi = jax.lax.stop_gradient(meta_params)
        args = (state.inner, batches, keys, outer_batch, outer_key)
        loss, (final, metrics) = window_loss(problem, phi, *args)
        grads, losses, stderr = estimators.antithetic_es(
            lambda f: window_loss(problem, f, *args),
            phi,
            noise_key(outer_key),
            sigma=self.sigma,
            pairs=self.pairs,
        )
        extra = es_diagnostics(losses, stderr, grads)
        metrics = {"meta/loss": loss, **metrics, **broadcast_steps(extra, _num_steps(keys))}
        return grads, EstimatorState(inner=jax.lax.stop_gradient(final)), metrics


@dataclasses.dataclass(frozen=True)
class Implicit(Estimator):
    """Implicit differentiation at the end of the unroll, taken to be a fixed point of the
    inner loss (at the last inner batch): a conjugate-gradient solve with Hessian-vector
    products; memory of one inner gradient, exact at convergence.

    Besides the CG residual (`meta/cg_residual`) it reports whether θ_K is a fixed point
    at all, which the hypergradient assumes and the CG residual cannot tell:
    `meta/fixed_point_grad_norm` (‖∇_θ L_inner‖ at θ_K) and `meta/fixed_point_rel` (that
    over the same at θ_0; far from 0, the hypergradient is off: unroll longer).

    Attributes:
      cg_iters: conjugate-gradient iterations of the solve.
      damping: λ in (H + λI) u = ∇_θ L_outer; > 0 for a non-convex inner loss.
      tol: CG's relative tolerance.
      window: None for one estimate over all the steps of a call, W for one per W steps.
    """

    name = "implicit"
    cg_iters: int = 20
    damping: float = 0.0
    tol: float = 1e-10
    window: int | None = None

    def __post_init__(self):
        check_positive_int("Implicit", "cg_iters", self.cg_iters)
        check_positive_real("Implicit", "damping", self.damping, zero=True)
        check_positive_real("Implicit", "tol", self.tol)
        check_positive_int("Implicit", "window", self.window, allow_none=True)

    def estimate(self, problem, meta_params, state, batches, keys, outer_batch, outer_key):
        _check_state("Implicit", state, problem)
        self._check_window(_num_steps(keys))
        phi = jax.lax.stop_gradient(meta_params)
        loss, (final, metrics) = window_loss(
            problem, phi, state.inner, batches, keys, outer_batch, outer_key
        )
        final = jax.lax.stop_gradient(final)
        last_batch = jax.tree.map(lambda x: x[-1], batches)

        def inner_grad(params, mp):
            fn = lambda p: problem.inner_loss(p, final.model_state, mp, last_batch, keys[-1])[0]  # noqa: E731
            return jax.grad(fn)(params)

        outer_grad = jax.grad(problem.outer_loss)(
            final.params, final.model_state, outer_batch, outer_key
        )
        grads, residual = estimators.implicit_hypergradient(
            inner_grad,
            final.params,
            meta_params,
            outer_grad,
            cg_iters=self.cg_iters,
            damping=self.damping,
            tol=self.tol,
        )
        at_end = optax.global_norm(inner_grad(final.params, phi))
        at_start = optax.global_norm(inner_grad(jax.lax.stop_gradient(state.inner.params), phi))
        extra = {
            "meta/cg_residual": residual,
            "meta/fixed_point_grad_norm": at_end,
            "meta/fixed_point_rel": at_end / jnp.maximum(at_start, 1e-30),
        }
        metrics = {"meta/loss": loss, **metrics, **broadcast_steps(extra, _num_steps(keys))}
        return grads, EstimatorState(inner=final), metrics
