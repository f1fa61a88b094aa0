"""The mountain-car shaping experiment (ML³ Fig. 6a-b): task losses, gradients, baselines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ml3_mountain_car
from metalearn import algorithms
from metalearn.algorithms.ml3_mountain_car import (
    GOAL,
    START,
    always_right,
    extra_term,
    task_loss,
)
from metalearn.tasks import control, dynamics


@pytest.fixture(scope="module")
def experiment():
    return algorithms.make(ml3_mountain_car.get_config("smoke"))


def _open_loop(actions):
    """States [T + 1, 2] of the car under a fixed action sequence [T]."""

    def body(state, action):
        nxt = dynamics.mountain_car_step(state, action[None])
        return nxt, nxt

    _, states = jax.lax.scan(body, START, jnp.asarray(actions, jnp.float32))
    return jnp.concatenate([START[None], states])


def test_greedy_full_throttle_never_reaches_the_goal():
    # Why the task is hard: pushing right from rest only rocks the car on the right slope.
    config = ml3_mountain_car.get_config()
    states, _ = control.rollout(
        dynamics.mountain_car_step, always_right, START, 4 * config.env.horizon
    )
    assert float(states[:, 0].max()) < 0.0
    # ... while a swing back first (30 steps left, then right) gets there within the horizon.
    swing = _open_loop([-1.0] * 30 + [1.0] * (config.env.horizon - 30))
    assert float(swing[:, 0].max()) >= GOAL


def test_extra_task_loss_prefers_the_swing_through_the_intermediate_goal():
    c = ml3_mountain_car.get_config().env
    horizon = 60  # neither trajectory reaches the goal yet: the final distances are close
    greedy = _open_loop([1.0] * horizon)
    swing = _open_loop([-1.0] * 35 + [1.0] * (horizon - 35))
    assert float(swing[:, 0].min()) < c.intermediate_goal + 0.15 < float(greedy[:, 0].min())
    plain = [float(task_loss(s, 0.0, c.intermediate_goal)) for s in (greedy, swing)]
    extra = [
        float(task_loss(s, c.extra_weight, c.intermediate_goal, extra="min_distance"))
        for s in (greedy, swing)
    ]
    # The extra term is what separates them: much larger for the greedy trajectory.
    assert extra[0] - plain[0] > 2 * (extra[1] - plain[1]) + 0.02
    # Without the extra term the loss is the one-sided final distance only.
    np.testing.assert_allclose(plain[0], max(GOAL - float(greedy[-1, 0]), 0.0), rtol=1e-6)


def test_early_mean_extra_term_prefers_the_early_swing_back():
    c = ml3_mountain_car.get_config("short").env
    assert c.extra == "early_mean"
    horizon, early = c.horizon, round(c.extra_fraction * (c.horizon + 1))
    greedy = _open_loop([1.0] * horizon)
    swing = _open_loop([-1.0] * 30 + [1.0] * (horizon - 30))
    assert float(swing[:, 0].max()) >= GOAL > float(greedy[:, 0].max())

    def loss(states, **kwargs):
        return float(task_loss(states, c.extra_weight, c.intermediate_goal, **kwargs))

    def term(states, **kwargs):
        return float(extra_term(states[:, 0], c.intermediate_goal, **kwargs))

    kwargs = {"extra": c.extra, "extra_fraction": c.extra_fraction}
    # The swing-back is near x_int early: a clearly smaller term and a smaller total loss.
    assert term(swing, **kwargs) < term(greedy, **kwargs) - 0.2
    assert loss(swing, **kwargs) < loss(greedy, **kwargs)
    np.testing.assert_allclose(
        term(greedy, **kwargs),
        np.abs(np.asarray(greedy[:early, 0]) - c.intermediate_goal).mean(),
        rtol=1e-6,
    )
    # Only the first `extra_fraction` of the trajectory counts: a trajectory that swings
    # back late (after it) gets the greedy one's term.
    late = _open_loop([1.0] * (early - 1) + [-1.0] * 30 + [1.0] * (horizon - early - 29))
    assert float(late[:, 0].min()) < float(greedy[:, 0].min()) - 0.1
    np.testing.assert_allclose(term(late, **kwargs), term(greedy, **kwargs), rtol=1e-6)
    assert term(late, extra="min_distance") < term(greedy, extra="min_distance") - 0.1
    with pytest.raises(ValueError, match="Unknown extra term"):
        extra_term(greedy[:, 0], c.intermediate_goal, extra="nope")


def test_inner_gradient_does_not_use_the_dynamics_derivatives(experiment):
    # A step with the same values but a different Jacobian changes ∇_θ M_φ only if
    # the dynamics are differentiated through: with detached states it must not.
    e = experiment
    phi = jax.tree.map(lambda x: x[0, 0], e.init().params)
    params = e.fresh_params(jax.random.key(3))

    def warped(state, action):
        return dynamics.mountain_car_step(state, action) + 5.0 * (
            state - jax.lax.stop_gradient(state)
        )

    def inner_grad(step, detach):
        def loss(p):
            states, actions = control.rollout(
                step,
                lambda s: e.act(p, s),
                START,
                e.config.env.horizon,
                detach_states=detach,
            )
            return e.learned_loss(phi, states, actions)

        return jax.grad(loss)(params)

    jax.tree.map(
        np.testing.assert_allclose,
        inner_grad(dynamics.mountain_car_step, True),
        inner_grad(warped, True),
    )
    differs = jax.tree.leaves(
        jax.tree.map(
            lambda a, b: float(jnp.abs(a - b).max()),
            inner_grad(dynamics.mountain_car_step, False),
            inner_grad(warped, False),
        )
    )
    assert max(differs) > 1e-6
    # And the experiment's own inner loss is the detached one.
    own = jax.grad(lambda p: e.inner_loss(p, {}, phi, {}, None)[0])(params)
    jax.tree.map(np.testing.assert_allclose, own, inner_grad(dynamics.mountain_car_step, True))


def test_meta_gradient_is_finite_and_nonzero_for_both_variants(experiment):
    e = experiment
    state = e.init()
    new_state, metrics = e.train_chunk(state, 0, 1)
    grad_norm = np.asarray(metrics["meta/grad_norm"])  # [1, variant, seed, ...]
    assert np.isfinite(grad_norm).all() and (grad_norm > 0).all()
    assert np.isfinite(np.asarray(metrics["meta/loss"])).all()
    moved = jax.tree.map(
        lambda a, b: jnp.abs(a - b).max(axis=tuple(range(2, a.ndim))),
        new_state.params,
        state.params,
    )
    assert (np.max(np.stack(jax.tree.leaves(moved)), axis=0) > 0).all()


def test_ilqr_lowers_the_task_cost(experiment):
    e = experiment
    horizon = e.config.env.horizon
    _, _, total, history = control.ilqr(
        e.env.step, e.ilqr_stage_cost, e.ilqr_final_cost, START, jnp.zeros((horizon, 1)), max_iter=3
    )
    history = np.asarray(history)
    assert history[0] == pytest.approx(float(e.ilqr_final_cost(_open_loop([0.0] * horizon)[-1])))
    assert float(total) < 0.9 * history[0]
    assert np.all(np.diff(history) <= 1e-9)
