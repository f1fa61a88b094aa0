"""ML³ inverse dynamics: the DeLaN inertia, the data, the losses and a tiny experiment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ml3_inverse_dynamics
from metalearn import algorithms, bilevel
from metalearn.algorithms import ml3
from metalearn.algorithms.ml3_inverse_dynamics import (
    ARMS,
    METHODS,
    relative_inertia_error,
    shaping_loss,
    sinusoids,
)
from metalearn.losses import learned as learned_losses
from metalearn.models.inertia import InertiaNet, cholesky_to_inertia, predicted_torque
from metalearn.runtime.loop import train_and_evaluate
from metalearn.state import init_inner_state
from metalearn.tasks import dynamics


@pytest.mark.parametrize("num_joints", [2, 7])
def test_inertia_is_symmetric_positive_definite_for_any_theta(float64, num_joints):
    q = jax.random.uniform(jax.random.key(1), (16, num_joints), minval=-4.0, maxval=4.0)
    net = InertiaNet(num_joints, hidden=(16,), eps=1e-3)
    init, apply = jax.jit(net.init), jax.jit(net.apply)  # compiled once, not op by op
    for seed in range(3):
        params = init(jax.random.key(seed), q)
        # Large and negative weights too: the softplus diagonal must keep M definite.
        params = jax.tree.map(lambda x, s=seed: x * (1.0 + 10.0 * s) * (-1) ** s, params)
        inertia = apply(params, q)
        np.testing.assert_allclose(inertia, jnp.swapaxes(inertia, -1, -2), atol=1e-12)
        assert np.all(np.linalg.eigvalsh(np.asarray(inertia)) >= 1e-3 * (1 - 1e-6))


def test_cholesky_entries_land_in_the_lower_triangle():
    n = 3
    entries = jnp.asarray([[0.1, 0.2, 0.3, 4.0, 5.0, 6.0]])
    lower = np.diag(np.asarray(jax.nn.softplus(entries[0, :n])) + 0.01)
    lower[1, 0], lower[2, 0], lower[2, 1] = 4.0, 5.0, 6.0  # row-major strictly lower part
    np.testing.assert_allclose(
        cholesky_to_inertia(entries, n, 0.01)[0], lower @ lower.T + 0.01 * np.eye(n), rtol=1e-6
    )


@pytest.mark.parametrize("arm_name", sorted(ARMS))
def test_true_inertia_in_the_model_equation_gives_the_simulator_torque(arm_name):
    arm = ARMS[arm_name]()

    @jax.jit
    def both(q, qd, qdd):
        inertia = jax.vmap(lambda q: dynamics.mass_matrix(arm, q))(q)
        bias = jax.vmap(lambda q, qd: dynamics.bias_forces(arm, q, qd))(q, qd)
        truth = jax.vmap(lambda *a: dynamics.inverse_dynamics(arm, *a))(q, qd, qdd)
        return predicted_torque(inertia, bias, qdd), truth

    ours, truth = both(*jax.random.normal(jax.random.key(0), (3, 5, arm.num_joints)))
    np.testing.assert_allclose(ours, truth, rtol=1e-4, atol=1e-5)


def test_trajectory_velocities_and_accelerations_are_its_time_derivatives(float64):
    keys = jax.random.split(jax.random.key(0), 4)
    coeffs = {
        "q0": jax.random.normal(keys[0], (3,)),
        "amp": jax.random.uniform(keys[1], (2, 3)),
        "freq": jax.random.uniform(keys[2], (2, 3), minval=0.5, maxval=3.0),
        "phase": jax.random.uniform(keys[3], (2, 3), maxval=6.0),
    }
    t = jnp.linspace(0.0, 5.0, 7)
    (q, qd, _), (dq, dqd, _) = jax.jvp(lambda t: sinusoids(coeffs, t), (t,), (jnp.ones_like(t),))
    np.testing.assert_allclose(dq, qd, rtol=1e-10)
    np.testing.assert_allclose(dqd, sinusoids(coeffs, t)[2], rtol=1e-10)


def test_shaping_loss_is_zero_exactly_at_the_true_inertia():
    arm = ARMS["sawyer"]()
    q = jax.random.normal(jax.random.key(0), (4, 7))
    inertia = jax.jit(jax.vmap(lambda q: dynamics.mass_matrix(arm, q)))(q)
    scale = jnp.linspace(0.5, 3.0, 7)
    tilde = inertia / (scale[:, None] * scale[None, :])[None]
    assert float(shaping_loss(tilde, inertia, scale)) == pytest.approx(0.0, abs=1e-10)
    assert float(shaping_loss(tilde * 1.1, inertia, scale)) > 1e-4
    assert float(relative_inertia_error(inertia, inertia)) == 0.0
    assert float(relative_inertia_error(1.1 * inertia, inertia)) == pytest.approx(0.01, rel=1e-4)


@pytest.fixture(scope="module")
def reacher():
    """The smoke config on the reacher alone (quick to compile), and its experiment."""
    config = ml3_inverse_dynamics.get_config("smoke")
    config.arms = ("reacher",)
    return config, algorithms.make(config)


def _one_task(experiment, key=0):
    problem = experiment.problems["reacher"]
    train, heldout = problem.episode_tasks(problem.pool, jax.random.key(key), 1)
    first = lambda t: jax.tree.map(lambda x: x[0], t)  # noqa: E731
    return problem, first(train), first(heldout)


def test_model_torques_with_the_true_inertia_match_the_data(reacher):
    _, experiment = reacher
    problem, _, heldout = _one_task(experiment)
    exact = problem.apply(None, heldout["x"], inertia=heldout["M"])
    np.testing.assert_allclose(exact, heldout["y"], atol=1e-4)


def test_training_batches_hold_no_true_inertia_and_test_trajectories_are_new(reacher):
    config, experiment = reacher
    problem, train, heldout = _one_task(experiment)
    assert "M" not in train and "M" in heldout
    assert train["y"].shape == (config.data.num_train, 2)
    assert heldout["y"].shape == (config.data.num_outer, 2)
    pool_q = np.asarray(problem.pool["q"]).reshape(-1, 2)
    test_q = np.asarray(problem.test_data["q"]).reshape(-1, 2)
    assert not (pool_q[:, None, :] == test_q[None, :, :]).all(-1).any()


def test_baseline_flag_trains_on_the_torque_mse_and_learned_flag_on_the_loss(reacher):
    _, experiment = reacher
    problem, train, _ = _one_task(experiment)
    params = problem.init_params(jax.random.key(3))
    phi = jax.tree.map(lambda x: x[0, 0], experiment.init()["reacher"].params)
    key = jax.random.key(0)
    value = jax.jit(
        lambda use_mse: experiment.inner_loss(problem, use_mse)(params, {}, phi, train, key)[0]
    )
    assert float(value(True)) == pytest.approx(float(problem.torque_mse(params, train)))
    y_hat = problem.apply(params, train["x"])
    assert float(value(False)) == pytest.approx(float(experiment.loss_fn(phi, train["y"], y_hat)))


def test_the_two_task_losses_read_what_they_should_and_give_finite_meta_gradients(reacher):
    config, experiment = reacher
    problem, train, heldout = _one_task(experiment)
    params = problem.init_params(jax.random.key(3))
    mse_loss = experiment.outer_loss(problem, jnp.asarray(False))
    shaped_loss = experiment.outer_loss(problem, jnp.asarray(True))
    key = jax.random.key(0)
    # The MSE task loss ignores the simulator's M; the shaping loss ignores the torques.
    other_m = {**heldout, "M": 2.0 * heldout["M"]}
    other_y = {**heldout, "y": heldout["y"] + 1.0}
    assert mse_loss(params, {}, heldout, key) == mse_loss(params, {}, other_m, key)
    assert shaped_loss(params, {}, heldout, key) == shaped_loss(params, {}, other_y, key)
    assert shaped_loss(params, {}, heldout, key) != shaped_loss(params, {}, other_m, key)

    phi = jax.tree.map(lambda x: x[0, 0], experiment.init()["reacher"].params)
    state = init_inner_state(params, experiment.inner_opt)

    @jax.jit
    @jax.vmap
    def meta_grad(shaped):  # both task losses in one compiled program
        # Two inner steps so that Adam's update depends on the gradient's size, not its sign.
        return bilevel.meta_grad(
            phi,
            state,
            ml3.repeat(train, 2),
            jax.random.split(key, 2),
            heldout,
            key,
            inner_loss=experiment.inner_loss(problem),
            outer_loss=experiment.outer_loss(problem, shaped),
            optimizer=experiment.inner_opt,
            estimator="unrolled",
        )[1]

    both = meta_grad(jnp.asarray([False, True]))
    grads = {
        name: jax.tree.map(lambda x, i=i: x[i], both) for i, name in enumerate(("mse", "shaped"))
    }
    for g in grads.values():
        flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
        assert np.isfinite(flat).all() and np.linalg.norm(flat) > 0
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grads["mse"], grads["shaped"])
    assert max(jax.tree.leaves(diff)) > 0


def test_tiny_experiment_runs_and_reports_every_method(reacher, tmp_path):
    config, experiment = reacher
    summary = train_and_evaluate(experiment, config, str(tmp_path / "run"))
    for metric in ("final_torque_mse", "final_inertia_error", "mean_torque_mse"):
        assert set(summary[metric]["reacher"]) == set(METHODS)
        for method in METHODS:
            assert np.isfinite(summary[metric]["reacher"][method]["mean"])
    artifacts = list((tmp_path / "run" / "learned_loss" / "reacher").glob("*/seed_*/loss_net.json"))
    assert len(artifacts) == 2 * len(config.seeds)
    # MSE does not depend on φ, the learned losses do: a φ of zeros changes only them.
    state = experiment.init()
    zeroed = {k: v.replace(params=jax.tree.map(jnp.zeros_like, v.params)) for k, v in state.items()}
    a = experiment.all_traces(state, experiment.test_data)["reacher"]
    b = experiment.all_traces(zeroed, experiment.test_data)["reacher"]
    np.testing.assert_array_equal(a["mse"], b["mse"])
    assert not np.allclose(a["ml3_mse"], b["ml3_mse"])
    # Every method starts from the same θ₀ on the same data.
    np.testing.assert_array_equal(a["mse"][..., 0, :], a["ml3_shaped"][..., 0, :])


def test_unknown_variant_and_arm_are_rejected():
    with pytest.raises(ValueError, match="Unknown variant 'nope'"):
        ml3_inverse_dynamics.get_config("nope")
    config = ml3_inverse_dynamics.get_config("smoke")
    config.arms = ("reacher", "octopus")
    with pytest.raises(ValueError, match="octopus"):
        algorithms.make(config)


def test_the_learned_loss_keeps_its_gradient_when_meta_training_pushes_its_output_down():
    # The collapse of the first version: the meta-gradient drove the output bias far
    # negative, a Softplus output saturated (ℓ_φ ~ 1e-30) and ∂ℓ/∂ŷ vanished for good.
    config = ml3_inverse_dynamics.get_config()
    loss_fn = learned_losses.learned_loss_fn(config.loss_net)
    phi = learned_losses.init_learned_loss(config.loss_net, jax.random.key(4))
    last = sorted(phi["params"])[-1]
    pushed = jax.tree.map(lambda x: x, phi)
    pushed["params"][last]["bias"] = phi["params"][last]["bias"] - 100.0
    y = jnp.linspace(-2.0, 2.0, 8).reshape(4, 2)
    grad = jax.jit(jax.grad(loss_fn, argnums=2))
    np.testing.assert_allclose(grad(pushed, y, 0.5 * y), grad(phi, y, 0.5 * y), rtol=1e-5)
    assert float(jnp.abs(grad(phi, y, 0.5 * y)).max()) > 1e-4
