"""Policy rollouts, a trajectory optimiser and task losses for the ML³ control experiments.

- `rollout` runs a policy through a pure step function, optionally detaching the states
  so that gradients reach the policy parameters only through the actions: that is how a
  learned loss M_φ(τ, g) trains a policy without a model of the dynamics (ML³, Sec. III-B1).
- `ilqr` is iterative LQR from the maintained `diffilqrax` library, solved in float64,
  one problem or a batch at once; `expert_demos` uses it for goal-reaching experts.
- The mountain car's task losses (ML³ Fig. 6a-b): the distance to the goal and the
  intermediate-goal term that shapes the swing back.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from metalearn.tasks import dynamics
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
    horizon, action_dim = actions_init.shape[-2:]
    model = typs.System(
        cost=lambda t, x, u, theta: stage_cost(x, u),
        costf=lambda x, theta: final_cost(x),
        dynamics=lambda t, x, u, theta: step(x, u),
        dims=typs.ModelDims(n=state0.shape[-1], m=action_dim, horizon=horizon, dt=1.0),
    )

    def solve(x0, u0):
        (states, actions, _), total, history = ilqr_lib.ilqr_solver(
            model, typs.iLQRParams(x0=x0, theta=None), u0, max_iter=max_iter, kkt_tol=1e-8
        )
        return states, actions, total, history

    if state0.ndim == 1:
        return solve(state0, actions_init)
    # One problem after another in one program: each stops at its own convergence, and the
    # program compiles as fast as one problem's (`vmap` runs every problem until the slowest
    # has converged and, on CPU, takes longer to compile than the solves it batches).
    return jax.lax.map(lambda args: solve(*args), (state0, actions_init))


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
    the compilation cache. A leading batch axis B on `state0` and `actions_init` solves B
    problems in one call, with the same results as one at a time.

    Args:
      step: `(state, action) -> state`, pure and twice differentiable where it matters.
      stage_cost: `(state, action) -> scalar`.
      final_cost: `state -> scalar`.
      state0: the initial state [S] (or [B, S]).
      actions_init: the initial open-loop actions [T, A] (or [B, T, A]).
      max_iter: the iteration limit (fewer run once the KKT residual is below 1e-8).

    Returns:
      `(states [T + 1, S], actions [T, A], total cost, cost history [max_iter + 1])`, the
      history holding the cost before the first iteration and after each one (each with
      the leading axis B for a batch).
    """
    if jnp.ndim(state0) not in (1, 2) or jnp.ndim(actions_init) != jnp.ndim(state0) + 1:
        raise ValueError(
            f"state0 [S] with actions_init [T, A], or a batch [B, S] with [B, T, A]; got "
            f"shapes {state0.shape} and {actions_init.shape}."
        )
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


