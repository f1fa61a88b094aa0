"""The loop (metalearn/runtime/loop.py) on a data-free toy experiment: what it reports,
how it cuts chunks for progress, and what an interrupted run says."""

import glob
import json
import os
import time

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from metalearn.runtime import checkpoint, loop
from metalearn.runtime.experiment import Experiment
from metalearn.runtime.loop import Interrupted, NonFiniteError, Preempted, train_and_evaluate


class Counter(Experiment):
    """x ← x + 1 a step; `train/x` logged every step (NaN from step `nan_at` on).

    `calls` records each `train_chunk(start, num)`; the call of step `interrupt_at`
    raises KeyboardInterrupt, as Ctrl-C would; each step sleeps `step_s`.
    """

    def __init__(self, config, *, estimators=(), nan_at=None, interrupt_at=None, step_s=0.0):
        super().__init__(config)
        self.num_steps = config.steps
        self.piece_steps = config.get("piece_steps")
        self._estimators, self.nan_at, self.interrupt_at = estimators, nan_at, interrupt_at
        self.step_s = step_s
        self.calls = []

    def init(self):
        return {"x": jnp.zeros((), jnp.float32)}

    def train_chunk(self, state, start, num):
        if self.interrupt_at is not None and start <= self.interrupt_at < start + num:
            raise KeyboardInterrupt
        self.calls.append((start, num))
        time.sleep(self.step_s * num)
        steps = np.arange(start + 1, start + num + 1, dtype=np.float32)
        if self.nan_at is not None:
            steps = np.where(steps >= self.nan_at, np.nan, steps)
        return {"x": state["x"] + num}, {"train/x": steps}

    def evaluate(self, state, step):
        return {"eval/x": state["x"]}

    def finalize(self, state, history, workdir):
        return {"x": {"mean": float(state["x"]), "std": 0.0}}

    def estimators(self):
        return self._estimators

    def phase(self, step):
        return "warm-up" if step < 4 else "main"


def counter_config(steps=8, every=4, piece_steps=None, checkpoint_every=None, minutes=0):
    return ml_collections.ConfigDict(
        {
            "steps": steps,
            "eval": {"every": every},
            "checkpoint_every": checkpoint_every or every,
            "checkpoint_every_minutes": minutes,
            "log_every": 1,
            "piece_steps": piece_steps,
        }
    )


def _rows(workdir):
    return open(os.path.join(workdir, "metrics.jsonl")).read()


@pytest.mark.parametrize(
    "estimators, hint",
    [(("implicit",), "raise meta.estimator_options.damping"), (("es",), "lower meta.estimat")],
)
def test_a_non_finite_loss_hints_at_the_estimators_the_experiment_names(estimators, hint, tmp_path):
    config = counter_config()
    experiment = Counter(config, estimators=("unrolled", *estimators), nan_at=6)
    with pytest.raises(NonFiniteError, match="at step 6") as err:
        train_and_evaluate(experiment, config, str(tmp_path / "run"))
    assert hint in str(err.value)
    # The config names no estimator: the hint comes from the experiment alone.
    assert str(err.value).count("With estimator=") == 1


def test_chunks_cut_for_progress_log_what_whole_chunks_do(tmp_path, monkeypatch):
    whole = Counter(counter_config(steps=40, every=20))
    train_and_evaluate(whole, whole.config, str(tmp_path / "whole"))
    assert whole.calls == [(0, 20), (20, 20)]
    # 10 ms a step, calls of about 40 ms: 1 step first (compilation), then 4 at a time.
    monkeypatch.setattr(loop, "PIECE_SECONDS", 0.04)
    cut = Counter(counter_config(steps=40, every=20, piece_steps=1), step_s=0.01)
    assert train_and_evaluate(cut, cut.config, str(tmp_path / "cut")) == {
        "x": {"mean": 40.0, "std": 0.0}
    }
    assert cut.calls[0] == (0, 1) and cut.calls[1][1] == 1  # the second call is measured
    sizes = {num for _, num in cut.calls}
    assert all(n & (n - 1) == 0 for n in sizes - {3, 19}) and max(sizes) <= 8, cut.calls
    # Every step once, no call across an evaluation.
    assert [s for s, n in cut.calls for s in range(s, s + n)] == list(range(40))
    assert not any(s < 20 < s + n for s, n in cut.calls)
    assert _rows(tmp_path / "cut") == _rows(tmp_path / "whole")


