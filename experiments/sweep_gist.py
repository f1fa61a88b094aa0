"""The gist-token tables: the bottleneck, and research plans 1, 2 and 3 side by side.

    python -m experiments.sweep_gist [--suffix=smoke] [--seeds=0,1,2]
        [--root=runs/gist_sweep] [--override=--config.phase2.steps=2000 ...]

1. **The bottleneck** (`configs/gist_lm.py:bottleneck,...`, `BOTTLENECK`): Phase G alone
   for k ∈ {1, 2, 4, 8} gists and the two controls, each seed of `--seeds`; the table
   gives CE(x | gists) on held-out validation windows (mean ± std over the seeds, and
   per seed) and `<root>/plots/bottleneck.png` draws it against k between the controls.
2. **Plans 1-3** side by side: plan 1's variants (`--plan1`, runs of
   `configs/self_loss_lm.py` with `--plan1_override`) and plan 2's and 3's (`--plans`,
   default `gist_lm.SWEEP`, with `--override`), seed 0: steps to hack and to degrade
   (plan 1's definitions), the validation cross-entropy where self-training starts (what
   a model that is not updated keeps), its best and final value and the control's, the
   share of the control's improvement recovered, the rank correlation of the
   self-produced loss with the true train loss over the detector's window (and, for
   gist losses, across each batch's sequences), and the collapse of the gist space at
   the start and end of Phase 2. `<root>/plots/plans.png` shows every run's curves,
   `<root>/plots/collapse.png` the gist runs' collapse diagnostics.

Each run has its own workdir under `--root` (re-running resumes or reuses finished
runs). `+` joins the parts of a variant in the list flags, since `,` separates variants.
"""

import math
import os

import numpy as np
from absl import app, flags

from configs import gist_lm
from experiments import _runs

_SUFFIX = flags.DEFINE_string("suffix", "", "Variant parts added to every run, e.g. smoke.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the bottleneck table.")
_ROOT = flags.DEFINE_string("root", "runs/gist_sweep", "Parent folder of the runs.")
_PLANS = flags.DEFINE_list("plans", None, "Plan 2 and 3 variants (default gist_lm.SWEEP).")
_PLAN1 = flags.DEFINE_list(
    "plan1", ["gain+frozen+long", "gain+frozen", "gain"], "Plan 1 variants (self_loss_lm)."
)
_OVERRIDE = flags.DEFINE_multi_string("override", [], "--config.x=y for every gist run.")
_PLAN1_OVERRIDE = flags.DEFINE_multi_string(
    "plan1_override",
    ["--config.phase2.steps=2000", "--config.detector.window=40"],
    "--config.x=y for every plan 1 run (default: the plan 2/3 Phase 2 length and window).",
)
_BOTTLENECK = flags.DEFINE_list(
    "bottleneck",
    list(gist_lm.BOTTLENECK),
    "Bottleneck runs (default gist_lm.BOTTLENECK); none: skip.",
)

PLAN_COLUMNS = (
    ("steps_to_hack", "steps to hack", "{}"),
    ("hack_detected_at", "detected at", "{}"),
    ("steps_to_degrade", "steps to +0.1 nats", "{}"),
    ("phase1_end_val_ce", "val CE at the start (no update)", "{:.3f}"),
    ("best_val_ce", "best val CE", "{:.3f}"),
    ("final_val_ce", "final val CE", "{:.3f}"),
    ("control_final_val_ce", "control val CE", "{:.3f}"),
    ("final_bits", "final bits/byte", "{:.3f}"),
    ("recovered", "recovered", "{:.0%}"),
    ("window_rank_corr", "Spearman, window", "{:+.2f}"),
    ("gist_rank_corr", "Spearman, batch", "{:+.2f}"),
    ("start_mean_cosine", "cosine, start", "{:.2f}"),
    ("final_mean_cosine", "cosine, end", "{:.2f}"),
    ("final_output_mean_cosine", "own cosine, end", "{:.2f}"),
    ("start_effective_rank", "eff. rank, start", "{:.1f}"),
    ("final_effective_rank", "eff. rank, end", "{:.1f}"),
)


def _name(variant: str) -> str:
    return f"{variant},{_SUFFIX.value}" if _SUFFIX.value else variant


