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
from metalearn.bilevel import ES, PES, Implicit, Truncated, Unrolled
from metalearn.estimators import antithetic_es
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
    del model_state, batch, key  # ignores its key: ES's noise varies with it, nothing else
    return 0.5 * jnp.sum((params["theta"] - TARGET) ** 2)


PROBLEM = bilevel.Problem(inner_loss, outer_loss, optax.sgd(LR))


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


def estimate(estimator, phi, k, outer_key=None, dtype=jnp.float32, problem=PROBLEM):
    """`estimator.estimate` over a k-step unroll from θ₀: `(grads, state, diagnostics)`.
    ES draws its perturbations from the outer key (the outer loss ignores it)."""
    batches, keys = steps(k)
    outer_key = jax.random.key(1) if outer_key is None else outer_key
    est_state = estimator.init(phi, state(dtype))
    return estimator.estimate(problem, phi, est_state, batches, keys, None, outer_key)


def test_antithetic_es_is_unbiased_for_one_unroll():
    k = 5
    es = ES(sigma=0.1, pairs=2)

    @jax.jit
    def draws(outer_keys):
        return jax.vmap(lambda key: estimate(es, PHI, k, key)[0]["w"])(outer_keys)

    theta, jac = closed_form(k)
    truth = jac.T @ (theta - TARGET)
    mean, se = assert_within_standard_errors(
        draws(jax.random.split(jax.random.key(2), DRAWS)), truth
    )
    assert np.all(se < 0.1 * np.abs(truth))  # enough draws for the check to mean something


def pes_and_truncated_es_draws(num_windows, window):
    """Per draw, the sum over the windows of PES's and of truncated ES's estimates, φ fixed."""
    pes, es = PES(window=window, sigma=0.1, pairs=2), ES(sigma=0.1, pairs=2)
    batches, keys = steps(window)
    add_task = lambda tree: jax.tree.map(lambda x: x[None], tree)  # noqa: E731

    def one(draw_key):
        states = add_task(state())
        pes_state, es_state = pes.init_tasks(PHI, states), es.init_tasks(PHI, states)
        pes_sum = es_sum = jnp.zeros(2)
        for t in range(num_windows):
            outer_key = add_task(jax.random.fold_in(draw_key, t))
            data = (add_task(batches), add_task(keys), jnp.zeros((1,)), outer_key)
            g, pes_state, _ = pes.estimate_tasks(PROBLEM, PHI, pes_state, *data)
            pes_sum += g["w"]
            g, es_state, _ = es.estimate_tasks(PROBLEM, PHI, es_state, *data)
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


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_implicit_matches_the_fixed_point_and_the_full_unroll_at_convergence(float64, damping):
    phi = jax.tree.map(jnp.asarray, PHI)
    k = 400  # ‖M^400‖ < 1e-15: converged
    implicit, _, metrics = estimate(
        Implicit(cg_iters=10, damping=damping), phi, k, dtype=jnp.float64
    )
    unrolled, _, _ = estimate(Unrolled(), phi, k, dtype=jnp.float64)
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
    # Far from converged: implicit answers for θ*, the unroll for θ₃.
    phi = jax.tree.map(jnp.asarray, PHI)
    implicit, _, metrics = estimate(Implicit(), phi, 3, dtype=jnp.float64)
    unrolled, _, _ = estimate(Unrolled(), phi, 3, dtype=jnp.float64)
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

    problem = bilevel.Problem(curved_inner_loss, outer_loss, optax.sgd(LR))

    def temp_bytes(k, estimator):
        fn = jax.jit(lambda phi: estimate(estimator, phi, k, problem=problem)[0])
        return fn.lower(PHI).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(2000, ES()) == temp_bytes(20, ES())
    assert temp_bytes(2000, Unrolled()) > 10 * temp_bytes(20, Unrolled())  # the check can fail


