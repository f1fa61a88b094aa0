"""The mountain-car shaping experiment (ML³ Fig. 6a-b): the task, gradients, iLQR."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ml3_mountain_car
from experiments.ml3_mountain_car import GOAL, START, MountainCar
from metalearn.tasks import control, dynamics


def _tiny_config():
    c = ml3_mountain_car.get_config("smoke")
    c.seeds = (0,)
    c.env.horizon = 10
    c.fast_compile = True
    return c


@pytest.fixture(scope="module")
def experiment():
    return MountainCar(_tiny_config())


@jax.jit
def _open_loop(actions):
    """States [T + 1, 2] of the car under fixed actions [T]."""

    def body(state, action):
        nxt = dynamics.mountain_car_step(state, action[None])
        return nxt, nxt

    _, states = jax.lax.scan(body, START, actions)
    return jnp.concatenate([START[None], states])


@pytest.mark.parametrize("variant", [None, "short"])
def test_at_the_configs_horizon_a_swing_back_reaches_the_goal_and_full_throttle_does_not(variant):
    # Why the task is hard: pushing right from rest only rocks the car on the right slope,
    horizon = ml3_mountain_car.get_config(variant).env.horizon
    greedy = _open_loop(jnp.ones(4 * horizon))
    assert float(greedy[:, 0].max()) < 0.0
    # ... while a swing back first (30 steps left, then right) gets there within the horizon.
    swing = _open_loop(jnp.concatenate([-jnp.ones(30), jnp.ones(horizon - 30)]))
    assert float(swing[:, 0].max()) >= GOAL


def test_an_unknown_intermediate_goal_term_is_rejected():
    c = _tiny_config()
    c.env.extra = "nope"
    with pytest.raises(ValueError, match="Unknown env.extra 'nope'"):
        MountainCar(c)


@pytest.mark.slow  # compilation-bound (the default tier was at 5 min 5 s in CI)
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
                step, lambda s: e.act(p, s), START, e.config.env.horizon, detach_states=detach
            )
            return e.learned_loss(phi, states, actions)

        return jax.grad(loss)(params)

    @e.jit  # one compiled program for all five gradients (with the smoke run's options)
    def grads():
        own = jax.grad(lambda p: e.inner_loss(p, {}, phi, {}, None)[0])(params)
        true, warp = (dynamics.mountain_car_step, warped)
        detached = inner_grad(true, True), inner_grad(warp, True)
        attached = inner_grad(true, False), inner_grad(warp, False)
        return own, detached, attached

    own, detached, attached = grads()
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6)  # two programs' roundings
    jax.tree.map(close, *detached)
    differs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), *attached))
    assert max(differs) > 1e-6
    # And the experiment's own inner loss is the detached one.
    jax.tree.map(close, own, detached[0])


def test_meta_gradient_is_finite_and_nonzero_for_both_variants(experiment):
    e = experiment
    state = e.init()
    new_state, metrics = e.train_chunk(state, 0, 1)
    grad_norm = np.asarray(metrics["meta/grad_norm"])  # [1, variant, seed]
    assert grad_norm.shape == (1, len(e.VARIANTS), 1)
    assert np.isfinite(grad_norm).all() and (grad_norm > 0).all()
    assert np.isfinite(np.asarray(metrics["meta/loss"])).all()
    moved = jax.tree.map(
        lambda a, b: jnp.abs(a - b).max(axis=tuple(range(2, a.ndim))),
        new_state.params,
        state.params,
    )
    assert (np.max(np.stack(jax.tree.leaves(moved)), axis=0) > 0).all()


def test_the_variants_meta_train_on_different_task_losses(experiment):
    # Same seed, same initial φ: only the task loss's weight γ differs between variants.
    e = experiment
    np.testing.assert_allclose(e.variant_inputs(), [0.0, e.config.env.extra_weight])
    _, metrics = e.train_chunk(e.init(), 0, 1)
    meta_loss = np.asarray(metrics["meta/loss"])[0, :, 0]
    assert meta_loss[1] > meta_loss[0]  # the extra term is non-negative, here positive


@pytest.mark.slow
def test_ilqr_lowers_the_task_cost(experiment):
    e = experiment
    horizon = e.config.env.horizon
    _, _, total, history = control.ilqr(
        e.env.step, e.ilqr_stage_cost, e.ilqr_final_cost, START, jnp.zeros((horizon, 1)), max_iter=3
    )
    history = np.asarray(history)
    assert history[0] == pytest.approx(float(e.ilqr_final_cost(_open_loop(jnp.zeros(horizon))[-1])))
    assert float(total) < 0.9 * history[0]
    assert np.all(np.diff(history) <= 1e-9)
