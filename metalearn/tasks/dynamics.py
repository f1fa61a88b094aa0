"""Differentiable dynamics for the ML³ control experiments, as pure JAX functions.

- A planar serial arm with revolute joints (`Arm`): the inertia matrix M(q), the bias
  forces F(q, q̇) = C(q, q̇)q̇ + g(q) + Dq̇, forward and inverse dynamics, energy and an RK4
  step. M(q) is assembled from the Jacobians of the link centres of mass; C(q, q̇)q̇ and
  g(q) come from the Lagrangian by automatic differentiation, so any number of links
  works. `two_link_forward_dynamics` is the same for 2 links in closed form (a few
  explicit lines, cheap to differentiate and compile). `reacher_arm()` is the 2-link
  ReacherGoal arm (horizontal plane);
  `sawyer_arm()` a 7-link arm with Sawyer-like link lengths and masses in the vertical
  plane, standing in for the Sawyer.
- A point mass in 2-D with viscous damping (PointmassGoal).
- The mountain car of gym's MountainCarContinuous.

Everything is jit-, vmap- and grad-able, in float32 or float64. `Env` bundles a step with
its sizes for the policy-learning experiments.
"""

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from metalearn.types import Array

GRAVITY = 9.81


@flax.struct.dataclass
class Arm:
    """Inertial parameters of a planar serial arm with n revolute joints (a pytree).

    Joint i rotates link i about the end of link i − 1; angles are relative.

    Attributes:
      lengths: link lengths [n] (m).
      masses: link masses [n] (kg).
      com: distance of each link's centre of mass from its joint, along the link [n] (m).
      inertias: each link's rotational inertia about its centre of mass [n] (kg m²).
      damping: viscous joint friction [n] (N m s).
      gravity: gravitational acceleration along −y; 0 for an arm in the horizontal plane.
    """

    lengths: Array
    masses: Array
    com: Array
    inertias: Array
    damping: Array
    gravity: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def num_joints(self) -> int:
        return self.lengths.shape[-1]


def _rods(lengths, masses, damping, gravity, com_fraction=0.5, radius=0.0) -> Arm:
    """An arm of uniform rods (plus a cylinder's radial term `radius`)."""
    lengths, masses = jnp.asarray(lengths), jnp.asarray(masses)
    inertias = masses * (lengths**2 / 12.0 + radius**2 / 4.0)
    return Arm(
        lengths=lengths,
        masses=masses,
        com=com_fraction * lengths,
        inertias=inertias,
        damping=jnp.asarray(damping),
        gravity=gravity,
    )


def reacher_arm() -> Arm:
    """The 2-link ReacherGoal arm: links of 0.1 m and 0.11 m in the horizontal plane."""
    return _rods((0.1, 0.11), (1.0, 1.0), (0.005, 0.005), gravity=0.0)


def sawyer_arm() -> Arm:
    """A 7-link planar arm with the Sawyer's link lengths and masses, in the vertical plane.

    Lengths and masses follow the Sawyer's published kinematics and URDF (right_l0 …
    right_l6, the hand included in the last link); each link is a uniform 4 cm-radius
    cylinder. The real arm is spatial; this planar stand-in keeps its scale and mass
    distribution, so M(q) has the same conditioning problems (a heavy base, a light wrist).
    """
    return _rods(
        (0.317, 0.192, 0.400, 0.168, 0.400, 0.136, 0.133),
        (5.32, 4.51, 1.75, 2.51, 1.12, 1.56, 0.55),
        (0.5, 0.5, 0.3, 0.3, 0.1, 0.1, 0.05),
        gravity=GRAVITY,
        radius=0.08,
    )


def _absolute_angles(q: Array) -> Array:
    return jnp.cumsum(q, axis=-1)


