"""The self-loss transformer's pure parts: prediction paths, objectives, the Phase 1
meta-gradient and its estimators, routing and the reward-hacking detector.

The objective-level tests run on `ToyModel`, a data-free stand-in with the transformer's
`apply` protocol whose programs compile in about a second; the same checks on the real
transformer are in the slow tier.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from metalearn import bilevel, hacking
from metalearn.algorithms import self_loss
from metalearn.hacking import detector_update, init_detector
from metalearn.models import transformer
from metalearn.state import init_inner_state
from metalearn.tasks import text

T = 6  # context
V = text.VOCAB_SIZE


class ToyModel:
    """Token ids [B, L] or distributions [B, L, V] → the running mean of their embeddings
    (causal) → tanh → next-token logits [B, L, V] (stack 'lm') or a score per position
    [B, L] from a linear head (stack 'loss'), as `Transformer.apply` returns them; with
    `observe`, stack 'critic' adds embeddings of the observed token and the prediction
    before the unembedding, as the transformer's does."""

    def __init__(self, d: int = 4, dtype=jnp.float32, observe: bool = False):
        self.d, self.dtype, self.observe = d, dtype, observe

    def init(self, key):
        k1, k2, k3, k4, k5 = jax.random.split(key, 5)
        normal = lambda k, shape: jax.random.normal(k, shape, self.dtype)  # noqa: E731
        params = {
            "embed": normal(k1, (V, self.d)),
            "unembed": normal(k2, (self.d, V)),
            "loss_head": {"kernel": normal(k3, (self.d, 1))},
        }
        if self.observe:
            params["loss_observed"] = normal(k4, (V, self.d))
            params["loss_prediction"] = normal(k5, (V, self.d))
            params["loss_gain"] = jnp.asarray(0.5, self.dtype)
        return params

    def apply(self, variables, inputs, *, stack="lm", cache=None, observed=None, prediction=None):
        del cache
        p = variables["params"]
        e = p["embed"][inputs] if inputs.ndim == 2 else inputs @ p["embed"]
        length = e.shape[1]
        causal = jnp.tril(jnp.ones((length, length), e.dtype))
        h = jnp.tanh(jnp.einsum("st,btd->bsd", causal / causal.sum(1, keepdims=True), e))
        if stack == "critic":
            h = h + p["loss_observed"][observed] + prediction @ p["loss_prediction"]
            return h @ p["unembed"] + p["loss_gain"] * jax.nn.one_hot(observed, V), None
        if stack == "lm":
            return h @ p["unembed"], None
        return (h @ p["loss_head"]["kernel"])[..., 0], None


@functools.cache
def _model(
    loss_layers=0, readout="mean", positions="rotary", d=16, dtype="float32", observe="none"
):
    """A tiny transformer (one shared block, plus the disjoint ones) and its parameters."""
    cfg = ml_collections.ConfigDict(
        {
            "num_layers": loss_layers + 1,
            "loss_layers": loss_layers,
            "d_model": d,
            "num_heads": 2,
            "mlp_ratio": 2,
            "positions": positions,
            "readout": readout,
            "dtype": dtype,
        }
    )
    model = transformer.make_transformer(cfg, T, observe=observe)
    init = jax.jit(functools.partial(transformer.init_transformer, model, context=T))
    params = init(jax.random.key(0))
    return model, jax.tree.map(lambda a: a.astype(dtype), params)


def _toy(dtype=jnp.float32, observe=False):
    model = ToyModel(dtype=dtype, observe=observe)
    return model, model.init(jax.random.key(0))


def _tokens(b=2, length=T + 1, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, length), 0, text.NUM_BYTES)


MODELS = [
    dict(loss_layers=0, readout="mean", positions="rotary"),
    dict(loss_layers=1, readout="head", positions="learned"),
    dict(loss_layers=1, readout="mean", positions="rotary"),
]
# The first model in the default tier, every model in the slow one.
TIERED_MODELS = [MODELS[0], *(pytest.param(m, marks=pytest.mark.slow) for m in MODELS[1:])]


