"""Speed and memory of the ML³ sine-regression protocol (5 seeds, 500 meta iterations).

    python -m benchmarks.ml3_sine [--repeats=3]

Prints one table: compile time of each program, meta-train iterations/s, meta-test
steps/s, the wall time of the whole protocol through `experiments.run` (a fresh process
and workdir, so compilation, logging, checkpoints and figures included), and peak
memory. The reference is the public PyTorch + higher code of the same protocol on a
2-core CPU: about 60 s per seed (4 ms per meta iteration, 0.74 s per evaluation of
10 tasks × 100 steps).
"""

import resource
import subprocess
import sys
import tempfile
import time

import jax
from absl import app, flags

import experiments
from configs import ml3_sine

_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions of each steady-state call.")

REFERENCE_S_PER_SEED = 60.0


def timed(fn, *args):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t


def best_of(fn, *args):
    return min(timed(fn, *args)[1] for _ in range(_REPEATS.value))


def main(argv):
    del argv
    config = ml3_sine.get_config()
    exp = experiments.make(config)
    seeds, steps = len(config.seeds), config.meta.steps
    rows = []

    state, t_init = timed(exp.init)
    _, t_first = timed(exp.train_chunk, state, 0, steps)
    t_train = best_of(exp.train_chunk, state, 0, steps)
    rows.append(("compile: init", f"{t_init:.2f} s", "first call"))
    rows.append(("compile: meta-train (500 iterations)", f"{t_first - t_train:.2f} s", ""))
    rows.append(
        (
            "meta-train iterations/s (all seeds)",
            f"{steps / t_train:,.0f}",
            f"{seeds} seeds at once; {1e3 * t_train / steps:.3f} ms/iteration",
        )
    )
    rows.append(
        (
            "meta-train seed-iterations/s",
            f"{seeds * steps / t_train:,.0f}",
            f"reference: {1 / 4e-3:,.0f} (4 ms each)",
        )
    )

    _, t_first = timed(exp.evaluate, state, 0)
    t_eval = best_of(exp.evaluate, state, 0)
    rows.append(("compile: Fig. 2c evaluation", f"{t_first - t_eval:.2f} s", ""))
    _, t_first = timed(exp._meta_test, state)
    t_test = best_of(exp._meta_test, state)
    fits = seeds * 2 * (1 + config.data.num_test_tasks)
    test_steps = fits * config.eval.test_steps
    rows.append(
        ("compile: meta-test", f"{t_first - t_test:.2f} s", "shares the evaluation program")
    )
    rows.append(
        (
            "meta-test steps/s",
            f"{test_steps / t_test:,.0f}",
            f"{fits} fits × {config.eval.test_steps} steps in {t_test * 1e3:.1f} ms",
        )
    )
    per_eval = t_test / (seeds * 2 * (1 + config.data.num_test_tasks) / 10)
    rows.append(
        ("time per 10-task × 100-step evaluation", f"{per_eval * 1e3:.2f} ms", "reference: 740 ms")
    )

    with tempfile.TemporaryDirectory() as workdir:
        t = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "experiments.run",
                "--config=configs/ml3_sine.py",
                f"--workdir={workdir}/run",
            ],
            check=True,
            capture_output=True,
        )
        wall = time.perf_counter() - t
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    reference = REFERENCE_S_PER_SEED * seeds
    rows.append(
        (
            "whole 5-seed protocol, end to end",
            f"{wall:.1f} s",
            f"reference ≈ {reference:.0f} s: {reference / wall:.0f}× faster",
        )
    )
    rows.append(("peak memory: whole protocol (RSS)", f"{child_rss:.0f} MiB", "the subprocess"))
    rows.append(
        (
            "peak memory: this benchmark (RSS)",
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB",
            "",
        )
    )

    width = max(len(r[0]) for r in rows)
    print(
        f"\nML³ sine regression on {jax.devices()[0].device_kind} "
        f"({jax.device_count()} device(s), jax {jax.__version__})"
    )
    print(f"| {'what':<{width}} | {'value':>12} | note")
    print(f"|{'-' * (width + 2)}|{'-' * 14}|------")
    for name, value, note in rows:
        print(f"| {name:<{width}} | {value:>12} | {note}")


if __name__ == "__main__":
    app.run(main)