def link_positions(arm: Arm, q: Array) -> Array:
    """Joint positions [n + 1, 2]: the base (origin), each joint, and the end effector."""
    phi = _absolute_angles(q)
    steps = arm.lengths[:, None] * jnp.stack([jnp.cos(phi), jnp.sin(phi)], axis=-1)
    return jnp.concatenate([jnp.zeros((1, 2), q.dtype), jnp.cumsum(steps, axis=0)])


def end_effector(arm: Arm, q: Array) -> Array:
    """The end-effector position [2]."""
    return link_positions(arm, q)[-1]


def _centres_of_mass(arm: Arm, q: Array) -> Array:
    phi = _absolute_angles(q)
    direction = jnp.stack([jnp.cos(phi), jnp.sin(phi)], axis=-1)
    return link_positions(arm, q)[:-1] + arm.com[:, None] * direction


def mass_matrix(arm: Arm, q: Array) -> Array:
    """M(q) [n, n] = Σᵢ mᵢ JᵢᵀJᵢ + Iᵢ aᵢᵀaᵢ (Jᵢ: COM Jacobian, aᵢ: angular-velocity row)."""
    jac = jax.jacfwd(lambda q: _centres_of_mass(arm, q))(q)  # [n, 2, n]
    rows = jnp.tril(jnp.ones((arm.num_joints, arm.num_joints), q.dtype))  # ωᵢ = Σ_{j≤i} q̇ⱼ
    translational = jnp.einsum("i,ikj,ikl->jl", arm.masses, jac, jac)
    rotational = jnp.einsum("i,ij,il->jl", arm.inertias, rows, rows)
    return translational + rotational


def potential_energy(arm: Arm, q: Array) -> Array:
    return arm.gravity * jnp.sum(arm.masses * _centres_of_mass(arm, q)[:, 1])


def kinetic_energy(arm: Arm, q: Array, qd: Array) -> Array:
    return 0.5 * qd @ mass_matrix(arm, q) @ qd


def energy(arm: Arm, q: Array, qd: Array) -> Array:
    """Total mechanical energy T(q, q̇) + V(q)."""
    return kinetic_energy(arm, q, qd) + potential_energy(arm, q)


def bias_forces(arm: Arm, q: Array, qd: Array) -> Array:
    """F(q, q̇) = C(q, q̇)q̇ + g(q) + Dq̇ [n], from the Lagrangian.

    C(q, q̇)q̇ = Ṁ(q)q̇ − ½ ∂(q̇ᵀM(q)q̇)/∂q, with Ṁ = dM/dq · q̇ by a JVP; g(q) = ∂V/∂q.
    """
    _, m_dot = jax.jvp(lambda q: mass_matrix(arm, q), (q,), (qd,))
    coriolis = m_dot @ qd - jax.grad(kinetic_energy, argnums=1)(arm, q, qd)
    gravity = jax.grad(potential_energy, argnums=1)(arm, q)
    return coriolis + gravity + arm.damping * qd


def inverse_dynamics(arm: Arm, q: Array, qd: Array, qdd: Array) -> Array:
    """Joint torques u = M(q)q̈ + F(q, q̇) [n]."""
    return mass_matrix(arm, q) @ qdd + bias_forces(arm, q, qd)


def forward_dynamics(arm: Arm, q: Array, qd: Array, u: Array) -> Array:
    """Joint accelerations q̈ = M(q)⁻¹(u − F(q, q̇)) [n] (a Cholesky solve)."""
    factor = jax.scipy.linalg.cho_factor(mass_matrix(arm, q))
    return jax.scipy.linalg.cho_solve(factor, u - bias_forces(arm, q, qd))


