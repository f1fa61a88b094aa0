"""End to end: configs through `experiments.run`, resume, determinism, bad input.

The default tier runs ML³ sine in-process (resume, interrupts, bad input); the `slow`
tier runs every config's `:smoke` variant: one config of each experiment through the CLI
(a subprocess, as a user runs it), the others of that experiment in this process (as
flax's `train_test.py` calls `train_and_evaluate`), and the configs that only re-wire a
compiled one's programs built and traced, not compiled.
"""

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

import experiments
from configs import ml3_sine
from metalearn import load_learned_loss
from metalearn.runtime.experiment import FAST_COMPILE_OPTIONS, compiler_options
from metalearn.runtime.loop import NonFiniteError, Preempted, train_and_evaluate
from tests.events import read_scalars

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(
    f[:-3]
    for f in os.listdir(os.path.join(ROOT, "configs"))
    if f.endswith(".py") and not f.startswith("_")
)


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )


def _mean_std_leaves(d):
    for v in d.values():
        if isinstance(v, dict) and "mean" in v:
            yield v
        elif isinstance(v, dict):
            yield from _mean_std_leaves(v)


def check_run_directory(workdir):
    """What every finished run directory holds (DESIGN.md's list), read back."""
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        assert (workdir / name).exists(), name
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary and all(np.isfinite(v["mean"]) for v in _mean_std_leaves(summary))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    saved = json.loads((workdir / "config.json").read_text())
    steps = sorted({r["step"] for r in rows})
    assert steps[0] == 0 and steps == sorted(steps)
    assert any(k.startswith("eval/") for r in rows for k in r)
    scalars = read_scalars(workdir)  # every row's numbers in TensorBoard, at its step
    for row in rows:
        for name, value in row.items():
            if name != "step" and not name.startswith("curve/"):
                assert np.isclose(scalars[name][row["step"]], np.mean(value), rtol=1e-6), name
    assert list((workdir / "plots").glob("*.png"))
    assert ocp.CheckpointManager(str(workdir / "checkpoints")).latest_step() == steps[-1]
    learned = saved.get("algorithm") not in ("baseline", "self_loss", "gist")
    if learned:
        artifacts = [d for d, _, fs in os.walk(workdir / "learned_loss") if "loss_net.json" in fs]
        assert artifacts
        loss = load_learned_loss(artifacts[0])
        assert loss.description["inner_optimizer"] is not None
        assert np.isfinite(float(_call_loaded(loss)))
    return summary, rows


def _call_loaded(loss):
    """Calls a loaded loss with inputs of the width it was trained for."""
    fan_in = loss.params["params"]["Dense_0"]["kernel"].shape[0]
    outputs = 1 if loss.config.output_wise else 2
    num_extra = fan_in - 2 * (1 if loss.config.output_wise else outputs)
    y = np.ones((4, outputs), np.float32)
    return loss(y, 0.5 * y, np.ones((4, num_extra), np.float32) if num_extra else None)


def test_every_config_names_an_existing_experiment_and_imports_no_jax():
    code = (
        "import sys, importlib\n"
        f"for name in {CONFIGS!r}:\n"
        "    importlib.import_module('configs.' + name).get_config()\n"
        "assert 'jax' not in sys.modules, [m for m in sys.modules if 'jax' in m][:5]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in CONFIGS:
        config = importlib.import_module(f"configs.{name}").get_config()
        assert config.experiment in experiments.available(), name
        assert not config.fast_compile, name
        assert importlib.import_module(f"configs.{name}").get_config("smoke").fast_compile, name


# Configs that re-wire the programs of a compiled one (the same experiment and algorithm
# on other data, models or environment), each with that one: built and traced, not
# compiled. The compiled ones run end to end through the CLI.
TRACED = {
    **{
        f"{algorithm}_{data}": f"{algorithm}_mnist"
        for algorithm in ("adalfl", "baseline", "ml3")
        for data in ("fashion_mnist", "cifar", "cifar100", "svhn")
    },
    "ml3_mfrl_ant": "ml3_mfrl_reacher",  # brax's AntGoal instead of its ReacherGoal
}


def trace_experiment(config):
    """Builds the experiment of `config` and traces (`jax.eval_shape`) its init and the
    first training chunk of each phase (step 0 and every kept checkpoint, where a phase
    ends): every program is traced to its shapes, nothing is compiled or run."""
    config = ml_collections.ConfigDict(config)
    config.fast_compile = False  # compiler options are refused on nested (traced) jits
    experiment = experiments.make(config)
    state = jax.eval_shape(experiment.init)
    chunks = {}
    for start in sorted({0, *experiment.keep_checkpoints}):
        if start < experiment.num_steps:
            num = min(experiment.eval_every, experiment.num_steps - start)
            state_after, metrics = jax.eval_shape(
                lambda s, start=start, num=num: experiment.train_chunk(s, start, num), state
            )
            assert jax.tree.structure(state_after) == jax.tree.structure(state)
            chunks[start] = metrics
    return experiment, chunks


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(TRACED))
def test_smoke_variant_builds_and_traces_its_programs(config):
    smoke = importlib.import_module(f"configs.{config}").get_config("smoke")
    previous = jax.config.jax_numpy_rank_promotion
    if smoke.experiment == "ml3_mfrl":  # brax's own code relies on rank promotion
        jax.config.update("jax_numpy_rank_promotion", "allow")
    try:
        experiment, chunks = trace_experiment(smoke)
    finally:
        jax.config.update("jax_numpy_rank_promotion", previous)
    assert chunks and 0 in chunks
    for start, metrics in chunks.items():
        num = min(experiment.eval_every, experiment.num_steps - start)
        assert metrics and all(m.shape[0] == num for m in jax.tree.leaves(metrics)), start


