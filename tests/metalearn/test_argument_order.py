"""One argument order for every loss, and a swapped call refused where it shows.

metalearn's losses take targets first, `loss(y, y_hat)` (optax's take predictions
first); the heart calls `inner_loss(params, model_state, meta_params, batch, key)`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from metalearn import bilevel, mse, softmax_cross_entropy
from metalearn.state import init_inner_state

NET, LOSS_NET = nn.Dense(1), nn.Dense(1)
X = jnp.ones((4, 2))
THETA = NET.init(jax.random.key(0), X)
PHI = LOSS_NET.init(jax.random.key(1), jnp.ones((4, 1)))


def inner(params, model_state, meta_params, batch, key):
    del key
    return jnp.mean(LOSS_NET.apply(meta_params, NET.apply(params, batch))), (model_state, {})


def swapped(meta_params, model_state, params, batch, key):  # φ where θ belongs
    return inner(params, model_state, meta_params, batch, key)


def outer(params, model_state, batch, key):
    del model_state, key
    return jnp.mean(NET.apply(params, batch) ** 2)


@pytest.mark.parametrize("estimator", [bilevel.Unrolled(), bilevel.OneStep()])
def test_an_inner_loss_with_its_arguments_swapped_is_refused_naming_the_order(estimator):
    state = estimator.init(PHI, init_inner_state(THETA, optax.sgd(0.1)))
    args = (state, X[None], jax.random.split(jax.random.key(2), 1), X, jax.random.key(3))
    good = bilevel.Problem(inner, outer, optax.sgd(0.1))
    grads, _, _ = estimator.estimate(good, PHI, *args)  # the right order runs
    assert jax.tree.structure(grads) == jax.tree.structure(PHI)
    with pytest.raises(ValueError, match=r"inner_loss\(params, model_state, meta_params, batch"):
        estimator.estimate(bilevel.Problem(swapped, outer, optax.sgd(0.1)), PHI, *args)


def test_mse_refuses_shapes_that_would_broadcast():
    y = jnp.arange(4.0)
    assert float(mse(y[:, None], y[:, None] + 1.0)) == 1.0
    with pytest.raises(ValueError, match=r"same shape; got \(4, 1\) and \(4,\)"):
        mse(y[:, None], y)  # would average a [4, 4] matrix


def test_cross_entropy_refuses_swapped_and_one_hot_arguments():
    labels, logits = jnp.asarray([0, 2]), jnp.asarray([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    expected = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    assert float(softmax_cross_entropy(labels, logits)) == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="the arguments look swapped"):
        softmax_cross_entropy(logits, labels)
    with pytest.raises(ValueError, match=r"For one-hot or soft labels use optax"):
        softmax_cross_entropy(jax.nn.one_hot(labels, 3), logits)