def two_link_forward_dynamics(arm: Arm, q: Array, qd: Array, u: Array) -> Array:
    """`forward_dynamics` of a 2-link arm in closed form: q̈ [2] = M(q)⁻¹(u − F(q, q̇)).

    The textbook M(q), Coriolis/centrifugal terms and gravity of two links with relative
    angles, and the explicit 2×2 inverse. Nothing is itself a derivative, so
    differentiating a rollout through it is a first-order graph (the generic
    `forward_dynamics` builds M by `jacfwd` and C by a JVP: its derivative is third order).
    """
    (m1, m2), (l1, _), (c1, c2), (i1, i2) = arm.masses, arm.lengths, arm.com, arm.inertias
    cos2, sin2 = jnp.cos(q[1]), jnp.sin(q[1])
    m12 = i2 + m2 * (c2**2 + l1 * c2 * cos2)
    m22 = i2 + m2 * c2**2
    m11 = i1 + m1 * c1**2 + m2 * l1**2 + m22 + 2 * m2 * l1 * c2 * cos2
    h = -m2 * l1 * c2 * sin2
    coriolis = jnp.stack([h * (2 * qd[0] + qd[1]) * qd[1], -h * qd[0] ** 2])
    cos_abs2 = jnp.cos(q[0] + q[1])
    gravity = arm.gravity * jnp.stack(
        [(m1 * c1 + m2 * l1) * jnp.cos(q[0]) + m2 * c2 * cos_abs2, m2 * c2 * cos_abs2]
    )
    r = u - coriolis - gravity - arm.damping * qd
    det = m11 * m22 - m12**2
    return jnp.stack([m22 * r[0] - m12 * r[1], m11 * r[1] - m12 * r[0]]) / det


def arm_step(
    arm: Arm,
    state: Array,
    u: Array,
    dt: float,
    substeps: int = 1,
    *,
    closed_form: bool = False,
) -> Array:
    """One step of length dt, in `substeps` RK4 steps, under constant torques u.

    Args:
      arm: the arm.
      state: (q, q̇) concatenated [2n].
      u: joint torques [n].
      dt: the step length (s).
      substeps: RK4 steps per step.
      closed_form: use `two_link_forward_dynamics` (2 links only): the same dynamics to
        float precision, much cheaper to differentiate and compile.

    Returns:
      The next state [2n].
    """
    n = arm.num_joints
    arm = jax.tree.map(lambda x: jnp.asarray(x, state.dtype), arm)  # the state's precision
    u = jnp.asarray(u, state.dtype)
    if state.shape[-1] != 2 * n or u.shape[-1] != n:
        raise ValueError(
            f"An arm with {n} joints takes a state of size {2 * n} (q, q̇) and {n} torques; "
            f"got state {state.shape} and torques {u.shape}."
        )
    if closed_form and n != 2:
        raise ValueError(f"closed_form=True needs a 2-link arm; this one has {n} joints.")
    accel = two_link_forward_dynamics if closed_form else forward_dynamics

    def deriv(s):
        q, qd = s[:n], s[n:]
        return jnp.concatenate([qd, accel(arm, q, qd, u)])

    h = dt / substeps
    # RK4's four stages as a scan over (stage offset, weight): the dynamics are traced once,
    # not four times, which cuts compilation (and that of every derivative) about fourfold.
    offsets = jnp.asarray([0.0, 0.5, 0.5, 1.0], state.dtype)
    weights = jnp.asarray([1.0, 2.0, 2.0, 1.0], state.dtype) / 6.0

    def rk4(s, _):
        def stage(carry, coefficients):
            k, total = carry
            offset, weight = coefficients
            k = deriv(s + offset * h * k)
            return (k, total + weight * k), None

        zero = jnp.zeros_like(s)
        (_, total), _ = jax.lax.scan(stage, (zero, zero), (offsets, weights))
        return s + h * total, None

    return jax.lax.scan(rk4, state, None, length=substeps)[0]


def pointmass_step(
    state: Array, action: Array, dt: float = 0.1, mass: float = 1.0, damping: float = 0.5
) -> Array:
    """A point mass in the plane under a force (semi-implicit Euler).

    Args:
      state: (x, y, vx, vy) [4].
      action: the force (fx, fy) [2].
      dt, mass, damping: step length, mass and viscous damping (force per velocity).

    Returns:
      The next state [4].
    """
    position, velocity = state[:2], state[2:]
    velocity = velocity + dt * (action / mass - damping / mass * velocity)
    return jnp.concatenate([position + dt * velocity, velocity])


