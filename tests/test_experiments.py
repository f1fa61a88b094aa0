"""End to end: configs through experiments.run, resume, determinism, bad input."""

import importlib
import json
import os
import struct
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import ml3_sine
from metalearn import algorithms, load_learned_loss
from metalearn.runtime.loop import NonFiniteError, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    f
    for f in os.listdir(os.path.join(ROOT, "configs"))
    if f.endswith(".py") and not f.startswith("_")
)


def _is_image(config_file: str) -> bool:
    return _load_config(config_file).get_config().get("task") == "image_classification"


def _is_learned_loss(config_file: str) -> bool:
    """ML³-style configs (a separate learned loss φ); the self-loss LM has its own tests."""
    return _load_config(config_file).get_config().get("task") != "lm"


def _load_config(config_file: str):
    return importlib.import_module(f"configs.{config_file[:-3]}")


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def tfrecord_events(path):
    """Counts records of a TensorBoard event file (TFRecord framing)."""
    count = 0
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            f.read(length + 4)
            count += 1
    return count


# Image configs share one builder (configs/_image.py): the CLI runs one per algorithm and
# data source (real MNIST, the real CIFAR-10 subset with a batch-norm ResNet, synthetic
# pixels); `test_every_image_config_builds_its_smoke_experiment` covers the rest.
CLI_CONFIGS = [c for c in CONFIGS if not _is_image(c) and _is_learned_loss(c)] + [
    "adalfl_cifar.py",
    "baseline_mnist.py",
    "ml3_svhn.py",
]


def expected_steps(config: dict) -> int:
    if config.get("task") == "image_classification":
        offline = config["meta"]["init_steps"] if config["algorithm"] != "baseline" else 0
        return offline + config["inner"]["steps"]
    return config["meta"]["steps"]