@pytest.mark.parametrize("kw", TIERED_MODELS)
def test_shared_prefix_loss_pass_equals_the_separate_forward(fast_compile, kw):
    """The block mask over cached keys and values gives the one-forward numbers."""
    model, params = _model(**kw)
    x = _tokens()[:, :T]

    @jax.jit
    def both(params):
        logits, cache = model.apply({"params": params}, x)
        preds = self_loss.prediction_inputs(logits, "soft")
        separate = self_loss.loss_pass(model, params, x, preds, output="identity")
        shared = self_loss.loss_pass(model, params, x, preds, output="identity", cache=cache)
        return separate, shared

    separate, shared = both(params)
    np.testing.assert_allclose(shared, separate, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kw", MODELS)
def test_shared_prefix_self_loss_has_the_separate_gradient(fast_compile, kw):
    model, params = _model(**kw)
    tokens = _tokens()
    spec_sep = self_loss.Spec(path="soft", disjoint=kw["loss_layers"] > 0)
    spec_pre = self_loss.Spec(path="soft", layout="shared_prefix", disjoint=spec_sep.disjoint)

    @jax.jit
    def grads(params):
        grad = lambda spec: jax.grad(  # noqa: E731
            lambda p: self_loss.self_loss(p, {}, p, tokens, None, model=model, spec=spec)[0]
        )(params)
        return grad(spec_sep), grad(spec_pre)

    grad_sep, grad_pre = grads(params)
    chex.assert_trees_all_close(grad_pre, grad_sep, rtol=1e-4, atol=1e-6)


def test_soft_path_equals_hard_tokens_for_one_hot_predictions(fast_compile):
    model, params = _model()
    x = _tokens()[:, :T]
    pred_tokens = _tokens(seed=3)[:, :T]

    @jax.jit
    def passes(params):
        soft = self_loss.loss_pass(
            model, params, x, jax.nn.one_hot(pred_tokens, V), output="identity"
        )
        ids = jnp.concatenate([x, pred_tokens, jnp.full((2, 1), text.LOSS)], 1)
        hard = model.apply({"params": params}, ids, stack="loss")[0][:, -1]
        # argmax tokens of the language model through the three paths
        logits, _ = model.apply({"params": params}, x)
        paths = [
            self_loss.loss_pass(
                model, params, x, self_loss.prediction_inputs(logits * 1e4, p), output="identity"
            )
            for p in self_loss.PATHS
        ]
        return soft, hard, paths

    soft, hard, paths = passes(params)
    np.testing.assert_allclose(soft, hard, rtol=1e-5, atol=1e-6)
    for v in paths[1:]:  # the same forward value
        np.testing.assert_allclose(v, paths[0], rtol=1e-4, atol=1e-5)


def test_prediction_paths_route_the_gradient():
    logits = jax.random.normal(jax.random.key(0), (1, 3, 5))
    w = jax.random.normal(jax.random.key(1), (1, 3, 5))

    @jax.jit
    def grads(z):
        g = lambda path: jax.grad(  # noqa: E731
            lambda z: jnp.sum(w * self_loss.prediction_inputs(z, path))
        )(z)
        paths = {p: self_loss.prediction_inputs(z, p) for p in ("straight_through", "hard")}
        return g("straight_through"), g("soft"), g("hard"), paths

    g_st, g_soft, g_hard, paths = grads(logits)
    np.testing.assert_allclose(g_st, g_soft, rtol=1e-6)
    np.testing.assert_array_equal(g_hard, 0.0)
    np.testing.assert_allclose(paths["straight_through"], paths["hard"], atol=1e-6)


def _random_direction(params, seed=7):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
    keys = jax.tree.unflatten(jax.tree.structure(params), list(keys))
    return jax.tree.map(lambda a, k: jax.random.normal(k, a.shape, a.dtype), params, keys)


# On the toy model: θ as start and live critic through two inner steps, with the
# monotonicity penalty in the outer loss; a frozen critic; self-produced targets; and
# the `adversarial` variant: the observed-token critic held at θ while the model drifts
# three steps on its targets, every step differentiated.
FD_CASES = [
    (dict(path="soft", monotonicity=1.0, output="softplus"), 2),
    (dict(path="hard", critic="frozen"), 1),
    (dict(signal="targets", sees="input_and_continuation"), 1),
    (dict(signal="targets", sees="observed", critic="frozen"), 3),
]


@pytest.mark.parametrize(
    "spec_kw, model_kw, steps",
    [(spec_kw, None, steps) for spec_kw, steps in FD_CASES]
    + [
        pytest.param(*case, marks=pytest.mark.slow)
        for case in [
            (dict(path="soft"), {}, 2),
            (dict(path="hard", critic="frozen"), dict(readout="head"), 1),
            (dict(signal="targets", sees="input_and_continuation"), {}, 2),
            (dict(signal="targets", sees="observed", critic="frozen"), dict(observe="embed"), 3),
            (
                dict(path="soft", monotonicity=1.0, output="softplus", disjoint=True),
                dict(loss_layers=1),
                1,
            ),
        ]
    ],
)
def test_phase1_meta_gradient_matches_finite_differences(
    float64, fast_compile, spec_kw, model_kw, steps
):
    """On the toy model (model_kw None) and on the transformer."""
    if model_kw is None:
        model, params = _toy(jnp.float64, observe=spec_kw.get("sees") == "observed")
    else:
        model, params = _model(d=8, dtype="float64", **model_kw)
    spec = self_loss.Spec(**spec_kw)
    tokens = _tokens(b=2, seed=4)[None].repeat(steps, 0)
    tokens = tokens.at[1:].set(_tokens(b=2, seed=5)) if steps > 1 else tokens
    outer = _tokens(b=2, seed=6)
    fn = functools.partial(
        self_loss.meta_objective,
        model=model,
        spec=spec,
        inner_optimizer=optax.sgd(0.3),
        estimator=bilevel.Unrolled(),
    )
    f = lambda p: fn(p, tokens, jax.random.split(jax.random.key(0), steps), outer, None)[0]  # noqa: E731
    eps = 1e-6

    @jax.jit
    def check(params, direction):
        grad = jax.grad(f)(params)
        analytic = sum(
            jnp.vdot(g, d)
            for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction), strict=True)
        )
        shift = lambda s: jax.tree.map(lambda a, d: a + s * eps * d, params, direction)  # noqa: E731
        return analytic, (f(shift(1.0)) - f(shift(-1.0))) / (2 * eps)

    analytic, numeric = check(params, _random_direction(params))
    assert abs(analytic) > 1e-6  # a meta-gradient to check
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5)


