"""AdaLFL's lock-step and initialisation steps, on a data-free problem."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from metalearn import bilevel
from metalearn.algorithms import adalfl
from metalearn.losses import learned
from metalearn.state import init_inner_state, init_meta_state


def _problem():
    """Linear regression θ ∈ R^3 with a 2×8 learned loss; the task loss is the MSE."""
    cfg = learned.default_loss_net_config()
    cfg.hidden = (8, 8)
    cfg.activation = "smooth_leaky_relu"
    loss_fn = learned.learned_loss_fn(cfg)
    x = jax.random.normal(jax.random.key(0), (6, 3))
    batch = {"x": x, "y": x @ jnp.array([[1.0], [-2.0], [0.5]])}
    meta_batch = {"x": x[::-1] * 0.5, "y": batch["y"][::-1] * 0.5}

    def inner_loss(params, model_state, phi, b, key):
        del key
        return loss_fn(phi, b["y"], b["x"] @ params), (model_state, {})

    def outer_loss(params, model_state, b, key):
        del model_state, key
        return jnp.mean((b["x"] @ params - b["y"]) ** 2)

    phi = learned.init_learned_loss(cfg, jax.random.key(1))
    return inner_loss, outer_loss, phi, batch, meta_batch


@pytest.mark.parametrize("estimator", ["unrolled", "first_order"])
def test_lockstep_is_one_inner_step_then_one_meta_step_through_it(estimator):
    inner_loss, outer_loss, phi, batch, meta_batch = _problem()
    opt = optax.sgd(0.1, momentum=0.9, nesterov=True)
    meta_opt = optax.adam(1e-2)
    state = init_inner_state(jnp.zeros((3, 1)) + 0.1, opt)
    meta = init_meta_state(phi, meta_opt)
    key = jax.random.key(2)
    new_state, new_meta, metrics = adalfl.lockstep(
        state,
        meta,
        batch,
        meta_batch,
        key,
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=opt,
        meta_optimizer=meta_opt,
        estimator=estimator,
    )
    # θ_{t+1} is the plain inner step taken with φ_t.
    expected, _ = bilevel.inner_step(
        state, phi, batch, jax.random.split(key)[0], inner_loss=inner_loss, optimizer=opt
    )
    chex.assert_trees_all_close(new_state.params, expected.params, rtol=1e-6)

    # φ_{t+1} is one Adam step along ∇_φ L_task(θ_{t+1}(φ)).
    def task_after_step(p):
        s, _ = bilevel.inner_step(
            state,
            p,
            batch,
            None,
            inner_loss=inner_loss,
            optimizer=opt,
            first_order=estimator == "first_order",
        )
        return outer_loss(s.params, None, meta_batch, None)

    loss, grads = jax.value_and_grad(task_after_step)(phi)
    np.testing.assert_allclose(metrics["meta/loss"], loss, rtol=1e-6)
    updates, _ = meta_opt.update(grads, meta.opt_state, phi)
    chex.assert_trees_all_close(new_meta.params, optax.apply_updates(phi, updates), rtol=1e-5)
    assert int(new_meta.step) == 1 and int(new_state.step) == 1
    assert float(optax.global_norm(grads)) > 0


def test_first_order_equals_exact_for_one_step_from_a_carried_state():
    # θ_t is a constant of φ_t, so dθ_{t+1}/dφ = −α ∂²L/∂θ∂φ has no θθ term to drop.
    inner_loss, outer_loss, phi, batch, meta_batch = _problem()
    opt, meta_opt = optax.sgd(0.1), optax.sgd(1.0)
    state = init_inner_state(jnp.full((3, 1), 0.3), opt)
    meta = init_meta_state(phi, meta_opt)
    kw = dict(inner_loss=inner_loss, outer_loss=outer_loss, optimizer=opt, meta_optimizer=meta_opt)
    key = jax.random.key(0)
    _, exact, _ = adalfl.lockstep(state, meta, batch, meta_batch, key, estimator="unrolled", **kw)
    _, first, _ = adalfl.lockstep(
        state, meta, batch, meta_batch, key, estimator="first_order", **kw
    )
    diff = optax.global_norm(jax.tree.map(jnp.subtract, exact.params, first.params))
    assert float(diff) < 1e-6
    # ... whereas over two steps the θθ term appears and the estimators part ways.
    two = dict(inner_loss=inner_loss, outer_loss=outer_loss, optimizer=opt)
    batches = jax.tree.map(lambda x: jnp.stack([x, x]), batch)
    keys = jax.random.split(key)
    g_exact = bilevel.meta_grad(phi, state, batches, keys, meta_batch, key, **two)[1]
    g_first = bilevel.meta_grad(
        phi, state, batches, keys, meta_batch, key, estimator="first_order", **two
    )[1]
    assert float(optax.global_norm(jax.tree.map(jnp.subtract, g_exact, g_first))) > 1e-6


def test_offline_init_step_discards_theta_and_equals_lockstep_on_phi():
    inner_loss, outer_loss, phi, batch, meta_batch = _problem()
    opt, meta_opt = optax.sgd(0.1), optax.adam(1e-2)
    fresh = init_inner_state(jnp.zeros((3, 1)), opt)
    meta = init_meta_state(phi, meta_opt)
    kw = dict(inner_loss=inner_loss, outer_loss=outer_loss, optimizer=opt, meta_optimizer=meta_opt)
    key = jax.random.key(3)
    new_meta, metrics = adalfl.offline_init_step(meta, fresh, batch, meta_batch, key, **kw)
    _, expected, _ = adalfl.lockstep(fresh, meta, batch, meta_batch, key, **kw)
    chex.assert_trees_all_close(new_meta.params, expected.params)
    assert "meta/loss" in metrics


def test_online_estimator_must_differentiate_one_step():
    adalfl.check_online_estimator("unrolled")
    with pytest.raises(ValueError, match="single inner step"):
        adalfl.check_online_estimator("truncated")
    with pytest.raises(ValueError, match="identical to 'unrolled'"):
        adalfl.check_online_estimator("first_order")


def test_step_and_cosine_schedules_count_optimizer_steps():
    from metalearn.optim import make_optimizer

    cfg = ml_collections.ConfigDict(
        {
            "name": "sgd",
            "lr": 1.0,
            "schedule": {"name": "step", "steps": 10, "boundaries": (0.5,), "factor": 0.1},
        }
    )
    opt = make_optimizer(cfg)
    params = jnp.zeros(())
    state = opt.init(params)
    seen = []
    for _ in range(7):
        updates, state = opt.update(jnp.ones(()), state, params)
        seen.append(float(-updates))
    np.testing.assert_allclose(seen, [1.0] * 5 + [0.1] * 2, rtol=1e-6)
    cfg.schedule.name = "cosine"
    opt = make_optimizer(cfg)
    state = opt.init(params)
    for _ in range(10):
        updates, state = opt.update(jnp.ones(()), state, params)
    assert abs(float(updates)) < 0.03  # the last step of a 10-step cosine decay
    cfg.schedule.name = "linear"
    with pytest.raises(ValueError, match="Unknown schedule 'linear'"):
        make_optimizer(cfg)


class _TinyBNNet(nn.Module):
    """Conv → batch norm → ReLU → dense: the smallest net with batch statistics."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(nn.relu(x).mean((1, 2)))


