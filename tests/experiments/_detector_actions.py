"""Checks of the text base's detector actions (`experiments._text.TextSelfTraining._act`),
shared by the self-loss and gist tests: each passes the states before every step (and
after the last), each step's metrics, and the step its first phase ends at."""

import jax
import numpy as np


def equal(a, b) -> bool:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.array_equal(x, y) for x, y in pairs)


def hacked_steps(metrics: list[dict]) -> list[int]:
    return [t for t, m in enumerate(metrics) if m["diag/hacked"]]


def check_stop(states: list, metrics: list[dict], first_steps: int) -> None:
    """One detection; θ moves at every Phase 2 step up to it and never after."""
    hacked = hacked_steps(metrics)
    assert len(hacked) == 1  # a stopped run never detects again
    for t in range(first_steps, len(metrics)):
        assert (not equal(states[t].params, states[t + 1].params)) == (t <= hacked[0]), t
    assert bool(states[-1].stopped)


def check_rollback(states: list, metrics: list[dict], first_steps: int) -> list[int]:
    """At each detection θ and its best copy are θ at the end of the first phase (which
    validation never beats); the count of rollbacks is logged. Returns the detections."""
    hacked = hacked_steps(metrics)
    assert hacked
    end_of_first = states[first_steps].params
    for t in hacked:
        assert equal(states[t + 1].best, end_of_first), t
        assert equal(states[t + 1].params, end_of_first), t
    assert int(states[-1].rollbacks) == len(hacked) == metrics[-1]["diag/rollbacks"]
    return hacked
