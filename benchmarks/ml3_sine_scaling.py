"""How cost grows with the work: ML³ sine against seeds and devices, its FLOP limit, and
the AdaLFL image step against batch size.

    python -m benchmarks.ml3_sine_scaling                      # every part: 23 minutes here
    python -m benchmarks.ml3_sine_scaling --parts=seeds,limit  # some of them
    python -m benchmarks.ml3_sine_scaling --dry                # tiny sizes: a check, 75 s

Prints one markdown table a part, each followed by what it shows:

- seeds: the ML³ sine protocol (`configs/ml3_sine.py`, final evaluation only:
  `--config.eval.every=500 --config.checkpoint_every=500`) as `benchmarks.ml3_sine.ours`
  runs it (a fresh `experiments.run` process, an empty compilation cache, one device) at
  1, 5, 25 and 125 seeds, beside the PyTorch + torchopt script at the same seeds (one
  after another, `NT=1`; `benchmarks.ml3_sine.reference`); wall and CPU time, phases,
  and each process's own peak RSS (`os.wait4`). Then the marginal cost of a seed: the
  least-squares slope of time over seeds.
- devices: the same protocol at 40 seeds on 1, 2, 4 and 8 CPU devices
  (`XLA_FLAGS=--xla_force_host_platform_device_count=N`); the experiment spreads its
  seeds over `sharding.seed_mesh`, 40 / N a device.
- limit: one seed's FLOPs in a run, from XLA's cost analysis of the experiment's
  compiled programs (init, the meta-train chunk, the fit that evaluation and meta-test
  share), over this CPU's peak float32 rate (a jitted square matmul, best of several):
  the least time a seed can add, against the measured slope. XLA counts a while loop's
  body once, whatever its trip count, so each looped program is compiled at 0 and 1
  trips and a call of K trips is counted as f(0) + K·(f(1) − f(0)); one seed's FLOPs are
  the difference between 2 seeds and 1.
- images: the AdaLFL and baseline image steps of `benchmarks.image_step` (its
  `_setup`: synthetic CIFAR-10-shaped batches), LeNet-5 and ResNet-20, at batch 32 to
  512, each (model, batch) in a fresh process: step time, the compiled step's
  `memory_analysis()` (temp + argument + output bytes), FLOP rate and peak RSS. Each step
  is `jax.jit` of the experiment's `train_step` (its program inlined), compiled once,
  analysed and timed, as `image_step --profile` analyses it.

The load average (`/proc/loadavg`) is printed at the start and the end: other jobs on
the machine slow every row.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks.ml3_sine import ROOT, _measure, _reference_python, ours, reference

SEEDS = (1, 5, 25, 125)
DEVICES = (1, 2, 4, 8)
DEVICE_SEEDS = 40  # divisible by every device count
MODELS = ("lenet5", "resnet20")
BATCHES = (32, 64, 128, 256, 512)
GOAL_LIMIT_FACTOR = 2.0  # issue 29: a seed's marginal time within 2× of the FLOP limit
PARTS = ("seeds", "devices", "limit", "images")


def _load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def slope(xs, ys) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through the points (xs, ys)."""
    a, b = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def _seeds_arg(n: int) -> str:
    return "(" + ",".join(map(str, range(n))) + ",)"


def _run_args(dry: bool, num_seeds: int) -> list[str]:
    from configs import ml3_sine

    steps = ml3_sine.get_config("smoke" if dry else None).meta.steps
    return [
        f"--config=configs/ml3_sine.py{':smoke' if dry else ''}",
        f"--config.eval.every={steps}",
        f"--config.checkpoint_every={steps}",
        f"--config.seeds={_seeds_arg(num_seeds)}",
    ]


