"""Figures the papers show, drawn with matplotlib (Agg backend, PNG files).

Every function takes plain arrays (per-seed rows where there are seeds), draws the mean
with a ±1 std band, and writes one PNG.
"""

import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def _band(ax, x, rows, label, color):
    rows = np.atleast_2d(np.asarray(rows, dtype=np.float64))
    mean, std = rows.mean(0), rows.std(0)
    ax.plot(x, mean, label=label, color=color)
    if rows.shape[0] > 1:
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)


def _save(fig, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def meta_train_curve(
    steps: Sequence[int], series: Mapping[str, Sequence], *, ylabel: str, title: str, path: str
) -> None:
    """A quantity vs meta iteration. series: name -> [num_evals, num_seeds]."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
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
    fig, ax = plt.subplots(figsize=(5, 3.5))
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
    fig, axes = plt.subplots(len(landscapes), 1, figsize=(5, 2.2 * len(landscapes)), sharex=True)
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
