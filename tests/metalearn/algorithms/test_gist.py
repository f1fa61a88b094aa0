"""Gist tokens: the masks (by hand and by perturbation), the bottleneck objective, the
gist-space losses and their gradients (finite differences in float64), the plan 3
meta-gradient, and the collapse diagnostics."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from metalearn import bilevel
from metalearn.algorithms import adalfl, gist, self_loss
from metalearn.models import transformer
from metalearn.state import init_inner_state
from metalearn.tasks import text


@functools.cache
def _model(d=8, dtype="float32", context=12):
    cfg = ml_collections.ConfigDict(
        {
            "num_layers": 1,
            "loss_layers": 0,
            "d_model": d,
            "num_heads": 2,
            "mlp_ratio": 2,
            "positions": "rotary",
            "readout": "mean",
            "dtype": dtype,
        }
    )
    model = transformer.make_transformer(cfg, context)
    params = transformer.init_transformer(model, jax.random.key(0), context)
    if dtype == "float64":
        params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    return model, params


def _tokens(b=2, n=13, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, n), 0, text.NUM_BYTES)


def _rows(*rows: str) -> np.ndarray:
    return np.array([[c == "1" for c in r] for r in rows])


def test_gist_masks_against_hand_written_matrices():
    """Length 6, gists at positions 2 and 3: tokens 4 and 5 lose the context (gist), keep
    it (positive) or lose it and the gists (negative); the gists see the context."""
    causal = ("100000", "110000", "111000", "111100", "111110", "111111")
    np.testing.assert_array_equal(gist.gist_mask(6, ((2, 2),), "positive"), _rows(*causal))
    np.testing.assert_array_equal(
        gist.gist_mask(6, ((2, 2),), "gist"),
        _rows("100000", "110000", "111000", "111100", "001110", "001111"),
    )
    np.testing.assert_array_equal(
        gist.gist_mask(6, ((2, 2),), "negative"),
        _rows("100000", "110000", "111000", "111100", "000010", "000011"),
    )


def test_several_gist_spans_compose():
    """[c c][g][c][g][x]: the last token sees only the second gist span and itself; the
    text between the spans sees the first gist but not the first context."""
    np.testing.assert_array_equal(
        gist.gist_mask(6, ((2, 1), (4, 1)), "gist"),
        _rows("100000", "110000", "111000", "001100", "001110", "000011"),
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(spans=((5, 2),)), "lie within"),
        (dict(spans=((1, 0),)), "k ≥ 1"),
        (dict(mode="full"), "Unknown gist mask mode"),
    ],
)
def test_gist_mask_rejects_bad_spans_and_modes(bad, message):
    kwargs = {"spans": ((2, 2),), "mode": "gist", **bad}
    with pytest.raises(ValueError, match=message):
        gist.gist_mask(6, **kwargs)


@pytest.mark.slow  # 6 s; the hand-written matrices are in the default tier
def test_a_token_cannot_see_what_its_mask_forbids(fast_compile):
    """Perturbation: changing the context changes nothing after the gists under the gist
    mask, but does change the gists and (positive control) the tokens after them; under
    the negative control changing the gists' ids changes nothing after them either. A
    [LOSS] token after the gists is bound by the same mask."""
    model, params = _model()
    c = _tokens(b=1, n=4, seed=1)
    x = _tokens(b=1, n=3, seed=2)
    seq = jnp.concatenate([c, gist.gist_ids(2)[None], x, jnp.full((1, 1), text.LOSS)], 1)
    other = seq.at[:, :4].set(_tokens(b=1, n=4, seed=3))
    other_gists = seq.at[:, 4:6].set(gist.GIST + 5)

    @jax.jit
    def logits(tokens, mask):
        return model.apply({"params": params}, tokens, mask=mask)[0]

    mask = lambda mode: gist.gist_mask(seq.shape[1], ((4, 2),), mode)  # noqa: E731
    gisted = logits(seq, mask("gist")) - logits(other, mask("gist"))
    np.testing.assert_allclose(gisted[:, 6:], 0.0, atol=1e-6)  # x and [LOSS]
    assert np.abs(gisted[:, 4:6]).max() > 1e-3  # the gists read the context
    assert (
        np.abs(logits(seq, mask("positive")) - logits(other, mask("positive")))[:, 6:].max() > 1e-3
    )
    neg = logits(seq, mask("negative")) - logits(other_gists, mask("negative"))
    np.testing.assert_allclose(neg[:, 6:], 0.0, atol=1e-6)
    assert np.abs(logits(seq, mask("gist")) - logits(other_gists, mask("gist")))[:, 6:].max() > 1e-3


@pytest.mark.slow  # compilation-bound (the default tier was at 5 min 5 s in CI)
def test_a_mask_of_the_wrong_shape_is_refused():
    model, params = _model()
    with pytest.raises(ValueError, match="mask must be"):
        model.apply({"params": params}, _tokens(b=1, n=5), mask=jnp.ones((4, 4), bool))


@pytest.mark.slow  # compilation-bound (the default tier was at 5 min 5 s in CI)
def test_negative_control_chunk_loss_is_the_chunk_read_alone(fast_compile):
    """Under the negative mask the chunk's predictions see only the chunk, so (rotary
    positions are relative) CE(x | gists) is the cross-entropy of x read on its own."""
    model, params = _model()
    tokens = _tokens(b=3, n=13, seed=4)

    @jax.jit
    def both(p):
        _, parts = gist.bottleneck_loss(p, tokens, model=model, k=3, context=6, mode="negative")
        x = tokens[:, 6:]
        logits = model.apply({"params": p}, x[:, :-1])[0]
        return parts, jnp.mean(self_loss.cross_entropy(logits, x[:, 1:]))

    parts, alone = both(params)
    np.testing.assert_allclose(parts["ce_chunk"], alone, rtol=1e-5)


@pytest.mark.slow  # compilation-bound (the default tier was at 5 min 5 s in CI)
def test_positive_control_context_loss_is_plain_cross_entropy(fast_compile):
    """The context part of the bottleneck loss is plain next-token cross-entropy over c."""
    model, params = _model()
    tokens = _tokens(b=2, n=13, seed=5)

    @jax.jit
    def both(p):
        _, parts = gist.bottleneck_loss(p, tokens, model=model, k=2, context=6, mode="positive")
        c = tokens[:, :6]
        logits = model.apply({"params": p}, c[:, :-1])[0]
        return parts, jnp.mean(self_loss.cross_entropy(logits, c[:, 1:]))

    parts, plain = both(params)
    np.testing.assert_allclose(parts["ce_context"], plain, rtol=1e-5)


def test_distance_by_hand():
    a = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])  # one sequence, two slots
    np.testing.assert_allclose(gist.distance(a, a), [0.0], atol=1e-7)
    np.testing.assert_allclose(gist.distance(a, jnp.array([[[0.0, 3.0], [0.0, -1.0]]])), [1.5])


def test_collapse_diagnostics():
    same = jnp.ones((10, 2, 4))
    out = gist.collapse(same)
    np.testing.assert_allclose(out["gist/mean_cosine"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(out["gist/effective_rank"], 1.0, rtol=1e-6)
    spread = gist.collapse(jax.random.normal(jax.random.key(0), (256, 2, 4)))
    assert abs(float(spread["gist/mean_cosine"])) < 0.05
    assert 7.0 < float(spread["gist/effective_rank"]) <= 8.0


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(k=9), "reserves 1"),
        (dict(path="sampled"), "Unknown path"),
        (dict(target="truth"), "Unknown target"),
        (dict(chunk=0), "chunk must be"),
    ],
)
def test_spec_rejects_bad_values(bad, message):
    with pytest.raises(ValueError, match=message):
        gist.Spec(**bad)


def test_a_chunk_longer_than_the_window_is_refused():
    model, params = _model()
    with pytest.raises(ValueError, match="exceeds"):
        gist.gist_self_loss(
            params, {}, params, _tokens(n=5), None, model=model, spec=gist.Spec(chunk=8)
        )


def _directional(f, params, eps=1e-6, seed=7):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    direction = tree.unflatten(
        [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]
    )

    @jax.jit
    def check(p):
        grad = jax.grad(f)(p)
        analytic = sum(
            jnp.vdot(g, d)
            for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True)
        )
        shift = lambda s: jax.tree.map(lambda a, d: a + s * eps * d, p, direction)  # noqa: E731
        return analytic, (f(shift(1.0)) - f(shift(-1.0))) / (2 * eps)

    return check(params)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["observed", "output_and_observed"])
def test_gist_loss_gradient_matches_finite_differences(float64, fast_compile, target):
    """∇θ of the soft-path gist-space loss (θ reaches it through its continuation and,
    for plan 3's target, through E(x̂ ⊕ x) as well) in float64."""
    model, params = _model(dtype="float64")
    encoder = jax.tree.map(lambda x: x * 1.1, params)
    tokens = _tokens(b=2, n=13, seed=8)
    spec = gist.Spec(k=2, chunk=4, path="soft", target=target)
    f = lambda p: gist.gist_self_loss(p, {}, encoder, tokens, None, model=model, spec=spec)[0]  # noqa: E731
    analytic, numeric = _directional(f, params)
    assert abs(analytic) > 1e-8
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5)


