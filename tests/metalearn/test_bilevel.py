"""The heart: meta-gradients against finite differences and against their definitions.

All problems here are data-free: θ ∈ R^4, φ ∈ R^4 × R^4, an inner loss that couples them
smoothly and non-quadratically, and a quadratic outer loss. Every check runs jitted.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metalearn import bilevel
from metalearn.state import init_inner_state, init_meta_state

# Their time is compilation of small programs: compile them with most optimisations off.
pytestmark = pytest.mark.usefixtures("fast_compile")


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


def bilevel_problem(opt):
    return bilevel.Problem(inner_loss, outer_loss, opt)


def estimate(estimator, prob, phi, state, *args):
    """One task's `estimator.estimate` from a fresh inner state."""
    return estimator.estimate(prob, phi, estimator.init(phi, state), *args)


def flat(tree):
    return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def close(a, b, rtol=1e-6, atol=1e-8):
    chex.assert_trees_all_close(a, b, rtol=rtol, atol=atol)


def test_meta_gradient_matches_finite_differences(float64):
    opt = OPTIMIZERS["adam"]  # stateful and non-linear: SGD is the easy special case
    phi, theta, batches, target, keys = problem(3, jnp.float64)
    state = init_inner_state(theta, opt)
    prob, est = bilevel_problem(opt), bilevel.Unrolled()

    @jax.jit
    def analytic_and_fd(phi):
        f = lambda p: est.loss(prob, p, state, batches, keys, target, keys[0])[0]  # noqa: E731
        grads = estimate(est, prob, phi, state, batches, keys, target, keys[0])[0]
        x, unravel = jax.flatten_util.ravel_pytree(phi)
        eps = 1e-6
        basis = eps * jnp.eye(x.size, dtype=x.dtype)
        fd = jax.vmap(lambda d: (f(unravel(x + d)) - f(unravel(x - d))) / (2 * eps))(basis)
        return jax.flatten_util.ravel_pytree(grads)[0], fd

    analytic, fd = analytic_and_fd(phi)
    assert np.abs(analytic).max() > 1e-3  # a meaningful, non-zero gradient
    np.testing.assert_allclose(analytic, fd, rtol=1e-6, atol=1e-8)


def test_first_order_matches_its_definition(float64):
    """FO: dθ_K/dφ = Σ_k ∂u(g(θ_k, φ))/∂φ with θ_k held fixed (SGD: −α Σ_k ∂g/∂φ(θ_k))."""
    k, lr = 3, 0.05
    opt = optax.sgd(lr)
    phi, theta, batches, target, keys = problem(k, jnp.float64)
    state = init_inner_state(theta, opt)
    prob = bilevel_problem(opt)
    args = (batches, keys, target, keys[0])

    @jax.jit
    def both(phi):
        first, final, _ = estimate(bilevel.FirstOrder(), prob, phi, state, *args)
        exact = estimate(bilevel.Unrolled(), prob, phi, state, *args)[0]
        # The definition, by hand: the trajectory, then the sum of the mixed terms.
        grad_theta = lambda t, p, i: jax.grad(lambda t: inner_loss(t, {}, p, batches[i], None)[0])(  # noqa: E731
            t
        )
        thetas, th = [], theta
        for i in range(k):
            thetas.append(th)
            th = jax.tree.map(lambda a, b: a - lr * b, th, grad_theta(th, phi, i))
        d_outer = jax.grad(outer_loss)(th, {}, target, None)
        expected = jax.tree.map(jnp.zeros_like, phi)
        for i, th_i in enumerate(thetas):
            _, vjp = jax.vjp(lambda p, th_i=th_i, i=i: grad_theta(th_i, p, i), phi)
            (term,) = vjp(jax.tree.map(lambda d: -lr * d, d_outer))
            expected = jax.tree.map(jnp.add, expected, term)
        return first, final.inner.params, exact, expected, th

    first, final, exact, expected, th = both(phi)
    close(final, th)
    close(first, expected)
    # ...and it is not the exact gradient on this non-quadratic problem.
    assert not np.allclose(flat(exact), flat(first), rtol=1e-3)


