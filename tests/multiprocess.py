"""Runs JAX programs as several processes on this machine: the multi-host code path on CPUs.

`run_processes` launches N Python processes, each with its own number of CPU devices
(`--xla_force_host_platform_device_count`), and the coordinator, process count and
process id in the environment `metalearn.runtime.sharding.initialize_distributed` reads;
the processes then form one JAX cluster whose CPU devices talk through gloo over TCP on
localhost, as the hosts of a multi-host run do over the network.

    results = run_processes(["-m", "tests.experiments._multiprocess_child", ...], 2, 4, 120)
    [r.stdout for r in results]

Every process is waited for with one deadline; on the first failure or at the deadline
the others are killed (a process whose peer has died blocks in its next collective),
and the error names each process's return code with the tail of its stderr.
`start_processes` starts a launch without waiting, so that two can run side by side
(while one process of a launch compiles, the others often wait for it).
"""

import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence

from metalearn.runtime.sharding import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDERR_TAIL = 3000  # characters of each process's stderr in a failure message
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


@dataclasses.dataclass(frozen=True)
class ProcessResult:
    """One process of a launch.

    Attributes:
      process_id: its JAX process id.
      returncode: its exit status; negative: killed by that signal (-9: by the launcher,
        after a timeout or another process's failure).
      stdout, stderr: all it wrote.
    """

    process_id: int
    returncode: int
    stdout: str
    stderr: str


