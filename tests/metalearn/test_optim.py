"""Optimizers from config: Adam refused without eps_root when differentiated, schedules."""

import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from metalearn import bilevel
from metalearn.optim import make_lookahead, make_optimizer

PARAMS = {"w": jnp.zeros(3)}


def test_adam_without_eps_root_is_refused_when_differentiated():
    cfg = ml_collections.ConfigDict({"name": "adam", "lr": 1e-3})
    plain = make_optimizer(cfg)  # fine when nothing differentiates through it...
    with pytest.raises(ValueError, match="eps_root > 0.*--config.inner.optimizer.eps_root=1e-8"):
        make_optimizer(cfg, differentiated=True)  # ...refused when built to be
    cfg.weight_decay = 1e-4  # also inside the weight-decay chain
    with pytest.raises(ValueError, match="eps_root"):
        make_optimizer(cfg, differentiated=True)
    # The heart's probe agrees with both decisions.
    with pytest.raises(ValueError, match="eps_root"):
        bilevel.check_differentiable_optimizer(plain, PARAMS)
    cfg.eps_root = 1e-8
    bilevel.check_differentiable_optimizer(make_optimizer(cfg, differentiated=True), PARAMS)


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov"])
def test_the_other_optimizers_are_differentiable_as_they_are(name):
    opt = make_optimizer(ml_collections.ConfigDict({"name": name, "lr": 0.1}), differentiated=True)
    bilevel.check_differentiable_optimizer(opt, PARAMS)


def _lrs(cfg, steps):
    opt = make_optimizer(cfg)
    params = jnp.zeros(())
    state = opt.init(params)
    seen = []
    for _ in range(steps):
        updates, state = opt.update(jnp.ones(()), state, params)
        seen.append(float(-updates))
    return seen


def test_step_and_cosine_schedules_count_optimizer_steps():
    cfg = ml_collections.ConfigDict(
        {
            "name": "sgd",
            "lr": 1.0,
            "schedule": {"name": "step", "steps": 10, "boundaries": (0.5,), "factor": 0.1},
        }
    )
    np.testing.assert_allclose(_lrs(cfg, 7), [1.0] * 5 + [0.1] * 2, rtol=1e-6)
    cfg.schedule.name = "cosine"
    assert abs(_lrs(cfg, 10)[-1]) < 0.03  # the last step of a 10-step cosine decay
    cfg.schedule.name = "linear"
    with pytest.raises(ValueError, match="Unknown schedule 'linear'"):
        make_optimizer(cfg)


def test_an_unknown_optimizer_names_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown optimizer 'adamw'; choose one of \('sgd'"):
        make_optimizer(ml_collections.ConfigDict({"name": "adamw", "lr": 1e-3}))


def test_clipping_options_clip_first_and_are_validated():
    grads = {"w": jnp.array([30.0, -0.5, 4.0])}
    cfg = ml_collections.ConfigDict({"name": "sgd", "lr": 1.0, "clip_value": 10.0})
    updates, _ = make_optimizer(cfg).update(grads, make_optimizer(cfg).init(PARAMS), PARAMS)
    np.testing.assert_allclose(updates["w"], [-10.0, 0.5, -4.0])
    cfg = ml_collections.ConfigDict({"name": "sgd", "lr": 1.0, "clip_norm": 1.0})
    updates, _ = make_optimizer(cfg).update(grads, make_optimizer(cfg).init(PARAMS), PARAMS)
    np.testing.assert_allclose(np.linalg.norm(updates["w"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(updates["w"], -grads["w"] / np.linalg.norm(grads["w"]), rtol=1e-6)
    cfg.clip_norm = -1.0
    with pytest.raises(ValueError, match="clip_value and clip_norm must be positive"):
        make_optimizer(cfg)


def test_lookahead_from_config_is_the_momentum_displacement_at_the_scheduled_rate():
    cfg = ml_collections.ConfigDict(
        {
            "name": "nesterov",
            "lr": 0.1,
            "momentum": 0.8,
            "weight_decay": 0.5,
            "schedule": {"name": "step", "steps": 10, "boundaries": (0.5,), "factor": 0.1},
        }
    )
    g, theta = {"w": jnp.array([1.0, -2.0])}, {"w": jnp.array([4.0, 2.0])}
    look = make_lookahead("momentum", cfg)
    for step, lr in ((0, 0.1), (7, 0.01)):
        want = -lr / (1 - 0.8) * (g["w"] + 0.5 * theta["w"])
        np.testing.assert_allclose(look(g, theta, jnp.int32(step))["w"], want, rtol=1e-6)
    cfg.name, cfg.weight_decay = "sgd", 0.0  # plain SGD: its momentum key is not used
    np.testing.assert_allclose(make_lookahead("momentum", cfg)(g, theta, 0)["w"], -0.1 * g["w"])
    assert make_lookahead("none", cfg) is None
    with pytest.raises(ValueError, match=r"Unknown lookahead 'adam'; choose one of \('none'"):
        make_lookahead("adam", cfg)
    cfg.name, cfg.eps_root = "adam", 1e-8
    with pytest.raises(ValueError, match="needs an SGD-family inner optimizer"):
        make_lookahead("momentum", cfg)


def test_the_probe_refuses_adam_only_and_warns_of_what_it_cannot_vouch_for():
    # adafactor has no eps_root; its meta-gradient is finite wherever a tensor's gradient
    # is not all zero: accepted, with a warning of where it is not.
    with pytest.warns(UserWarning, match="not finite at a zero gradient .*adafactor"):
        bilevel.check_differentiable_optimizer(optax.adafactor(1e-3), PARAMS)
    # Lion's sign update: a meta-gradient of exactly zero, named.
    with pytest.warns(UserWarning, match="exactly zero.*optax.lion"):
        bilevel.check_differentiable_optimizer(optax.lion(1e-4), PARAMS)
    # A schedule that starts at 0 is not mistaken for a sign update.
    warmup = optax.sgd(optax.linear_schedule(0.0, 0.1, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bilevel.check_differentiable_optimizer(warmup, PARAMS)

    def needs_vectors(g, state, params):
        return jax.tree.map(lambda x: x @ jnp.ones((3, 3)), g), state

    custom = optax.GradientTransformation(lambda p: optax.EmptyState(), needs_vectors)
    with pytest.warns(UserWarning, match="Could not check this inner optimizer.*unprobed"):
        bilevel.check_differentiable_optimizer(custom, PARAMS)
    with warnings.catch_warnings():  # skipped on request, Adam's refusal included
        warnings.simplefilter("error")
        bilevel.check_differentiable_optimizer(bilevel.unprobed(custom), PARAMS)
        bilevel.check_differentiable_optimizer(bilevel.unprobed(optax.adam(1e-3)), PARAMS)
    with pytest.raises(ValueError, match="eps_root"):  # still refused without the mark
        bilevel.check_differentiable_optimizer(optax.adamw(1e-3), PARAMS)
