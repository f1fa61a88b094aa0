"""Progress of long runs: a tqdm bar on a terminal, plain log lines elsewhere."""

import sys
import time

from tqdm import tqdm


class Progress:
    """Reports steps done, steps/s and ETA.

    On a terminal it draws a tqdm bar; otherwise (CI, log files) it logs a line at most
    every `interval_s` seconds and at the end. The rate counts from the end of the first
    update (the first chunk of a run or of a resumed run includes its compilation), so
    it measures training, not compiling.
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "train", interval_s: float = 10):
        self._total, self._done, self._desc = total, initial, desc
        self._start_done, self._t0, self._last = initial, time.perf_counter(), 0.0
        self._interval = interval_s
        self._first = None
        self._bar = (
            tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
            if sys.stderr.isatty()
            else None
        )

    def update(self, n: int) -> None:
        self._done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.perf_counter()
        if self._first is None:  # the first chunk: compilation plus its steps
            self._first = now - self._t0
            self._start_done, self._t0 = self._done, now
            print(
                f"{self._desc}: step {self._done}/{self._total} "
                f"(first chunk, compilation included: {self._first:.1f}s)",
                file=sys.stderr,
                flush=True,
            )
            return
        if now - self._last >= self._interval or self._done >= self._total:
            self._last = now
            rate = (self._done - self._start_done) / max(now - self._t0, 1e-9)
            eta = (self._total - self._done) / rate if rate > 0 else float("inf")
            print(
                f"{self._desc}: step {self._done}/{self._total} "
                f"({100 * self._done / self._total:.0f}%), {rate:.1f} steps/s, ETA {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
