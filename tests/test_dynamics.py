"""The differentiable simulators: closed forms, energy, finite differences, rollouts, iLQR."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from metalearn.tasks import control, dynamics


def _f64(arm):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), arm)


def test_two_link_mass_matrix_and_coriolis_match_the_textbook_closed_form(float64):
    arm = _f64(dynamics.reacher_arm())
    q, qd = jnp.array([0.3, -0.7]), jnp.array([1.0, 2.0])
    (m1, m2), (l1, _), (c1, c2), (i1, i2) = arm.masses, arm.lengths, arm.com, arm.inertias
    cos2 = jnp.cos(q[1])
    m11 = m1 * c1**2 + i1 + m2 * (l1**2 + c2**2 + 2 * l1 * c2 * cos2) + i2
    m12 = m2 * (c2**2 + l1 * c2 * cos2) + i2
    m22 = m2 * c2**2 + i2
    np.testing.assert_allclose(dynamics.mass_matrix(arm, q), [[m11, m12], [m12, m22]], rtol=1e-12)
    h = -m2 * l1 * c2 * jnp.sin(q[1])
    coriolis = jnp.array([h * (2 * qd[0] + qd[1]) * qd[1], -h * qd[0] ** 2])
    np.testing.assert_allclose(
        dynamics.bias_forces(arm, q, qd), coriolis + arm.damping * qd, rtol=1e-12
    )


def _kinetic_from_velocities(arm, q, qd):
    """½Σ mᵢ|ċᵢ|² + ½Σ Iᵢωᵢ², from the COM velocities directly (not via M)."""
    _, com_velocity = jax.jvp(lambda q: dynamics._centres_of_mass(arm, q), (q,), (qd,))
    omega = jnp.cumsum(qd)
    return 0.5 * jnp.sum(arm.masses * jnp.sum(com_velocity**2, -1)) + 0.5 * jnp.sum(
        arm.inertias * omega**2
    )


def test_sawyer_mass_matrix_is_the_kinetic_energy_hessian_and_positive_definite(float64):
    arm = _f64(dynamics.sawyer_arm())
    for seed in range(3):
        q = jax.random.uniform(jax.random.key(seed), (7,), jnp.float64, -np.pi, np.pi)
        mass = dynamics.mass_matrix(arm, q)
        hessian = jax.hessian(lambda qd, q=q: _kinetic_from_velocities(arm, q, qd))(jnp.zeros(7))
        np.testing.assert_allclose(mass, hessian, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(mass, mass.T, atol=1e-14)
        assert jnp.linalg.eigvalsh(mass).min() > 0


def test_forward_and_inverse_dynamics_are_inverses(float64):
    arm = _f64(dynamics.sawyer_arm())
    q, qd, u = (jax.random.normal(jax.random.key(i), (7,), jnp.float64) for i in range(3))
    qdd = dynamics.forward_dynamics(arm, q, qd, u)
    np.testing.assert_allclose(dynamics.inverse_dynamics(arm, q, qd, qdd), u, rtol=1e-9)


def test_a_frictionless_unforced_arm_conserves_energy_to_rk4_order(float64):
    """Energy drift over 0.5 s is tiny and falls ~16x when the step halves (4th order)."""
    arm = _f64(dynamics.sawyer_arm()).replace(damping=jnp.zeros(7))
    state = jnp.concatenate([jnp.linspace(0.1, 0.7, 7), jnp.zeros(7)])
    e0 = dynamics.energy(arm, state[:7], state[7:])

    def drift(substeps):
        final = jax.jit(dynamics.arm_step, static_argnums=(3, 4))(
            arm, state, jnp.zeros(7), 0.5, substeps
        )
        assert not np.allclose(final[:7], state[:7], atol=1e-2)  # it moved
        return abs(dynamics.energy(arm, final[:7], final[7:]) - e0) / abs(e0)

    coarse, fine = drift(125), drift(250)
    assert fine < coarse < 1e-5 and coarse / fine > 8


def test_power_balance_with_torques_and_friction(float64):
    """dE/dt = q̇ᵀ(u − Dq̇): what the motors put in minus what friction takes out."""
    arm = _f64(dynamics.sawyer_arm())
    q, qd, u = (jax.random.normal(jax.random.key(i), (7,), jnp.float64) for i in range(3))
    qdd = dynamics.forward_dynamics(arm, q, qd, u)
    _, de_dt = jax.jvp(lambda q, qd: dynamics.energy(arm, q, qd), (q, qd), (qd, qdd))
    np.testing.assert_allclose(de_dt, qd @ (u - arm.damping * qd), rtol=1e-9)


def test_arm_step_gradients_match_finite_differences(float64):
    arm = _f64(dynamics.reacher_arm())
    state, u = jnp.array([0.2, -0.4, 0.5, 1.0]), jnp.array([0.01, -0.02])
    check_grads(
        lambda s, u: dynamics.arm_step(arm, s, u, 0.05, 2), (state, u), order=2, modes=["rev"]
    )


def test_arm_step_rejects_a_state_of_the_wrong_size():
    with pytest.raises(ValueError, match="state of size 4"):
        dynamics.arm_step(dynamics.reacher_arm(), jnp.zeros(3), jnp.zeros(2), 0.05)


def test_pointmass_coasts_and_decays_at_the_damping_rate():
    state = dynamics.pointmass_step(jnp.zeros(4), jnp.array([1.0, 0.0]))
    for _ in range(10):
        state = dynamics.pointmass_step(state, jnp.zeros(2))
    np.testing.assert_allclose(state[2], 0.1 * 0.95**11 / 0.95, rtol=1e-5)
    assert state[0] > 0 and state[1] == 0


def test_mountain_car_matches_gym_and_cannot_be_climbed_greedily():
    state = dynamics.mountain_car_step(jnp.array([-0.5, 0.01]), jnp.array([2.0]))
    velocity = 0.01 + 0.0015 - 0.0025 * np.cos(-1.5)
    np.testing.assert_allclose(state, [-0.5 + velocity, velocity], rtol=1e-6)
    env = dynamics.mountain_car_env()
    states, _ = control.rollout(env.step, lambda s: jnp.ones(1), env.initial_state(), 200)
    assert states[:, 0].max() < dynamics.MOUNTAIN_CAR_GOAL  # full throttle right is not enough


def test_detached_rollout_differentiates_through_the_actions_only():
    """a_t = θ·s_t, s_{t+1} = s_t + a_t: detached, ∂a_1/∂θ = s_1 only (no ∂s_1/∂θ term)."""
    step = lambda s, a: s + a
    actions = lambda theta, detach: control.rollout(
        step, lambda s: theta * s, jnp.ones(1), 2, detach_states=detach
    )[1]
    theta = jnp.asarray(0.5)
    detached = jax.jacobian(lambda t: actions(t, True)[1, 0])(theta)
    attached = jax.jacobian(lambda t: actions(t, False)[1, 0])(theta)
    np.testing.assert_allclose(detached, 1.5)  # s_1 = 1 + 0.5
    np.testing.assert_allclose(attached, 1.5 + 0.5 * 1.0)  # + θ ∂s_1/∂θ


def _pointmass_step(s, a):
    return dynamics.pointmass_step(s, a)


def _effort(s, a):
    return 1e-2 * jnp.sum(a**2)


def _miss(s):
    return 10.0 * jnp.sum((s[:2] - jnp.array([1.0, -0.5])) ** 2)


def test_ilqr_reaches_a_pointmass_goal_and_leaves_float32_alone():
    states, actions, total, history = control.ilqr(
        _pointmass_step, _effort, _miss, jnp.zeros(4), jnp.zeros((15, 2)), max_iter=30
    )
    assert not jax.config.jax_enable_x64  # diffilqrax's import-time switch was undone
    assert states.dtype == actions.dtype == jnp.float32 and states.shape == (16, 4)
    assert history[-1] < 0.02 * history[0]
    assert np.linalg.norm(states[-1, :2] - np.array([1.0, -0.5])) < 0.05
