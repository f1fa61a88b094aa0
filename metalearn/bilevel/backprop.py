"""The estimators that backpropagate through the unroll: `Unrolled`, `Truncated`,
`FirstOrder` and `LastWindow`, and their differentiable objective (`loss`)."""

import dataclasses

import jax
import jax.numpy as jnp

from metalearn.bilevel.probe import check_differentiable_optimizer
from metalearn.bilevel.problem import (
    Estimator,
    EstimatorState,
    Problem,
    check_positive_int,
    check_problem,
    check_tasks,
)
from metalearn.bilevel.unroll import _num_steps, unroll
from metalearn.state import InnerState
from metalearn.types import Array, Batch, MetaParams, Metrics, PRNGKey


def _check_remat(owner: str, remat) -> None:
    if not isinstance(remat, bool):
        raise ValueError(f"{owner}(remat={remat!r}): remat must be True or False.")


def _check_state(owner: str, state, problem) -> None:
    check_problem(problem)
    if not isinstance(state, EstimatorState):
        raise TypeError(
            f"{owner} takes the EstimatorState of its `init(meta_params, inner_state)` (or "
            f"of its last call), not a {type(state).__name__}: wrap a fresh inner state "
            "with estimator.init (estimator.init_tasks for T tasks)."
        )
    if state.particles is not None:
        raise ValueError(
            f"{owner} carries no particles, but the state has some (a PES state?): pass a "
            "state from this estimator's own init."
        )


class _Backprop(Estimator):
    """Shared by the backpropagating estimators: `loss` and its gradient."""

    remat: bool = False
    _first_order = False

    def _tail(self, num_steps: int) -> int | None:
        """How many of the last steps are differentiated (None: all)."""
        del num_steps
        return None

    def loss(
        self,
        problem: Problem,
        meta_params: MetaParams,
        inner_state: InnerState,
        batches: Batch,
        keys: PRNGKey,
        outer_batch: Batch,
        outer_key: PRNGKey,
    ) -> tuple[Array, tuple[InnerState, Metrics]]:
        """L_outer(θ_K(φ)) after the K inner steps from `inner_state`, differentiable in φ
        the way this estimator differentiates it: `(loss, (final_state, metrics [K]))`.

        `inner_state` is an ordinary input: carried across calls, no gradient flows back
        past it; built from what is differentiated (θ₀ = φ, MAML-like), it flows through.
        """
        num_steps = _num_steps(keys)
        self._check_window(num_steps)
        tail = self._tail(num_steps)
        check_differentiable_optimizer(problem.optimizer, inner_state.params)
        head_metrics = None
        if tail is not None:
            cut = num_steps - tail
            head, head_metrics = unroll(
                inner_state,
                meta_params,
                jax.tree.map(lambda x: x[:cut], batches),
                keys[:cut],
                inner_loss=problem.inner_loss,
                optimizer=problem.optimizer,
            )
            # Straight-through: the value of the head's θ, the identity Jacobian to θ₀.
            start = jax.tree.map(
                lambda p, q: p + jax.lax.stop_gradient(q - p), inner_state.params, head.params
            )
            inner_state = head.replace(
                params=start,
                opt_state=jax.lax.stop_gradient(head.opt_state),
                model_state=jax.lax.stop_gradient(head.model_state),
            )
            batches, keys = jax.tree.map(lambda x: x[cut:], batches), keys[cut:]
        final, metrics = unroll(
            inner_state,
            meta_params,
            batches,
            keys,
            inner_loss=problem.inner_loss,
            optimizer=problem.optimizer,
            first_order=self._first_order,
            remat=self.remat,
        )
        loss = problem.outer_loss(final.params, final.model_state, outer_batch, outer_key)
        if head_metrics is not None:
            metrics = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), head_metrics, metrics)
        return loss, (final, metrics)

    def estimate(self, problem, meta_params, state, batches, keys, outer_batch, outer_key):
        _check_state(type(self).__name__, state, problem)
        fn = lambda phi: self.loss(problem, phi, state.inner, batches, keys, outer_batch, outer_key)  # noqa: E731
        (loss, (final, metrics)), grads = jax.value_and_grad(fn, has_aux=True)(meta_params)
        return grads, EstimatorState(inner=final), {"meta/loss": loss, **metrics}

    def estimate_tasks(self, problem, meta_params, state, batches, keys, outer_batches, outer_keys):
        _check_state(type(self).__name__, state, problem)
        check_tasks(state, keys)
        per_task = lambda phi, *xs: self.loss(problem, phi, *xs)  # noqa: E731

        def mean_loss(phi):
            losses, aux = jax.vmap(per_task, in_axes=(None, 0, 0, 0, 0, 0))(
                phi, state.inner, batches, keys, outer_batches, outer_keys
            )
            return losses.mean(), aux

        (loss, (finals, metrics)), grads = jax.value_and_grad(mean_loss, has_aux=True)(meta_params)
        return grads, EstimatorState(inner=finals), {"meta/loss": loss, **metrics}


