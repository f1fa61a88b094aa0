"""Why AdaLFL diverges: one factor at a time from the old default, and combined.

    python -m experiments.sweep_adalfl                      # every variant, MNIST, seed 0
    python -m experiments.sweep_adalfl --variants=old_default,sgd --init_steps=250

Every variant is an ordinary `experiments.run` job of `configs/adalfl_mnist.py:shared`
(LeNet-5), in `<root>/<variant>_seed<s>` (finished runs are reused, diverged ones are not
run again), at one fixed budget (`--init_steps` offline ML³ steps, `--steps` model
steps, a constant learning rate). `old_default` is the configuration that diverged:
Nesterov 0.9 with weight decay 5e-4, a Softplus output, no cross-entropy term, β = 10,
γ = 0.01, biases, meta batches from the training set, no selection, no clipping; each
other variant changes what its name says. Cross-entropy baselines under both optimizers
are run beside them.

Prints a markdown table (final test error, where it diverged, the learned loss's
gradient ratio ‖∇_z L_φ‖ / ‖∇_z CE‖ at the end of the offline phase, its maximum over
training and at the end), and draws the ratio over training of every run into
`<root>/grad_ratio.png`.
"""

import argparse
import os

import numpy as np

from experiments import _runs
from metalearn import plots
from metalearn.runtime.metrics import read_metrics

NESTEROV, SGD = _runs.OPTIMIZERS["nesterov"], _runs.OPTIMIZERS["sgd"]
OLD_LOSS_NET = [
    "--config.loss_net.output_activation=softplus",
    "--config.loss_net.ce_term=False",
    "--config.loss_net.beta=10.0",
    "--config.loss_net.gamma=0.01",
    "--config.loss_net.use_bias=True",
    "--config.loss_net.max_grad_ratio=0.0",
]
OLD_META = [
    "--config.meta.split=train",
    "--config.meta.lookahead=none",
    "--config.meta.select_every=0",
    "--config.meta.optimizer.clip_value=0.0",
]
OLD_DEFAULT = NESTEROV + OLD_LOSS_NET + OLD_META
NPBML_NET = [
    "--config.loss_net.output_activation=identity",
    "--config.loss_net.ce_term=True",
    "--config.loss_net.beta=2.0",
    "--config.loss_net.gamma=0.25",
    "--config.loss_net.use_bias=False",
]

# name -> (algorithm, what changes from the old default, overrides after OLD_DEFAULT)
VARIANTS = {
    "old_default": ("adalfl", "Nesterov + wd 5e-4, Softplus, no CE term, train split", []),
    "sgd": ("adalfl", "plain SGD, no weight decay (the paper's MNIST optimizer)", SGD),
    "nesterov_no_wd": ("adalfl", "no weight decay", ["--config.inner.optimizer.weight_decay=0"]),
    "identity_out": (
        "adalfl",
        "no output activation",
        ["--config.loss_net.output_activation=identity"],
    ),
    "ce_term": ("adalfl", "cross-entropy + learned term", ["--config.loss_net.ce_term=True"]),
    "beta2_gamma025": (
        "adalfl",
        "smooth leaky ReLU β = 2, γ = 0.25",
        ["--config.loss_net.beta=2.0", "--config.loss_net.gamma=0.25"],
    ),
    "no_bias": ("adalfl", "no biases", ["--config.loss_net.use_bias=False"]),
    "npbml_net": ("adalfl", "NPBML's net: CE + learned, identity, no bias, β 2, γ 0.25", NPBML_NET),
    "val_split": ("adalfl", "meta batches from held-out 10 %", ["--config.meta.split=validation"]),
    "clip10": ("adalfl", "meta-gradient clipped at 10", ["--config.meta.optimizer.clip_value=10"]),
    "select": ("adalfl", "best-φ selection (every 10 %, 500 steps)", ["SELECT"]),
    "ratio_bound1": (
        "adalfl",
        "gradient ratio bounded at 1",
        ["--config.loss_net.max_grad_ratio=1.0"],
    ),
    "ratio_bound3": (
        "adalfl",
        "gradient ratio bounded at 3",
        ["--config.loss_net.max_grad_ratio=3.0"],
    ),
    "npbml_val_bound1": (
        "adalfl",
        "NPBML net + held-out split + ratio bound 1",
        [*NPBML_NET, "--config.meta.split=validation", "--config.loss_net.max_grad_ratio=1.0"],
    ),
    "sgd_npbml_val": (
        "adalfl",
        "plain SGD + NPBML net + held-out split",
        [*SGD, *NPBML_NET, "--config.meta.split=validation"],
    ),
    "lookahead": (
        "adalfl",
        "meta-objective at the momentum's whole displacement −η/(1−μ)·g",
        ["--config.meta.lookahead=momentum"],
    ),
    "lookahead_npbml_val": (
        "adalfl",
        "lookahead + NPBML net + held-out split",
        ["--config.meta.lookahead=momentum", *NPBML_NET, "--config.meta.split=validation"],
    ),
    "ce_nesterov": ("baseline", "cross-entropy, Nesterov + wd 5e-4", []),
    "ce_sgd": ("baseline", "cross-entropy, plain SGD", SGD),
}


