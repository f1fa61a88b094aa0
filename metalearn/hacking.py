"""Reward-hacking detection for models trained on their own (or a learned) signal.

The detector (`Detector`, `init_detector`, `detector_update`) watches the logged steps of
training for a predicted loss that keeps falling while the validation cross-entropy does
not; `first_stall` and `improvement` read curves after the fact. Pure functions of
arrays: jit them, scan them, vmap them over runs. `phase2_summary` and
`steps_to_degrade` read a finished two-phase run (a phase that trains the model on the
true loss, then Phase 2 on its own signal) from its logged rows, on the host.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np

from metalearn.runtime.metrics import mean_std
from metalearn.types import Array


def spearman(x: Array, y: Array, valid: Array) -> Array:
    """Spearman rank correlation of x and y [W] over the entries where `valid` [W] holds
    (0 when fewer than 3 are valid or either is constant)."""
    big = jnp.finfo(x.dtype).max

    def ranks(v):
        v = jnp.where(valid, v, big)  # invalid entries rank last and are masked below
        return jnp.argsort(jnp.argsort(v)).astype(x.dtype)

    n = jnp.sum(valid)
    rx, ry = ranks(x), ranks(y)
    mx = jnp.sum(jnp.where(valid, rx, 0.0)) / jnp.maximum(n, 1)
    my = jnp.sum(jnp.where(valid, ry, 0.0)) / jnp.maximum(n, 1)
    dx, dy = jnp.where(valid, rx - mx, 0.0), jnp.where(valid, ry - my, 0.0)
    den = jnp.sqrt(jnp.sum(dx**2) * jnp.sum(dy**2))
    return jnp.where((n >= 3) & (den > 0), jnp.sum(dx * dy) / jnp.where(den > 0, den, 1.0), 0.0)


@flax.struct.dataclass
class Detector:
    """The reward-hacking detector's state: ring buffers over the last W logged steps."""

    pred: Array  # [W] predicted loss (or critic agreement)
    train: Array  # [W] true train cross-entropy
    count: Array  # valid entries in the buffers
    best_val: Array  # validation cross-entropy at the last improvement by the tolerance
    best_step: Array  # the step of that improvement
    since: Array  # logged steps since then
    detected_at: Array  # step of the first detection, −1 before
    onset: Array  # best_step at the first detection, −1 before


def init_detector(window: int, val: Array, step: Array) -> Detector:
    """A fresh detector whose reference is the validation cross-entropy `val` at `step`.

    Args:
      window: W, the logged steps the detector looks back over.
      val: the reference validation cross-entropy, a scalar.
      step: the step of that reference, a scalar.

    Returns:
      The detector, with empty buffers and no detection.
    """
    return Detector(
        pred=jnp.zeros((window,)),
        train=jnp.zeros((window,)),
        count=jnp.zeros((), jnp.int32),
        best_val=jnp.asarray(val, jnp.float32),
        best_step=jnp.asarray(step, jnp.int32),
        since=jnp.zeros((), jnp.int32),
        detected_at=jnp.full((), -1, jnp.int32),
        onset=jnp.full((), -1, jnp.int32),
    )