# Configs run in this process, each with the config of its experiment that runs through
# the CLI (one per experiment).
IN_PROCESS = {
    "baseline_mnist": "adalfl_mnist",
    "ml3_mnist": "adalfl_mnist",
    "ml3_mbrl_pointmass": "ml3_mbrl_reacher",
}
CLI = sorted(set(CONFIGS) - set(TRACED) - set(IN_PROCESS))


def _smoke(name):
    return importlib.import_module(f"configs.{name}").get_config("smoke")


def test_traced_configs_share_their_programs_with_a_compiled_one():
    compiled = set(CONFIGS) - set(TRACED)
    for name, twin in TRACED.items():
        assert twin in compiled, name
        a, b = _smoke(name), _smoke(twin)
        assert (a.experiment, a.get("algorithm")) == (b.experiment, b.get("algorithm")), name


def test_each_experiment_has_one_config_through_the_cli_and_the_rest_in_process():
    assert not set(IN_PROCESS) & set(TRACED)
    through_cli = [_smoke(name).experiment for name in CLI]
    assert sorted(through_cli) == sorted(set(through_cli)) == sorted(experiments.available())
    for name, twin in IN_PROCESS.items():
        assert twin in CLI and _smoke(name).experiment == _smoke(twin).experiment, name


@pytest.mark.slow
@pytest.mark.parametrize("config", CLI)
def test_smoke_variant_runs_through_the_cli(config, tmp_path):
    workdir = tmp_path / "run"
    # brax's PPO trainer jits its own programs, out of reach of the experiment's
    # fast_compile: over 40 % of this smoke run (a third less with optimisations off).
    env = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "true"} if config == "ml3_mfrl_reacher" else {}
    # The reacher meta-trains by ES on the return of the whole inner episode (the
    # truncated estimator's programs are traced in the ant's smoke test and its gradient
    # checked against finite differences in test_ml3_mfrl.py): one run for both.
    extra = REACHER_ES if config == "ml3_mfrl_reacher" else ()
    proc = run_cli(f"--config=configs/{config}.py:smoke", f"--workdir={workdir}", *extra, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, rows = check_run_directory(workdir)
    if config == "ml3_mfrl_reacher":
        check_ppo_and_ml3_had_the_same_goals_and_budget(config, workdir, summary)
        check_es_scored_the_return_of_the_whole_inner_episode(config, rows)
    if config == "ml3_sine":
        assert "final_mse.learned_loss" in proc.stdout and "Resuming" not in proc.stdout
        assert rows[-1]["step"] == ml3_sine.get_config("smoke").meta.steps


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(IN_PROCESS))
def test_smoke_variant_runs_in_process(config, tmp_path):
    smoke = _smoke(config)
    summary = train_and_evaluate(experiments.make(smoke), smoke, str(tmp_path / "run"))
    assert check_run_directory(tmp_path / "run")[0] == summary


REACHER_ES = (
    "--config.meta.estimator=es",
    f"--config.meta.window={_smoke('ml3_mfrl_reacher').inner.episode_length}",
    "--config.meta.estimator_options.pairs=2",
)