def _estimator_objective(model):
    return functools.partial(
        self_loss.meta_objective,
        model=model,
        spec=self_loss.Spec(path="soft"),
        inner_optimizer=optax.sgd(0.3),
    )


def test_last_window_keeps_the_forward_pass_and_its_gradient_is_that_of_the_last_step(
    fast_compile,
):
    """K = 2, window 1: the same outer loss and θ' as the exact unroll, and the gradient of
    the last step's unroll started at θ + (θ₁ − θ) with θ₁ − θ held constant: the earlier
    step enters by its value, with an identity Jacobian to θ (not a zero one)."""
    model, params = _toy()
    tokens = jnp.stack([_tokens(seed=s) for s in range(2)])
    keys = jax.random.split(jax.random.key(0), 2)
    objective = _estimator_objective(model)
    spec, sgd = self_loss.Spec(path="soft"), optax.sgd(0.3)

    def by_hand(p):
        _, (theta_1, _) = objective(
            p, tokens[:1], keys[:1], tokens[0], None, estimator=bilevel.Unrolled()
        )
        start = jax.tree.map(lambda a, b: a + jax.lax.stop_gradient(b - a), p, theta_1)
        final, _ = bilevel.unroll(
            init_inner_state(start, sgd),
            p,
            tokens[1:],
            keys[1:],
            inner_loss=functools.partial(self_loss.self_loss, model=model, spec=spec),
            optimizer=sgd,
        )
        return self_loss.outer_loss(final.params, {}, tokens[0], None, model=model, spec=spec)

    @jax.jit
    def run(p):
        value_and_grad = lambda est: jax.value_and_grad(  # noqa: E731
            lambda p: objective(p, tokens, keys, tokens[0], None, estimator=est), has_aux=True
        )(p)
        return (
            value_and_grad(bilevel.Unrolled()),
            value_and_grad(bilevel.LastWindow(steps=1)),
            jax.grad(by_hand)(p),
        )

    ((exact, (exact_theta, _)), exact_grad), ((loss, (theta, _)), grad), expected = run(params)
    np.testing.assert_allclose(loss, exact, rtol=1e-6)
    chex.assert_trees_all_close(theta, exact_theta, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(grad, expected, rtol=1e-5, atol=1e-7)
    diff = optax.global_norm(jax.tree.map(jnp.subtract, grad, exact_grad))
    assert diff > 1e-4 * optax.global_norm(exact_grad)
    with pytest.raises(ValueError, match=r"the window \(2\) must be in \[1, 2\)"):
        objective(params, tokens, keys, tokens[0], None, estimator=bilevel.LastWindow(steps=2))


@pytest.mark.slow
def test_first_order_keeps_the_forward_pass_and_drops_second_order_terms(fast_compile):
    model, params = _toy()
    tokens = jnp.stack([_tokens(seed=s) for s in range(2)])
    keys = jax.random.split(jax.random.key(0), 2)
    objective = _estimator_objective(model)

    @jax.jit
    def run(p):
        return [
            jax.value_and_grad(
                lambda p, est=est: objective(p, tokens, keys, tokens[0], None, estimator=est),
                has_aux=True,
            )(p)
            for est in (bilevel.Unrolled(), bilevel.FirstOrder())
        ]

    ((exact, (exact_theta, _)), exact_grad), ((loss, (theta, _)), grad) = run(params)
    np.testing.assert_allclose(loss, exact, rtol=1e-6)
    chex.assert_trees_all_close(theta, exact_theta, rtol=1e-6, atol=1e-7)
    diff = optax.global_norm(jax.tree.map(jnp.subtract, grad, exact_grad))
    assert diff > 1e-4 * optax.global_norm(exact_grad)


@pytest.mark.parametrize(
    "estimator, message",
    [
        (bilevel.Truncated(window=1), "last_window"),
        (bilevel.ES(window=1), "updates the meta-parameters after every window"),
        (bilevel.OneStep(), r"Phase 1 takes one of \['Unrolled', 'FirstOrder'"),
        (bilevel.PES(window=1), "PES would be plain ES: use ES"),
        (bilevel.Implicit(), "not solved to a fixed point"),
        (bilevel.LastWindow(steps=3), r"the window \(3\) must be in \[1, 3\)"),
    ],
)
def test_an_estimator_phase1_cannot_use_fails_with_a_message(estimator, message):
    with pytest.raises(ValueError, match=message):
        self_loss.check_estimator(estimator, 3)


def test_an_unknown_estimator_name_is_refused_where_names_become_objects():
    """The name check (formerly `self_loss.check_estimator`'s) lives in
    `bilevel.estimator_from_config`, which the experiments call."""
    with pytest.raises(ValueError, match="Unknown gradient estimator 'ES'. Did you mean 'es'"):
        bilevel.estimator_from_config("ES", window=1, episode_length=3)


def test_stop_gradient_critic_gets_no_inner_gradient_and_the_live_one_does():
    model, params = _toy()
    tokens = _tokens()
    specs = {
        "live": self_loss.Spec(path="hard"),
        "sg": self_loss.Spec(path="hard", stop_gradient=True),
        "frozen": self_loss.Spec(path="hard", critic="frozen"),
    }

    @jax.jit
    def grads(params):
        return {
            name: jax.grad(
                lambda p, spec=spec: self_loss.self_loss(
                    p, {}, params, tokens, None, model=model, spec=spec
                )[0]
            )(params)
            for name, spec in specs.items()
        }

    g = grads(params)
    # Hard tokens: the only gradient is through the critic's weights, e.g. its loss head.
    assert np.abs(g["live"]["loss_head"]["kernel"]).max() > 0
    chex.assert_trees_all_close(g["sg"], jax.tree.map(jnp.zeros_like, params), atol=0)
    chex.assert_trees_all_close(g["sg"], g["frozen"])


def test_routing_freezes_one_group():
    # Parameters named as the transformer names them (no model needed).
    names = ("embed", "trunk_0", "lm_0", "lm_norm", "unembed", "loss_0", "loss_norm", "loss_head")
    params = {n: {"kernel": jnp.full((2, 3), float(i))} for i, n in enumerate(names)}
    groups = transformer.param_groups(params)
    assert [groups[n]["kernel"] for n in names] == ["trunk", "trunk"] + ["lm"] * 3 + ["loss"] * 3
    opt = self_loss.routed(optax.sgd(1.0), "loss")
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    for n in names:
        assert np.all(updates[n]["kernel"] == 0) == (groups[n]["kernel"] == "loss"), n


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
        hacking.spearman(jnp.asarray(x), jnp.asarray(y), valid), expected, rtol=1e-5
    )
    # Invalid entries are ignored.
    valid = jnp.arange(8) >= 3
    expected = np.corrcoef(rank(x[3:]), rank(y[3:]))[0, 1]
    np.testing.assert_allclose(
        hacking.spearman(jnp.asarray(x), jnp.asarray(y), valid), expected, rtol=1e-5
    )