def test_scan_matches_python_loop():
    opt = OPTIMIZERS["adam"]  # an optimizer state carried through the scan
    phi, theta, batches, target, keys = problem(5)
    state = init_inner_state(theta, opt)
    prob = bilevel_problem(opt)

    def looped(p):
        s = state
        for i in range(5):
            s, _ = bilevel.inner_step(
                s, p, batches[i], keys[i], inner_loss=inner_loss, optimizer=opt
            )
        return outer_loss(s.params, {}, target, None), s

    @jax.jit
    def both(phi):
        loop = jax.value_and_grad(looped, has_aux=True)(phi)
        scan = estimate(bilevel.Unrolled(), prob, phi, state, batches, keys, target, keys[0])
        return loop, scan

    ((loop_loss, loop_state), loop_grads), (scan_grads, scan_state, metrics) = both(phi)
    scan_state = scan_state.inner
    assert metrics["inner/loss"].shape == (5,) and metrics["theta_norm"].shape == (5,)
    assert int(scan_state.step) == 5
    close(metrics["meta/loss"], loop_loss, rtol=1e-5, atol=1e-6)
    close(scan_state.params, loop_state.params, rtol=1e-5, atol=1e-6)
    close(scan_grads, loop_grads, rtol=1e-4, atol=1e-6)


# The checkpoint primitive as a jaxpr prints it: `remat2[...]` (JAX 0.4-0.10), `checkpoint[...]`.
CHECKPOINT = re.compile(r"\b(remat\w*|checkpoint)\[")


@pytest.mark.parametrize(
    "make_estimator",
    [
        lambda remat: bilevel.Unrolled(remat=remat),
        lambda remat: bilevel.LastWindow(steps=2, remat=remat),
    ],
    ids=["unrolled", "last_window"],
)
def test_remat_checkpoints_the_steps_and_changes_no_number(make_estimator):
    opt = OPTIMIZERS["adam"]
    phi, theta, batches, target, keys = problem(4)
    state = init_inner_state(theta, opt)
    prob = bilevel_problem(opt)

    def grads(phi, remat):
        est = make_estimator(remat)
        return estimate(est, prob, phi, state, batches, keys, target, keys[0])[0]

    program = {r: str(jax.make_jaxpr(grads, static_argnums=1)(phi, r)) for r in (False, True)}
    assert CHECKPOINT.search(program[True])  # the rematerialised program holds the checkpoint
    assert not CHECKPOINT.search(program[False])  # ...and only it
    if isinstance(make_estimator(False), bilevel.Unrolled):
        # The same numbers (last_window's tail is the same unroll).
        both = jax.jit(lambda p: (grads(p, False), grads(p, True)))(phi)
        close(both[0], both[1], rtol=1e-5, atol=1e-7)