def check_es_scored_the_return_of_the_whole_inner_episode(name, rows):
    """ES meta-training of the model-free RL run, one window over the whole inner
    episode: each step's meta-loss is −(return) at θ_K, and the ES spread is positive."""
    steps = [r for r in rows if "meta/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, _smoke(name).meta.steps + 1))
    for r in steps:
        assert np.all(np.asarray(r["meta/es_loss_spread"]) > 0), r
        np.testing.assert_allclose(r["meta/loss"], -np.asarray(r["train/final_return"]), rtol=1e-6)


def check_ppo_and_ml3_had_the_same_goals_and_budget(name, workdir, summary):
    """The model-free RL run's PPO baseline saw ML³'s test goals and exactly its budget
    of samples (read from the CLI run's directory, not a second run)."""
    c = importlib.import_module(f"configs.{name}").get_config("smoke")
    previous = jax.config.jax_numpy_rank_promotion
    jax.config.update("jax_numpy_rank_promotion", "allow")  # brax relies on it
    try:
        e = experiments.make(c)
        assert summary["budget_samples"] == c.eval.test_updates * c.inner.rollouts * c.horizon
        # The same goals (the subprocess compiled their sampler with optimisations off).
        np.testing.assert_allclose(summary["test_goals"], np.asarray(e.test_goals), rtol=1e-6)
        runs = [json.loads(p.read_text()) for p in sorted((workdir / "ppo").glob("*.json"))]
        assert len(runs) == len(c.ppo.seeds) * c.eval.num_goals
        for run in runs:
            assert run["goal_position"] == summary["test_goals"][run["goal"]]
            assert run["samples"][-1] == summary["budget_samples"]  # exactly ML³'s budget
        # brax's PPO resets the environment it is given to the goal: the target sits there.
        state = e.env.with_goal(e.test_goals[0]).reset(jax.random.key(0))
        np.testing.assert_allclose(state.obs[4:6], e.test_goals[0], atol=1e-6)
    finally:
        jax.config.update("jax_numpy_rank_promotion", previous)
    for method in ("ml3", "ppo"):
        assert np.isfinite(summary[method]["final_return"]["mean"])
    assert set(summary["architectures"]) == {"1x8", "2x8"}


@pytest.fixture(scope="module")
def sine_experiment():
    config = ml3_sine.get_config("smoke")
    return config, experiments.make(config)


@pytest.fixture(scope="module")
def sine_full_run(sine_experiment, tmp_path_factory):
    """One uninterrupted smoke run: (its workdir, its summary)."""
    config, experiment = sine_experiment
    workdir = tmp_path_factory.mktemp("sine") / "full"
    return workdir, train_and_evaluate(experiment, config, str(workdir))


def _final_phi(workdir):
    return load_learned_loss(os.path.join(workdir, "learned_loss", "seed_0")).params


def test_resume_says_where_it_resumed_and_ends_as_an_uninterrupted_run(
    sine_experiment, sine_full_run, tmp_path, capsys
):
    config, experiment = sine_experiment
    full_dir, full = sine_full_run
    assert train_and_evaluate(experiment, config, str(tmp_path / "cut"), stop_at=10) is None
    assert not (tmp_path / "cut" / "summary.json").exists()
    capsys.readouterr()
    resumed = train_and_evaluate(experiment, config, str(tmp_path / "cut"))
    assert "Resuming from the checkpoint at step 10 of 20" in capsys.readouterr().out
    assert resumed == full
    jax.tree.map(np.testing.assert_array_equal, _final_phi(full_dir), _final_phi(tmp_path / "cut"))
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").open()]
    full_steps = [json.loads(line)["step"] for line in (full_dir / "metrics.jsonl").open()]
    assert steps == full_steps  # no duplicated or missing rows across the restart


@pytest.mark.slow  # 7 s; resume tests already check that a run is reproducible
def test_same_seed_same_result_and_other_seed_differs(sine_experiment, sine_full_run, tmp_path):
    config, _ = sine_experiment
    _, a = sine_full_run
    b = train_and_evaluate(experiments.make(config), config, str(tmp_path / "b"))
    assert a == b
    other = config.copy_and_resolve_references()
    other.seeds = (5, 6)
    c = train_and_evaluate(experiments.make(other), other, str(tmp_path / "c"))
    assert c["final_mse"]["learned_loss"] != a["final_mse"]["learned_loss"]


def test_resuming_with_another_config_is_refused(sine_experiment, tmp_path):
    config, experiment = sine_experiment
    train_and_evaluate(experiment, config, str(tmp_path / "r"), stop_at=10)
    other = config.copy_and_resolve_references()
    other.meta.optimizer.lr = 0.5
    with pytest.raises(ValueError, match=r"different config \(differs in: meta.optimizer.lr\)"):
        train_and_evaluate(experiments.make(other), other, str(tmp_path / "r"))


def test_non_finite_inner_loss_stops_with_the_step_and_quantity(tmp_path):
    config = ml3_sine.get_config("smoke")
    # φ jumps by ~1e30 per Adam step, so the learned inner loss overflows during meta-train.
    config.meta.optimizer.lr = 1e30
    with pytest.raises(NonFiniteError, match=r"Non-finite (inner|meta)/\S+ at step [1-9]\d* \("):
        train_and_evaluate(experiments.make(config), config, str(tmp_path / "nan"))
    manager = ocp.CheckpointManager(str(tmp_path / "nan" / "checkpoints"))
    assert manager.latest_step() is None  # nothing non-finite was saved


def test_an_exploding_es_estimate_stops_the_run_and_names_sigma(tmp_path):
    config = ml3_sine.get_config("smoke")
    config.meta.estimator = "es"
    config.meta.estimator_options = {"sigma": 1e30, "pairs": 2}  # φ ± 1e30: losses overflow
    with pytest.raises(NonFiniteError, match=r"at step 1 .*lower meta.estimator_options.sigma"):
        train_and_evaluate(experiments.make(config), config, str(tmp_path / "es"))


def test_unknown_estimator_options_are_refused_when_the_experiment_is_built():
    config = ml3_sine.get_config("smoke")
    config.meta.estimator_options = {"pairs": 4, "sigma_": 0.1}
    with pytest.raises(
        ValueError, match=r"Unknown estimator option 'sigma_'. Did you mean 'sigma'\?"
    ):
        experiments.make(config)


def test_non_finite_evaluation_is_reported_too(tmp_path):
    config = ml3_sine.get_config("smoke")
    config.inner.optimizer.lr = 1e12  # the meta-test fits explode at the first evaluation
    with pytest.raises(NonFiniteError, match=r"Non-finite eval/\S+ at step 0 \(in the evaluation"):
        train_and_evaluate(experiments.make(config), config, str(tmp_path / "nan"))


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config=configs/ml3_sine.py:smoke", "--config.meta.lrr=1"],
            "error: Unknown config key 'meta.lrr' in '--config.meta.lrr': meta has no 'lrr'",
        ),
        (["--config=configs/ml3_sine.py:nope"], "error: Unknown variant 'nope' of ml3_sine"),
        (["--config=configs/nope.py"], "error: Config file 'configs/nope.py' does not exist"),
        (
            ["--config=configs/ml3_sine.py:smoke", "--config.meta.steps=many"],
            "error: flag --config.meta.steps=many",
        ),
        (
            ["--config=configs/ml3_sine.py:smoke", "--config.meta.estimator=first-order"],
            "error: Unknown gradient estimator 'first-order'",
        ),
        (
            ["--config=configs/baseline_mnist.py:smoke", "--config.data.data_dir=/nonexistent"],
            "error: ",
        ),
    ],
    ids=["unknown_key", "unknown_variant", "missing_file", "bad_value", "estimator", "dataset"],
)
def test_user_errors_are_printed_as_their_message_alone(args, message, tmp_path):
    proc = run_cli(*args, f"--workdir={tmp_path / 'run'}")
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_make_names_the_known_experiments_for_an_unknown_one():
    config = ml3_sine.get_config("smoke")
    config.experiment = "ml3_sinus"
    with pytest.raises(ValueError, match=r"Unknown experiment 'ml3_sinus'.*ml3_sine"):
        experiments.make(config)