def _run_detector(pred, val, window=3, tolerance=0.01):
    """The detector over logged steps 1, 2, … with these predicted and validation losses."""

    def step(det, xs):
        p, v, t = xs
        det, hacked, _, _ = detector_update(det, p, p, v, t, tolerance=tolerance)
        return det, hacked

    det = init_detector(window, jnp.asarray(val[0] + 1.0), jnp.asarray(0))
    xs = (
        jnp.asarray(pred, jnp.float32),
        jnp.asarray(val, jnp.float32),
        jnp.arange(1, len(val) + 1),
    )
    det, flags = jax.jit(lambda d, xs: jax.lax.scan(step, d, xs))(det, xs)
    return det, [bool(f) for f in flags]


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


def test_target_quality_against_hand_computed_values():
    # Two positions, three tokens; the true tokens are 0 and 2.
    q = jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]])
    logits = jnp.log(jnp.array([[[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]]]))
    y = jnp.array([[0, 2]])
    got = jax.device_get(jax.jit(self_loss.target_quality)(q, logits, y))
    assert set(got) == set(self_loss.QUALITY)
    np.testing.assert_allclose(got["critic/target_ce"], -(np.log(0.5) + np.log(0.3)) / 2, rtol=1e-6)
    entropy = lambda p: -sum(x * np.log(x) for x in p)  # noqa: E731
    want = (entropy([0.5, 0.25, 0.25]) + entropy([0.1, 0.6, 0.3])) / 2
    np.testing.assert_allclose(got["critic/target_entropy"], want, rtol=1e-6)
    assert got["critic/target_accuracy"] == 0.5  # argmax q: 0 (right), 1 (wrong)
    assert got["critic/model_accuracy"] == 0.5  # argmax p: 1 (wrong), 2 (right)
    assert got["critic/agreement"] == 0.0  # argmax q against argmax p: 0 ≠ 1, 1 ≠ 2


