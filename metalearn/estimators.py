"""Meta-gradient estimators that do not backpropagate through the unroll.

The mathematics only, on plain functions of φ; `metalearn.bilevel` wires them into
the estimator objects `ES`, `PES` and `Implicit`, which hold their settings.

- Antithetic evolution strategies (`antithetic_es`): for P pairs ε_p ~ N(0, σ²I) in φ's
  flattened space,

      ĝ = 1/(2σ²P) Σ_p (L(φ + ε_p) − L(φ − ε_p)) ε_p,

  an unbiased estimate of the gradient of the Gaussian-smoothed L (of L itself when L
  is quadratic in φ). Only forward unrolls: memory does not grow with their length, and
  the inner loop need not be differentiable. Over windows of a longer unroll that
  restart from the unperturbed state ("truncated ES"), each window's estimate ignores
  how φ moved the state in earlier windows, like truncated backpropagation: biased.
- Persistent evolution strategies (`pes_step`, Vicol et al. 2021): each of the 2P
  particles keeps its own inner state across windows, unrolled under its own φ ± ε_t,
  and each pair accumulates the perturbations it has seen, ξ_p = Σ_{s≤t} ε_{p,s}:

      ĝ_t = 1/(2σ²P) Σ_p (L_t(particle p+) − L_t(particle p−)) ξ_p,

  whose sum over the windows is unbiased for the gradient of the smoothed sum of the
  window losses of the whole unroll (with φ held fixed between windows).
- Choosing σ and P for a φ of n = dim(φ) parameters. Where L is close to linear over
  ±σ, each coordinate of the estimate has variance about ‖∇L‖²/P, so the estimate's
  relative standard error is about √(n/P) and its cosine with the true gradient about
  1/√(1 + n/P): P of the order of n for a usable direction (n = 1,801, the default loss
  network: 8 pairs give a cosine near 0.05, 512 near 0.5), fewer when many meta steps
  average the noise out. σ trades bias for noise: small enough that L is near-linear
  within ±σ (its curvature biases the estimate by O(σ²)), large enough that
  L(φ + ε) − L(φ − ε) stays well above float rounding of L (float32: a relative 1e-7).
  Both ES and PES report `meta/es_stderr`, the norm of the estimate's standard error
  from the spread over the pairs, and `meta/es_rel_stderr`, that over the estimate's
  norm: near or above 1 the estimate is mostly noise, raise P.
- Implicit differentiation (`implicit_hypergradient`): at a fixed point θ* of the inner
  problem, ∇_θ L_in(θ*, φ) = 0, so dθ*/dφ = −H⁻¹ ∂²L_in/∂θ∂φ with H = ∇²_θ L_in, and

      ∇_φ L_out(θ*(φ)) = −∂_φ ⟨∇_θ L_in(θ*, φ), u⟩,   (H + λI) u = ∇_θ L_out(θ*),

  solved by conjugate gradients (`jax.scipy.sparse.linalg.cg`) with Hessian-vector
  products (forward-over-reverse), never forming H. Exact when the unroll has converged;
  memory of one inner gradient, whatever the unroll's length. CG needs H + λI positive
  definite: with a non-convex inner loss, use a damping λ > 0.
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from metalearn.types import Array, MetaParams, Params, PRNGKey


def _noise(key: PRNGKey, flat: Array, sigma: float, pairs: int) -> Array:
    """P perturbations [P, n] of a flat φ, each coordinate N(0, σ²)."""
    return sigma * jax.random.normal(key, (pairs, flat.size), flat.dtype)


def _combine(diffs: Array, directions: Array, sigma: float) -> Array:
    """1/(2σ²P) Σ_p diffs_p directions_p, for diffs [P] and directions [P, n]."""
    return jnp.einsum("p,pn->n", diffs, directions) / (2 * sigma**2 * diffs.shape[0])


def standard_error(diffs: Array, directions: Array, sigma: float) -> Array | None:
    """‖SE‖ of the ES/PES estimate: the estimate is the mean over the P pairs of
    g_p = diffs_p directions_p / (2σ²), so each coordinate's standard error is the spread
    of g_p over the pairs / √P (ddof 1); returned is the norm of that vector. None for
    P = 1 (one pair has no spread to measure)."""
    pairs = diffs.shape[0]
    if pairs == 1:
        return None
    per_pair = diffs[:, None] * directions / (2 * sigma**2)
    variance = jnp.var(per_pair, axis=0, ddof=1) / pairs
    return jnp.sqrt(jnp.sum(variance))


def antithetic_es(
    loss_fn: Callable[[MetaParams], tuple[Array, Any]],
    meta_params: MetaParams,
    key: PRNGKey,
    *,
    sigma: float,
    pairs: int,
) -> tuple[MetaParams, Array, Array | None]:
    """Antithetic ES estimate of ∇_φ L from 2P forward evaluations of `loss_fn`.

    Args:
      loss_fn: `φ -> (L, aux)`; called under `vmap` on the perturbed φ, never
        differentiated (aux is discarded).
      meta_params: φ.
      key: PRNG key of the perturbations.
      sigma, pairs: σ and P, as in `metalearn.bilevel.ES`.

    Returns:
      `(grads shaped like φ, losses [2P], stderr)`: the losses at φ + ε_p then at
      φ − ε_p, and the norm of the estimate's standard error (`standard_error`; None
      for one pair).
    """
    flat, unravel = ravel_pytree(meta_params)
    eps = _noise(key, flat, sigma, pairs)
    perturbed = jnp.concatenate([flat[None] + eps, flat[None] - eps])
    losses = jax.vmap(lambda f: loss_fn(unravel(f))[0])(perturbed)
    diffs = losses[:pairs] - losses[pairs:]
    return unravel(_combine(diffs, eps, sigma)), losses, standard_error(diffs, eps, sigma)


@flax.struct.dataclass
class PESState:
    """The persistent particles of PES: 2P inner states (those under φ + ε_p first, then
    their antithetic twins) and each pair's accumulated perturbation ξ_p [P, n]."""

    particles: Any
    accumulated: Array