def test_the_configs_compiler_options_reach_every_program_and_smoke_runs_override_them():
    config = ml3_sine.get_config()
    assert compiler_options(config) == {"xla_backend_optimization_level": 2}
    assert compiler_options(ml3_sine.get_config("smoke")) == FAST_COMPILE_OPTIONS
    config.compiler_options = {"xla_no_such_option": 1}
    jitted = experiments.make(config).jit(lambda x: x + 1)
    with pytest.raises(jax.errors.JaxRuntimeError, match="No such compile option: 'xla_no_such"):
        jitted(np.float32(1.0))
    with pytest.raises(TypeError, match="must map XLA option names to values"):
        compiler_options(ml_collections.ConfigDict({"compiler_options": "O1"}))


def _interrupt_when(proc, ready, timeout=120, signum=signal.SIGINT):
    """Sends `signum` to `proc` once `ready()` holds; returns (stdout, stderr) at its end."""
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    return proc.communicate(timeout=60)


STOPPED = (
    r"Stopped at step (\d+) of 100000 on request, after the step under way; checkpoint "
    r"written at step (\d+) in (\S+)\. Re-run the same command to resume from it\."
)


def test_sigterm_and_ctrl_c_checkpoint_the_step_reached_and_a_rerun_resumes(tmp_path, request):
    """A preemption's SIGTERM (and Ctrl-C): the step under way finishes, a checkpoint of
    it is written, the exit status is 75; re-running resumes from that very step."""
    from experiments.run import PREEMPTED_STATUS

    workdir = tmp_path / "run"
    # A long run (100,000 steps): it is still running whenever the signal comes.
    args = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config=configs/ml3_sine.py:smoke",
        "--config.meta.steps=100000",
        f"--workdir={workdir}",
    ]
    start = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Children inherit an ignored SIGINT (pytest started in the background), not a
    # handler: with one here they get SIGINT as a terminal's Ctrl-C delivers it.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        request.addfinalizer(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    first = subprocess.Popen(args, **start)
    ready = lambda: (workdir / "checkpoints" / "10").is_dir()  # noqa: E731
    out, err = _interrupt_when(first, ready, signum=signal.SIGTERM)
    assert first.returncode == PREEMPTED_STATUS == 75, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "SIGTERM: stopping after the step under way" in err, err[-3000:]
    checkpoints = os.path.join(str(workdir), "checkpoints")
    message = re.search(STOPPED, err)
    assert message, err[-3000:]
    at = int(message[1])
    assert int(message[2]) == at > 10 and message[3] == checkpoints
    assert ocp.CheckpointManager(checkpoints).latest_step() == at  # not only the cadence's

    second = subprocess.Popen(args, **start)
    lines = []

    def resumed():
        lines.append(second.stdout.readline())
        return "Resuming" in lines[-1]

    out, err = _interrupt_when(second, resumed)
    out = "".join(lines) + out
    assert f"Resuming from the checkpoint at step {at} of 100000" in out, (out, err[-2000:])
    assert second.returncode == 75 and "Traceback" not in err, err[-3000:]
    assert re.search(STOPPED, err) and "SIGINT: stopping" in err, err[-3000:]