def detector_update(
    det: Detector, pred: Array, train: Array, val: Array, step: Array, *, tolerance: float
) -> tuple[Detector, Array, Array, Array]:
    """Adds one logged step; pure.

    A step is hacked when the predicted loss has fallen over a full window while the
    validation cross-entropy is more than `tolerance` above its best or has not improved
    by `tolerance` for a whole window. The first such step sets `detected_at`, and
    `onset` to the step of the last improvement before it (where the hack began).

    Args:
      det: the detector.
      pred, train, val: this step's predicted loss, true train and validation
        cross-entropies (scalars).
      step: this step (a scalar).
      tolerance: nats an improvement or a degradation must exceed.

    Returns:
      `(detector, hacked, improved, rank_corr)`: `hacked` is whether this step meets the
      hacking condition, `improved` whether validation improved by the tolerance (a new
      best), `rank_corr` the Spearman correlation of predicted and true train loss over
      the window.
    """
    window = det.pred.shape[0]
    push = lambda buf, x: jnp.roll(buf, -1).at[-1].set(x)  # noqa: E731
    pred_buf, train_buf = push(det.pred, pred), push(det.train, train)
    count = jnp.minimum(det.count + 1, window)
    valid = jnp.arange(window) >= window - count
    improved, best_val, since = improvement(det.best_val, det.since, val, tolerance=tolerance)
    best_step = jnp.where(improved, step, det.best_step)
    falling = (count == window) & (pred_buf[-1] < pred_buf[0])
    worse = (val > best_val + tolerance) | (since >= window)
    hacked = falling & worse
    first = hacked & (det.detected_at < 0)
    det = Detector(
        pred=pred_buf,
        train=train_buf,
        count=count,
        best_val=best_val,
        best_step=best_step,
        since=since,
        detected_at=jnp.where(first, step, det.detected_at),
        onset=jnp.where(first, best_step, det.onset),
    )
    return det, hacked, improved, spearman(pred_buf, train_buf, valid)


def improvement(
    best_val: Array, since: Array, val: Array, *, tolerance: float
) -> tuple[Array, Array, Array]:
    """The detector's improvement rule: `val` improves when it is more than `tolerance`
    below `best_val`. Returns `(improved, best_val, since)`, `since` the logged steps
    since the last improvement (0 on one)."""
    improved = val < best_val - tolerance
    return improved, jnp.where(improved, val, best_val), jnp.where(improved, 0, since + 1)


def first_stall(values: Array, *, tolerance: float, window: int) -> Array:
    """The index (into `values[1:]`) of the first logged step at which `values` — the
    reference first, then one per logged step — had not improved by `tolerance`
    (`improvement`) for `window` steps: the detector's stall condition applied to any
    curve (e.g. a control trained on the true loss). −1 if never."""

    def step(carry, val):
        best, since, found, i = carry
        _, best, since = improvement(best, since, val, tolerance=tolerance)
        found = jnp.where((found < 0) & (since >= window), i, found)
        return (best, since, found, i + 1), None

    values = jnp.asarray(values, jnp.float32)
    init = (
        values[0],
        jnp.zeros((), jnp.int32),
        jnp.full((), -1, jnp.int32),
        jnp.zeros((), jnp.int32),
    )
    (_, _, found, _), _ = jax.lax.scan(step, init, values[1:])
    return found


def restart_detector(det: Detector, step: Array) -> Detector:
    """Empty buffers from `step` on, the best validation cross-entropy so far as the
    reference, and the first detection kept (after a rollback to the best θ)."""
    fresh = init_detector(det.pred.shape[0], det.best_val, step)
    return fresh.replace(detected_at=det.detected_at, onset=det.onset)


