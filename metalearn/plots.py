"""Figures the papers show, drawn with matplotlib (Agg backend, PNG files).

Every function takes plain arrays (per-seed rows where there are seeds), draws the mean
with a ±1 std band, and writes one PNG.
"""

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


@functools.cache
def pyplot():
    """matplotlib.pyplot on the Agg backend, imported at the first figure, so that
    importing this module (every experiment does) costs nothing until it draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def _band(ax, x, rows, label, color):
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    mean, std = rows.mean(0), rows.std(0)
    ax.plot(x, mean, label=label, color=color)
    if rows.shape[0] > 1:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)


def _save(fig, path: str) -> None:
    """Writes the figure (on process 0 only, where several share a workdir) and closes it."""
    from metalearn.runtime.sharding import is_main_process

    if is_main_process():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    pyplot().close(fig)


def meta_train_curve(
    steps: Sequence[int], series: Mapping[str, Sequence], *, ylabel: str, title: str, path: str
) -> None:
    """A quantity vs meta iteration. series: name -> [num_evals, num_seeds]."""
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    for (name, values), color in zip(series.items(), COLORS, strict=False):
        _band(ax, steps, np.asarray(values).T, name, color)
    ax.set(xlabel="meta-train iteration", ylabel=ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend()
    _save(fig, path)


def meta_test_curve(
    series: Mapping[str, np.ndarray], *, ylabel: str, title: str, path: str, log: bool = False
) -> None:
    """A quantity vs gradient step at meta-test. series: name -> [num_seeds, num_steps + 1]."""
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    for (name, rows), color in zip(series.items(), COLORS, strict=False):
        rows = np.atleast_2d(rows)
        _band(ax, np.arange(rows.shape[-1]), rows, name, color)
    ax.set(xlabel="gradient step", ylabel=ylabel)
    ax.set_title(title, fontsize=9)
    if log:
        ax.set_yscale("log")
    ax.legend()
    _save(fig, path)


def loss_landscapes(
    grid: np.ndarray,
    landscapes: Mapping[str, np.ndarray],
    *,
    truth: float,
    xlabel: str,
    title: str,
    path: str,
) -> None:
    """One panel per loss: loss over a 1-D parameter grid, the true value marked in red.

    landscapes: name -> [num_seeds, len(grid)] (each row min-max normalised for display).
    """
    fig, axes = pyplot().subplots(
        len(landscapes), 1, figsize=(5, 2.2 * len(landscapes)), sharex=True
    )
    for ax, ((name, rows), color) in zip(
        np.atleast_1d(axes), zip(landscapes.items(), COLORS, strict=False), strict=False
    ):
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
        lo, hi = rows.min(1, keepdims=True), rows.max(1, keepdims=True)
        _band(ax, grid, (rows - lo) / np.maximum(hi - lo, 1e-12), name, color)
        ax.axvline(truth, color="red")
        ax.set_ylabel("loss (normalised)")
        ax.legend(loc="upper right")
    np.atleast_1d(axes)[0].set_title(title)
    np.atleast_1d(axes)[-1].set_xlabel(xlabel)
    _save(fig, path)


def landscapes_across_truth(
    grid: np.ndarray,
    truths: np.ndarray,
    losses: np.ndarray,
    test_truths: np.ndarray,
    offsets: np.ndarray,
    *,
    tolerance: float,
    title: str,
    path: str,
) -> None:
    """Where a loss over a 1-D parameter is lowest, relative to the true value, across it.

    Left: the loss over `grid` [G] (columns) for each true value `truths` [N] (rows),
    each row min-max normalised, with the row's argmin (white dots) and the diagonal
    (red). Right: argmin − truth of the test tasks, `offsets` [S, F] at `test_truths`
    [S, F], one colour per seed, with the ±`tolerance` band.
    """
    losses = np.asarray(losses, dtype=np.float64)
    lo, hi = losses.min(1, keepdims=True), losses.max(1, keepdims=True)
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 4))
    left.pcolormesh(grid, truths, (losses - lo) / np.maximum(hi - lo, 1e-12), shading="auto")
    left.plot(truths, truths, color="red", lw=1, label="ω = ν")
    left.plot(grid[losses.argmin(1)], truths, "w.", ms=4, label="argmin")
    left.set(xlabel="ω", ylabel="true ν", title="loss (normalised per row), first seed")
    left.legend(loc="lower right", fontsize=8)
    for seed, (x, y) in enumerate(
        zip(np.atleast_2d(test_truths), np.atleast_2d(offsets), strict=True)
    ):
        right.scatter(x, y, s=6, color=COLORS[seed % len(COLORS)], label=f"seed {seed}")
    right.axhspan(-tolerance, tolerance, color="grey", alpha=0.2, label=f"±{tolerance}")
    right.axhline(0.0, color="red", lw=1)
    right.set(xlabel="true ν (unseen test tasks)", ylabel="argmin ω − ν")
    right.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def reached_fractions(
    eval_steps: Sequence[int],
    during: Mapping[str, Sequence],
    counts: Sequence[int],
    by_count: Mapping[str, np.ndarray],
    *,
    ylabel: str,
    test_steps: int,
    path: str,
) -> None:
    """A success fraction against meta-iteration (left; `during`: name -> [evals, seeds],
    after `test_steps` steps) and against the meta-test step count (right; `by_count`:
    name -> [len(counts), seeds], after meta-training). A name has one colour in both."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 3.5), sharey=True)
    names = list(dict.fromkeys([*during, *by_count]))
    color = dict(zip(names, COLORS, strict=False))
    for name, values in during.items():
        _band(left, eval_steps, np.asarray(values).T, name, color[name])
    left.set(xlabel="meta-train iteration", ylabel=ylabel, title=f"after {test_steps} steps")
    for name, values in by_count.items():
        _band(right, counts, np.asarray(values).T, name, color[name])
    right.set(xlabel="meta-test gradient steps", xscale="log", title="after meta-training")
    right.legend(fontsize=8)
    _save(fig, path)


