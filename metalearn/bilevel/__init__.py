"""The bilevel heart: inner steps, scanned unrolls and meta-gradient estimators.

Every algorithm in metalearn is the same two-level loop:

    inner:  θ_{k+1} = θ_k + optax_update(∇_θ L_inner(θ_k, φ; batch_k))
    outer:  φ ← φ − η ∇_φ L_outer(θ_K(φ); outer_batch)

This package holds that loop as pure, jit-, vmap- and scan-able functions and objects
and nothing else: it knows nothing of images, text, files or flags.

- `Problem(inner_loss, outer_loss, optimizer)` is the inner problem, with the loss
  signatures of `metalearn.types`:

      inner_loss(params, model_state, meta_params, batch, key) -> (loss, (model_state, metrics))
      outer_loss(params, model_state, batch, key) -> loss

- An estimator is a small immutable object, validated when built: `Unrolled(remat=)`,
  `Truncated(window=, remat=)`, `FirstOrder(window=, remat=)`, `LastWindow(steps=,
  remat=)`, `ES(sigma=, pairs=, window=)`, `PES(window=, sigma=, pairs=)`,
  `Implicit(cg_iters=, damping=, tol=, window=)` and `OneStep(lookahead=)`. An option
  that does not apply to it cannot be passed. Each has

      state = estimator.init(meta_params, inner_state)        # init_tasks: T tasks
      estimate, state, diagnostics = estimator.estimate(
          problem, meta_params, state, batches, keys, outer_batch, outer_key)

  (`estimate_tasks` for T tasks sharing φ): a gradient shaped like φ, never an update;
  the `EstimatorState` to pass to the next call of the same unroll (`state.inner` the
  inner state after the steps; PES's particles beside it), so that a run split into
  calls gives the numbers of one call; and metrics (`meta/loss`, the inner metrics
  stacked over the K steps, the estimator's own: ES's standard error, implicit's
  fixed-point residual). The backpropagating ones also give their differentiable
  objective, `estimator.loss(problem, meta_params, inner_state, ...)`.
- `windowed_meta_steps` runs K steps in an estimator's windows with a meta update after
  each (truncated backpropagation, PES, AdaLFL's online lock-step); `meta_step` applies
  one estimate.
- `estimator_from_config(name, window=, episode_length=, options=, remat=)` is the one
  place a config's name (`ESTIMATORS`) becomes an object.

Shapes: K is the number of inner steps of an unroll, T the number of tasks. `batches`
is any pytree whose leaves have a leading axis K (one batch a step), `keys` K PRNG keys
([K] typed keys or [K, 2] raw ones).

Differentiating through Adam needs `eps_root > 0`: d√ν/dν is infinite at ν = 0, which
any parameter with an exactly zero gradient reaches, and the meta-gradient turns into
NaN. The backpropagating estimators probe the inner optimizer when they are traced
(`probe`): Adam without `eps_root` is refused with a ValueError naming it; an optimizer
whose meta-gradient is exactly zero (Lion), may be NaN (adafactor) or could not be
checked gets a warning; `unprobed(opt)` skips the probe.

The package: `problem` (`Problem`, `EstimatorState`, the `Estimator` base), `unroll`
(inner steps, unrolls, the outer step), `probe`, `backprop`, `forward` (ES, implicit),
`pes`, `one_step`, `windowed` (the driver) and `config` (names to objects).
"""

from metalearn.bilevel.backprop import FirstOrder, LastWindow, Truncated, Unrolled
from metalearn.bilevel.config import ESTIMATORS, check_estimator_name, estimator_from_config
from metalearn.bilevel.forward import ES, Implicit
from metalearn.bilevel.one_step import OneStep, momentum_lookahead
from metalearn.bilevel.pes import PES
from metalearn.bilevel.probe import check_differentiable_optimizer, unprobed
from metalearn.bilevel.problem import (
    Estimator,
    EstimatorState,
    Problem,
    check_estimator_object,
)
from metalearn.bilevel.unroll import inner_step, meta_step, meta_step_metrics, unroll
from metalearn.bilevel.windowed import windowed_meta_steps

__all__ = [
    "ES",
    "ESTIMATORS",
    "PES",
    "Estimator",
    "EstimatorState",
    "FirstOrder",
    "Implicit",
    "LastWindow",
    "OneStep",
    "Problem",
    "Truncated",
    "Unrolled",
    "check_differentiable_optimizer",
    "check_estimator_object",
    "check_estimator_name",
    "estimator_from_config",
    "inner_step",
    "meta_step",
    "meta_step_metrics",
    "momentum_lookahead",
    "unprobed",
    "unroll",
    "windowed_meta_steps",
]
