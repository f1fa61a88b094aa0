"""Learned loss networks: activations, output-wise application, portable artifacts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.losses import learned
from metalearn.models.mlp import smooth_leaky_relu


def test_smooth_leaky_relu_limits():
    x = jnp.array([-100.0, 0.0, 100.0])
    y = smooth_leaky_relu(x, beta=10.0, gamma=0.1)
    np.testing.assert_allclose(y[0], 0.1 * -100.0, rtol=1e-5)  # the leak
    np.testing.assert_allclose(y[1], np.log(2) / 10 * 0.9, rtol=1e-5)  # smooth at 0
    np.testing.assert_allclose(y[2], 100.0, rtol=1e-5)  # identity at +∞
    assert float(jax.grad(lambda v: smooth_leaky_relu(v, 10.0, 0.1))(-100.0)) == pytest.approx(0.1)


def _config(**kw):
    c = learned.default_loss_net_config()
    c.hidden = (8, 8)
    c.update(kw)
    return c


def test_output_wise_loss_is_a_mean_over_outputs_and_invariant_to_their_order():
    c = _config(activation="smooth_leaky_relu", output_activation="smooth_leaky_relu")
    phi = learned.init_learned_loss(c, jax.random.key(0), num_outputs=3)
    loss = learned.learned_loss_fn(c)
    rng = np.random.default_rng(0)
    y, y_hat = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(5, 3)))
    perm = jnp.array([2, 0, 1])
    np.testing.assert_allclose(
        loss(phi, y, y_hat), loss(phi, y[:, perm], y_hat[:, perm]), rtol=1e-6
    )
    # The same φ works for any number of outputs: the mean of per-output losses.
    per_output = [loss(phi, y[:, i : i + 1], y_hat[:, i : i + 1]) for i in range(3)]
    np.testing.assert_allclose(loss(phi, y, y_hat), np.mean(per_output), rtol=1e-5)


def test_extra_inputs_and_shape_errors():
    c = _config()
    phi = learned.init_learned_loss(c, jax.random.key(0), num_extra=2)
    loss = learned.learned_loss_fn(c)
    y = jnp.ones((4, 1))
    assert loss(phi, y, y, jnp.zeros((4, 2))).shape == ()
    with pytest.raises(ValueError, match=r"equal shape \[batch, outputs\]"):
        loss(phi, y, jnp.ones((4,)))
    with pytest.raises(ValueError, match="extra must be"):
        loss(phi, y, y, jnp.zeros((3, 2)))


def test_artifact_round_trip_gives_the_same_pure_loss(tmp_path):
    c = _config(output_activation="softplus", use_bias=False)
    phi = learned.init_learned_loss(c, jax.random.key(1), num_outputs=2)
    learned.save_learned_loss(str(tmp_path / "loss"), c, phi)
    loaded = learned.load_learned_loss(str(tmp_path / "loss"))
    rng = np.random.default_rng(0)
    y, y_hat = jnp.asarray(rng.normal(size=(6, 2))), jnp.asarray(rng.normal(size=(6, 2)))
    direct = learned.learned_loss_fn(c)
    np.testing.assert_allclose(loaded(y, y_hat), direct(phi, y, y_hat), rtol=1e-6)
    # Pure and differentiable inside someone else's jitted training step.
    g = jax.jit(jax.grad(lambda yh: loaded(y, yh)))(y_hat)
    np.testing.assert_allclose(g, jax.grad(lambda yh: direct(phi, y, yh))(y_hat), rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="No learned-loss artifact"):
        learned.load_learned_loss(str(tmp_path / "missing"))