def test_windowed_meta_steps_run_es_pes_and_implicit():
    t, k, w = 2, 4, 2
    states = jax.tree.map(lambda x: jnp.stack([x] * t), state())
    meta_opt = optax.sgd(0.1)
    for estimator in (
        ES(sigma=0.05, pairs=4, window=w),
        PES(window=w, sigma=0.05, pairs=4),
        Implicit(window=w),
    ):
        meta_state, est_state, metrics = jax.jit(
            lambda ms, s, est=estimator: bilevel.windowed_meta_steps(
                ms,
                s,
                jnp.zeros((t, k)),
                jax.random.split(jax.random.key(0), (t, k)),
                jnp.zeros((t, k // w)),
                jax.random.split(jax.random.key(1), (t, k // w)),
                problem=PROBLEM,
                estimator=est,
                meta_optimizer=meta_opt,
            )
        )(init_meta_state(PHI, meta_opt), estimator.init_tasks(PHI, states))
        assert metrics["meta/loss"].shape == (k // w,)
        assert np.all(np.isfinite(metrics["meta/grad_norm"])) and np.all(
            metrics["meta/grad_norm"] > 0
        )
        assert not np.allclose(meta_state.params["w"], PHI["w"])
        # The returned states are the unperturbed unroll's, whatever the estimator.
        assert est_state.inner.params["theta"].shape == (t, 3)


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
        (lambda: ES(sigma=0.0), r"ES\(sigma=0\.0\): sigma must be a finite number > 0"),
        (lambda: PES(sigma=0.0), r"PES\(sigma=0\.0\): sigma must be a finite number > 0"),
        (lambda: ES(pairs=0), r"ES\(pairs=0\): pairs must be an integer >= 1"),
        (lambda: PES(pairs=0), r"PES\(pairs=0\): pairs must be an integer >= 1"),
        (lambda: PES(window=0), r"PES\(window=0\): window must be an integer >= 1"),
        (
            lambda: Implicit(damping=-1.0),
            r"Implicit\(damping=-1\.0\): damping must be a finite number >= 0",
        ),
        (
            lambda: Implicit(cg_iters=0),
            r"Implicit\(cg_iters=0\): cg_iters must be an integer >= 1",
        ),
        (
            lambda: bilevel.estimator_from_config(
                "es", window=4, episode_length=4, options={"sigmma": 0.1}
            ),
            r"Unknown estimator option 'sigmma'\. Did you mean 'sigma'\?",
        ),
        (
            lambda: bilevel.estimator_from_config("pes", window=4, episode_length=4),
            r"plain ES: say estimator='es'",
        ),
        (
            lambda: bilevel.estimator_from_config("PES", window=1, episode_length=4),
            r"Did you mean 'pes'",
        ),
    ],
)
def test_bad_estimator_settings_are_refused_with_the_fix(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call",
    [lambda: ES(cg_iters=10), lambda: PES(damping=0.5), lambda: Implicit(sigma=0.1)],
)
def test_an_option_the_estimator_does_not_have_is_refused(call):
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        call()


def test_pes_needs_its_own_state_and_the_forward_estimators_have_no_differentiable_loss():
    batches, keys = steps(2)
    pes = PES(window=2, sigma=0.1, pairs=2)
    with pytest.raises(TypeError, match=r"PES takes the EstimatorState of PES\.init"):
        pes.estimate(PROBLEM, PHI, ES().init(PHI, state()), batches, keys, None, jax.random.key(1))
    # ES, PES and implicit compute the meta-gradient themselves: no objective to differentiate.
    for estimator in (ES(), pes, Implicit()):
        assert not hasattr(estimator, "loss")


def test_es_reports_the_standard_error_its_draws_show(float64):
    """`meta/es_stderr` from one draw's pairs against the spread of many draws' estimates."""
    phi = jax.tree.map(jnp.asarray, PHI)
    es = ES(sigma=0.1, pairs=4)

    @jax.vmap
    def draw(outer_key):  # the outer loss ignores its key: only the perturbations vary
        g, _, m = estimate(es, phi, 5, outer_key, dtype=jnp.float64)
        return g["w"], m["meta/es_stderr"][0], m["meta/es_rel_stderr"][0]

    grads, stderr, rel = jax.jit(draw)(jax.random.split(jax.random.key(4), DRAWS))
    spread = np.sqrt(np.sum(np.var(np.asarray(grads), axis=0, ddof=1)))
    np.testing.assert_allclose(np.sqrt(np.mean(np.asarray(stderr) ** 2)), spread, rtol=0.1)
    np.testing.assert_allclose(rel, stderr / np.linalg.norm(grads, axis=-1), rtol=1e-6)
    one_pair = ES(sigma=0.1, pairs=1)  # no spread to measure: not reported
    metrics = estimate(one_pair, phi, 5, dtype=jnp.float64)[2]
    assert "meta/es_stderr" not in metrics and "meta/es_loss_spread" in metrics


WINDOWED_PES = PES(window=2, sigma=0.1, pairs=2)


def _windowed(meta_state, est_state, data, estimator=WINDOWED_PES, **kw):
    batches, keys, outer_batches, outer_keys = data
    return bilevel.windowed_meta_steps(
        meta_state,
        est_state,
        batches,
        keys,
        outer_batches,
        outer_keys,
        problem=PROBLEM,
        estimator=estimator,
        meta_optimizer=optax.sgd(0.05),
        **kw,
    )


def _tasks_and_data(t, k, w=2):
    states = jax.tree.map(lambda x: jnp.stack([x] * t), state())
    data = (
        jnp.zeros((t, k)),
        jax.random.split(jax.random.key(0), (t, k)),
        jnp.zeros((t, k // w)),
        jax.random.split(jax.random.key(1), (t, k // w)),
    )
    return states, data


def test_pes_split_into_any_number_of_calls_gives_the_numbers_of_one_call():
    t, k, w = 2, 12, 2
    states, data = _tasks_and_data(t, k, w)
    run = jax.jit(_windowed, static_argnames="keep_estimates")
    meta0 = init_meta_state(PHI, optax.sgd(0.05))
    whole = run(meta0, WINDOWED_PES.init_tasks(PHI, states), data, keep_estimates=True)

    def split(calls, carry_state=True):
        meta, est_state, rows = meta0, WINDOWED_PES.init_tasks(PHI, states), []
        for c in range(calls):
            per = k // calls
            chunk = (
                data[0][:, c * per : (c + 1) * per],
                data[1][:, c * per : (c + 1) * per],
                data[2][:, c * per // w : (c + 1) * per // w],
                data[3][:, c * per // w : (c + 1) * per // w],
            )
            if not carry_state:  # fresh particles from where the inner states are
                est_state = WINDOWED_PES.init_tasks(meta.params, est_state.inner)
            meta, est_state, m = run(meta, est_state, chunk, keep_estimates=True)
            rows.append(m)
        return meta, est_state, jax.tree.map(lambda *x: jnp.concatenate(x), *rows)

    for calls in (2, 3, 6):
        meta, est_state, metrics = split(calls)
        chex.assert_trees_all_close(meta.params, whole[0].params, rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_close(
            est_state.inner.params, whole[1].inner.params, rtol=1e-6, atol=1e-7
        )
        chex.assert_trees_all_close(est_state.particles, whole[1].particles, rtol=1e-6, atol=1e-7)
        chex.assert_trees_all_close(metrics, whole[2], rtol=1e-5, atol=1e-6)
    assert whole[2]["meta/estimate"]["w"].shape == (k // w, 2)  # each window's estimate
    assert np.all(whole[2]["meta/finite"] == 1.0) and np.all(whole[2]["meta/es_stderr"] > 0)
    # Restarting the particles at every call is truncated ES: other numbers (the check can fail).
    restarted = split(3, carry_state=False)[0]
    assert not np.allclose(restarted.params["w"], whole[0].params["w"], rtol=1e-3)


def test_a_pes_state_that_does_not_fit_is_refused():
    t, k = 2, 4
    states, data = _tasks_and_data(t, k)
    meta = init_meta_state(PHI, optax.sgd(0.05))
    # Fewer tasks than the call: refused, saying how to build the state.
    one_task = WINDOWED_PES.init_tasks(PHI, jax.tree.map(lambda x: x[:1], states))
    with pytest.raises(ValueError, match=r"The data has 2 tasks .* leading axes are \[1\]"):
        _windowed(meta, one_task, data)
    three_pairs = PES(window=2, sigma=0.1, pairs=3).init_tasks(PHI, states)
    with pytest.raises(ValueError, match=r"PES state has 3 pairs, but this PES has pairs=2"):
        _windowed(meta, three_pairs, data)
    for not_pes in (ES(window=2).init_tasks(PHI, states), bilevel.EstimatorState(inner=states)):
        with pytest.raises(TypeError, match=r"PES takes the EstimatorState of PES\.init"):
            _windowed(meta, not_pes, data)
    with pytest.raises(TypeError, match=r"PES takes the EstimatorState of PES\.init"):
        _windowed(meta, states, data)  # a bare inner state
    pes_state = WINDOWED_PES.init_tasks(PHI, states)
    with pytest.raises(ValueError, match=r"Truncated carries no particles, but the state has"):
        _windowed(meta, pes_state, data, estimator=Truncated(window=2))
