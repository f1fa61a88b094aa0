"""The two restricted learned losses that take AdaLFL apart (docs/adalfl.md, "Schedule or
shape"): exp(s)·cross-entropy, a learned step size alone (hypergradient descent when
adapted online), and the normalised learned loss, a learned shape alone."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from metalearn import bilevel
from metalearn.algorithms import adalfl
from metalearn.losses import learned
from metalearn.state import init_inner_state

pytestmark = pytest.mark.usefixtures("fast_compile")


def _scaled_ce_config():
    c = learned.default_loss_net_config()
    c.kind = "scaled_ce"
    return c


def _classification(seed=0, batch=8, features=5, classes=3):
    """A softmax-regression batch, a meta batch and θ (W [features, classes])."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, batch, features)))
    labels = jnp.asarray(rng.integers(0, classes, size=(2, batch)))
    theta = jnp.asarray(0.3 * rng.normal(size=(features, classes)))
    b, mb = ({"x": x[i], "label": labels[i]} for i in range(2))
    return theta, b, mb


def _mlp_loss(classes=3):
    c = learned.default_loss_net_config()
    c.update(hidden=(8,), activation="smooth_leaky_relu", output_activation="identity")
    c.update(ce_term=True, use_bias=False)
    phi = learned.init_learned_loss(c, jax.random.key(1), num_outputs=classes)
    phi = jax.tree.map(lambda w: 4.0 * w, phi)  # a learned term well away from zero
    return learned.learned_loss_fn(c), phi


def test_scaled_cross_entropy_is_exp_s_times_cross_entropy(float64):
    c = _scaled_ce_config()
    loss_fn = learned.learned_loss_fn(c)
    phi = learned.init_learned_loss(c, jax.random.key(0), num_outputs=3)
    assert jax.tree.leaves(phi) == [0.0]  # s = 0: cross-entropy itself
    _, b, _ = _classification()
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(8, 3)))
    y = jax.nn.one_hot(b["label"], 3)
    ce = optax.softmax_cross_entropy(logits, y).mean()
    s = jnp.asarray(0.7)
    np.testing.assert_allclose(loss_fn(phi, y, jax.nn.softmax(logits)), ce, rtol=1e-12)
    scaled = {"params": {"log_scale": s}}
    np.testing.assert_allclose(
        loss_fn(scaled, y, jax.nn.softmax(logits)), np.exp(0.7) * ce, rtol=1e-12
    )
    # Its logit gradient ratio is exp(s) exactly: the learning-rate multiplier it implies.
    ratio = adalfl.logit_gradient_ratio(loss_fn, scaled, y, logits)
    np.testing.assert_allclose(ratio, np.exp(0.7), rtol=1e-9)


@pytest.mark.parametrize(
    "setting, value",
    [("ce_term", True), ("output_wise", False), ("anchor", "weighted_squared_error")],
)
def test_scaled_cross_entropy_refuses_what_it_cannot_take(setting, value):
    c = _scaled_ce_config()
    c[setting] = value
    with pytest.raises(ValueError, match="scaled_ce.*output_wise=True, ce_term=False"):
        learned.learned_loss_fn(c)


def test_an_unknown_kind_and_extra_inputs_to_a_scaled_cross_entropy_are_refused():
    c = _scaled_ce_config()
    c.kind = "scaled"
    with pytest.raises(ValueError, match="Unknown loss_net.kind 'scaled'.*'mlp', 'scaled_ce'"):
        learned.make_loss_network(c)
    c.kind = "scaled_ce"
    loss_fn = learned.learned_loss_fn(c)
    y = jnp.eye(3)
    with pytest.raises(ValueError, match="takes no extra inputs"):
        loss_fn({"params": {"log_scale": 0.0}}, y, y, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="num_extra=2"):
        learned.init_learned_loss(c, jax.random.key(0), num_outputs=3, num_extra=2)


def test_a_scaled_cross_entropy_artifact_loads_and_gives_the_same_loss(tmp_path):
    c = _scaled_ce_config()
    phi = {"params": {"log_scale": jnp.asarray(-0.4, jnp.float32)}}
    learned.save_learned_loss(
        str(tmp_path / "loss"), c, phi, inner_optimizer={"name": "sgd", "lr": 0.01}, inner_steps=1
    )
    loss = learned.load_learned_loss(str(tmp_path / "loss"))
    y = jax.nn.one_hot(jnp.array([0, 2]), 3)
    p = jax.nn.softmax(jnp.array([[1.0, 0.0, -1.0], [0.5, 0.2, 0.1]]))
    np.testing.assert_allclose(loss(y, p), learned.learned_loss_fn(c)(phi, y, p), rtol=1e-6)
    assert loss.config.kind == "scaled_ce"


