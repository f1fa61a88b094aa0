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
