"""Running `experiments.run` jobs from the table scripts (sweeps and reproductions)."""

import json
import os
import subprocess
import sys


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
      RuntimeError: the job failed; the message ends with its error output.
    """
    summary = os.path.join(workdir, "summary.json")
    if not os.path.exists(summary):
        cmd = [sys.executable, "-m", "experiments.run", f"--config={config}"]
        proc = subprocess.run(
            [*cmd, f"--workdir={workdir}", *overrides], capture_output=quiet, text=True
        )
        if proc.returncode:
            tail = f":\n{proc.stderr[-3000:]}" if quiet else "; see its output above."
            raise RuntimeError(f"{config} in {workdir} failed (exit {proc.returncode}){tail}")
    with open(summary) as f:
        return json.load(f)