def test_the_schedule_only_meta_gradient_matches_finite_differences(float64):
    """The online learner on exp(s)·CE: d/ds of the task loss at θ_{t+1}(s), against
    central differences and against hypergradient descent's closed form
    −η·e^s·∇L_meta(θ_{t+1})·∇CE(θ_t), under plain SGD and under Nesterov with weight
    decay (the decay is not scaled: only the loss's gradient is)."""
    c = _scaled_ce_config()
    loss_fn = learned.learned_loss_fn(c)
    theta, b, mb = _classification()

    def inner_loss(params, model_state, phi, batch, key):
        del key
        logits = batch["x"] @ params
        return loss_fn(phi, jax.nn.one_hot(batch["label"], 3), jax.nn.softmax(logits)), (
            model_state,
            {},
        )

    def ce(params, batch):
        logits = batch["x"] @ params
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    def outer_loss(params, model_state, batch, key):
        del model_state, key
        return ce(params, batch)

    lr, s = 0.5, 0.3
    phi = {"params": {"log_scale": jnp.asarray(s)}}
    optimizers = {
        "sgd": optax.sgd(lr),
        "nesterov_wd": optax.chain(
            optax.add_decayed_weights(5e-4), optax.sgd(lr, momentum=0.9, nesterov=True)
        ),
    }
    for name, opt in optimizers.items():
        problem = bilevel.Problem(inner_loss, outer_loss, opt)
        state = init_inner_state(theta, opt)
        # One step taken first, so that the momentum buffer is not zero.
        state, _, _ = adalfl.OnlineLearner(problem, optax.sgd(0.0)).step(
            adalfl.OnlineLearner(problem, optax.sgd(0.0)).init(phi),
            state,
            mb,
            b,
            jax.random.key(0),
        )
        learner = adalfl.OnlineLearner(problem, optax.sgd(1.0), bilevel.OneStep())
        meta_state = learner.init(phi)
        _, new_meta, metrics = jax.jit(learner.step)(meta_state, state, b, mb, jax.random.key(1))
        grad = float(phi["params"]["log_scale"] - new_meta.params["params"]["log_scale"])

        def meta_loss(s_value, state=state, opt=opt):
            p = {"params": {"log_scale": s_value}}
            after, _ = bilevel.inner_step(
                state, p, b, jax.random.key(2), inner_loss=inner_loss, optimizer=opt
            )
            return ce(after.params, mb)

        eps = 1e-5
        fd = (meta_loss(s + eps) - meta_loss(s - eps)) / (2 * eps)
        np.testing.assert_allclose(grad, fd, rtol=1e-6, err_msg=name)
        assert abs(grad) > 1e-4, name
        if name == "sgd":  # hypergradient descent's closed form
            after, _ = bilevel.inner_step(
                state, phi, b, jax.random.key(2), inner_loss=inner_loss, optimizer=opt
            )
            g_t = jax.grad(ce)(state.params, b)
            g_meta = jax.grad(ce)(after.params, mb)
            closed = -lr * np.exp(s) * float(jnp.vdot(g_meta, g_t))
            np.testing.assert_allclose(grad, closed, rtol=1e-8)
        np.testing.assert_allclose(metrics["meta/loss"], meta_loss(s), rtol=1e-10)


