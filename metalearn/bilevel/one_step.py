"""The exact meta-gradient of a one-step unroll by one forward-mode JVP (`OneStep`,
AdaLFL's lock-step), and the momentum lookahead its objective may measure at."""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from metalearn.bilevel.backprop import _check_state
from metalearn.bilevel.probe import check_differentiable_optimizer
from metalearn.bilevel.problem import Estimator, EstimatorState
from metalearn.bilevel.unroll import _check_steps, _num_steps, inner_value_and_grad
from metalearn.state import InnerState
from metalearn.types import Array


def momentum_lookahead(
    learning_rate: optax.ScalarOrSchedule, momentum: float, weight_decay: float = 0.0
) -> Callable[[Any, Any, Array], Any]:
    """The total displacement −η/(1−μ)·(g + λθ) that a gradient g causes under SGD with
    momentum μ (heavy-ball or Nesterov alike), at the learning rate η of `step`.

    For `OneStep(lookahead=...)`: a one-step meta-objective that sees
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


@dataclasses.dataclass(frozen=True)
class OneStep(Estimator):
    """The exact meta-gradient of a one-step unroll, without backpropagating a backprop.

    For θ₁ = θ₀ + u(g), g = ∇_θ L_inner(θ₀, φ), with θ₀ a constant of φ:

        ∇_φ L_outer(θ₁) = ∇_φ ⟨g(φ), w⟩ = ∇_φ [d/dε L_inner(θ₀ + ε w, φ)]_{ε=0},
        w = (∂θ₁/∂g)ᵀ ∇_θ L_outer(θ₁),

    so it needs a backward pass at θ₀ (g), one at θ₁, a VJP of the optimizer's update
    (element-wise) and one forward-mode JVP of the inner loss at θ₀ along w, whose
    φ-dependent part is only where φ enters (the loss head for a learned loss). The
    same number as `Unrolled` over one step, which transposes the whole backward pass
    at θ₀ instead (much slower for convolutions on some backends).

    A call takes K = 1 step (`batches` leaves [1, ...], `keys` [1]); its metrics keep
    that axis.

    Attributes:
      lookahead: optional `updates = lookahead(g, θ₀, step)`: the outer loss is then
        measured at θ₀ + lookahead(g) and differentiated through it, while the returned
        state still takes the optimizer's step. E.g. `momentum_lookahead`: the whole
        displacement a gradient causes under momentum, not just its first step.
    """

    name = "one_step"
    lookahead: Callable[[Any, Any, Array], Any] | None = None

    def __post_init__(self):
        if self.lookahead is not None and not callable(self.lookahead):
            raise TypeError(
                "OneStep(lookahead=...) takes a function (g, θ, step) -> updates, e.g. "
                f"momentum_lookahead(lr, momentum); got {type(self.lookahead).__name__}."
            )

    def estimate(self, problem, meta_params, state, batches, keys, outer_batch, outer_key):
        _check_state("OneStep", state, problem)
        _check_steps(batches, keys)
        if _num_steps(keys) != 1:
            raise ValueError(
                f"OneStep differentiates a single inner step, but {_num_steps(keys)} were "
                "given: pass batches [1, ...] and keys [1], or use Unrolled() for K steps."
            )
        state = state.inner
        batch, key = jax.tree.map(lambda x: x[0], batches), keys[0]
        inner_loss, optimizer = problem.inner_loss, problem.optimizer
        check_differentiable_optimizer(optimizer, state.params)
        params = state.params
        (loss, (model_state, metrics)), grads = inner_value_and_grad(
            inner_loss, params, state.model_state, meta_params, batch, key
        )

        def apply(g):
            updates, opt_state = optimizer.update(g, state.opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        if self.lookahead is None:
            new_params, apply_vjp, opt_state = jax.vjp(apply, grads, has_aux=True)
            measured = new_params
        else:
            new_params, opt_state = apply(grads)
            lookahead = self.lookahead
            measure = lambda g: optax.apply_updates(params, lookahead(g, params, state.step))  # noqa: E731
            measured, apply_vjp = jax.vjp(measure, grads)
        outer, outer_grads = jax.value_and_grad(problem.outer_loss)(
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
        metrics = jax.tree.map(lambda x: x[None], {"inner/loss": loss, **metrics})
        return meta_grads, EstimatorState(inner=final), {"meta/loss": outer, **metrics}
