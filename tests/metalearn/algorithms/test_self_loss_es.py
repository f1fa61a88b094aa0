"""Antithetic ES as Phase 1's meta-gradient on hard tokens (`self_loss.meta_grad`).

On path 'hard' the critic reads the model's argmax tokens, a piecewise-constant function
of θ: the meta-objective L jumps where a token flips, and backpropagation, which sees
only the smooth pieces, misses how θ moves the token choice. ES estimates the gradient of
the Gaussian-smoothed objective L_σ(θ) = E L(θ + ε), ε ~ N(0, σ²I), jumps included.

The reference does not use ES: central differences of L_σ along fixed directions d,
(L(θ + ε + h d) − L(θ + ε − h d)) / 2h averaged over draws of ε shared by both sides
(h = σ/4: the bias, about h²/6σ² of the gradient, is far below the standard errors;
h = σ/2 and σ/8 agree to 1e-3). The same draws give backpropagation's gradient averaged
over the smoothing, E ∇L(θ + ε), which would equal ∇L_σ if L had no jumps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from metalearn import bilevel
from metalearn.algorithms import self_loss
from metalearn.tasks import text

pytestmark = pytest.mark.usefixtures("fast_compile")

V = text.VOCAB_SIZE
CHOICES = 4  # the tokens the model can predict (the others get a logit of −30)
D = 3  # θ: a D×D mixing matrix and a D-vector score head, 12 numbers
T = 4  # context
SIGMA, PAIRS = 0.1, 4
H = SIGMA / 4
ES_DRAWS, REFERENCE_DRAWS = 1500, 3000


class HardToy:
    """The transformer's `apply` protocol with fixed random embeddings: the running mean
    of the embeddings (causal) → tanh(· W) → logits over `CHOICES` tokens (stack 'lm') or
    a score per position (stack 'loss'). θ = {'w', 'head'} is small enough for ES's
    variance, which grows with the number of parameters, to allow a tight check."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.embed = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
        unembed = np.zeros((D, V))
        unembed[:, :CHOICES] = rng.normal(size=(D, CHOICES))
        self.unembed = jnp.asarray(unembed, jnp.float32)
        self.bias = jnp.where(jnp.arange(V) < CHOICES, 0.0, -30.0)[None, None]  # [1, 1, V]

    def init(self, key):
        k1, k2 = jax.random.split(key)
        return {"w": jax.random.normal(k1, (D, D)), "head": jax.random.normal(k2, (D,))}

    def apply(self, variables, inputs, *, stack="lm", cache=None):
        del cache
        p = variables["params"]
        e = self.embed[inputs] if inputs.ndim == 2 else inputs @ self.embed
        length = e.shape[1]
        causal = jnp.tril(jnp.ones((length, length), e.dtype))
        h = jnp.tanh(jnp.einsum("st,btd->bsd", causal / causal.sum(1, keepdims=True), e) @ p["w"])
        if stack == "lm":
            return h @ self.unembed + self.bias, None
        return h @ p["head"], None


def _problem():
    """θ, the Phase 1 arguments on hard tokens with a live critic (one SGD step), and
    `meta_grad` bound to them."""
    model = HardToy()
    theta = model.init(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 2, T + 1), 0, CHOICES)
    outer = jax.random.randint(jax.random.key(2), (2, T + 1), 0, CHOICES)
    keys = jax.random.split(jax.random.key(3), 1)

    def grad(params, estimator, **kw):
        return self_loss.meta_grad(
            params,
            tokens,
            keys,
            outer,
            None,
            model=model,
            spec=self_loss.Spec(path="hard"),
            inner_optimizer=optax.sgd(1.0),
            estimator=estimator,
            **kw,
        )

    return theta, grad


def _mean_se(draws):
    return draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))


@pytest.mark.slow  # 11-13 s of compilation: the default tier is at its 5 minutes
def test_es_sees_the_token_choice_that_backpropagation_misses():
    theta, grad = _problem()
    flat, unravel = ravel_pytree(theta)
    directions = jax.random.normal(jax.random.key(4), (3, flat.size))
    directions = directions / jnp.linalg.norm(directions, axis=1, keepdims=True)

    @jax.jit
    def es(noise_keys):
        def one(noise_key):
            g = grad(theta, bilevel.ES(sigma=SIGMA, pairs=PAIRS), noise_key=noise_key)[1]
            return directions @ ravel_pytree(g)[0]

        return jax.vmap(one)(noise_keys)

    @jax.jit
    def reference(keys):
        def one(key):
            point = flat + SIGMA * jax.random.normal(key, flat.shape)
            loss = lambda x: grad(unravel(x), bilevel.Unrolled())[0]  # noqa: E731
            diff = jax.vmap(lambda d: (loss(point + H * d) - loss(point - H * d)) / (2 * H))
            backprop = ravel_pytree(grad(unravel(point), bilevel.Unrolled())[1])[0]
            return diff(directions), directions @ backprop

        return jax.vmap(one)(keys)

    es_mean, es_se = _mean_se(np.asarray(es(jax.random.split(jax.random.key(5), ES_DRAWS))))
    diffs, backprop = reference(jax.random.split(jax.random.key(6), REFERENCE_DRAWS))
    ref_mean, ref_se = _mean_se(np.asarray(diffs))
    bp_mean, bp_se = _mean_se(np.asarray(backprop))
    se = np.hypot(es_se, ref_se)
    z_es = (es_mean - ref_mean) / se
    z_bp = (bp_mean - ref_mean) / np.hypot(bp_se, ref_se)
    report = dict(es=es_mean, reference=ref_mean, backprop=bp_mean, z_es=z_es, z_bp=z_bp)
    assert np.all(np.abs(z_es) < 3), report
    # The check can fail: a sign error would be off by 2|ref|/se, an ES at half the scale
    # (the antithetic pair not sharing its noise) by |ref|/2se, in some direction > 4.
    assert np.max(np.abs(ref_mean) / se) > 8, report
    # Backpropagation, even averaged over the same smoothing, misses the jumps.
    assert np.max(np.abs(z_bp)) > 5, report


def test_es_needs_its_noise_key_and_refuses_unknown_options():
    theta, grad = _problem()
    with pytest.raises(ValueError, match="noise_key"):
        grad(theta, bilevel.ES())
    # ES's settings are the object's fields: a misspelt one is refused where it is built
    # (by the dataclass) or where a config's options become an estimator.
    with pytest.raises(TypeError, match="sigmma"):
        bilevel.ES(sigmma=0.1)
    with pytest.raises(ValueError, match="Unknown estimator option 'sigmma'. Did you mean 'sigma'"):
        bilevel.estimator_from_config("es", window=1, episode_length=1, options={"sigmma": 0.1})
    with pytest.raises(ValueError, match=r"call self_loss.meta_grad\(\.\.\., estimator=ES\(\)\)"):
        self_loss.meta_objective(
            theta,
            jnp.zeros((1, 2, T + 1), jnp.int32),
            jax.random.split(jax.random.key(0), 1),
            jnp.zeros((2, T + 1), jnp.int32),
            None,
            model=HardToy(),
            spec=self_loss.Spec(path="hard"),
            inner_optimizer=optax.sgd(1.0),
            estimator=bilevel.ES(),
        )
