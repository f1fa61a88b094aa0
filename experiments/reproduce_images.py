"""Baseline vs ML³ vs AdaLFL over seeds and datasets: runs them, prints the table.

    python -m experiments.reproduce_images --data_dir=../shared/data/tfds   # MNIST + F-MNIST
    python -m experiments.reproduce_images --steps=2000 --seeds=0,1,2,3,4 --ce_search=0.01,0.03,0.1

Each run is an ordinary `experiments.run` job in `<root>/<dataset>/<algorithm>_seed<s>`
(re-running resumes or reuses finished runs; diverged runs are reported, not re-run),
with the budget overridden on the command line and everything else the config's: the
dataset's protocol (configs/_image.py), so the three algorithms share all but the loss.

ML³ and AdaLFL of one seed run the very same offline phase (the same φ₀, fresh models,
batches and keys), so by default it runs once: ML³ runs first, checkpointing at the end
of its offline phase, and AdaLFL resumes from that checkpoint (`--no-share_offline` runs
it twice; the numbers are the same).

`--ce_search=lr,...` adds the strongest cross-entropy baseline a reader will ask for:
Nesterov 0.9 with weight decay 5e-4 (`--ce_optimizer`) at each learning rate on the
first seed, the rate of the lowest validation error then run on every seed.

Prints a markdown table of the final test error (mean ± std over the seeds that did not
diverge, per-seed values, diverged seeds with their step) and each group's wall time, and
draws the test-error curves of every algorithm per dataset into `<root>/<dataset>.png`.
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import time

import numpy as np

from experiments import _runs
from metalearn import plots
from metalearn.runtime.metrics import read_metrics

CONFIG_NAMES = {
    "mnist": "mnist",
    "fashion_mnist": "fashion_mnist",
    "cifar10": "cifar",
    "cifar100": "cifar100",
    "svhn_cropped": "svhn",
}


def job_args(args, dataset: str, algorithm: str, seed: int, extra=()) -> tuple[str, list[str]]:
    """The --config value and overrides of one job."""
    variant = ",".join(filter(None, [args.model, args.variant]))
    config = f"configs/{algorithm}_{CONFIG_NAMES[dataset]}.py" + (f":{variant}" if variant else "")
    # The end of the offline phase is a checkpoint, for AdaLFL to start from ML³'s.
    every = args.init_steps if args.share_offline and args.init_steps else args.eval_every
    cmd = [
        f"--config.seed={seed}",
        f"--config.inner.steps={args.steps}",
        f"--config.inner.optimizer.schedule.steps={args.steps}",
        f"--config.meta.init_steps={args.init_steps}",
        f"--config.eval.every={args.eval_every}",
        f"--config.checkpoint_every={every}",
    ]
    if args.data_dir:
        cmd += [f"--config.data.data_dir={args.data_dir}", "--config.data.download=False"]
    return config, [*cmd, *args.override, *extra]


def seed_offline_phase(source: str, target: str, init_steps: int) -> bool:
    """Starts `target` (an AdaLFL workdir) from ML³'s checkpoint at the end of the offline
    phase: the checkpoint and the metrics up to it. False if there is none to take."""
    ckpt = os.path.join(source, "checkpoints", str(init_steps))
    if os.path.exists(os.path.join(target, "checkpoints")) or not os.path.isdir(ckpt):
        return False
    os.makedirs(os.path.join(target, "checkpoints"))
    shutil.copytree(ckpt, os.path.join(target, "checkpoints", str(init_steps)))
    with (
        open(os.path.join(source, "metrics.jsonl")) as f,
        open(os.path.join(target, "metrics.jsonl"), "w") as out,
    ):
        out.writelines(line for line in f if json.loads(line)["step"] <= init_steps)
    return True


def run_one(args, dataset: str, algorithm: str, seed: int, extra=(), name=None) -> dict:
    """Runs (or resumes) one job: {"workdir", "wall", "error" (text or ''), "diverged"}."""
    workdir = os.path.join(args.root, dataset, f"{name or algorithm}_seed{seed}")
    config, cmd = job_args(args, dataset, algorithm, seed, extra)
    start = time.perf_counter()
    out = {"workdir": workdir, "error": "", "diverged": None}
    try:
        _runs.run(config, workdir, cmd)
    except _runs.Diverged as e:
        out["diverged"] = e.step
    except RuntimeError as e:
        out["error"] = str(e)
    out["wall"] = time.perf_counter() - start
    return out


def run_group(args, dataset: str, algorithms: list[str], seed: int) -> dict:
    """The algorithms of one (dataset, seed); AdaLFL after ML³, from its offline phase."""
    results = {}
    order = sorted(algorithms, key=lambda a: {"ml3": 0, "adalfl": 1}.get(a, -1))
    for algorithm in order:
        if algorithm == "adalfl" and args.share_offline and "ml3" in results:
            seed_offline_phase(
                results["ml3"]["workdir"],
                os.path.join(args.root, dataset, f"adalfl_seed{seed}"),
                args.init_steps,
            )
        results[algorithm] = run_one(args, dataset, algorithm, seed)
        print(f"{dataset} {algorithm} seed {seed}: {status(results[algorithm])}", flush=True)
    return results


def status(result: dict) -> str:
    if result["error"]:
        return "FAILED\n" + result["error"]
    if result["diverged"] is not None:
        return f"diverged at step {result['diverged']}"
    return f"{result['wall']:.0f} s"


def final(workdir: str, key: str) -> float | None:
    """The mean of `key` (e.g. "test_error", "val_error") in a finished job's summary."""
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    return summary[key]["mean"] if key in summary else None


