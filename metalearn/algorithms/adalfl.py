"""AdaLFL (Raymond et al.): a learned loss adapted online, in lock-step with the model.

Two pure steps, both one call of the bilevel heart with a one-step unroll:

- `lockstep` (Algorithm 2, online adaptation): from θ_t, one inner step on the learned
  loss gives θ_{t+1}(φ_t); the task loss at θ_{t+1} on a fresh batch gives ∇_φ, and φ
  takes one meta-optimizer step. θ is never reset, and θ_{t+1} is the very iterate the
  meta-gradient was taken through (computed once, not twice).
- `offline_init_step` (Algorithm 1 with S_inner = 1, the ML³ initialisation): the same
  from a freshly initialised θ, which is then discarded; repeated S_init times.
- `offline_unroll_step` (Algorithm 1 with S_inner > 1): S_inner inner steps from a fresh
  θ, differentiated by any one-unroll estimator of the heart; "implicit" (the paper's
  suggestion for S_inner > 1) treats θ_S as a fixed point of the learned loss, so its
  memory and cost do not grow with S_inner.

Cost of `lockstep`: a forward and backward pass at θ_t, a forward at θ_{t+1}, and the
backward through both, about three plain training steps.
"""

import jax
import jax.numpy as jnp
import optax

from metalearn import bilevel
from metalearn.estimators import EstimatorOptions
from metalearn.state import InnerState, MetaState
from metalearn.types import Array, Batch, InnerLossFn, Metrics, OuterLossFn, PRNGKey

ONLINE_ESTIMATORS = ("unrolled",)
# The estimators of one S_inner-step unroll from a fresh θ (`offline_unroll_step`):
# "truncated" and "pes" need windows of a longer unroll, "last_window" a window size.
OFFLINE_ESTIMATORS = ("unrolled", "first_order", "es", "implicit")
# Two exact ways to differentiate the one inner step: a forward-mode JVP of the inner
# loss (`bilevel.one_step_meta_grad`) or backpropagating through the backward pass.
METHODS = ("jvp", "backprop")


def check_online_estimator(name: str) -> None:
    """AdaLFL differentiates exactly one inner step, so only `unrolled` applies.

    θ_t does not depend on φ_t (it is carried in as a constant), so the only second-order
    term of a one-step unroll is the mixed ∂²L/∂θ∂φ: `first_order` would give the very
    same gradient, `truncated` has no window to cut and `last_window` no steps to drop.

    Raises:
      ValueError: naming the valid choices, for an unknown name (`bilevel.ESTIMATORS`)
        and for any but "unrolled".
    """
    bilevel.check_estimator_name(name)
    if name not in ONLINE_ESTIMATORS:
        hint = (
            " (for a one-step unroll from a carried θ it is identical to 'unrolled')"
            if name == "first_order"
            else ""
        )
        raise ValueError(
            f"AdaLFL's meta step differentiates a single inner step, so the estimator must be "
            f"'unrolled'; got {name!r}{hint}."
        )


