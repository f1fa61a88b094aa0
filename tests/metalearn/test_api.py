"""What a JAX user meets: the exported names, explicit signatures, and misuse that fails
with a message saying what to do (raised in Python when built or traced, before anything
runs)."""

import ast
import dataclasses
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import metalearn
from metalearn import bilevel
from metalearn.algorithms import adalfl, ml3, self_loss
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
ESTIMATOR_CLASSES = (
    bilevel.Unrolled,
    bilevel.Truncated,
    bilevel.FirstOrder,
    bilevel.LastWindow,
    bilevel.ES,
    bilevel.PES,
    bilevel.Implicit,
    bilevel.OneStep,
)
BACKPROP_CLASSES = (bilevel.Unrolled, bilevel.Truncated, bilevel.FirstOrder, bilevel.LastWindow)


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
    assert {
        "Problem",
        "estimator_from_config",
        "init_learned_loss",
        "make_optimizer",
        "unroll",
    } <= used
    assert not used - set(metalearn.__all__)
    expected = {
        "Problem",
        "EstimatorState",
        *(cls.__name__ for cls in ESTIMATOR_CLASSES),
        "windowed_meta_steps",
        "ESTIMATORS",
        "estimator_from_config",
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
    bilevel.estimator_from_config,
    bilevel.check_differentiable_optimizer,
    bilevel.inner_step,
    bilevel.unroll,
    bilevel.windowed_meta_steps,
    bilevel.meta_step,
    ml3.meta_train_episode,
    ml3.episode,
    adalfl.OnlineLearner.step,
    adalfl.offline_unroll_step,
]


@pytest.mark.parametrize("fn", HEART_FUNCTIONS, ids=lambda f: f.__qualname__)
def test_heart_functions_spell_out_their_parameters_and_document_them(fn):
    kinds = {p.kind for p in inspect.signature(fn).parameters.values()}
    assert inspect.Parameter.VAR_POSITIONAL not in kinds
    assert inspect.Parameter.VAR_KEYWORD not in kinds
    doc = inspect.getdoc(fn) or ""
    assert "Args:" in doc and ("Returns:" in doc or "Raises:" in doc), doc


@pytest.mark.parametrize(
    "cls", [*ESTIMATOR_CLASSES, bilevel.Problem, adalfl.OnlineLearner], ids=lambda c: c.__name__
)
def test_the_objects_document_every_field_and_spell_out_their_methods(cls):
    doc = inspect.getdoc(cls) or ""
    assert "Attributes:" in doc, doc
    for field in dataclasses.fields(cls):
        assert field.name in doc.split("Attributes:")[1], (cls.__name__, field.name)
    if not issubclass(cls, bilevel.Estimator):
        return
    methods = ["init", "init_tasks", "estimate", "estimate_tasks"]
    methods += ["loss"] if issubclass(cls, BACKPROP_CLASSES) else []
    for name in methods:
        method = getattr(cls, name)
        params = inspect.signature(method).parameters.values()
        kinds = {p.kind for p in params}
        assert inspect.Parameter.VAR_POSITIONAL not in kinds, (cls.__name__, name)
        assert inspect.Parameter.VAR_KEYWORD not in kinds, (cls.__name__, name)
        assert inspect.getdoc(method), (cls.__name__, name)
        if name != "loss":  # called positionally: every estimator takes the same arguments
            base = inspect.signature(getattr(bilevel.Estimator, name)).parameters
            assert [p.name for p in params] == list(base), (cls.__name__, name)


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
PROBLEM = bilevel.Problem(inner_loss, outer_loss, SGD)


def _one(optimizer=SGD, steps=K):
    """One task's (φ, inner state, batches [steps], keys [steps], outer batch, outer key)."""
    keys = jax.random.split(jax.random.key(0), steps)
    state = init_inner_state(THETA, optimizer)
    return PHI, state, jnp.ones((steps, 3)), keys, jnp.ones(3), keys[0]


def estimate(estimator, optimizer=SGD, steps=K, state=None, problem=None):
    """`estimator.estimate` on a tiny problem, from `state` or the estimator's own init."""
    phi, inner, *rest = _one(optimizer, steps)
    state = estimator.init(phi, inner) if state is None else state
    problem = bilevel.Problem(inner_loss, outer_loss, optimizer) if problem is None else problem
    return estimator.estimate(problem, phi, state, *rest)


