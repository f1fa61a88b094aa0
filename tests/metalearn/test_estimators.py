"""ES, PES and implicit differentiation against a closed-form hypergradient.

The problem: θ ∈ R³, φ ∈ R², the inner loss ½θᵀAθ − θᵀCφ (A symmetric positive definite)
trained by SGD with step η, the outer loss ½‖θ − t‖². Then θ_k is linear in φ,

    θ_k = M^k θ₀ + (I − M^k) A⁻¹ C φ,   M = I − ηA,

so every outer loss is quadratic in φ and its gradient is known in closed form, and the
Gaussian smoothing of ES/PES adds no bias: an unbiased estimator's mean over many draws
must land within a few standard errors of the truth.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from metalearn import bilevel
from metalearn.estimators import EstimatorOptions, antithetic_es
from metalearn.state import init_inner_state, init_meta_state

pytestmark = pytest.mark.usefixtures("fast_compile")

A = np.array([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]])
C = np.array([[1.0, 0.0], [0.5, 1.0], [0.0, -1.0]])
TARGET = np.array([1.0, -0.5, 0.25])
THETA0 = np.array([0.3, -0.2, 0.1])
PHI = {"w": np.array([0.4, -0.3])}
LR = 0.2
DRAWS = 4000


def inner_loss(params, model_state, phi, batch, key):
    del batch, key
    theta = params["theta"]
    value = 0.5 * theta @ jnp.asarray(A, theta.dtype) @ theta - theta @ (C @ phi["w"])
    return value, (model_state, {})


def outer_loss(params, model_state, batch, key):
    del model_state, batch, key
    return 0.5 * jnp.sum((params["theta"] - TARGET) ** 2)


def closed_form(num_steps):
    """θ_k and dθ_k/dφ after `num_steps` SGD steps from θ₀."""
    m_k = np.linalg.matrix_power(np.eye(3) - LR * A, num_steps)
    jac = (np.eye(3) - m_k) @ np.linalg.solve(A, C)
    return m_k @ THETA0 + jac @ PHI["w"], jac


def state(dtype=jnp.float32):
    return init_inner_state({"theta": jnp.asarray(THETA0, dtype)}, optax.sgd(LR))


def steps(num):
    return jnp.zeros((num,)), jax.random.split(jax.random.key(0), num)


def total_gradient(num_windows, window, truncated=False):
    """∇_φ Σ_t ½‖θ_{tW} − t‖², with every window's φ shared (or, `truncated`, each
    window's dependence on φ through its own W steps only)."""
    grad = np.zeros(2)
    for t in range(1, num_windows + 1):
        theta, jac = closed_form(t * window)
        jac = closed_form(window)[1] if truncated else jac
        grad += jac.T @ (theta - TARGET)
    return grad


def assert_within_standard_errors(draws, truth, n_se=3.0):
    draws = np.asarray(draws)
    mean, se = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
    assert np.all(np.abs(mean - truth) < n_se * se), (mean, truth, se)
    return mean, se


def test_antithetic_es_is_unbiased_for_one_unroll():
    k = 5
    batches, keys = steps(k)

    @jax.jit
    def draws(noise_keys):
        def one(noise_key):
            return bilevel.meta_grad(
                PHI,
                state(),
                batches,
                keys,
                None,
                jax.random.key(1),
                inner_loss=inner_loss,
                outer_loss=outer_loss,
                optimizer=optax.sgd(LR),
                estimator="es",
                options=EstimatorOptions(sigma=0.1, pairs=2),
                noise_key=noise_key,
            )[1]["w"]

        return jax.vmap(one)(noise_keys)

    theta, jac = closed_form(k)
    truth = jac.T @ (theta - TARGET)
    mean, se = assert_within_standard_errors(
        draws(jax.random.split(jax.random.key(2), DRAWS)), truth
    )
    assert np.all(se < 0.1 * np.abs(truth))  # enough draws for the check to mean something


