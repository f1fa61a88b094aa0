"""Learned loss networks: activations, output-wise application, portable artifacts."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
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
    loss = learned.learned_loss_fn(c)
    rng = np.random.default_rng(0)
    y, y_hat = jnp.asarray(rng.normal(size=(5, 3))), jnp.asarray(rng.normal(size=(5, 3)))
    perm = jnp.array([2, 0, 1])

    @jax.jit  # one program instead of many small eager ones
    def values():
        phi = learned.init_learned_loss(c, jax.random.key(0), num_outputs=3)
        per_output = [loss(phi, y[:, i : i + 1], y_hat[:, i : i + 1]) for i in range(3)]
        return loss(phi, y, y_hat), loss(phi, y[:, perm], y_hat[:, perm]), jnp.stack(per_output)

    whole, permuted, per_output = values()
    np.testing.assert_allclose(whole, permuted, rtol=1e-6)
    # The same φ works for any number of outputs: the mean of per-output losses.
    np.testing.assert_allclose(whole, np.mean(per_output), rtol=1e-5)
    assert np.ptp(np.asarray(per_output)) > 1e-4  # ...which differ, so the mean is a test


def test_extra_inputs_and_shape_errors():
    c = _config()
    loss = learned.learned_loss_fn(c)
    # Shapes only (jax.eval_shape): the checks are on shapes, and nothing needs to run.
    phi = jax.eval_shape(lambda: learned.init_learned_loss(c, jax.random.key(0), num_extra=2))
    y = jnp.ones((4, 1))
    assert jax.eval_shape(loss, phi, y, y, jnp.zeros((4, 2))).shape == ()
    with pytest.raises(ValueError, match=r"equal shape \[batch, outputs\]"):
        jax.eval_shape(loss, phi, y, jnp.ones((4,)))
    with pytest.raises(ValueError, match="extra must be"):
        jax.eval_shape(loss, phi, y, y, jnp.zeros((3, 2)))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """One run's folder of per-seed artifacts: seed_0 plain, seed_1 with an extra input."""
    root = tmp_path_factory.mktemp("learned_loss")
    c = _config(output_activation="softplus", use_bias=False)
    phi = learned.init_learned_loss(c, jax.random.key(1), num_outputs=2)
    sgd = {"name": "sgd", "lr": 0.01}
    learned.save_learned_loss(
        str(root / "seed_0"),
        c,
        phi,
        y="targets",
        y_hat="outputs",
        inner_optimizer=sgd,
        inner_steps=5,
    )
    phi_x = learned.init_learned_loss(c, jax.random.key(2), num_outputs=2, num_extra=1)
    learned.save_learned_loss(
        str(root / "seed_1"), c, phi_x, extra=("x",), inner_optimizer=sgd, inner_steps=10
    )
    return root, c, phi


def test_artifact_round_trip_gives_the_same_pure_loss(artifacts):
    root, c, phi = artifacts
    loaded = learned.load_learned_loss(str(root / "seed_0"))
    assert loaded.description["y_hat"] == "outputs" and loaded.description["extra"] == []
    rng = np.random.default_rng(0)
    y, y_hat = jnp.asarray(rng.normal(size=(6, 2))), jnp.asarray(rng.normal(size=(6, 2)))
    direct = learned.learned_loss_fn(c)
    np.testing.assert_allclose(loaded(y, y_hat), direct(phi, y, y_hat), rtol=1e-6)
    # Pure and differentiable inside someone else's jitted training step.
    g = jax.jit(jax.grad(lambda yh: loaded(y, yh)))(y_hat)
    np.testing.assert_allclose(g, jax.grad(lambda yh: direct(phi, y, yh))(y_hat), rtol=1e-5)


