"""ML³ for model-based RL (metalearn.algorithms.ml3_mbrl): the pieces that can go wrong.

The CLI smoke run of both configs is in tests/test_experiments.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import ml3_mbrl_pointmass, ml3_mbrl_reacher
from metalearn import bilevel
from metalearn.algorithms import make
from metalearn.algorithms import ml3_mbrl as mbrl
from metalearn.losses import learned
from metalearn.models.mlp import MLP
from metalearn.state import init_inner_state


@pytest.fixture(scope="module")
def experiment():
    config = ml3_mbrl_pointmass.get_config("smoke")
    config.horizon = 6
    config.eval.test_steps = 10
    config.policy.hidden = (8,)
    config.loss_net.hidden = (16, 16)
    config.dynamics.hidden = (16,)
    return make(config)


def _norm(tree):
    return float(optax.global_norm(tree))


def _model(experiment, seed=0):
    env = experiment.env
    model = mbrl.init_ensemble(
        experiment.dyn_net, jax.random.key(seed), 3, env.state_dim, env.action_dim
    )
    # Non-trivial statistics, so the model's Jacobian is far from the identity.
    model["stats"]["out_std"] = jnp.full((env.state_dim,), 0.5)
    return model


def _phi(experiment):
    return learned.init_learned_loss(
        experiment.config.loss_net,
        jax.random.key(4),
        num_outputs=experiment.env.goal_dim,
        num_extra=experiment.num_extra,
    )


def test_replay_buffer_ring_wraps_around():
    buffer = mbrl.buffer_init(5, 1, 1)
    col = lambda *v: jnp.asarray(v, jnp.float32)[:, None]  # noqa: E731
    buffer = mbrl.buffer_add(buffer, col(1, 2, 3), col(1, 2, 3), col(1, 2, 3))
    assert int(buffer.ptr) == 3 and int(buffer.count) == 3
    buffer = mbrl.buffer_add(buffer, col(4, 5, 6, 7), col(4, 5, 6, 7), col(4, 5, 6, 7))
    assert int(buffer.ptr) == 2 and int(buffer.count) == 5
    np.testing.assert_array_equal(buffer.states[:, 0], [6, 7, 3, 4, 5])
    np.testing.assert_array_equal(buffer.next_states[:, 0], [6, 7, 3, 4, 5])
    with pytest.raises(ValueError, match="capacity 5"):
        mbrl.buffer_add(buffer, *(jnp.zeros((6, 1)),) * 3)


def test_ensemble_fit_learns_a_linear_system(fast_compile):
    a = jnp.asarray([[0.9, 0.2], [-0.1, 0.8]])
    b = jnp.asarray([[0.5], [1.0]])
    k1, k2 = jax.random.split(jax.random.key(0))
    s = jax.random.normal(k1, (512, 2))
    u = jax.random.normal(k2, (512, 1))
    s2 = s @ a.T + u @ b.T
    buffer = mbrl.buffer_add(mbrl.buffer_init(512, 2, 1), s, u, s2)
    net = MLP((16, 16, 2), "elu")
    model = mbrl.init_ensemble(net, jax.random.key(1), 3, 2, 1)
    opt = optax.adam(3e-3)
    fit = jax.jit(
        lambda m, o, k: mbrl.fit_ensemble(
            net, m, o, buffer, k, optimizer=opt, num_steps=300, batch_size=64
        )
    )
    model, _, losses = fit(model, opt.init(model["params"]), jax.random.key(2))
    assert float(losses[-20:].mean()) < 0.05 * float(losses[:5].mean())
    pred = jax.vmap(lambda x, y: mbrl.ensemble_step(net, model, x, y))(s[:64], u[:64])
    err = jnp.mean((pred - s2[:64]) ** 2) / jnp.mean((s2[:64] - s[:64]) ** 2)
    assert float(err) < 0.05


def test_inner_gradient_with_detached_states_does_not_depend_on_the_model(experiment, fast_compile):
    """∇_θ M_φ(τ(θ), g) for a rollout in the model equals that on the same trajectory
    recorded as data, so the learned loss can train policies without any model."""
    phi = _phi(experiment)
    theta = experiment.init_policy(jax.random.key(3))
    goal = jnp.asarray([0.5, 0.7])
    step = experiment.model_step(_model(experiment))
    inner = experiment.learned_inner_loss(step)

    def on_recorded(p, recorded):
        actions = jax.vmap(lambda s: experiment.policy(p, s))(recorded[:-1])
        return experiment.learned_loss(phi, recorded, actions, goal)

    def attached(p):  # the same loss without the detach: its gradient runs through the model
        states, actions = experiment.rollout(step, p, detach_states=False)
        return experiment.learned_loss(phi, states, actions, goal)

    @jax.jit
    def grads(p):
        states, _ = experiment.rollout(step, p, detach_states=True)
        return (
            jax.grad(lambda p: inner(p, {}, phi, {"goal": goal}, None)[0])(p),
            jax.grad(on_recorded)(p, jax.lax.stop_gradient(states)),
            jax.grad(attached)(p),
        )

    grad_rollout, grad_recorded, grad_attached = grads(theta)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
        grad_rollout,
        grad_recorded,
    )
    assert _norm(grad_rollout) > 0
    diff = jax.tree.map(lambda x, y: x - y, grad_attached, grad_recorded)
    assert _norm(diff) > 1e-3 * _norm(grad_recorded)  # so the test can fail


def test_meta_gradient_through_the_model_is_finite_and_nonzero(experiment, fast_compile):
    phi = _phi(experiment)
    step = experiment.model_step(_model(experiment))
    goals = jnp.asarray([[0.5, 0.7], [0.9, 0.3]])
    thetas = jax.vmap(experiment.init_policy)(jax.random.split(jax.random.key(5), 2))
    states = jax.vmap(lambda p: init_inner_state(p, experiment.inner_opt))(thetas)

    def outer(params, model_state, batch, key):
        return experiment.task_loss(step, params, batch["goal"])

    batches = {"goal": goals[:, None]}
    keys = jax.random.split(jax.random.key(6), (2, 1))
    loss, grads, _, _ = jax.jit(
        lambda phi: bilevel.meta_grad_over_tasks(
            phi,
            states,
            batches,
            keys,
            {"goal": goals},
            keys[:, 0],
            inner_loss=experiment.learned_inner_loss(step),
            outer_loss=outer,
            optimizer=experiment.inner_opt,
        )
    )(phi)
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(loss)) and all(np.isfinite(x).all() for x in leaves)
    assert _norm(grads) > 1e-6


def test_task_loss_through_the_true_simulator_reduces_the_distance(experiment, fast_compile):
    theta = experiment.init_policy(jax.random.key(7))
    goal = jnp.asarray([0.12, 0.08])  # reachable in 6 steps
    inner = experiment.task_inner_loss(experiment.env.step)
    _, trace = jax.jit(lambda t: experiment._fit(inner, {}, t, goal))(theta)
    trace = np.asarray(trace)
    assert trace.shape == (experiment.config.eval.test_steps + 1,)
    assert trace[-1] < 0.7 * trace[0]  # a wrong sign or a cut gradient would not


def test_pointmass_meta_test_goals_lie_in_another_quadrant(experiment):
    goals = experiment.eval_goals(jax.random.key(8))
    train, test = np.asarray(goals["train_goals"]), np.asarray(goals["test_goals"])
    assert (train > 0).all()
    assert (test[:, 0] < 0).all() and (test[:, 1] > 0).all()
    batch = np.asarray(experiment.train_goals(jax.random.key(8), jax.random.key(9), 16))
    assert (batch > 0).all()


def test_reacher_test_goals_are_reachable_and_new():
    experiment = make(ml3_mbrl_reacher.get_config("smoke"))
    key = jax.random.key(10)
    goals = experiment.eval_goals(key)
    pool = experiment.train_goals(key, jax.random.key(11), 64)
    for g in goals.values():
        radius = np.linalg.norm(np.asarray(g), axis=-1)
        assert (radius <= 0.21).all() and (radius >= 0.05).all()
    dist = np.linalg.norm(
        np.asarray(goals["test_goals"])[:, None] - np.asarray(pool)[None], axis=-1
    )
    assert dist.min() > 1e-4
    assert len(np.unique(np.asarray(pool), axis=0)) == experiment.config.data.num_train_goals


def test_unknown_variant_is_rejected():
    with pytest.raises(ValueError, match="Unknown variant 'nope'"):
        ml3_mbrl_pointmass.get_config("nope")
