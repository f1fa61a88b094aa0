"""Wall time of the ML³ sine-regression protocol (5 seeds, 500 meta iterations), end to end.

    python -m benchmarks.ml3_sine [--repeats=2] [--compare_level=3] [--reference=none]
        [--noreference_cadence] [--dry]

Prints one markdown table. Each row is one fresh process, as a user runs it:
`experiments.run --config=configs/ml3_sine.py` with evaluation every 10 meta iterations
(the config's, the public code's cadence) and with the final evaluation only
(`--config.eval.every=500 --config.checkpoint_every=500`), each cold (an empty
compilation cache) and then warm (a second process, a new workdir, the same cache);
where torch and torchopt import, the PyTorch + torchopt script of the same protocol
(`../shared/reference/ml3_sine_torchopt.py`, `NT=1`, seeds one after another) at both
cadences; and a process that only imports jax and metalearn and starts the CPU backend.

Our runs are `experiments.run`'s own `main` in a process that also times its phases:
start-up (interpreter, imports, backend), tracing and lowering, XLA compilation of the
programs the cache did not have, reading the ones it had, then the run time of
meta-training, evaluation (the loop's and the final meta-test's), figures, checkpoints
(orbax saves in background threads: what is shown is the time the loop waited), metrics
(`metrics.jsonl` and TensorBoard, every step), the learned-loss files of every seed, and
the rest (flags and config, the loop, `summary.json`, the interpreter's exit). The
reference's own split is its setup, meta-train and meta-test times; its start-up is the
rest of its wall time (the interpreter, importing torch). CPU is user + sys of the whole
process; with `--repeats`, each row is its fastest run.
"""

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

from absl import app, flags

