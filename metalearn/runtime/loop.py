"""The impure edge: drive an experiment's pure steps, log, checkpoint, resume.

An experiment (a `metalearn.runtime.experiment.Experiment`) supplies pure, jitted
functions; this loop calls them in chunks of `eval_every` steps, so that chunk
boundaries — and hence every random number, evaluation and checkpoint — are the same
whether or not a run was interrupted. Re-running on the same workdir restores the last
checkpoint (and says so), drops metrics logged after it, and continues to a bit-identical
result.

Progress shows from the start: a note before the first compilations, then steps, steps/s
and ETA (`runtime.progress`). Where an experiment promises that cutting a chunk changes
no number (`Experiment.piece_steps`), a chunk runs as several calls of about
`PIECE_SECONDS` each, so that a long chunk (a CPU's offline phase) shows progress too.
A stop asked for between calls (`should_stop`: SIGTERM or the first Ctrl-C under
`experiments.run`) finishes the call under way, writes a checkpoint of that step and
ends with `Preempted`; a KeyboardInterrupt raised inside a call ends it with
`Interrupted`, the step under way not saved. Either message says where to resume from.
A checkpoint that cannot be read is moved aside and the newest readable one used.
"""

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metalearn.runtime.checkpoint import Checkpointer
from metalearn.runtime.experiment import Experiment
from metalearn.runtime.metrics import MetricWriter, read_metrics, truncate_metrics, write_json
from metalearn.runtime.progress import Progress
from metalearn.runtime.sharding import barrier, host_get

SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"


DIVERGED_FILE = "diverged.json"
# Seconds a `train_chunk` call takes where the experiment lets the loop cut chunks
# (`Experiment.piece_steps`): progress shows at least this often.
PIECE_SECONDS = 2.0


class DivergenceError(FloatingPointError):
    """The run diverged: `Experiment.check_divergence` named a quantity past its bound.

    The loop writes `<workdir>/diverged.json` ({"step", "message"}) and the metrics up
    to that step before raising, so sweeps can report the run as diverged.
    """


class NonFiniteError(DivergenceError):
    """A loss or state became NaN or infinite; nothing after the last finite step is saved."""


def first_non_finite(metrics: dict[str, Any]) -> tuple[int, str] | None:
    """(index along the leading axis, name) of the first non-finite metric, or None."""
    worst = None
    for name, value in metrics.items():
        arr = np.asarray(value, dtype=np.float64)
        bad = ~np.isfinite(arr.reshape(arr.shape[0], -1) if arr.ndim else arr.reshape(1, 1))
        rows = np.flatnonzero(bad.any(axis=1))
        if rows.size and (worst is None or rows[0] < worst[0]):
            worst = (int(rows[0]), name)
    return worst


def _state_is_finite(state: Any) -> bool:
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    # host_get: a state spread over several processes (an ML³ run's seeds) is gathered.
    return all(bool(np.isfinite(x).all()) for x in host_get(leaves))