@pytest.mark.parametrize(
    "optimizer",
    [
        optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9, nesterov=True)),
        optax.adam(0.01, eps_root=1e-8),
    ],
    ids=["nesterov_wd", "adam"],
)
def test_jvp_and_backprop_meta_gradients_agree_through_batch_norm(optimizer, float64, fast_compile):
    net = _TinyBNNet()
    cfg = learned.default_loss_net_config()
    cfg.hidden = (8, 8)
    cfg.activation = "smooth_leaky_relu"
    loss_fn = learned.learned_loss_fn(cfg)
    x = jax.random.normal(jax.random.key(0), (6, 5, 5, 2), jnp.float64)
    labels = jnp.array([0, 1, 2, 0, 1, 2])
    batch, meta_batch = {"x": x, "y": labels}, {"x": x[::-1] * 0.7, "y": labels}
    to64 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)  # noqa: E731
    variables = to64(net.init(jax.random.key(1), x, train=False))
    params, model_state = variables["params"], {"batch_stats": variables["batch_stats"]}

    def inner_loss(p, ms, phi, b, key):
        del key
        logits, ms = net.apply({"params": p, **ms}, b["x"], train=True, mutable=["batch_stats"])
        probs = jax.nn.softmax(logits)
        return loss_fn(phi, jax.nn.one_hot(b["y"], 3), probs), (ms, {})

    def outer_loss(p, ms, b, key):
        del key
        logits, _ = net.apply({"params": p, **ms}, b["x"], train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()

    phi = to64(learned.init_learned_loss(cfg, jax.random.key(2), num_outputs=3))
    state = init_inner_state(params, optimizer, model_state)
    # One plain step first, so that momentum / Adam moments are non-zero.
    state, _ = bilevel.inner_step(
        state, phi, batch, None, inner_loss=inner_loss, optimizer=optimizer
    )
    kw = dict(inner_loss=inner_loss, outer_loss=outer_loss, optimizer=optimizer)
    key = jax.random.key(3)
    by_jvp = bilevel.one_step_meta_grad(phi, state, batch, key, meta_batch, key, **kw)
    by_backprop = bilevel.meta_grad(
        phi, state, jax.tree.map(lambda v: v[None], batch), key[None], meta_batch, key, **kw
    )
    np.testing.assert_allclose(by_jvp[0], by_backprop[0], rtol=1e-10)
    chex.assert_trees_all_close(by_jvp[1], by_backprop[1], rtol=1e-8, atol=1e-12)
    chex.assert_trees_all_close(by_jvp[2], by_backprop[2], rtol=1e-10, atol=1e-12)
    assert float(optax.global_norm(by_jvp[1])) > 1e-6