def expert_demos(
    env: dynamics.Env,
    goals: Array,
    horizon: int,
    *,
    action_cost: float,
    velocity_cost: float,
    max_iter: int,
    distance_scale: float = 1.0,
    init_action: float = 0.1,
) -> dict[str, Array]:
    """iLQR experts on the true dynamics of `env`, one per goal, solved as one batch.

    Each expert minimises ‖position(s_T) − g‖² / distance_scale² + velocity_cost ‖q̇_T‖²
    + action_cost Σ_t ‖u_t‖² over open-loop actions squashed as a policy's are
    (a = tanh(u) · action_scale), from the start state and u = `init_action` everywhere.
    The goal rides along in the state, so one compiled solver serves every goal.

    Args:
      env: the environment; its state is (q, q̇), the second half the velocities.
      goals: targets [G, goal_dim].
      horizon: control steps T.
      action_cost: weight of the squared pre-squash actions u.
      velocity_cost: weight of the final squared velocities.
      max_iter: iLQR's iteration limit.
      distance_scale: the unit of the final distance (e.g. the arm's reach).
      init_action: the constant initial u (a small push off a singular start pose).

    Returns:
      {'goal' [G, goal_dim], 'states' [G, T + 1, S], 'actions' [G, T, A] (squashed, i.e.
      the torques applied), 'distance' [G] (final distance of the end effector to g)}.
    """
    scale, n = env.action_scale, env.state_dim

    def step(sg, u):
        return jnp.concatenate([env.step(sg[:n], scale * jnp.tanh(u)), sg[n:]])

    def stage_cost(sg, u):
        del sg
        return action_cost * jnp.sum(u**2)

    def final_cost(sg):
        s, goal = sg[:n], sg[n:]
        miss = jnp.sum((env.position(s) - goal) ** 2) / distance_scale**2
        return miss + velocity_cost * jnp.sum(s[n // 2 :] ** 2)

    start = env.initial_state()
    goals = jnp.asarray(goals, start.dtype)
    num = goals.shape[0]
    sg, u, _, _ = ilqr(
        step,
        stage_cost,
        final_cost,
        jnp.concatenate([jnp.broadcast_to(start, (num, n)), goals], axis=-1),
        jnp.full((num, horizon, env.action_dim), init_action, start.dtype),
        max_iter=max_iter,
    )
    states = sg[:, :, :n]
    final = jax.vmap(env.position)(states[:, -1])
    return {
        "goal": goals,
        "states": states,
        "actions": scale * jnp.tanh(u),
        "distance": jnp.linalg.norm(final - goals, axis=-1),
    }


# The mountain car's task losses (ML³ Fig. 6a-b).

INTERMEDIATE_GOAL_TERMS = ("min_distance", "early_mean")


def mountain_car_goal_distance(position: Array) -> Array:
    """Distance to the mountain car's goal region x ≥ 0.45 (zero inside it)."""
    return jax.nn.relu(dynamics.MOUNTAIN_CAR_GOAL - position)


def intermediate_goal_term(
    positions: Array,
    intermediate_goal: float,
    extra: str = "min_distance",
    extra_fraction: float = 1 / 3,
) -> Array:
    """A term rewarding a trajectory for coming near an intermediate goal x_int.

    Args:
      positions: [T + 1] positions x_0 … x_T.
      intermediate_goal: x_int (for the mountain car: on the left hill).
      extra: ``"min_distance"``: min_t |x_t − x_int|, how close the trajectory ever comes to
        x_int; ``"early_mean"``: the mean of |x_t − x_int| over the first
        `extra_fraction` of the trajectory (at least one state), which asks the car to be
        near x_int early, as in the public ML³ code.
      extra_fraction: the fraction of the trajectory ``"early_mean"`` averages over.

    Returns:
      A scalar.
    """
    distances = jnp.abs(positions - intermediate_goal)
    if extra == "min_distance":
        return jnp.min(distances)
    if extra == "early_mean":
        num = max(1, int(round(extra_fraction * positions.shape[0])))
        return jnp.mean(distances[:num])
    raise ValueError(
        f"Unknown intermediate-goal term {extra!r}; known: {', '.join(INTERMEDIATE_GOAL_TERMS)}."
    )


def mountain_car_task_loss(
    states: Array,
    extra_weight: Array | float,
    intermediate_goal: float,
    *,
    extra: str = "min_distance",
    extra_fraction: float = 1 / 3,
) -> Array:
    """The mountain car's meta-train task loss of a trajectory.

    Args:
      states: [T + 1, 2] (position, velocity).
      extra_weight: γ; 0 gives the plain final distance.
      intermediate_goal: x_int on the left hill.
      extra: the form of the intermediate-goal term (see `intermediate_goal_term`).
      extra_fraction: the fraction of the trajectory the ``"early_mean"`` term looks at.

    Returns:
      max(g − x_T, 0) + γ · intermediate_goal_term(x, x_int), a scalar.
    """
    positions = states[:, 0]
    extra_value = intermediate_goal_term(positions, intermediate_goal, extra, extra_fraction)
    return mountain_car_goal_distance(positions[-1]) + extra_weight * extra_value


def preactivation_penalty(preactivations: Array, bound: float) -> Array:
    """Mean squared excess of |z| over `bound`: keeps a tanh-squashed policy's output
    a = tanh(z) off its limits, where ∂a/∂z and with it every gradient to the policy vanish.

    Zero while |z| ≤ bound (tanh(2) = 0.96 of the limit), quadratic beyond, so a loss that
    pushes the actions outward meets a growing opposing gradient instead of a flat tanh.

    Args:
      preactivations: z [...], the policy's outputs before the tanh.
      bound: where the penalty starts (> 0).

    Returns:
      A scalar.
    """
    return jnp.mean(jnp.maximum(jnp.abs(preactivations) - bound, 0.0) ** 2)
