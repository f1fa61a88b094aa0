"""The self-loss transformer's pure parts: masks, prediction paths, meta-gradient, detector."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from metalearn.algorithms import self_loss
from metalearn.algorithms.self_loss_lm import detector_update, init_detector
from metalearn.models import transformer
from metalearn.tasks import text

T = 6  # context
V = text.VOCAB_SIZE


def _model(loss_layers=0, readout="mean", positions="rotary", layers=2, d=16, dtype="float32"):
    cfg = ml_collections.ConfigDict(
        {
            "num_layers": layers,
            "loss_layers": loss_layers,
            "d_model": d,
            "num_heads": 2,
            "mlp_ratio": 2,
            "positions": positions,
            "readout": readout,
            "dtype": dtype,
        }
    )
    model = transformer.make_transformer(cfg, T)
    return model, transformer.init_transformer(model, jax.random.key(0), T)


def _tokens(b=2, length=T + 1, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, length), 0, text.NUM_BYTES)


MODELS = [
    dict(loss_layers=0, readout="mean", positions="rotary"),
    dict(loss_layers=1, readout="head", positions="learned"),
    dict(loss_layers=1, readout="mean", positions="rotary"),
]


def test_causal_mask_blocks():
    m = np.asarray(transformer.causal_mask(3, prefix=2))
    np.testing.assert_array_equal(m, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


@pytest.mark.parametrize("kw", MODELS)
def test_language_model_pass_is_causal(kw):
    model, params = _model(**kw)
    apply = jax.jit(lambda x: model.apply({"params": params}, x)[0])
    x = _tokens()[:, :T]
    logits = apply(x)
    for j in range(1, T):
        other = apply(x.at[:, j].set((x[:, j] + 7) % text.NUM_BYTES))
        np.testing.assert_allclose(other[:, :j], logits[:, :j], atol=1e-6)
        assert not np.allclose(other[:, j:], logits[:, j:], atol=1e-4)


@pytest.mark.parametrize("kw", MODELS)
def test_loss_pass_is_causal_and_the_loss_token_sees_everything(kw):
    model, params = _model(**kw)
    x = _tokens()[:, :T]
    preds = jax.nn.softmax(jax.random.normal(jax.random.key(2), (2, T, V)))
    seq = jnp.concatenate(
        [jax.nn.one_hot(x, V), preds, jax.nn.one_hot(jnp.full((2, 1), text.LOSS), V)], 1
    )
    apply = jax.jit(lambda s: model.apply({"params": params}, s, stack="loss")[0])
    scores = apply(seq)
    for j in range(T, 2 * T):  # perturb prediction j − T
        s = apply(seq.at[:, j].set(jax.nn.softmax(jax.random.normal(jax.random.key(j), (2, V)))))
        np.testing.assert_allclose(s[:, :j], scores[:, :j], atol=1e-6)
        assert np.all(np.abs(s[:, -1] - scores[:, -1]) > 0)


@pytest.mark.parametrize("kw", MODELS)
def test_shared_prefix_loss_pass_equals_the_separate_forward(kw):
    """The block mask over cached keys and values gives the one-forward numbers."""
    model, params = _model(**kw)
    x = _tokens()[:, :T]
    logits, cache = model.apply({"params": params}, x)
    preds = self_loss.prediction_inputs(logits, "soft")
    separate = self_loss.loss_pass(model, params, x, preds, output="identity")
    shared = self_loss.loss_pass(model, params, x, preds, output="identity", cache=cache)
    np.testing.assert_allclose(shared, separate, rtol=1e-5, atol=1e-6)
    # and so does its gradient with respect to θ through both passes
    spec_sep = self_loss.Spec(path="soft", disjoint=kw["loss_layers"] > 0)
    spec_pre = self_loss.Spec(path="soft", layout="shared_prefix", disjoint=spec_sep.disjoint)
    tokens = _tokens()
    grad = lambda spec: jax.jit(  # noqa: E731
        jax.grad(lambda p: self_loss.self_loss(p, {}, p, tokens, None, model=model, spec=spec)[0])
    )(params)
    chex.assert_trees_all_close(grad(spec_pre), grad(spec_sep), rtol=1e-4, atol=1e-6)


def test_soft_path_equals_hard_tokens_for_one_hot_predictions():
    model, params = _model()
    x = _tokens()[:, :T]
    pred_tokens = _tokens(seed=3)[:, :T]
    soft = self_loss.loss_pass(model, params, x, jax.nn.one_hot(pred_tokens, V), output="identity")
    ids = jnp.concatenate([x, pred_tokens, jnp.full((2, 1), text.LOSS)], 1)
    hard, _ = model.apply({"params": params}, ids, stack="loss")
    np.testing.assert_allclose(soft, hard[:, -1], rtol=1e-5, atol=1e-6)
    # argmax tokens of the language model through the three paths: same forward value
    logits, _ = model.apply({"params": params}, x)
    values = [
        self_loss.loss_pass(
            model, params, x, self_loss.prediction_inputs(logits * 1e4, p), output="identity"
        )
        for p in self_loss.PATHS
    ]
    for v in values[1:]:
        np.testing.assert_allclose(v, values[0], rtol=1e-4, atol=1e-5)


def test_prediction_paths_route_the_gradient():
    logits = jax.random.normal(jax.random.key(0), (1, 3, 5))
    w = jax.random.normal(jax.random.key(1), (1, 3, 5))
    grad = lambda path: jax.grad(  # noqa: E731
        lambda z: jnp.sum(w * self_loss.prediction_inputs(z, path))
    )(logits)
    np.testing.assert_allclose(grad("straight_through"), grad("soft"), rtol=1e-6)
    np.testing.assert_array_equal(grad("hard"), 0.0)
    st = self_loss.prediction_inputs(logits, "straight_through")
    np.testing.assert_allclose(st, self_loss.prediction_inputs(logits, "hard"), atol=1e-6)


@pytest.mark.parametrize(
    "spec_kw, model_kw, steps",
    [
        (dict(path="soft"), {}, 2),
        (dict(path="hard", critic="frozen"), dict(readout="head"), 1),
        (dict(signal="targets", sees="input_and_continuation"), {}, 2),
        (
            dict(path="soft", monotonicity=1.0, output="softplus", disjoint=True),
            dict(loss_layers=1),
            1,
        ),
    ],
)
def test_phase1_meta_gradient_matches_finite_differences(float64, spec_kw, model_kw, steps):
    model, params = _model(layers=2, d=8, dtype="float64", **model_kw)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    spec = self_loss.Spec(**spec_kw)
    tokens = _tokens(b=2, seed=4)[None].repeat(steps, 0)
    tokens = tokens.at[1:].set(_tokens(b=2, seed=5)) if steps > 1 else tokens
    outer = _tokens(b=2, seed=6)
    fn = functools.partial(
        self_loss.meta_objective,
        model=model,
        spec=spec,
        inner_optimizer=optax.sgd(0.3),
        estimator="unrolled",
        window=1,
    )
    f = jax.jit(lambda p: fn(p, tokens, jax.random.split(jax.random.key(0), steps), outer, None)[0])
    grad = jax.jit(jax.grad(f))(params)
    direction = jax.tree.map(
        lambda a, k: jax.random.normal(k, a.shape, a.dtype),
        params,
        jax.tree.unflatten(
            jax.tree.structure(params),
            list(jax.random.split(jax.random.key(7), len(jax.tree.leaves(params)))),
        ),
    )
    eps = 1e-6
    shift = lambda s: jax.tree.map(lambda a, d: a + s * eps * d, params, direction)  # noqa: E731
    numeric = (f(shift(1.0)) - f(shift(-1.0))) / (2 * eps)
    pairs = zip(jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True)
    analytic = sum(jnp.vdot(g, d) for g, d in pairs)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5)


def test_truncated_and_first_order_estimators_differ_from_the_exact_gradient():
    model, params = _model(layers=1, d=8)
    spec = self_loss.Spec(path="soft")
    tokens = jnp.stack([_tokens(seed=s) for s in range(3)])
    grads = {}
    for est in ("unrolled", "truncated", "first_order"):
        fn = functools.partial(
            self_loss.meta_objective,
            model=model,
            spec=spec,
            inner_optimizer=optax.sgd(0.3),
            estimator=est,
            window=1,
        )
        f = lambda p, fn=fn: fn(p, tokens, jax.random.split(jax.random.key(0), 3), tokens[0], None)  # noqa: E731
        (loss, (theta_prime, _)), grads[est] = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
        grads[est + "_value"] = (loss, theta_prime)
    # The same forward pass for all three; the gradients differ.
    for est in ("truncated", "first_order"):
        np.testing.assert_allclose(grads[est + "_value"][0], grads["unrolled_value"][0], rtol=1e-5)
        diff = optax.global_norm(jax.tree.map(jnp.subtract, grads[est], grads["unrolled"]))
        assert diff > 1e-4 * optax.global_norm(grads["unrolled"])
    with pytest.raises(ValueError, match="window"):
        self_loss.meta_objective(
            params,
            tokens,
            jax.random.split(jax.random.key(0), 3),
            tokens[0],
            None,
            model=model,
            spec=spec,
            inner_optimizer=optax.sgd(0.3),
            estimator="truncated",
            window=3,
        )


def test_stop_gradient_critic_gets_no_inner_gradient_and_the_live_one_does():
    model, params = _model(readout="head")
    tokens = _tokens()
    live = self_loss.Spec(path="hard")
    sg = self_loss.Spec(path="hard", stop_gradient=True)
    frozen = self_loss.Spec(path="hard", critic="frozen")
    g = lambda spec: jax.grad(  # noqa: E731
        lambda p: self_loss.self_loss(p, {}, params, tokens, None, model=model, spec=spec)[0]
    )(params)
    # Hard tokens: the only gradient is through the critic's weights, e.g. its loss head.
    assert np.abs(g(live)["loss_head"]["kernel"]).max() > 0
    chex.assert_trees_all_close(g(sg), jax.tree.map(jnp.zeros_like, params), atol=0)
    chex.assert_trees_all_close(g(sg), g(frozen))


def test_routing_freezes_one_group():
    _, params = _model(loss_layers=1, readout="head")
    groups = transformer.param_groups(params)
    opt = self_loss.routed(optax.sgd(1.0), "loss")
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = opt.update(grads, opt.init(params), params)
    for (path, u), g in zip(
        jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(groups), strict=True
    ):
        assert np.all(u == 0) == (g == "loss"), path


def test_normalised_predicted_loss_hides_offset_and_scale():
    v = jnp.array([1.0, 2.0, 4.0])
    np.testing.assert_allclose(
        self_loss.normalise_batch(v), self_loss.normalise_batch(3.0 * v - 5.0), rtol=1e-5
    )


def test_monotonicity_penalty_is_zero_iff_the_ranking_agrees():
    true = jnp.array([1.0, 2.0, 3.0])
    assert self_loss.monotonicity_penalty(jnp.array([0.1, 0.5, 0.9]), true) == 0
    assert self_loss.monotonicity_penalty(jnp.array([0.9, 0.5, 0.1]), true) > 0


def test_spearman_matches_numpy_ranks():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=8), rng.normal(size=8)
    rank = lambda a: np.argsort(np.argsort(a))  # noqa: E731
    expected = np.corrcoef(rank(x), rank(y))[0, 1]
    valid = jnp.ones(8, bool)
    np.testing.assert_allclose(
        self_loss.spearman(jnp.asarray(x), jnp.asarray(y), valid), expected, rtol=1e-5
    )
    # Invalid entries are ignored.
    valid = jnp.arange(8) >= 3
    expected = np.corrcoef(rank(x[3:]), rank(y[3:]))[0, 1]
    np.testing.assert_allclose(
        self_loss.spearman(jnp.asarray(x), jnp.asarray(y), valid), expected, rtol=1e-5
    )


def _run_detector(pred, val, window=3, tolerance=0.01):
    det = init_detector(window, jnp.asarray(val[0] + 1.0), jnp.asarray(0))
    flags = []
    for i, (p, v) in enumerate(zip(pred, val, strict=True)):
        det, hacked, _, _ = detector_update(
            det,
            jnp.asarray(p),
            jnp.asarray(p),
            jnp.asarray(v),
            jnp.asarray(i + 1),
            tolerance=tolerance,
        )
        flags.append(bool(hacked))
    return det, flags


def test_detector_reports_where_validation_stopped_improving():
    pred = np.linspace(1.0, -1.0, 12)  # falling throughout
    val = np.array([3.0, 2.9, 2.8, 2.7, 2.75, 2.8, 2.9, 3.0, 3.1, 3.2, 3.3, 3.4])
    det, flags = _run_detector(pred, val)
    assert int(det.onset) == 4  # the last improvement: step 4 (val 2.7)
    assert int(det.detected_at) == flags.index(True) + 1
    assert int(det.detected_at) == 5  # 2.75 > 2.7 + tol, with a full falling window


def test_detector_is_quiet_while_both_improve_or_the_predicted_loss_rises():
    improving = np.linspace(3.0, 2.0, 12)
    assert not any(_run_detector(np.linspace(1, 0, 12), improving)[1])
    assert not any(_run_detector(np.linspace(0, 1, 12), improving[::-1])[1])


def test_bad_specs_fail_with_a_message():
    with pytest.raises(ValueError, match="shared_prefix"):
        self_loss.Spec(critic="frozen", layout="shared_prefix")
    with pytest.raises(ValueError, match="Unknown path"):
        self_loss.Spec(path="gumbel")