@pytest.mark.slow
def test_straight_through_reads_the_argmax_and_passes_the_soft_gradient(fast_compile):
    """Its value is the distance of the one-hot argmax continuation, and its gradient
    reaches θ (through the softmax), which a hard continuation's would not."""
    model, params = _model()
    tokens = _tokens(b=2, n=13, seed=8)
    spec = gist.Spec(k=2, chunk=4, path="straight_through")
    loss = lambda p: gist.gist_self_loss(p, {}, params, tokens, None, model=model, spec=spec)[0]  # noqa: E731

    @jax.jit
    def run(p):
        logits = model.apply({"params": p}, tokens[:, :-1])[0][:, -4:]
        hard = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1])
        by_hand = gist.distance(
            gist.encode(model, p, hard, 2), gist.encode(model, p, tokens[:, -4:], 2)
        )
        return loss(p), jnp.mean(by_hand), jax.grad(loss)(p)

    value, by_hand, grads = run(params)
    np.testing.assert_allclose(value, by_hand, rtol=1e-5)
    assert float(optax.global_norm(grads["unembed"])) > 0


@pytest.mark.slow
def test_score_function_value_and_gradient(float64, fast_compile):
    """The REINFORCE objective's value is the mean distance of the sampled continuation,
    and its gradient is mean((d − mean d) ∇ log p(sample)), checked term by term."""
    model, params = _model(dtype="float64")
    tokens = _tokens(b=4, n=13, seed=9)
    key = jax.random.key(3)
    spec = gist.Spec(k=2, chunk=4, path="score_function")
    loss = lambda p: gist.gist_self_loss(p, {}, params, tokens, key, model=model, spec=spec)  # noqa: E731

    @jax.jit
    def run(p):
        value, (_, m) = loss(p)
        d = m["per_seq_distance"]
        sample = jax.random.categorical(key, model.apply({"params": p}, tokens[:, :-1])[0][:, -4:])

        def logp(q):
            logits = model.apply({"params": q}, tokens[:, :-1])[0][:, -4:]
            picked = jnp.take_along_axis(jax.nn.log_softmax(logits), sample[..., None], -1)
            return jnp.sum(picked, (1, 2))

        expected = jax.grad(lambda q: jnp.mean((d - jnp.mean(d)) * logp(q)))(p)
        return value, m["pred_loss"], expected, jax.grad(lambda q: loss(q)[0])(p)

    value, mean_distance, expected, got = run(params)
    np.testing.assert_allclose(value, mean_distance, rtol=1e-12)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_plan3_meta_gradient_matches_finite_differences(float64, fast_compile):
    """The one-step meta-gradient of plan 3 (the encoder φ, through one SGD step of θ on
    the gist distance between E(x̂) and E(x̂ ⊕ x), to the cross-entropy of another batch),
    as `adalfl.OnlineLearner.step` takes it, against central differences of that function
    of φ."""
    model, theta = _model(dtype="float64")
    phi = jax.tree.map(lambda x: x * 0.9, theta)
    spec = gist.Spec(k=2, chunk=4, target="output_and_observed")
    inner_loss = functools.partial(gist.gist_self_loss, model=model, spec=spec)
    outer_loss = functools.partial(self_loss.true_loss, model=model)
    batch, meta_batch = _tokens(b=2, n=13, seed=10), _tokens(b=2, n=13, seed=11)
    sgd = optax.sgd(3.0)

    def f(p):
        g = jax.grad(lambda t: inner_loss(t, {}, p, batch, None)[0])(theta)
        return outer_loss(jax.tree.map(lambda a, b: a - 3.0 * b, theta, g), {}, meta_batch, None)

    analytic, numeric = _directional(f, phi)
    assert abs(analytic) > 1e-8
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5)

    learner = adalfl.OnlineLearner(bilevel.Problem(inner_loss, outer_loss, sgd), optax.sgd(1.0))

    @jax.jit
    def step(phi):  # the step's gradient is that gradient: its φ step with SGD(1) is −∇φ
        _, meta, metrics = learner.step(
            learner.init(phi),
            init_inner_state(theta, sgd),
            batch,
            meta_batch,
            jax.random.key(0),
        )
        return meta.params, metrics, jax.grad(f)(phi), f(phi)

    new, metrics, grad, value = step(phi)
    for a, b, g in zip(*(jax.tree.leaves(t) for t in (new, phi, grad)), strict=True):
        np.testing.assert_allclose(b - a, g, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(metrics["meta/loss"], value, rtol=1e-10)
    assert "rank_corr" in metrics
