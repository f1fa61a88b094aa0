"""AdaLFL (Raymond et al.): a learned loss adapted online, in lock-step with the model.

- `OnlineLearner` (Algorithm 2, online adaptation), for any training loop: `init(φ)` and
  a pure `step(meta_state, inner_state, batch, meta_batch, key)`: from θ_t one inner step
  on the learned loss gives θ_{t+1}(φ_t); the task loss at θ_{t+1} on `meta_batch` gives
  ∇_φ, and φ takes one meta-optimizer step. θ is never reset, and θ_{t+1} is the very
  iterate the meta-gradient was taken through (computed once, not twice).
  `offline_step` is Algorithm 1 with S_inner = 1 (the ML³ initialisation): the same from
  a freshly initialised θ, which is then discarded; repeated S_init times.
- `offline_unroll_step` (Algorithm 1 with S_inner > 1): S_inner inner steps from a fresh
  θ, differentiated by a one-unroll estimator of the heart; `Implicit` (the paper's
  suggestion for S_inner > 1) treats θ_S as a fixed point of the learned loss, so its
  memory and cost do not grow with S_inner.

Cost of a `step`: a forward and backward pass at θ_t, a forward at θ_{t+1}, and the
backward through both, about three plain training steps.

    learner = adalfl.OnlineLearner(bilevel.Problem(learned, task_loss, optax.sgd(0.1)),
                                   meta_optimizer=optax.adam(1e-3))
    meta_state = learner.init(phi)
    for t, (batch, meta_batch) in enumerate(data):
        inner_state, meta_state, metrics = learner.step(
            meta_state, inner_state, batch, meta_batch, jax.random.fold_in(key, t))
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from metalearn import bilevel
from metalearn.state import InnerState, MetaState, init_meta_state
from metalearn.types import Array, Batch, MetaParams, Metrics, PRNGKey

# Two exact ways to differentiate the one inner step: a forward-mode JVP of the inner
# loss (`bilevel.OneStep`) or backpropagating through the backward pass (`Unrolled`).
ONLINE_ESTIMATORS = (bilevel.OneStep, bilevel.Unrolled)
# Their names in configs (`meta.method`).
METHODS = ("jvp", "backprop")
# The estimators of one S_inner-step unroll from a fresh θ (`offline_unroll_step`):
# `Truncated` and `PES` need windows of a longer unroll, `LastWindow` a window size.
OFFLINE_ESTIMATORS = (bilevel.Unrolled, bilevel.FirstOrder, bilevel.ES, bilevel.Implicit)


def check_online_estimator(estimator: bilevel.Estimator) -> None:
    """AdaLFL differentiates exactly one inner step: `OneStep` or `Unrolled` applies.

    θ_t does not depend on φ_t (it is carried in as a constant), so the only second-order
    term of a one-step unroll is the mixed ∂²L/∂θ∂φ: `FirstOrder` would give the very
    same gradient, `Truncated` has no window to cut and `LastWindow` no steps to drop.

    Raises:
      ValueError: naming the valid choices, for any other estimator.
    """
    if not isinstance(estimator, ONLINE_ESTIMATORS):
        hint = (
            " (for a one-step unroll from a carried θ it is identical to Unrolled)"
            if isinstance(estimator, bilevel.FirstOrder)
            else ""
        )
        raise ValueError(
            "AdaLFL's meta step differentiates a single inner step, so its estimator must be "
            f"bilevel.OneStep() (JVP) or bilevel.Unrolled() (config: meta.estimator="
            f"'unrolled', meta.method 'jvp' or 'backprop'); got {estimator!r}{hint}."
        )


def online_estimator(method: str, lookahead=None) -> bilevel.Estimator:
    """The online step's estimator a config's `meta.method` names: "jvp" `OneStep`
    (with its optional `lookahead`), "backprop" `Unrolled`.

    Raises:
      ValueError: for an unknown method, or a lookahead with "backprop".
    """
    if method not in METHODS:
        raise ValueError(f"Unknown meta.method {method!r}; choose one of {METHODS}.")
    if method == "jvp":
        return bilevel.OneStep(lookahead)
    if lookahead is not None:
        raise ValueError(
            "meta.lookahead is taken by meta.method='jvp' only: set that, or meta.lookahead='none'."
        )
    return bilevel.Unrolled()


def check_offline_estimator(estimator: bilevel.Estimator, inner_steps: int) -> None:
    """The offline phase's estimator for `inner_steps` (S_inner) inner steps a meta step.

    Raises:
      ValueError: naming the valid choices, for an estimator that needs windows,
        `inner_steps` < 1, or anything but `Unrolled` for S_inner = 1 (one step from a
        fresh θ is differentiated exactly and cheaply; it is no fixed point).
    """
    bilevel.check_estimator_object(estimator)
    if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 1:
        raise ValueError(
            f"S_inner (meta.init_inner_steps) must be an integer ≥ 1; got {inner_steps!r}."
        )
    if inner_steps == 1 and not isinstance(estimator, bilevel.Unrolled):
        raise ValueError(
            f"With one inner step per offline meta step (meta.init_inner_steps=1) the "
            f"estimator must be Unrolled (exact, three plain steps' cost); got {estimator!r}. "
            "Implicit assumes θ has reached a fixed point of the learned loss: raise "
            "meta.init_inner_steps (e.g. 20) to use it."
        )
    if not isinstance(estimator, OFFLINE_ESTIMATORS) or estimator.window is not None:
        names = ", ".join(cls.__name__ for cls in OFFLINE_ESTIMATORS)
        raise ValueError(
            f"The offline phase differentiates one unroll of S_inner steps from a fresh θ, "
            f"so its estimator must be one of {names} over the whole unroll (window None); "
            f"got {estimator!r} (it needs windows of a longer unroll)."
        )


def logit_gradient_ratio(loss_fn, meta_params, y: Array, logits: Array) -> Array:
    """‖∇_z L_φ(y, softmax(z))‖ / ‖∇_z CE(y, z)‖ at the logits z: the learned loss's step
    relative to cross-entropy's at the same predictions, through the same network.

    The logits are a constant here (`stop_gradient`), so the ratio depends on φ alone:
    differentiable in φ, constant in θ. For plain SGD it is the learning-rate multiplier
    the learned loss implies at the output layer.

    Args:
      loss_fn: `loss(φ, y, probabilities) -> scalar`, the learned loss.
      meta_params: φ.
      y: one-hot labels [B, C].
      logits: the model's logits [B, C].
    """
    z = jax.lax.stop_gradient(logits)
    g = jax.grad(lambda z: loss_fn(meta_params, y, jax.nn.softmax(z)))(z)
    g_ce = (jax.nn.softmax(z) - y) / z.shape[0]  # ∇_z of the batch-mean cross-entropy
    return jnp.linalg.norm(g) / (jnp.linalg.norm(g_ce) + 1e-12)


# How a learned loss's step is sized against cross-entropy's (`scale_to_cross_entropy`).
GRAD_SCALES = ("free", "bounded", "normalised")


def scale_to_cross_entropy(
    loss_fn, meta_params, y: Array, logits: Array, *, mode: str = "free", max_ratio: float = 1.0
) -> tuple[Array, Array]:
    """The learned loss at `logits`, its step sized against cross-entropy's: (loss, ratio).

    With r = `logit_gradient_ratio` (‖∇_z L_φ‖ / ‖∇_z CE‖ over the batch's logits z):

    - "free": L_φ itself; ratio r.
    - "bounded": min(1, max_ratio / r)·L_φ, scaled down only where its step would be more
      than `max_ratio` times cross-entropy's; ratio min(r, max_ratio).
    - "normalised": L_φ / r, whose logit gradient has exactly cross-entropy's norm and
      L_φ's direction (the shape-only learned loss: φ decides how the step is spread over
      examples and classes, never how large it is); ratio 1.

    The scale is a function of φ and of the logits held constant: it changes no direction
    in θ (∇_θ is scaled as a whole), and the meta-gradient sees it (a φ that inflates its
    gradient is normalised back, so the meta-objective cannot reward inflating it).

    Args:
      loss_fn: `loss(φ, y, probabilities) -> scalar`, the learned loss.
      meta_params: φ.
      y: one-hot labels [B, C].
      logits: the model's logits [B, C] (the loss sees their softmax).
      mode: one of `GRAD_SCALES`.
      max_ratio: the bound of "bounded" (> 0).

    Raises:
      ValueError: for an unknown mode, or a bound that is not positive.
    """
    if mode not in GRAD_SCALES:
        raise ValueError(f"Unknown gradient scale {mode!r}; choose one of {GRAD_SCALES}.")
    if mode == "bounded" and not max_ratio > 0:
        raise ValueError(f"The bound of mode='bounded' must be > 0; got max_ratio={max_ratio!r}.")
    loss = loss_fn(meta_params, y, jax.nn.softmax(logits))
    ratio = logit_gradient_ratio(loss_fn, meta_params, y, logits)
    if mode == "free":
        return loss, ratio
    scale = jnp.minimum(1.0, max_ratio / ratio) if mode == "bounded" else 1.0 / ratio
    return scale * loss, scale * ratio


def keep_best(best_params, best_error: Array, params, error: Array):
    """Best-φ selection: `(params, error)` if `error < best_error`, else the best so far.

    Pure and jittable (a `jnp.where` over the tree), for the authors' selection of the
    offline phase's φ by short validation runs.
    """
    better = error < best_error
    pick = lambda new, old: jnp.where(better, new, old)  # noqa: E731
    return jax.tree.map(pick, params, best_params), jnp.where(better, error, best_error)


@dataclasses.dataclass(frozen=True)
class OnlineLearner:
    """AdaLFL's online loss learning, for the user's own training loop (optax-like).

    Attributes:
      problem: the learned loss as the inner loss, the task loss as the outer one, and
        the base optimizer of θ (differentiated through).
      meta_optimizer: the optimizer of φ.
      estimator: `bilevel.OneStep()` (a forward-mode JVP, usually faster; it may take a
        `lookahead`, e.g. `bilevel.momentum_lookahead`: where the task loss is measured,
        θ_{t+1} still the optimizer's step) or `bilevel.Unrolled()` (backpropagation
        through the step); both give the exact gradient.
    """

    problem: bilevel.Problem
    meta_optimizer: optax.GradientTransformation
    estimator: bilevel.Estimator = bilevel.OneStep()

    def __post_init__(self):
        if not isinstance(self.problem, bilevel.Problem):
            raise TypeError(
                "OnlineLearner.problem must be a bilevel.Problem(inner_loss, outer_loss, "
                f"optimizer); got {type(self.problem).__name__}."
            )
        if not callable(getattr(self.meta_optimizer, "update", None)):
            raise TypeError(
                "OnlineLearner.meta_optimizer must be an optax GradientTransformation; got "
                f"{type(self.meta_optimizer).__name__}."
            )
        check_online_estimator(self.estimator)

    def init(self, meta_params: MetaParams) -> MetaState:
        """φ's state: the loss parameters and the meta-optimizer's state."""
        return init_meta_state(meta_params, self.meta_optimizer)

    def step(
        self,
        meta_state: MetaState,
        inner_state: InnerState,
        batch: Batch,
        meta_batch: Batch,
        key: PRNGKey,
    ) -> tuple[InnerState, MetaState, Metrics]:
        """One AdaLFL iteration: θ_{t+1} = θ_t − α∇_θ L_φt, then φ_{t+1} from
        ∇_φ L_task(θ_{t+1}).

        Args:
          meta_state: φ_t and the meta-optimizer state (`init`).
          inner_state: θ_t with its optimizer and model state.
          batch: the training batch of the inner step (no step axis).
          meta_batch: the batch the task loss is measured on at θ_{t+1} (training or
            validation data).
          key: this step's PRNG key.

        Returns:
          `(inner_state_{t+1}, meta_state_{t+1}, metrics)` with `meta/loss` (task loss at
          θ_{t+1}), `meta/grad_norm`, `meta/finite` (0 where the meta-gradient or the
          task loss is not finite: φ is then non-finite too) and the inner loss's metrics.
        """
        inner_key, outer_key = jax.random.split(key)
        grads, state, metrics = self.estimator.estimate(
            self.problem,
            meta_state.params,
            bilevel.EstimatorState(inner=inner_state),
            jax.tree.map(lambda x: x[None], batch),  # a one-step unroll
            inner_key[None],
            meta_batch,
            outer_key,
        )
        loss = metrics.pop("meta/loss")
        meta_state = bilevel.meta_step(meta_state, grads, meta_optimizer=self.meta_optimizer)
        metrics = {
            **bilevel.meta_step_metrics(loss, grads),
            **{k: v[0] for k, v in metrics.items()},
        }
        return state.inner, meta_state, metrics

    def offline_step(
        self,
        meta_state: MetaState,
        fresh_state: InnerState,
        batch: Batch,
        meta_batch: Batch,
        key: PRNGKey,
    ) -> tuple[MetaState, Metrics]:
        """One step of the ML³ initialisation (S_inner = 1): `step` from a freshly
        initialised θ (`fresh_state`), which is dropped. Returns `(meta_state, metrics)`."""
        _, meta_state, metrics = self.step(meta_state, fresh_state, batch, meta_batch, key)
        return meta_state, metrics


def offline_unroll_step(
    meta_state: MetaState,
    fresh_state: InnerState,
    batches: Batch,
    meta_batch: Batch,
    key: PRNGKey,
    *,
    problem: bilevel.Problem,
    estimator: bilevel.Estimator,
    meta_optimizer: optax.GradientTransformation,
) -> tuple[MetaState, Metrics]:
    """One step of the ML³ initialisation with S_inner > 1 (Algorithm 1).

    θ takes S_inner steps on ℓ_φ from a fresh initialisation (one a leading entry of
    `batches`); φ takes one meta step on the task loss at θ_S, whose gradient the
    `estimator` gives: `Implicit` by the implicit function theorem at θ_S (a conjugate-
    gradient solve with Hessian-vector products of ℓ_φ at the last batch: exact when
    θ_S is a fixed point, its memory independent of S_inner), `Unrolled` by
    backpropagating through all S_inner steps, `ES` by antithetic perturbations of φ
    (forward unrolls only), `FirstOrder` without second-order terms. θ_S is dropped.

    Args:
      meta_state: φ and the meta-optimizer state.
      fresh_state: a newly initialised θ with its optimizer and model state.
      batches: the inner batches, leaves [S_inner, ...].
      meta_batch: the batch the task loss is measured on at θ_S.
      key: this step's PRNG key.
      problem: the learned loss, the task loss and the base optimizer.
      estimator: one of `OFFLINE_ESTIMATORS`, over the whole unroll.
      meta_optimizer: the optimizer of φ.

    Returns:
      `(meta_state, metrics)`: `meta/loss` (task loss at θ_S), `meta/grad_norm`, the
      inner loss's metrics at the last inner step and the estimator's own
      (`meta/cg_residual` for `Implicit`, `meta/es_loss_spread` for `ES`).
    """
    num_steps = jax.tree.leaves(batches)[0].shape[0]
    check_offline_estimator(estimator, num_steps)
    inner_key, outer_key = jax.random.split(key)
    grads, _, metrics = estimator.estimate(
        problem,
        meta_state.params,
        estimator.init(meta_state.params, fresh_state),
        batches,
        jax.random.split(inner_key, num_steps),
        meta_batch,
        outer_key,
    )
    loss = metrics.pop("meta/loss")
    meta_state = bilevel.meta_step(meta_state, grads, meta_optimizer=meta_optimizer)
    return meta_state, {
        "meta/loss": loss,
        "meta/grad_norm": optax.global_norm(grads),
        **{k: v[-1] for k, v in metrics.items()},
    }
