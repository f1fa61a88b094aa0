"""ML³ loss shaping on sine frequencies (Fig. 5): the two task losses, the variants, artifacts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import experiments
from configs import ml3_shaped_sine
from metalearn import load_learned_loss
from metalearn.losses.task import mse


@pytest.fixture(scope="module")
def tiny():
    """The smoke config shrunk further, its experiment, and φ before and after one step."""
    c = ml3_shaped_sine.get_config("smoke")
    c.data.num_tasks, c.data.num_points = 2, 8
    c.inner.episode_length = 2
    c.eval.num_tasks, c.eval.test_steps = 2, 2
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


def test_each_saved_loss_is_its_variant_and_seed_and_takes_x_as_extra_input(tiny, tmp_path):
    experiment, _, after, _ = tiny
    summary = experiment.finalize(after, [], str(tmp_path))
    assert set(summary["reached_fraction"]) == {"mse", "ml3_mse", "ml3_shaped"}
    y, y_hat, x = (jnp.linspace(-1.0, 1.0, 6)[:, None] * s for s in (1.0, 0.5, 4.0))
    for v, name in enumerate(experiment.VARIANTS):
        for i, seed in enumerate(experiment.config.seeds):
            loss = load_learned_loss(tmp_path / "learned_loss" / name / f"seed_{seed}")
            assert loss.description["extra"] == ["x"]
            phi = jax.tree.map(lambda p, v=v, i=i: p[v, i], after.params)
            np.testing.assert_allclose(
                loss(y, y_hat, x), experiment.loss_fn(phi, y, y_hat, x), rtol=1e-6
            )
