"""ML³ inverse dynamics (experiments/ml3_inverse_dynamics.py): the data, the losses, the
meta-test protocol and, in the slow tier, a tiny run.

The inertia network and the trajectory sampler have their own tests under
tests/metalearn/.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ml3_inverse_dynamics
from experiments import make
from experiments.ml3_inverse_dynamics import METHODS, relative_inertia_error, shaping_loss
from metalearn import bilevel
from metalearn.algorithms import ml3
from metalearn.losses import learned as learned_losses
from metalearn.runtime.loop import train_and_evaluate
from metalearn.state import init_inner_state


def test_shaping_loss_is_zero_exactly_at_the_true_inertia():
    @jax.jit
    def losses(key):
        a = jax.random.normal(key, (4, 7, 7))
        inertia = a @ jnp.swapaxes(a, -1, -2) + jnp.eye(7)[None]  # any positive definite M
        scale = jnp.linspace(0.5, 3.0, 7)
        tilde = inertia / (scale[:, None] * scale[None, :])[None]
        return (
            shaping_loss(tilde, inertia, scale),
            shaping_loss(tilde * 1.1, inertia, scale),
            relative_inertia_error(inertia, inertia),
            relative_inertia_error(1.1 * inertia, inertia),
        )

    at_truth, off, error_at_truth, error_off = map(float, losses(jax.random.key(0)))
    assert at_truth == pytest.approx(0.0, abs=1e-10) and off > 1e-4
    assert error_at_truth == 0.0
    assert error_off == pytest.approx(0.01, rel=1e-4)


@pytest.fixture(scope="module")
def reacher():
    """The smoke config on the reacher alone (quick to compile), and its experiment."""
    config = ml3_inverse_dynamics.get_config("smoke")
    config.arms = ("reacher",)
    return config, make(config)


@pytest.fixture(scope="module")
def one_task(reacher):
    """(problem, training batch, held-out batch) of one pool trajectory."""
    _, experiment = reacher
    problem = experiment.problems["reacher"]
    first = lambda t: jax.tree.map(lambda x: x[0], t)  # noqa: E731
    train, heldout = jax.jit(lambda key: problem.episode_tasks(problem.pool, key, 1))(
        jax.random.key(0)
    )
    return problem, first(train), first(heldout)


def _params_and_phi(experiment, problem):
    """A fresh θ and the first seed's initial φ."""
    params = jax.jit(problem.init_params)(jax.random.key(3))
    return params, jax.tree.map(lambda x: x[0, 0], experiment.init()["reacher"].params)


def test_model_torques_with_the_true_inertia_match_the_data(one_task):
    problem, _, heldout = one_task
    exact = jax.jit(lambda x, m: problem.apply(None, x, inertia=m))(heldout["x"], heldout["M"])
    np.testing.assert_allclose(exact, heldout["y"], atol=1e-4)


def test_training_batches_hold_no_true_inertia_and_test_trajectories_are_new(reacher, one_task):
    config, _ = reacher
    problem, train, heldout = one_task
    assert "M" not in train and "M" in heldout
    assert train["y"].shape == (config.data.num_train, 2)
    assert heldout["y"].shape == (config.data.num_outer, 2)
    pool_q = np.asarray(problem.pool["q"]).reshape(-1, 2)
    test_q = np.asarray(problem.test_data["q"]).reshape(-1, 2)
    assert not (pool_q[:, None, :] == test_q[None, :, :]).all(-1).any()


def test_baseline_flag_trains_on_the_torque_mse_and_learned_flag_on_the_loss(
    reacher, one_task, fast_compile
):
    _, experiment = reacher
    problem, train, _ = one_task
    params, phi = _params_and_phi(experiment, problem)
    key = jax.random.key(0)

    @jax.jit
    def values(use_mse):
        y_hat = problem.apply(params, train["x"])
        return (
            experiment.inner_loss(problem, use_mse)(params, {}, phi, train, key)[0],
            problem.torque_mse(params, train),
            experiment.loss_fn(phi, train["y"], y_hat),
        )

    as_mse, mse, learned = values(True)
    assert float(as_mse) == pytest.approx(float(mse))
    as_learned, _, _ = values(False)
    assert float(as_learned) == pytest.approx(float(learned))
    assert float(mse) != pytest.approx(float(learned))  # so the test can fail


