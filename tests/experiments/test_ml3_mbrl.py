"""ML³ for model-based RL (experiments/ml3_mbrl.py): the pieces that can go wrong.

The CLI smoke run of both configs is in tests/experiments/test_run.py (slow tier); the
replay buffer and the ensemble have their own tests under tests/metalearn/.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import ml3_mbrl_pointmass, ml3_mbrl_reacher
from experiments import make
from metalearn import bilevel
from metalearn.losses import learned
from metalearn.models import ensemble
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


@pytest.fixture(scope="module")
def inits(experiment):
    """(learned-loss φ, an ensemble model, `init_policy` compiled), made once."""
    env = experiment.env

    @jax.jit
    def phi_and_model(key):
        phi = learned.init_learned_loss(
            experiment.config.loss_net,
            jax.random.fold_in(key, 0),
            num_outputs=env.goal_dim,
            num_extra=experiment.num_extra,
        )
        model = ensemble.init_ensemble(
            experiment.dyn_net, jax.random.fold_in(key, 1), 2, env.state_dim, env.action_dim
        )
        # Non-trivial statistics, so the model's Jacobian is far from the identity.
        model["stats"]["out_std"] = jnp.full((env.state_dim,), 0.5)
        return phi, model

    return (*phi_and_model(jax.random.key(4)), jax.jit(experiment.init_policy))


def test_inner_gradient_with_detached_states_does_not_depend_on_the_model(
    experiment, inits, fast_compile
):
    """∇_θ M_φ(τ(θ), g) for a rollout in the model equals that on the same trajectory
    recorded as data, so the learned loss can train policies without any model."""
    phi, model, init_policy = inits
    theta = init_policy(jax.random.key(3))
    goal = jnp.asarray([0.5, 0.7])
    step = experiment.model_step(model)
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


def test_meta_gradient_through_the_model_is_finite_and_nonzero(experiment, inits, fast_compile):
    phi, model, init_policy = inits
    step = experiment.model_step(model)
    goals = jnp.asarray([[0.5, 0.7], [0.9, 0.3]])

    def outer(params, model_state, batch, key):
        return experiment.task_loss(step, params, batch["goal"])

    batches = {"goal": goals[:, None]}
    keys = jax.random.split(jax.random.key(6), (2, 1))

    @jax.jit
    def meta_grad(phi, key):
        thetas = jax.vmap(experiment.init_policy)(jax.random.split(key, 2))
        states = jax.vmap(lambda p: init_inner_state(p, experiment.inner_opt))(thetas)
        problem = bilevel.Problem(experiment.learned_inner_loss(step), outer, experiment.inner_opt)
        grads, _, metrics = bilevel.Unrolled().estimate_tasks(
            problem,
            phi,
            bilevel.EstimatorState(states),
            batches,
            keys,
            {"goal": goals},
            keys[:, 0],
        )
        return metrics["meta/loss"], grads

    loss, grads = meta_grad(phi, jax.random.key(5))
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(loss)) and all(np.isfinite(x).all() for x in leaves)
    assert _norm(grads) > 1e-6


def test_task_loss_through_the_true_simulator_reduces_the_distance(experiment, inits, fast_compile):
    theta = inits[2](jax.random.key(7))
    goal = jnp.asarray([0.12, 0.08])  # reachable in 6 steps
    inner = experiment.task_inner_loss(experiment.env.step)
    _, trace = jax.jit(lambda t: experiment.fit_policy(inner, {}, t, goal))(theta)
    trace = np.asarray(trace["distance"])
    assert trace.shape == (experiment.config.eval.test_steps + 1,)
    assert trace[-1] < 0.7 * trace[0]  # a wrong sign or a cut gradient would not


@pytest.mark.slow  # ~20 s: three gradients through rollouts, compiled
def test_saturation_is_measured_and_the_preactivation_penalty_restores_the_gradient(
    experiment, inits, fast_compile
):
    """A policy scaled into its tanh's flat tails has every action saturated and almost no
    gradient from the learned loss; the pre-activation penalty gives it one back."""
    phi, model, init_policy = inits
    theta = init_policy(jax.random.key(12))
    # Its biases (zero at init, and the start state is zero) put every z far beyond ±2.
    saturated = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 6.0 if "bias" in jax.tree_util.keystr(path) else x, theta
    )
    goal = jnp.asarray([0.5, 0.7])
    config = experiment.config.policy

    def inner_with(penalty):  # the experiment reads the penalty when building the loss
        before = config.preact_penalty, config.preact_bound
        config.preact_penalty, config.preact_bound = penalty, 2.0
        try:
            return experiment.learned_inner_loss(experiment.model_step(model))
        finally:
            config.preact_penalty, config.preact_bound = before

    off, on = inner_with(0.0), inner_with(1.0)

    @jax.jit
    def measure(theta, saturated):
        def grad(inner, p):
            return jax.grad(lambda p: inner(p, {}, phi, {"goal": goal}, None)[0])(p)

        return (
            experiment.real_metrics(theta, goal)["saturation"],
            experiment.real_metrics(saturated, goal)["saturation"],
            grad(off, theta),
            grad(off, saturated),
            grad(on, saturated),
        )

    sat_fresh, sat_big, grad_fresh, grad_off, grad_on = measure(theta, saturated)
    assert float(sat_fresh) < 0.5 and float(sat_big) == 1.0
    assert _norm(grad_off) < 1e-3 * _norm(grad_fresh)
    assert _norm(grad_on) > 100 * _norm(grad_off)


def test_learned_step_size_scales_the_inner_step_and_gets_a_meta_gradient(
    experiment, inits, fast_compile
):
    """With `meta.learn_step_size`, φ = {'loss', 'log_step'}: the inner loss (hence the SGD
    step) is exp(gain · log_step) times the plain one, and log_step has a meta-gradient."""
    phi, model, init_policy = inits
    theta = init_policy(jax.random.key(13))
    step = experiment.model_step(model)
    meta = experiment.config.meta
    batch = {"goal": jnp.asarray([0.5, 0.7])}
    plain = experiment.learned_inner_loss(step)
    meta.learn_step_size = True
    try:
        scaled = experiment.learned_inner_loss(step)
        log_step = jnp.asarray(0.05)

        @jax.jit
        def measure(phi, log_step):
            def after_step(log_step):  # the task loss after one SGD step on the scaled loss
                full = {"loss": phi, "log_step": log_step}
                g = jax.grad(lambda p: scaled(p, {}, full, batch, None)[0])(theta)
                new = jax.tree.map(lambda p, g: p - 0.1 * g, theta, g)
                return experiment.task_loss(step, new, batch["goal"])

            full = {"loss": phi, "log_step": log_step}
            return (
                scaled(theta, {}, full, batch, None)[0],
                plain(theta, {}, phi, batch, None)[0],
                jax.grad(after_step)(log_step),
            )

        value, base, meta_grad = measure(phi, log_step)
    finally:
        meta.learn_step_size = False
    np.testing.assert_allclose(value, np.exp(meta.step_size_gain * 0.05) * base, rtol=1e-5)
    assert np.isfinite(float(meta_grad)) and abs(float(meta_grad)) > 0


def test_pointmass_meta_test_goals_lie_in_another_quadrant(experiment):
    goals = experiment.eval_goals(jax.random.key(8))
    train, test = np.asarray(goals["train_goals"]), np.asarray(goals["test_goals"])
    assert (train > 0).all()
    assert (test[:, 0] < 0).all() and (test[:, 1] > 0).all()
    batch = np.asarray(experiment.train_goals(jax.random.key(8), jax.random.key(9), 16))
    assert (batch > 0).all()


def test_reacher_test_goals_are_reachable_and_new():
    config = ml3_mbrl_reacher.get_config("smoke")
    config.data.num_train_goals = 8  # a fixed pool per seed (the default draws fresh goals)
    experiment = make(config)
    key = jax.random.key(10)
    goals, pool = jax.jit(
        lambda key: (
            experiment.eval_goals(key),
            experiment.train_goals(key, jax.random.key(11), 64),
        )
    )(key)
    for g in goals.values():
        radius = np.linalg.norm(np.asarray(g), axis=-1)
        assert (radius <= 0.21).all() and (radius >= 0.05).all()
    dist = np.linalg.norm(
        np.asarray(goals["test_goals"])[:, None] - np.asarray(pool)[None], axis=-1
    )
    assert dist.min() > 1e-4
    assert len(np.unique(np.asarray(pool), axis=0)) == experiment.config.data.num_train_goals


def test_unknown_variant_and_environment_are_rejected():
    with pytest.raises(ValueError, match="Unknown variant 'nope'"):
        ml3_mbrl_pointmass.get_config("nope")
    config = ml3_mbrl_pointmass.get_config("smoke")
    config.env = "octopus"
    with pytest.raises(ValueError, match="Unknown environment 'octopus'"):
        make(config)