class ProcessesFailed(AssertionError):
    """A process of a launch failed or the launch timed out; `results` holds them all."""

    def __init__(self, message: str, results: list[ProcessResult]):
        super().__init__(message)
        self.results = results


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(
    process_id: int,
    num_processes: int,
    devices_per_process: int,
    port: int,
    env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of process `process_id`: this one's, `env` on top, then its CPU
    device count, the repository on PYTHONPATH and (for more than one process) the
    coordinator, process count and id."""
    out = {**os.environ, **(env or {})}
    flags = _DEVICE_COUNT_FLAG.sub("", out.get("XLA_FLAGS", "")).split()
    out["XLA_FLAGS"] = " ".join(
        [*flags, f"--xla_force_host_platform_device_count={devices_per_process}"]
    )
    out["JAX_PLATFORMS"] = "cpu"
    out["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, out.get("PYTHONPATH", "")) if p)
    for name in (COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV):
        out.pop(name, None)
    if num_processes > 1:
        out[COORDINATOR_ENV] = f"localhost:{port}"
        out[NUM_PROCESSES_ENV] = str(num_processes)
        out[PROCESS_ID_ENV] = str(process_id)
    return out


def failure_message(reason: str, results: Sequence[ProcessResult]) -> str:
    """`reason`, then every process's return code and the tail of its stderr."""
    parts = [reason]
    for r in results:
        tail = r.stderr[-STDERR_TAIL:]
        cut = "... " if len(r.stderr) > STDERR_TAIL else ""
        parts.append(
            f"--- process {r.process_id}: return code {r.returncode}; stderr "
            f"({len(r.stderr)} chars, last {len(tail)}):\n{cut}{tail}"
        )
    return "\n".join(parts)


def run_processes(
    args: str | Sequence[str],
    num_processes: int,
    devices_per_process: int,
    timeout_s: float,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str = ROOT,
    check: bool = True,
) -> list[ProcessResult]:
    """Runs one Python program as `num_processes` JAX processes and waits for them all.

    Args:
      args: the program: a string of Python code (run with `python -c`), or the
        arguments after `python` (e.g. `["-m", "tests.experiments._multiprocess_child",
        "--workdir", d]`). Every process runs the same program; it tells itself apart
        by `jax.process_index()` once `initialize_distributed()` has run.
      num_processes: processes to launch; 1 launches a plain single-process run (no
        coordinator).
      devices_per_process: CPU devices of each process.
      timeout_s: seconds all of them may take together, from their start.
      env: variables added to each process's environment.
      cwd: their working directory (default: the repository root).
      check: raise `ProcessesFailed` unless every process exits with 0.

    Returns:
      One `ProcessResult` per process, in process-id order.

    Raises:
      ProcessesFailed: (with `check`) a process exited with a non-zero status (the others
        are then killed) or the deadline passed (all are killed); the message shows
        every process's return code and stderr tail.
    """
    with start_processes(
        args, num_processes, devices_per_process, timeout_s, env=env, cwd=cwd
    ) as launch:
        return launch.wait(check=check)


def start_processes(
    args: str | Sequence[str],
    num_processes: int,
    devices_per_process: int,
    timeout_s: float,
    *,
    env: Mapping[str, str] | None = None,
    cwd: str = ROOT,
) -> "Launch":
    """Starts what `run_processes` runs and returns at once: a `Launch` to wait for.

    Several launches can run side by side (each has its own coordinator port); use it
    as a context manager, so that leaving the block kills what is still running.
    """
    command = [sys.executable, "-c", args] if isinstance(args, str) else [sys.executable, *args]
    return Launch(command, num_processes, devices_per_process, timeout_s, env, cwd)


class Launch:
    """The processes of one `start_processes` call."""

    def __init__(self, command, num_processes, devices_per_process, timeout_s, env, cwd):
        self._deadline = time.monotonic() + timeout_s
        self._timeout_s = timeout_s
        self._t0 = time.monotonic()
        port = free_port()
        self._procs, self._files = [], []
        try:
            for i in range(num_processes):
                out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
                self._files.append((out, err))
                self._procs.append(
                    subprocess.Popen(
                        command,
                        cwd=cwd,
                        env=process_env(i, num_processes, devices_per_process, port, env),
                        stdout=out,
                        stderr=err,
                        start_new_session=True,  # its own process group, killed as one
                    )
                )
        except BaseException:
            self.kill()
            raise

    def __enter__(self) -> "Launch":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    def kill(self) -> None:
        """Kills every process still running (and what it started) and reaps them."""
        for p in self._procs:
            if p.poll() is None:
                _kill(p)
        for p in self._procs:
            p.wait()

    def output_so_far(self, process_id: int) -> str:
        """What process `process_id` has written so far, stdout then stderr (read without
        moving the offset it writes at)."""
        texts = []
        for f in self._files[process_id]:
            texts.append(
                os.pread(f.fileno(), os.fstat(f.fileno()).st_size, 0).decode(errors="replace")
            )
        return "".join(texts)

    def send_signal(self, process_id: int, signum: int) -> None:
        """Sends `signum` to process `process_id` alone (not to what it started)."""
        self._procs[process_id].send_signal(signum)

    def wait(self, check: bool = True) -> list[ProcessResult]:
        """Waits for every process (see `run_processes`): their results.

        With `check`, a process that exits with a nonzero status ends the wait (the rest
        are killed, and `ProcessesFailed` says why); without, every process is waited
        for until the deadline, whatever its status (a preempted run exits with 75, and
        one process may exit before the others have written their part).
        """
        try:
            reason = _wait(
                self._procs, self._deadline, self._timeout_s, self._t0, stop_at_failure=check
            )
        finally:
            self.kill()
        results = []
        for i, (p, (out, err)) in enumerate(zip(self._procs, self._files, strict=True)):
            texts = []
            for f in (out, err):
                f.seek(0)
                texts.append(f.read().decode(errors="replace"))
                f.close()
            results.append(ProcessResult(i, p.returncode, *texts))
        if check and reason is not None:
            raise ProcessesFailed(failure_message(reason, results), results)
        return results


def _wait(
    procs: list[subprocess.Popen],
    deadline: float,
    timeout_s: float,
    t0: float,
    *,
    stop_at_failure: bool = True,
):
    """Waits for every process until `deadline` (monotonic), or (`stop_at_failure`)
    until one exits with a nonzero status; None when all exited with 0, else why it
    stopped waiting (the caller kills the rest)."""
    running = set(range(len(procs)))
    failed = None
    while running:
        for i in sorted(running):
            code = procs[i].poll()
            if code is None:
                continue
            running.discard(i)
            if code != 0 and failed is None:
                failed = f"Process {i} of {len(procs)} exited with status {code}"
            if code != 0 and stop_at_failure:
                left = f"; killed processes {sorted(running)}" if running else ""
                return (
                    f"Process {i} of {len(procs)} exited with status {code} after "
                    f"{time.monotonic() - t0:.1f} s{left}."
                )
        if running and time.monotonic() > deadline:
            return (
                f"Timed out after {timeout_s:g} s: processes {sorted(running)} of {len(procs)} "
                "were still running and were killed."
            )
        time.sleep(0.05)
    return None if failed is None else f"{failed}."


def _kill(proc: subprocess.Popen) -> None:
    """Kills a launched process and anything it started (its own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