def _table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _f(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


# --- seeds ------------------------------------------------------------------------------


def seeds_part(counts, dry: bool, python: str | None, tmp: str, runs: dict) -> dict:
    """Ours and the reference at each seed count; prints the table, returns the slopes.
    Our rows go into `runs` too, by (seeds, devices)."""
    iters = 20 if dry else 500
    rows = []
    for n in counts:
        runs[n, 1] = ours(_run_args(dry, n), tempfile.mkdtemp(dir=tmp), tmp)
        row = {"seeds": n, "ours": runs[n, 1]}
        if python is not None:
            row["torchopt"] = reference(python, 0, list(range(n)), iters)
        rows.append(row)
    compute = lambda r: r["meta-train"] + r["evaluation"]  # noqa: E731
    cells = []
    for r in rows:
        o, t = r["ours"], r.get("torchopt")
        cells.append(
            [
                str(r["seeds"]),
                _f(o["wall s"]),
                _f(o["CPU s"]),
                f"{o['compile']:.2f} ({o['programs']})",
                _f(compute(o)),
                _f(o["metrics"]),
                f"{o['peak MiB']:.0f}",
                _f(o["final_mse"], 3),
                _f(t and t["wall s"]),
                _f(t and t["CPU s"]),
                _f(t and compute(t)),
                "—" if t is None else f"{t['peak MiB']:.0f}",
                "—" if t is None else f"{t['wall s'] / o['wall s']:.2f}",
            ]
        )
    print(
        f"\nSeeds: ML³ sine, {iters} meta iterations, final evaluation only, cold, one "
        "process and one device; seconds, peak RSS in MiB"
    )
    _table(
        [
            "seeds",
            "ours wall s",
            "ours CPU s",
            "ours compile s (programs)",
            "ours meta-train + evaluation s",
            "ours metrics s",
            "ours peak RSS MiB",
            "ours final MSE",
            "torchopt wall s",
            "torchopt CPU s",
            "torchopt meta-train + meta-test s",
            "torchopt peak RSS MiB",
            "torchopt / ours wall",
        ],
        cells,
    )
    ns = [r["seeds"] for r in rows]
    out = {
        "ours wall": slope(ns, [r["ours"]["wall s"] for r in rows]),
        "ours compute": slope(ns, [compute(r["ours"]) for r in rows]),
    }
    line = (
        f"- marginal cost of a seed (least-squares slope over {', '.join(map(str, ns))} "
        f"seeds): ours {out['ours wall'][0]:.4f} s of wall time "
        f"({out['ours compute'][0]:.4f} s of it meta-train + evaluation), "
        f"fixed {out['ours wall'][1]:.2f} s"
    )
    if python is not None:
        out["torchopt wall"] = slope(ns, [r["torchopt"]["wall s"] for r in rows])
        out["torchopt compute"] = slope(ns, [compute(r["torchopt"]) for r in rows])
        ratio = out["torchopt wall"][0] / out["ours wall"][0]
        line += (
            f"; torchopt {out['torchopt wall'][0]:.4f} s ({out['torchopt compute'][0]:.4f} s "
            f"meta-train + meta-test), fixed {out['torchopt wall'][1]:.2f} s: a seed costs "
            f"{ratio:.1f}× as much there"
        )
    print(line)
    return out


# --- devices ----------------------------------------------------------------------------


def devices_part(counts, num_seeds: int, dry: bool, tmp: str, runs: dict) -> None:
    """Ours at `num_seeds` seeds on each number of simulated CPU devices; prints the
    table. A run already in `runs` (by (seeds, devices)) is not repeated."""
    flags = os.environ.get("XLA_FLAGS", "")
    cells, reused = [], [n for n in counts if (num_seeds, n) in runs]
    for n in counts:
        env = {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip()}
        if (num_seeds, n) not in runs:
            runs[num_seeds, n] = ours(
                _run_args(dry, num_seeds), tempfile.mkdtemp(dir=tmp), tmp, env=env
            )
        o = runs[num_seeds, n]
        cells.append(
            [
                str(n),
                str(num_seeds // n),
                _f(o["wall s"]),
                _f(o["CPU s"]),
                f"{o['compile']:.2f} ({o['programs']})",
                _f(o["meta-train"]),
                _f(o["evaluation"]),
                f"{o['peak MiB']:.0f}",
                _f(o["final_mse"], 4),
            ]
        )
    print(
        f"\nDevices: ML³ sine, {num_seeds} seeds, final evaluation only, cold, one process "
        f"on {os.cpu_count()} cores, N simulated CPU devices; seconds, peak RSS in MiB"
    )
    _table(
        [
            "devices",
            "seeds a device",
            "wall s",
            "CPU s",
            "compile s (programs)",
            "meta-train s",
            "evaluation s",
            "peak RSS MiB",
            "final MSE",
        ],
        cells,
    )
    for n in reused:
        print(f"- the {n}-device row is the seeds part's run at {num_seeds} seeds")


# --- limit ------------------------------------------------------------------------------


def matmul_rate(n: int, repeats: int) -> float:
    """float32 FLOP/s of a jitted n×n by n×n `jnp.dot` (2n³ FLOPs), the best of `repeats`."""
    import jax
    import jax.numpy as jnp

    a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # one dict per computation in older JAX versions
        cost = cost[0] if cost else None
    return float((cost or {}).get("flops", 0.0))


def program_flops(dry: bool, seed_counts=(1, 2)) -> dict:
    """FLOPs of the experiment's programs by XLA's cost analysis, compiled with the
    experiment's options: {(program, seeds, trips): flops} at each of `seed_counts`, the
    trips (meta steps of a chunk, SGD steps of a fit) at 0 and 1, and at 1 seed also at
    the run's count. Nothing runs: the state is `eval_shape`'s."""
    from configs import ml3_sine as configs
    from experiments.ml3_sine import SineRegression

    base = configs.get_config("smoke" if dry else None)
    steps, test_steps = base.meta.steps, base.eval.test_steps
    out = {}
    for seeds in seed_counts:
        for k in (0, 1, test_steps):
            if seeds > 1 and k == test_steps:
                continue
            c = configs.get_config("smoke" if dry else None)
            c.seeds = tuple(range(seeds))
            c.eval.test_steps = k
            e = SineRegression(c)
            keys = e.seed_keys
            state = e._init.eval_shape(keys)
            fit = e._fit_task_program.lower(state, keys, 0, True).compile()
            out["fit", seeds, k] = _flops(fit)
            if k == 0:
                out["init", seeds, 0] = _flops(e._init.lower(keys).compile())
            for num in (0, 1, steps) if k == 0 else ():
                if seeds > 1 and num == steps:
                    continue
                chunk = e._chunk.lower(state, 0, num, e.chunk_inputs(), keys).compile()
                out["chunk", seeds, num] = _flops(chunk)
    return out


def limit_part(dry: bool, measured: dict | None) -> None:
    """One seed's FLOPs a run over the peak rate, against the measured slopes; prints."""
    from configs import ml3_sine as configs

    c = configs.get_config("smoke" if dry else None)
    steps, test_steps = c.meta.steps, c.eval.test_steps
    fits = 1 + 1 + 2 * (1 + c.data.num_test_tasks)  # evaluations at 0 and the end, meta-test
    seed_counts = (1,) if dry else (1, 2)  # --dry: one seed's programs alone, 4 fewer
    f = program_flops(dry, seed_counts)

    def one_seed(key, trips):  # f(2 seeds) − f(1 seed), or f(1 seed) without 2
        return f[key, 2, trips] - f[key, 1, trips] if 2 in seed_counts else f[key, 1, trips]

    programs = (  # name, key, calls a run, trips a call
        ("init", "init", 1, 0),
        (f"meta-train chunk ({steps} meta steps)", "chunk", 1, steps),
        (f"evaluation / meta-test fit ({test_steps} SGD steps)", "fit", fits, test_steps),
    )
    cells, total = [], 0.0
    for name, key, calls, trips in programs:
        outside = one_seed(key, 0)
        per_trip = one_seed(key, 1) - outside if trips else 0.0
        per_run = calls * (outside + trips * per_trip)
        total += per_run
        as_compiled = f[key, 1, trips]
        counted_once = f[key, 1, 1] if trips else as_compiled
        cells.append(
            [
                name,
                str(calls),
                str(trips),
                f"{as_compiled / 1e6:.3f}",
                f"{counted_once / 1e6:.3f}" if trips else "—",
                f"{per_trip / 1e6:.4f}" if trips else "—",
                f"{outside / 1e6:.4f}",
                f"{per_run / 1e9:.4f}",
            ]
        )
    cells.append(["one seed, whole run", "", "", "", "", "", "", f"{total / 1e9:.4f}"])
    n, repeats = (1024, 3) if dry else (4096, 5)
    rate = matmul_rate(n, repeats)
    one_core = None
    if os.path.exists("/usr/bin/taskset") or os.path.exists("/bin/taskset"):
        code = f"import benchmarks.ml3_sine_scaling as b; print(b.matmul_rate({n}, {repeats}))"
        cmd = ["taskset", "-c", "0", sys.executable, "-c", code]
        one_core = float(_measure(cmd, {"PYTHONPATH": ROOT})[2].split()[-1])
    limit = total / rate
    print(
        f"\nLimit: one seed's FLOPs in a run of ML³ sine ({steps} meta iterations, final "
        f"evaluation only), from XLA's cost analysis of the compiled programs at "
        f"{' and '.join(map(str, seed_counts))} seed(s); MFLOP unless marked"
    )
    _table(
        [
            "program",
            "calls a run",
            "loop trips a call",
            "cost_analysis, 1 seed, as compiled",
            "cost_analysis, 1 seed, 1 trip",
            "one seed: a trip",
            "one seed: outside the loop",
            "one seed: GFLOP a run",
        ],
        cells,
    )
    chunk_ratio = f["chunk", 1, steps] / f["chunk", 1, 1]
    print(
        f"- cost_analysis counts a loop body once: the {steps}-step chunk as compiled counts "
        f"{chunk_ratio:.2f}× its 1-step program's FLOPs; each call is counted here as "
        "f(0 trips) + trips × (f(1) − f(0)), one seed's as "
        + ("f(2 seeds) − f(1 seed)" if 2 in seed_counts else "f(1 seed)")
    )
    core_text = "" if one_core is None else f", {one_core / 1e9:.1f} GFLOP/s on one core"
    print(
        f"- peak float32 rate, {n}×{n} matmul, best of {repeats}: {rate / 1e9:.1f} GFLOP/s on "
        f"{os.cpu_count()} cores{core_text}"
    )
    print(f"- limit: {total / 1e9:.4f} GFLOP / {rate / 1e9:.1f} GFLOP/s = {limit:.5f} s a seed")
    if measured:
        for what, key in (("wall time", "ours wall"), ("meta-train + evaluation", "ours compute")):
            factor = measured[key][0] / limit
            verdict = (
                ("met" if factor <= GOAL_LIMIT_FACTOR else "not met")
                if factor > 0
                else "not measured: the slope is not positive, noise larger than a seed"
            )
            print(
                f"- measured marginal {what} {measured[key][0]:.4f} s a seed = {factor:.1f}× "
                f"the limit (goal ≤ {GOAL_LIMIT_FACTOR:g}×: {verdict})"
            )


# --- images -----------------------------------------------------------------------------


def image_row(
    model: str, batch_size: int, seconds: float, max_steps: int, fast: bool = False
) -> dict:
    """The baseline and AdaLFL steps of `model` at `batch_size`, in this process: compile
    time, `memory_analysis()` bytes, GFLOP and the mean time of a step over about
    `seconds` (at least 2 steps, at most `max_steps`); `fast`: most XLA optimisations off
    (a check, not a measurement). Printed as `ROW <json>` too."""
    import jax

    jax.config.update("jax_disable_most_optimizations", fast)

    from benchmarks import image_step

    e = image_step._setup(model, batch_size, "cifar10", "float32", backprop=False)
    row = {"model": model, "batch": batch_size}
    for name in ("baseline", "adalfl"):
        x = e[name]
        inputs = (e["batch"], e["meta_batch"] if name == "adalfl" else None, e["step"])
        step = jax.jit(lambda s, b, m, t, x=x: x.train_step(s, b, m, t)[0])
        t = time.perf_counter()
        compiled = step.lower(x.init(), *inputs).compile()
        row[f"{name}_compile_s"] = time.perf_counter() - t
        mem = compiled.memory_analysis()
        row[f"{name}_mib"] = (
            None
            if mem is None
            else (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes)
            / 2**20
        )
        row[f"{name}_gflop"] = _flops(compiled) / 1e9
        fn = lambda s, c=compiled, i=inputs: c(s, *i)  # noqa: E731
        _, per_step = image_step._time(fn, x.init(), 2, True)
        steps = int(min(max_steps, max(2, seconds / per_step)))
        _, per_step = image_step._time(fn, x.init(), steps, True)
        row[f"{name}_ms"] = per_step * 1e3
    print("ROW " + json.dumps(row), flush=True)
    return row


def images_part(models, batches, dry: bool) -> None:
    """`image_row` of every (model, batch) in a fresh process each; prints the table."""
    seconds, max_steps = (0.2, 3) if dry else (2.0, 50)
    cells, per_image = [], {}
    for model in models:
        for b in batches:
            code = (
                "import benchmarks.ml3_sine_scaling as s; "
                f"s.image_row({model!r}, {b}, {seconds}, {max_steps}, fast={dry})"
            )
            _, _, stdout, peak = _measure([sys.executable, "-c", code], {"PYTHONPATH": ROOT})
            r = json.loads(next(x for x in stdout.splitlines() if x.startswith("ROW "))[4:])
            us = {k: r[f"{k}_ms"] * 1e3 / b for k in ("baseline", "adalfl")}
            first = per_image.setdefault(model, us)
            cells.append(
                [
                    model,
                    str(b),
                    _f(r["baseline_ms"]),
                    _f(r["adalfl_ms"]),
                    _f(r["adalfl_ms"] / r["baseline_ms"]),
                    f"{us['baseline']:.0f}",
                    f"{us['adalfl']:.0f}",
                    f"{us['adalfl'] / first['adalfl']:.2f}",
                    f"{r['adalfl_gflop'] / r['adalfl_ms'] * 1e3:.1f}",
                    _f(r["baseline_mib"], 1),
                    _f(r["adalfl_mib"], 1),
                    f"{peak:.0f}",
                    f"{r['baseline_compile_s']:.1f}, {r['adalfl_compile_s']:.1f}",
                ]
            )
    print(
        f"\nImages: one training step, CIFAR-10 shapes (synthetic pixels), float32, "
        f"{os.cpu_count()}-core CPU, one device; XLA MiB: the compiled step's temp + "
        "argument + output bytes; peak RSS: the whole process (both steps)"
    )
    _table(
        [
            "model",
            "batch",
            "baseline ms",
            "AdaLFL ms",
            "AdaLFL / baseline",
            "baseline µs/image",
            "AdaLFL µs/image",
            "AdaLFL µs/image vs smallest batch",
            "AdaLFL GFLOP/s",
            "baseline XLA MiB",
            "AdaLFL XLA MiB",
            "peak RSS MiB",
            "compile s (baseline, AdaLFL)",
        ],
        cells,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="comma-separated: " + ",".join(PARTS)
    )
    parser.add_argument(
        "--dry",
        action="store_true",
        help="tiny sizes (the :smoke variant at 1 and 2 seeds, 1 and 2 devices, LeNet-5 "
        "at batch 8 and 16): checks the benchmark",
    )
    parser.add_argument(
        "--reference",
        default="auto",
        help="Python with torch and torchopt: auto (this one, else ~/torchref/bin/python), "
        "a path, or none",
    )
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    dry = args.dry
    import jax

    print(
        f"{'DRY RUN (tiny sizes, not a measurement). ' if dry else ''}Started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load {_load()}; "
        f"{os.cpu_count()}-core CPU, jax {jax.__version__}",
        flush=True,
    )
    python = _reference_python(args.reference)
    measured, runs = None, {}  # runs: ours by (seeds, devices), shared by the two parts
    with tempfile.TemporaryDirectory() as tmp:
        if "seeds" in parts:
            measured = seeds_part((1, 2) if dry else SEEDS, dry, python, tmp, runs)
        if "devices" in parts:
            devices_part((1, 2) if dry else DEVICES, 2 if dry else DEVICE_SEEDS, dry, tmp, runs)
    sys.stdout.flush()
    if "limit" in parts:
        limit_part(dry, measured)
    if "images" in parts:
        images_part(("lenet5",) if dry else MODELS, (8, 16) if dry else BATCHES, dry)
    print(f"\nEnded {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load {_load()}")


if __name__ == "__main__":
    main()
