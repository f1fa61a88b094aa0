"""ML³ for model-free RL (experiments/ml3_mfrl.py) and its brax goal environments.

Default tier: the REINFORCE surrogate, the meta-gradient through one inner step against
finite differences on fixed episodes (float64), the samples-to-80 % measure and the
config checks. Slow tier (MuJoCo MJX programs take a while to compile on a CPU): the goal
environments' rewards, and a smoke run whose PPO and ML³ see the same goals and budget.
The CLI smoke runs of both configs are in tests/experiments/test_run.py (slow tier).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from configs._mfrl import mfrl_config
from experiments.ml3_mfrl import reward_to_go, samples_to_fraction
from metalearn import bilevel
from metalearn.losses.task import reinforce
from metalearn.runtime.loop import train_and_evaluate
from metalearn.state import init_inner_state
from metalearn.tasks import goal_envs


@pytest.fixture(autouse=True, scope="module")
def brax_broadcasts():
    """brax's own code relies on rank promotion, which conftest.py makes an error."""
    with jax.numpy_rank_promotion("allow"):
        yield


@pytest.fixture(scope="module")
def experiment(brax_broadcasts):
    return experiments.make(mfrl_config("reacher", "smoke"))


def test_reinforce_is_minus_the_mean_advantage_weighted_log_likelihood():
    log_probs = jnp.asarray([[0.1, -0.3, 0.2], [-1.0, 0.5, 0.0]])
    returns = jnp.asarray([3.0, 1.0])
    value, grad = jax.value_and_grad(reinforce)(log_probs, returns)
    # advantages (3 - 2, 1 - 2) = (1, -1); sums of log-probs (0, -0.5)
    np.testing.assert_allclose(value, -np.mean([1.0 * 0.0, -1.0 * -0.5]), rtol=1e-6)
    np.testing.assert_allclose(grad, -np.asarray([[1.0] * 3, [-1.0] * 3]) / 2, rtol=1e-6)
    no_baseline = jax.grad(lambda lp: reinforce(lp, returns, baseline=False))(log_probs)
    np.testing.assert_allclose(no_baseline, -np.asarray([[3.0] * 3, [1.0] * 3]) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match=r"log_probs \[N, T\] and returns \[N\]"):
        reinforce(log_probs, returns[:1])


def test_reward_to_go_sums_the_future():
    np.testing.assert_allclose(reward_to_go(jnp.asarray([1.0, 2.0, 3.0])), [6.0, 5.0, 3.0])


def _episodes(experiment, key, num, dtype):
    c = experiment.config
    k1, k2, k3 = jax.random.split(key, 3)
    shape = (num, c.horizon)
    return {
        "obs": jax.random.normal(k1, (*shape, experiment.obs_dim), dtype),
        "actions": jax.random.normal(k2, (*shape, experiment.action_dim), dtype),
        "rewards": -jax.random.uniform(k3, shape, dtype),
    }


def test_meta_gradient_of_reinforce_through_one_inner_step_matches_finite_differences(
    experiment, float64, fast_compile
):
    """∇_φ REINFORCE(θ − α∇_θ M_φ(D_in); D_out) with fixed episodes D_in and D_out."""
    e, f64 = experiment, jnp.float64
    to64 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, f64), tree)  # noqa: E731
    theta = to64(e.init_policy(e.policy_net, jax.random.key(1)))
    phi = to64(e.init_one(jax.random.key(2)).params)
    goal = jnp.asarray([0.1, -0.05], f64)
    inner = {"goal": goal, "data": _episodes(e, jax.random.key(3), 3, f64)}
    outer = {"data": _episodes(e, jax.random.key(4), 4, f64)}
    state = init_inner_state(theta, e.inner_opt)
    inner_loss = e.learned_inner_loss(e.policy_net)

    @jax.jit
    def meta_loss(p):
        return bilevel.meta_loss(
            p,
            state,
            jax.tree.map(lambda x: x[None], inner),
            jax.random.split(jax.random.key(5), 1),
            outer,
            jax.random.key(6),
            inner_loss=inner_loss,
            outer_loss=e.task_loss,
            optimizer=e.inner_opt,
        )[0]

    grads = jax.jit(jax.grad(meta_loss))(phi)
    direction = jax.tree.map(
        lambda x, k: jax.random.normal(k, x.shape, f64),
        phi,
        jax.tree.unflatten(
            jax.tree.structure(phi),
            list(jax.random.split(jax.random.key(7), len(jax.tree.leaves(phi)))),
        ),
    )
    eps = 1e-5
    plus = meta_loss(jax.tree.map(lambda p, d: p + eps * d, phi, direction))
    minus = meta_loss(jax.tree.map(lambda p, d: p - eps * d, phi, direction))
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(
        jnp.vdot(g, d)
        for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
    )
    assert abs(float(analytic)) > 1e-6  # φ does move the task loss
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-10)


