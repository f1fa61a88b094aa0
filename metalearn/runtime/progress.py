"""Progress of long runs: a tqdm bar on a terminal, plain log lines elsewhere.

A run says what it is doing from its first second: a note before each compilation
(`note`), then steps done, steps/s and the ETA, with the phase of the step (e.g. an
offline ML³ phase) where the experiment names one.
"""

import sys
import time

from tqdm import tqdm


def format_seconds(seconds: float) -> str:
    """'42s', '3m05s' or '2h07m': a duration for a progress line."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Reports steps done, steps/s and ETA.

    On a terminal it draws a tqdm bar; otherwise (CI, log files) it logs a line at most
    every `interval_s` seconds and at the end. The rate counts from the end of the first
    update (the first piece of a run or of a resumed run includes its compilation), so
    it measures training, not compiling.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        desc: str = "train",
        interval_s: float = 10,
        file=None,
        tty: bool | None = None,
    ):
        self._total, self._done, self._desc = total, initial, desc
        self._start_done, self._t0, self._last = initial, time.perf_counter(), 0.0
        self._interval = interval_s
        self._first = None
        self._phase = ""
        self._file = file if file is not None else sys.stderr
        tty = self._file.isatty() if tty is None else tty
        self._bar = (
            tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                file=self._file,
            )
            if tty
            else None
        )

    def note(self, message: str) -> None:
        """Prints `<desc>: step <done>/<total>: <message>` at once (above the bar)."""
        line = f"{self._desc}: step {self._done}/{self._total}: {message}"
        if self._bar is not None:
            self._bar.write(line, file=self._file)
        else:
            print(line, file=self._file, flush=True)

    def update(self, n: int, phase: str = "") -> None:
        """`n` more steps done; `phase` names what they did (shown when given)."""
        self._done += n
        changed, self._phase = phase != self._phase, phase
        if self._bar is not None:
            if changed:
                self._bar.set_postfix_str(phase, refresh=False)
            self._bar.update(n)
            return
        now = time.perf_counter()
        at = f"{self._desc}: step {self._done}/{self._total}" + (f" [{phase}]" if phase else "")
        if self._first is None:  # the first piece: compilation plus its steps
            self._first = now - self._t0
            self._start_done, self._t0, self._last = self._done, now, now
            print(
                f"{at} (the first steps, compilation included: {format_seconds(self._first)})",
                file=self._file,
                flush=True,
            )
            return
        if now - self._last >= self._interval or self._done >= self._total or changed:
            self._last = now
            rate = (self._done - self._start_done) / max(now - self._t0, 1e-9)
            eta = (self._total - self._done) / rate if rate > 0 else float("inf")
            print(
                f"{at} ({100 * self._done / self._total:.0f}%), {rate:.3g} steps/s, "
                f"ETA {format_seconds(eta)}",
                file=self._file,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
