"""The self-loss transformer: causal masks over the language-model and loss passes."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from metalearn.models import transformer
from metalearn.tasks import text

T = 6  # context
V = text.VOCAB_SIZE

# Every option at least once in the default tier; the third combination in the slow one.
MODELS = [
    dict(loss_layers=0, readout="mean", positions="rotary"),
    dict(loss_layers=1, readout="head", positions="learned"),
    pytest.param(dict(loss_layers=1, readout="mean", positions="rotary"), marks=pytest.mark.slow),
]


@functools.cache
def _model(loss_layers=0, readout="mean", positions="rotary"):
    cfg = ml_collections.ConfigDict(
        {
            "num_layers": loss_layers + 1,  # one shared block
            "loss_layers": loss_layers,
            "d_model": 16,
            "num_heads": 2,
            "mlp_ratio": 2,
            "positions": positions,
            "readout": readout,
            "dtype": "float32",
        }
    )
    model = transformer.make_transformer(cfg, T)
    init = jax.jit(functools.partial(transformer.init_transformer, model, context=T))
    return model, init(jax.random.key(0))


def _tokens(b=2, length=T, seed=1):
    return jax.random.randint(jax.random.key(seed), (b, length), 0, text.NUM_BYTES)


def test_causal_mask_blocks():
    m = np.asarray(transformer.causal_mask(3, prefix=2))
    np.testing.assert_array_equal(m, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


@pytest.mark.parametrize("kw", MODELS)
def test_language_model_pass_is_causal(fast_compile, kw):
    model, params = _model(**kw)
    x = _tokens()
    # Copy j changes token j: the logits before j must not move, those from j on must.
    changed = [x.at[:, j].set((x[:, j] + 7) % text.NUM_BYTES) for j in range(T)]
    apply = jax.jit(jax.vmap(lambda s: model.apply({"params": params}, s)[0]))
    out = apply(jnp.stack([x, *changed]))
    logits, others = out[0], out[1:]
    for j in range(1, T):
        np.testing.assert_allclose(others[j][:, :j], logits[:, :j], atol=1e-6)
        assert not np.allclose(others[j][:, j:], logits[:, j:], atol=1e-4)


@pytest.mark.parametrize("kw", MODELS)
def test_loss_pass_is_causal_and_the_loss_token_sees_everything(fast_compile, kw):
    model, params = _model(**kw)
    preds = jax.nn.softmax(jax.random.normal(jax.random.key(2), (2, T, V)))
    seq = jnp.concatenate(
        [jax.nn.one_hot(_tokens(), V), preds, jax.nn.one_hot(jnp.full((2, 1), text.LOSS), V)], 1
    )
    new = jax.nn.softmax(jax.random.normal(jax.random.key(3), (T, 2, V)))
    changed = [seq.at[:, T + i].set(new[i]) for i in range(T)]  # prediction i changed
    apply = jax.jit(jax.vmap(lambda s: model.apply({"params": params}, s, stack="loss")[0]))
    out = apply(jnp.stack([seq, *changed]))
    scores, others = out[0], out[1:]
    for i in range(T):
        j = T + i
        np.testing.assert_allclose(others[i][:, :j], scores[:, :j], atol=1e-6)
        assert np.all(np.abs(others[i][:, -1] - scores[:, -1]) > 0)
