"""ML³'s shared pieces: the meta-test fit, the episode and its key contract."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metalearn import bilevel
from metalearn.algorithms import ml3
from metalearn.losses.task import mse
from metalearn.state import init_inner_state, init_meta_state

# Their time is compilation of small programs: compile them with most optimisations off.
pytestmark = pytest.mark.usefixtures("fast_compile")

X = jnp.linspace(-1.0, 1.0, 8)[:, None]
BATCH = {"x": X, "y": 2.0 * X - 0.5}


def apply(params, x):
    return x * params["a"] + params["b"]


def _learned(phi, y, y_hat, batch):
    """A tiny 'learned' loss: a φ-weighted squared error."""
    del batch
    return jnp.mean(jax.nn.softplus(phi["w"]) * (y_hat - y) ** 2)


THETA = {"a": jnp.zeros(()), "b": jnp.zeros(())}
PHI = {"w": jnp.asarray(0.5)}


def test_regression_inner_loss_reports_the_task_mse():
    inner = ml3.regression_inner_loss(apply, lambda phi, y, y_hat, b: mse(y, y_hat))
    value, (_, metrics) = inner(THETA, {}, PHI, BATCH, None)
    np.testing.assert_allclose(value, metrics["task/mse"], rtol=1e-6)
    np.testing.assert_allclose(value, np.mean((2.0 * np.asarray(X) - 0.5) ** 2), rtol=1e-6)


def test_fit_traces_the_evaluation_at_every_iterate():
    opt, k = optax.sgd(0.3), 5
    inner = ml3.regression_inner_loss(apply, _learned)
    evaluate = lambda p: mse(BATCH["y"], apply(p, BATCH["x"]))  # noqa: E731

    @jax.jit
    def run():
        final, trace = ml3.fit(
            THETA,
            PHI,
            BATCH,
            jax.random.key(0),
            inner_loss=inner,
            optimizer=opt,
            num_steps=k,
            evaluate=evaluate,
        )
        p, by_hand = THETA, [evaluate(THETA)]
        for _ in range(k):
            g = jax.grad(lambda p: inner(p, {}, PHI, BATCH, None)[0])(p)
            p = jax.tree.map(lambda a, b: a - 0.3 * b, p, g)
            by_hand.append(evaluate(p))
        return final, trace, p, jnp.stack(by_hand)

    final, trace, expected, by_hand = run()
    assert trace.shape == (k + 1,)
    np.testing.assert_allclose(trace, by_hand, rtol=1e-5)
    chex.assert_trees_all_close(final, expected, rtol=1e-5)
    assert trace[-1] < 0.5 * trace[0]


def test_fit_traces_every_leaf_of_a_pytree_evaluation():
    inner = ml3.regression_inner_loss(apply, _learned)

    def evaluate(p):
        return {"mse": mse(BATCH["y"], apply(p, BATCH["x"])), "ab": jnp.stack([p["a"], p["b"]])}

    _, trace = jax.jit(
        lambda: ml3.fit(
            THETA,
            PHI,
            BATCH,
            jax.random.key(0),
            inner_loss=inner,
            optimizer=optax.sgd(0.3),
            num_steps=3,
            evaluate=evaluate,
        )
    )()
    assert trace["mse"].shape == (4,) and trace["ab"].shape == (4, 2)
    np.testing.assert_allclose(trace["ab"][0], [0.0, 0.0])
    assert trace["mse"][-1] < trace["mse"][0] and np.abs(trace["ab"][-1]).min() > 0


def _noisy_inner(params, model_state, phi, batch, key):
    """Uses its key, so that the episode's key numbering shows in the numbers."""
    noise = 0.1 * jax.random.normal(key, batch["y"].shape)
    return _learned(phi, batch["y"] + noise, apply(params, batch["x"]), batch), (model_state, {})


def _outer(params, model_state, batch, key):
    noise = 0.1 * jax.random.normal(key, batch["y"].shape)
    return mse(batch["y"] + noise, apply(params, batch["x"]))


def test_episode_draws_the_documented_keys_and_returns_the_final_states():
    """`episode` is `meta_train_episode` with inner keys split(inner_key, (T, K)) and outer
    keys split(outer_key, (T, K // W)), W the estimator's window: the numbering every
    experiment relies on."""
    t, k, window = 2, 4, 2
    opt, meta_opt = optax.sgd(0.3), optax.adam(1e-2)
    meta = init_meta_state(PHI, meta_opt)
    fresh = jax.vmap(lambda _: init_inner_state(THETA, opt))(jnp.arange(t))
    batches = jax.tree.map(lambda v: jnp.broadcast_to(v, (t, k, *v.shape)), BATCH)
    outer = jax.tree.map(lambda v: jnp.broadcast_to(v, (t, k // window, *v.shape)), BATCH)
    inner_key, outer_key = jax.random.key(1), jax.random.key(2)
    estimator = bilevel.Truncated(window=window)
    kw = dict(
        problem=bilevel.Problem(_noisy_inner, _outer, opt),
        estimator=estimator,
        meta_optimizer=meta_opt,
    )

    @jax.jit
    def run(meta):
        got = ml3.episode(
            meta, fresh, batches, outer, inner_key, outer_key, return_final_states=True, **kw
        )
        keys = jax.random.split(inner_key, (t, k))
        outer_keys = jax.random.split(outer_key, (t, k // window))
        expected = bilevel.windowed_meta_steps(
            meta,
            estimator.init_tasks(meta.params, fresh),
            batches,
            keys,
            outer,
            outer_keys,
            **kw,
        )
        other = ml3.episode(meta, fresh, batches, outer, outer_key, inner_key, **kw)
        return got, expected, other

    (got_meta, finals, metrics), (meta_expected, est_state, m), (other, _) = run(meta)
    finals_expected = est_state.inner
    chex.assert_trees_all_close(got_meta.params, meta_expected.params, rtol=1e-6)
    chex.assert_trees_all_close(finals.params, finals_expected.params, rtol=1e-6)
    assert jax.tree.leaves(finals.params)[0].shape == (t,)
    np.testing.assert_allclose(metrics["meta/loss"], jnp.mean(m["meta/loss"]), rtol=1e-6)
    assert int(got_meta.step) == k // window
    # The keys matter here, so the comparison above could fail.
    assert not np.allclose(other.params["w"], got_meta.params["w"], rtol=1e-6)
