"""AdaLFL's lock-step and initialisation steps, on data-free problems, all jitted."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from metalearn import bilevel
from metalearn.algorithms import adalfl
from metalearn.losses import learned
from metalearn.runtime.experiment import FAST_COMPILE_OPTIONS
from metalearn.state import init_inner_state, init_meta_state

# Their time is compilation of small programs: compile them with most optimisations off.
pytestmark = pytest.mark.usefixtures("fast_compile")


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

    phi = jax.jit(lambda k: learned.init_learned_loss(cfg, k))(jax.random.key(1))
    return inner_loss, outer_loss, phi, batch, meta_batch


# The two exact estimators of AdaLFL's one-step meta-gradient (the old methods "jvp" and
# "backprop").
ONLINE = {"one_step": bilevel.OneStep(), "unrolled": bilevel.Unrolled()}


@pytest.fixture(scope="module")
def lockstep_run():
    """One compiled program: the online step by either estimator, the offline step from
    the same (fresh) θ, and what they should equal, computed by hand; run on the meta
    batch and on one whose task loss is NaN."""
    inner_loss, outer_loss, phi, batch, meta_batch = _problem()
    opt = optax.sgd(0.1, momentum=0.9, nesterov=True)
    meta_opt = optax.adam(1e-2)
    problem = bilevel.Problem(inner_loss, outer_loss, opt)
    learners = {name: adalfl.OnlineLearner(problem, meta_opt, e) for name, e in ONLINE.items()}
    state = init_inner_state(jnp.zeros((3, 1)) + 0.1, opt)
    meta = learners["one_step"].init(phi)
    key = jax.random.key(2)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE_OPTIONS)  # a module fixture: set here
    def run(state, meta, meta_batch):
        steps = {
            name: learner.step(meta, state, batch, meta_batch, key)
            for name, learner in learners.items()
        }
        offline = learners["one_step"].offline_step(meta, state, batch, meta_batch, key)
        # θ_{t+1} is the plain inner step taken with φ_t...
        expected, _ = bilevel.inner_step(
            state, phi, batch, jax.random.split(key)[0], inner_loss=inner_loss, optimizer=opt
        )

        # ...and φ_{t+1} one Adam step along ∇_φ L_task(θ_{t+1}(φ)).
        def task_after_step(p):
            s, _ = bilevel.inner_step(state, p, batch, None, inner_loss=inner_loss, optimizer=opt)
            return outer_loss(s.params, None, meta_batch, None)

        return steps, offline, expected, jax.value_and_grad(task_after_step)(phi)

    steps, offline, expected, (loss, grads) = run(state, meta, meta_batch)
    # The same program on a meta batch whose task loss is NaN.
    nan_batch = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), meta_batch)
    nan_steps, *_ = run(state, meta, nan_batch)
    updates, _ = meta_opt.update(grads, meta.opt_state, phi)
    return dict(
        steps=steps,
        nan_steps=nan_steps,
        offline=offline,
        theta=expected.params,
        loss=loss,
        grads=grads,
        phi0=phi,
        phi=optax.apply_updates(phi, updates),
    )


def test_lockstep_theta_is_the_plain_inner_step(lockstep_run):
    for name in ONLINE:
        new_state, new_meta, _ = lockstep_run["steps"][name]
        chex.assert_trees_all_close(new_state.params, lockstep_run["theta"], rtol=1e-6)
        assert int(new_meta.step) == 1 and int(new_state.step) == 1


@pytest.mark.parametrize("name", ONLINE)
def test_lockstep_phi_is_one_meta_step_through_the_inner_step(lockstep_run, name):
    _, new_meta, metrics = lockstep_run["steps"][name]
    np.testing.assert_allclose(metrics["meta/loss"], lockstep_run["loss"], rtol=1e-6)
    chex.assert_trees_all_close(new_meta.params, lockstep_run["phi"], rtol=1e-5)
    assert float(optax.global_norm(lockstep_run["grads"])) > 0


def test_one_step_and_unrolled_give_the_same_phi_update(lockstep_run):
    """The JVP (`OneStep`) and backpropagation (`Unrolled`) through the one inner step are
    two exact ways to the same meta-gradient: the same φ update, θ_{t+1} and loss."""
    (s_jvp, m_jvp, x_jvp), (s_bp, m_bp, x_bp) = (lockstep_run["steps"][n] for n in ONLINE)
    phi = lockstep_run["phi0"]
    delta_jvp, delta_bp = (jax.tree.map(jnp.subtract, m.params, phi) for m in (m_jvp, m_bp))
    assert float(optax.global_norm(delta_jvp)) > 0  # φ moved
    chex.assert_trees_all_close(delta_jvp, delta_bp, rtol=1e-5, atol=1e-8)
    chex.assert_trees_all_close(s_jvp.params, s_bp.params, rtol=1e-6)
    np.testing.assert_allclose(x_jvp["meta/loss"], x_bp["meta/loss"], rtol=1e-6)
    np.testing.assert_allclose(x_jvp["meta/grad_norm"], x_bp["meta/grad_norm"], rtol=1e-5)


def test_step_metrics_say_whether_the_meta_step_was_finite(lockstep_run):
    for name in ONLINE:
        _, _, metrics = lockstep_run["steps"][name]
        assert float(metrics["meta/finite"]) == 1.0, name
        _, new_meta, nan_metrics = lockstep_run["nan_steps"][name]
        assert np.isnan(float(nan_metrics["meta/loss"])), name
        assert float(nan_metrics["meta/finite"]) == 0.0, name
        flat, _ = ravel_pytree(new_meta.params)
        assert not np.all(np.isfinite(flat)), name  # what meta/finite warns of


@pytest.mark.parametrize(
    "estimator, match",
    [
        (
            bilevel.FirstOrder(),
            r"OneStep\(\) \(JVP\) or bilevel\.Unrolled\(\).*identical to Unrolled",
        ),
        (
            bilevel.Truncated(window=1),
            r"single inner step, so its estimator must be bilevel\.OneStep",
        ),
    ],
)
def test_online_learner_refuses_an_estimator_of_more_than_one_step(estimator, match):
    def inner_loss(params, model_state, phi, b, key):
        return jnp.sum(params * phi), (model_state, {})

    def outer_loss(params, model_state, b, key):
        return jnp.sum(params**2)

    problem = bilevel.Problem(inner_loss, outer_loss, optax.sgd(0.1))
    with pytest.raises(ValueError, match=match):
        adalfl.OnlineLearner(problem, optax.adam(1e-2), estimator)


def test_offline_init_step_discards_theta_and_equals_lockstep_on_phi(lockstep_run):
    new_meta, metrics = lockstep_run["offline"]
    chex.assert_trees_all_close(new_meta.params, lockstep_run["steps"]["one_step"][1].params)
    assert "meta/loss" in metrics


def test_first_order_equals_exact_for_one_step_from_a_carried_state():
    """Why AdaLFL refuses `FirstOrder`: θ_t is a constant of φ_t, so dθ_{t+1}/dφ =
    −α ∂²L/∂θ∂φ has no θθ term to drop, and `FirstOrder` would be the same gradient as
    `Unrolled` (over more steps the two differ: tests/metalearn/test_bilevel.py)."""
    inner_loss, outer_loss, phi, batch, meta_batch = _problem()
    opt = optax.sgd(0.1)
    state = init_inner_state(jnp.full((3, 1), 0.3), opt)
    problem = bilevel.Problem(inner_loss, outer_loss, opt)
    key = jax.random.key(0)
    args = (jax.tree.map(lambda x: x[None], batch), key[None], meta_batch, key)
    grads = jax.jit(
        lambda p: [
            e.estimate(problem, p, e.init(p, state), *args)[0]
            for e in (bilevel.Unrolled(), bilevel.FirstOrder())
        ]
    )(phi)
    assert float(optax.global_norm(grads[0])) > 1e-3
    chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-6, atol=1e-9)


class _TinyBNNet(nn.Module):
    """Conv → batch norm → ReLU → dense: the smallest net with batch statistics."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(nn.relu(x).mean((1, 2)))


