"""Smooth random arm trajectories: exact derivatives and the simulator's dynamics."""

import jax
import jax.numpy as jnp
import numpy as np

from metalearn.tasks import dynamics, trajectories


def test_trajectory_velocities_and_accelerations_are_its_time_derivatives(float64, fast_compile):
    keys = jax.random.split(jax.random.key(0), 4)
    coeffs = {
        "q0": jax.random.normal(keys[0], (3,)),
        "amp": jax.random.uniform(keys[1], (2, 3)),
        "freq": jax.random.uniform(keys[2], (2, 3), minval=0.5, maxval=3.0),
        "phase": jax.random.uniform(keys[3], (2, 3), maxval=6.0),
    }
    t = jnp.linspace(0.0, 5.0, 7)
    sinusoids = jax.jit(lambda t: trajectories.sinusoids(coeffs, t))
    (q, qd, _), (dq, dqd, _) = jax.jvp(sinusoids, (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(dq, qd, rtol=1e-10)
    np.testing.assert_allclose(dqd, sinusoids(t)[2], rtol=1e-10)


def test_sampled_torques_are_the_simulators_inverse_dynamics(fast_compile):
    """u = M(q)q̈ + F(q, q̇) through the inertia model's equation equals the simulator's
    inverse dynamics, at the sampled times and within the sampled ranges."""
    arm = dynamics.reacher_arm()

    @jax.jit
    def sample_and_truth(key):
        data = trajectories.sample_trajectory(
            arm,
            key,
            5,
            num_sinusoids=2,
            amplitude=0.5,
            frequency_range=(0.5, 3.0),
            q0_range=1.0,
            duration=10.0,
        )
        truth = jax.vmap(lambda *a: dynamics.inverse_dynamics(arm, *a))(
            data["q"], data["qd"], data["qdd"]
        )
        return data, truth

    data, truth = sample_and_truth(jax.random.key(0))
    n = arm.num_joints
    assert data["M"].shape == (5, n, n) and data["u"].shape == (5, n)
    np.testing.assert_allclose(data["u"], truth, rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(data["q"])).max() <= 1.0 + 2 * 0.5
    assert np.abs(np.asarray(data["qd"])).max() > 0