def test_a_loss_fed_other_extra_inputs_than_it_was_trained_with_says_which(artifacts):
    root, _, _ = artifacts
    y = jnp.ones((4, 2))
    with_x = learned.load_learned_loss(str(root / "seed_1"))
    assert with_x.description["extra"] == ["x"] and with_x.description["inner_steps"] == 10
    assert with_x(y, y, jnp.zeros((4, 1))).shape == ()
    with pytest.raises(ValueError, match=r"meta-trained with 1 extra input\(s\) \(x\); got 0"):
        with_x(y, y)
    with pytest.raises(ValueError, match=r"Pass extra=\[batch, 1\] \(x\)"):
        with_x(y, y, jnp.zeros((4, 3)))
    plain = learned.load_learned_loss(str(root / "seed_0"))
    with pytest.raises(ValueError, match=r"without extra inputs; got extra of width 2"):
        plain(y, y, jnp.zeros((4, 2)))


def test_loading_a_run_folder_names_the_seeds_it_holds(artifacts):
    root, _, _ = artifacts
    with pytest.raises(FileNotFoundError, match="It holds 2 artifacts") as err:
        learned.load_learned_loss(str(root))
    assert "seed_0, seed_1. Pass one of them." in str(err.value)
    with pytest.raises(FileNotFoundError, match="No learned-loss artifact"):
        learned.load_learned_loss(str(root / "missing"))


def _zero_last_layer(phi):
    last = max(k for k in phi["params"] if k.startswith("Dense_"))
    zeroed = jax.tree.map(jnp.zeros_like, phi["params"][last])
    return {"params": {**phi["params"], last: zeroed}}


@pytest.mark.parametrize("output_activation", ["identity", "softplus"])
def test_the_ce_term_trains_as_cross_entropy_when_the_learned_part_is_flat(output_activation):
    c = _config(ce_term=True, output_activation=output_activation, use_bias=False)
    loss = learned.learned_loss_fn(c)
    phi = _zero_last_layer(learned.init_learned_loss(c, jax.random.key(0), num_outputs=4))
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(6, 4)) * 3, jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, size=6))
    y = jax.nn.one_hot(labels, 4)
    ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()  # noqa: E731
    ours = lambda z: loss(phi, y, jax.nn.softmax(z))  # noqa: E731
    grads, values = jax.jit(lambda z: ((jax.grad(ours)(z), jax.grad(ce)(z)), (ours(z), ce(z))))(
        logits
    )
    np.testing.assert_allclose(*grads, rtol=1e-5, atol=1e-7)
    # The value is cross-entropy plus the flat learned part (0, or softplus(0) = log 2).
    flat = 0.0 if output_activation == "identity" else np.log(2.0)
    np.testing.assert_allclose(values[0], values[1] + flat, rtol=1e-5)


def test_loss_net_options_match_their_definitions():
    """No biases: affine maps without offsets;
    identity output: the last layer's affine value; β, γ: the smooth leaky ReLU's."""
    c = _config(
        activation="smooth_leaky_relu",
        use_bias=False,
        output_activation="identity",
        beta=2.0,
        gamma=0.25,
    )
    net = learned.make_loss_network(c)
    phi = learned.init_learned_loss(c, jax.random.key(3), num_outputs=2)
    assert all("bias" not in layer for layer in phi["params"].values())
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2)), jnp.float32)
    h = x
    layers = [phi["params"][f"Dense_{i}"]["kernel"] for i in range(3)]
    for w in layers[:-1]:
        h = smooth_leaky_relu(h @ w, beta=2.0, gamma=0.25)
    np.testing.assert_allclose(net.apply(phi, x), h @ layers[-1], rtol=1e-5, atol=1e-6)
    # The loss of a batch is the mean of ℓ over (sample, output) pairs.
    y, y_hat = x[:, :1].repeat(3, 1), x[:, 1:].repeat(3, 1)
    per_pair = net.apply(phi, jnp.stack([y, y_hat], -1))
    loss = learned.learned_loss_fn(c)(phi, y, y_hat)
    np.testing.assert_allclose(loss, per_pair.mean(), rtol=1e-6)