@pytest.mark.slow  # compilation-bound (the default tier was at 5 min 5 s in CI)
def test_the_observed_critic_starts_as_the_language_model_and_reads_the_observed_token():
    model, params = _model(observe="embed")
    tokens = _tokens(b=2)
    spec = self_loss.Spec(signal="targets", sees="observed", critic="frozen")

    @jax.jit
    def targets(critic):
        logits, _ = model.apply({"params": params}, tokens[:, :-1])
        q = self_loss.targets_of(model, critic, tokens, logits, spec)
        return q, logits, self_loss.target_quality(q, logits, tokens[:, 1:])

    q, logits, before = targets(params)
    np.testing.assert_allclose(q, jax.nn.softmax(logits), rtol=1e-5, atol=1e-7)
    # An observed-token embedding along each token's unembedding column (adding 20 to
    # that token's logit): the targets move to the observed tokens.
    copying = dict(params)
    w = params["unembed"]["kernel"].T  # [V, d]
    copying["loss_observed"] = {"embedding": 20.0 * w / jnp.sum(w**2, -1, keepdims=True)}
    _, _, after = targets(copying)
    assert after["critic/target_ce"] < before["critic/target_ce"] - 1.0
    assert after["critic/target_accuracy"] > before["critic/model_accuracy"]
    # The gain adds to the observed token's logit alone: at 50 the targets are the truth.
    q, _, gained = targets({**params, "loss_gain": jnp.asarray(50.0)})
    assert gained["critic/target_accuracy"] == 1.0 and gained["critic/target_ce"] < 1e-3
    with pytest.raises(ValueError, match="observe='gain' or 'embed'"):
        model.clone(observe="none").apply({"params": params}, tokens[:, :-1], stack="critic")
    with pytest.raises(ValueError, match="sees='observed'.*signal='targets'"):
        self_loss.Spec(sees="observed")