def test_the_two_task_losses_read_what_they_should_and_give_finite_meta_gradients(
    reacher, one_task, fast_compile
):
    _, experiment = reacher
    problem, train, heldout = one_task
    params, phi = _params_and_phi(experiment, problem)
    key = jax.random.key(0)
    # The MSE task loss ignores the simulator's M; the shaping loss ignores the torques.
    other_m = {**heldout, "M": 2.0 * heldout["M"]}
    other_y = {**heldout, "y": heldout["y"] + 1.0}

    @jax.jit
    def task_losses(shaped):
        loss = experiment.outer_loss(problem, shaped)
        return jnp.stack([loss(params, {}, b, key) for b in (heldout, other_m, other_y)])

    mse_losses, shaped_losses = task_losses(False), task_losses(True)
    assert mse_losses[0] == mse_losses[1]
    assert shaped_losses[0] == shaped_losses[2] and shaped_losses[0] != shaped_losses[1]

    @jax.jit
    @jax.vmap
    def meta_grad(shaped):  # both task losses in one compiled program
        # Two inner steps so that Adam's update depends on the gradient's size, not its sign.
        task = bilevel.Problem(
            experiment.inner_loss(problem),
            experiment.outer_loss(problem, shaped),
            experiment.inner_opt,
        )
        return bilevel.Unrolled().estimate(
            task,
            phi,
            bilevel.EstimatorState(init_inner_state(params, experiment.inner_opt)),
            ml3.repeat(train, 2),
            jax.random.split(key, 2),
            heldout,
            key,
        )[0]

    both = meta_grad(jnp.asarray([False, True]))
    grads = {
        name: jax.tree.map(lambda x, i=i: x[i], both) for i, name in enumerate(("mse", "shaped"))
    }
    for g in grads.values():
        flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
        assert np.isfinite(flat).all() and np.linalg.norm(flat) > 0
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grads["mse"], grads["shaped"])
    assert max(jax.tree.leaves(diff)) > 0


def test_meta_test_methods_share_theta0_and_only_the_learned_ones_read_phi(reacher, fast_compile):
    _, experiment = reacher
    state = experiment.init()
    zeroed = {k: v.replace(params=jax.tree.map(jnp.zeros_like, v.params)) for k, v in state.items()}
    a = experiment.traces(state)["reacher"]
    b = experiment.traces(zeroed)["reacher"]
    assert set(a) == set(METHODS)
    # MSE does not depend on φ, the learned losses do: a φ of zeros changes only them.
    np.testing.assert_array_equal(a["mse"], b["mse"])
    assert not np.allclose(a["ml3_mse"], b["ml3_mse"])
    # Every method starts from the same θ₀ on the same data.
    np.testing.assert_array_equal(a["mse"][..., 0, :], a["ml3_shaped"][..., 0, :])


@pytest.mark.slow
def test_tiny_experiment_runs_and_reports_every_method(reacher, tmp_path):
    config, experiment = reacher
    summary = train_and_evaluate(experiment, config, str(tmp_path / "run"))
    for metric in ("final_torque_mse", "final_inertia_error", "mean_torque_mse"):
        assert set(summary[metric]["reacher"]) == set(METHODS)
        for method in METHODS:
            assert np.isfinite(summary[metric]["reacher"][method]["mean"])
    artifacts = list((tmp_path / "run" / "learned_loss" / "reacher").glob("*/seed_*/loss_net.json"))
    assert len(artifacts) == 2 * len(config.seeds)


def test_unknown_variant_and_arm_are_rejected():
    with pytest.raises(ValueError, match="Unknown variant 'nope'"):
        ml3_inverse_dynamics.get_config("nope")
    config = ml3_inverse_dynamics.get_config("smoke")
    config.arms = ("reacher", "octopus")
    with pytest.raises(ValueError, match="octopus"):
        make(config)


def test_the_learned_loss_keeps_its_gradient_when_meta_training_pushes_its_output_down(
    fast_compile,
):
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
