"""The gradient estimators by name (`ESTIMATORS`) and the checks that refuse a name that
is unknown or would do nothing where it is used, with a message saying what to use."""

import difflib
import numbers
from typing import Any

ESTIMATORS: dict[str, str] = {
    "unrolled": "exact backpropagation through every inner step of the unroll",
    "truncated": (
        "windowed_meta_steps only: exact within each window, a meta update after each, "
        "no gradient across windows"
    ),
    "first_order": "the inner gradient at stop_gradient(θ): no second-order terms in θ",
    "last_window": "one unroll of K steps of which only the last `window` are differentiated",
    "es": (
        "antithetic evolution strategies: forward unrolls under φ ± ε, memory independent "
        "of K (per window of windowed_meta_steps: truncated ES)"
    ),
    "pes": (
        "windowed_meta_steps only: persistent ES, particles carried across windows, "
        "unbiased for the whole unroll"
    ),
    "implicit": (
        "implicit differentiation at the unroll's end as a fixed point: CG with "
        "Hessian-vector products"
    ),
}

# Estimators that compute a gradient themselves instead of differentiating `meta_loss`.
_NOT_BACKPROP = ("es", "pes", "implicit")


def check_estimator_name(name: Any) -> None:
    """Checks that `name` is one of `ESTIMATORS` (whether it fits is each function's check).

    Args:
      name: the estimator's name, e.g. from a config.

    Raises:
      ValueError: listing the estimators with their descriptions, and the closest name
        when there is one ("first-order" -> "Did you mean 'first_order'?").
    """
    if isinstance(name, str) and name in ESTIMATORS:
        return
    close = difflib.get_close_matches(str(name).lower(), ESTIMATORS, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    listing = "; ".join(f"{k!r} ({v})" for k, v in ESTIMATORS.items())
    raise ValueError(f"Unknown gradient estimator {name!r}.{hint} Choose one of: {listing}.")


def check_estimator(name: str, window: int, episode_length: int) -> None:
    """Validates an estimator choice of a config; raises ValueError saying how to fix it.

    Args:
      name: one of `ESTIMATORS`.
      window: for "unrolled", "truncated" and "first_order" the inner steps between two
        meta updates; for "last_window" the inner steps differentiated.
      episode_length: inner steps between two resets of θ (K).

    Raises:
      ValueError: for an unknown name (listing `ESTIMATORS`) or a window that does not
        fit the estimator, saying what to use instead.
    """
    check_estimator_name(name)
    if window < 1 or episode_length < 1:
        raise ValueError(f"window ({window}) and episode length ({episode_length}) must be >= 1.")
    if name == "last_window":
        if window >= episode_length:
            raise ValueError(
                f"estimator='last_window' differentiates the last `window` of the "
                f"{episode_length} inner steps, so the window ({window}) must be smaller; "
                f"for all of them say estimator='unrolled'."
            )
        return
    if name == "pes" and window == episode_length:
        raise ValueError(
            "estimator='pes' carries its particles across windows; with one window of the "
            f"whole episode ({episode_length} steps) it is plain ES: say estimator='es', "
            "or use a shorter window."
        )
    if episode_length % window:
        raise ValueError(
            f"The episode length ({episode_length} inner steps between resets of θ) must be a "
            f"multiple of the window ({window}); change one of them."
        )
    if name == "unrolled" and window != episode_length:
        raise ValueError(
            f"estimator='unrolled' differentiates through the whole episode, so the window "
            f"({window}) must equal the episode length ({episode_length}); use "
            f"estimator='truncated' for shorter windows."
        )
    if name == "truncated" and window == episode_length:
        raise ValueError(
            "estimator='truncated' with a window equal to the episode length is the full "
            "unroll; say estimator='unrolled' instead so the choice is explicit."
        )


def _check_one_unroll(estimator: Any, window: int | None, num_steps: int) -> None:
    """The estimator checks of `meta_grad`: one unroll of `num_steps`, one meta-gradient."""
    check_estimator_name(estimator)
    if estimator == "pes":
        raise ValueError(
            "estimator='pes' carries particles from one window of an unroll to the next: use "
            "windowed_meta_steps(..., window=W, estimator='pes'). For a single unroll the "
            "same estimate is estimator='es'."
        )
    if estimator == "truncated":
        raise ValueError(
            "estimator='truncated' does nothing in a single meta_loss / meta_grad / "
            "meta_grad_over_tasks: truncation cuts the gradient between the windows of "
            "windowed_meta_steps(..., window=W, estimator='truncated'), which updates φ after "
            "each window and carries θ on. For one unroll say estimator='unrolled' (exact), "
            "or estimator='last_window' with window=W to differentiate only its last W steps."
        )
    if estimator == "last_window":
        if not isinstance(window, numbers.Integral) or not 1 <= window < num_steps:
            raise ValueError(
                f"estimator='last_window' differentiates the last `window` of the unroll's "
                f"{num_steps} inner steps, so it needs window in [1, {num_steps}); got "
                f"window={window!r}"
                + (". For all of them say estimator='unrolled'." if window == num_steps else ".")
            )
    elif window is not None:
        raise ValueError(
            f"window={window!r} applies to estimator='last_window' only (the last steps "
            f"differentiated); estimator={estimator!r} differentiates every step. For a meta "
            f"update every `window` steps use windowed_meta_steps."
        )


def _check_windowed(estimator: Any, window: int, num_steps: int) -> None:
    """The estimator checks of `windowed_meta_steps`."""
    check_estimator_name(estimator)
    if estimator == "last_window":
        raise ValueError(
            "estimator='last_window' differentiates the last steps of one unroll for a single "
            "meta update: call meta_grad(..., estimator='last_window', window=W). For a meta "
            "update after every window of windowed_meta_steps say estimator='truncated'."
        )
    if not isinstance(window, numbers.Integral) or window < 1 or num_steps % window:
        raise ValueError(
            f"The window ({window!r}) must be a positive divisor of the number of inner steps "
            f"({num_steps})."
        )
    if estimator == "unrolled" and window != num_steps:
        raise ValueError(
            f"estimator='unrolled' differentiates all {num_steps} inner steps, but window="
            f"{window} updates φ every {window} steps and cuts the gradient between windows: "
            f"that is estimator='truncated' (or window={num_steps} for the full unroll)."
        )
    if estimator == "truncated" and window == num_steps:
        raise ValueError(
            f"estimator='truncated' with window={window}, all the inner steps given, cuts "
            f"nothing: say estimator='unrolled' so the choice is explicit."
        )
    # "pes" with one window a call is allowed: its particles go on in the next call
    # (`estimator_state`), so it is not plain ES.