def phase2_summary(
    history: list[dict],
    meta_steps: int,
    margin: float,
    *,
    tolerance: float = 0.01,
    window: int = 10,
    quality_tail: int = 10,
) -> dict:
    """The numbers of a run's Phase 2 read from its logged rows (see `steps_to_degrade`);
    predicted-loss figures skip anchor steps, which log the true loss they descend.

    Besides the detector's horizon, `last_improvement` is the Phase 2 step of the last
    new minimum of the logged validation cross-entropy (by any margin), for θ and for
    the control; `control_steps_to_stall` is the step at which the control's validation
    cross-entropy had not improved by `tolerance` over `window` logged steps: the
    detector's stall condition applied to a model trained on the true loss, which says
    when slow but real learning looks like a stall to the detector.

    Args:
      history: the run's rows (`runtime.metrics.read_metrics`); those of training steps
        have `phase` (1 or 2), `self/pred_loss`, `self/anchor`, `true/train_ce`,
        `true/val_ce` and `control/val_ce`, and `critic/target_*` where the loss is
        self-produced targets.
      meta_steps: the step Phase 2 starts at (the end of Phase 1 or of Phase G).
      margin: nats above the start that count as degraded (`steps_to_degrade`).
      tolerance, window: the detector's (`detector_update`), for the control's stall.
      quality_tail: the logged steps of each phase that the target-quality figures (where
        the run logs `critic/target_ce`) average over.

    Returns:
      The summary's Phase 2 entries, each number as `runtime.metrics.mean_std` gives it
      (empty if the run has no Phase 2 rows).
    """
    rows = [r for r in history if "self/pred_loss" in r]
    phase2 = [r for r in rows if r["phase"] == 2]
    if not phase2:
        return {}
    val = [r["true/val_ce"] for r in phase2]
    pred = [r["self/pred_loss"] for r in phase2 if not r["self/anchor"]] or [np.nan]
    start = next(r["true/val_ce"] for r in rows if r["step"] == meta_steps)
    control = phase2[-1]["control/val_ce"]
    steps = [r["step"] - meta_steps for r in phase2]
    control_val = [r["control/val_ce"] for r in phase2]
    out = {
        "steps_to_degrade": steps_to_degrade(history, meta_steps, margin),
        "phase1_end_val_ce": mean_std([start]),
        "best_val_ce": mean_std([min(val)]),
        "final_val_ce": mean_std([val[-1]]),
        "control_final_val_ce": mean_std([control]),
        # The share of the control's improvement over Phase 2 that self-training made.
        "recovered": mean_std([(start - val[-1]) / (start - control)]) if start > control else None,
        "min_pred_loss": mean_std([min(pred)]),
        "final_pred_loss": mean_std([pred[-1]]),
        "last_improvement": _last_minimum(steps, val),
        "control_last_improvement": _last_minimum(steps, control_val),
        "control_steps_to_stall": _stall(steps, [start, *control_val], tolerance, window),
    }
    if "critic/target_ce" in rows[-1]:
        # The targets' quality against the model's own predictions, at the end of Phase 1
        # (the mean over its last logged steps) and over the last logged steps of Phase 2.
        phase1 = [r for r in rows if r["phase"] == 1 and r["step"] <= meta_steps]
        for name, part in (
            ("phase1", phase1),
            ("phase2", [r for r in phase2 if not r["self/anchor"]]),
        ):
            tail = part[-quality_tail:]
            out[f"{name}_target_ce"] = mean_std([np.mean([r["critic/target_ce"] for r in tail])])
            out[f"{name}_model_ce"] = mean_std([np.mean([r["true/train_ce"] for r in tail])])
            out[f"{name}_target_accuracy"] = mean_std(
                [np.mean([r["critic/target_accuracy"] for r in tail])]
            )
            out[f"{name}_target_entropy"] = mean_std(
                [np.mean([r["critic/target_entropy"] for r in tail])]
            )
    return out


def _last_minimum(steps: list[int], values: list[float]) -> int:
    best, at = np.inf, 0
    for step, value in zip(steps, values, strict=True):
        if value < best:
            best, at = value, step
    return at


def _stall(steps: list[int], values: list[float], tolerance: float, window: int) -> int | None:
    """The step at which `values` (the reference first, then one per step) meet the
    detector's stall condition (`first_stall`); None if never."""
    i = int(first_stall(np.asarray(values), tolerance=tolerance, window=window))
    return None if i < 0 else steps[i]


def steps_to_degrade(history: list[dict], meta_steps: int, margin: float) -> int | None:
    """Phase 2 steps until the logged validation cross-entropy first exceeds its value at
    the end of Phase 1 by more than `margin` nats (None if it never does).

    A second horizon beside `steps_to_hack`: the detector dates where improvement stopped,
    which is step 0 for a critic that never improves the model; this dates how long the
    model lasts before it is clearly worse than where self-training began.

    Args:
      history: the run's rows, as for `phase2_summary`.
      meta_steps: the step Phase 2 starts at.
      margin: nats above the validation cross-entropy at `meta_steps`.

    Returns:
      The Phase 2 step of the first such row, or None.
    """
    rows = [r for r in history if "true/val_ce" in r and "phase" in r]
    start = next((r["true/val_ce"] for r in rows if r["step"] == meta_steps), None)
    if start is None:
        return None
    worse = (r["step"] for r in rows if r["phase"] == 2 and r["true/val_ce"] > start + margin)
    step = next(worse, None)
    return None if step is None else step - meta_steps
