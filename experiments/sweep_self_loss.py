"""Runs every variant of `configs/self_loss_lm.py` and prints one table.

    python -m experiments.sweep_self_loss [--suffix=smoke] [--variants=hard,frozen+hard]
        [--root=runs/self_loss_sweep] [--override=--config.phase2.steps=1000 ...]

For each variant: `steps_to_hack` (Phase 2 steps until validation cross-entropy last
improved before the detector fired; '—' if it never fired), the step of the detection,
`steps_to_degrade` (Phase 2 steps until validation cross-entropy is 0.1 nats above its
value at the end of Phase 1; '—' if never), the step of the last new best validation
cross-entropy of θ and of the control, the step at which the control would meet the
detector's stall condition (its slow learning looks like a stall; '—' if never), the
value at the end of Phase 1, the best and final
validation cross-entropy of the self-trained model in Phase 2, the final validation
cross-entropy of the control trained on the true loss for the same steps, and the
lowest and final predicted loss, the share of the control's improvement over Phase 2
that self-training recovered, and for targets critics the quality of the targets (their
cross-entropy to the true next tokens, against the model's own, at the end of each
phase; their accuracy and entropy). Each variant runs in its own workdir under `--root`
(re-running resumes or reuses finished runs); `plots/sweep.png` under the root shows
every variant's curves, `plots/critic.png` the targets' quality of every targets
critic. `--variants` takes `+` inside a variant for its parts (`frozen+hard`), since `,`
separates variants.
"""

import os

from absl import app, flags

from configs import self_loss_lm
from experiments import _runs

_SUFFIX = flags.DEFINE_string("suffix", "", "Variant parts added to every variant, e.g. smoke.")
_VARIANTS = flags.DEFINE_list(
    "variants", None, "Variants to run (default: SWEEP); '+' joins parts."
)
_ROOT = flags.DEFINE_string("root", "runs/self_loss_sweep", "Parent folder of the runs.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "--config.x=y passed to every run.")

COLUMNS = (
    ("steps_to_hack", "steps to hack", "{}"),
    ("hack_detected_at", "detected at", "{}"),
    ("steps_to_degrade", "steps to +0.1 nats", "{}"),
    ("last_improvement", "last new best", "{}"),
    ("control_last_improvement", "control's last new best", "{}"),
    ("control_steps_to_stall", "control's stall", "{}"),
    ("phase1_end_val_ce", "val CE, end of Phase 1", "{:.3f}"),
    ("best_val_ce", "best val CE", "{:.3f}"),
    ("final_val_ce", "final val CE", "{:.3f}"),
    ("control_final_val_ce", "control val CE", "{:.3f}"),
    ("recovered", "recovered", "{:.0%}"),
    ("min_pred_loss", "min predicted", "{:.3g}"),
    ("final_pred_loss", "final predicted", "{:.3g}"),
    ("phase1_target_ce", "targets' CE, end of Phase 1", "{:.3f}"),
    ("phase1_model_ce", "model's CE, end of Phase 1", "{:.3f}"),
    ("phase2_target_ce", "targets' CE, end of Phase 2", "{:.3f}"),
    ("phase2_target_accuracy", "targets' accuracy, end of Phase 2", "{:.2f}"),
    ("phase2_target_entropy", "targets' entropy, end of Phase 2", "{:.2f}"),
)


def run_variant(variant: str, workdir: str, overrides: list[str]) -> dict:
    """Runs one variant through `experiments.run` unless it has finished; its summary."""
    return _runs.run(f"configs/self_loss_lm.py:{variant}", workdir, overrides)


def table(rows: dict[str, dict]) -> str:
    """A markdown table: one row per variant."""
    return _runs.markdown_table(rows, COLUMNS)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from metalearn import plots

    variants = [v.replace("+", ",") for v in (_VARIANTS.value or self_loss_lm.SWEEP)]
    summaries, histories, meta_steps = {}, {}, {}
    for variant in variants:
        name = f"{variant},{_SUFFIX.value}" if _SUFFIX.value else variant
        workdir = os.path.join(_ROOT.value, name.replace(",", "_"))
        print(f"running {name} in {workdir}", flush=True)
        summaries[variant] = run_variant(name, workdir, _OVERRIDE.value)
        histories[variant], meta_steps[variant], numbers = _runs.phase2_record(workdir)
        summaries[variant].update(numbers)
    plots.self_loss_curves(
        histories,
        meta_steps=meta_steps,
        path=os.path.join(_ROOT.value, "plots", "sweep.png"),
    )
    critics = {v: h for v, h in histories.items() if any("critic/target_ce" in r for r in h)}
    if critics:
        plots.critic_quality(
            critics,
            meta_steps=meta_steps,
            path=os.path.join(_ROOT.value, "plots", "critic.png"),
        )
    print(table(summaries))
    with open(os.path.join(_ROOT.value, "table.md"), "w") as f:
        f.write(table(summaries) + "\n")


if __name__ == "__main__":
    app.run(main)
