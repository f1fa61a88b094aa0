"""The differentiable simulators: closed forms, energy, finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from metalearn.tasks import control, dynamics


def _f64(arm):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), arm)


def test_two_link_mass_matrix_and_coriolis_match_the_textbook_closed_form(float64, fast_compile):
    arm = _f64(dynamics.reacher_arm())
    q, qd = jnp.array([0.3, -0.7]), jnp.array([1.0, 2.0])
    (m1, m2), (l1, _), (c1, c2), (i1, i2) = arm.masses, arm.lengths, arm.com, arm.inertias
    cos2 = jnp.cos(q[1])
    m11 = m1 * c1**2 + i1 + m2 * (l1**2 + c2**2 + 2 * l1 * c2 * cos2) + i2
    m12 = m2 * (c2**2 + l1 * c2 * cos2) + i2
    m22 = m2 * c2**2 + i2
    mass, bias = jax.jit(
        lambda q, qd: (dynamics.mass_matrix(arm, q), dynamics.bias_forces(arm, q, qd))
    )(q, qd)
    np.testing.assert_allclose(mass, [[m11, m12], [m12, m22]], rtol=1e-12)
    h = -m2 * l1 * c2 * jnp.sin(q[1])
    coriolis = jnp.array([h * (2 * qd[0] + qd[1]) * qd[1], -h * qd[0] ** 2])
    np.testing.assert_allclose(bias, coriolis + arm.damping * qd, rtol=1e-12)


def _kinetic_from_velocities(arm, q, qd):
    """½Σ mᵢ|ċᵢ|² + ½Σ Iᵢωᵢ², from the COM velocities directly (not via M)."""
    _, com_velocity = jax.jvp(lambda q: dynamics._centres_of_mass(arm, q), (q,), (qd,))
    omega = jnp.cumsum(qd)
    return 0.5 * jnp.sum(arm.masses * jnp.sum(com_velocity**2, -1)) + 0.5 * jnp.sum(
        arm.inertias * omega**2
    )


def test_sawyer_mass_matrix_is_the_kinetic_energy_hessian_and_positive_definite(
    float64, fast_compile
):
    arm = _f64(dynamics.sawyer_arm())

    @jax.jit
    @jax.vmap
    def both(q):
        hessian = jax.hessian(lambda qd: _kinetic_from_velocities(arm, q, qd))(jnp.zeros(7))
        return dynamics.mass_matrix(arm, q), hessian

    q = jax.random.uniform(jax.random.key(0), (3, 7), jnp.float64, -np.pi, np.pi)
    for mass, hessian in zip(*both(q), strict=True):
        np.testing.assert_allclose(mass, hessian, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(mass, mass.T, atol=1e-14)
        assert jnp.linalg.eigvalsh(mass).min() > 0


def test_forward_and_inverse_dynamics_are_inverses_and_balance_power(float64, fast_compile):
    """u → q̈ → u round trip, and dE/dt = q̇ᵀ(u − Dq̇): what the motors put in minus what
    friction takes out."""
    arm = _f64(dynamics.sawyer_arm())

    @jax.jit
    def check(q, qd, u):
        qdd = dynamics.forward_dynamics(arm, q, qd, u)
        _, de_dt = jax.jvp(lambda q, qd: dynamics.energy(arm, q, qd), (q, qd), (qd, qdd))
        return dynamics.inverse_dynamics(arm, q, qd, qdd), de_dt

    q, qd, u = (jax.random.normal(jax.random.key(i), (7,), jnp.float64) for i in range(3))
    round_trip, de_dt = check(q, qd, u)
    np.testing.assert_allclose(round_trip, u, rtol=1e-9)
    np.testing.assert_allclose(de_dt, qd @ (u - arm.damping * qd), rtol=1e-9)


def test_a_frictionless_unforced_arm_conserves_energy_to_rk4_order(float64, fast_compile):
    """Energy drift over 0.5 s is tiny and falls ~16x when the step halves (4th order)."""
    arm = _f64(dynamics.sawyer_arm()).replace(damping=jnp.zeros(7))
    state = jnp.concatenate([jnp.linspace(0.1, 0.7, 7), jnp.zeros(7)])
    e0 = dynamics.energy(arm, state[:7], state[7:])
    # 125 RK4 substeps per call; dt is traced, so one program serves both step sizes.
    step = jax.jit(lambda s, dt: dynamics.arm_step(arm, s, jnp.zeros(7), dt, 125))

    def drift(final):
        assert not np.allclose(final[:7], state[:7], atol=1e-2)  # it moved
        return abs(dynamics.energy(arm, final[:7], final[7:]) - e0) / abs(e0)

    coarse = drift(step(state, 0.5))  # h = 4 ms
    fine = drift(step(step(state, 0.25), 0.25))  # h = 2 ms over the same 0.5 s
    assert fine < coarse < 1e-5 and coarse / fine > 8


def test_arm_step_gradients_match_finite_differences(float64, fast_compile):
    arm = _f64(dynamics.reacher_arm())
    state, u = jnp.array([0.2, -0.4, 0.5, 1.0]), jnp.array([0.01, -0.02])
    step = jax.jit(lambda s, u: dynamics.arm_step(arm, s, u, 0.05, 2))
    check_grads(step, (state, u), order=1, modes=["rev"])


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


@pytest.mark.slow  # 17 s: compiles the Lagrangian arm in float64
def test_two_link_closed_form_matches_the_lagrangian_arm(float64, fast_compile):
    """The closed-form 2-link q̈ equals the generic (autodiff Lagrangian) one, with and
    without gravity, and so does an RK4 step (the same function: so do its derivatives)."""
    base = _f64(dynamics.reacher_arm())

    @jax.jit
    def both(arm, q, qd, u, state):
        return (
            dynamics.two_link_forward_dynamics(arm, q, qd, u),
            dynamics.forward_dynamics(arm, q, qd, u),
            dynamics.arm_step(arm, state, u, 0.05, 2, closed_form=True),
            dynamics.arm_step(arm, state, u, 0.05, 2),
        )

    keys = jax.random.split(jax.random.key(0), 4)
    q, qd = (jax.random.normal(k, (2,), jnp.float64) for k in keys[:2])
    u = 0.05 * jax.random.normal(keys[2], (2,), jnp.float64)
    state = jnp.concatenate([q, qd])
    for arm in (base, base.replace(gravity=dynamics.GRAVITY)):
        closed, generic, step_closed, step_generic = both(arm, q, qd, u, state)
        assert np.abs(generic).max() > 1e-2  # not trivially zero
        np.testing.assert_allclose(closed, generic, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(step_closed, step_generic, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="2-link"):
        dynamics.arm_step(
            _f64(dynamics.sawyer_arm()), jnp.zeros(14), jnp.zeros(7), 0.1, closed_form=True
        )
