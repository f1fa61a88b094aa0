"""The exact meta-gradient of a one-step unroll by one forward-mode JVP (AdaLFL's
lock-step), and the momentum lookahead its one-step objective may measure at."""

from collections.abc import Callable
from typing import Any

import jax
import optax

from metalearn.bilevel.probe import check_differentiable_optimizer
from metalearn.state import InnerState
from metalearn.types import (
    Array,
    Batch,
    InnerLossFn,
    MetaParams,
    Metrics,
    OuterLossFn,
    PRNGKey,
)


def momentum_lookahead(
    learning_rate: optax.ScalarOrSchedule, momentum: float, weight_decay: float = 0.0
) -> Callable[[Any, Any, Array], Any]:
    """The total displacement −η/(1−μ)·(g + λθ) that a gradient g causes under SGD with
    momentum μ (heavy-ball or Nesterov alike), at the learning rate η of `step`.

    For `one_step_meta_grad(..., lookahead=...)`: a one-step meta-objective that sees
    only the first momentum step (−η(1+μ)g for Nesterov) underestimates the step a loss
    implies by 1/((1−μ)(1+μ)), about 5× at μ = 0.9, and tunes it that much too large.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1); got {momentum}.")

    def lookahead(grads, params, step):
        lr = learning_rate(step) if callable(learning_rate) else learning_rate
        scale = -lr / (1.0 - momentum)
        return jax.tree.map(lambda g, p: scale * (g + weight_decay * p), grads, params)

    return lookahead


def one_step_meta_grad(
    meta_params: MetaParams,
    state: InnerState,
    batch: Batch,
    key: PRNGKey,
    outer_batch: Batch,
    outer_key: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    lookahead: Callable[[Any, Any, Array], Any] | None = None,
) -> tuple[Array, MetaParams, InnerState, Metrics]:
    """The exact meta-gradient of a one-step unroll, without backpropagating a backprop.

    For θ₁ = θ₀ + u(g), g = ∇_θ L_inner(θ₀, φ), with θ₀ a constant of φ:

        ∇_φ L_outer(θ₁) = ∇_φ ⟨g(φ), w⟩ = ∇_φ [d/dε L_inner(θ₀ + ε w, φ)]_{ε=0},
        w = (∂θ₁/∂g)ᵀ ∇_θ L_outer(θ₁),

    so it needs a backward pass at θ₀ (g), one at θ₁, a VJP of the optimizer's update
    (element-wise) and one forward-mode JVP of the inner loss at θ₀ along w, whose
    φ-dependent part is only where φ enters (the loss head for a learned loss). The
    same number as `meta_grad` over one step, which transposes the whole backward pass
    at θ₀ instead (much slower for convolutions on some backends).

    Args:
      meta_params: φ.
      state: θ₀ with its optimizer and model state (a constant of φ).
      batch, key: the one inner step's batch and key (no step axis).
      outer_batch, outer_key: what the outer loss is evaluated on at θ₁.
      inner_loss, outer_loss, optimizer: as in `meta_loss`.
      lookahead: optional `updates = lookahead(g, θ₀, step)`: the outer loss is then
        measured at θ₀ + lookahead(g) and differentiated through it, while the returned
        state still takes the optimizer's step. E.g. `momentum_lookahead`: the whole
        displacement a gradient causes under momentum, not just its first step.

    Returns:
      `(loss, grads, final_state, inner_metrics)` as `meta_grad` with K = 1, the metrics
      without a step axis.
    """
    check_differentiable_optimizer(optimizer, state.params)
    params = state.params
    (loss, (model_state, metrics)), grads = jax.value_and_grad(inner_loss, has_aux=True)(
        params, state.model_state, meta_params, batch, key
    )

    def apply(g):
        updates, opt_state = optimizer.update(g, state.opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    if lookahead is None:
        new_params, apply_vjp, opt_state = jax.vjp(apply, grads, has_aux=True)
        measured = new_params
    else:
        new_params, opt_state = apply(grads)
        measure = lambda g: optax.apply_updates(params, lookahead(g, params, state.step))  # noqa: E731
        measured, apply_vjp = jax.vjp(measure, grads)
    outer, outer_grads = jax.value_and_grad(outer_loss)(
        measured, model_state, outer_batch, outer_key
    )
    (direction,) = apply_vjp(outer_grads)

    def directional_derivative(phi):
        fn = lambda p: inner_loss(p, state.model_state, phi, batch, key)[0]  # noqa: E731
        return jax.jvp(fn, (params,), (direction,))[1]

    meta_grads = jax.grad(directional_derivative)(meta_params)
    final = InnerState(
        params=new_params, opt_state=opt_state, model_state=model_state, step=state.step + 1
    )
    return outer, meta_grads, final, {"inner/loss": loss, **metrics}
