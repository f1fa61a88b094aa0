"""Persistent evolution strategies (`PES`, Vicol et al. 2021): ES whose perturbed
particles keep their own inner states across the windows of an unroll."""

import dataclasses

import jax

from metalearn import estimators
from metalearn.bilevel.forward import (
    _CHOOSING,
    check_es_settings,
    es_diagnostics,
    noise_key,
    window_loss,
)
from metalearn.bilevel.problem import (
    Estimator,
    EstimatorState,
    broadcast_steps,
    check_positive_int,
    check_problem,
)
from metalearn.bilevel.unroll import _num_steps


@dataclasses.dataclass(frozen=True)
class PES(Estimator):
    __doc__ = (
        """Persistent ES: 2P particles that keep their own inner states across the windows
    of an unroll and accumulate their perturbations; unbiased for the gradient of the
    summed window losses through the whole unroll, at the cost of ES's variance.

    Its state (`init`, then what each call returns) holds the unperturbed inner state
    and the particles (`metalearn.estimators.PESState`): pass it on, and a run split
    into any number of calls gives the numbers of one call; a fresh `init` for every
    call restarts the particles, which is truncated ES.

    Attributes:
      window: W, the inner steps of one estimate (a call of `estimate` is one window).
      sigma, pairs: as in `ES`.
"""
        + _CHOOSING
    )

    name = "pes"
    window: int = 1
    sigma: float = 0.01
    pairs: int = 8

    def __post_init__(self):
        check_positive_int("PES", "window", self.window)
        check_es_settings("PES", self.sigma, self.pairs)

    def init(self, meta_params, inner_state):
        particles = estimators.init_pes(inner_state, meta_params, self.pairs)
        return EstimatorState(inner=inner_state, particles=particles)

    def estimate(self, problem, meta_params, state, batches, keys, outer_batch, outer_key):
        check_problem(problem)
        particles = _checked_particles(state, self.pairs)
        self._check_window(_num_steps(keys))
        phi = jax.lax.stop_gradient(meta_params)
        loss, (final, metrics) = window_loss(
            problem, phi, state.inner, batches, keys, outer_batch, outer_key
        )

        def particle(f, s):
            value, (end, _) = window_loss(problem, f, s, batches, keys, outer_batch, outer_key)
            return value, end

        grads, particles, losses, stderr = estimators.pes_step(
            particle, phi, particles, noise_key(outer_key), sigma=self.sigma
        )
        extra = es_diagnostics(losses, stderr, grads)
        metrics = {"meta/loss": loss, **metrics, **broadcast_steps(extra, _num_steps(keys))}
        return grads, EstimatorState(inner=final, particles=particles), metrics


def _checked_particles(state, pairs: int) -> estimators.PESState:
    particles = getattr(state, "particles", None)
    if not isinstance(state, EstimatorState) or not isinstance(particles, estimators.PESState):
        raise TypeError(
            "PES takes the EstimatorState of PES.init(meta_params, inner_state) (init_tasks "
            "for T tasks) or of its previous call, with its particles; got "
            f"{type(state).__name__}"
            + (" without PES particles" if isinstance(state, EstimatorState) else "")
            + "."
        )
    given = particles.accumulated.shape[-2]
    if given != pairs:
        raise ValueError(
            f"The PES state has {given} pairs, but this PES has pairs={pairs}: pass the "
            "state the same estimator returned."
        )
    return particles