def ce_search(args, dataset: str, seeds: list[int], pool) -> tuple[str, list[dict]]:
    """The strongest cross-entropy baseline: the learning rate of the lowest validation
    error on the first seed, then every seed (`--jobs` runs at once, in `pool`).
    Returns (label, results per seed)."""

    def run_at(lr: str, seed: int) -> dict:
        extra = [*_runs.OPTIMIZERS[args.ce_optimizer], f"--config.inner.optimizer.lr={lr}"]
        return run_one(args, dataset, "baseline", seed, extra, f"ce_{args.ce_optimizer}_lr{lr}")

    rates = args.ce_search.split(",")
    scores = {}
    for lr, r in zip(rates, pool.map(run_at, rates, [seeds[0]] * len(rates)), strict=True):
        val = final(r["workdir"], "val_error")
        print(f"{dataset} CE {args.ce_optimizer} lr {lr}: validation error {val}", flush=True)
        scores[lr] = np.inf if val is None else val
    best = min(scores, key=scores.get)
    results = list(pool.map(run_at, [best] * len(seeds), seeds))
    return f"baseline, {args.ce_optimizer} lr {best} (best of {args.ce_search})", results


def row(dataset: str, label: str, results: list[dict]) -> str:
    errors = [final(r["workdir"], "test_error") for r in results]
    kept = 100 * np.asarray([e for e in errors if e is not None])

    def cell(e, r):
        if e is not None:
            return f"{100 * e:.2f}"
        if r["diverged"]:
            return f"div@{r['diverged']}"
        return {"not finished": "running", "not started": "—"}.get(r["error"], "fail")

    per_seed = ", ".join(cell(e, r) for e, r in zip(errors, results, strict=True))
    diverged = sum(r["diverged"] is not None for r in results)
    mean = f"{kept.mean():.2f} ± {kept.std():.2f} %" if kept.size else "—"
    wall = sum(r["wall"] for r in results)
    return f"| {dataset} | {label} | {mean} | {per_seed} | {diverged} | {wall:.0f} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="mnist,fashion_mnist")
    p.add_argument(
        "--algorithms", default="baseline,ml3,adalfl", help="'' with --ce_search: that alone"
    )
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--model", default="", help="a model variant, e.g. resnet20")
    p.add_argument("--variant", default="", help="other config variants, e.g. subset")
    p.add_argument("--steps", type=int, default=2000, help="model training steps (S_train)")
    p.add_argument("--init_steps", type=int, default=2500, help="offline ML³ steps (S_init)")
    p.add_argument("--eval_every", type=int, default=500)
    p.add_argument("--data_dir", default="", help="prepared tfds folder (else the config's)")
    p.add_argument("--root", default="runs/reproduce_images")
    p.add_argument("--jobs", type=int, default=1, help="(dataset, seed) groups at once")
    p.add_argument("--share_offline", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ce_search", default="", help="learning rates of the strongest CE baseline")
    p.add_argument("--ce_optimizer", default="nesterov", choices=sorted(_runs.OPTIMIZERS))
    p.add_argument("--override", action="append", default=[], help="--config.x=y, repeatable")
    args = p.parse_args()
    if args.init_steps % args.eval_every:
        p.error("--init_steps must be a multiple of --eval_every")
    algorithms = [a for a in args.algorithms.split(",") if a]  # none: only --ce_search
    if not algorithms and not args.ce_search:
        p.error("no --algorithms and no --ce_search: nothing to run")

    datasets = args.datasets.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    groups = [(d, s) for d in datasets for s in seeds]
    results = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_group, args, d, algorithms, s): (d, s) for d, s in groups}
        for future in concurrent.futures.as_completed(futures):
            d, s = futures[future]
            for a, r in future.result().items():
                results[(d, a, s)] = r
        searched = {d: ce_search(args, d, seeds, pool) for d in datasets if args.ce_search}

    print(f"\nsteps={args.steps}, init_steps={args.init_steps}, seeds={seeds}")
    print("| dataset | algorithm | test error (mean ± std) | per seed | diverged | wall s (sum) |")
    print("|---|---|---|---|---|---|")
    for d in datasets:
        histories = {}
        for a in algorithms:
            group = [results[(d, a, s)] for s in seeds]
            print(row(d, a, group))
            histories[a] = [read_metrics(r["workdir"]) for r in group if r["diverged"] is None]
        if d in searched:
            label, group = searched[d]
            print(row(d, label, group))
            histories["baseline (best CE)"] = [read_metrics(r["workdir"]) for r in group]
        plots.image_training_curves(
            {k: v for k, v in histories.items() if v}, os.path.join(args.root, f"{d}.png")
        )


if __name__ == "__main__":
    main()