def check_offline_estimator(name: str, inner_steps: int) -> None:
    """The offline phase's estimator for `inner_steps` (S_inner) inner steps a meta step.

    Raises:
      ValueError: naming the valid choices, for an unknown name, an estimator that needs
        windows, `inner_steps` < 1, or anything but "unrolled" for S_inner = 1 (one step
        from a fresh θ is differentiated exactly and cheaply; it is no fixed point).
    """
    bilevel.check_estimator_name(name)
    if not isinstance(inner_steps, int) or isinstance(inner_steps, bool) or inner_steps < 1:
        raise ValueError(
            f"S_inner (meta.init_inner_steps) must be an integer ≥ 1; got {inner_steps!r}."
        )
    if inner_steps == 1 and name != "unrolled":
        raise ValueError(
            f"With one inner step per offline meta step (meta.init_inner_steps=1) the "
            f"estimator must be 'unrolled' (exact, three plain steps' cost); got {name!r}. "
            "'implicit' assumes θ has reached a fixed point of the learned loss: raise "
            "meta.init_inner_steps (e.g. 20) to use it."
        )
    if name not in OFFLINE_ESTIMATORS:
        raise ValueError(
            f"The offline phase differentiates one unroll of S_inner steps from a fresh θ, "
            f"so its estimator must be one of {OFFLINE_ESTIMATORS}; got {name!r} (it needs "
            "windows of a longer unroll)."
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


def keep_best(best_params, best_error: Array, params, error: Array):
    """Best-φ selection: `(params, error)` if `error < best_error`, else the best so far.

    Pure and jittable (a `jnp.where` over the tree), for the authors' selection of the
    offline phase's φ by short validation runs.
    """
    better = error < best_error
    pick = lambda new, old: jnp.where(better, new, old)  # noqa: E731
    return jax.tree.map(pick, params, best_params), jnp.where(better, error, best_error)


def lockstep(
    inner_state: InnerState,
    meta_state: MetaState,
    batch: Batch,
    meta_batch: Batch,
    key: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    meta_optimizer: optax.GradientTransformation,
    estimator: str = "unrolled",
    method: str = "jvp",
    lookahead=None,
) -> tuple[InnerState, MetaState, Metrics]:
    """One AdaLFL iteration: θ_{t+1} = θ_t − α∇_θ L_φt, then φ_{t+1} from ∇_φ L_task(θ_{t+1}).

    Args:
      inner_state: θ_t with its optimizer and model state.
      meta_state: φ_t and the meta-optimizer state.
      batch: the training batch of the inner step.
      meta_batch: the batch the task loss is measured on at θ_{t+1} (training or
        validation data).
      key: this step's PRNG key.
      inner_loss, outer_loss: as in `metalearn.bilevel` (the learned loss; the task loss).
      optimizer: the base optimizer (differentiated through).
      meta_optimizer: the optimizer of φ.
      estimator: must be "unrolled" (see `check_online_estimator`).
      method: one of `METHODS`; both give the exact gradient, "jvp" usually faster.
      lookahead: optional, for method "jvp": where the task loss is measured, as in
        `bilevel.one_step_meta_grad` (e.g. `bilevel.momentum_lookahead`); θ_{t+1} is
        still the optimizer's step.

    Returns:
      `(inner_state_{t+1}, meta_state_{t+1}, metrics)` with `meta/loss` (task loss at
      θ_{t+1}), `meta/grad_norm` and the inner loss's metrics.
    """
    check_online_estimator(estimator)
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    if lookahead is not None and method != "jvp":
        raise ValueError("A lookahead is taken by method='jvp' only; set method='jvp'.")
    inner_key, outer_key = jax.random.split(key)
    kwargs = dict(inner_loss=inner_loss, outer_loss=outer_loss, optimizer=optimizer)
    if method == "jvp":
        loss, grads, inner_state, metrics = bilevel.one_step_meta_grad(
            meta_state.params,
            inner_state,
            batch,
            inner_key,
            meta_batch,
            outer_key,
            lookahead=lookahead,
            **kwargs,
        )
    else:
        loss, grads, inner_state, metrics = bilevel.meta_grad(
            meta_state.params,
            inner_state,
            jax.tree.map(lambda x: x[None], batch),  # a one-step unroll
            inner_key[None],
            meta_batch,
            outer_key,
            estimator=estimator,
            **kwargs,
        )
        metrics = {k: v[0] for k, v in metrics.items()}
    meta_state = bilevel.meta_step(meta_state, grads, meta_optimizer=meta_optimizer)
    metrics = {
        "meta/loss": loss,
        "meta/grad_norm": optax.global_norm(grads),
        **metrics,
    }
    return inner_state, meta_state, metrics


def offline_init_step(
    meta_state: MetaState,
    fresh_state: InnerState,
    batch: Batch,
    meta_batch: Batch,
    key: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    meta_optimizer: optax.GradientTransformation,
    estimator: str = "unrolled",
    method: str = "jvp",
    lookahead=None,
) -> tuple[MetaState, Metrics]:
    """One step of the ML³ initialisation: `lockstep` from a fresh θ, which is dropped.

    Args:
      meta_state: φ and the meta-optimizer state.
      fresh_state: a newly initialised θ with its optimizer and model state.
      batch, meta_batch, key: as in `lockstep`.
      inner_loss, outer_loss, optimizer, meta_optimizer, estimator, method, lookahead:
        as in `lockstep`.

    Returns:
      `(meta_state, metrics)` as `lockstep` returns them.
    """
    _, meta_state, metrics = lockstep(
        fresh_state,
        meta_state,
        batch,
        meta_batch,
        key,
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=optimizer,
        meta_optimizer=meta_optimizer,
        estimator=estimator,
        method=method,
        lookahead=lookahead,
    )
    return meta_state, metrics


def offline_unroll_step(
    meta_state: MetaState,
    fresh_state: InnerState,
    batches: Batch,
    meta_batch: Batch,
    key: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    meta_optimizer: optax.GradientTransformation,
    estimator: str = "implicit",
    options: EstimatorOptions | None = None,
) -> tuple[MetaState, Metrics]:
    """One step of the ML³ initialisation with S_inner > 1 (Algorithm 1).

    θ takes S_inner steps on ℓ_φ from a fresh initialisation (one a leading entry of
    `batches`); φ takes one meta step on the task loss at θ_S, whose gradient the
    `estimator` gives: "implicit" by the implicit function theorem at θ_S (a conjugate-
    gradient solve with Hessian-vector products of ℓ_φ at the last batch: exact when
    θ_S is a fixed point, its memory independent of S_inner), "unrolled" by
    backpropagating through all S_inner steps, "es" by antithetic perturbations of φ
    (forward unrolls only), "first_order" without second-order terms. θ_S is dropped.

    Args:
      meta_state: φ and the meta-optimizer state.
      fresh_state: a newly initialised θ with its optimizer and model state.
      batches: the inner batches, leaves [S_inner, ...].
      meta_batch: the batch the task loss is measured on at θ_S.
      key: this step's PRNG key.
      inner_loss, outer_loss, optimizer, meta_optimizer: as in `lockstep`.
      estimator: one of `OFFLINE_ESTIMATORS`.
      options: σ and pairs of "es", CG iterations and damping of "implicit".

    Returns:
      `(meta_state, metrics)`: `meta/loss` (task loss at θ_S), `meta/grad_norm`, the
      inner loss's metrics at the last inner step and the estimator's own
      (`meta/cg_residual` for "implicit", `meta/es_loss_spread` for "es").
    """
    num_steps = jax.tree.leaves(batches)[0].shape[0]
    check_offline_estimator(estimator, num_steps)
    inner_key, outer_key = jax.random.split(key)
    loss, grads, _, metrics = bilevel.meta_grad(
        meta_state.params,
        fresh_state,
        batches,
        jax.random.split(inner_key, num_steps),
        meta_batch,
        outer_key,
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=optimizer,
        estimator=estimator,
        options=options,
    )
    meta_state = bilevel.meta_step(meta_state, grads, meta_optimizer=meta_optimizer)
    return meta_state, {
        "meta/loss": loss,
        "meta/grad_norm": optax.global_norm(grads),
        **{k: v[-1] for k, v in metrics.items()},
    }