def _tasks(windows=1):
    """T tasks' (inner states, batches [T, K], keys [T, K], outer batches and keys
    [T, windows])."""
    keys = jax.random.split(jax.random.key(0), (T, K))
    states = jax.vmap(lambda _: init_inner_state(THETA, SGD))(jnp.arange(T))
    return states, jnp.ones((T, K, 3)), keys, jnp.ones((T, windows, 3)), keys[:, :windows]


def windowed(estimator, windows=None, state=None, problem=PROBLEM):
    """`windowed_meta_steps` on a tiny problem, from `state` or the estimator's init."""
    if windows is None:
        windows = K // (estimator.window or K)
    states, *rest = _tasks(windows)
    if state is None:
        state = estimator.init_tasks(PHI, states)
    meta = init_meta_state(PHI, SGD)
    return bilevel.windowed_meta_steps(
        meta, state, *rest, problem=problem, estimator=estimator, meta_optimizer=SGD
    )


def from_config(name, window=1, episode_length=K, **kw):
    return bilevel.estimator_from_config(name, window=window, episode_length=episode_length, **kw)


NAMED = {  # where a name becomes an estimator
    "estimator_from_config": lambda name: from_config(name),
    "check_estimator_name": bilevel.check_estimator_name,
}


@pytest.mark.parametrize("name", NAMED)
def test_a_misspelt_estimator_is_refused_with_the_valid_names(name):
    with pytest.raises(ValueError, match="Unknown gradient estimator 'first-order'") as err:
        NAMED[name]("first-order")
    assert "Did you mean 'first_order'?" in str(err.value)
    with pytest.raises(ValueError, match="Unknown gradient estimator 'bogus'") as err:
        NAMED[name]("bogus")
    for valid in bilevel.ESTIMATORS:
        assert repr(valid) in str(err.value)


def _online(estimator):
    return adalfl.OnlineLearner(PROBLEM, SGD, estimator=estimator)


def _offline(estimator):
    state, key = init_inner_state(THETA, SGD), jax.random.key(0)
    meta = init_meta_state(PHI, SGD)
    return adalfl.offline_unroll_step(
        meta,
        state,
        jnp.ones((K, 3)),
        jnp.ones(3),
        key,
        problem=PROBLEM,
        estimator=estimator,
        meta_optimizer=SGD,
    )


def _episode(estimator, name):
    states, batches, keys, outer, outer_keys = _tasks()
    meta = init_meta_state(PHI, SGD)
    kwargs = dict(problem=PROBLEM, estimator=estimator, meta_optimizer=SGD)
    if name == "ml3.meta_train_episode":
        return ml3.meta_train_episode(meta, states, batches, keys, outer, outer_keys, **kwargs)
    key = jax.random.key(1)
    return ml3.episode(meta, states, batches, outer, key, key, **kwargs)


def test_a_name_where_an_estimator_object_is_expected_is_refused():
    """The old string arguments: the functions that take an object refuse a name."""
    with pytest.raises(TypeError, match="must be an Estimator object .*estimator_from_config"):
        windowed("truncated", windows=K, state=bilevel.Truncated().init_tasks(PHI, _tasks()[0]))
    for refuse in (_online, adalfl.check_online_estimator):
        with pytest.raises(ValueError, match=r"must be bilevel.OneStep\(\) .*got 'jvp'"):
            refuse("jvp")  # the old method="jvp"
    with pytest.raises(TypeError, match="must be an Estimator object .*estimator_from_config"):
        _offline("unrolled")
    with pytest.raises(TypeError, match="must be an Estimator object"):
        self_loss.check_estimator("unrolled", 3)


@pytest.mark.parametrize("name", ["ml3.meta_train_episode", "ml3.episode"])
def test_ml3_refuses_a_name_where_an_estimator_object_is_expected(name):
    with pytest.raises(TypeError, match="Estimator object"):
        _episode("unrolled", name)


def test_truncated_is_refused_where_it_would_do_nothing():
    """Truncation over the whole episode is the full unroll: the config names Unrolled."""
    with pytest.raises(ValueError, match="is the full unroll; say estimator='unrolled'") as err:
        from_config("truncated", window=K)
    assert "so the choice is explicit" in str(err.value)