def _workdir(kind: str, name: str) -> str:
    return os.path.join(_ROOT.value, kind, name.replace(",", "_"))


def bottleneck() -> tuple[str, dict]:
    """Runs the bottleneck table; returns it (markdown) and the per-seed values."""
    results = {}
    for variant in _BOTTLENECK.value:
        ce = []
        for seed in _SEEDS.value:
            name = _name(f"bottleneck,{variant}")
            workdir = _workdir("bottleneck", f"{name},seed{seed}")
            print(f"running {name} seed {seed} in {workdir}", flush=True)
            summary = _runs.run(
                f"configs/gist_lm.py:{name}",
                workdir,
                [f"--config.seed={seed}", *_OVERRIDE.value],
            )
            ce.append(summary["chunk_ce"]["mean"])
        results[variant] = {"ce": ce}
    lines = [
        "| Phase G mask | CE(x \\| gists), nats | bits/byte | per seed |",
        "|---|---|---|---|",
    ]
    for variant, r in results.items():
        ce = np.asarray(r["ce"])
        label = f"gist, k = {variant[1:]}" if variant.startswith("k") else f"{variant} control"
        per_seed = ", ".join(f"{v:.3f}" for v in ce)
        lines.append(
            f"| {label} | {ce.mean():.3f} ± {ce.std():.3f} | {ce.mean() / math.log(2):.3f} "
            f"| {per_seed} |"
        )
    return "\n".join(lines), results


def _window_rank_corr(history: list[dict]) -> float:
    values = [r["diag/rank_corr"] for r in history if r.get("phase") == 2 and "diag/rank_corr" in r]
    return float(np.mean(values)) if values else None


def plans() -> tuple[str, dict, dict, dict]:
    """Runs plans 1-3; returns the table and the histories and handover steps."""
    runs = [
        ("plan 1", f"configs/self_loss_lm.py:{v.replace('+', ',')}", _PLAN1_OVERRIDE.value)
        for v in _PLAN1.value
    ]
    for v in _PLANS.value or gist_lm.SWEEP:
        parts = v.replace("+", ",").split(",")
        plan = "plan 3" if "plan3" in parts else "plan 2"
        runs.append((plan, f"configs/gist_lm.py:{','.join(parts)}", _OVERRIDE.value))
    summaries, histories, start = {}, {}, {}
    for plan, config, overrides in runs:
        base, _, variant = config.partition(":")
        name = _name(variant)
        shown = ",".join(p for p in variant.split(",") if p not in ("plan2", "plan3"))
        label = f"{plan}: {shown or 'frozen encoder, soft'}"
        workdir = _workdir("plans", f"{os.path.basename(base)[:-3]},{name}")
        print(f"running {base}:{name} in {workdir}", flush=True)
        summary = _runs.run(f"{base}:{name}", workdir, overrides)
        history, start[label], numbers = _runs.phase2_record(workdir)
        summary.update(numbers)
        summary["window_rank_corr"] = _window_rank_corr(history)
        summary["final_bits"] = summary["final_val_ce"]["mean"] / math.log(2)
        summaries[label], histories[label] = summary, history
    return _runs.markdown_table(summaries, PLAN_COLUMNS, "run"), summaries, histories, start


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from metalearn import plots

    os.makedirs(_ROOT.value, exist_ok=True)
    out = []
    if _BOTTLENECK.value:
        table, results = bottleneck()
        plots.gist_bottleneck(results, os.path.join(_ROOT.value, "plots", "bottleneck.png"))
        out += ["The bottleneck (Phase G alone), held-out validation windows:", "", table, ""]
    table, _, histories, start = plans()
    plots.self_loss_curves(histories, start, os.path.join(_ROOT.value, "plots", "plans.png"))
    gists = {k: h for k, h in histories.items() if any("gist/mean_cosine" in r for r in h)}
    if gists:
        plots.gist_collapse(gists, start, os.path.join(_ROOT.value, "plots", "collapse.png"))
    out += ["Plans 1-3 side by side, seed 0:", "", table]
    text = "\n".join(out)
    print(text)
    with open(os.path.join(_ROOT.value, "table.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    app.run(main)