@dataclasses.dataclass(frozen=True)
class Unrolled(_Backprop):
    """Exact backpropagation through every inner step a call is given.

    Attributes:
      remat: rematerialise each inner step on the backward pass (`jax.checkpoint`):
        memory O(1) in K instead of O(K) activations, for about one more forward pass.
    """

    name = "unrolled"
    remat: bool = False

    def __post_init__(self):
        _check_remat("Unrolled", self.remat)


@dataclasses.dataclass(frozen=True)
class Truncated(_Backprop):
    """Truncated backpropagation: exact through each window of `window` inner steps, one
    estimate per window, the inner state carried to the next window as a constant (no
    gradient crosses a window boundary): biased towards short horizons.

    Attributes:
      window: W, the inner steps of one estimate (`windowed_meta_steps` updates φ after
        each); a call of `estimate` is one window.
      remat: as in `Unrolled`.
    """

    name = "truncated"
    window: int = 1
    remat: bool = False

    def __post_init__(self):
        check_positive_int("Truncated", "window", self.window)
        _check_remat("Truncated", self.remat)


@dataclasses.dataclass(frozen=True)
class FirstOrder(_Backprop):
    """The inner gradient at stop_gradient(θ): every second-order term in θ (∂²L/∂θ²)
    dropped, the mixed ∂²L/∂θ∂φ through which φ moves θ kept.

    Attributes:
      window: None for one estimate over all the steps of a call, W for one per W steps
        (truncated first-order, see `Truncated`).
      remat: as in `Unrolled`.
    """

    name = "first_order"
    window: int | None = None
    remat: bool = False
    _first_order = True

    def __post_init__(self):
        check_positive_int("FirstOrder", "window", self.window, allow_none=True)
        _check_remat("FirstOrder", self.remat)


@dataclasses.dataclass(frozen=True)
class LastWindow(_Backprop):
    """One estimate over the K steps of a call that differentiates only the last `steps`:
    the first K − steps run forward, and the state entering the last ones is cut from
    them (its parameters by a straight-through identity: the value of θ_{K−steps}, the
    Jacobian of θ₀), so the backward pass costs `steps` steps' memory and time.

    Attributes:
      steps: the last inner steps differentiated, 1 <= steps < K.
      remat: as in `Unrolled`, for the differentiated steps.
    """

    name = "last_window"
    steps: int = 1
    remat: bool = False

    def __post_init__(self):
        check_positive_int("LastWindow", "steps", self.steps)
        _check_remat("LastWindow", self.remat)

    def _tail(self, num_steps: int) -> int:
        if self.steps >= num_steps:
            raise ValueError(
                f"LastWindow(steps={self.steps}) differentiates the last steps of an unroll, "
                f"so it needs more than {self.steps} inner steps; this one has {num_steps}. "
                "For all of them use Unrolled()."
            )
        return self.steps
