"""Speed and memory of the ML³ sine-regression protocol (5 seeds, 500 meta iterations).

    python -m benchmarks.ml3_sine [--repeats=3]

Prints one table: compile time of each program, meta-train iterations/s, meta-test
steps/s, the wall and CPU time of the whole protocol through `experiments.run` (a fresh
process and workdir, so compilation, logging, checkpoints and figures included) with the
config's compiler options and with XLA's default LLVM level (`--compare_level`), and
peak memory. The reference is the public PyTorch + higher code of the same protocol on a
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
_COMPARE_LEVELS = flags.DEFINE_multi_integer(
    "compare_level",
    [3],
    "Also run the whole protocol with XLA's LLVM at these levels (3: XLA's default).",
)

REFERENCE_S_PER_SEED = 60.0


def timed(fn, *args):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t


def best_of(fn, *args):
    return min(timed(fn, *args)[1] for _ in range(_REPEATS.value))


def protocol_end_to_end(level: int | None) -> tuple[float, float, float]:
    """(wall s, CPU s, peak RSS MiB) of `experiments.run` of the whole protocol in a
    fresh process and workdir; `level` overrides the config's LLVM optimisation level."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    override = (
        []
        if level is None
        else [f"--config.compiler_options.xla_backend_optimization_level={level}"]
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
                *override,
            ],
            check=True,
            capture_output=True,
        )
        wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, after.ru_maxrss / 1024


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

    reference = REFERENCE_S_PER_SEED * seeds
    for level in (None, *_COMPARE_LEVELS.value):
        wall, cpu, rss = protocol_end_to_end(level)
        what = "config's options" if level is None else f"LLVM at O{level}"
        note = f"CPU (user + sys) {cpu:.1f} s; peak RSS {rss:.0f} MiB"
        if level is None:
            note += f"; reference ≈ {reference:.0f} s: {reference / wall:.0f}× faster"
        rows.append((f"whole 5-seed protocol, end to end ({what})", f"{wall:.1f} s", note))
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