def pes_and_truncated_es_draws(num_windows, window):
    """Per draw, the sum over the windows of PES's and of truncated ES's estimates, φ fixed."""
    options = EstimatorOptions(sigma=0.1, pairs=2)
    batches, keys = steps(window)
    add_task = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731
    losses = dict(inner_loss=inner_loss, outer_loss=outer_loss, optimizer=optax.sgd(LR))

    def one(draw_key):
        states = add_task(state())
        pes_states = bilevel.init_pes_over_tasks(states, PHI, options.pairs)
        es_states = states
        pes_sum = es_sum = jnp.zeros(2)
        for t in range(num_windows):
            outer_key = add_task(jax.random.fold_in(draw_key, t))
            data = (add_task(batches), add_task(keys), jnp.zeros((1,)), outer_key)
            _, g, states, pes_states, _ = bilevel.pes_meta_grad_over_tasks(
                PHI, states, pes_states, *data, **losses, options=options
            )
            pes_sum += g["w"]
            _, g, es_states, _ = bilevel.meta_grad_over_tasks(
                PHI, es_states, *data, **losses, estimator="es", options=options
            )
            es_sum += g["w"]
        return pes_sum, es_sum

    return jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(3), DRAWS))


def test_pes_is_unbiased_over_windows_and_truncated_es_is_not():
    num_windows, window = 4, 2
    pes, es = pes_and_truncated_es_draws(num_windows, window)
    truth = total_gradient(num_windows, window)
    truncated = total_gradient(num_windows, window, truncated=True)
    assert_within_standard_errors(pes, truth)
    # Truncated ES is unbiased for truncated backpropagation's gradient, not the truth:
    es_mean, es_se = assert_within_standard_errors(es, truncated)
    assert np.max(np.abs(es_mean - truth) / es_se) > 10  # its bias, shown


def common(k, dtype=jnp.float32):
    """The arguments of `bilevel.meta_grad` for a k-step unroll, but φ and the estimator."""
    batches, keys = steps(k)
    return dict(
        state=state(dtype),
        batches=batches,
        keys=keys,
        outer_batch=None,
        outer_key=jax.random.key(1),
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=optax.sgd(LR),
    )


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_implicit_matches_the_fixed_point_and_the_full_unroll_at_convergence(float64, damping):
    args = common(400, jnp.float64)  # ‖M^400‖ < 1e-15: converged
    phi = jax.tree.map(jnp.asarray, PHI)
    options = EstimatorOptions(cg_iters=10, damping=damping)
    _, implicit, _, metrics = bilevel.meta_grad(phi, **args, estimator="implicit", options=options)
    _, unrolled, _, _ = bilevel.meta_grad(phi, **args)
    theta_star = np.linalg.solve(A, C @ PHI["w"])
    fixed_point = np.linalg.solve(A + damping * np.eye(3), C).T @ (theta_star - TARGET)
    np.testing.assert_allclose(implicit["w"], fixed_point, rtol=1e-8)
    assert float(metrics["meta/cg_residual"][0]) < 1e-8
    assert float(metrics["meta/fixed_point_rel"][0]) < 1e-10  # θ_400 is a fixed point
    if damping == 0.0:
        np.testing.assert_allclose(implicit["w"], unrolled["w"], rtol=1e-6)
    else:  # damping biases it: the check above can tell
        assert not np.allclose(implicit["w"], unrolled["w"], rtol=0.05)


def test_implicit_is_the_fixed_point_gradient_not_the_short_unroll(float64):
    args = common(3, jnp.float64)  # far from converged: implicit answers for θ*, the unroll for θ₃
    phi = jax.tree.map(jnp.asarray, PHI)
    _, implicit, _, metrics = bilevel.meta_grad(phi, **args, estimator="implicit")
    _, unrolled, _, _ = bilevel.meta_grad(phi, **args)
    # The CG solve converged all the same; the fixed-point residual says θ_3 is not θ*.
    assert float(metrics["meta/cg_residual"][0]) < 1e-8
    assert float(metrics["meta/fixed_point_rel"][0]) > 0.1
    theta_star = np.linalg.solve(A, C @ PHI["w"])
    expected = np.linalg.norm(A @ closed_form(3)[0] - C @ PHI["w"])  # ∇_θ L_in(θ_3)
    np.testing.assert_allclose(metrics["meta/fixed_point_grad_norm"][0], expected, rtol=1e-8)
    assert np.linalg.norm(A @ theta_star - C @ PHI["w"]) < 1e-12
    theta, jac = closed_form(3)
    np.testing.assert_allclose(unrolled["w"], jac.T @ (theta - TARGET), rtol=1e-8)
    assert not np.allclose(implicit["w"], unrolled["w"], rtol=0.05)