@pytest.mark.parametrize(
    ("anchor", "output_activation"),
    [("target_distance", "identity"), ("weighted_squared_error", "softplus")],
)
def test_an_anchored_loss_is_lowest_where_the_predictions_equal_the_targets(
    anchor, output_activation
):
    c = _config(activation="elu", output_activation=output_activation)
    c.anchor = anchor
    loss = learned.learned_loss_fn(c)
    rng = np.random.default_rng(0)
    y, x = jnp.asarray(rng.normal(size=(6, 1))), jnp.asarray(rng.normal(size=(6, 1)))
    shifts = jnp.asarray([-1.0, -0.5, -0.1, 0.0, 0.1, 0.5, 1.0])

    @jax.jit
    def values():
        phi = learned.init_learned_loss(c, jax.random.key(0), num_extra=1)
        at = lambda y_hat: loss(phi, y, y_hat, x)  # noqa: E731
        return jax.vmap(lambda s: at(y + s))(shifts), jax.grad(at)(y)

    shifted, slope = values()
    np.testing.assert_allclose(shifted[3], 0.0, atol=1e-12)  # float noise of one apply vs another
    assert (np.asarray(shifted) >= 0.0).all()
    assert (np.asarray(shifted)[[0, 6]] > 0.0).all()
    np.testing.assert_allclose(slope, 0.0, atol=1e-7)


def test_an_unknown_anchor_is_refused():
    c = _config()
    c.anchor = "diagonal"
    with pytest.raises(ValueError, match="Unknown loss_net.anchor 'diagonal'; known"):
        learned.learned_loss_fn(c)
    phi = jax.eval_shape(lambda: learned.init_learned_loss(c, jax.random.key(0)))
    apply = functools.partial(
        learned.apply_learned_loss, learned.make_loss_network(c), c.output_wise, anchor="diagonal"
    )
    with pytest.raises(ValueError, match="Unknown anchor 'diagonal'"):  # the pure function too
        jax.eval_shape(apply, phi, jnp.ones((2, 1)), jnp.ones((2, 1)))


def test_saving_refuses_a_non_finite_phi_and_an_undescribed_loss_before_writing(tmp_path):
    c = _config()
    phi = learned.init_learned_loss(c, jax.random.key(0))
    sgd = {"name": "sgd", "lr": 0.01}
    nan_phi = jax.tree.map(lambda x: x.at[..., 0].set(jnp.nan) if x.ndim else x, phi)
    with pytest.raises(ValueError, match=r"not finite .*Save the φ of an earlier step"):
        learned.save_learned_loss(
            str(tmp_path / "nan"), c, nan_phi, inner_optimizer=sgd, inner_steps=3
        )
    with pytest.raises(
        ValueError, match=r"as a mapping with its name and learning rate.*optax object"
    ):
        learned.save_learned_loss(
            str(tmp_path / "optax"), c, phi, inner_optimizer=optax.sgd(0.01), inner_steps=3
        )
    with pytest.raises(ValueError, match="inner_steps must be"):
        learned.save_learned_loss(
            str(tmp_path / "steps"), c, phi, inner_optimizer=sgd, inner_steps=0
        )
    with pytest.raises(TypeError, match="cannot be written as JSON"):
        learned.save_learned_loss(
            str(tmp_path / "json"), c, phi, inner_optimizer={**sgd, "f": len}, inner_steps=3
        )
    with pytest.raises(TypeError, match="inner_optimizer"):
        learned.save_learned_loss(str(tmp_path / "missing"), c, phi)  # both are required
    assert list(tmp_path.iterdir()) == []  # nothing written, no partial folder


def test_an_unknown_loss_net_key_is_refused_with_the_closest_known_one():
    c = _config()
    c.anchr = "target_distance"
    for build in (
        learned.make_loss_network,
        learned.learned_loss_fn,
        lambda cfg: learned.init_learned_loss(cfg, jax.random.key(0)),
    ):
        with pytest.raises(
            ValueError, match=r"Unknown loss_net key 'anchr'. Did you mean 'anchor'\?"
        ):
            build(c)
    assert learned.default_loss_net_config().anchor == "none"
    # A group without some keys takes their defaults.
    partial = ml_collections.ConfigDict({"hidden": (8,)})
    phi = learned.init_learned_loss(partial, jax.random.key(0))
    assert learned.learned_loss_fn(partial)(phi, jnp.zeros((2, 1)), jnp.ones((2, 1))).shape == ()
