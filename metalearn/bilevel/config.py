"""Estimators from a config's names: the one place a name such as `meta.estimator='pes'`
becomes an `Estimator` object (`estimator_from_config`), with the checks that refuse a
name that is unknown or does not fit the window, saying what to use."""

import dataclasses
import difflib
import numbers
from collections.abc import Mapping
from typing import Any

from metalearn.bilevel.backprop import FirstOrder, LastWindow, Truncated, Unrolled
from metalearn.bilevel.forward import ES, Implicit
from metalearn.bilevel.pes import PES
from metalearn.bilevel.problem import Estimator

ESTIMATORS: dict[str, str] = {
    "unrolled": "exact backpropagation through every inner step of the unroll (Unrolled)",
    "truncated": (
        "exact within each window, a meta update after each, no gradient across windows (Truncated)"
    ),
    "first_order": (
        "the inner gradient at stop_gradient(θ): no second-order terms in θ (FirstOrder)"
    ),
    "last_window": (
        "one unroll of K steps of which only the last `window` are differentiated (LastWindow)"
    ),
    "es": (
        "antithetic evolution strategies: forward unrolls under φ ± ε, memory independent "
        "of K (per window: truncated ES) (ES)"
    ),
    "pes": "persistent ES, particles carried across windows, unbiased for the whole unroll (PES)",
    "implicit": (
        "implicit differentiation at the unroll's end as a fixed point: CG with "
        "Hessian-vector products (Implicit)"
    ),
}

_CLASSES: dict[str, type[Estimator]] = {
    "unrolled": Unrolled,
    "truncated": Truncated,
    "first_order": FirstOrder,
    "last_window": LastWindow,
    "es": ES,
    "pes": PES,
    "implicit": Implicit,
}
# The settings a config's `meta.estimator_options` may hold, and their defaults.
_OPTIONS = {"sigma": 0.01, "pairs": 8, "cg_iters": 20, "damping": 0.0, "tol": 1e-10}


def check_estimator_name(name: Any) -> None:
    """Checks that `name` is one of `ESTIMATORS`.

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


def estimator_from_config(
    name: str,
    *,
    window: int,
    episode_length: int,
    options: Mapping[str, Any] | None = None,
    remat: bool = False,
) -> Estimator:
    """The estimator a config names, for meta updates every `window` of `episode_length`.

    Args:
      name: one of `ESTIMATORS` (`meta.estimator`).
      window: the inner steps between two meta updates (`meta.window`); for
        "last_window" the last steps differentiated of each episode.
      episode_length: inner steps between two resets of θ (K).
      options: `meta.estimator_options`: σ and pairs of "es"/"pes", cg_iters, damping
        and tol of "implicit". A config may hold the settings of several estimators (so
        that `--config.meta.estimator=es` works alone); one that does not apply to
        `name` must keep its default, or it is refused.
      remat: `meta.remat`, for the backpropagating estimators only.

    Returns:
      An `Estimator`: `Unrolled`, `Truncated`, `FirstOrder`, `LastWindow`, `ES`, `PES` or
      `Implicit`, its `window` None where it covers the whole episode.

    Raises:
      ValueError: for an unknown name or option (with the closest), a window that does
        not fit the estimator, or a setting the estimator would ignore, saying what to
        use instead.
    """
    check_estimator_name(name)
    _check_window(name, window, episode_length)
    cls = _CLASSES[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs, options = {}, dict(options or {})
    for key in options:
        if key not in _OPTIONS:
            close = difflib.get_close_matches(key, _OPTIONS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown estimator option {key!r}.{hint} Known: {sorted(_OPTIONS)}.")
    for key, value in options.items():
        if key in fields:
            kwargs[key] = value
        elif value != _OPTIONS[key]:
            raise ValueError(
                f"estimator_options.{key}={value!r} does not apply to estimator={name!r} "
                f"(its settings: {sorted(fields & set(_OPTIONS)) or 'none'}); leave it at "
                f"{_OPTIONS[key]!r} or choose an estimator that uses it."
            )
    if "remat" in fields:
        kwargs["remat"] = remat
    elif remat:
        raise ValueError(
            f"remat=True applies to the estimators that backpropagate through the unroll; "
            f"estimator={name!r} runs it forward only: set remat=False."
        )
    whole = window == episode_length
    if name == "last_window":
        kwargs["steps"] = window
    elif "window" in fields and name != "unrolled":
        if name in ("truncated", "pes") or not whole:
            kwargs["window"] = window
    return cls(**kwargs)


def _check_window(name: str, window: int, episode_length: int) -> None:
    if not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool)
        for v in (window, episode_length)
    ):
        raise ValueError(
            f"window ({window!r}) and episode length ({episode_length!r}) must be integers."
        )
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
