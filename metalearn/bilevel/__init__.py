"""The bilevel heart: inner steps, scanned unrolls and meta-gradients through them.

Every algorithm in metalearn is the same two-level loop:

    inner:  θ_{k+1} = θ_k + optax_update(∇_θ L_inner(θ_k, φ; batch_k))
    outer:  φ ← φ − η ∇_φ L_outer(θ_K(φ); outer_batch)

This package holds that loop as pure, jit-, vmap- and scan-able functions and nothing
else: it knows nothing of images, text, files or flags. Losses are passed in as
functions with the signatures in `metalearn.types`:

    inner_loss(params, model_state, meta_params, batch, key) -> (loss, (model_state, metrics))
    outer_loss(params, model_state, batch, key) -> loss

Shapes: K is the number of inner steps of an unroll, T the number of tasks, W a window.
`batches` is any pytree whose leaves have a leading axis K (one batch a step), `keys`
K PRNG keys ([K] typed keys or [K, 2] raw ones).

Gradient estimators (`ESTIMATORS`) are always chosen by name, and each function refuses
a name it does not know or one that would do nothing there, with a ValueError that says
what to use (checked in Python when the function is traced, never inside the program):

- ``"unrolled"``: exact backpropagation through every inner step of the unroll.
- ``"truncated"``: a property of `windowed_meta_steps`: exact backpropagation through each
  window of W inner steps and a meta update after each window; the inner state is carried
  from one window to the next as a plain input, so no gradient crosses a window boundary.
  A single `meta_loss` is one window, so there it would do nothing and is refused.
- ``"first_order"``: the inner gradient is evaluated at stop_gradient(θ), which drops
  every second-order term in θ (∂²L/∂θ²) while keeping the mixed term ∂²L/∂θ∂φ through
  which φ influences θ at all; without it the meta-gradient would be zero. It applies to
  one unroll and to every window of `windowed_meta_steps`.
- ``"last_window"``: one `meta_loss` over K steps that differentiates only the last
  `window` of them: the first K − W steps run forward as usual, and the state entering
  the last W is cut from them (its parameters by a straight-through identity, see
  `meta_loss`), so memory and time of the backward pass are those of W steps.
- ``"es"``: antithetic evolution strategies on φ (`metalearn.estimators`): 2P forward
  unrolls under φ ± ε, no backward pass, so memory does not grow with K and the inner
  loop need not be differentiable. In `windowed_meta_steps` with W < K each window
  restarts its perturbations from the unperturbed state: truncated ES, biased like
  "truncated".
- ``"pes"``: `windowed_meta_steps` only: persistent ES (Vicol et al. 2021), 2P
  particles that keep their own inner states across the windows and accumulate their
  perturbations; unbiased for the whole unroll at the cost of ES's variance.
- ``"implicit"``: implicit differentiation at the end of the unroll, taken to be a fixed
  point of the inner loss (evaluated on the last inner batch): a conjugate-gradient
  solve with Hessian-vector products; memory of one inner gradient, exact at
  convergence.

The settings of the last three (σ, pairs, CG iterations, damping) are an
`EstimatorOptions`, passed as `options=`; ES and PES draw their perturbations from
`noise_key`, by default a key derived from the outer key.

ES and PES report the standard error of their estimate (`meta/es_stderr`, and
`meta/es_rel_stderr` relative to its norm); implicit reports, beside its CG residual,
whether θ_K is a fixed point at all (`meta/fixed_point_grad_norm`, the inner gradient
at θ_K, and `meta/fixed_point_rel`, that over the inner gradient at θ_0). PES's
particles are the `estimator_state` that `windowed_meta_steps` takes and returns, so
that a run split into calls gives the numbers of one call.

Differentiating through Adam needs `eps_root > 0`: d√ν/dν is infinite at ν = 0, which
any parameter with an exactly zero gradient reaches, and the meta-gradient turns into
NaN. `meta_loss` (so every meta-gradient here) probes the inner optimizer when it is
traced (`probe`): Adam without `eps_root` is refused with a ValueError naming it, eagerly
or under `jit`, before anything runs; an optimizer whose meta-gradient is exactly zero
(Lion), may be NaN (adafactor) or could not be checked gets a warning; `unprobed(opt)`
skips the probe. `metalearn.make_optimizer(..., differentiated=True)` refuses Adam
without `eps_root` already when it is built.

The package: `checks` (the names and their checks), `probe`, `unroll` (inner steps,
unrolls, the outer step), `backprop` (meta-gradients by backpropagation), `forward`
("es" and "implicit" on one unroll), `one_step` (the one-step JVP meta-gradient),
`windowed` (windows of a long unroll, PES).
"""

from metalearn.bilevel.backprop import meta_grad, meta_grad_over_tasks, meta_loss
from metalearn.bilevel.checks import ESTIMATORS, check_estimator, check_estimator_name
from metalearn.bilevel.one_step import momentum_lookahead, one_step_meta_grad
from metalearn.bilevel.probe import check_differentiable_optimizer, unprobed
from metalearn.bilevel.unroll import inner_step, meta_step, unroll
from metalearn.bilevel.windowed import (
    init_pes_over_tasks,
    pes_meta_grad_over_tasks,
    windowed_meta_steps,
)

__all__ = [
    "ESTIMATORS",
    "check_differentiable_optimizer",
    "check_estimator",
    "check_estimator_name",
    "init_pes_over_tasks",
    "inner_step",
    "meta_grad",
    "meta_grad_over_tasks",
    "meta_loss",
    "meta_step",
    "momentum_lookahead",
    "one_step_meta_grad",
    "pes_meta_grad_over_tasks",
    "unprobed",
    "unroll",
    "windowed_meta_steps",
]
