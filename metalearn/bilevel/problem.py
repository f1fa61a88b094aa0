"""The bilevel problem (`Problem`), the state an estimator carries (`EstimatorState`),
and what every gradient estimator has in common (`Estimator`)."""

import dataclasses
import math
import numbers
from typing import Any, ClassVar

import flax
import jax
import jax.numpy as jnp
import optax

from metalearn.state import InnerState
from metalearn.types import Array, Batch, InnerLossFn, MetaParams, Metrics, OuterLossFn, PRNGKey


@dataclasses.dataclass(frozen=True)
class Problem:
    """The inner problem a meta-gradient is taken through, in one object.

    Attributes:
      inner_loss: `(params, model_state, meta_params, batch, key) -> (loss, (model_state,
        metrics))`, the loss θ is trained on (a learned loss ℓ_φ, say); a scalar loss.
      outer_loss: `(params, model_state, batch, key) -> loss`, the objective of φ measured
        at the end of the inner steps (the task loss, say).
      optimizer: the inner optax optimizer, differentiated through by the backpropagating
        estimators (Adam needs `eps_root > 0`: see `check_differentiable_optimizer`).
    """

    inner_loss: InnerLossFn
    outer_loss: OuterLossFn
    optimizer: optax.GradientTransformation

    def __post_init__(self):
        for name in ("inner_loss", "outer_loss"):
            if not callable(getattr(self, name)):
                raise TypeError(
                    f"Problem.{name} must be a function (see `metalearn.types`); got "
                    f"{type(getattr(self, name)).__name__}."
                )
        opt = self.optimizer
        if not (callable(getattr(opt, "init", None)) and callable(getattr(opt, "update", None))):
            raise TypeError(
                "Problem.optimizer must be an optax GradientTransformation (e.g. "
                f"optax.sgd(0.1)); got {type(opt).__name__}."
            )


@flax.struct.dataclass
class EstimatorState:
    """What an estimator carries from one estimate to the next: the (unperturbed) inner
    state, and for PES its perturbed particles (`metalearn.estimators.PESState`; None for
    the others). Over T tasks every leaf has a leading task axis."""

    inner: InnerState
    particles: Any = None


def check_positive_int(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{owner}({name}={value!r}): {name} must be an integer >= 1{extra}.")


def check_positive_real(owner: str, name: str, value: Any, zero: bool = False) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise ValueError(f"{owner}({name}={value!r}): {name} must be a finite number {bound}.")


def broadcast_steps(extra: dict[str, Array], num_steps: int) -> dict[str, Array]:
    """Scalar diagnostics broadcast over the K steps, to sit beside the inner metrics."""
    return {k: jnp.broadcast_to(v, (num_steps,)) for k, v in extra.items()}


def check_problem(problem: Any) -> None:
    """Refuses anything but a `Problem` where an estimator takes one."""
    if not isinstance(problem, Problem):
        raise TypeError(
            "An estimator takes the inner problem as bilevel.Problem(inner_loss, outer_loss, "
            f"optimizer); got {type(problem).__name__}."
        )


def check_estimator_object(estimator: Any) -> None:
    """Refuses anything but an `Estimator` object (a config name, say)."""
    if not isinstance(estimator, Estimator):
        raise TypeError(
            "estimator must be an Estimator object (e.g. Truncated(window=1), PES(window=10)); "
            f"got {estimator!r}. From a config name use estimator_from_config."
        )


def check_tasks(state: Any, keys: PRNGKey) -> None:
    """Refuses an estimator state whose task axis is not that of the data (`keys` [T, K])."""
    tasks = jax.tree.leaves(keys)[0].shape[0]
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(state)}
    if sizes and sizes != {tasks}:
        raise ValueError(
            f"The data has {tasks} tasks (the keys' leading axis), but the estimator state's "
            f"leading axes are {sorted(sizes, key=str)}: build it with "
            "estimator.init_tasks(meta_params, inner_states) from the inner states of the "
            "same tasks, or pass on the state the previous call of the same run returned."
        )


class Estimator:
    """A gradient estimator of ∇_φ L_outer(θ_K(φ)): an immutable, validated object.

    `window` is the number of inner steps one estimate covers: None for all the steps a
    call is given (one estimate per call); W for one estimate per W steps, the inner
    state carried from each window to the next (`windowed_meta_steps`).

    Every estimator returns `(estimate, state, diagnostics)`: a gradient shaped like φ
    (never an update: apply it with `meta_step` or any optax optimizer), the
    `EstimatorState` to pass to the next call of the same unroll (its `inner` the inner
    state after the steps), and a dict of metrics: `meta/loss` (the outer loss at the
    unperturbed θ_K), the inner metrics stacked over the steps, and the estimator's own.
    """

    name: ClassVar[str]
    window: int | None = None

    def _check_window(self, num_steps: int) -> None:
        """Refuses an `estimate` over other than `window` steps (one window a call)."""
        if self.window is not None and num_steps != self.window:
            raise ValueError(
                f"{self!r} estimates one window of {self.window} inner steps a call, but "
                f"{num_steps} were given: pass {self.window}, or run the {num_steps} steps "
                "through windowed_meta_steps, which cuts them into windows."
            )

    def init(self, meta_params: MetaParams, inner_state: InnerState) -> EstimatorState:
        """The state at the start of an unroll from `inner_state` (one task)."""
        del meta_params
        return EstimatorState(inner=inner_state)

    def init_tasks(self, meta_params: MetaParams, inner_states: InnerState) -> EstimatorState:
        """`init` for T tasks side by side, `inner_states` leaves [T, ...]."""
        return jax.vmap(lambda s: self.init(meta_params, s))(inner_states)

    def estimate(
        self,
        problem: Problem,
        meta_params: MetaParams,
        state: EstimatorState,
        batches: Batch,
        keys: PRNGKey,
        outer_batch: Batch,
        outer_key: PRNGKey,
    ) -> tuple[MetaParams, EstimatorState, Metrics]:
        """The estimate of one task's ∇_φ over the K steps of `batches` ([K, ...]) and
        `keys` ([K] typed or [K, 2]), the outer loss on `outer_batch` at θ_K."""
        raise NotImplementedError

    def estimate_tasks(
        self,
        problem: Problem,
        meta_params: MetaParams,
        state: EstimatorState,
        batches: Batch,
        keys: PRNGKey,
        outer_batches: Batch,
        outer_keys: PRNGKey,
    ) -> tuple[MetaParams, EstimatorState, Metrics]:
        """The estimate of the mean outer loss of T tasks sharing φ: `estimate` with a
        task axis on `state`, `batches` [T, K, ...], `keys` [T, K], `outer_batches`
        [T, ...] and `outer_keys` [T]. `meta/loss` is the mean over the tasks, the
        other metrics keep the task axis ([T, K])."""
        check_tasks(state, keys)
        one = lambda s, b, k, ob, ok: self.estimate(problem, meta_params, s, b, k, ob, ok)  # noqa: E731
        grads, state, metrics = jax.vmap(one)(state, batches, keys, outer_batches, outer_keys)
        metrics = {**metrics, "meta/loss": metrics["meta/loss"].mean()}
        return jax.tree.map(lambda g: g.mean(0), grads), state, metrics