def image_training_curves(histories: Mapping[str, Sequence[Mapping]], path: str) -> None:
    """Test error and training cross-entropy vs model step, one line (band) per run group.

    histories: label -> one run's metric rows, or a list of runs (seeds) whose rows share
    their evaluation steps; the rows are those of `metrics.jsonl`.
    """
    fig, (ax_err, ax_ce) = pyplot().subplots(1, 2, figsize=(9, 3.5))
    for (label, runs), color in zip(histories.items(), COLORS, strict=False):
        if runs and isinstance(runs[0], Mapping):
            runs = [runs]
        evals = [[r for r in run if "eval/test_error" in r] for run in runs]
        n = min(len(e) for e in evals)
        x = [r["eval/model_step"] for r in evals[0][:n]]
        _band(ax_err, x, [[r["eval/test_error"] for r in e[:n]] for e in evals], label, color)
        offset = evals[0][0]["step"] - evals[0][0]["eval/model_step"]  # offline phase
        train = [[r for r in run if "train/ce" in r and r["step"] > offset] for run in runs]
        m = min(len(t) for t in train)
        if m:
            xs = [r["step"] - offset for r in train[0][:m]]
            ys = [_smooth([r["train/ce"] for r in t[:m]]) for t in train]
            _band(ax_ce, xs, ys, label, color)
    ax_err.set(xlabel="model step", ylabel="test error")
    ax_ce.set(xlabel="model step", ylabel="training cross-entropy (smoothed)", yscale="log")
    ax_err.legend(fontsize=8)
    _save(fig, path)


def _smooth(values: Sequence[float], window: int = 20) -> np.ndarray:
    """A trailing moving average (shorter at the start)."""
    v = np.asarray(values, dtype=np.float64)
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def learned_loss_shapes(history: Sequence[Mapping], init_steps: int, path: str) -> None:
    """The learned loss ℓ_φ(y, p) against the predicted probability p, at several times.

    Two panels: y = 1 (the true class) and y = 0 (a wrong class); one line per logged
    evaluation, from the initial φ through the end of the offline phase to the end of
    training (at most 6, evenly spaced).
    """
    rows = [r for r in history if "curve/true_class" in r]
    if len(rows) > 6:
        rows = [rows[int(round(i))] for i in np.linspace(0, len(rows) - 1, 6)]
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.5))
    cmap = pyplot().get_cmap("viridis")
    for i, row in enumerate(rows):
        p = np.linspace(0.0, 1.0, len(row["curve/true_class"]))
        step = row["step"]
        label = f"init step {step}" if step <= init_steps else f"model step {step - init_steps}"
        color = cmap(i / max(len(rows) - 1, 1))
        axes[0].plot(p, row["curve/true_class"], color=color, label=label)
        axes[1].plot(p, row["curve/wrong_class"], color=color, label=label)
    axes[0].set(xlabel="predicted probability of the true class", ylabel="ℓ_φ(y=1, p)")
    axes[1].set(xlabel="predicted probability of a wrong class", ylabel="ℓ_φ(y=0, p)")
    axes[0].legend(fontsize=7)
    _save(fig, path)


