"""Schedule or shape: AdaLFL taken apart, on the paper's optimizer and on a tuned one.

    python -m experiments.reproduce_decomposition --data_dir=../shared/data/tfds
    python -m experiments.reproduce_decomposition --datasets=mnist --variants=ce,full --bases=tuned

Two base optimizers, each with four ways to make the model's step:

- bases: `paper` (the dataset's config as it is: the AdaLFL paper's protocol, for MNIST
  and Fashion-MNIST plain SGD at lr 0.01, constant, no bound on the learned step; for
  CIFAR-10 Nesterov 0.9 and weight decay 5e-4 at lr 0.01 with the ratio bound at 1, see
  configs/_image.py) and `tuned` (SGD with Nesterov 0.9, weight decay 5e-4 and a cosine
  decay to 0 over the run; its peak rate the one of `--lrs` whose cross-entropy run on
  the first seed has the lowest validation error, or `--tuned_lr`);
- variants: `ce` (cross-entropy), `schedule` (exp(s)·cross-entropy, s adapted online by
  the one-step meta-gradient: a learned learning-rate multiplier, hypergradient descent),
  `shape` (the learned loss with its gradient normalised to cross-entropy's norm at every
  step: it learns the shape alone) and `full` (AdaLFL). The three learned ones run
  AdaLFL's protocol: the ML³ initialisation (`--init_steps`), then one meta step per model
  step. On the tuned base AdaLFL's step is bounded at `--tuned_bound` times
  cross-entropy's (`loss_net.max_grad_ratio`: unbounded, momentum makes the offline
  phase's one-step objective tune it too large, docs/adalfl.md); on the paper's as its
  config says; the shape variant's ratio is 1 anyway. The schedule variant on the tuned
  base is hypergradient descent as its authors run it: no offline phase (the multiplier
  starts at 1, the tuned rate) and no bound. Under the bound the offline phase would
  push the multiplier past 1 at once, where the bound makes the loss cross-entropy
  itself and the multiplier's meta-gradient 0 (it could never come back).

Every job is an ordinary `experiments.run` job in `<root>/<dataset>/<base>_<variant>_seed<s>`
(finished jobs are reused, unfinished ones resume, diverged ones are reported), so the
command can be stopped and run again. Jobs run `--jobs` at a time, the lr search first,
then seed by seed, so that a partial run has every variant of its first seeds.

Prints a markdown table (test error mean ± std and per seed; each learned variant's gain
over cross-entropy on the same base) and draws, per dataset, `<root>/<dataset>_steps.png`
(the step size each variant took: learning rate × gradient ratio) and
`<root>/<dataset>_shapes.png` (the learned losses at the end, rescaled).
"""

import argparse
import concurrent.futures
import json
import os

import ml_collections
import numpy as np

from experiments import _runs, reproduce_images
from metalearn import plots
from metalearn.optim import make_schedule
from metalearn.runtime.metrics import read_metrics

BASES = ("paper", "tuned")
VARIANTS = ("ce", "schedule", "shape", "full")
LEARNED = {
    "schedule": ["--config.loss_net.kind=scaled_ce", "--config.loss_net.ce_term=False"],
    "shape": ["--config.loss_net.normalise_grad=True"],
    "full": [],
}


def base_overrides(base: str, lr: str) -> list[str]:
    """The optimizer and schedule flags of a base at peak rate `lr` (none for the
    paper's: the config's own)."""
    if base == "paper":
        return []
    return [
        *_runs.OPTIMIZERS["nesterov"],
        f"--config.inner.optimizer.lr={lr}",
        "--config.inner.optimizer.schedule.name=cosine",
    ]


def job(base: str, variant: str, lr: str, bound: float) -> tuple[str, list[str], str]:
    """(algorithm, overrides, name) of one row's job."""
    extra = base_overrides(base, lr)
    if variant == "ce":
        return "baseline", extra, f"{base}_ce" + (f"_lr{lr}" if base == "tuned" else "")
    extra += LEARNED[variant]
    if variant == "shape" or (base, variant) == ("tuned", "schedule"):
        extra.append("--config.loss_net.max_grad_ratio=0")
    elif base == "tuned":
        extra.append(f"--config.loss_net.max_grad_ratio={bound:g}")
    return "adalfl", extra, f"{base}_{variant}"


