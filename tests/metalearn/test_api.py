"""What a JAX user meets: the exported names, explicit signatures, and misuse that fails
with a message saying what to do (raised in Python when traced, before anything runs)."""

import ast
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metalearn
from metalearn import bilevel
from metalearn.algorithms import adalfl, ml3
from metalearn.state import init_inner_state, init_meta_state

# Their time is compilation of small programs: compile them with most optimisations off.
pytestmark = pytest.mark.usefixtures("fast_compile")

ROOT = pathlib.Path(__file__).parents[2]
# The heart: what every algorithm and experiment composes.
HEART = (
    "metalearn.bilevel",
    "metalearn.state",
    "metalearn.optim",
    "metalearn.losses",
    "metalearn.losses.learned",
    "metalearn.losses.task",
)


def test_every_exported_name_exists():
    assert len(set(metalearn.__all__)) == len(metalearn.__all__)
    missing = [name for name in metalearn.__all__ if not hasattr(metalearn, name)]
    assert not missing


def _heart_names_used(path: pathlib.Path) -> set[str]:
    """Public names of the heart a module uses: `from metalearn.bilevel import x` and
    `bilevel.x` after `from metalearn import bilevel` (or `... import learned as l`)."""
    tree = ast.parse(path.read_text())
    aliases, used = {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in HEART:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                elif node.module in HEART:
                    used.add(alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) in aliases:
            used.add(node.attr)
    return {name for name in used if not name.startswith("_") and not name.isupper()}


def test_the_heart_functions_the_experiments_use_are_exported():
    modules = [*ROOT.glob("experiments/*.py"), *ROOT.glob("metalearn/algorithms/*.py")]
    used = set().union(*(_heart_names_used(p) for p in modules))
    assert {"check_estimator", "init_learned_loss", "make_optimizer", "unroll"} <= used
    assert not used - set(metalearn.__all__)
    expected = {
        "windowed_meta_steps",
        "one_step_meta_grad",
        "ESTIMATORS",
        "check_estimator",
        "init_inner_state",
        "init_meta_state",
        "init_learned_loss",
        "learned_loss_fn",
        "save_learned_loss",
        "load_learned_loss",
        "make_optimizer",
    }
    assert expected <= set(metalearn.__all__)


HEART_FUNCTIONS = [
    bilevel.check_estimator,
    bilevel.check_differentiable_optimizer,
    bilevel.inner_step,
    bilevel.unroll,
    bilevel.meta_loss,
    bilevel.meta_grad,
    bilevel.one_step_meta_grad,
    bilevel.meta_grad_over_tasks,
    bilevel.windowed_meta_steps,
    bilevel.meta_step,
    adalfl.lockstep,
    adalfl.offline_init_step,
]


@pytest.mark.parametrize("fn", HEART_FUNCTIONS, ids=lambda f: f.__name__)
def test_heart_functions_spell_out_their_parameters_and_document_them(fn):
    kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds
    assert inspect.Parameter.VAR_KEYWORD not in kinds
    doc = inspect.getdoc(fn) or ""
    assert "Args:" in doc and ("Returns:" in doc or "Raises:" in doc), doc


# --- misuse -------------------------------------------------------------------------


def inner_loss(params, model_state, phi, batch, key):
    del key
    return jnp.sum(phi["a"] * (params["w"] - batch) ** 2), (model_state, {})


def outer_loss(params, model_state, batch, key):
    del model_state, key
    return jnp.sum((params["w"] - batch) ** 2)


K, T = 4, 2
PHI = {"a": jnp.ones(3)}
THETA = {"w": jnp.zeros(3)}
SGD = optax.sgd(0.1)
LOSSES = dict(inner_loss=inner_loss, outer_loss=outer_loss)


def _one(estimator, optimizer=SGD, **kw):
    keys = jax.random.split(jax.random.key(0), K)
    state = init_inner_state(THETA, optimizer)
    args = (PHI, state, jnp.ones((K, 3)), keys, jnp.ones(3), keys[0])
    return args, dict(**LOSSES, optimizer=optimizer, estimator=estimator, **kw)


def _tasks(estimator, windows=1, **kw):
    keys = jax.random.split(jax.random.key(0), (T, K))
    states = jax.vmap(lambda _: init_inner_state(THETA, SGD))(jnp.arange(T))
    outer = jnp.ones((T, windows, 3))
    return (states, jnp.ones((T, K, 3)), keys, outer, keys[:, :windows]), dict(
        **LOSSES, optimizer=SGD, estimator=estimator, **kw
    )


def call(name, estimator, **kw):
    """Calls the function `name` with the estimator `estimator` on a tiny problem."""
    if name in ("meta_loss", "meta_grad"):
        args, kwargs = _one(estimator, **kw)
        return getattr(bilevel, name)(*args, **kwargs)
    if name == "jit(meta_grad)":
        args, kwargs = _one(estimator, **kw)
        return jax.jit(lambda p: bilevel.meta_grad(p, *args[1:], **kwargs))(PHI)
    if name == "meta_grad_over_tasks":
        args, kwargs = _tasks(estimator, **kw)
        return bilevel.meta_grad_over_tasks(PHI, *args, **kwargs)
    meta = init_meta_state(PHI, SGD)
    window = kw.pop("window", K)
    if name == "windowed_meta_steps":
        args, kwargs = _tasks(estimator, windows=K // window, **kw)
        return bilevel.windowed_meta_steps(meta, *args, window=window, meta_optimizer=SGD, **kwargs)
    if name == "ml3.meta_train_episode":
        args, kwargs = _tasks(estimator, windows=K // window, **kw)
        return ml3.meta_train_episode(meta, *args, window=window, meta_optimizer=SGD, **kwargs)
    if name == "ml3.episode":
        (states, batches, _, outer, _), kwargs = _tasks(estimator, windows=K // window, **kw)
        key = jax.random.key(1)
        return ml3.episode(
            meta, states, batches, outer, key, key, window=window, meta_optimizer=SGD, **kwargs
        )
    if name in ("adalfl.lockstep", "adalfl.offline_init_step"):
        state, key = init_inner_state(THETA, SGD), jax.random.key(0)
        fn = getattr(adalfl, name.split(".")[1])
        first = (state, meta) if name == "adalfl.lockstep" else (meta, state)
        kwargs = dict(**LOSSES, optimizer=SGD, meta_optimizer=SGD, estimator=estimator)
        return fn(*first, jnp.ones(3), jnp.ones(3), key, **kwargs)
    if name == "check_estimator":
        return bilevel.check_estimator(estimator, 1, K)
    raise AssertionError(name)


ALL = [
    "meta_loss",
    "meta_grad",
    "jit(meta_grad)",
    "meta_grad_over_tasks",
    "windowed_meta_steps",
    "ml3.meta_train_episode",
    "ml3.episode",
    "adalfl.lockstep",
    "adalfl.offline_init_step",
    "check_estimator",
]


@pytest.mark.parametrize("name", ALL)
def test_a_misspelt_estimator_is_refused_with_the_valid_names(name):
    with pytest.raises(ValueError, match="Unknown gradient estimator 'first-order'") as err:
        call(name, "first-order")
    assert "Did you mean 'first_order'?" in str(err.value)
    with pytest.raises(ValueError, match="Unknown gradient estimator 'bogus'") as err:
        call(name, "bogus")
    for valid in bilevel.ESTIMATORS:
        assert repr(valid) in str(err.value)


@pytest.mark.parametrize("name", ["meta_loss", "meta_grad", "meta_grad_over_tasks"])
def test_truncated_is_refused_where_it_would_do_nothing(name):
    with pytest.raises(ValueError, match="'truncated' does nothing in a single") as err:
        call(name, "truncated")
    assert "windowed_meta_steps" in str(err.value) and "'last_window'" in str(err.value)


def test_windowed_estimators_must_fit_the_windows():
    with pytest.raises(ValueError, match="cuts nothing: say estimator='unrolled'"):
        call("windowed_meta_steps", "truncated", window=K)
    with pytest.raises(ValueError, match="that is estimator='truncated'"):
        call("windowed_meta_steps", "unrolled", window=2)
    with pytest.raises(ValueError, match=r"call meta_grad\(..., estimator='last_window'"):
        call("windowed_meta_steps", "last_window", window=2)
    with pytest.raises(ValueError, match="positive divisor"):
        call("windowed_meta_steps", "truncated", window=3)


def test_last_window_needs_a_window_shorter_than_the_unroll():
    for window in (None, 0, K):
        with pytest.raises(ValueError, match=rf"needs window in \[1, {K}\)"):
            call("meta_grad", "last_window", window=window)
    with pytest.raises(ValueError, match="applies to estimator='last_window' only"):
        call("meta_grad", "unrolled", window=2)


def test_adalfl_refuses_estimators_that_do_not_apply_to_one_step():
    with pytest.raises(ValueError, match="identical to 'unrolled'"):
        call("adalfl.lockstep", "first_order")
    with pytest.raises(ValueError, match="single inner step"):
        call("adalfl.lockstep", "truncated")
    with pytest.raises(ValueError, match="Unknown method 'jpv'"):
        adalfl.lockstep(
            init_inner_state(THETA, SGD),
            init_meta_state(PHI, SGD),
            jnp.ones(3),
            jnp.ones(3),
            jax.random.key(0),
            **LOSSES,
            optimizer=SGD,
            meta_optimizer=SGD,
            method="jpv",
        )


def _zero_grad_loss(params, model_state, phi, batch, key):
    """θ's gradient is exactly zero on one coordinate (as behind a dead ReLU), yet depends
    on φ: Adam's ν stays 0 there."""
    del key
    w = params["w"]
    dead = jnp.sum(phi["a"][:2] * (w[:2] - batch[:2]) ** 2) + 0.0 * phi["a"][2] * w[2]
    return dead, (model_state, {})


def test_adam_without_eps_root_through_the_pure_api_is_refused_naming_eps_root():
    adam = optax.adam(1e-3)  # the exact misuse: optax's default eps_root=0
    for name in ("meta_grad", "jit(meta_grad)", "meta_loss"):
        with pytest.raises(ValueError, match=r"eps_root > 0, e.g. optax.adam\(lr, eps_root=1e-8\)"):
            args, kwargs = _one("unrolled", optimizer=adam)
            if name == "jit(meta_grad)":
                jax.jit(lambda p, a=args, k=kwargs: bilevel.meta_grad(p, *a[1:], **k))(PHI)
            else:
                getattr(bilevel, name)(*args, **kwargs)
    state, key = init_inner_state(THETA, adam), jax.random.key(0)
    with pytest.raises(ValueError, match="eps_root"):
        bilevel.one_step_meta_grad(
            PHI, state, jnp.ones(3), key, jnp.ones(3), key, **LOSSES, optimizer=adam
        )
    # ...also inside someone's chain (adamw), under vmap over tasks.
    chained = optax.chain(optax.clip(1.0), optax.adamw(1e-3))
    states = jax.vmap(lambda _: init_inner_state(THETA, chained))(jnp.arange(T))
    keys = jax.random.split(key, (T, K))
    with pytest.raises(ValueError, match="eps_root"):
        bilevel.meta_grad_over_tasks(
            PHI,
            states,
            jnp.ones((T, K, 3)),
            keys,
            jnp.ones((T, 3)),
            keys[:, 0],
            **LOSSES,
            optimizer=chained,
        )
    # With eps_root the probe passes (tests/metalearn/test_bilevel.py runs such meta-gradients).
    bilevel.check_differentiable_optimizer(optax.adam(1e-3, eps_root=1e-8), THETA)


def test_the_refusal_is_real_adam_without_eps_root_gives_a_nan_meta_gradient():
    """What the probe prevents: differentiating the unroll by hand through optax.adam."""
    keys = jax.random.split(jax.random.key(0), 2)

    def task_loss_after_unroll(phi, optimizer):
        final, _ = bilevel.unroll(
            init_inner_state(THETA, optimizer),
            phi,
            jnp.ones((2, 3)),
            keys,
            inner_loss=_zero_grad_loss,
            optimizer=optimizer,
        )
        return outer_loss(final.params, {}, jnp.ones(3), None)

    grads = jax.jit(
        lambda p: [
            jax.grad(task_loss_after_unroll)(p, opt)
            for opt in (optax.adam(0.05), optax.adam(0.05, eps_root=1e-8))
        ]
    )(PHI)
    assert not np.isfinite(np.asarray(grads[0]["a"])).all()
    assert np.isfinite(np.asarray(grads[1]["a"])).all()
    assert np.abs(np.asarray(grads[1]["a"])).max() > 0


def test_the_heart_is_a_package_of_small_modules():
    folder = ROOT / "metalearn" / "bilevel"
    sizes = {p.name: len(p.read_text().splitlines()) for p in folder.glob("*.py")}
    assert len(sizes) >= 6 and max(sizes.values()) <= 300, sizes
    for name in bilevel.__all__:  # `from metalearn.bilevel import x`, and metalearn.x
        assert hasattr(bilevel, name)
        assert name not in metalearn.__all__ or getattr(metalearn, name) is getattr(bilevel, name)


def test_a_single_key_a_missing_step_axis_and_a_non_scalar_loss_are_named():
    (phi, state, batches, keys, outer, outer_key), kwargs = _one("unrolled")
    with pytest.raises(ValueError, match=r"got a single key .*jax.random.split\(key, K\)"):
        bilevel.meta_grad(phi, state, batches, keys[0], outer, outer_key, **kwargs)
    raw = jax.random.PRNGKey(0)  # an old-style raw key, shape [2]
    with pytest.raises(ValueError, match=r"got a single key \(shape \(2,\)\)"):
        bilevel.unroll(state, phi, batches, raw, inner_loss=inner_loss, optimizer=SGD)
    with pytest.raises(ValueError, match=rf"K = {K} steps .*got leading sizes \[3\]"):
        bilevel.meta_grad(phi, state, batches[0], keys, outer, outer_key, **kwargs)

    def per_sample_loss(params, model_state, phi, batch, key):
        return phi["a"] * (params["w"] - batch) ** 2, (model_state, {})

    with pytest.raises(ValueError, match="its loss is not a scalar .*jnp.mean"):
        bilevel.meta_grad(
            phi, state, batches, keys, outer, outer_key, **{**kwargs, "inner_loss": per_sample_loss}
        )
