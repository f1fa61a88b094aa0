"""ML³ loss shaping on sine frequencies (Fig. 5): the two task losses, the variants, artifacts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from configs import ml3_shaped_sine
from experiments.ml3_shaped_sine import loss_minimum, offset_stats, reached_fractions
from metalearn import load_learned_loss
from metalearn.losses.task import mse


@pytest.fixture(scope="module")
def tiny():
    """The smoke config shrunk further, its experiment, and φ before and after one step."""
    c = ml3_shaped_sine.get_config("smoke")
    c.data.num_tasks, c.data.num_points = 2, 8
    c.inner.episode_length = 2
    c.eval.num_tasks, c.eval.test_steps = 2, 2
    c.eval.test_step_counts, c.eval.landscape_freqs = (1, 3), (-2.0, 2.0, 3)
    experiment = experiments.make(c)
    start = experiment.init()
    after, metrics = experiment.train_chunk(start, 0, 1)
    return experiment, start, after, metrics


def test_the_shaped_variant_meta_trains_on_the_frequency_error_the_other_on_the_mse(tiny):
    experiment = tiny[0]
    x = jnp.linspace(-5.0, 5.0, 8)[:, None]
    omega, nu = 0.3, 1.7
    params = {"params": {"freq": jnp.asarray(omega)}}
    data = {"x": x, "y": jnp.sin(nu * x), "freq": jnp.asarray(nu)}
    noisy = {**data, "y": data["y"] + 1.0}
    flags = dict(zip(experiment.VARIANTS, experiment.variant_inputs(), strict=True))
    shaped, plain = (
        experiment._outer_loss(flags["ml3_shaped"]),
        experiment._outer_loss(flags["ml3_mse"]),
    )
    np.testing.assert_allclose(shaped(params, {}, data, None), (omega - nu) ** 2, rtol=1e-6)
    assert shaped(params, {}, noisy, None) == shaped(params, {}, data, None)  # ν only
    np.testing.assert_allclose(
        plain(params, {}, data, None), mse(data["y"], jnp.sin(omega * x)), rtol=1e-6
    )
    assert plain(params, {}, noisy, None) != plain(params, {}, data, None)


def _leaves(tree, *index):
    return [np.asarray(p[index]) for p in jax.tree.leaves(tree)]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_both_variants_start_from_the_same_phi_and_their_task_losses_set_them_apart(tiny):
    _, start, after, metrics = tiny
    assert all(p.shape[:2] == (2, 2) for p in jax.tree.leaves(start.params))  # [variant, seed]
    assert _same(_leaves(start.params, 0), _leaves(start.params, 1))
    assert not _same(_leaves(start.params, 0, 0), _leaves(start.params, 0, 1))  # seeds differ
    assert not _same(_leaves(after.params, 0), _leaves(after.params, 1))  # one meta step
    assert all(v.shape == (1, 2, 2) and np.isfinite(v).all() for v in jax.tree.leaves(metrics))


@pytest.mark.slow  # 25 s: compiles the whole finalize (traces, minima, landscapes)
def test_each_saved_loss_is_its_variant_and_seed_and_takes_x_as_extra_input(tiny, tmp_path):
    experiment, _, after, _ = tiny
    summary = experiment.finalize(after, [], str(tmp_path))
    assert set(summary["reached_fraction"]) == {"mse", "ml3_mse", "ml3_shaped"}
    assert set(summary["reached_fraction_vs_test_steps"]["ml3_shaped"]) == {"1", "2", "3"}
    assert set(summary["minimum_offset"]) == {"ml3_mse", "ml3_shaped"}
    offsets = json.loads((tmp_path / "minimum_offsets.json").read_text())
    assert np.asarray(offsets["ml3_shaped"]).shape == (2, 2)  # [seed, test task]
    assert (tmp_path / "plots" / "fig5a_minimum_across_freqs.png").exists()
    y, y_hat, x = (jnp.linspace(-1.0, 1.0, 6)[:, None] * s for s in (1.0, 0.5, 4.0))
    for v, name in enumerate(experiment.VARIANTS):
        for i, seed in enumerate(experiment.config.seeds):
            loss = load_learned_loss(tmp_path / "learned_loss" / name / f"seed_{seed}")
            assert loss.description["extra"] == ["x"]
            phi = jax.tree.map(lambda p, v=v, i=i: p[v, i], after.params)
            np.testing.assert_allclose(
                loss(y, y_hat, x), experiment.loss_fn(phi, y, y_hat, x), rtol=1e-6
            )


def test_the_loss_minimum_is_the_global_one_to_the_fine_grid_resolution():
    grid = jnp.arange(-7.0, 7.0, 0.05)
    bowl = lambda w: (w - 1.2345) ** 2  # noqa: E731
    np.testing.assert_allclose(
        jax.jit(loss_minimum, static_argnums=0)(bowl, grid), 1.2345, atol=0.0025
    )
    # two wells, the deeper one at −3.01: the global minimum, not the nearer local one
    wells = lambda w: jnp.minimum((w - 0.5) ** 2 + 0.1, 2.0 * (w + 3.01) ** 2)  # noqa: E731
    np.testing.assert_allclose(
        jax.jit(loss_minimum, static_argnums=0)(wells, grid), -3.01, atol=0.0025
    )


def test_reached_fractions_count_the_tasks_within_tolerance_after_each_step_count():
    traces = jnp.asarray([[[1.0, 0.5, 0.01], [1.0, 0.04, 0.2]]])  # [S=1, F=2, K+1=3]
    got = reached_fractions(traces, (0, 1, 2), 0.05)
    assert {k: float(v[0]) for k, v in got.items()} == {"0": 0.0, "1": 0.5, "2": 0.5}


def test_offset_stats_of_a_known_bias_per_seed_and_per_frequency_bin():
    freqs = np.asarray([[-4.0, -1.0, 1.0, 4.0], [-4.0, -1.0, 1.0, 4.0]])
    offsets = np.asarray([[0.1, -0.02, 0.02, -0.1], [0.1, -0.02, 0.02, -0.1]])
    stats = offset_stats(offsets, freqs, 0.05, bins=2)
    np.testing.assert_allclose(stats["mean_abs"]["mean"], 0.06)
    np.testing.assert_allclose(stats["within_tolerance"]["per_seed"], [0.5, 0.5])
    np.testing.assert_allclose(stats["by_frequency"]["mean_offset"], [0.04, -0.04])