def job_namespace(args, base: str, variant: str):
    """The options `reproduce_images.run_one` reads for one job: `args`, with no offline
    phase for hypergradient descent on the tuned base (see the module docstring)."""
    if (base, variant) != ("tuned", "schedule"):
        return args
    return argparse.Namespace(**{**vars(args), "init_steps": 0})


def step_sizes(workdir: str, every: int = 100) -> tuple[np.ndarray, np.ndarray] | None:
    """(model steps, lr_t × gradient ratio) of a finished job, at multiples of `every`.

    The rate is the base schedule's at each model step (from the job's config.json); the
    ratio `train/grad_ratio` as logged (1 for cross-entropy). None if nothing is logged.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    opt = config.inner.optimizer
    schedule = make_schedule(opt.get("schedule"), opt.lr)
    offset = config.meta.init_steps if config.algorithm != "baseline" else 0
    rows = [r for r in read_metrics(workdir) if "train/ce" in r and r["step"] > offset]
    rows = [r for r in rows if (r["step"] - offset) % every == 0]
    if not rows:
        return None
    steps = np.array([r["step"] - offset for r in rows])
    ratio = np.array([r.get("train/grad_ratio", 1.0) for r in rows])
    rate = np.array([float(schedule(s - 1)) if callable(schedule) else schedule for s in steps])
    return steps, rate * ratio


def final_curves(workdir: str) -> tuple[list, list] | None:
    """The learned loss's (ℓ(y=1, p), ℓ(y=0, p)) at the last evaluation of a job."""
    rows = [r for r in read_metrics(workdir) if "curve/true_class" in r]
    return (rows[-1]["curve/true_class"], rows[-1]["curve/wrong_class"]) if rows else None


def existing(args, dataset: str, algorithm: str, seed: int, extra=(), name=None) -> dict:
    """`reproduce_images.run_one`'s result for a job as it stands, running nothing
    (`--report_only`): its wall time from its files (first written to last)."""
    del algorithm, extra
    workdir = os.path.join(args.root, dataset, f"{name}_seed{seed}")
    info = _runs.diverged(workdir)
    files = [os.path.join(workdir, f) for f in ("config.json", "summary.json", "metrics.jsonl")]
    times = [os.path.getmtime(f) for f in files if os.path.exists(f)]
    done = os.path.exists(files[1]) or info is not None
    return {
        "workdir": workdir,
        "error": "" if done else "not finished" if times else "not started",
        "diverged": None if info is None else info.get("step"),
        "wall": max(times) - min(times) if times else 0.0,
    }