def overrides_for(args, name: str, seed: int) -> tuple[str, list[str]]:
    algorithm, _, extra = VARIANTS[name]
    if "SELECT" in extra:
        extra = [f"--config.meta.select_every={max(args.init_steps // 10, 1)}"]
    cmd = [
        f"--config.seed={seed}",
        f"--config.inner.steps={args.steps}",
        "--config.inner.optimizer.schedule.name=constant",
        f"--config.inner.optimizer.schedule.steps={args.steps}",
        f"--config.meta.init_steps={args.init_steps}",
        f"--config.eval.every={args.eval_every}",
        f"--config.checkpoint_every={args.init_steps + args.steps}",
        f"--config.divergence.check_after={args.eval_every}",
        *OLD_DEFAULT,
        *extra,
        *args.override,
    ]
    return f"configs/{algorithm}_{args.dataset}.py:shared", cmd


def ratio_stats(history: list[dict], init_steps: int) -> tuple[float, float, float]:
    """The gradient ratio at the end of the offline phase, its max after, and at the end."""
    rows = [r for r in history if "train/grad_ratio" in r]
    if not rows:
        return (np.nan,) * 3
    offline = [r["train/grad_ratio"] for r in rows if r["step"] <= init_steps][-20:]
    online = [r["train/grad_ratio"] for r in rows if r["step"] > init_steps]
    end_offline = float(np.mean(offline)) if offline else np.nan
    if not online:
        return end_offline, np.nan, np.nan
    return end_offline, float(np.max(online)), float(np.mean(online[-20:]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--dataset", default="mnist", help="mnist or fashion_mnist")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=1000, help="model steps")
    p.add_argument("--init_steps", type=int, default=2500, help="offline ML³ steps (S_init)")
    p.add_argument("--eval_every", type=int, default=250)
    p.add_argument("--root", default="runs/sweep_adalfl")
    p.add_argument("--override", action="append", default=[], help="--config.x=y, repeatable")
    args = p.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    if args.init_steps % args.eval_every:
        p.error("--init_steps must be a multiple of --eval_every")
    seeds = [int(s) for s in args.seeds.split(",")]

    rows, histories = [], {}
    for name in names:
        for seed in seeds:
            workdir = os.path.join(args.root, f"{name}_seed{seed}")
            config, cmd = overrides_for(args, name, seed)
            try:
                error, where = 100 * _runs.run(config, workdir, cmd)["test_error"]["mean"], "—"
            except _runs.Diverged as e:
                error, where = np.nan, f"step {e.step}"
            history = read_metrics(workdir)
            init = args.init_steps if VARIANTS[name][0] != "baseline" else 0
            stats = ratio_stats(history, init)
            if VARIANTS[name][0] != "baseline":
                histories[f"{name} s{seed}" + (" (diverged)" if where != "—" else "")] = history
            rows.append((name, seed, error, where, *stats))
            print(f"{name} seed {seed}: error {error:.2f} %, diverged {where}", flush=True)

    print(
        f"\nMNIST LeNet-5 ({args.dataset}), S_init = {args.init_steps}, {args.steps} model "
        f"steps, constant lr 0.01, seeds {seeds}"
    )
    print(
        "| variant | change from the old default | test error % | diverged | ratio, end of "
        "offline | max ratio | final ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, seed, error, where, end_off, top, final in rows:
        err = "—" if np.isnan(error) else f"{error:.2f}"
        print(
            f"| {name} (s{seed}) | {VARIANTS[name][1]} | {err} | {where} | {end_off:.3g} | "
            f"{top:.3g} | {final:.3g} |"
        )
    plots.gradient_ratios(histories, args.init_steps, os.path.join(args.root, "grad_ratio.png"))


if __name__ == "__main__":
    main()
