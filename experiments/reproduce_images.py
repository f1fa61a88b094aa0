"""Baseline vs ML³ vs AdaLFL over seeds and datasets: runs them, prints the table.

    python -m experiments.reproduce_images                     # MNIST + Fashion-MNIST, 3 seeds
    python -m experiments.reproduce_images --steps=2000 --init_steps=500 --jobs=2

Each run is an ordinary `experiments.run` job in `<root>/<dataset>/<algorithm>_seed<s>`
(re-running resumes or reuses finished runs), with the budget overridden on the command
line; the three algorithms share everything but the loss. Prints a markdown table of the
final test error (mean ± std over seeds, per-seed values) and each group's wall time, and
draws the test-error curves of every algorithm per dataset into `<root>/<dataset>.png`.
"""

import argparse
import concurrent.futures
import json
import os
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


def run_one(args, dataset: str, algorithm: str, seed: int) -> tuple[str, float, str]:
    """Runs (or resumes) one job; returns (workdir, wall seconds, error text or '')."""
    workdir = os.path.join(args.root, dataset, f"{algorithm}_seed{seed}")
    variant = ",".join(filter(None, [args.model, args.variant]))
    config = f"configs/{algorithm}_{CONFIG_NAMES[dataset]}.py" + (f":{variant}" if variant else "")
    cmd = [
        f"--config.seed={seed}",
        f"--config.inner.steps={args.steps}",
        f"--config.inner.optimizer.schedule.steps={args.steps}",
        f"--config.meta.init_steps={args.init_steps}",
        f"--config.eval.every={args.eval_every}",
        f"--config.checkpoint_every={args.eval_every * args.checkpoint_evals}",
    ]
    if args.data_dir:
        cmd += [f"--config.data.data_dir={args.data_dir}", "--config.data.download=False"]
    cmd += args.override
    start = time.perf_counter()
    try:
        _runs.run(config, workdir, cmd)
        return workdir, time.perf_counter() - start, ""
    except RuntimeError as e:
        return workdir, 0.0, str(e)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="mnist,fashion_mnist")
    p.add_argument("--algorithms", default="baseline,ml3,adalfl")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--model", default="", help="a model variant, e.g. resnet20")
    p.add_argument("--variant", default="", help="other config variants, e.g. subset")
    p.add_argument("--steps", type=int, default=3000, help="model training steps (S_train)")
    p.add_argument("--init_steps", type=int, default=500, help="offline ML³ steps (S_init)")
    p.add_argument("--eval_every", type=int, default=500)
    p.add_argument("--checkpoint_evals", type=int, default=2, help="checkpoint every N evals")
    p.add_argument("--data_dir", default="", help="prepared tfds folder (else the config's)")
    p.add_argument("--root", default="runs/reproduce_images")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--override", action="append", default=[], help="--config.x=y, repeatable")
    args = p.parse_args()
    if args.init_steps % args.eval_every:
        p.error("--init_steps must be a multiple of --eval_every")

    datasets = args.datasets.split(",")
    algorithms = args.algorithms.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(d, a, s) for d in datasets for a in algorithms for s in seeds]
    results = {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_one, args, *job): job for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            job = futures[future]
            workdir, wall, error = future.result()
            results[job] = (workdir, wall)
            status = "FAILED\n" + error if error else f"{wall:.0f} s"
            print(f"{job[0]} {job[1]} seed {job[2]}: {status}", flush=True)

    print(f"\nsteps={args.steps}, init_steps={args.init_steps}, seeds={seeds}")
    print("| dataset | algorithm | test error (mean ± std) | per seed | wall s (sum) |")
    print("|---|---|---|---|---|")
    for d in datasets:
        histories = {}
        for a in algorithms:
            errors, walls, runs = [], [], []
            for s in seeds:
                workdir, wall = results[(d, a, s)]
                summary_path = os.path.join(workdir, "summary.json")
                if not os.path.exists(summary_path):
                    continue
                with open(summary_path) as f:
                    errors.append(json.load(f)["test_error"]["mean"])
                walls.append(wall)
                runs.append(read_metrics(workdir))
            if not errors:
                print(f"| {d} | {a} | failed | | |")
                continue
            e = 100 * np.asarray(errors)
            per_seed = ", ".join(f"{x:.2f}" for x in e)
            print(
                f"| {d} | {a} | {e.mean():.2f} ± {e.std():.2f} % | {per_seed} | {sum(walls):.0f} |"
            )
            histories[a] = runs
        if histories:
            plots.image_training_curves(histories, os.path.join(args.root, f"{d}.png"))


if __name__ == "__main__":
    main()