def init_pes(state: Any, meta_params: MetaParams, pairs: int) -> PESState:
    """2P copies of the inner `state` with zero accumulated perturbations."""
    flat, _ = ravel_pytree(meta_params)
    particles = jax.tree.map(lambda x: jnp.broadcast_to(x, (2 * pairs, *jnp.shape(x))), state)
    return PESState(particles, jnp.zeros((pairs, flat.size), flat.dtype))


def pes_step(
    window_fn: Callable[[MetaParams, Any], tuple[Array, Any]],
    meta_params: MetaParams,
    pes_state: PESState,
    key: PRNGKey,
    *,
    sigma: float,
) -> tuple[MetaParams, PESState, Array, Array | None]:
    """One window of PES: each particle unrolls from its own state under its own φ.

    Args:
      window_fn: `(φ, inner_state) -> (L_window, next_inner_state)`, the window's unroll
        and its loss; called under `vmap` on the 2P particles, never differentiated.
      meta_params: φ.
      pes_state: the particles and accumulated perturbations (`init_pes` at the start of
        the unroll).
      key: PRNG key of this window's perturbations.
      sigma: σ, as in `metalearn.bilevel.PES`.

    Returns:
      `(grads shaped like φ, next pes_state, losses [2P], stderr)`, stderr as in
      `antithetic_es` (over the pairs' accumulated perturbations).
    """
    flat, unravel = ravel_pytree(meta_params)
    pairs = pes_state.accumulated.shape[0]
    eps = _noise(key, flat, sigma, pairs)
    perturbed = jnp.concatenate([flat[None] + eps, flat[None] - eps])
    losses, particles = jax.vmap(lambda f, s: window_fn(unravel(f), s))(
        perturbed, pes_state.particles
    )
    accumulated = pes_state.accumulated + eps
    diffs = losses[:pairs] - losses[pairs:]
    grads = unravel(_combine(diffs, accumulated, sigma))
    stderr = standard_error(diffs, accumulated, sigma)
    return grads, PESState(particles, accumulated), losses, stderr


def _vdot(a: Any, b: Any) -> Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def implicit_hypergradient(
    inner_grad: Callable[[Params, MetaParams], Params],
    params: Params,
    meta_params: MetaParams,
    outer_grad: Params,
    *,
    cg_iters: int,
    damping: float = 0.0,
    tol: float = 1e-10,
) -> tuple[MetaParams, Array]:
    """∇_φ L_out(θ*(φ)) at a fixed point θ* = `params` of the inner problem.

    Args:
      inner_grad: `(θ, φ) -> ∇_θ L_in(θ, φ)`, differentiable in both.
      params: θ*, where ∇_θ L_in(θ*, φ) ≈ 0 (a constant here).
      meta_params: φ.
      outer_grad: ∇_θ L_out(θ*), shaped like θ.
      cg_iters, damping, tol: CG's iterations, damping λ and relative tolerance
        (`metalearn.bilevel.Implicit`).

    Returns:
      `(grads shaped like φ, relative residual ‖(H + λI)u − v‖ / ‖v‖ of the solve)`: a
      large residual says CG did not converge (raise `cg_iters`) or H + λI is not
      positive definite (raise `damping`).
    """
    params = jax.lax.stop_gradient(params)

    def hvp(u):
        tangent = jax.jvp(lambda p: inner_grad(p, meta_params), (params,), (u,))[1]
        return jax.tree.map(lambda t, x: t + damping * x, tangent, u)

    u, _ = jax.scipy.sparse.linalg.cg(hvp, outer_grad, maxiter=cg_iters, tol=tol)
    u = jax.lax.stop_gradient(u)
    residual = jax.tree.map(jnp.subtract, hvp(u), outer_grad)
    rel = jnp.sqrt(_vdot(residual, residual) / jnp.maximum(_vdot(outer_grad, outer_grad), 1e-30))
    grads = jax.grad(lambda phi: -_vdot(inner_grad(params, phi), u))(meta_params)
    return grads, rel