def gradient_ratios(histories: Mapping[str, Sequence[Mapping]], init_steps: int, path: str) -> None:
    """The learned loss's implied learning-rate schedule, one line per run.

    Left: `train/grad_ratio` (‖∇_z L_φ‖ / ‖∇_z CE‖ at the batch's logits) against the
    model step, log scale; right: the size of the base update ‖θ_{t+1} − θ_t‖. The
    offline phase is left of the dashed line (negative model steps).
    """
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.5))
    for name, history in histories.items():
        rows = [r for r in history if "train/grad_ratio" in r]
        if not rows:
            continue
        step = np.array([r["step"] for r in rows]) - init_steps
        axes[0].plot(step, _smooth([r["train/grad_ratio"] for r in rows], 9), lw=1, label=name)
        if "train/update_norm" in rows[0]:
            update = _smooth([r["train/update_norm"] for r in rows], 9)
            axes[1].plot(step, update, lw=1, label=name)
    for ax in axes:
        ax.axvline(0, color="gray", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("model step (offline phase < 0)")
    axes[0].set_ylabel("‖∇_z L_φ‖ / ‖∇_z CE‖")
    axes[1].set_ylabel("‖θ_{t+1} − θ_t‖")
    axes[0].legend(fontsize=7)
    _save(fig, path)


def implied_step_sizes(
    curves: Mapping[str, tuple[Sequence[float], Sequence[Sequence[float]]]], path: str
) -> None:
    """The step size each variant took: the base learning rate times the learned loss's
    gradient ratio (1 for cross-entropy), against the model step, log scale.

    curves: label -> (model steps, one row of step sizes per seed at those steps); the
      line is the mean over seeds with a ±1 std band. Labels sharing their first word
      (the base optimizer) share a line style.
    """
    fig, ax = pyplot().subplots(figsize=(7, 4))
    styles = {}
    cmap = pyplot().get_cmap("tab10")
    for i, (label, (x, rows)) in enumerate(curves.items()):
        base = label.split()[0]
        style = styles.setdefault(base, ("-", "--", ":", "-.")[len(styles) % 4])
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
        color = cmap(i % 10)
        ax.plot(x, rows.mean(0), ls=style, lw=1.2, color=color, label=label)
        if rows.shape[0] > 1:
            lo, hi = rows.mean(0) - rows.std(0), rows.mean(0) + rows.std(0)
            ax.fill_between(x, np.maximum(lo, 1e-8), hi, color=color, alpha=0.15)
    ax.set(xlabel="model step", ylabel="learning rate × ‖∇_z L‖ / ‖∇_z CE‖", yscale="log")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


def learned_loss_shapes_compared(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str
) -> None:
    """Several learned losses at the end of training, side by side with cross-entropy.

    curves: label -> (ℓ(y=1, p), ℓ(y=0, p)) on an even grid of p in [0, 1]. Each curve is
    shifted to 0 at its minimum over the grid and divided by its range over p ∈ [0.05, 1]
    (true class) or [0, 0.95] (wrong class), so that shapes compare whatever their scale
    (the step sizes are in `implied_step_sizes`).
    """
    fig, axes = pyplot().subplots(1, 2, figsize=(9, 3.5))
    for label, pair in [("cross-entropy", None), *curves.items()]:
        for j, ax in enumerate(axes):
            if pair is None:
                p = np.linspace(0.0, 1.0, 101)
                y = -np.log(np.maximum(p, 1e-30)) if j == 0 else np.zeros_like(p)
            else:
                y = np.asarray(pair[j], dtype=np.float64)
                p = np.linspace(0.0, 1.0, len(y))
            keep = p >= 0.05 if j == 0 else p <= 0.95
            span = np.ptp(y[keep])
            y = (y - y[keep].min()) / (span if span > 0 else 1.0)
            style = dict(color="black", ls="--", lw=1) if pair is None else dict(lw=1.2)
            ax.plot(p[keep], y[keep], label=label, **style)
    axes[0].set(xlabel="predicted probability of the true class", ylabel="ℓ(y=1, p), rescaled")
    axes[1].set(xlabel="predicted probability of a wrong class", ylabel="ℓ(y=0, p), rescaled")
    axes[0].legend(fontsize=7)
    _save(fig, path)


def _panels(n: int):
    """A grid of n panels, at most 4 a row: `(fig, axes)`, axes [rows, cols]."""
    cols = min(n, 4)
    rows = -(-n // cols)
    return pyplot().subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)


def _save_panels(fig, axes, n: int, path: str) -> None:
    """Turns the grid's unused panels off and saves."""
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    _save(fig, path)


def _finish_panel(ax, name: str, meta_steps: int | Mapping[str, int]) -> None:
    """A run's panel: the dashed line where Phase 2 starts, its title and step axis."""
    ax.axvline(_per_run(meta_steps, name), color="k", ls="--", lw=0.8)
    ax.set_title(name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)


def _twin_legend(ax, right, left_lines: int, right_lines: int, loc: str) -> None:
    """One legend for a panel with a twin axis: its first lines on each side."""
    lines = ax.get_lines()[:left_lines] + right.get_lines()[:right_lines]
    ax.legend(lines, [x.get_label() for x in lines], fontsize=7, loc=loc)


def _per_run(value, name: str):
    """`value`, or its entry for run `name` when it is a mapping."""
    return value[name] if isinstance(value, Mapping) else value


def self_loss_curves(
    histories: Mapping[str, Sequence[Mapping]], meta_steps: int | Mapping[str, int], path: str
) -> None:
    """Self-loss runs, one panel each: the predicted loss (left axis) and the true
    validation cross-entropy of θ and of the control trained on the true loss (right
    axis) against the step; Phase 2 starts at the dashed line, a red dot marks the first
    reward-hacking detection."""
    n = len(histories)
    fig, axes = _panels(n)
    for ax, (name, history) in zip(axes.flat, histories.items(), strict=False):
        rows = [r for r in history if "self/pred_loss" in r]
        step = np.array([r["step"] for r in rows])
        pred = _smooth([r["self/pred_loss"] for r in rows], 5)
        ax.plot(step, pred, color="tab:purple", lw=1, label="predicted loss")
        ax.set_ylabel("predicted loss", color="tab:purple", fontsize=8)
        right = ax.twinx()
        right.plot(step, [r["true/val_ce"] for r in rows], color="tab:blue", label="val CE")
        control = [(r["step"], r["control/val_ce"]) for r in rows if r.get("phase") == 2]
        if control:  # the control forks at the end of Phase 1
            right.plot(*zip(*control, strict=True), color="tab:gray", ls=":", label="control")
        right.set_ylabel("true cross-entropy (nats)", fontsize=8)
        _finish_panel(ax, name, meta_steps)
        hacked = [r["step"] for r in rows if r.get("diag/hacked")]
        if hacked:
            right.plot(
                hacked[0], next(r["true/val_ce"] for r in rows if r["step"] == hacked[0]), "ro"
            )
        if ax is axes.flat[0]:
            _twin_legend(ax, right, 1, 2, "upper right")
    _save_panels(fig, axes, n, path)


def critic_quality(
    histories: Mapping[str, Sequence[Mapping]], meta_steps: int | Mapping[str, int], path: str
) -> None:
    """Targets-critic runs, one panel each: the cross-entropy of the critic's targets to
    the true next tokens against the model's own train cross-entropy, and the targets'
    entropy, over both phases (Phase 2 starts at the dashed line)."""
    n = len(histories)
    fig, axes = _panels(n)
    for ax, (name, history) in zip(axes.flat, histories.items(), strict=False):
        rows = [r for r in history if "critic/target_ce" in r and not r.get("self/anchor")]
        step = np.array([r["step"] for r in rows])
        for key, label, color in (
            ("critic/target_ce", "targets' CE to the truth", "tab:red"),
            ("true/train_ce", "model's CE (train batch)", "tab:blue"),
            ("critic/target_entropy", "targets' entropy", "tab:green"),
        ):
            ax.plot(step, _smooth([r[key] for r in rows], 5), color=color, lw=1, label=label)
        _finish_panel(ax, name, meta_steps)
        ax.set_ylabel("nats", fontsize=8)
        if ax is axes.flat[0]:
            ax.legend(fontsize=7, loc="upper right")
    _save_panels(fig, axes, n, path)


def hack_targets(report: Mapping[str, Any], path: str) -> None:
    """The self-loss hack report: at the onset of the hack and at its detection, the
    tokens the critic's targets favour (mass of the targets, the model's predictions and
    the true next tokens on each), with the step, validation CE and the targets' CE and
    entropy in the title."""
    fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, name in zip(axes, ("onset", "detection"), strict=True):
        entry = report[name]
        favoured = entry["favoured"]
        x = np.arange(len(favoured))
        bars = [("target", "targets", "tab:red"), ("model", "model", "tab:blue")]
        bars.append(("true", "true next tokens", "tab:gray"))
        bars = [b for b in bars if b[0] in favoured[0]]
        width = 0.8 / len(bars)
        for i, (key, label, color) in enumerate(bars):
            ax.bar(x + i * width, [f[key] for f in favoured], width, label=label, color=color)
        labels = ["space" if f["token"] == " " else repr(f["token"])[1:-1] for f in favoured]
        ax.set_xticks(x + 0.4 - width / 2, labels)
        title = f"{name}: Phase 2 step {entry['phase2_step']}, val CE {entry['val_ce']:.2f}"
        if "target_ce" in entry:
            title += (
                f"\ntargets: CE {entry['target_ce']:.2f}, entropy {entry['target_entropy']:.2f}"
            )
        ax.set_title(title, fontsize=8)
        ax.set_ylabel("mean probability mass", fontsize=8)
        ax.legend(fontsize=7)
    _save(fig, path)


def goal_trajectories(
    paths: Mapping[str, np.ndarray],
    goals: Mapping[str, np.ndarray],
    start: np.ndarray,
    *,
    title: str,
    path: str,
) -> None:
    """Planar trajectories towards goals, one colour per set (ML³ MBRL, Fig. 3a).

    paths: set name -> positions [N, T + 1, 2]; goals: set name -> goals [N, 2] (drawn as
    crosses); start: the start position [2] (a black dot).
    """
    fig, ax = pyplot().subplots(figsize=(4.5, 4.5))
    for (name, trajectories), color in zip(paths.items(), COLORS, strict=False):
        for i, traj in enumerate(np.asarray(trajectories)):
            label = name.replace("_", " ") if i == 0 else None
            ax.plot(traj[:, 0], traj[:, 1], color=color, alpha=0.7, label=label)
        ax.scatter(goals[name][:, 0], goals[name][:, 1], marker="x", color=color)
    ax.scatter([start[0]], [start[1]], color="black", marker="o", label="start")
    ax.set(xlabel="x", ylabel="y", aspect="equal")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    _save(fig, path)


def mountain_car_trajectories(
    positions: Mapping[str, np.ndarray],
    *,
    goal: float,
    intermediate_goal: float,
    title: str,
    path: str,
) -> None:
    """Position vs time step on the mountain car (ML³ Fig. 6a).

    positions: name -> [num_runs, T + 1] (one line per run); goal and intermediate_goal
    are drawn as horizontal lines.
    """
    fig, ax = pyplot().subplots(figsize=(5.5, 3.5))
    for (name, rows), color in zip(positions.items(), COLORS, strict=False):
        rows = np.atleast_2d(np.asarray(rows))
        for i, row in enumerate(rows):
            ax.plot(row, color=color, alpha=0.8, lw=1.2, label=name if i == 0 else None)
    ax.axhline(goal, color="k", ls="--", lw=0.8, label="goal")
    ax.axhline(intermediate_goal, color="grey", ls=":", lw=0.8, label="intermediate goal")
    ax.set(xlabel="time step", ylabel="position x", ylim=(-1.25, 0.65))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def reacher_workspace(
    train_goals: np.ndarray,
    test_goals: np.ndarray,
    reached: Mapping[str, np.ndarray],
    expert_paths: np.ndarray,
    reach: float,
    path: str,
) -> None:
    """ML³ Fig. 6c: training (blue) and test (orange) targets, the experts' end-effector
    paths, and the end-effector positions each method reached on the test targets.

    Args:
      train_goals, test_goals: [Gtr, 2], [Gte, 2].
      reached: name -> final positions [seeds, Gte, 2] (at most two names).
      expert_paths: the experts' end-effector paths [Gtr, T + 1, 2].
      reach: the arm's reach, drawn as a circle.
      path: the PNG to write.
    """
    fig, ax = pyplot().subplots(figsize=(4.5, 4.5))
    angle = np.linspace(0, 2 * np.pi, 200)
    ax.plot(reach * np.cos(angle), reach * np.sin(angle), color="0.8", lw=1)
    for p in expert_paths:
        ax.plot(p[:, 0], p[:, 1], color="tab:blue", lw=0.8, alpha=0.5)
    ax.scatter(*train_goals.T, s=80, color="tab:blue", label="training targets (expert)")
    ax.scatter(*test_goals.T, s=80, color="tab:orange", label="test targets")
    for (name, xy), marker, color in zip(
        reached.items(), ("x", "+"), ("tab:green", "tab:red"), strict=False
    ):
        xy = np.asarray(xy).reshape(-1, 2)
        ax.scatter(*xy.T, marker=marker, color=color, s=25, label=f"reached: {name}")
    ax.scatter([0], [0], color="k", s=15)
    ax.set_aspect("equal")
    ax.set(xlabel="x (m)", ylabel="y (m)")
    ax.set_title("ReacherGoal workspace (Fig. 6c)", fontsize=9)
    ax.legend(fontsize=6, loc="lower left")
    _save(fig, path)


def gist_bottleneck(results: Mapping[str, Mapping[str, Sequence[float]]], path: str) -> None:
    """CE(x | gists) on held-out text against the number of gists k (mean ± std over
    seeds), between the two controls as horizontal bands: 'positive' (full attention)
    and 'negative' (the chunk sees neither the context nor the gists).

    Args:
      results: {'k1': {'ce': [per seed]}, ..., 'positive': {...}, 'negative': {...}}.
    """
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    ks = sorted((int(name[1:]), name) for name in results if name.startswith("k"))
    if ks:
        vals = [np.asarray(results[name]["ce"]) for _, name in ks]
        ax.errorbar(
            [k for k, _ in ks],
            [v.mean() for v in vals],
            yerr=[v.std() for v in vals],
            marker="o",
            color="tab:blue",
            capsize=3,
            label="gist mask",
        )
    for name, color in (("positive", "tab:green"), ("negative", "tab:red")):
        if name in results:
            v = np.asarray(results[name]["ce"])
            ax.axhline(v.mean(), color=color, ls="--", label=f"{name} control")
            ax.axhspan(v.mean() - v.std(), v.mean() + v.std(), color=color, alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("gist tokens k")
    ax.set_ylabel("CE(x | gists), nats")
    ax.set_title("The bottleneck: held-out chunk cross-entropy", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def gist_collapse(
    histories: Mapping[str, Sequence[Mapping]], meta_steps: int | Mapping[str, int], path: str
) -> None:
    """Gist-space runs, one panel each: the mean cosine between the gists of different
    chunks (observed text, and the model's own continuations) and the effective rank of
    the observed chunks' gists, over both phases (Phase 2 starts at the dashed line)."""
    n = len(histories)
    fig, axes = _panels(n)
    for ax, (name, history) in zip(axes.flat, histories.items(), strict=False):
        rows = [r for r in history if "gist/mean_cosine" in r]
        step = np.array([r["step"] for r in rows])
        for key, label, color in (
            ("gist/mean_cosine", "mean cosine, observed", "tab:blue"),
            ("gist/output_mean_cosine", "mean cosine, own continuation", "tab:orange"),
        ):
            ax.plot(step, [r[key] for r in rows], color=color, lw=1, label=label)
        ax.set_ylabel("mean pairwise cosine", fontsize=8)
        right = ax.twinx()
        right.plot(
            step,
            [r["gist/effective_rank"] for r in rows],
            color="tab:gray",
            lw=1,
            label="effective rank, observed",
        )
        right.set_ylabel("effective rank", fontsize=8)
        _finish_panel(ax, name, meta_steps)
        if ax is axes.flat[0]:
            _twin_legend(ax, right, 2, 1, "best")
    _save_panels(fig, axes, n, path)


def policy_learning_curves(
    curves: Mapping[str, tuple[Sequence[float], np.ndarray]], metric: str, title: str, path: str
) -> None:
    """Fig. 4: a policy's score against environment samples, one curve per method.

    curves: label -> (samples [P], scores [seeds, goals, P]); each curve is the mean over
    goals of the seeds' mean, with a ±1 std band over the goals.
    """
    fig, ax = pyplot().subplots(figsize=(5, 3.5))
    for (label, (x, rows)), color in zip(curves.items(), COLORS, strict=False):
        _band(ax, x, np.asarray(rows, np.float64).mean(0), label, color)
    ax.set(xlabel="environment samples", ylabel=metric.replace("_", " "))
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    _save(fig, path)