def test_windowed_estimators_must_fit_the_windows():
    with pytest.raises(ValueError, match="use estimator='truncated' for shorter windows"):
        from_config("unrolled", window=2)
    with pytest.raises(ValueError, match=r"multiple of the window \(3\)"):
        from_config("truncated", window=3)
    with pytest.raises(ValueError, match="it is plain ES: say estimator='es'"):
        from_config("pes", window=K)
    with pytest.raises(ValueError, match=r"window \(0\) and episode length \(4\) must be >= 1"):
        from_config("truncated", window=0)
    with pytest.raises(ValueError, match="must be integers"):
        from_config("truncated", window=2.0)
    # windowed_meta_steps: the window must divide the steps of the call...
    with pytest.raises(ValueError, match=r"Truncated\(window=3\) needs a number of inner steps"):
        windowed(bilevel.Truncated(window=3), windows=1)
    # ...and there is one outer batch and key per window.
    with pytest.raises(ValueError, match=r"outer_keys must be \[T, 2\]; got \[2, 1\]"):
        windowed(bilevel.Truncated(window=2), windows=1)
    # LastWindow is one estimate over the call, and must leave steps undifferentiated.
    with pytest.raises(ValueError, match=rf"LastWindow\(steps={K}\) .*this one has {K}"):
        windowed(bilevel.LastWindow(steps=K))


def test_last_window_needs_a_window_shorter_than_the_unroll():
    for steps in (None, 0):
        with pytest.raises(ValueError, match=rf"LastWindow\(steps={steps}\): steps must be an"):
            bilevel.LastWindow(steps=steps)
    for steps in (K, K + 1):
        with pytest.raises(ValueError, match=rf"needs more than {steps} .*this one has {K}") as err:
            estimate(bilevel.LastWindow(steps=steps))
        assert "use Unrolled()" in str(err.value)
        with pytest.raises(ValueError, match=rf"LastWindow\(steps={steps}\)"):
            bilevel.LastWindow(steps=steps).loss(PROBLEM, *_one())
    with pytest.raises(ValueError, match="so the window .* must be smaller; for all of them"):
        from_config("last_window", window=K)
    # The old `window=` of 'last_window' is `steps`; the other estimators have none.
    for cls in (bilevel.LastWindow, bilevel.Unrolled):
        with pytest.raises(TypeError, match="unexpected keyword argument 'window'"):
            cls(window=2)


def test_adalfl_refuses_estimators_that_do_not_apply_to_one_step():
    with pytest.raises(ValueError, match="identical to Unrolled"):
        _online(bilevel.FirstOrder())
    for other in (bilevel.Truncated(window=1), bilevel.LastWindow(), bilevel.ES()):
        with pytest.raises(ValueError, match="single inner step"):
            _online(other)
    # OneStep differentiates K = 1 step only.
    with pytest.raises(ValueError, match=rf"OneStep differentiates a single inner step, but {K}"):
        estimate(bilevel.OneStep())
    with pytest.raises(ValueError, match="single inner step"):
        windowed(bilevel.OneStep())
    # The offline phase takes one unroll from a fresh θ: no windows, Unrolled for 1 step.
    for windowed_one in (bilevel.Truncated(window=2), bilevel.ES(window=2), bilevel.PES()):
        with pytest.raises(ValueError, match="it needs windows of a longer unroll"):
            adalfl.check_offline_estimator(windowed_one, K)
    with pytest.raises(ValueError, match="estimator must be Unrolled"):
        adalfl.check_offline_estimator(bilevel.Implicit(), 1)
    with pytest.raises(ValueError, match=r"must be an integer ≥ 1; got 0"):
        adalfl.check_offline_estimator(bilevel.Unrolled(), 0)


# --- the objects refuse what they cannot take -----------------------------------------