@pytest.mark.slow  # 7 s of compilation (the default tier was over 5 min)
def test_jvp_and_backprop_meta_gradients_agree_through_batch_norm(float64):
    # Weight decay (an update that depends on θ) and Adam (a non-linear one, with moments).
    optimizer = optax.chain(optax.add_decayed_weights(5e-4), optax.adam(0.01, eps_root=1e-8))
    net = _TinyBNNet()
    cfg = learned.default_loss_net_config()
    cfg.hidden = (8, 8)
    cfg.activation = "smooth_leaky_relu"
    loss_fn = learned.learned_loss_fn(cfg)

    @jax.jit  # one program for the set-up instead of many small eager ones
    def setup():
        x = jax.random.normal(jax.random.key(0), (6, 5, 5, 2), jnp.float64)
        labels = jnp.array([0, 1, 2, 0, 1, 2])
        to64 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)  # noqa: E731
        variables = to64(net.init(jax.random.key(1), x, train=False))
        phi = to64(learned.init_learned_loss(cfg, jax.random.key(2), num_outputs=3))
        model_state = {"batch_stats": variables["batch_stats"]}
        state = init_inner_state(variables["params"], optimizer, model_state)
        return {"x": x, "y": labels}, {"x": x[::-1] * 0.7, "y": labels}, phi, state

    batch, meta_batch, phi, state = setup()

    def inner_loss(p, ms, phi, b, key):
        del key
        logits, ms = net.apply({"params": p, **ms}, b["x"], train=True, mutable=["batch_stats"])
        probs = jax.nn.softmax(logits)
        return loss_fn(phi, jax.nn.one_hot(b["y"], 3), probs), (ms, {})

    def outer_loss(p, ms, b, key):
        del key
        logits, _ = net.apply({"params": p, **ms}, b["x"], train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()

    problem = bilevel.Problem(inner_loss, outer_loss, optimizer)
    key = jax.random.key(3)

    @jax.jit
    def both(phi, state):
        # One plain step first, so that Adam's moments are non-zero.
        state, _ = bilevel.inner_step(
            state, phi, batch, None, inner_loss=inner_loss, optimizer=optimizer
        )
        args = (jax.tree.map(lambda v: v[None], batch), key[None], meta_batch, key)

        def by(estimator):  # (loss, grads, final inner state)
            grads, final, diag = estimator.estimate(problem, phi, estimator.init(phi, state), *args)
            return diag["meta/loss"], grads, final.inner

        return by(bilevel.OneStep()), by(bilevel.Unrolled())

    by_jvp, by_backprop = both(phi, state)
    assert jax.tree.leaves(by_jvp[1])[0].dtype == jnp.float64
    np.testing.assert_allclose(by_jvp[0], by_backprop[0], rtol=1e-10)
    chex.assert_trees_all_close(by_jvp[1], by_backprop[1], rtol=1e-8, atol=1e-12)
    chex.assert_trees_all_close(by_jvp[2], by_backprop[2], rtol=1e-10, atol=1e-12)
    assert float(optax.global_norm(by_jvp[1])) > 1e-6


def test_keep_best_keeps_the_params_of_the_lowest_error():
    best, best_error = {"w": jnp.zeros(2)}, jnp.asarray(2.0)
    for i, error in enumerate([0.5, 0.2, 0.7, 0.2, 0.3]):
        best, best_error = adalfl.keep_best(best, best_error, {"w": jnp.full(2, i + 1.0)}, error)
    np.testing.assert_array_equal(best["w"], [2.0, 2.0])  # 0.2 first reached by candidate 2
    assert float(best_error) == pytest.approx(0.2)


def test_logit_gradient_ratio_is_the_learned_steps_size_relative_to_cross_entropy():
    c = learned.default_loss_net_config()
    c.update(hidden=(8,), output_activation="identity", ce_term=True, use_bias=False)
    loss_fn = learned.learned_loss_fn(c)
    phi = learned.init_learned_loss(c, jax.random.key(0), num_outputs=3)
    last = phi["params"]["Dense_1"]["kernel"]
    flat = {"params": {**phi["params"], "Dense_1": {"kernel": jnp.zeros_like(last)}}}
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32)
    y = jax.nn.one_hot(jnp.array([0, 1, 2, 0]), 3)
    # Cross-entropy plus a flat learned part: the ratio is 1.
    assert float(adalfl.logit_gradient_ratio(loss_fn, flat, y, logits)) == pytest.approx(1.0)
    # The loss scaled by 5: the ratio is 5 (its gradient in φ exists: it bounds the step).
    scaled = lambda p, y, q: 5.0 * loss_fn(p, y, q)  # noqa: E731
    ratio = adalfl.logit_gradient_ratio(scaled, phi, y, logits)
    assert float(ratio) == pytest.approx(
        5 * float(adalfl.logit_gradient_ratio(loss_fn, phi, y, logits))
    )
    grads = jax.grad(lambda p: adalfl.logit_gradient_ratio(loss_fn, p, y, logits))(phi)
    assert np.isfinite(optax.global_norm(grads)) and optax.global_norm(grads) > 0