def _check_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes config.json, or checks that a resumed workdir was made by the same config."""
    path = os.path.join(workdir, CONFIG_FILE)
    current = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != current:
            diff = sorted(
                k
                for k in set(_flatten(saved)) | set(_flatten(current))
                if _flatten(saved).get(k) != _flatten(current).get(k)
            )
            raise ValueError(
                f"{workdir} holds a run with a different config (differs in: {', '.join(diff)}). "
                "Resuming it would mix two experiments: pass a new --workdir, or delete the "
                "old one."
            )
        return
    write_json(path, current)  # by process 0, where several share the workdir


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def train_and_evaluate(
    experiment: Experiment,
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_at: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any] | None:
    """Runs (or resumes) an experiment in `workdir` to the end.

    Args:
      experiment: the experiment to drive.
      config: its config, written to `config.json`.
      workdir: the run directory.
      stop_at: stop after this step as if preempted (for tests of resumption).
      should_stop: polled before every `train_chunk` call and before `finalize`; when
        it returns True (on any process of a multi-process run: all stop at the same
        step) the run writes a checkpoint of the step it has reached and stops with
        `Preempted`: what a signal handler asks for on SIGTERM (a preemption) or Ctrl-C.

    Returns:
      The summary (also written to `summary.json`), or None when stopped early.

    `config.checkpoint_every_minutes` (0 or absent: off) also writes a checkpoint
    between two calls once that many minutes have passed since the last one, so a long
    chunk loses at most that much work to a crash.

    Raises:
      Preempted: `should_stop` asked to stop; a checkpoint of the step reached is written.
      Interrupted: on a KeyboardInterrupt raised inside a call, with where to resume from
        (the step under way is not saved).
      DivergenceError: the run diverged (`NonFiniteError`: a non-finite value).
    """
    if experiment.checkpoint_every % experiment.eval_every:
        raise ValueError(
            f"checkpoint_every ({experiment.checkpoint_every}) must be a multiple of "
            f"eval_every ({experiment.eval_every}): steps run in chunks between evaluations."
        )
    os.makedirs(workdir, exist_ok=True)
    _check_config(workdir, config)
    for kept in experiment.keep_checkpoints:
        if kept % experiment.eval_every or not 0 < kept <= experiment.num_steps:
            raise ValueError(
                f"keep_checkpoints step {kept} must be a multiple of eval_every "
                f"({experiment.eval_every}) within the run's {experiment.num_steps} steps."
            )
    minutes = config.get("checkpoint_every_minutes", 0) or 0
    if not isinstance(minutes, (int, float)) or isinstance(minutes, bool) or minutes < 0:
        raise ValueError(
            f"checkpoint_every_minutes must be a number of minutes >= 0 (0: off); got {minutes!r}."
        )
    ckpt = Checkpointer(workdir, keep_steps=experiment.keep_checkpoints)
    start = ckpt.latest_step()
    progress = Progress(experiment.num_steps, initial=start or 0)
    try:
        progress.note("compiling the initial state" + (" and evaluation" if start is None else ""))
        # Committed where it lives, as a state restored from a checkpoint is: otherwise a
        # resumed run would miss the compiled programs and compile them again.
        state = jax.tree.map(lambda x: jax.device_put(x, x.sharding), experiment.init())
        start, state = ckpt.restore_latest(state, say=lambda line: print(line, flush=True))
        if start is None:
            start = 0
            truncate_metrics(workdir, -1)
        else:
            print(
                f"Resuming from the checkpoint at step {start} of {experiment.num_steps} in "
                f"{workdir}.",
                flush=True,
            )
            truncate_metrics(workdir, start)
        summary = _run(
            experiment, config, workdir, state, start, ckpt, progress, stop_at, should_stop, minutes
        )
    except KeyboardInterrupt as e:
        if isinstance(e, Interrupted):
            raise
        message = interrupted_message(workdir, start, experiment.num_steps, ckpt.latest_step())
        raise Interrupted(message) from e
    finally:
        progress.close()
        ckpt.close()
    if summary is None:
        return None
    write_json(os.path.join(workdir, SUMMARY_FILE), summary)
    return summary


class Interrupted(KeyboardInterrupt):
    """The run was interrupted (Ctrl-C; SIGTERM under `experiments.run`); the message
    says at which step, where the last checkpoint is and how to resume from it."""


def interrupted_message(
    workdir: str, step: int | None, num_steps: int | None, checkpoint: int | None
) -> str:
    """What an interrupted run tells its user.

    Args:
      workdir: the run directory.
      step: the last step the run finished (None: interrupted while starting, before it
        knew).
      num_steps: the run's steps (None: not known yet).
      checkpoint: the step of the last checkpoint in `workdir` (None: none yet).
    """
    at = "while starting" if step is None else f"at step {step}"
    at += f" of {num_steps}" if step is not None and num_steps is not None else ""
    folder = os.path.join(os.path.abspath(workdir), "checkpoints")
    if checkpoint is None:
        return (
            f"Interrupted {at}. No checkpoint was written yet in {folder}: re-running the "
            "same command starts the run again from step 0."
        )
    return (
        f"Interrupted {at}. The last checkpoint is at step {checkpoint} in {folder}; "
        "re-run the same command to resume from it."
    )


class Preempted(Interrupted):
    """The run stopped on request (`should_stop`: SIGTERM or Ctrl-C under
    `experiments.run`) after the step under way, with a checkpoint of that step: a
    re-run resumes from it to the result of an uninterrupted run."""


class _StopRequested(Exception):
    """Internal: `should_stop` said stop; the loop checkpoints, then raises `Preempted`."""


def agreed(flag: bool) -> bool:
    """`flag` on one process; on several, True where any process's is (every process
    then takes the same branch: the same programs, the same checkpoints)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def _run(experiment, config, workdir, state, start, ckpt, progress, stop_at, should_stop, minutes):
    """The loop of `train_and_evaluate` from step `start`: its summary, or None when
    stopped at `stop_at`."""

    def poll():
        if should_stop is not None and agreed(should_stop()):
            raise _StopRequested

    def due():  # `checkpoint_every_minutes` since the last checkpoint
        return bool(minutes) and agreed(time.monotonic() - saved[0] >= 60 * minutes)

    def save(step, state):
        if not _state_is_finite(state):
            raise NonFiniteError(f"The state became non-finite by step {step}; not saved.")
        writer.flush()
        ckpt.save(step, state)
        saved[0] = time.monotonic()

    saved = [time.monotonic()]  # when the last checkpoint was written

    writer = MetricWriter(workdir)
    log_every = config.get("log_every", 1)
    step = start
    try:
        if start == 0:
            _write_checked(writer, 0, experiment.evaluate(state, 0), "evaluation")
        # Every process of a multi-host run must call the same programs: the cuts of a
        # chunk, chosen by the time a call takes, would differ from host to host.
        pieces = _Pieces(experiment.piece_steps if jax.process_count() == 1 else None)
        while step < experiment.num_steps and (stop_at is None or step < stop_at):
            end = step + min(
                experiment.eval_every - step % experiment.eval_every, experiment.num_steps - step
            )
            while step < end:
                poll()
                num = pieces.size(end - step)
                if step == start:
                    phase = experiment.phase(step)
                    progress.note(
                        f"compiling and running the first {num} step{'s' * (num > 1)}"
                        + (f" [{phase}]" if phase else "")
                    )
                state, metrics = experiment.train_chunk(state, step, num)
                metrics = jax.device_get(metrics)
                pieces.done(num)
                bad = first_non_finite(metrics)
                if bad is not None:
                    raise NonFiniteError(
                        f"Non-finite {bad[1]} at step {step + bad[0] + 1} (in meta-training). "
                        f"Nothing after step "
                        f"{ckpt.latest_step() or 0} was checkpointed. Usual causes: a learning "
                        "rate too high for the inner or meta optimizer, or Adam differentiated "
                        "without eps_root; lower it and re-run on a fresh --workdir."
                        + _estimator_hint(experiment.estimators())
                    )
                for i in range(num):
                    if (step + i + 1) % log_every == 0:
                        writer.write(step + i + 1, {k: v[i] for k, v in metrics.items()})
                _raise_if_diverged(experiment.check_divergence(metrics, step))
                progress.update(num, experiment.phase(step))
                step += num
                if step < end and due():  # between the calls of a chunk too
                    save(step, state)
            if step % experiment.eval_every == 0 or step == experiment.num_steps:
                evaluation = jax.device_get(experiment.evaluate(state, step))
                _write_checked(writer, step, evaluation, "evaluation")
                _raise_if_diverged(experiment.check_divergence(evaluation, step))
            if (
                step % experiment.checkpoint_every == 0
                or step == experiment.num_steps
                or step in experiment.keep_checkpoints
                or due()
            ):
                save(step, state)
        progress.close()
        if step < experiment.num_steps:
            return None
        writer.flush()
        poll()
        barrier("metrics written")  # process 0's metrics.jsonl, complete, for every process
        return experiment.finalize(state, read_metrics(workdir), workdir)
    except DivergenceError as e:
        writer.flush()
        write_json(
            os.path.join(workdir, DIVERGED_FILE),
            {"step": getattr(e, "step", None), "message": str(e)},
        )
        raise
    except _StopRequested:
        # Between two calls: the state is that of `step`, which a checkpoint now holds.
        if ckpt.latest_step() != step:
            save(step, state)
        progress.close()
        folder = os.path.join(os.path.abspath(workdir), "checkpoints")
        raise Preempted(
            f"Stopped at step {step} of {experiment.num_steps} on request, after the step "
            f"under way; checkpoint written at step {step} in {folder}. Re-run the same "
            "command to resume from it."
        ) from None
    except KeyboardInterrupt as e:
        # The step under way is dropped: the last checkpoint is where a re-run resumes.
        # (`train_and_evaluate` closes the progress bar before the message is shown.)
        message = interrupted_message(workdir, step, experiment.num_steps, ckpt.latest_step())
        raise Interrupted(message) from e
    finally:
        writer.close()