def test_progress_says_it_compiles_before_the_first_step_and_names_the_phase(tmp_path, capsys):
    experiment = Counter(counter_config(piece_steps=1))
    train_and_evaluate(experiment, experiment.config, str(tmp_path / "run"))
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "train: step 0/8: compiling the initial state and evaluation"
    assert err[1] == "train: step 0/8: compiling and running the first 1 step [warm-up]"
    assert err[2].startswith("train: step 1/8 [warm-up] (the first steps, compilation included")
    assert any(
        line.startswith("train: step 8/8 [main] (100%)") and "ETA 0s" in line for line in err
    )


def test_an_interrupted_run_says_where_its_last_checkpoint_is_and_resumes_from_it(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(loop, "PIECE_SECONDS", 0.0)  # one step a call
    workdir = str(tmp_path / "run")
    config = counter_config(steps=12, piece_steps=1)
    with pytest.raises(Interrupted) as err:
        train_and_evaluate(Counter(config, interrupt_at=6), config, workdir)
    checkpoints = os.path.join(os.path.abspath(workdir), "checkpoints")
    assert str(err.value) == (
        f"Interrupted at step 6 of 12. The last checkpoint is at step 4 in {checkpoints}; "
        "re-run the same command to resume from it."
    )
    assert isinstance(err.value, KeyboardInterrupt)  # what callers catch already
    assert checkpoint.latest_checkpoint(workdir) == 4
    resumed = Counter(config)
    train_and_evaluate(resumed, config, workdir)
    assert resumed.calls[0] == (4, 1)
    uninterrupted = Counter(config)
    train_and_evaluate(uninterrupted, config, str(tmp_path / "full"))
    assert _rows(workdir) == _rows(tmp_path / "full")


def test_an_interrupted_run_without_a_checkpoint_says_so(tmp_path):
    config = counter_config()
    with pytest.raises(Interrupted, match=r"at step 0 of 8\. No checkpoint was written yet"):
        train_and_evaluate(Counter(config, interrupt_at=0), config, str(tmp_path / "run"))
    assert checkpoint.latest_checkpoint(str(tmp_path / "run")) is None
    rows = [json.loads(r) for r in _rows(tmp_path / "run").splitlines()]
    assert [r["step"] for r in rows] == [0]  # the step-0 evaluation, nothing else


def test_resuming_between_checkpoints_drops_the_rows_logged_after_the_checkpoint(tmp_path):
    """Stopped at 15 with checkpoints every 10: the re-run resumes at 10 and must not
    keep the rows of steps 11-15 that the stopped run logged (they are logged again)."""
    config = counter_config(steps=20, every=5, checkpoint_every=10)
    workdir = str(tmp_path / "run")
    assert train_and_evaluate(Counter(config), config, workdir, stop_at=15) is None
    assert checkpoint.latest_checkpoint(workdir) == 10
    train_and_evaluate(Counter(config), config, workdir)
    train_and_evaluate(Counter(config), config, str(tmp_path / "full"))
    rows = _rows(workdir).splitlines()
    assert len(rows) == 25  # steps 1-20, and 5 evaluations (0, 5, 10, 15, 20)
    assert _rows(workdir) == _rows(tmp_path / "full")


def test_a_stop_request_checkpoints_the_step_reached_and_a_rerun_ends_as_an_uninterrupted_run(
    tmp_path, monkeypatch
):
    """`should_stop` (a signal under experiments.run) between two calls of a chunk: the
    call under way finishes, its step is checkpointed, `Preempted` says where."""
    monkeypatch.setattr(loop, "PIECE_SECONDS", 0.0)  # one step a call
    config = counter_config(steps=12, piece_steps=1)
    workdir = str(tmp_path / "run")
    stopping = Counter(config)
    with pytest.raises(Preempted) as err:
        train_and_evaluate(stopping, config, workdir, should_stop=lambda: len(stopping.calls) == 6)
    assert stopping.calls[-1] == (5, 1)  # steps 0-5 ran: the state is that of step 6
    folder = os.path.join(os.path.abspath(workdir), "checkpoints")
    assert str(err.value) == (
        "Stopped at step 6 of 12 on request, after the step under way; checkpoint written "
        f"at step 6 in {folder}. Re-run the same command to resume from it."
    )
    assert isinstance(err.value, Interrupted)  # what callers catch already
    assert checkpoint.latest_checkpoint(workdir) == 6  # mid-chunk: 4 and 8 are the cadence
    resumed = Counter(config)
    assert train_and_evaluate(resumed, config, workdir) == {"x": {"mean": 12.0, "std": 0.0}}
    assert resumed.calls[0] == (6, 1)
    train_and_evaluate(Counter(config), config, str(tmp_path / "full"))
    assert _rows(workdir) == _rows(tmp_path / "full")


def test_checkpoint_every_minutes_also_checkpoints_between_the_calls_of_a_chunk(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(loop, "PIECE_SECONDS", 0.0)
    steps = dict(steps=12, every=12, piece_steps=1)
    config = counter_config(**steps)
    with pytest.raises(Interrupted):  # a crash in the call of step 7
        train_and_evaluate(Counter(config, interrupt_at=7), config, str(tmp_path / "steps"))
    assert checkpoint.latest_checkpoint(str(tmp_path / "steps")) is None  # the cadence is 12
    timed = counter_config(**steps, minutes=1e-9)  # due after every call
    with pytest.raises(Interrupted):
        train_and_evaluate(Counter(timed, interrupt_at=7), timed, str(tmp_path / "timed"))
    assert checkpoint.latest_checkpoint(str(tmp_path / "timed")) == 7
    with pytest.raises(ValueError, match="checkpoint_every_minutes must be a number"):
        bad = counter_config(minutes=-1)
        train_and_evaluate(Counter(bad), bad, str(tmp_path / "bad"))


def test_a_checkpoint_that_cannot_be_read_is_moved_aside_and_the_previous_one_used(
    tmp_path, capsys
):
    config = counter_config(steps=12)
    workdir = str(tmp_path / "run")
    train_and_evaluate(Counter(config), config, workdir)
    os.remove(os.path.join(workdir, loop.SUMMARY_FILE))
    for path in glob.glob(
        os.path.join(workdir, "checkpoints", "12", "**", "d", "*"), recursive=True
    ):
        with open(path, "r+b") as f:  # the newest checkpoint's data files, half gone
            f.truncate(os.path.getsize(path) // 2)
    capsys.readouterr()
    resumed = Counter(config)
    assert train_and_evaluate(resumed, config, workdir) == {"x": {"mean": 12.0, "std": 0.0}}
    assert resumed.calls == [(8, 4)]
    out = capsys.readouterr().out.splitlines()
    aside = glob.glob(os.path.join(workdir, checkpoint.UNREADABLE_DIR, "12-*"))
    assert len(aside) == 1 and os.path.isdir(aside[0])  # kept, not deleted
    assert out[0].startswith("The checkpoint at step 12 cannot be read (")
    assert out[0].endswith(f"); moved it to {aside[0]}, resuming from step 8."), out
    assert out[1].startswith("Resuming from the checkpoint at step 8 of 12")
    train_and_evaluate(Counter(config), config, str(tmp_path / "full"))
    assert _rows(workdir) == _rows(tmp_path / "full")