BAD_VALUES = [
    (bilevel.Unrolled, {"remat": "yes"}, r"Unrolled\(remat='yes'\): remat must be True or False"),
    (bilevel.Truncated, {"window": 0}, r"Truncated\(window=0\): window must be an integer >= 1\."),
    (bilevel.Truncated, {"window": 2.0}, r"Truncated\(window=2.0\): window must be an integer"),
    (bilevel.Truncated, {"window": True}, r"Truncated\(window=True\): window must be an integer"),
    (bilevel.Truncated, {"remat": 1}, r"Truncated\(remat=1\): remat must be True or False"),
    (bilevel.FirstOrder, {"window": 0}, r"FirstOrder\(window=0\): .* integer >= 1 or None"),
    (bilevel.FirstOrder, {"remat": None}, r"FirstOrder\(remat=None\): remat must be"),
    (bilevel.LastWindow, {"steps": -1}, r"LastWindow\(steps=-1\): steps must be an integer"),
    (bilevel.LastWindow, {"remat": "no"}, r"LastWindow\(remat='no'\): remat must be"),
    (bilevel.ES, {"sigma": -1}, r"ES\(sigma=-1\): sigma must be a finite number > 0"),
    (bilevel.ES, {"sigma": 0.0}, r"ES\(sigma=0.0\): sigma must be a finite number > 0"),
    (bilevel.ES, {"sigma": float("nan")}, r"ES\(sigma=nan\): sigma must be a finite number"),
    (bilevel.ES, {"sigma": "0.1"}, r"ES\(sigma='0.1'\): sigma must be a finite number"),
    (bilevel.ES, {"pairs": 0}, r"ES\(pairs=0\): pairs must be an integer >= 1"),
    (bilevel.ES, {"pairs": 2.5}, r"ES\(pairs=2.5\): pairs must be an integer >= 1"),
    (bilevel.ES, {"window": -2}, r"ES\(window=-2\): window must be an integer >= 1 or None"),
    (bilevel.PES, {"pairs": 0}, r"PES\(pairs=0\): pairs must be an integer >= 1"),
    (bilevel.PES, {"window": 0}, r"PES\(window=0\): window must be an integer >= 1\."),
    (bilevel.PES, {"window": None}, r"PES\(window=None\): window must be an integer >= 1\."),
    (bilevel.PES, {"sigma": float("inf")}, r"PES\(sigma=inf\): sigma must be a finite number"),
    (bilevel.Implicit, {"damping": -1}, r"Implicit\(damping=-1\): damping .* number >= 0"),
    (bilevel.Implicit, {"cg_iters": 0}, r"Implicit\(cg_iters=0\): cg_iters must be an integer"),
    (bilevel.Implicit, {"tol": 0}, r"Implicit\(tol=0\): tol must be a finite number > 0"),
    (bilevel.Implicit, {"window": 0}, r"Implicit\(window=0\): window must be an integer"),
]


