"""ML³ shaped by expert demonstrations on ReacherGoal: experts, objectives, gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ml3_reacher_demos
from experiments.ml3_reacher_demos import ReacherDemos


class _WithCheapDemos(ReacherDemos):
    """The experiment with made-up demonstrations in place of the iLQR experts.

    Compiling the iLQR solver for the arm takes most of a smoke run; the tests of the
    objectives and of the meta step need demonstrations of the right shapes, distinct
    states and torques within the limits, not good ones.
    """

    def expert_demos(self, goals):
        num, horizon = goals.shape[0], self.horizon
        t = jnp.linspace(0.0, 1.0, horizon + 1)[None, :, None]  # [1, T + 1, 1]
        phase = jnp.arange(num, dtype=t.dtype)[:, None, None] + jnp.array([[[0.0, 1.0]]])
        q, qd = jnp.sin(2.0 * t + phase), jnp.cos(2.0 * t + phase)  # [G, T + 1, 2] each
        torques = self.env.action_scale * jnp.tanh(qd[:, :-1])
        return {
            "goal": goals,
            "states": jnp.concatenate([q, qd], axis=-1),
            "actions": torques,
            "distance": jnp.zeros((num,)),
        }


def _tiny_config():
    c = ml3_reacher_demos.get_config("smoke")
    c.seeds = (0,)
    c.eval.test_steps = 2
    return c


@pytest.fixture(scope="module")
def experiment():
    return _WithCheapDemos(_tiny_config())


def test_bc_loss_is_zero_for_the_experts_own_actions(experiment):
    demo = jax.tree.map(lambda x: x[0], experiment.demos)

    def expert(state, goal):
        del goal
        return demo["actions"][jnp.argmin(jnp.sum((demo["states"][:-1] - state[None]) ** 2, -1))]

    offset = jnp.array([0.01, -0.02])
    exact, shifted = experiment.jit(
        lambda d: (
            experiment.bc_loss(expert, d),
            experiment.bc_loss(lambda s, g: expert(s, g) + offset, d),
        )
    )(demo)
    assert float(exact) == pytest.approx(0.0, abs=1e-10)
    expected = float(jnp.sum((offset / experiment.env.action_scale) ** 2))
    assert float(shifted) == pytest.approx(expected, rel=1e-4)


def test_inner_gradient_flows_through_the_actions_only(experiment):
    """∇_θ M_φ(τ(θ), g) equals the gradient with the rollout's states held as data."""
    phi = jax.tree.map(lambda x: x[0], experiment.init().params)
    params = experiment.init_policy(jax.random.key(3))
    goal = experiment.test_goals[0]

    def inner(p):
        return experiment.learned_inner_loss(p, {}, phi, {"goal": goal}, None)[0]

    @experiment.jit  # one compiled program for both gradients
    def both(params):
        states = jax.lax.stop_gradient(experiment.rollout(params, goal)[0])

        def with_fixed_states(p):
            actions = jax.vmap(lambda s: experiment.act(p, s, goal))(states[:-1])
            return experiment.loss_fn(phi, *experiment.loss_inputs(states, actions, goal))

        return jax.grad(inner)(params), jax.grad(with_fixed_states)(params)

    got, want = both(params)
    chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-7)
    assert float(jnp.abs(jax.flatten_util.ravel_pytree(got)[0]).max()) > 0


@pytest.fixture(scope="module")
def meta_step(experiment):
    """The state before and after one meta step, and its metrics."""
    state = experiment.init()
    return (state, *experiment.train_chunk(state, 0, 1))


@pytest.mark.slow  # its fixture compiles a meta step through the arm: 37 s in the default tier
def test_meta_step_has_a_finite_nonzero_gradient_and_moves_phi(meta_step):
    state, new_state, metrics = meta_step
    grad_norm = np.asarray(metrics["meta/grad_norm"])
    assert grad_norm.shape == (1, 1) and np.all(np.isfinite(grad_norm)) and np.all(grad_norm > 0)
    delta = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, new_state.params)
    assert max(jax.tree.leaves(delta)) > 0


@pytest.mark.slow
def test_training_fresh_policies_with_the_learned_loss_moves_the_arm(experiment, meta_step):
    out = experiment.ml3_meta_test(meta_step[1].params)
    test = np.asarray(out["test"])  # [seeds, goals, updates + 1]
    assert test.shape == (1, len(experiment.config.data.test_targets), 3)
    assert np.all(np.abs(test[..., -1] - test[..., 0]) > 1e-6)
    # The meta-test reports distances from the positions it reached.
    np.testing.assert_allclose(
        test[:, :, -1],
        np.linalg.norm(np.asarray(out["positions"]) - experiment.test_goals[None], axis=-1),
        rtol=1e-6,
    )


@pytest.mark.slow
def test_experts_reach_their_targets_and_their_states_follow_the_dynamics():
    experiment = ReacherDemos(_tiny_config())  # the real iLQR experts
    demos = experiment.demos
    assert float(jnp.max(demos["distance"])) < 0.01  # m; targets are 0.13-0.17 m out
    assert float(jnp.max(experiment.oracle["distance"])) < 0.01
    # The recorded actions are the torques that produce the recorded states.
    env = experiment.env

    @jax.jit
    @jax.vmap
    def replay(states, actions):
        return jax.lax.scan(lambda s, a: (env.step(s, a),) * 2, states[0], actions)[1]

    np.testing.assert_allclose(
        replay(demos["states"], demos["actions"]), demos["states"][:, 1:], atol=1e-4
    )
    assert float(jnp.max(jnp.abs(demos["actions"]))) <= env.action_scale + 1e-6