def test_generate_continues_greedily_with_a_sliding_window():
    model, params = _model()
    prompt = _tokens(b=1, length=T)

    @jax.jit
    def run(prompt):
        greedy = transformer.generate(model, params, prompt, 4, num_tokens=text.NUM_BYTES)
        sampled = transformer.generate(
            model, params, prompt, 4, jax.random.key(1), num_tokens=text.NUM_BYTES
        )
        return greedy, sampled

    last_logits = jax.jit(lambda w: model.apply({"params": params}, w)[0][0, -1, : text.NUM_BYTES])
    out, sampled = run(prompt)
    window, want = prompt, []
    for _ in range(4):
        token = int(jnp.argmax(last_logits(window)))
        want.append(token)
        window = jnp.concatenate([window[:, 1:], jnp.array([[token]])], 1)
    assert out.shape == (1, 4) and out[0].tolist() == want
    assert sampled.shape == (1, 4) and int(sampled.max()) < text.NUM_BYTES


def test_first_stall_is_the_detectors_stall_rule():
    """By hand: reference 1.0; 0.95 improves (tolerance 0.01), then three steps within
    the tolerance: with a window of 3 the stall is at the third of them (index 3)."""
    values = [1.0, 0.95, 0.945, 0.944, 0.949, 0.5]
    assert int(hacking.first_stall(np.asarray(values), tolerance=0.01, window=3)) == 3
    assert int(hacking.first_stall(np.asarray(values), tolerance=0.01, window=4)) == -1
    # The detector's own `since` counter reaches the window at the same logged step.
    det = init_detector(3, jnp.asarray(values[0]), jnp.asarray(0))
    stalled = []
    for i, v in enumerate(values[1:]):
        det, *_ = detector_update(det, 0.0, 0.0, jnp.asarray(v), jnp.asarray(i + 1), tolerance=0.01)
        stalled.append(int(det.since) >= 3)
    assert stalled.index(True) == 3
