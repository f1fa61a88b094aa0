"""ML³ for model-free RL (experiments/ml3_mfrl.py) and its brax goal environments.

Default tier: the REINFORCE surrogate, the meta-gradient through one inner step against
finite differences on fixed episodes (float64), the samples-to-80 % measure and the
config checks; and, on a cheap stand-in for the brax environments (`PointGoal`, nothing
to compile), meta.estimator='es' and 'pes' on the return itself: their estimates against
finite differences of the return with the same episodes, memory that does not grow with
the window, and a run whose ES estimate explodes. Slow tier (MuJoCo MJX programs take a
while to compile on a CPU): the goal environments' rewards, and a smoke run whose PPO and
ML³ see the same goals and budget.
The CLI smoke runs of both configs are in tests/experiments/test_run.py (slow tier).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from configs._mfrl import mfrl_config
from experiments.ml3_mfrl import reward_to_go, samples_to_fraction
from metalearn import bilevel
from metalearn.losses.task import reinforce
from metalearn.runtime.loop import NonFiniteError, train_and_evaluate
from metalearn.state import init_inner_state
from metalearn.tasks import goal_envs


@pytest.fixture(autouse=True, scope="module")
def brax_broadcasts():
    """brax's own code relies on rank promotion, which conftest.py makes an error. Allowed
    globally, not by the thread-local context manager: the loop evaluates step 0 in a
    worker thread."""
    previous = jax.config.jax_numpy_rank_promotion
    jax.config.update("jax_numpy_rank_promotion", "allow")
    yield
    jax.config.update("jax_numpy_rank_promotion", previous)


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


@pytest.mark.slow  # 30 s; the default tier checks the heart's meta-gradients by finite differences
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

    problem = bilevel.Problem(inner_loss, e.task_loss, e.inner_opt)

    @jax.jit
    def meta_loss(p):
        return bilevel.Unrolled().loss(
            problem,
            p,
            state,
            jax.tree.map(lambda x: x[None], inner),
            jax.random.split(jax.random.key(5), 1),
            outer,
            jax.random.key(6),
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


class PointState(NamedTuple):
    position: jax.Array
    goal: jax.Array
    obs: jax.Array
    reward: jax.Array


class PointGoal:
    """A stand-in for the goal environments with nothing to compile: a point in the plane
    moved by 0.1 × the action and rewarded −‖position − goal‖², smooth in the actions, so
    the return of episodes with fixed keys is a smooth function of φ."""

    observation_size, action_size, goal_dim = 4, 2, 2

    def _state(self, position, goal, reward):
        return PointState(position, goal, jnp.concatenate([position, goal - position]), reward)

    def reset_to(self, rng, goal):
        position = 0.05 * jax.random.normal(rng, (2,), goal.dtype)
        return self._state(position, goal, jnp.zeros((), goal.dtype))

    def step(self, state, action):
        position = state.position + 0.1 * action
        return self._state(position, state.goal, -jnp.sum((position - state.goal) ** 2))

    def goal_distance(self, state):
        return jnp.linalg.norm(state.position - state.goal)


def point_config(estimator="es", window=2):
    """The reacher smoke config, meta-trained by `estimator` in windows of `window` of 4."""
    c = mfrl_config("reacher", "smoke")
    c.meta.estimator, c.meta.window = estimator, window
    c.inner.episode_length = 4
    c.horizon = 5
    c.loss_net.hidden = (8,)  # 97 parameters: ES's variance grows with their number
    c.policy.init_log_std = -1.5  # the actions stay inside the environment's clip to [-1, 1]
    c.eval.ppo = False
    return c


def point_experiment(config):
    """`experiments.make(config)` on `PointGoal` instead of the brax environment."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(goal_envs, "make_env", lambda name: PointGoal())
        return experiments.make(config)


