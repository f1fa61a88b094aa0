"""Goal-reaching environments on real physics: brax's reacher and ant on MuJoCo MJX.

ML³'s model-free RL experiment (Bechtle et al., Sec. IV-A3, Fig. 4) trains policies on
ReacherGoal and AntGoal, where a task is a goal position. Both are brax environments
(`brax.envs`, MJX backend) with the goal made an input:

- `ReacherGoal`: brax's `reacher` (gym's Reacher: a 2-link arm, 2 torques in [-1, 1],
  dt 0.02 s) with the target placed at the given goal instead of a random one. Its
  reward is brax's: −‖fingertip − target‖ − ‖a‖².
- `AntGoal`: brax's `ant` (8 torques, dt 0.05 s) that never terminates, observes its own
  torso position and the vector to the goal, and is rewarded −‖torso_xy − goal‖.

Every environment has `reset_to(rng, goal)` (the goal a traced array, so one compiled
program serves every goal and vmaps over goals) and `goal_distance(state)`. `with_goal`
fixes the goal for code that only calls `reset(rng)`, such as brax's PPO trainer.

`rollout` runs one episode of a stochastic policy under `lax.scan`; it never
differentiates the simulator (policies are trained from the transitions it returns).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from brax import math as brax_math
from brax.envs.ant import Ant
from brax.envs.base import State
from brax.envs.reacher import Reacher

from metalearn.types import Array, PRNGKey

# Goals: a disk around the reacher's base (brax draws its targets in the same disk), and an
# annulus around the ant's start.
GOAL_REGIONS = {"reacher": (0.05, 0.2), "ant": (1.0, 3.0)}


class _GoalMixin:
    """`reset(rng)`: a random goal of the environment's region, or the one of `with_goal`."""

    name: str
    fixed_goal: Array | None = None

    def with_goal(self, goal: Array):
        """A copy whose `reset(rng)` is `reset_to(rng, goal)` (for brax's trainers)."""
        env = self.__class__(**self._goal_env_kwargs)
        env.fixed_goal = jnp.asarray(goal, jnp.float32)
        return env

    @property
    def observation_size(self) -> int:
        """From the shape of a traced reset (brax runs one eagerly: slow under MJX)."""
        goal = jnp.zeros((self.goal_dim,), jnp.float32)
        return jax.eval_shape(self.reset_to, jax.random.key(0), goal).obs.shape[-1]

    def reset(self, rng: PRNGKey) -> State:
        if self.fixed_goal is not None:
            return self.reset_to(rng, self.fixed_goal)
        rng, goal_rng = jax.random.split(rng)
        return self.reset_to(rng, sample_goals(self.name, goal_rng, 1)[0])


class ReacherGoal(_GoalMixin, Reacher):
    """brax's reacher with the target at a given goal (the same physics and reward)."""

    name = "reacher"
    goal_dim = 2

    def __init__(self, **kwargs):
        self._goal_env_kwargs = kwargs
        super().__init__(backend="mjx", **kwargs)

    def reset_to(self, rng: PRNGKey, goal: Array) -> State:
        """brax's reset (joint noise ±0.1 rad, velocity noise ±0.005) with target `goal`."""
        _check_goal(goal, self.goal_dim)
        rng1, rng2 = jax.random.split(rng)
        q = self.sys.init_q + jax.random.uniform(
            rng1, (self.sys.q_size(),), minval=-0.1, maxval=0.1
        )
        qd = jax.random.uniform(rng2, (self.sys.qd_size(),), minval=-0.005, maxval=0.005)
        q = q.at[2:].set(goal)
        qd = qd.at[2:].set(0.0)
        pipeline_state = self.pipeline_init(q, qd)
        zero = jnp.zeros(())
        return State(
            pipeline_state,
            self._get_obs(pipeline_state),
            zero,
            zero,
            {"reward_dist": zero, "reward_ctrl": zero, "goal_distance": zero},
        )

    def step(self, state: State, action: Array) -> State:
        """brax's step, with the goal distance also among the metrics."""
        state = super().step(state, action)
        state.metrics.update(goal_distance=self.goal_distance(state))
        return state

    def goal_distance(self, state: State) -> Array:
        """‖fingertip − target‖ (the last observation entries are fingertip − target)."""
        return brax_math.safe_norm(state.obs[-3:])