@pytest.mark.parametrize(
    "cls, kwargs, match",
    BAD_VALUES,
    ids=[f"{cls.__name__}({k}={v!r})" for cls, kw, _ in BAD_VALUES for k, v in kw.items()],
)
def test_every_estimator_refuses_a_bad_value_naming_the_field(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_the_estimators_build_with_their_defaults_and_are_immutable():
    for cls in ESTIMATOR_CLASSES:
        estimator = cls()
        assert estimator == cls() and hash(estimator) == hash(cls())  # jit-static
        field = dataclasses.fields(cls)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(estimator, field, None)
    with pytest.raises(TypeError, match=r"OneStep\(lookahead=...\) takes a function .*got int"):
        bilevel.OneStep(lookahead=3)
    bilevel.OneStep(lookahead=bilevel.momentum_lookahead(0.1, 0.9))
    bilevel.Implicit(damping=0)  # damping may be 0


@pytest.mark.parametrize(
    "cls, option",
    [
        (bilevel.Unrolled, "sigma"),
        (bilevel.Unrolled, "pairs"),
        (bilevel.Truncated, "steps"),
        (bilevel.FirstOrder, "cg_iters"),
        (bilevel.ES, "remat"),
        (bilevel.PES, "damping"),
        (bilevel.Implicit, "pairs"),
        (bilevel.OneStep, "window"),
    ],
)
def test_an_option_that_does_not_apply_cannot_be_passed(cls, option):
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{option}'"):
        cls(**{option: 0.1})


def test_a_config_option_that_does_not_apply_or_is_unknown_is_refused():
    with pytest.raises(ValueError, match="estimator_options.sigma=0.5 does not apply to") as err:
        from_config("unrolled", window=K, options={"sigma": 0.5})
    assert "estimator='unrolled'" in str(err.value) and "leave it at 0.01" in str(err.value)
    with pytest.raises(ValueError, match=r"pairs=16 does not apply .*\['cg_iters', 'damping'"):
        from_config("implicit", window=K, options={"pairs": 16})
    # A config holds the settings of every estimator: those that do not apply at their
    # defaults pass, those that apply reach the object.
    options = {"sigma": 0.01, "pairs": 8, "cg_iters": 20, "damping": 0.0, "tol": 1e-10}
    assert from_config("unrolled", window=K, options=options) == bilevel.Unrolled()
    assert from_config("es", window=K, options={**options, "pairs": 2}) == bilevel.ES(pairs=2)
    with pytest.raises(ValueError, match=r"ES\(sigma=-1\): sigma must be"):
        from_config("es", window=K, options={"sigma": -1})
    # remat applies to the backpropagating estimators only.
    assert from_config("unrolled", window=K, remat=True) == bilevel.Unrolled(remat=True)
    for name, window in (("es", K), ("pes", 2), ("implicit", K)):
        with pytest.raises(ValueError, match="remat=True applies to the estimators that") as err:
            from_config(name, window=window, remat=True)
        assert f"estimator={name!r} runs it forward only" in str(err.value)
    with pytest.raises(ValueError, match="Unknown estimator option 'sigm'") as err:
        from_config("es", window=K, options={"sigm": 0.5})
    assert "Did you mean 'sigma'?" in str(err.value)


def test_problem_refuses_what_is_not_a_loss_or_an_optimizer():
    with pytest.raises(TypeError, match="Problem.inner_loss must be a function .*got int"):
        bilevel.Problem(3, outer_loss, SGD)
    with pytest.raises(TypeError, match="Problem.outer_loss must be a function .*got str"):
        bilevel.Problem(inner_loss, "mse", SGD)
    for not_an_optimizer in (optax.sgd, "sgd", None):  # optax.sgd not called: a function
        with pytest.raises(TypeError, match=r"optimizer must be an optax GradientTransformation"):
            bilevel.Problem(inner_loss, outer_loss, not_an_optimizer)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PROBLEM.optimizer = optax.adam(1e-3)
    # Where a Problem is expected, something else is refused.
    with pytest.raises(TypeError, match=r"takes the inner problem as bilevel.Problem\(inner_loss"):
        windowed(bilevel.Unrolled(), problem=(inner_loss, outer_loss, SGD))
    with pytest.raises(TypeError, match="OnlineLearner.problem must be a bilevel.Problem"):
        adalfl.OnlineLearner((inner_loss, outer_loss, SGD), SGD)
    with pytest.raises(TypeError, match="OnlineLearner.meta_optimizer must be an optax"):
        adalfl.OnlineLearner(PROBLEM, "adam")


def test_an_estimator_refuses_a_state_that_is_not_its_own():
    _, inner, *_ = _one()
    # The old API took the inner state itself: it must be wrapped by `init`.
    for est in (bilevel.Unrolled(), bilevel.ES(pairs=2), bilevel.Implicit(), bilevel.OneStep()):
        with pytest.raises(TypeError, match=r"EstimatorState of its `init\(meta_params"):
            estimate(est, steps=1, state=inner)
    with pytest.raises(TypeError, match=r"EstimatorState of its `init"):
        bilevel.Unrolled().estimate_tasks(PROBLEM, PHI, *_tasks())
    # PES needs its particles.
    pes = bilevel.PES(window=2, pairs=2)
    for state in (bilevel.EstimatorState(inner=inner), bilevel.Unrolled().init(PHI, inner), inner):
        with pytest.raises(TypeError, match=r"PES takes the EstimatorState of PES.init") as err:
            estimate(pes, steps=2, state=state)
        assert "with its particles" in str(err.value)
    with pytest.raises(TypeError, match="PES takes the EstimatorState of PES.init"):
        windowed(pes, state=bilevel.Unrolled().init_tasks(PHI, _tasks()[0]))
    with pytest.raises(ValueError, match="has 2 pairs, but this PES has pairs=3"):
        estimate(bilevel.PES(window=2, pairs=3), steps=2, state=pes.init(PHI, inner))
    # ...and the others carry none.
    for est in (bilevel.Unrolled(), bilevel.ES(pairs=2)):
        with pytest.raises(ValueError, match=r"carries no particles, but the state has some"):
            estimate(est, steps=2, state=pes.init(PHI, inner))


def test_pes_says_the_state_has_no_particles():
    _, inner, *_ = _one()
    with pytest.raises(TypeError, match="got EstimatorState without PES particles"):
        estimate(bilevel.PES(window=2, pairs=2), steps=2, state=bilevel.EstimatorState(inner=inner))


def _zero_grad_loss(params, model_state, phi, batch, key):
    """θ's gradient is exactly zero on one coordinate (as behind a dead ReLU), yet depends
    on φ: Adam's ν stays 0 there."""
    del key
    w = params["w"]
    dead = jnp.sum(phi["a"][:2] * (w[:2] - batch[:2]) ** 2) + 0.0 * phi["a"][2] * w[2]
    return dead, (model_state, {})


def test_adam_without_eps_root_through_the_pure_api_is_refused_naming_eps_root():
    adam = optax.adam(1e-3)  # the exact misuse: optax's default eps_root=0
    problem = bilevel.Problem(inner_loss, outer_loss, adam)
    phi, state, *rest = _one(adam)
    unrolled = bilevel.Unrolled()
    calls = {
        "estimate": lambda: estimate(unrolled, adam),
        "jit(estimate)": lambda: jax.jit(
            lambda p: unrolled.estimate(problem, p, unrolled.init(p, state), *rest)
        )(phi),
        "loss": lambda: unrolled.loss(problem, phi, state, *rest),
        **{
            f"{type(est).__name__}.estimate": lambda est=est: estimate(est, adam)
            for est in (
                bilevel.Truncated(window=4),
                bilevel.FirstOrder(),
                bilevel.LastWindow(steps=2),
            )
        },
    }
    for call in calls.values():
        with pytest.raises(ValueError, match=r"eps_root > 0, e.g. optax.adam\(lr, eps_root=1e-8\)"):
            call()
    with pytest.raises(ValueError, match="eps_root"):
        estimate(bilevel.OneStep(), adam, steps=1)
    with pytest.raises(ValueError, match="eps_root"):
        adalfl.OnlineLearner(problem, SGD).step(
            init_meta_state(PHI, SGD), state, jnp.ones(3), jnp.ones(3), jax.random.key(0)
        )
    # ...also inside someone's chain (adamw), under vmap over tasks.
    chained = optax.chain(optax.clip(1.0), optax.adamw(1e-3))
    states = jax.vmap(lambda _: init_inner_state(THETA, chained))(jnp.arange(T))
    keys = jax.random.split(jax.random.key(0), (T, K))
    with pytest.raises(ValueError, match="eps_root"):
        unrolled.estimate_tasks(
            bilevel.Problem(inner_loss, outer_loss, chained),
            PHI,
            unrolled.init_tasks(PHI, states),
            jnp.ones((T, K, 3)),
            keys,
            jnp.ones((T, 3)),
            keys[:, 0],
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
    phi, state, batches, keys, outer, outer_key = _one()
    est = bilevel.Unrolled()
    est_state = est.init(phi, state)
    with pytest.raises(ValueError, match=r"got a single key .*jax.random.split\(key, K\)"):
        est.estimate(PROBLEM, phi, est_state, batches, keys[0], outer, outer_key)
    raw = jax.random.PRNGKey(0)  # an old-style raw key, shape [2]
    with pytest.raises(ValueError, match=r"got a single key \(shape \(2,\)\)"):
        bilevel.unroll(state, phi, batches, raw, inner_loss=inner_loss, optimizer=SGD)
    with pytest.raises(ValueError, match=rf"K = {K} steps .*got leading sizes \[3\]"):
        est.estimate(PROBLEM, phi, est_state, batches[0], keys, outer, outer_key)

    def per_sample_loss(params, model_state, phi, batch, key):
        return phi["a"] * (params["w"] - batch) ** 2, (model_state, {})

    with pytest.raises(ValueError, match="its loss is not a scalar .*jnp.mean"):
        est.estimate(
            bilevel.Problem(per_sample_loss, outer_loss, SGD),
            phi,
            est_state,
            batches,
            keys,
            outer,
            outer_key,
        )