def test_last_window_differentiates_only_the_last_steps(float64):
    """last_window: the forward pass of the full unroll; the gradient of the last W steps
    from the head's result; an identity Jacobian from θ₀ to the window's start."""
    opt = OPTIMIZERS["momentum"]
    phi, theta, batches, target, keys = problem(4, jnp.float64)
    prob = bilevel_problem(opt)

    @jax.jit
    def run(phi, theta):
        state = init_inner_state(theta, opt)
        lw = lambda p, th: bilevel.LastWindow(steps=1).loss(  # noqa: E731
            prob, p, init_inner_state(th, opt), batches, keys, target, keys[0]
        )
        (loss, (final, metrics)), (g_phi, g_theta) = jax.value_and_grad(
            lw, argnums=(0, 1), has_aux=True
        )(phi, theta)
        full = estimate(bilevel.Unrolled(), prob, phi, state, batches, keys, target, keys[0])
        # By hand: three steps forward, then the gradient of the last one from there.
        head, _ = bilevel.unroll(
            state, phi, batches[:3], keys[:3], inner_loss=inner_loss, optimizer=opt
        )
        tail = (
            lambda p, th: bilevel.Unrolled().loss(  # noqa: E731
                prob, p, head.replace(params=th), batches[3:], keys[3:], target, keys[0]
            )[0]
        )
        by_hand = jax.grad(tail, argnums=(0, 1))(phi, head.params)
        return loss, final, metrics, g_phi, g_theta, full, by_hand

    loss, final, metrics, g_phi, g_theta, full, (hand_phi, hand_theta) = run(phi, theta)
    full_grads, full_state, full_metrics = full
    # The same forward pass as the full unroll, metrics over all K steps...
    close(loss, full_metrics["meta/loss"], rtol=1e-12)
    close(final.params, full_state.inner.params, rtol=1e-12)
    assert metrics["inner/loss"].shape == (4,)
    close(metrics["inner/loss"], full_metrics["inner/loss"], rtol=1e-12)
    # ...the gradient of the last step only, straight through to θ₀...
    close(g_phi, hand_phi, rtol=1e-10)
    close(g_theta, hand_theta, rtol=1e-10)
    # ...which is not the exact gradient.
    assert not np.allclose(flat(g_phi), flat(full_grads), rtol=1e-3)


def _windowed(phi, theta, batches, target, keys, meta_opt, opt, estimator):
    """windowed_meta_steps on one task (task axis of 1), from a fresh start."""
    k = batches.shape[0]
    windows = k // (estimator.window or k)
    add = lambda t: jax.tree.map(lambda x: x[None], t)  # noqa: E731
    return bilevel.windowed_meta_steps(
        init_meta_state(phi, meta_opt),
        estimator.init_tasks(phi, add(init_inner_state(theta, opt))),
        add(batches),
        keys[None],
        jnp.broadcast_to(target, (1, windows, 4)),
        jnp.broadcast_to(keys[:1], (1, windows)),
        problem=bilevel_problem(opt),
        estimator=estimator,
        meta_optimizer=meta_opt,
    )


def test_windows_cut_the_gradient_and_carry_the_state():
    opt, meta_opt = OPTIMIZERS["sgd"], optax.sgd(0.1)
    phi, theta, batches, target, keys = problem(4)
    prob, unrolled = bilevel_problem(opt), bilevel.Unrolled()

    @jax.jit
    def run(phi):
        args = (phi, theta, batches, target, keys, meta_opt, opt)
        truncated = _windowed(*args, bilevel.Truncated(window=2))
        full = _windowed(*args, unrolled)
        # By hand: two windows of 2, φ updated in between, the state passed on as a constant.
        p, s = phi, init_inner_state(theta, opt)
        for w in range(2):
            sl = slice(2 * w, 2 * w + 2)
            g, s, _ = estimate(unrolled, prob, p, s, batches[sl], keys[sl], target, keys[0])
            s = s.inner
            p = jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
        one = estimate(
            unrolled, prob, phi, init_inner_state(theta, opt), batches, keys, target, keys[0]
        )
        return truncated, full, p, s, one

    (meta_state, final, metrics), (full, _, full_metrics), p, s, one = run(phi)
    grads, _, one_metrics = one
    assert metrics["meta/loss"].shape == (2,)
    close(meta_state.params, p, rtol=1e-5, atol=1e-7)
    close(jax.tree.map(lambda x: x[0], final.inner.params), s.params, rtol=1e-5, atol=1e-7)
    # One window over the whole unroll is one meta step on the full meta-gradient...
    close(full_metrics["meta/loss"][0], one_metrics["meta/loss"], rtol=1e-6)
    close(full.params, jax.tree.map(lambda p, g: p - 0.1 * g, phi, grads), rtol=1e-5)
    # ...and cutting the gradient matters: it gives another update.
    assert not np.allclose(flat(full.params), flat(meta_state.params), rtol=1e-4)