def test_es_memory_does_not_grow_with_the_unroll():
    def curved_inner_loss(params, model_state, phi, batch, key):  # backprop must store θ_k
        value, aux = inner_loss(params, model_state, phi, batch, key)
        return value + jnp.sum(jnp.cosh(params["theta"])), aux

    def temp_bytes(k, estimator):
        args = {**common(k), "inner_loss": curved_inner_loss}
        fn = jax.jit(lambda phi: bilevel.meta_grad(phi, **args, estimator=estimator)[1])
        return fn.lower(PHI).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(2000, "es") == temp_bytes(20, "es")
    assert temp_bytes(2000, "unrolled") > 10 * temp_bytes(20, "unrolled")  # the check can fail


def test_windowed_meta_steps_run_es_pes_and_implicit():
    t, k, w = 2, 4, 2
    states = jax.tree.map(lambda x: jnp.stack([x] * t), state())
    meta_opt = optax.sgd(0.1)
    for estimator in ("es", "pes", "implicit"):
        meta_state, finals, metrics, _ = jax.jit(
            lambda ms, s, est=estimator: bilevel.windowed_meta_steps(
                ms,
                s,
                jnp.zeros((t, k)),
                jax.random.split(jax.random.key(0), (t, k)),
                jnp.zeros((t, k // w)),
                jax.random.split(jax.random.key(1), (t, k // w)),
                window=w,
                meta_optimizer=meta_opt,
                inner_loss=inner_loss,
                outer_loss=outer_loss,
                optimizer=optax.sgd(LR),
                estimator=est,
                options=EstimatorOptions(sigma=0.05, pairs=4),
            )
        )(init_meta_state(PHI, meta_opt), states)
        assert metrics["meta/loss"].shape == (k // w,)
        assert np.all(np.isfinite(metrics["meta/grad_norm"])) and np.all(
            metrics["meta/grad_norm"] > 0
        )
        assert not np.allclose(meta_state.params["w"], PHI["w"])
        # The returned states are the unperturbed unroll's, whatever the estimator.
        assert finals.params["theta"].shape == (t, 3)


def test_es_of_a_non_finite_loss_gives_a_non_finite_estimate():
    # The runtime loop stops on a non-finite meta/grad_norm like any other; here the pure
    # estimate must carry the NaN through rather than hide it.
    grads, losses, _ = antithetic_es(
        lambda phi: (jnp.log(phi["w"][0]), None),
        {"w": jnp.array([-1.0, 0.0])},
        jax.random.key(0),
        sigma=0.1,
        pairs=2,
    )
    assert not np.all(np.isfinite(grads["w"]))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: EstimatorOptions(sigma=0.0), r"sigma=0.0: the perturbation scale must be"),
        (lambda: EstimatorOptions(pairs=0), r"pairs=0: must be an integer >= 1"),
        (lambda: EstimatorOptions(damping=-1.0), r"damping=-1.0: must be a finite number >= 0"),
        (
            lambda: EstimatorOptions.from_config({"sigmma": 0.1}),
            r"Unknown estimator options \['sigmma'\]",
        ),
        (lambda: bilevel.check_estimator("pes", 4, 4), r"plain ES: say estimator='es'"),
        (lambda: bilevel.check_estimator("PES", 1, 4), r"Did you mean 'pes'"),
    ],
)
def test_bad_estimator_settings_are_refused_with_the_fix(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_pes_needs_windows_and_meta_loss_refuses_estimators_it_cannot_differentiate():
    args = common(2)
    with pytest.raises(ValueError, match=r"windowed_meta_steps\(\.\.\., window=W, estimator='pes'"):
        bilevel.meta_grad(PHI, **args, estimator="pes")
    args["meta_params"] = PHI
    with pytest.raises(ValueError, match=r"computes the meta-gradient itself"):
        bilevel.meta_loss(**args, estimator="es")


def test_es_reports_the_standard_error_its_draws_show(float64):
    """`meta/es_stderr` from one draw's pairs against the spread of many draws' estimates."""
    args = common(5, jnp.float64)
    phi = jax.tree.map(jnp.asarray, PHI)
    options = EstimatorOptions(sigma=0.1, pairs=4)

    @jax.vmap
    def draw(noise_key):
        _, g, _, m = bilevel.meta_grad(
            phi, **args, estimator="es", options=options, noise_key=noise_key
        )
        return g["w"], m["meta/es_stderr"][0], m["meta/es_rel_stderr"][0]

    grads, stderr, rel = jax.jit(draw)(jax.random.split(jax.random.key(4), DRAWS))
    spread = np.sqrt(np.sum(np.var(np.asarray(grads), axis=0, ddof=1)))
    np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(stderr) ** 2)), spread, rtol=0.1)
    np.testing.assert_allclose(rel, stderr / np.linalg.norm(grads, axis=-1), rtol=1e-6)
    one_pair = EstimatorOptions(sigma=0.1, pairs=1)  # no spread to measure: not reported
    metrics = bilevel.meta_grad(phi, **args, estimator="es", options=one_pair)[3]
    assert "meta/es_stderr" not in metrics and "meta/es_loss_spread" in metrics