_ES_HINT = (
    " With estimator='{}' the perturbed unrolls can overflow first: lower "
    "meta.estimator_options.sigma (now the loss is evaluated at φ ± σ·noise)."
)
_ESTIMATOR_HINT = {
    "es": _ES_HINT.format("es"),
    "pes": _ES_HINT.format("pes"),
    "implicit": (
        " With estimator='implicit' a Hessian that is not positive definite makes the "
        "conjugate-gradient solve diverge: raise meta.estimator_options.damping."
    ),
}


class _Pieces:
    """Sizes of the `train_chunk` calls a run's chunks are cut into: whole chunks, or
    with `Experiment.piece_steps` g, g·2^k steps that take at most about `PIECE_SECONDS`
    (the first call g steps: it includes compilation), so that progress shows within a
    chunk. Where the cuts fall changes no number (the experiment's promise)."""

    def __init__(self, granularity: int | None):
        self.granularity = granularity
        self.seconds_per_step = None
        self._calls = 0
        self._t0 = 0.0

    def size(self, left: int) -> int:
        """Steps of the next call, `left` steps before the chunk's end."""
        self._t0 = time.perf_counter()
        g = self.granularity
        if not g:
            return left
        if self.seconds_per_step is None:
            return min(g, left)
        # A power of two of pieces: few distinct call sizes, so few programs that depend
        # on the size (a stack of the steps' metrics, say) compile.
        pieces = max(1, int(PIECE_SECONDS / max(self.seconds_per_step, 1e-9)) // g)
        return min(left, g * (1 << (pieces.bit_length() - 1)))

    def done(self, num: int) -> None:
        """The last call's `num` steps are done: measures their time (from the second call,
        whose time no compilation inflates)."""
        self._calls += 1
        if self._calls > 1:
            self.seconds_per_step = (time.perf_counter() - self._t0) / num


def _estimator_hint(names: tuple[str, ...]) -> str:
    """The hints for the estimators a run uses (`Experiment.estimators`), once each."""
    return "".join(_ESTIMATOR_HINT.get(name, "") for name in dict.fromkeys(names))


def _raise_if_diverged(found: tuple[int, str] | None) -> None:
    if found is not None:
        error = DivergenceError(found[1])
        error.step = found[0]
        raise error


def _write_checked(writer: MetricWriter, step: int, metrics: dict[str, Any], what: str) -> None:
    metrics = jax.device_get(metrics)
    bad = first_non_finite({k: np.asarray(v)[None] for k, v in metrics.items()})
    if bad is not None:
        raise NonFiniteError(
            f"Non-finite {bad[1]} at step {step} (in the {what}); nothing after step {step} "
            "was checkpointed. Lower the learning rates and re-run on a fresh --workdir."
        )
    writer.write(step, metrics)
