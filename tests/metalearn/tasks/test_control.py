"""Rollouts, iLQR (one problem and a batch), expert demonstrations, mountain-car task losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.tasks import control, dynamics

GOAL = dynamics.MOUNTAIN_CAR_GOAL
X_INT = -0.9  # the intermediate goal on the left hill


def test_detached_rollout_differentiates_through_the_actions_only():
    """a_t = θ·s_t, s_{t+1} = s_t + a_t: detached, ∂a_1/∂θ = s_1 only (no ∂s_1/∂θ term)."""
    step = lambda s, a: s + a
    actions = lambda theta, detach: control.rollout(
        step, lambda s: theta * s, jnp.ones(1), 2, detach_states=detach
    )[1]
    theta = jnp.asarray(0.5)
    detached, attached = jax.jit(  # one program: op by op, each scan step would compile
        lambda t: (
            jax.grad(lambda t: actions(t, True)[1, 0])(t),
            jax.grad(lambda t: actions(t, False)[1, 0])(t),
        )
    )(theta)
    np.testing.assert_allclose(detached, 1.5)  # s_1 = 1 + 0.5
    np.testing.assert_allclose(attached, 1.5 + 0.5 * 1.0)  # + θ ∂s_1/∂θ


# iLQR on a point mass: module-level functions, so that every call shares one compilation.


def _pointmass_step(s, a):
    return dynamics.pointmass_step(s, a)


def _effort(s, a):
    return 1e-2 * jnp.sum(a**2)


def _miss(s):
    return 10.0 * jnp.sum((s[:2] - jnp.array([1.0, -0.5])) ** 2)


_ilqr = functools.partial(control.ilqr, _pointmass_step, _effort, _miss, max_iter=30)
_STARTS = jnp.array([[0.0, 0.0, 0.0, 0.0], [0.5, 0.2, 0.0, -0.3]])


def test_ilqr_reaches_a_pointmass_goal_and_leaves_float32_alone():
    states, actions, total, history = _ilqr(_STARTS[0], jnp.zeros((15, 2)))
    assert not jax.config.jax_enable_x64  # diffilqrax's import-time switch was undone
    assert states.dtype == actions.dtype == jnp.float32 and states.shape == (16, 4)
    history = np.asarray(history)
    # The history starts at the cost of the initial (zero) actions: the miss from rest.
    assert history[0] == pytest.approx(float(_miss(_STARTS[0])), rel=1e-6)
    assert np.all(np.diff(history) <= 1e-9) and float(total) == pytest.approx(history[-1])
    assert history[-1] < 0.02 * history[0]
    assert np.linalg.norm(states[-1, :2] - np.array([1.0, -0.5])) < 0.05


def test_ilqr_solves_a_batch_as_it_solves_each_problem():
    batch = _ilqr(_STARTS, jnp.zeros((2, 15, 2)))
    assert batch[0].shape == (2, 16, 4) and batch[3].shape == (2, 31)
    for i in range(2):
        one = _ilqr(_STARTS[i], jnp.zeros((15, 2)))
        for got, want in zip(batch, one, strict=True):
            np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"\[B, S\] with \[B, T, A\]"):
        _ilqr(_STARTS, jnp.zeros((15, 2)))


def test_expert_demos_reach_their_goals_with_the_actions_they_record():
    env = dynamics.pointmass_env()
    goals = jnp.array([[0.3, -0.2], [-0.2, 0.4]])
    demos = control.expert_demos(env, goals, 15, action_cost=1e-3, velocity_cost=1e-3, max_iter=50)
    assert demos["states"].shape == (2, 16, 4) and demos["actions"].shape == (2, 15, 2)
    np.testing.assert_allclose(demos["goal"], goals)
    final = demos["states"][:, -1, :2]
    np.testing.assert_allclose(demos["distance"], jnp.linalg.norm(final - goals, axis=-1))
    assert float(jnp.max(demos["distance"])) < 0.015  # from 0.36 and 0.45 away
    # The recorded (squashed) actions are the forces that produce the recorded states.

    @jax.jit
    @jax.vmap
    def replay(actions):
        return jax.lax.scan(lambda s, a: (env.step(s, a),) * 2, env.initial_state(), actions)[1]

    np.testing.assert_allclose(replay(demos["actions"]), demos["states"][:, 1:], atol=1e-5)
    assert float(jnp.max(jnp.abs(demos["actions"]))) <= env.action_scale


# The mountain car's task losses.


@jax.jit
def _open_loop(actions):
    """States [T + 1, 2] of the car from the start under fixed actions [T]."""
    start = jnp.asarray(dynamics.MOUNTAIN_CAR_START)

    def body(state, action):
        nxt = dynamics.mountain_car_step(state, action[None])
        return nxt, nxt

    _, states = jax.lax.scan(body, start, jnp.asarray(actions, jnp.float32))
    return jnp.concatenate([start[None], states])


def test_min_distance_term_separates_the_swing_through_the_intermediate_goal():
    horizon, weight = 60, 0.2  # neither trajectory reaches the goal yet: close final distances
    greedy = _open_loop(jnp.array([1.0] * horizon))
    swing = _open_loop(jnp.array([-1.0] * 35 + [1.0] * (horizon - 35)))
    assert float(swing[:, 0].min()) < X_INT + 0.15 < float(greedy[:, 0].min())
    plain = [float(control.mountain_car_task_loss(s, 0.0, X_INT)) for s in (greedy, swing)]
    extra = [
        float(control.mountain_car_task_loss(s, weight, X_INT, extra="min_distance"))
        for s in (greedy, swing)
    ]
    # The extra term is what separates them: much larger for the greedy trajectory.
    assert extra[0] - plain[0] > 2 * (extra[1] - plain[1]) + 0.02
    # Without the extra term the loss is the one-sided final distance only.
    np.testing.assert_allclose(plain[0], max(GOAL - float(greedy[-1, 0]), 0.0), rtol=1e-6)
    np.testing.assert_allclose(
        extra[1] - plain[1], weight * float(jnp.min(jnp.abs(swing[:, 0] - X_INT))), atol=1e-6
    )


def test_early_mean_term_looks_only_at_the_early_trajectory():
    horizon, fraction, weight = 75, 1 / 3, 0.5
    early = round(fraction * (horizon + 1))
    greedy = _open_loop(jnp.array([1.0] * horizon))
    swing = _open_loop(jnp.array([-1.0] * 30 + [1.0] * (horizon - 30)))
    assert float(swing[:, 0].max()) >= GOAL > float(greedy[:, 0].max())
    kwargs = {"extra": "early_mean", "extra_fraction": fraction}

    def loss(states):
        return float(control.mountain_car_task_loss(states, weight, X_INT, **kwargs))

    def term(states, **kw):
        return float(control.intermediate_goal_term(states[:, 0], X_INT, **(kw or kwargs)))

    # The swing-back is near x_int early: a clearly smaller term and a smaller total loss.
    assert term(swing) < term(greedy) - 0.2
    assert loss(swing) < loss(greedy)
    np.testing.assert_allclose(
        term(greedy), np.abs(np.asarray(greedy[:early, 0]) - X_INT).mean(), rtol=1e-6
    )
    # Only the first `extra_fraction` of the trajectory counts: a trajectory that swings
    # back late (after it) gets the greedy one's term, unlike with min_distance.
    late = _open_loop(jnp.array([1.0] * (early - 1) + [-1.0] * 30 + [1.0] * (horizon - early - 29)))
    assert float(late[:, 0].min()) < float(greedy[:, 0].min()) - 0.1
    np.testing.assert_allclose(term(late), term(greedy), rtol=1e-6)
    assert term(late, extra="min_distance") < term(greedy, extra="min_distance") - 0.1
    with pytest.raises(ValueError, match="Unknown intermediate-goal term"):
        control.intermediate_goal_term(greedy[:, 0], X_INT, extra="nope")


def test_preactivation_penalty_is_zero_inside_the_bound_and_pushes_back_outside():
    z = jnp.asarray([[-1.9, 0.5], [2.0, 0.0]])
    assert float(control.preactivation_penalty(z, 2.0)) == 0.0
    z = jnp.asarray([-3.0, 1.0, 4.0])
    np.testing.assert_allclose(control.preactivation_penalty(z, 2.0), (1.0 + 4.0) / 3, rtol=1e-6)
    grad = jax.grad(control.preactivation_penalty)(z, 2.0)
    np.testing.assert_allclose(grad, [-2.0 / 3, 0.0, 4.0 / 3], rtol=1e-6)
