"""Policy rollouts and a trajectory optimiser for the ML³ control experiments.

`rollout` runs a policy through a pure step function, optionally detaching the states so
that gradients reach the policy parameters only through the actions: that is how a
learned loss M_φ(τ, g) trains a policy without a model of the dynamics (ML³, Sec. III-B1).

`ilqr` is iterative LQR from the maintained `diffilqrax` library, solved in float64.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from metalearn.types import Array


def rollout(
    step: Callable[[Array, Array], Array],
    policy: Callable[[Array], Array],
    state0: Array,
    horizon: int,
    *,
    detach_states: bool = False,
) -> tuple[Array, Array]:
    """Runs `policy` for `horizon` steps of `step` from `state0`.

    Args:
      step: `(state, action) -> state`, pure.
      policy: `state -> action` (close over the parameters and the goal).
      state0: the initial state [S].
      horizon: T.
      detach_states: stop gradients through every state, so that d(τ)/dθ reaches the
        policy parameters only through the actions a_t = π_θ(s_t), not through the
        dynamics. The states are then data, as in a rollout on a real system.

    Returns:
      `(states [T + 1, S], actions [T, A])`.
    """
    maybe_detach = jax.lax.stop_gradient if detach_states else (lambda s: s)

    def body(state, _):
        state = maybe_detach(state)
        action = policy(state)
        # Detached, the next state is cut from the graph anyway: skip differentiating `step`.
        return step(state, maybe_detach(action)), (state, action)

    final, (states, actions) = jax.lax.scan(body, state0, None, length=horizon)
    return jnp.concatenate([states, maybe_detach(final)[None]]), actions


@functools.cache
def _import_diffilqrax():
    """Imports diffilqrax without its import-time side effect of enabling float64 globally.

    Called outside any `jax.enable_x64` scope, so that the flag restored is the global one.
    """
    before = jax.config.jax_enable_x64
    try:
        from diffilqrax import ilqr as ilqr_lib
        from diffilqrax import typs
    finally:
        jax.config.update("jax_enable_x64", before)
    return ilqr_lib, typs


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 5))
def _solve(step, stage_cost, final_cost, state0, actions_init, max_iter):
    ilqr_lib, typs = _import_diffilqrax()
    horizon, action_dim = actions_init.shape
    model = typs.System(
        cost=lambda t, x, u, theta: stage_cost(x, u),
        costf=lambda x, theta: final_cost(x),
        dynamics=lambda t, x, u, theta: step(x, u),
        dims=typs.ModelDims(n=state0.shape[-1], m=action_dim, horizon=horizon, dt=1.0),
    )
    (states, actions, _), total, history = ilqr_lib.ilqr_solver(
        model, typs.iLQRParams(x0=state0, theta=None), actions_init, max_iter=max_iter, kkt_tol=1e-8
    )
    return states, actions, total, history


def ilqr(
    step: Callable[[Array, Array], Array],
    stage_cost: Callable[[Array, Array], Array],
    final_cost: Callable[[Array], Array],
    state0: Array,
    actions_init: Array,
    *,
    max_iter: int = 100,
) -> tuple[Array, Array, Array, Array]:
    """Iterative LQR (diffilqrax: Levenberg-Marquardt regularisation, Armijo line search).

    Minimises Σ_t stage_cost(s_t, a_t) + final_cost(s_T) over open-loop actions, in float64
    whatever the caller's precision, and returns the results in the dtype of `state0`.
    The functions must be hashable (module-level functions or fixed closures): they key
    the compilation cache.

    Args:
      step: `(state, action) -> state`, pure and twice differentiable where it matters.
      stage_cost: `(state, action) -> scalar`.
      final_cost: `state -> scalar`.
      state0: the initial state [S].
      actions_init: the initial open-loop actions [T, A].
      max_iter: the iteration limit (fewer run once the KKT residual is below 1e-8).

    Returns:
      `(states [T + 1, S], actions [T, A], total cost, cost history [max_iter + 1])`, the
      history holding the cost before the first iteration and after each one.
    """
    dtype = state0.dtype
    _import_diffilqrax()
    with jax.enable_x64(True):
        out = _solve(
            step,
            stage_cost,
            final_cost,
            jnp.asarray(state0, jnp.float64),
            jnp.asarray(actions_init, jnp.float64),
            max_iter,
        )
        out = jax.device_get(out)
    return tuple(jnp.asarray(x, dtype) for x in out)