def to64(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def return_after_inner_steps(e, num_steps):
    """The problem and the arguments of `estimate` but φ and the outer key, for one goal:
    θ₀ takes `num_steps` inner steps of the ES objective (fresh episodes each), then
    −(mean return) of `meta.rollouts` episodes; every key fixed (the outer loss ignores
    the outer key it is given, from which ES draws its perturbations)."""
    goal = jnp.asarray([0.1, -0.05], jnp.float64)
    theta = to64(jax.jit(e.init_policy, static_argnums=0)(e.policy_net, jax.random.key(1)))
    episodes_key = jax.random.key(4)
    problem = bilevel.Problem(
        e.es_inner_loss(e.policy_net),
        lambda p, ms, b, k: e.return_loss(p, ms, b, episodes_key),
        e.inner_opt,
    )
    args = (
        bilevel.EstimatorState(init_inner_state(theta, e.inner_opt)),
        {"goal": jnp.broadcast_to(goal, (num_steps, 2))},
        jax.random.split(jax.random.key(3), num_steps),
        {"goal": goal},
    )
    return problem, args


def tree_vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def assert_matches_finite_differences(estimate, objective, phi, num_draws):
    """Checks an unbiased estimate of ∇`objective`(φ) by its mean over draws.

    Half the draws of `estimate(noise_key)` give a pilot direction (their mean, ≈ the
    gradient, so the derivative along it is large and a wrong scale shows); the other
    half, independent of it, are projected on it and on two random directions. Each mean
    must lie within 3 standard errors of the central difference of `objective`, and
    along the pilot the standard error must be under 1/10 of the derivative.

    Returns:
      (z-scores [3], |derivative| / standard error [3]), the pilot first.
    """
    h = 1e-5

    @jax.jit
    def along_directions(noise_keys, direction_keys):
        draws = jax.vmap(estimate)(noise_keys)
        pilot = jax.tree.map(lambda g: g[: num_draws // 2].mean(0), draws)
        held_out = jax.tree.map(lambda g: g[num_draws // 2 :], draws)

        def random_direction(key):
            leaves, treedef = jax.tree.flatten(phi)
            keys = jax.random.split(key, len(leaves))
            normal = [
                jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
            ]
            return jax.tree.unflatten(treedef, normal)

        def one(d):
            step = lambda sign: jax.tree.map(lambda p, v: p + sign * h * v, phi, d)  # noqa: E731
            numeric = (objective(step(1.0)) - objective(step(-1.0))) / (2 * h)
            return numeric, jax.vmap(lambda g: tree_vdot(g, d))(held_out)

        directions = jax.tree.map(
            lambda a, b: jnp.concatenate([a[None], b]),
            pilot,
            jax.vmap(random_direction)(direction_keys),
        )
        return jax.vmap(one)(directions)

    numeric, along = along_directions(
        jax.random.split(jax.random.key(5), num_draws), jax.random.split(jax.random.key(6), 2)
    )
    numeric, along = np.asarray(numeric), np.asarray(along)
    mean, se = along.mean(1), along.std(1, ddof=1) / np.sqrt(along.shape[1])
    z, resolution = (mean - numeric) / se, np.abs(numeric) / se
    assert np.all(np.abs(z) < 3), (mean, numeric, se)
    assert resolution[0] > 10, (numeric, se)  # the check can tell a wrong estimate
    return z, resolution


@pytest.mark.slow  # 16 s; the default tier checks ES against finite differences in the heart
def test_es_estimate_of_the_return_matches_finite_differences(float64, fast_compile):
    """ES's mean over many draws against the directional derivatives of −(mean return)
    after two inner steps, with the same episode keys in both (common random numbers)."""
    e = point_experiment(point_config())
    assert isinstance(e.estimator, bilevel.ES)
    problem, (state, batches, keys, outer_batch) = return_after_inner_steps(e, 2)
    phi = to64(jax.jit(e.init_one)(jax.random.key(2)).params)

    def estimate(noise_key):  # the outer key: only ES's perturbations depend on it
        return e.estimator.estimate(problem, phi, state, batches, keys, outer_batch, noise_key)[0]

    def objective(p):
        args = (p, state.inner, batches, keys, outer_batch, jax.random.key(0))
        return bilevel.Unrolled().loss(problem, *args)[0]

    assert_matches_finite_differences(estimate, objective, phi, num_draws=1000)


def test_the_config_chooses_the_estimator_and_unusable_ones_are_refused():
    c = point_config("es", window=4)
    c.meta.estimator_options = {"sigma": 0.05, "pairs": 3}
    e = point_experiment(c)
    assert e.estimator == bilevel.ES(sigma=0.05, pairs=3) and e.forward_only
    truncated = point_experiment(point_config("truncated", window=1))
    assert truncated.estimator == bilevel.Truncated(window=1) and not truncated.forward_only
    for estimator, window, match in [
        ("implicit", 1, r"cannot use meta.estimator='implicit': .* \(no fixed point\)"),
        ("truncated", 2, r"use meta.window=1 .* For windows of several inner steps use 'es'"),
        ("unrolled", 4, r"use meta.window=1 .* For windows of several inner steps use 'es'"),
        ("pes", 4, r"plain ES: say estimator='es'"),
        ("ES", 2, r"Did you mean 'es'"),
    ]:
        with pytest.raises(ValueError, match=match):
            point_experiment(point_config(estimator, window))


def compiled_meta_iteration(config):
    """A meta iteration (`train_chunk` of one step) compiled, its initial state, and the
    compilation's temporary memory."""
    config.fast_compile = False  # jax refuses compiler options on a nested jit: the fixture's
    e = point_experiment(config)
    state = e.init()
    compiled = jax.jit(e.train_chunk, static_argnums=(1, 2)).lower(state, 0, 1).compile()
    return compiled, state, compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    ("estimator", "window"),
    [("es", 2), ("pes", 2)],
)
@pytest.mark.slow  # 12-23 s each; the default tier checks ES here against finite differences
def test_es_and_pes_meta_train_on_the_return_in_memory_independent_of_the_window(
    estimator, window, fast_compile
):
    run, state, temp_bytes = compiled_meta_iteration(point_config(estimator, window))
    new, metrics = run(state)
    assert all(np.isfinite(v).all() for v in metrics.values()), metrics
    assert np.all(metrics["meta/es_loss_spread"] > 0)  # the perturbations score differently
    assert np.all(metrics["meta/loss"] > 0)  # −(mean return), and PointGoal's rewards are ≤ 0
    kernel = lambda s: s.params["params"]["Dense_0"]["kernel"]  # noqa: E731
    assert not np.allclose(kernel(new), kernel(state))
    if estimator == "es":  # forward unrolls only: a window 8× as long needs no more memory
        long = point_config(estimator, 16)
        long.inner.episode_length = 16
        assert compiled_meta_iteration(long)[2] <= 1.05 * temp_bytes


@pytest.mark.slow  # 19 s; test_run.py checks the same stop on ml3_sine in the default tier
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_an_exploding_es_estimate_stops_the_run_and_names_sigma(tmp_path):
    c = point_config("es", window=4)
    c.meta.estimator_options = {"sigma": 1e30, "pairs": 2}  # φ ± 1e30: the returns overflow
    with pytest.raises(NonFiniteError, match=r"at step 1 .*lower meta.estimator_options.sigma"):
        train_and_evaluate(point_experiment(c), c, str(tmp_path))


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


# The PPO-and-ML³ same-goals-and-budget check and ES's meta-training on the whole inner
# episode read the CLI smoke run of configs/ml3_mfrl_reacher.py (test_run.py), instead
# of runs of their own.