def _convex_problem():
    """A ridge regression whose loss φ weights and shifts: θ*(φ) exists and is unique."""
    x = jax.random.normal(jax.random.key(3), (16, 3))
    batch = {"x": x, "y": x @ jnp.array([[1.0], [-2.0], [0.5]])}
    meta_batch = {"x": x[::-1] * 0.5, "y": batch["y"][::-1] * 0.5 + 0.1}

    def inner_loss(params, model_state, phi, b, key):
        del key
        r = b["x"] @ params - b["y"] - phi["shift"]
        loss = jnp.mean(jnp.exp(phi["log_w"]) * r**2) + 0.05 * jnp.sum(params**2)
        return loss, (model_state, {})

    def outer_loss(params, model_state, b, key):
        del model_state, key
        return jnp.mean((b["x"] @ params - b["y"]) ** 2)

    phi = {"log_w": jnp.array(0.3), "shift": jnp.array([[0.2]])}
    return inner_loss, outer_loss, phi, batch, meta_batch


@pytest.mark.parametrize("inner_steps", [3, 300])
def test_offline_unroll_step_implicit_equals_the_unroll_at_a_fixed_point(inner_steps):
    """S_inner > 1 by implicit differentiation (the AdaLFL paper's suggestion): after
    300 steps θ is at ℓ_φ's minimiser and φ's step equals backprop through all 300; after
    3 it is not, and the two differ, as they must."""
    inner_loss, outer_loss, phi, batch, meta_batch = _convex_problem()
    opt, meta_opt = optax.sgd(0.1), optax.sgd(1.0)
    state = init_inner_state(jnp.zeros((3, 1)), opt)
    meta = init_meta_state(phi, meta_opt)
    batches = jax.tree.map(lambda x: jnp.stack([x] * inner_steps), batch)
    problem = bilevel.Problem(inner_loss, outer_loss, opt)
    step = jax.jit(
        functools.partial(adalfl.offline_unroll_step, problem=problem, meta_optimizer=meta_opt),
        static_argnames="estimator",
        compiler_options=FAST_COMPILE_OPTIONS,
    )
    estimators = {"implicit": bilevel.Implicit(), "unrolled": bilevel.Unrolled()}
    new = {
        name: step(meta, state, batches, meta_batch, jax.random.key(4), estimator=e)
        for name, e in estimators.items()
    }
    delta = {e: jax.tree.map(jnp.subtract, phi, m.params) for e, (m, _) in new.items()}
    assert float(optax.global_norm(delta["unrolled"])) > 1e-3  # φ moved
    np.testing.assert_allclose(new["implicit"][1]["meta/loss"], new["unrolled"][1]["meta/loss"])
    if inner_steps == 300:
        assert float(new["implicit"][1]["meta/cg_residual"]) < 1e-4
        chex.assert_trees_all_close(delta["implicit"], delta["unrolled"], rtol=1e-3, atol=1e-6)
    else:
        gap = optax.global_norm(jax.tree.map(jnp.subtract, delta["implicit"], delta["unrolled"]))
        assert float(gap) > 0.1 * float(optax.global_norm(delta["unrolled"]))


@pytest.mark.parametrize(
    "estimator, inner_steps, match",
    [
        (bilevel.Implicit(), 1, "raise meta.init_inner_steps"),
        (bilevel.ES(), 1, "must be Unrolled"),
        (bilevel.Truncated(window=5), 5, "needs windows"),
        (bilevel.PES(window=1), 5, "needs windows"),
        (bilevel.LastWindow(steps=2), 5, "needs windows"),
        (bilevel.ES(window=1), 5, r"over the whole unroll \(window None\)"),
        (bilevel.Implicit(), 0, "integer ≥ 1"),
    ],
)
def test_check_offline_estimator_says_what_to_choose(estimator, inner_steps, match):
    with pytest.raises(ValueError, match=match):
        adalfl.check_offline_estimator(estimator, inner_steps)


def test_a_misspelt_offline_estimator_name_is_refused_where_names_become_objects():
    """The name check (formerly `check_offline_estimator`'s) lives in
    `bilevel.estimator_from_config`, which the experiments call."""
    with pytest.raises(ValueError, match="Did you mean 'implicit'"):
        bilevel.estimator_from_config("implict", window=5, episode_length=5)
