"""The heart: meta-gradients against finite differences and against their definitions.

All problems here are data-free: θ ∈ R^4, φ ∈ R^4, an inner loss that couples them
smoothly and non-quadratically, and a quadratic outer loss.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from metalearn import bilevel
from metalearn.optim import make_optimizer
from metalearn.state import InnerState, init_inner_state, init_meta_state


def inner_loss(params, model_state, phi, batch, key):
    del key
    theta = params["w"]
    value = (
        jnp.sum(jax.nn.softplus(phi["a"]) * (theta - batch) ** 2)
        + jnp.sum(jnp.sin(phi["b"] * theta))
        + 0.1 * jnp.sum(theta**4)
    )
    return value, (model_state, {"theta_norm": jnp.linalg.norm(theta)})


def outer_loss(params, model_state, batch, key):
    del model_state, key
    return 0.5 * jnp.sum((params["w"] - batch) ** 2)


def problem(k, dtype=jnp.float32):
    rng = np.random.default_rng(0)
    phi = {"a": jnp.asarray(rng.normal(size=4), dtype), "b": jnp.asarray(rng.normal(size=4), dtype)}
    theta = {"w": jnp.asarray(rng.normal(size=4), dtype)}
    batches = jnp.asarray(rng.normal(size=(k, 4)), dtype)
    target = jnp.asarray(rng.normal(size=4), dtype)
    keys = jax.random.split(jax.random.key(0), k)
    return phi, theta, batches, target, keys


OPTIMIZERS = {
    "sgd": optax.sgd(0.05),
    "momentum": optax.sgd(0.05, momentum=0.9),
    # eps large enough that even the first step (≈ sign(g) otherwise) depends on φ.
    "adam": optax.adam(0.05, eps=0.1, eps_root=1e-8),
}


def meta_loss_fn(opt, estimator="unrolled", remat=False):
    return functools.partial(
        bilevel.meta_loss,
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=opt,
        estimator=estimator,
        remat=remat,
    )


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_meta_gradient_matches_finite_differences(float64, k, opt_name):
    opt = OPTIMIZERS[opt_name]
    phi, theta, batches, target, keys = problem(k, jnp.float64)
    state = init_inner_state(theta, opt)
    f = lambda p: meta_loss_fn(opt)(p, state, batches, keys, target, keys[0])[0]  # noqa: E731
    _, grads, _, _ = bilevel.meta_grad(
        phi,
        state,
        batches,
        keys,
        target,
        keys[0],
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=opt,
        estimator="unrolled",
    )
    flat, unravel = jax.flatten_util.ravel_pytree(phi)
    eps = 1e-6
    fd = np.array(
        [
            (f(unravel(flat.at[i].add(eps))) - f(unravel(flat.at[i].add(-eps)))) / (2 * eps)
            for i in range(flat.size)
        ]
    )
    analytic = np.asarray(jax.flatten_util.ravel_pytree(grads)[0])
    assert np.abs(analytic).max() > 1e-3  # a meaningful, non-zero gradient
    np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-8)


def test_first_order_matches_its_definition(float64):
    """FO: dθ_K/dφ = Σ_k ∂u(g(θ_k, φ))/∂φ with θ_k held fixed (SGD: −α Σ_k ∂g/∂φ(θ_k))."""
    k, lr = 3, 0.05
    opt = optax.sgd(lr)
    phi, theta, batches, target, keys = problem(k, jnp.float64)
    state = init_inner_state(theta, opt)
    _, grads, final, _ = bilevel.meta_grad(
        phi,
        state,
        batches,
        keys,
        target,
        keys[0],
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=opt,
        estimator="first_order",
    )
    # The definition, computed by hand: the trajectory, then the sum of mixed terms.
    thetas, th = [], theta
    for i in range(k):
        thetas.append(th)
        g = jax.grad(lambda t, i=i: inner_loss(t, {}, phi, batches[i], None)[0])(th)
        th = jax.tree.map(lambda a, b: a - lr * b, th, g)
    d_outer = jax.grad(outer_loss)(th, {}, target, None)
    expected = jax.tree.map(jnp.zeros_like, phi)
    for i, th_i in enumerate(thetas):

        def g_of_phi(p, th_i=th_i, i=i):
            return jax.grad(lambda t: inner_loss(t, {}, p, batches[i], None)[0])(th_i)

        _, vjp = jax.vjp(g_of_phi, phi)
        (term,) = vjp(jax.tree.map(lambda d: -lr * d, d_outer))
        expected = jax.tree.map(jnp.add, expected, term)
    chex_close(final.params, th)
    chex_close(grads, expected)
    # ...and it is not the exact gradient on this non-quadratic problem.
    _, exact, _, _ = bilevel.meta_grad(
        phi,
        state,
        batches,
        keys,
        target,
        keys[0],
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=opt,
        estimator="unrolled",
    )
    assert not np.allclose(
        jax.flatten_util.ravel_pytree(exact)[0], jax.flatten_util.ravel_pytree(grads)[0], rtol=1e-3
    )


def chex_close(a, b, rtol=1e-6, atol=1e-8):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_scan_matches_python_loop(opt_name):
    opt = OPTIMIZERS[opt_name]
    phi, theta, batches, target, keys = problem(5)
    state = init_inner_state(theta, opt)

    def looped(p):
        s = state
        for i in range(5):
            s, _ = bilevel.inner_step(
                s, p, batches[i], keys[i], inner_loss=inner_loss, optimizer=opt
            )
        return outer_loss(s.params, {}, target, None), s

    (loop_loss, loop_state), loop_grads = jax.value_and_grad(looped, has_aux=True)(phi)
    scan_loss, scan_grads, scan_state, metrics = bilevel.meta_grad(
        phi,
        state,
        batches,
        keys,
        target,
        keys[0],
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=opt,
    )
    assert metrics["inner/loss"].shape == (5,) and metrics["theta_norm"].shape == (5,)
    assert int(scan_state.step) == 5
    chex_close(scan_loss, loop_loss, rtol=1e-5, atol=1e-6)
    chex_close(scan_state.params, loop_state.params, rtol=1e-5, atol=1e-6)
    chex_close(scan_grads, loop_grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("estimator", ["unrolled", "first_order"])
def test_remat_matches_no_remat(estimator):
    opt = OPTIMIZERS["adam"]
    phi, theta, batches, target, keys = problem(4)
    state = init_inner_state(theta, opt)
    out = [
        bilevel.meta_grad(
            phi,
            state,
            batches,
            keys,
            target,
            keys[0],
            inner_loss=inner_loss,
            outer_loss=outer_loss,
            optimizer=opt,
            estimator=estimator,
            remat=remat,
        )[1]
        for remat in (False, True)
    ]
    chex_close(out[0], out[1], rtol=1e-5, atol=1e-7)


def _windowed(phi, theta, batches, target, keys, window, meta_opt, opt):
    """windowed_meta_steps on one task (task axis of 1)."""
    k = batches.shape[0]
    add = lambda t: jax.tree.map(lambda x: x[None], t)  # noqa: E731
    return bilevel.windowed_meta_steps(
        init_meta_state(phi, meta_opt),
        add(init_inner_state(theta, opt)),
        add(batches),
        keys[None],
        jnp.broadcast_to(target, (1, k // window, 4)),
        jnp.broadcast_to(keys[:1], (1, k // window)),
        window=window,
        meta_optimizer=meta_opt,
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=opt,
        estimator="truncated",
    )


def test_truncated_window_covering_the_unroll_is_the_full_unroll():
    opt, meta_opt = OPTIMIZERS["momentum"], optax.sgd(0.1)
    phi, theta, batches, target, keys = problem(4)
    meta_state, _, metrics = _windowed(phi, theta, batches, target, keys, 4, meta_opt, opt)
    loss, grads, _, _ = bilevel.meta_grad(
        phi,
        init_inner_state(theta, opt),
        batches,
        keys,
        target,
        keys[0],
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=opt,
    )
    chex_close(metrics["meta/loss"][0], loss, rtol=1e-6)
    chex_close(meta_state.params, jax.tree.map(lambda p, g: p - 0.1 * g, phi, grads), rtol=1e-5)


def test_truncated_windows_cut_the_gradient_and_carry_the_state():
    opt, meta_opt = OPTIMIZERS["sgd"], optax.sgd(0.1)
    phi, theta, batches, target, keys = problem(4)
    meta_state, final, metrics = _windowed(phi, theta, batches, target, keys, 2, meta_opt, opt)
    # By hand: two windows of 2, φ updated in between, the state passed on as a constant.
    p, s = phi, init_inner_state(theta, opt)
    for w in range(2):
        sl = slice(2 * w, 2 * w + 2)
        _, g, s, _ = bilevel.meta_grad(
            p,
            s,
            batches[sl],
            keys[sl],
            target,
            keys[0],
            inner_loss=inner_loss,
            outer_loss=outer_loss,
            optimizer=opt,
        )
        p = jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
    assert metrics["meta/loss"].shape == (2,)
    chex_close(meta_state.params, p, rtol=1e-5, atol=1e-7)
    chex_close(jax.tree.map(lambda x: x[0], final.params), s.params, rtol=1e-5, atol=1e-7)
    # Cutting the gradient matters: the full unroll gives another update.
    full, _, _ = _windowed(phi, theta, batches, target, keys, 4, meta_opt, opt)
    assert not np.allclose(
        jax.flatten_util.ravel_pytree(full.params)[0],
        jax.flatten_util.ravel_pytree(meta_state.params)[0],
        rtol=1e-4,
    )


def test_vmap_over_tasks_matches_each_task_alone():
    opt = OPTIMIZERS["adam"]
    phi, theta, _, target, keys = problem(3)
    rng = np.random.default_rng(1)
    batches = jnp.asarray(rng.normal(size=(4, 3, 4)), jnp.float32)  # 4 tasks × 3 steps
    targets = jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)
    states = jax.tree.map(lambda x: jnp.stack([x] * 4), init_inner_state(theta, opt))
    task_keys = jnp.stack([keys] * 4)
    kw = dict(inner_loss=inner_loss, outer_loss=outer_loss, optimizer=opt)
    loss, grads, finals, _ = bilevel.meta_grad_over_tasks(
        phi, states, batches, task_keys, targets, task_keys[:, 0], **kw
    )
    singles = [
        bilevel.meta_grad(
            phi, init_inner_state(theta, opt), batches[t], keys, targets[t], keys[0], **kw
        )
        for t in range(4)
    ]
    chex_close(loss, np.mean([s[0] for s in singles]), rtol=1e-5)
    chex_close(
        grads, jax.tree.map(lambda *g: sum(g) / 4, *[s[1] for s in singles]), rtol=1e-4, atol=1e-6
    )
    chex_close(finals.params["w"][2], singles[2][2].params["w"], rtol=1e-5)


def test_estimator_choices_are_validated():
    bilevel.check_estimator("unrolled", 5, 5)
    bilevel.check_estimator("truncated", 1, 10)
    bilevel.check_estimator("first_order", 2, 10)
    with pytest.raises(ValueError, match="Unknown gradient estimator"):
        bilevel.check_estimator("implicit", 1, 1)
    with pytest.raises(ValueError, match="must equal the episode length"):
        bilevel.check_estimator("unrolled", 1, 10)
    with pytest.raises(ValueError, match="multiple of the window"):
        bilevel.check_estimator("truncated", 3, 10)
    with pytest.raises(ValueError, match="say estimator='unrolled'"):
        bilevel.check_estimator("truncated", 10, 10)


def test_adam_without_eps_root_is_refused_when_differentiated():
    cfg = ml_collections.ConfigDict({"name": "adam", "lr": 1e-3})
    make_optimizer(cfg)  # fine when nothing differentiates through it
    with pytest.raises(ValueError, match="eps_root"):
        make_optimizer(cfg, differentiated=True)
    # ...and the reason is real: without eps_root the meta-gradient is NaN.
    phi, theta, batches, target, keys = problem(2)
    state = InnerState(
        {"w": jnp.zeros(4)},
        optax.adam(0.05).init({"w": jnp.zeros(4)}),
        {},
        jnp.zeros((), jnp.int32),
    )
    zero_grad_loss = lambda p, ms, ph, b, k: (
        jnp.sum(ph["a"]) * 0.0 * jnp.sum(p["w"]),  # noqa: E731
        (ms, {}),
    )
    _, grads, _, _ = bilevel.meta_grad(
        phi,
        state,
        batches,
        keys,
        target,
        keys[0],
        inner_loss=zero_grad_loss,
        outer_loss=outer_loss,
        optimizer=optax.adam(0.05),
    )
    assert not np.isfinite(np.asarray(grads["a"])).all()
