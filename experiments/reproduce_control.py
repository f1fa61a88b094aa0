"""Runs the ML³ control and shaping experiments (Bechtle et al., Figs. 3, 5c-d, 6) and
prints their tables.

    python -m experiments.reproduce_control [--configs=ml3_mountain_car,...]
        [--variant=smoke] [--root=runs/control] [--override=--config.x=y ...]

`--configs` takes config file stems, optionally with a variant (`ml3_mountain_car:short`);
`--variant` is added to every one (`smoke` for a quick check of the whole pipeline).
Each config runs through `experiments.run` in its own workdir under `--root` (a
re-run resumes unfinished runs and reuses finished ones). Then, per config, every
`{"mean", "std"}` entry of its summary.json is printed in a markdown table: one row per
quantity, one column per method (the last key of the entry), mean ± std over seeds.
"""

import os
from collections import defaultdict

from absl import app, flags

from experiments import _runs

CONFIGS = (
    "ml3_inverse_dynamics",
    "ml3_mbrl_pointmass",
    "ml3_mbrl_reacher",
    "ml3_mountain_car",
    "ml3_mountain_car:short",
    "ml3_reacher_demos",
)

_CONFIGS = flags.DEFINE_list("configs", list(CONFIGS), "Configs (file stems) to run.")
_VARIANT = flags.DEFINE_string("variant", "", "Variant of every config, e.g. smoke.")
_ROOT = flags.DEFINE_string("root", "runs/control", "Parent folder of the runs.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "--config.x=y passed to every run.")


def run_config(name: str, variant: str, workdir: str, overrides: list[str]) -> dict:
    """Runs one config in a subprocess unless its summary exists; returns the summary."""
    config = f"configs/{name}.py" + (f":{variant}" if variant else "")
    return _runs.run(config, workdir, overrides, quiet=False)


def _mean_std_entries(tree: dict, path: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict) and set(value) >= {"mean", "std"}:
            yield (*path, key), value
        elif isinstance(value, dict):
            yield from _mean_std_entries(value, (*path, key))


def table(summary: dict) -> str:
    """Markdown: rows are quantities (all but the last key), columns the last key (the method).

    An entry alone in its row (e.g. `test_goals/initial_distance`) keeps its whole path as
    the row and goes in a `value` column.
    """
    cells: dict[str, dict[str, dict]] = defaultdict(dict)
    for path, value in _mean_std_entries(summary):
        cells["/".join(path[:-1])][path[-1]] = value
    rows: dict[str, dict[str, str]] = {}
    columns: list[str] = []
    for row, entries in cells.items():
        if len(entries) == 1:
            ((column, value),) = entries.items()
            row, entries = f"{row}/{column}" if row else column, {"value": value}
        rows[row] = {c: f"{v['mean']:.4g} ± {v['std']:.2g}" for c, v in entries.items()}
        columns += [c for c in entries if c not in columns]
    columns = sorted(columns, key=lambda c: c == "value")  # the scalars' column last
    lines = ["| quantity | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for row, texts in rows.items():
        lines.append(f"| {row} | " + " | ".join(texts.get(c, "") for c in columns) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    known = {c.partition(":")[0] for c in CONFIGS}
    unknown = sorted({c.partition(":")[0] for c in _CONFIGS.value} - known)
    if unknown:
        raise app.UsageError(f"Unknown configs {unknown}; known: {', '.join(sorted(known))}.")
    for entry in _CONFIGS.value:
        name, _, variant = entry.partition(":")
        variant = ",".join(v for v in (variant, _VARIANT.value) if v)
        workdir = os.path.join(
            _ROOT.value, name + (f"_{variant.replace(',', '_')}" * bool(variant))
        )
        summary = run_config(name, variant, workdir, _OVERRIDE.value)
        seeds = summary.get("seeds")
        title = f"{name}:{variant}" if variant else name
        print(f"\n### {title}" + (f" (seeds {seeds})" if seeds else "") + f"\n{workdir}\n")
        print(table(summary))


if __name__ == "__main__":
    app.run(main)