class AntGoal(_GoalMixin, Ant):
    """brax's ant that must walk its torso to a goal in the plane.

    Never terminates (a fixed horizon per episode); the observation is brax's ant
    observation with the torso's x, y and the vector goal − torso_xy appended; the
    reward is −‖torso_xy − goal‖.
    """

    name = "ant"
    goal_dim = 2

    def __init__(self, **kwargs):
        self._goal_env_kwargs = kwargs
        kwargs = {"terminate_when_unhealthy": False, **kwargs}
        super().__init__(backend="mjx", exclude_current_positions_from_observation=False, **kwargs)

    def _goal_obs(self, pipeline_state, goal: Array) -> Array:
        torso = pipeline_state.x.pos[0, :2]
        return jnp.concatenate([self._get_obs(pipeline_state), goal - torso])

    def reset_to(self, rng: PRNGKey, goal: Array) -> State:
        """brax's ant reset (noise 0.1 on joints and velocities), the goal kept in `info`."""
        _check_goal(goal, self.goal_dim)
        rng1, rng2 = jax.random.split(rng)
        scale = self._reset_noise_scale
        q = self.sys.init_q + jax.random.uniform(
            rng1, (self.sys.q_size(),), minval=-scale, maxval=scale
        )
        qd = scale * jax.random.normal(rng2, (self.sys.qd_size(),))
        pipeline_state = self.pipeline_init(q, qd)
        zero = jnp.zeros(())
        return State(
            pipeline_state,
            self._goal_obs(pipeline_state, goal),
            zero,
            zero,
            {"goal_distance": jnp.zeros(())},
            info={"goal": jnp.asarray(goal, jnp.float32)},
        )

    def step(self, state: State, action: Array) -> State:
        goal = state.info["goal"]
        pipeline_state = self.pipeline_step(state.pipeline_state, action)
        dist = jnp.linalg.norm(pipeline_state.x.pos[0, :2] - goal)
        state.metrics.update(goal_distance=dist)
        return state.replace(
            pipeline_state=pipeline_state,
            obs=self._goal_obs(pipeline_state, goal),
            reward=-dist,
            done=jnp.zeros(()),
        )

    def goal_distance(self, state: State) -> Array:
        """‖torso_xy − goal‖."""
        return jnp.linalg.norm(state.pipeline_state.x.pos[0, :2] - state.info["goal"])


ENVS = {"reacher": ReacherGoal, "ant": AntGoal}


def make_env(name: str):
    """The goal environment `name` ('reacher' or 'ant')."""
    if name not in ENVS:
        raise ValueError(f"Unknown goal environment {name!r}; choose one of {sorted(ENVS)}.")
    return ENVS[name]()


def _check_goal(goal: Array, goal_dim: int) -> None:
    if jnp.shape(goal) != (goal_dim,):
        raise ValueError(
            f"A goal must have shape ({goal_dim},), got {jnp.shape(goal)}; vmap reset_to "
            "over a batch of goals."
        )


def sample_goals(name: str, key: PRNGKey, num: int) -> Array:
    """`num` goals [num, 2] uniform over the area of the environment's goal annulus."""
    if name not in GOAL_REGIONS:
        raise ValueError(f"Unknown goal environment {name!r}; choose one of {sorted(ENVS)}.")
    r_min, r_max = GOAL_REGIONS[name]
    k1, k2 = jax.random.split(key)
    radius = jnp.sqrt(jax.random.uniform(k1, (num,), minval=r_min**2, maxval=r_max**2))
    angle = jax.random.uniform(k2, (num,), minval=-jnp.pi, maxval=jnp.pi)
    return jnp.stack([radius * jnp.cos(angle), radius * jnp.sin(angle)], -1)


# policy(obs [O], key) -> action [A]; the environment receives it clipped to [-1, 1].
Policy = Callable[[Array, PRNGKey], Array]


def rollout(env, policy: Policy, key: PRNGKey, goal: Array, horizon: int) -> dict[str, Array]:
    """One episode of `horizon` steps from `env.reset_to(key, goal)`.

    The metrics are those brax's evaluator sums over an episode: 'distance' is the goal
    distance after each step, its mean over the episode the "mean distance" scores use.

    Returns:
      `{'obs': [T, O] (the observation each action was taken in), 'actions': [T, A]
      (as the policy returned them, unclipped), 'rewards': [T], 'distance': [T] (goal
      distance after each step)}`.
    """
    reset_key, act_key = jax.random.split(key)
    state = env.reset_to(reset_key, goal)

    def body(state, k):
        action = policy(state.obs, k)
        next_state = env.step(state, jnp.clip(action, -1.0, 1.0))
        out = {
            "obs": state.obs,
            "actions": action,
            "rewards": next_state.reward,
            "distance": env.goal_distance(next_state),
        }
        return next_state, out

    _, out = jax.lax.scan(body, state, jax.random.split(act_key, horizon))
    return out