def search(args, dataset: str, pool) -> str:
    """The tuned base's peak rate: `--tuned_lr`, else the rate of `--lrs` whose
    cross-entropy run on the first seed has the lowest validation error."""
    if args.tuned_lr:
        return args.tuned_lr
    rates = args.lrs.split(",")
    seed = int(args.seeds.split(",")[0])

    def run_at(lr):
        algorithm, extra, name = job("tuned", "ce", lr, args.tuned_bound)
        return args.runner(args, dataset, algorithm, seed, extra, name)

    scores = {}
    for lr, r in zip(rates, pool.map(run_at, rates), strict=True):
        val = reproduce_images.final(r["workdir"], "val_error")
        print(f"{dataset} tuned CE lr {lr}: validation error {val}", flush=True)
        scores[lr] = np.inf if val is None else val
    return min(scores, key=scores.get)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="fashion_mnist")
    p.add_argument("--bases", default="tuned,paper")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--lrs", default="0.01,0.03,0.1", help="the tuned base's peak rates searched")
    p.add_argument("--tuned_lr", default="", help="the tuned base's peak rate (no search)")
    p.add_argument("--tuned_bound", type=float, default=1.0)
    p.add_argument("--model", default="", help="a model variant, e.g. resnet20")
    p.add_argument("--variant", default="", help="other config variants, e.g. subset")
    p.add_argument("--steps", type=int, default=10_000, help="model training steps (S_train)")
    p.add_argument("--init_steps", type=int, default=2500, help="offline ML³ steps (S_init)")
    p.add_argument("--eval_every", type=int, default=500)
    p.add_argument("--data_dir", default="", help="prepared tfds folder (else the config's)")
    p.add_argument("--root", default="runs/reproduce_decomposition")
    p.add_argument("--jobs", type=int, default=2, help="jobs at once")
    p.add_argument("--override", action="append", default=[], help="--config.x=y, repeatable")
    p.add_argument(
        "--report_only", action="store_true", help="run nothing: the table of the jobs so far"
    )
    args = p.parse_args()
    args.share_offline = False  # every variant has an offline phase of its own
    args.runner = existing if args.report_only else reproduce_images.run_one
    bases, variants = args.bases.split(","), args.variants.split(",")
    for name, given, known in (("base", bases, BASES), ("variant", variants, VARIANTS)):
        if unknown := sorted(set(given) - set(known)):
            p.error(f"unknown {name}(s) {unknown}; choose from {list(known)}")
    if args.init_steps % args.eval_every:
        p.error("--init_steps must be a multiple of --eval_every")
    seeds = [int(s) for s in args.seeds.split(",")]

    results, lrs = {}, {}
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for dataset in args.datasets.split(","):
            lrs[dataset] = search(args, dataset, pool) if "tuned" in bases else ""
            keys = [(b, v, s) for s in seeds for b in bases for v in variants]

            def run(key, dataset=dataset):
                base, variant, seed = key
                algorithm, extra, name = job(base, variant, lrs[dataset], args.tuned_bound)
                r = args.runner(
                    job_namespace(args, base, variant), dataset, algorithm, seed, extra, name
                )
                if not args.report_only:
                    print(f"{dataset} {name} seed {seed}: {reproduce_images.status(r)}", flush=True)
                return r

            for key, r in zip(keys, pool.map(run, keys), strict=True):
                results[(dataset, *key)] = r

    print(f"\nsteps={args.steps}, init_steps={args.init_steps}, seeds={seeds}")
    for dataset in args.datasets.split(","):
        print(table(dataset, bases, variants, seeds, results, lrs[dataset], args.tuned_bound))
        figures(dataset, bases, variants, seeds, results, args.root)


def table(dataset, bases, variants, seeds, results, lr, bound) -> str:
    """The markdown table of one dataset: reproduce_images's row, then the gain."""
    lines = [
        f"{dataset}; tuned: Nesterov 0.9, weight decay 5e-4, cosine, peak lr {lr or '—'}, "
        f"learned step sizes bounded at {bound:g}× CE's; paper: the config's protocol",
        "| dataset | base, variant | test error (mean ± std) | per seed | diverged | wall s (sum) "
        "| gain over CE (points) |",
        "|---|---|---|---|---|---|---|",
    ]
    for base in bases:
        groups = {v: [results[(dataset, base, v, s)] for s in seeds] for v in variants}
        errors = {v: mean_error(group) for v, group in groups.items()}
        for variant, group in groups.items():
            gain = ""
            if variant != "ce" and None not in (errors.get("ce"), errors[variant]):
                gain = f"{errors['ce'] - errors[variant]:+.2f}"
            lines.append(reproduce_images.row(dataset, f"{base}, {variant}", group) + f" {gain} |")
    return "\n".join(lines)


def mean_error(group: list[dict]) -> float | None:
    """The mean test error (%) over the finished jobs of a group, None if none is."""
    errors = [reproduce_images.final(r["workdir"], "test_error") for r in group]
    kept = [100 * e for e in errors if e is not None]
    return float(np.mean(kept)) if kept else None


def figures(dataset, bases, variants, seeds, results, root) -> None:
    steps, shapes = {}, {}
    for base in bases:
        for variant in variants:
            group = [results[(dataset, base, variant, s)] for s in seeds]
            workdirs = [r["workdir"] for r in group if not r["error"]]  # finished jobs only
            if not workdirs:
                continue
            runs = [c for c in map(step_sizes, workdirs) if c is not None]
            if runs:
                n = min(len(x) for x, _ in runs)
                steps[f"{base} {variant}"] = (runs[0][0][:n], [y[:n] for _, y in runs])
            last = final_curves(workdirs[0])
            if variant != "ce" and last is not None:
                shapes[f"{base} {variant}"] = last
    if steps:
        plots.implied_step_sizes(steps, os.path.join(root, f"{dataset}_steps.png"))
    if shapes:
        plots.learned_loss_shapes_compared(shapes, os.path.join(root, f"{dataset}_shapes.png"))


if __name__ == "__main__":
    main()
