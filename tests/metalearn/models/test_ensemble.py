"""The MLP ensemble dynamics model: normalisation, its step, and fitting it."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from metalearn.models import ensemble
from metalearn.tasks import replay


def test_normalisation_stats_read_only_the_valid_rows(fast_compile):
    s = jnp.asarray([[1.0, 2.0], [3.0, 6.0]])
    buffer = replay.buffer_add(replay.buffer_init(8, 2, 1), s, jnp.asarray([[1.0], [-1.0]]), s + 1)
    stats = jax.jit(ensemble.normalisation_stats)(buffer)
    np.testing.assert_allclose(stats["in_mean"], [2.0, 4.0, 0.0])
    np.testing.assert_allclose(stats["in_std"], [1.0, 2.0, 1.0], rtol=1e-5)
    np.testing.assert_allclose(stats["out_mean"], [1.0, 1.0])


def test_ensemble_step_is_the_state_plus_the_members_mean_delta(fast_compile):
    net = ensemble.dynamics_network(2, (8,), "elu")
    s, a = jnp.asarray([0.3, -0.2]), jnp.asarray([0.7])

    @jax.jit
    def step_and_deltas(key):
        model = ensemble.init_ensemble(net, key, 3, 2, 1)
        model["stats"]["out_std"] = jnp.asarray([0.5, 2.0])
        model["stats"]["out_mean"] = jnp.asarray([0.1, -0.1])
        deltas = jax.vmap(lambda p: net.apply(p, jnp.concatenate([s, a])))(model["params"])
        return ensemble.ensemble_step(net, model, s, a), deltas

    step, deltas = step_and_deltas(jax.random.key(0))
    expected = s + np.mean(deltas, axis=0) * np.asarray([0.5, 2.0]) + np.asarray([0.1, -0.1])
    np.testing.assert_allclose(step, expected, rtol=1e-6)
    assert deltas.shape == (3, 2)
    assert not np.allclose(deltas[0], deltas[1])  # the members start apart


def test_ensemble_fit_learns_a_linear_system(fast_compile):
    a = jnp.asarray([[0.9, 0.2], [-0.1, 0.8]])
    b = jnp.asarray([[0.5], [1.0]])
    k1, k2 = jax.random.split(jax.random.key(0))
    s = jax.random.normal(k1, (256, 2))
    u = jax.random.normal(k2, (256, 1))
    s2 = s @ a.T + u @ b.T
    buffer = replay.buffer_add(replay.buffer_init(256, 2, 1), s, u, s2)
    net = ensemble.dynamics_network(2, (16, 16), "elu")
    model = ensemble.init_ensemble(net, jax.random.key(1), 2, 2, 1)
    opt = optax.adam(3e-3)

    @jax.jit
    def fit_and_error(model, opt_state, key):
        model, _, losses = ensemble.fit_ensemble(
            net, model, opt_state, buffer, key, optimizer=opt, num_steps=300, batch_size=32
        )
        pred = jax.vmap(lambda x, y: ensemble.ensemble_step(net, model, x, y))(s[:64], u[:64])
        return losses, jnp.mean((pred - s2[:64]) ** 2) / jnp.mean((s2[:64] - s[:64]) ** 2)

    losses, error = fit_and_error(model, opt.init(model["params"]), jax.random.key(2))
    assert float(losses[-20:].mean()) < 0.05 * float(losses[:5].mean())
    assert float(error) < 0.05