_REFERENCE = flags.DEFINE_string(
    "reference",
    "auto",
    "Python with torch and torchopt for the reference rows: auto (this one, else "
    "~/torchref/bin/python, the reference README's), a path, or none.",
)
_COMPARE_LEVELS = flags.DEFINE_multi_integer(
    "compare_level",
    [],
    "Also run the final-evaluation protocol cold with XLA's LLVM at these levels "
    "(3: XLA's default; the config's is 2).",
)
_REPEATS = flags.DEFINE_integer(
    "repeats",
    1,
    "Runs of each row but the torchopt script's public cadence (minutes; once): the "
    "fastest is shown, each cold one with a new cache and its warm one after it.",
)
_REFERENCE_CADENCE = flags.DEFINE_bool(
    "reference_cadence",
    True,
    "Also run the torchopt script at the public cadence (7-8 minutes on a 2-core CPU).",
)
_DRY = flags.DEFINE_bool(
    "dry", False, "The :smoke variant and 20 reference iterations: checks the benchmark."
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_SCRIPT = os.path.join(ROOT, "..", "shared", "reference", "ml3_sine_torchopt.py")
# The issue-29 goals: the final-evaluation protocol against the torchopt script's, and
# the public cadence's cold wall time.
GOAL_COLD_SPEEDUP, GOAL_WARM_SPEEDUP, GOAL_CADENCE_COLD_S = 2.0, 4.0, 8.0
COLUMNS = (
    "wall s",
    "CPU s",
    "start-up",
    "trace + lower",
    "compile (programs)",
    "cache reads (hits)",
    "meta-train",
    "evaluation",
    "figures",
    "checkpoints",
    "metrics",
    "learned-loss files",
    "other",
)


class _Phases:
    """Exclusive wall time of wrapped calls, and the JAX compilation inside each."""

    def __init__(self):
        self.wall = defaultdict(float)
        self.stack = ["other"]
        self.spans = []  # (start, end, event, phase), time.time()
        self.retrieval = 0.0
        self.hits = 0

    def wrap(self, owner, attr: str, phase: str, block: bool = False) -> None:
        import jax

        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.stack.append(phase)
            t = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                return jax.block_until_ready(out) if block else out
            finally:
                dt = time.perf_counter() - t
                self.stack.pop()
                self.wall[phase] += dt
                self.wall[self.stack[-1]] -= dt

        setattr(owner, attr, timed)

    def on_span(self, event: str, start: float, end: float, **kwargs) -> None:
        del kwargs
        if event.startswith("/jax/core/compile/"):
            self.spans.append((start, end, event, self.stack[-1]))

    def on_duration(self, event: str, duration: float, **kwargs) -> None:
        del kwargs
        if event == "/jax/compilation_cache/cache_retrieval_time_sec":
            self.retrieval += duration
            self.hits += 1

    def split(self, total: float) -> dict[str, float]:
        """Trace + lower, compile (less cache reads), cache reads, and each phase's time
        less its compilation; a nested jit's trace, inside its caller's, counted once."""
        from jax._src import dispatch

        def union(events=None, phase=None):
            time_, end = 0.0, float("-inf")
            for s, e, ev, ph in sorted(self.spans):
                if (events is None or ev in events) and (phase is None or ph == phase):
                    time_ += max(0.0, e - max(s, end))
                    end = max(end, e)
            return time_

        backend = {dispatch.BACKEND_COMPILE_EVENT}
        tracing = {dispatch.JAXPR_TRACE_EVENT, dispatch.JAXPR_TO_MLIR_MODULE_EVENT}
        compiles = sum(ev in backend for _, _, ev, _ in self.spans)
        out = {
            "trace + lower": union(tracing),
            "compile": union(backend) - self.retrieval,
            "programs": compiles - self.hits,
            "cache reads": self.retrieval,
            "hits": self.hits,
        }
        self.wall["other"] += total - sum(self.wall.values())
        out.update({p: w - union(phase=p) for p, w in self.wall.items()})
        return out


def timed_run(out_path: str, spawned: float) -> None:
    """The child of an `ours` row: `experiments.run` on `sys.argv`, its phases timed and
    written to `out_path` as JSON (`spawned`: the parent's time.time() at the start)."""
    import jax
    from jax import monitoring

    import experiments
    import metalearn
    from experiments import ml3_sine, run
    from metalearn import plots
    from metalearn.runtime import checkpoint, metrics

    del experiments, metalearn  # imported for the start-up time
    jax.devices()  # the backend, which any run starts first
    imported = time.time()
    phases = _Phases()
    monitoring.register_event_time_span_listener(phases.on_span)
    monitoring.register_event_duration_secs_listener(phases.on_duration)
    cls = ml3_sine.SineRegression
    phases.wrap(cls, "init", "meta-train", block=True)
    phases.wrap(cls, "train_chunk", "meta-train", block=True)
    phases.wrap(cls, "evaluate", "evaluation", block=True)
    phases.wrap(cls, "_meta_test", "evaluation", block=True)
    phases.wrap(plots, "meta_train_curve", "figures")
    phases.wrap(plots, "meta_test_curve", "figures")
    phases.wrap(cls, "save_learned_losses", "learned-loss files")
    for attr in ("__init__", "save", "close"):
        phases.wrap(checkpoint.Checkpointer, attr, "checkpoints")
    for attr in ("__init__", "write", "flush", "close"):
        phases.wrap(metrics.MetricWriter, attr, "metrics")
    start = time.perf_counter()
    try:
        app.run(run.main, flags_parser=run.parse_flags)
    except SystemExit as e:
        if e.code:
            raise
    row = phases.split(time.perf_counter() - start)
    with open(out_path, "w") as f:
        json.dump({"start-up": imported - spawned, "end": time.time(), **row}, f)


def _measure(cmd: list[str], env: dict[str, str | None]) -> tuple[float, float, str, float]:
    """(wall s, CPU s, stdout, peak RSS MiB) of a fresh process; `env` changes the
    environment (None: unset). CPU time and peak RSS are the process's own (`os.wait4`)."""
    env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read()
        if proc.returncode:
            err.seek(0)
            raise subprocess.CalledProcessError(proc.returncode, cmd, stdout, err.read())
    return wall, usage.ru_utime + usage.ru_stime, stdout, usage.ru_maxrss / 1024


def ours(
    run_args: list[str], cache: str, tmp: str, env: dict[str, str | None] | None = None
) -> dict[str, float]:
    """One `experiments.run` process on a new workdir, with the compilation cache `cache`
    (`env`: more changes to its environment, e.g. XLA_FLAGS)."""
    workdir = tempfile.mkdtemp(dir=tmp)
    out = os.path.join(workdir, "phases.json")
    spawned = time.time()
    child = f"import benchmarks.ml3_sine as b; b.timed_run({out!r}, {spawned!r})"
    argv = [f"--workdir={workdir}/run", f"--compilation_cache={cache}", *run_args]
    env = {
        "PYTHONPATH": ROOT,
        "METALEARN_COMPILATION_CACHE": None,
        "JAX_COMPILATION_CACHE_DIR": None,
        **(env or {}),
    }
    wall, cpu, _, peak = _measure([sys.executable, "-c", child, *argv], env)
    ended = time.time()
    with open(out) as f:
        row = json.load(f)
    row["other"] += ended - row.pop("end")  # the interpreter's exit
    with open(os.path.join(workdir, "run", "summary.json")) as f:
        row["final_mse"] = json.load(f)["final_mse"]["learned_loss"]["mean"]
    return {"wall s": wall, "CPU s": cpu, "peak MiB": peak, **row}


def reference(python: str, every: int, seeds: list[int], iters: int) -> dict[str, float]:
    """The torchopt script in a fresh process; its setup, meta-train and meta-test sums."""
    env = {"NT": "1", "ITERS": str(iters), "EVAL_EVERY": str(every)}
    wall, cpu, stdout, peak = _measure([python, REFERENCE_SCRIPT, *map(str, seeds)], env)
    row = {"wall s": wall, "CPU s": cpu, "peak MiB": peak}
    row.update({"meta-train": 0.0, "evaluation": 0.0, "other": 0.0})
    for line in stdout.splitlines():
        if line.startswith("seed "):
            # seed 0: wall 2.51s (meta-train 2.20s, meta-test 0.20s, setup 0.11s) ...
            words = line.replace("(", " ").replace(")", " ").replace(",", " ").split()
            row["meta-train"] += float(words[words.index("meta-train") + 1].rstrip("s"))
            row["evaluation"] += float(words[words.index("meta-test") + 1].rstrip("s"))
            row["other"] += float(words[words.index("setup") + 1].rstrip("s"))
            row["final_mse"] = None
        if line.startswith("torchopt: total wall"):
            row["final_mse"] = float(line.split("learned ")[1].split("±")[0])
    seeds_wall = row["meta-train"] + row["evaluation"] + row["other"]
    row["start-up"] = wall - seeds_wall  # interpreter, import torch
    return row


def _reference_python(setting: str) -> str | None:
    if setting == "none" or not os.path.exists(REFERENCE_SCRIPT):
        return None
    candidates = (
        [sys.executable, os.path.expanduser("~/torchref/bin/python")]
        if setting == "auto"
        else [setting]
    )
    for python in candidates:
        if os.path.exists(python):
            check = subprocess.run([python, "-c", "import torch, torchopt"], capture_output=True)
            if check.returncode == 0:
                return python
    return None


def _cell(row: dict, column: str) -> str:
    if column == "compile (programs)" and "programs" in row:
        return f"{row['compile']:.2f} ({row['programs']})"
    if column == "cache reads (hits)" and "hits" in row:
        return f"{row['cache reads']:.2f} ({row['hits']})"
    value = row.get(column)
    return "—" if value is None else f"{value:.2f}"


def main(argv):
    del argv
    from configs import ml3_sine

    variant = "smoke" if _DRY.value else None
    config = ml3_sine.get_config(variant)
    steps, seeds = config.meta.steps, list(config.seeds)
    base = [f"--config=configs/ml3_sine.py{':smoke' if variant else ''}"]
    final_only = [f"--config.eval.every={steps}", f"--config.checkpoint_every={steps}"]
    cadence = f"every {config.eval.every}"
    python = _reference_python(_REFERENCE.value)
    iters = 20 if _DRY.value else steps
    runs = defaultdict(list)  # row name -> one result per repetition
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(_REPEATS.value):
            for name, args in ((cadence, base), ("final only", base + final_only)):
                cache = tempfile.mkdtemp(dir=tmp)  # empty: cold, then warm
                runs[f"ours, {name}, cold"].append(ours(args, cache, tmp))
                runs[f"ours, {name}, warm"].append(ours(args, cache, tmp))
            for level in _COMPARE_LEVELS.value:
                option = f"--config.compiler_options.xla_backend_optimization_level={level}"
                row = ours(base + final_only + [option], tempfile.mkdtemp(dir=tmp), tmp)
                runs[f"ours, final only, cold, LLVM O{level}"].append(row)
            if python is not None:
                runs["torchopt, final only"].append(reference(python, 0, seeds, iters))
            wall, cpu, _, _ = _measure(
                [sys.executable, "-c", "import jax, metalearn; jax.devices()"],
                {"PYTHONPATH": ROOT},
            )
            runs["import jax + metalearn, start the backend"].append({"wall s": wall, "CPU s": cpu})
        if python is not None and _REFERENCE_CADENCE.value:  # minutes: once
            runs[f"torchopt, {cadence}"].append(reference(python, 10, seeds, iters))
    rows = [(name, min(rs, key=lambda r: r["wall s"])) for name, rs in runs.items()]

    import jax

    print(
        f"\nML³ sine regression, {len(seeds)} seeds × {steps} meta iterations, each row a "
        f"fresh process; {os.cpu_count()}-core {jax.devices()[0].platform.upper()}, "
        f"jax {jax.__version__}; seconds"
    )
    print("| run | " + " | ".join(COLUMNS) + " | final MSE |")
    print("|---|" + "---:|" * (len(COLUMNS) + 1))
    for name, row in rows:
        mse = row.get("final_mse")
        cells = [_cell(row, c) for c in COLUMNS] + ["—" if mse is None else f"{mse:.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    by_name = dict(rows)

    def ratio(a: str, b: str) -> str:
        wall = by_name[a]["wall s"] / by_name[b]["wall s"]
        return f"{wall:.2f}× ({by_name[a]['CPU s'] / by_name[b]['CPU s']:.2f}× in CPU time)"

    if "torchopt, final only" in by_name:
        for temp, goal in (("cold", GOAL_COLD_SPEEDUP), ("warm", GOAL_WARM_SPEEDUP)):
            ours_name = f"ours, final only, {temp}"
            speedup = by_name["torchopt, final only"]["wall s"] / by_name[ours_name]["wall s"]
            verdict = "met" if speedup >= goal else "not met"
            print(
                f"- final only, {temp}: {ratio('torchopt, final only', ours_name)} "
                f"the torchopt script's speed (goal ≥ {goal:g}× in wall time: {verdict})"
            )
        for temp in ("cold", "warm") if f"torchopt, {cadence}" in by_name else ():
            print(
                f"- {cadence}, {temp}: "
                f"{ratio(f'torchopt, {cadence}', f'ours, {cadence}, {temp}')} "
                "the torchopt script's speed at the same cadence"
            )
    cold = by_name[f"ours, {cadence}, cold"]["wall s"]
    verdict = "met" if cold <= GOAL_CADENCE_COLD_S else "not met"
    print(f"- {cadence}, cold: {cold:.1f} s (goal ≤ {GOAL_CADENCE_COLD_S:g} s: {verdict})")


if __name__ == "__main__":
    app.run(main)