def _windowed(meta_state, states, data, estimator_state, estimator="pes", **kw):
    batches, keys, outer_batches, outer_keys = data
    return bilevel.windowed_meta_steps(
        meta_state,
        states,
        batches,
        keys,
        outer_batches,
        outer_keys,
        window=2,
        meta_optimizer=optax.sgd(0.05),
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=optax.sgd(LR),
        estimator=estimator,
        options=EstimatorOptions(sigma=0.1, pairs=2),
        estimator_state=estimator_state,
        **kw,
    )


def test_pes_split_into_any_number_of_calls_gives_the_numbers_of_one_call():
    t, k, w = 2, 12, 2
    states = jax.tree.map(lambda x: jnp.stack([x] * t), state())
    data = (
        jnp.zeros((t, k)),
        jax.random.split(jax.random.key(0), (t, k)),
        jnp.zeros((t, k // w)),
        jax.random.split(jax.random.key(1), (t, k // w)),
    )
    run = jax.jit(_windowed, static_argnames="keep_estimates")
    whole = run(init_meta_state(PHI, optax.sgd(0.05)), states, data, None, keep_estimates=True)

    def split(calls, carry_state=True):
        meta, s, pes, rows = init_meta_state(PHI, optax.sgd(0.05)), states, None, []
        for c in range(calls):
            per = k // calls
            chunk = (
                data[0][:, c * per : (c + 1) * per],
                data[1][:, c * per : (c + 1) * per],
                data[2][:, c * per // w : (c + 1) * per // w],
                data[3][:, c * per // w : (c + 1) * per // w],
            )
            meta, s, m, pes = run(meta, s, chunk, pes if carry_state else None, keep_estimates=True)
            rows.append(m)
        return meta, s, jax.tree.map(lambda *x: jnp.concatenate(x), *rows)

    for calls in (2, 3, 6):
        meta, s, metrics = split(calls)
        chex.assert_trees_all_close(meta.params, whole[0].params, rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_close(s.params, whole[1].params, rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_close(metrics, whole[2], rtol=1e-5, atol=1e-6)
    assert whole[2]["meta/estimate"]["w"].shape == (k // w, 2)  # each window's estimate
    assert np.all(whole[2]["meta/finite"] == 1.0) and np.all(whole[2]["meta/es_stderr"] > 0)
    # Restarting the particles at every call is truncated ES: other numbers (the check can fail).
    restarted = split(3, carry_state=False)[0]
    assert not np.allclose(restarted.params["w"], whole[0].params["w"], rtol=1e-3)


def test_a_pes_state_that_does_not_fit_is_refused():
    t, k = 2, 4
    states = jax.tree.map(lambda x: jnp.stack([x] * t), state())
    data = (
        jnp.zeros((t, k)),
        jax.random.split(jax.random.key(0), (t, k)),
        jnp.zeros((t, k // 2)),
        jax.random.split(jax.random.key(1), (t, k // 2)),
    )
    meta = init_meta_state(PHI, optax.sgd(0.05))
    one_task = bilevel.init_pes_over_tasks(jax.tree.map(lambda x: x[:1], states), PHI, 2)
    with pytest.raises(ValueError, match="PES state has 1 tasks and 2 pairs, but this call has 2"):
        _windowed(meta, states, data, one_task)
    with pytest.raises(TypeError, match="takes as estimator_state the PESState"):
        _windowed(meta, states, data, {"particles": 0})
    with pytest.raises(ValueError, match="carries nothing between calls"):
        _windowed(meta, states, data, one_task, estimator="truncated")