def test_a_second_signal_stops_at_once(monkeypatch):
    """The first signal asks the loop to stop after the step under way; a second, when a
    user will not wait, raises where the main thread is (the step is then not saved)."""
    from experiments import run

    monkeypatch.setattr(run, "_SIGNALS", [])
    run._on_signal(signal.SIGTERM, None)  # returns: the loop's `should_stop` sees it
    assert run._SIGNALS == [signal.SIGTERM]
    with pytest.raises(KeyboardInterrupt):
        run._on_signal(signal.SIGINT, None)


@pytest.mark.slow  # three smoke runs; the loop's own tests check the same on a toy experiment
def test_a_preempted_run_resumes_from_the_step_it_reached_to_the_uninterrupted_result(tmp_path):
    """Stopped on request after the chunk of steps 1-5, between checkpoints (every 20):
    the checkpoint of step 5 is written, and the resumed run ends bit-identical."""
    config = ml3_sine.get_config("smoke")
    config.eval.every, config.checkpoint_every = 5, 20
    polls = []
    with pytest.raises(Preempted, match="Stopped at step 5 of 20 on request"):
        train_and_evaluate(
            experiments.make(config),
            config,
            str(tmp_path / "cut"),
            should_stop=lambda: polls.append(1) or len(polls) == 2,  # before the 2nd chunk
        )
    assert ocp.CheckpointManager(str(tmp_path / "cut" / "checkpoints")).latest_step() == 5
    resumed = train_and_evaluate(experiments.make(config), config, str(tmp_path / "cut"))
    full = train_and_evaluate(experiments.make(config), config, str(tmp_path / "full"))
    assert resumed == full
    jax.tree.map(
        np.testing.assert_array_equal, _final_phi(tmp_path / "full"), _final_phi(tmp_path / "cut")
    )
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (
        tmp_path / "full" / "metrics.jsonl"
    ).read_text().replace(str(tmp_path / "full"), str(tmp_path / "cut"))
