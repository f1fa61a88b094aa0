"""Running `experiments.run` jobs from the table scripts (sweeps and reproductions)."""

import json
import os
import subprocess
import sys

# The overrides of the two base optimizers the image tables compare (configs/_image.py).
OPTIMIZERS = {
    "nesterov": [
        "--config.inner.optimizer.name=nesterov",
        "--config.inner.optimizer.momentum=0.9",
        "--config.inner.optimizer.weight_decay=5e-4",
    ],
    "sgd": [
        "--config.inner.optimizer.name=sgd",
        "--config.inner.optimizer.momentum=0.0",
        "--config.inner.optimizer.weight_decay=0.0",
    ],
}


class Diverged(RuntimeError):
    """The job stopped because it diverged; `.step` and the message say where and why."""

    def __init__(self, workdir: str, info: dict):
        super().__init__(info.get("message", "diverged"))
        self.workdir, self.step = workdir, info.get("step")


def diverged(workdir: str) -> dict | None:
    """The `diverged.json` a job that diverged left in its workdir, or None."""
    path = os.path.join(workdir, "diverged.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run(config: str, workdir: str, overrides: list[str] = (), *, quiet: bool = True) -> dict:
    """Runs `python -m experiments.run` for one job unless its summary exists.

    Args:
      config: the --config value, `configs/<name>.py[:variant]`.
      workdir: the run directory; a finished one (with `summary.json`) is reused, an
        unfinished one resumes.
      overrides: further flags, e.g. `--config.seed=1`.
      quiet: capture the job's output (shown only if it fails) instead of streaming it.

    Returns:
      The job's summary.

    Raises:
      Diverged: the job diverged (now or in an earlier call: it is not run again).
      RuntimeError: the job failed otherwise; the message ends with its error output.
    """
    summary = os.path.join(workdir, "summary.json")
    if not os.path.exists(summary):
        if (info := diverged(workdir)) is not None:
            raise Diverged(workdir, info)
        cmd = [sys.executable, "-m", "experiments.run", f"--config={config}"]
        proc = subprocess.run(
            [*cmd, f"--workdir={workdir}", *overrides], capture_output=quiet, text=True
        )
        if proc.returncode and (info := diverged(workdir)) is not None:
            raise Diverged(workdir, info)
        if proc.returncode:
            tail = f":\n{proc.stderr[-3000:]}" if quiet else "; see its output above."
            raise RuntimeError(f"{config} in {workdir} failed (exit {proc.returncode}){tail}")
    with open(summary) as f:
        return json.load(f)


def markdown_table(rows: dict[str, dict], columns, first: str = "variant") -> str:
    """A markdown table, one row per entry of `rows` (name → summary): `columns` are
    `(key, heading, format)`; a summary's `{'mean', 'std'}` shows its mean, None '—'."""
    lines = [f"| {first} | " + " | ".join(c[1] for c in columns) + " |"]
    lines.append("|" + "---|" * (len(columns) + 1))
    for name, summary in rows.items():
        cells = []
        for key, _, fmt in columns:
            value = summary.get(key)
            if isinstance(value, dict):
                value = value["mean"]
            cells.append("—" if value is None else fmt.format(value))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def phase2_record(workdir: str) -> tuple[list[dict], int, dict]:
    """A finished self-training run's history, the step its Phase 2 starts at (the end
    of Phase 1 or of Phase G) and its Phase 2 numbers recomputed from the history
    (`hacking.phase2_summary`), so that runs finished by older code agree."""
    from metalearn.hacking import phase2_summary
    from metalearn.runtime.metrics import read_metrics

    history = read_metrics(workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    start = config["phase_g"]["steps"] if "phase_g" in config else config["meta"]["steps"]
    detector = config["detector"]
    numbers = phase2_summary(
        history,
        start,
        detector.get("degrade_margin", 0.1),
        tolerance=detector["tolerance"],
        window=detector["window"],
    )
    return history, start, numbers