@pytest.mark.parametrize("config", CLI_CONFIGS)
def test_smoke_variant_runs_through_the_cli(config, tmp_path):
    workdir = tmp_path / "run"
    proc = run_cli(f"--config=configs/{config}:smoke", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        assert (workdir / name).exists(), name
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary and all(np.isfinite(v["mean"]) for v in _mean_std_leaves(summary))
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    saved = json.loads((workdir / "config.json").read_text())
    assert rows[-1]["step"] == expected_steps(saved)
    assert any(k.startswith("eval/") for r in rows for k in r)
    learned = saved["algorithm"] != "baseline"
    assert any("meta/loss" in r for r in rows) == learned
    events = [os.path.join(d, f) for d, _, fs in os.walk(workdir / "tensorboard") for f in fs]
    assert events and tfrecord_events(events[0]) > len(rows)
    assert len(list((workdir / "plots").glob("*.png"))) >= (2 if learned else 1)
    assert ocp.CheckpointManager(str(workdir / "checkpoints")).latest_step() is not None
    if learned:
        artifact = next(
            d for d, _, fs in os.walk(workdir / "learned_loss") if "loss_net.json" in fs
        )
        assert np.isfinite(float(_call_loaded(load_learned_loss(artifact))))


@pytest.mark.parametrize("config", [c for c in CONFIGS if _is_image(c)])
def test_every_image_config_builds_its_smoke_experiment(config):
    module = _load_config(config)
    experiment = algorithms.make(module.get_config("smoke"))
    assert experiment.num_steps > 0 and experiment.data.train_images.shape[0] > 0
    full = module.get_config()
    assert full.inner.steps >= 10_000 and full.data.batch_size == 128
    for model in ("resnet44", "wrn28_10"):
        assert module.get_config(model).model.name == model
    with pytest.raises(ValueError, match="Unknown variant 'nope'"):
        module.get_config("nope")


def _mean_std_leaves(d):
    for v in d.values():
        if isinstance(v, dict) and "mean" in v:
            yield v
        elif isinstance(v, dict):
            yield from _mean_std_leaves(v)


def _call_loaded(loss):
    y = np.ones((4, 1), np.float32)
    num_extra = loss.params["params"]["Dense_0"]["kernel"].shape[0] - 2  # inputs: y, ŷ, extra
    return loss(y, 0.5 * y, np.ones((4, num_extra), np.float32) if num_extra else None)


@pytest.fixture(scope="module")
def sine_experiment():
    config = ml3_sine.get_config("smoke")
    return config, algorithms.make(config)


def _final_phi(workdir):
    return load_learned_loss(os.path.join(workdir, "learned_loss", "seed_0")).params


def test_resume_ends_with_the_same_result_as_an_uninterrupted_run(sine_experiment, tmp_path):
    config, experiment = sine_experiment
    full = train_and_evaluate(experiment, config, str(tmp_path / "full"))
    assert train_and_evaluate(experiment, config, str(tmp_path / "cut"), stop_at=10) is None
    assert not (tmp_path / "cut" / "summary.json").exists()
    resumed = train_and_evaluate(experiment, config, str(tmp_path / "cut"))
    assert resumed == full
    jax.tree.map(
        np.testing.assert_array_equal, _final_phi(tmp_path / "full"), _final_phi(tmp_path / "cut")
    )
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").open()]
    full_steps = [json.loads(line)["step"] for line in (tmp_path / "full" / "metrics.jsonl").open()]
    assert steps == full_steps  # no duplicated or missing rows across the restart


def test_same_seed_same_result_and_other_seed_differs(sine_experiment, tmp_path):
    config, experiment = sine_experiment
    a = train_and_evaluate(experiment, config, str(tmp_path / "a"))
    b = train_and_evaluate(algorithms.make(config), config, str(tmp_path / "b"))
    assert a == b
    other = config.copy_and_resolve_references()
    other.seeds = (5, 6)
    c = train_and_evaluate(algorithms.make(other), other, str(tmp_path / "c"))
    assert c["final_mse"]["learned_loss"] != a["final_mse"]["learned_loss"]


def test_resuming_with_another_config_is_refused(sine_experiment, tmp_path):
    config, experiment = sine_experiment
    train_and_evaluate(experiment, config, str(tmp_path / "r"), stop_at=10)
    other = config.copy_and_resolve_references()
    other.meta.optimizer.lr = 0.5
    with pytest.raises(ValueError, match=r"different config \(differs in: meta.optimizer.lr\)"):
        train_and_evaluate(algorithms.make(other), other, str(tmp_path / "r"))


def test_non_finite_inner_loss_stops_with_the_step_and_quantity(tmp_path):
    config = ml3_sine.get_config("smoke")
    # φ jumps by ~1e30 per Adam step, so the learned inner loss overflows during meta-train.
    config.meta.optimizer.lr = 1e30
    with pytest.raises(NonFiniteError, match=r"Non-finite (inner|meta)/\S+ at step [1-9]\d* \("):
        train_and_evaluate(algorithms.make(config), config, str(tmp_path / "nan"))
    manager = ocp.CheckpointManager(str(tmp_path / "nan" / "checkpoints"))
    assert manager.latest_step() is None  # nothing non-finite was saved


def test_non_finite_evaluation_is_reported_too(tmp_path):
    config = ml3_sine.get_config("smoke")
    config.inner.optimizer.lr = 1e12  # the meta-test fits explode at the first evaluation
    with pytest.raises(NonFiniteError, match=r"Non-finite eval/\S+ at step 0 \(in the evaluation"):
        train_and_evaluate(algorithms.make(config), config, str(tmp_path / "nan"))


def test_unknown_config_key_and_variant_are_rejected_clearly():
    proc = run_cli("--config=configs/ml3_sine.py:smoke", "--config.meta.lrr=1")
    assert proc.returncode != 0
    assert "Unknown config key 'meta.lrr'" in proc.stderr and "optimizer" in proc.stderr
    proc = run_cli("--config=configs/ml3_sine.py:nope")
    assert proc.returncode != 0 and "Unknown variant 'nope'" in proc.stderr


def test_control_reproduction_table_has_a_column_per_method():
    from experiments.reproduce_control import table

    summary = {
        "test/final": {"ml3": {"mean": 0.1, "std": 0.02}, "bc": {"mean": 0.3, "std": 0.1}},
        "test/initial": {"mean": 0.9, "std": 0.0},
        "seeds": [0, 1, 2],
    }
    lines = table(summary).splitlines()
    assert lines[0] == "| quantity | ml3 | bc | value |"
    assert lines[2] == "| test/final | 0.1 ± 0.02 | 0.3 ± 0.1 |  |"
    assert lines[3] == "| test/initial |  |  | 0.9 ± 0 |"