@pytest.mark.parametrize(
    "estimator",
    [bilevel.Truncated(window=2), bilevel.FirstOrder(window=2)],
    ids=["truncated", "first_order"],
)
def test_a_run_split_into_calls_is_one_call(estimator):
    """K = 12 steps in calls of 2, 4 and 6, the returned EstimatorState passed on, give the
    φ and the inner state of one call of 12."""
    k, num_tasks, window = 12, 2, estimator.window
    opt, meta_opt = OPTIMIZERS["adam"], optax.adam(0.05)  # both optimizer states carried
    phi, theta, _, _, _ = problem(k)
    rng = np.random.default_rng(2)
    batches = jnp.asarray(rng.normal(size=(num_tasks, k, 4)), jnp.float32)
    outer_batches = jnp.asarray(rng.normal(size=(num_tasks, k // window, 4)), jnp.float32)
    keys = jax.random.split(jax.random.key(1), (num_tasks, k))
    outer_keys = jax.random.split(jax.random.key(2), (num_tasks, k // window))
    states = jax.tree.map(lambda x: jnp.stack([x] * num_tasks), init_inner_state(theta, opt))
    run = jax.jit(
        lambda meta_state, est_state, *xs: bilevel.windowed_meta_steps(
            meta_state,
            est_state,
            *xs,
            problem=bilevel_problem(opt),
            estimator=estimator,
            meta_optimizer=meta_opt,
        )
    )

    def start():
        return init_meta_state(phi, meta_opt), estimator.init_tasks(phi, states)

    one_meta, one_state, one_metrics = run(*start(), batches, keys, outer_batches, outer_keys)
    meta_state, est_state = start()
    losses, begin = [], 0
    for size in (2, 4, 6):
        steps, windows = (
            slice(begin, begin + size),
            slice(begin // window, (begin + size) // window),
        )
        meta_state, est_state, metrics = run(
            meta_state,
            est_state,
            batches[:, steps],
            keys[:, steps],
            outer_batches[:, windows],
            outer_keys[:, windows],
        )
        losses.append(metrics["meta/loss"])
        begin += size
    assert one_metrics["meta/loss"].shape == (k // window,)
    assert int(meta_state.step) == int(one_meta.step) == k // window
    assert np.all(np.asarray(est_state.inner.step) == k)
    close(meta_state.params, one_meta.params, rtol=1e-6)
    close(est_state.inner.params, one_state.inner.params, rtol=1e-6)
    close(jnp.concatenate(losses), one_metrics["meta/loss"], rtol=1e-6)


def test_vmap_over_tasks_matches_each_task_alone():
    opt = OPTIMIZERS["adam"]
    phi, theta, _, _, keys = problem(3)
    rng = np.random.default_rng(1)
    batches = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)  # 2 tasks × 3 steps
    targets = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    states = jax.tree.map(lambda x: jnp.stack([x] * 2), init_inner_state(theta, opt))
    task_keys = jnp.stack([keys] * 2)
    prob, est = bilevel_problem(opt), bilevel.Unrolled()

    @jax.jit
    def run(phi):
        tasks = est.estimate_tasks(
            prob, phi, est.init_tasks(phi, states), batches, task_keys, targets, task_keys[:, 0]
        )
        singles = [
            estimate(
                est, prob, phi, init_inner_state(theta, opt), batches[t], keys, targets[t], keys[0]
            )
            for t in range(2)
        ]
        return tasks, singles

    (grads, finals, metrics), singles = run(phi)
    close(metrics["meta/loss"], np.mean([s[2]["meta/loss"] for s in singles]), rtol=1e-5)
    close(
        grads, jax.tree.map(lambda *g: sum(g) / 2, *[s[0] for s in singles]), rtol=1e-4, atol=1e-6
    )
    close(finals.inner.params["w"][1], singles[1][1].inner.params["w"], rtol=1e-5)


@pytest.mark.parametrize(
    "name, window, episode_length, expected",
    [
        ("unrolled", 5, 5, bilevel.Unrolled()),
        ("truncated", 1, 10, bilevel.Truncated(window=1)),
        ("first_order", 2, 10, bilevel.FirstOrder(window=2)),
        ("first_order", 10, 10, bilevel.FirstOrder(window=None)),
        ("last_window", 3, 10, bilevel.LastWindow(steps=3)),
        ("es", 2, 10, bilevel.ES(window=2)),
        ("es", 10, 10, bilevel.ES(window=None)),
        ("pes", 2, 10, bilevel.PES(window=2)),
        ("implicit", 10, 10, bilevel.Implicit(window=None)),
    ],
)
def test_estimator_from_config_builds_what_the_config_names(name, window, episode_length, expected):
    got = bilevel.estimator_from_config(name, window=window, episode_length=episode_length)
    assert type(got) is type(expected)
    assert got == expected
    # The window of its estimates: None where it covers the whole episode.
    assert got.window == expected.window
    if name == "last_window":
        assert got.window is None and got.steps == window


def test_estimator_choices_of_a_config_are_validated():
    def check(name, window, episode_length):
        return bilevel.estimator_from_config(name, window=window, episode_length=episode_length)

    with pytest.raises(ValueError, match="Unknown gradient estimator 'implict'"):
        check("implict", 1, 1)
    with pytest.raises(ValueError, match="must equal the episode length"):
        check("unrolled", 1, 10)
    with pytest.raises(ValueError, match="multiple of the window"):
        check("truncated", 3, 10)
    with pytest.raises(ValueError, match="say estimator='unrolled'"):
        check("truncated", 10, 10)
    with pytest.raises(ValueError, match="for all of them say estimator='unrolled'"):
        check("last_window", 10, 10)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_lookahead_is_the_whole_displacement_of_one_gradient(nesterov):
    """A gradient g applied once into a momentum buffer moves θ by −η/(1−μ)·g in all."""
    lr, mu = 0.1, 0.8
    opt = optax.sgd(lr, momentum=mu, nesterov=nesterov)
    params = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 3.0])}
    zero = jax.tree.map(jnp.zeros_like, g)
    state, total = opt.init(params), jax.tree.map(jnp.zeros_like, params)
    for i in range(200):
        updates, state = opt.update(g if i == 0 else zero, state, params)
        total = jax.tree.map(jnp.add, total, updates)
    look = bilevel.momentum_lookahead(lr, mu)(g, params, jnp.int32(0))
    np.testing.assert_allclose(look["w"], total["w"], rtol=1e-5)
    with pytest.raises(ValueError, match="momentum must be in"):
        bilevel.momentum_lookahead(lr, 1.0)


def test_a_lookahead_moves_where_the_outer_loss_is_measured_not_the_step(float64):
    """Through the momentum lookahead the meta-gradient is that of plain SGD at η/(1−μ),
    while the returned state is the momentum optimizer's step."""
    phi, theta, batches, target, keys = problem(1, jnp.float64)
    lr, mu = 0.05, 0.9
    momentum, plain = optax.sgd(lr, momentum=mu, nesterov=True), optax.sgd(lr / (1 - mu))
    args = (batches, keys, target, keys[0])  # K = 1 step

    def run(opt, lookahead=None):
        state = init_inner_state(theta, opt)
        est = bilevel.OneStep(lookahead=lookahead)
        grads, state, metrics = estimate(est, bilevel_problem(opt), phi, state, *args)
        return metrics["meta/loss"], grads, state.inner

    look = run(momentum, lookahead=bilevel.momentum_lookahead(lr, mu))
    close(look[1], run(plain)[1], rtol=1e-10)  # the meta-gradient
    np.testing.assert_allclose(look[0], run(plain)[0], rtol=1e-12)  # the outer loss
    close(look[2].params, run(momentum)[2].params, rtol=1e-12)  # the step taken