def test_normalised_keeps_the_direction_and_gives_cross_entropys_norm(float64):
    loss_fn, phi = _mlp_loss()
    theta, b, _ = _classification()
    y = jax.nn.one_hot(b["label"], 3)

    def scaled(params, mode, max_ratio=1.0):
        logits = b["x"] @ params
        return adalfl.scale_to_cross_entropy(
            loss_fn, phi, y, logits, mode=mode, max_ratio=max_ratio
        )

    free_loss, free_ratio = scaled(theta, "free")
    assert abs(float(free_ratio) - 1.0) > 0.05  # a learned loss of a size of its own
    norm_loss, norm_ratio = scaled(theta, "normalised")
    np.testing.assert_allclose(norm_ratio, 1.0, rtol=1e-12)
    np.testing.assert_allclose(norm_loss * free_ratio, free_loss, rtol=1e-12)

    # In the logits: the normalised gradient is the free one's direction at CE's norm.
    logits = b["x"] @ theta
    g_free = jax.grad(lambda z: loss_fn(phi, y, jax.nn.softmax(z)))(logits)
    g_norm = jax.grad(
        lambda z: adalfl.scale_to_cross_entropy(loss_fn, phi, y, z, mode="normalised")[0]
    )(logits)
    g_ce = jax.grad(lambda z: optax.softmax_cross_entropy(z, y).mean())(logits)
    np.testing.assert_allclose(jnp.linalg.norm(g_norm), jnp.linalg.norm(g_ce), rtol=1e-10)
    cos = lambda a, b: jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))  # noqa: E731
    np.testing.assert_allclose(cos(g_norm, g_free), 1.0, rtol=1e-12)
    assert float(cos(g_free, g_ce)) < 0.999  # a shape of its own, not cross-entropy's
    # In θ: the same direction as the free loss's step, its size scaled by 1 / ratio.
    d_free = jax.grad(lambda p: scaled(p, "free")[0])(theta)
    d_norm = jax.grad(lambda p: scaled(p, "normalised")[0])(theta)
    np.testing.assert_allclose(d_norm * free_ratio, d_free, rtol=1e-10)

    # The bound scales down only above it.
    _, bounded = scaled(theta, "bounded", max_ratio=0.5 * float(free_ratio))
    np.testing.assert_allclose(bounded, 0.5 * free_ratio, rtol=1e-12)
    _, unbounded = scaled(theta, "bounded", max_ratio=2.0 * float(free_ratio))
    np.testing.assert_allclose(unbounded, free_ratio, rtol=1e-12)


def test_the_normalised_loss_gives_no_meta_gradient_to_its_size(float64):
    """A learned loss with a size parameter c, e^c·L_φ: after one inner step the task
    loss depends on c when free (the meta-objective can tune the step size through it),
    not at all when normalised (only φ's shape is learned)."""
    loss_fn, phi = _mlp_loss()
    theta, b, mb = _classification()
    y = jax.nn.one_hot(b["label"], 3)
    sized = lambda p, y, q: jnp.exp(p["c"]) * loss_fn(p["phi"], y, q)  # noqa: E731

    def meta_loss(c, mode):
        def inner(params):
            meta = {"phi": phi, "c": c}
            return adalfl.scale_to_cross_entropy(sized, meta, y, b["x"] @ params, mode=mode)[0]

        after = theta - 0.5 * jax.grad(inner)(theta)
        return optax.softmax_cross_entropy_with_integer_labels(mb["x"] @ after, mb["label"]).mean()

    assert abs(float(jax.grad(meta_loss)(0.2, "free"))) > 1e-3
    assert abs(float(jax.grad(meta_loss)(0.2, "normalised"))) < 1e-12
    np.testing.assert_allclose(meta_loss(0.2, "normalised"), meta_loss(-1.0, "normalised"))
    logits = b["x"] @ theta
    with pytest.raises(ValueError, match="Unknown gradient scale 'norm'"):
        adalfl.scale_to_cross_entropy(loss_fn, phi, y, logits, mode="norm")
    with pytest.raises(ValueError, match="must be > 0"):
        adalfl.scale_to_cross_entropy(loss_fn, phi, y, logits, mode="bounded", max_ratio=0.0)


def test_normalise_grad_with_a_bound_is_refused():
    from experiments.image_classification import grad_scale_mode

    c = ml_collections.ConfigDict({"max_grad_ratio": 1.0, "normalise_grad": True})
    with pytest.raises(ValueError, match="bounds nothing"):
        grad_scale_mode(c)
    c.max_grad_ratio = 0.0
    assert grad_scale_mode(c) == "normalised"
    c.normalise_grad = False
    assert grad_scale_mode(c) == "free"
    c.max_grad_ratio = 2.0
    assert grad_scale_mode(c) == "bounded"
    c.max_grad_ratio = -1.0
    with pytest.raises(ValueError, match="must be ≥ 0"):
        grad_scale_mode(c)