MOUNTAIN_CAR_START = (-0.5, 0.0)
MOUNTAIN_CAR_GOAL = 0.45
MOUNTAIN_CAR_BOUNDS = (-1.2, 0.6)
MOUNTAIN_CAR_MAX_SPEED = 0.07
MOUNTAIN_CAR_POWER = 0.0015


def mountain_car_step(state: Array, action: Array) -> Array:
    """gym's MountainCarContinuous physics for one step.

    velocity += power · clip(a, −1, 1) − 0.0025 cos(3x), clipped to ±0.07; position +=
    velocity, clipped to [−1.2, 0.6]; at the left wall a leftward velocity stops. The
    clips pass zero gradient where they bind, as the physics does.

    Args:
      state: (position, velocity) [2].
      action: the force [1].

    Returns:
      The next state [2].
    """
    position, velocity = state[0], state[1]
    force = jnp.clip(action[0], -1.0, 1.0)
    velocity = velocity + MOUNTAIN_CAR_POWER * force - 0.0025 * jnp.cos(3.0 * position)
    velocity = jnp.clip(velocity, -MOUNTAIN_CAR_MAX_SPEED, MOUNTAIN_CAR_MAX_SPEED)
    position = jnp.clip(position + velocity, *MOUNTAIN_CAR_BOUNDS)
    at_wall = (position <= MOUNTAIN_CAR_BOUNDS[0]) & (velocity < 0)
    velocity = jnp.where(at_wall, 0.0, velocity)
    return jnp.stack([position, velocity])


@dataclasses.dataclass(frozen=True)
class Env:
    """A deterministic control environment: a pure step and its sizes.

    Attributes:
      name: for messages and figures.
      step: `(state, action) -> state`, one control step, pure.
      position: `state -> position in goal space` [goal_dim].
      start: the initial state.
      state_dim, action_dim, goal_dim: sizes.
      action_scale: policies output tanh(·) · action_scale.
    """

    name: str
    step: Callable[[Array, Array], Array]
    position: Callable[[Array], Array]
    start: tuple[float, ...]
    state_dim: int
    action_dim: int
    goal_dim: int
    action_scale: float

    def initial_state(self, dtype=jnp.float32) -> Array:
        return jnp.asarray(self.start, dtype)


def pointmass_env(dt: float = 0.1, damping: float = 0.5) -> Env:
    """PointmassGoal: a unit point mass at rest at the origin, forces up to 1 N per axis."""
    return Env(
        name="pointmass",
        step=lambda s, a: pointmass_step(s, a, dt=dt, damping=damping),
        position=lambda s: s[:2],
        start=(0.0, 0.0, 0.0, 0.0),
        state_dim=4,
        action_dim=2,
        goal_dim=2,
        action_scale=1.0,
    )


def reacher_env(dt: float = 0.05, substeps: int = 2, *, closed_form: bool = False) -> Env:
    """ReacherGoal: `reacher_arm()` from rest, stretched along x; torques up to 0.05 N m.

    `closed_form` steps with `two_link_forward_dynamics` (same dynamics, cheap gradients).
    """
    arm = reacher_arm()
    return Env(
        name="reacher",
        step=lambda s, a: arm_step(arm, s, a, dt, substeps, closed_form=closed_form),
        position=lambda s: end_effector(arm, s[:2]),
        start=(0.0, 0.0, 0.0, 0.0),
        state_dim=4,
        action_dim=2,
        goal_dim=2,
        action_scale=0.05,
    )


def mountain_car_env() -> Env:
    """MountainCar from (−0.5, 0); the goal is position 0.45."""
    return Env(
        name="mountain_car",
        step=mountain_car_step,
        position=lambda s: s[:1],
        start=MOUNTAIN_CAR_START,
        state_dim=2,
        action_dim=1,
        goal_dim=1,
        action_scale=1.0,
    )
