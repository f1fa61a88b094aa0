"""Smooth random joint trajectories of a simulated arm, with their exact dynamics.

Data for learning inverse dynamics (`experiments/ml3_inverse_dynamics.py`): a trajectory
is a sum of sinusoids per joint, so q, q̇ and q̈ are exact, and the torques, bias forces
and inertia at each point come from the arm's simulator (`metalearn.tasks.dynamics`).
"""

import jax
import jax.numpy as jnp

from metalearn.models.inertia import predicted_torque
from metalearn.tasks import dynamics
from metalearn.types import Array, PRNGKey


def sinusoids(coeffs: dict[str, Array], t: Array) -> tuple[Array, Array, Array]:
    """q(t) = q₀ + Σₖ aₖ sin(ωₖ t + ϕₖ) per joint and its exact first two derivatives.

    Args:
      coeffs: {'q0': [n], 'amp', 'freq', 'phase': [k, n]}.
      t: times [P].

    Returns:
      `(q, q̇, q̈)`, each [P, n].
    """
    amp, freq, phase = coeffs["amp"][None], coeffs["freq"][None], coeffs["phase"][None]
    arg = freq * t[:, None, None] + phase  # [P, k, n]
    q = coeffs["q0"][None] + jnp.sum(amp * jnp.sin(arg), axis=1)
    qd = jnp.sum(amp * freq * jnp.cos(arg), axis=1)
    qdd = -jnp.sum(amp * freq**2 * jnp.sin(arg), axis=1)
    return q, qd, qdd


def sample_trajectory(
    arm: dynamics.Arm,
    key: PRNGKey,
    num_points: int,
    *,
    num_sinusoids: int,
    amplitude: float,
    frequency_range: tuple[float, float],
    q0_range: float,
    duration: float,
) -> dict[str, Array]:
    """Points at random times of one smooth random joint trajectory, with exact dynamics.

    `sinusoids` with q₀ ~ U[±`q0_range`], aₖ ~ U[0, `amplitude`], ωₖ ~
    U[`frequency_range`] (rad/s), ϕₖ ~ U[0, 2π] and t ~ U[0, `duration`].

    Args:
      arm: the simulated arm (n joints).
      key: PRNG key.
      num_points: how many time points P.
      num_sinusoids: k, sinusoids per joint.
      amplitude, frequency_range, q0_range, duration: the ranges above.

    Returns:
      {'q', 'qd', 'qdd', 'u', 'F': [P, n], 'M': [P, n, n]}: joint angles, velocities,
      accelerations, torques u = M(q)q̈ + F(q, q̇), bias forces and the true inertia.
    """
    n, k = arm.num_joints, num_sinusoids
    keys = jax.random.split(key, 5)
    lo, hi = frequency_range
    coeffs = {
        "q0": jax.random.uniform(keys[0], (n,), minval=-q0_range, maxval=q0_range),
        "amp": jax.random.uniform(keys[1], (k, n), maxval=amplitude),
        "freq": jax.random.uniform(keys[2], (k, n), minval=lo, maxval=hi),
        "phase": jax.random.uniform(keys[3], (k, n), maxval=2.0 * jnp.pi),
    }
    q, qd, qdd = sinusoids(coeffs, jax.random.uniform(keys[4], (num_points,), maxval=duration))
    per_point = jax.vmap(
        lambda q, qd: (dynamics.mass_matrix(arm, q), dynamics.bias_forces(arm, q, qd))
    )
    inertia, bias = per_point(q, qd)
    u = predicted_torque(inertia, bias, qdd)  # = dynamics.inverse_dynamics, M and F computed once
    return {"q": q, "qd": qd, "qdd": qdd, "u": u, "F": bias, "M": inertia}
