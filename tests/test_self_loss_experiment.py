"""The self-loss language-model experiment end to end, on tiny_shakespeare from ../shared."""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from configs import self_loss_lm
from metalearn import algorithms
from metalearn.runtime.loop import train_and_evaluate
from metalearn.runtime.metrics import read_metrics
from metalearn.tasks import text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(variant: str = ""):
    return self_loss_lm.get_config(",".join(p for p in (variant, "smoke") if p))


def test_text_tokens_round_trip_and_windows_are_pure():
    tokens = text.encode("héllo")
    assert tokens.dtype == np.uint8 and len(tokens) == 6
    ids = np.concatenate([tokens, [text.LOSS, text.GIST + 1]])
    assert text.decode(ids) == "héllo[LOSS][GIST1]"
    corpus = jax.numpy.arange(100, dtype=jax.numpy.uint8)
    a = text.windows(jax.random.key(0), corpus, 4, 8)
    np.testing.assert_array_equal(a, text.windows(jax.random.key(0), corpus, 4, 8))
    assert a.shape == (4, 9) and np.all(np.diff(np.asarray(a), axis=1) == 1)  # consecutive
    fixed = text.fixed_windows(np.arange(50, dtype=np.uint8), 3, 9)
    assert fixed.shape == (3, 10) and fixed[0, 0] == 0 and fixed[-1, -1] == 49


def test_tiny_shakespeare_and_a_text_file_give_three_splits(tmp_path):
    data = text.load_text(_config().data)
    assert len(data.train) == 1_003_854 and len(data.validation) == len(data.test) == 55_770
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefghij" * 10)
    config = _config("file").data
    config.path, config.split_fractions = str(path), (0.1, 0.2)
    split = text.load_text(config)
    assert (len(split.train), len(split.validation), len(split.test)) == (70, 10, 20)


def test_bad_input_fails_with_a_message_saying_what_to_change(tmp_path):
    config = _config("file")
    config.data.path = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="--config.data.path"):
        algorithms.make(config)
    config = _config()
    config.data.data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="tiny_shakespeare.*dataset_info.json"):
        algorithms.make(config)
    with pytest.raises(ValueError, match="Unknown variant part 'nope'"):
        _config("nope")
    config = _config()
    config.meta.steps = 3
    config.log_every = 2
    with pytest.raises(ValueError, match="multiple of log_every"):
        algorithms.make(config)
    config = _config("frozen,prefix")
    with pytest.raises(ValueError, match="shared_prefix"):
        algorithms.make(config)


def test_readme_smoke_command_runs(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "--config=configs/self_loss_lm.py:smoke",
            f"--workdir={workdir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert {"steps_to_hack", "best_val_ce", "control_final_val_ce", "min_pred_loss"} <= set(summary)
    rows = [r for r in read_metrics(str(workdir)) if "phase" in r]
    config = _config()
    assert [r["phase"] for r in rows] == [1] * config.meta.steps + [2] * config.phase2.steps
    assert all(np.isfinite(r["true/val_ce"]) for r in rows)
    assert (workdir / "plots" / "self_loss.png").exists()
    assert list((workdir / "tensorboard").iterdir())


@pytest.fixture(scope="module")
def frozen_run():
    """A frozen-critic smoke experiment stepped to the end of Phase 1 and then to the end."""
    experiment = algorithms.make(_config("frozen,soft"))
    c = experiment.config
    n = c.eval.every  # one chunk size: one compiled program
    end_of_phase1 = experiment.init()
    for start in range(0, c.meta.steps, n):
        end_of_phase1, _ = experiment.train_chunk(end_of_phase1, start, n)
    final, metrics = end_of_phase1, []
    for start in range(c.meta.steps, c.meta.steps + c.phase2.steps, n):
        final, m = experiment.train_chunk(final, start, n)
        metrics.append(m)
    return experiment, end_of_phase1, final, metrics


def test_frozen_critic_is_the_end_of_phase1_and_never_changes(frozen_run):
    _, end_of_phase1, final, _ = frozen_run
    chex.assert_trees_all_equal(end_of_phase1.critic, end_of_phase1.params)
    chex.assert_trees_all_equal(final.critic, end_of_phase1.params)
    assert not np.allclose(final.params["embed"]["embedding"], final.critic["embed"]["embedding"])
    # the control forked there too, and learned on the true loss
    chex.assert_trees_all_equal(end_of_phase1.control, end_of_phase1.params)


def test_chunks_are_deterministic(frozen_run):
    experiment, end_of_phase1, final, metrics = frozen_run
    c = experiment.config
    again, m = experiment.train_chunk(end_of_phase1, c.meta.steps, c.eval.every)
    chex.assert_trees_all_equal(m, metrics[0])
    for i, start in enumerate(
        range(c.meta.steps + c.eval.every, experiment.num_steps, c.eval.every)
    ):
        again, m = experiment.train_chunk(again, start, c.eval.every)
        chex.assert_trees_all_equal(m, metrics[i + 1])
    chex.assert_trees_all_equal(again, final)


def test_resume_is_exact(tmp_path, fast_compile):
    config = _config("ema")
    whole = train_and_evaluate(algorithms.make(config), config, str(tmp_path / "a"))
    assert (
        train_and_evaluate(algorithms.make(config), config, str(tmp_path / "b"), stop_at=8) is None
    )
    resumed = train_and_evaluate(algorithms.make(config), config, str(tmp_path / "b"))
    assert resumed == whole
    assert read_metrics(str(tmp_path / "a")) == read_metrics(str(tmp_path / "b"))


@pytest.mark.parametrize(
    "variant", [*self_loss_lm.SWEEP, "hard,stop", "hard,rollback", "hard,meta", "prefix,softplus"]
)
def test_every_variant_runs_its_smoke(variant, tmp_path, fast_compile):
    config = _config(variant)
    # A negative tolerance makes every logged step a new best and every full window of
    # falling predicted loss a detection, so that the actions fire within the smoke run.
    config.detector.tolerance = -1.0
    summary = train_and_evaluate(algorithms.make(config), config, str(tmp_path))
    rows = [r for r in read_metrics(str(tmp_path)) if "phase" in r]
    assert len(rows) == config.meta.steps + config.phase2.steps
    assert all(np.isfinite(r["self/pred_loss"]) and np.isfinite(r["true/val_ce"]) for r in rows)
    action = config.detector.action
    if action != "continue":
        assert summary["hack_detected_at"] is not None
    phases = [r["phase"] for r in rows]
    if action == "meta":  # back to Phase 1 after a detection, then Phase 2 again
        returned = phases[config.meta.steps :].count(1)
        assert returned >= config.detector.meta_steps and 2 in phases[-3:]
    else:
        assert phases == [1] * config.meta.steps + [2] * config.phase2.steps
    if action == "rollback":
        assert summary["rollbacks"] >= 1
    if action == "stop":  # θ frozen from the detection on: its validation CE is constant
        stop = config.meta.steps + summary["hack_detected_at"]
        after = [r["true/val_ce"] for r in rows if r["step"] > stop]
        assert len(after) > 1 and len(set(after)) == 1
