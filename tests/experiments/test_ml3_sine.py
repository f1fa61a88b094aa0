"""ML³ sine regression (Fig. 2 top): its tasks and the φ-free task-loss baseline.

Resume, determinism and non-finite handling are tested on this experiment in
`tests/experiments/test_run.py`.
"""

import math

import jax
import numpy as np
import pytest

import experiments
from configs import ml3_sine


@pytest.fixture(scope="module")
def experiment():
    return experiments.make(ml3_sine.get_config("smoke"))


def test_the_training_task_is_sin_x_minus_pi_and_the_test_tasks_are_out_of_distribution(
    experiment,
):
    d = experiment.config.data
    tasks = jax.jit(experiment._tasks)
    train, test = tasks(jax.random.key(0))
    assert train["x"].shape == (1, d.num_points, 1)
    assert test["x"].shape == (d.num_test_tasks, d.num_points, 1)
    np.testing.assert_allclose(train["y"], np.sin(train["x"] - math.pi), atol=1e-6)
    assert np.abs(train["x"]).max() <= 2.0 and np.abs(test["x"]).max() > 2.0
    assert np.all((test["amp"] >= 0.2) & (test["amp"] <= 5.0)) and np.ptp(test["amp"]) > 0
    again, other = tasks(jax.random.key(0)), tasks(jax.random.key(1))
    np.testing.assert_array_equal(again[1]["y"], test["y"])  # a function of the seed key
    assert not np.array_equal(other[1]["y"], test["y"])


def test_the_mse_baseline_ignores_phi_and_starts_where_the_learned_loss_starts(experiment):
    # finalize reports the MSE baseline from one run, whatever φ is; both fits start at
    # the same θ₀, so their traces agree at step 0.
    state = experiment.init()
    other = state.replace(params=jax.tree.map(lambda p: p + 1.0, state.params))
    mse = experiment._fit_task_jit(state, 1, False)
    np.testing.assert_array_equal(experiment._fit_task_jit(other, 1, False), mse)
    learned = experiment._fit_task_jit(state, 1, True)
    np.testing.assert_array_equal(learned[:, 0], mse[:, 0])
    assert not np.allclose(learned[:, -1], mse[:, -1])