def test_samples_to_eighty_percent_of_the_improvement():
    x = np.asarray([0, 10, 20, 30, 40])
    assert samples_to_fraction(x, [-10, -6, -3, -2, 0]) == 30  # level -10 + 0.8 * 10 = -2
    assert samples_to_fraction(x, [-10, -9, -8, -5, -10]) == 0.0  # no improvement at the end
    assert samples_to_fraction(x, [-10, -9, -8, -5, -5], target=0.0) == float("inf")
    assert samples_to_fraction(x, [-10, -9, -8, -2, -5], target=0.0) == 30


def test_settings_that_would_give_ppo_another_budget_are_refused():
    c = mfrl_config("reacher", "smoke")
    c.ppo.batch_size = 8
    with pytest.raises(ValueError, match="PPO would not train on exactly the ML³ budget"):
        experiments.make(c)
    c = mfrl_config("reacher", "smoke")
    c.meta.window = 2
    c.inner.episode_length = 4
    with pytest.raises(ValueError, match="meta.window=1"):
        experiments.make(c)
    with pytest.raises(ValueError, match="Unknown environment 'cheetah'"):
        mfrl_config("cheetah")
    with pytest.raises(ValueError, match="Unknown goal environment 'cheetah'"):
        goal_envs.make_env("cheetah")


@pytest.mark.slow
def test_ant_goal_reward_is_the_negative_goal_distance(fast_compile):
    env = goal_envs.make_env("ant")
    goal = jnp.asarray([1.5, -2.0])

    @jax.jit
    def run(key):
        state = env.reset_to(key, goal)

        def body(s, k):
            s = env.step(s, jax.random.uniform(k, (env.action_size,), minval=-1, maxval=1))
            return s, (s.reward, s.pipeline_state.x.pos[0, :2], s.obs, s.metrics["goal_distance"])

        return jax.lax.scan(body, state, jax.random.split(key, 5))[1]

    rewards, torso, obs, metric = run(jax.random.key(0))
    distance = np.linalg.norm(np.asarray(torso) - np.asarray(goal), axis=-1)
    np.testing.assert_allclose(rewards, -distance, rtol=1e-5)
    np.testing.assert_allclose(metric, distance, rtol=1e-5)
    np.testing.assert_allclose(obs[:, -2:], np.asarray(goal) - np.asarray(torso), atol=1e-5)
    assert np.ptp(distance) > 0  # the ant moved
    with pytest.raises(ValueError, match=r"goal must have shape \(2,\)"):
        env.reset_to(jax.random.key(0), jnp.zeros(3))


@pytest.mark.slow
def test_reacher_goal_puts_the_target_at_the_goal(fast_compile):
    env = goal_envs.make_env("reacher")
    goal = jnp.asarray([0.12, -0.07])
    fixed = env.with_goal(goal)
    for state in (
        jax.jit(env.reset_to)(jax.random.key(1), goal),
        jax.jit(fixed.reset)(jax.random.key(2)),
    ):
        np.testing.assert_allclose(state.obs[4:6], goal, atol=1e-6)  # target x, y
    step = jax.jit(env.step)(state, jnp.asarray([0.3, -0.2]))
    np.testing.assert_allclose(
        step.metrics["goal_distance"], -step.metrics["reward_dist"], rtol=1e-6
    )
    np.testing.assert_allclose(
        step.reward, step.metrics["reward_dist"] + step.metrics["reward_ctrl"], rtol=1e-6
    )


@pytest.mark.slow
def test_smoke_run_gives_ppo_and_ml3_the_same_goals_and_budget(tmp_path):
    config = mfrl_config("reacher", "smoke")
    e = experiments.make(config)
    summary = train_and_evaluate(e, config, str(tmp_path))
    c = config
    assert summary["budget_samples"] == c.eval.test_updates * c.inner.rollouts * c.horizon
    assert summary["test_goals"] == np.asarray(e.test_goals).tolist()
    runs = [json.loads(p.read_text()) for p in sorted((tmp_path / "ppo").glob("*.json"))]
    assert len(runs) == len(c.ppo.seeds) * c.eval.num_goals
    for run in runs:
        assert run["goal_position"] == summary["test_goals"][run["goal"]]
        assert run["samples"][-1] == summary["budget_samples"]  # exactly ML³'s budget
    # brax's PPO resets the environment it is given to the goal: the target sits there.
    state = e.env.with_goal(e.test_goals[0]).reset(jax.random.key(0))
    np.testing.assert_allclose(state.obs[4:6], e.test_goals[0], atol=1e-6)
    for method in ("ml3", "ppo"):
        assert np.isfinite(summary[method]["final_return"]["mean"])
    assert set(summary["architectures"]) == {"1x8", "2x8"}
