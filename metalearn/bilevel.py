"""The bilevel heart: inner steps, scanned unrolls and meta-gradients through them.

Every algorithm in metalearn is the same two-level loop:

    inner:  θ_{k+1} = θ_k + optax_update(∇_θ L_inner(θ_k, φ; batch_k))
    outer:  φ ← φ − η ∇_φ L_outer(θ_K(φ); outer_batch)

This module holds that loop as pure, jit-, vmap- and scan-able functions and nothing
else: it knows nothing of images, text, files or flags. Losses are passed in as
functions with the signatures in `metalearn.types`:

    inner_loss(params, model_state, meta_params, batch, key) -> (loss, (model_state, metrics))
    outer_loss(params, model_state, batch, key) -> loss

Shapes: K is the number of inner steps of an unroll, T the number of tasks, W a window.
`batches` is any pytree whose leaves have a leading axis K (one batch a step), `keys`
K PRNG keys ([K] typed keys or [K, 2] raw ones).

Gradient estimators (`ESTIMATORS`) are always chosen by name, and each function refuses
a name it does not know or one that would do nothing there, with a ValueError that says
what to use (checked in Python when the function is traced, never inside the program):

- ``"unrolled"``: exact backpropagation through every inner step of the unroll.
- ``"truncated"``: a property of `windowed_meta_steps`: exact backpropagation through each
  window of W inner steps and a meta update after each window; the inner state is carried
  from one window to the next as a plain input, so no gradient crosses a window boundary.
  A single `meta_loss` is one window, so there it would do nothing and is refused.
- ``"first_order"``: the inner gradient is evaluated at stop_gradient(θ), which drops
  every second-order term in θ (∂²L/∂θ²) while keeping the mixed term ∂²L/∂θ∂φ through
  which φ influences θ at all; without it the meta-gradient would be zero. It applies to
  one unroll and to every window of `windowed_meta_steps`.
- ``"last_window"``: one `meta_loss` over K steps that differentiates only the last
  `window` of them: the first K − W steps run forward as usual, and the state entering
  the last W is cut from them (its parameters by a straight-through identity, see
  `meta_loss`), so memory and time of the backward pass are those of W steps.
- ``"es"``: antithetic evolution strategies on φ (`metalearn.estimators`): 2P forward
  unrolls under φ ± ε, no backward pass, so memory does not grow with K and the inner
  loop need not be differentiable. In `windowed_meta_steps` with W < K each window
  restarts its perturbations from the unperturbed state: truncated ES, biased like
  "truncated".
- ``"pes"``: `windowed_meta_steps` only, W < K: persistent ES (Vicol et al. 2021), 2P
  particles that keep their own inner states across the windows and accumulate their
  perturbations; unbiased for the whole unroll at the cost of ES's variance.
- ``"implicit"``: implicit differentiation at the end of the unroll, taken to be a fixed
  point of the inner loss (evaluated on the last inner batch): a conjugate-gradient
  solve with Hessian-vector products; memory of one inner gradient, exact at
  convergence.

The settings of the last three (σ, pairs, CG iterations, damping) are an
`EstimatorOptions`, passed as `options=`; ES and PES draw their perturbations from
`noise_key`, by default a key derived from the outer key.

Differentiating through Adam needs `eps_root > 0`: d√ν/dν is infinite at ν = 0, which
any parameter with an exactly zero gradient reaches, and the meta-gradient turns into
NaN. `meta_loss` (so every meta-gradient here) checks this when it is traced, by probing
the optimizer itself: it differentiates `optimizer.update` once at a zero gradient from a
fresh optimizer state, on a copy of the parameter tree with scalar leaves, evaluated
eagerly at trace time (`jax.ensure_compile_time_eval`), outside the compiled program and
once per optimizer and tree structure. A non-finite derivative raises a ValueError naming
`eps_root`, eagerly or under `jit`, before anything runs. `metalearn.make_optimizer(...,
differentiated=True)` refuses Adam without `eps_root` already when it is built.
"""

import difflib
import functools
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from metalearn import estimators
from metalearn.estimators import EstimatorOptions
from metalearn.state import InnerState, MetaState
from metalearn.streams import OuterKey
from metalearn.types import (
    Array,
    Batch,
    InnerLossFn,
    MetaParams,
    Metrics,
    OuterLossFn,
    Params,
    PRNGKey,
)

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


@functools.lru_cache(maxsize=256)
def _derivative_is_finite(
    optimizer: optax.GradientTransformation, treedef: Any, dtypes: tuple[Any, ...]
) -> bool:
    """Whether d optimizer.update(g) / dg is finite at g = 0 from a fresh state (scalars)."""
    with jax.ensure_compile_time_eval():
        zeros = jax.tree.unflatten(treedef, [jnp.zeros((), d) for d in dtypes])
        ones = jax.tree.unflatten(treedef, [jnp.ones((), d) for d in dtypes])
        opt_state = optimizer.init(zeros)
        _, tangent = jax.jvp(lambda g: optimizer.update(g, opt_state, zeros)[0], (zeros,), (ones,))
        return all(bool(jnp.all(jnp.isfinite(t))) for t in jax.tree.leaves(tangent))


def check_differentiable_optimizer(optimizer: optax.GradientTransformation, params: Params) -> None:
    """Raises a ValueError if differentiating through `optimizer`'s update gives NaN.

    The probe differentiates `optimizer.update` at a zero gradient from a fresh state, on
    `params`' tree structure and dtypes with scalar leaves, eagerly even while a caller is
    being traced (so it works under `jit`, `vmap` and `grad`), and is cached per optimizer
    and tree structure. Adam without `eps_root` fails it: d√ν/dν is infinite at ν = 0.
    Optimizers the probe cannot run on scalar leaves (or not hashable) are not checked.

    Args:
      optimizer: the inner optax optimizer that meta-gradients flow through.
      params: θ (arrays or tracers; only their structure and dtypes are used).

    Raises:
      ValueError: naming `eps_root` and how to set it, if the derivative is not finite.
    """
    leaves, treedef = jax.tree.flatten(params)
    dtypes = tuple(jnp.result_type(x) for x in leaves)
    if not all(jnp.issubdtype(d, jnp.inexact) for d in dtypes):
        return
    try:
        try:
            hash(optimizer)
            probe = _derivative_is_finite
        except TypeError:
            probe = _derivative_is_finite.__wrapped__
        finite = probe(optimizer, treedef, dtypes)
    except Exception:  # an optimizer that needs the real shapes: not checked
        return
    if not finite:
        raise ValueError(
            "The meta-gradient through this inner optimizer would be NaN: the derivative of "
            "its update is not finite at a zero gradient from a fresh state. This is Adam (or "
            "a relative: adamw, ...) built with eps_root=0: d sqrt(nu)/d nu is infinite at "
            "nu = 0, which every parameter with an exactly zero gradient reaches. Build it with "
            "eps_root > 0, e.g. optax.adam(lr, eps_root=1e-8), or from a config with "
            "metalearn.make_optimizer(config, differentiated=True) and config.eps_root = 1e-8."
        )


def inner_step(
    state: InnerState,
    meta_params: MetaParams,
    batch: Batch,
    key: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    optimizer: optax.GradientTransformation,
    first_order: bool = False,
) -> tuple[InnerState, Metrics]:
    """One optax step of θ on the inner objective.

    Args:
      state: the inner state (θ, optimizer state, model state, step).
      meta_params: φ, held fixed here but differentiable through.
      batch: the inner batch (no step axis).
      key: PRNG key for this step (dropout and the like).
      inner_loss: `(params, model_state, meta_params, batch, key) -> (loss, (model_state,
        metrics))`.
      optimizer: any optax transformation (SGD, momentum, Adam with `eps_root > 0`, ...).
      first_order: evaluate the gradient at stop_gradient(θ) (the first-order estimator).

    Returns:
      The next inner state (step + 1) and scalar metrics: `inner/loss` plus whatever the
      loss reports.
    """
    params = jax.lax.stop_gradient(state.params) if first_order else state.params
    (loss, (model_state, metrics)), grads = jax.value_and_grad(inner_loss, has_aux=True)(
        params, state.model_state, meta_params, batch, key
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = InnerState(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        model_state=model_state,
        step=state.step + 1,
    )
    return new_state, {"inner/loss": loss, **metrics}


def unroll(
    state: InnerState,
    meta_params: MetaParams,
    batches: Batch,
    keys: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    optimizer: optax.GradientTransformation,
    first_order: bool = False,
    remat: bool = False,
) -> tuple[InnerState, Metrics]:
    """K inner steps as one `lax.scan`; compile time does not grow with K.

    Args:
      state: the starting inner state.
      meta_params: φ.
      batches: a pytree whose leaves have a leading axis of length K (one batch a step).
      keys: K PRNG keys, shape [K] (typed) or [K, 2].
      inner_loss, optimizer, first_order: as in `inner_step`.
      remat: rematerialise each step on the backward pass (`jax.checkpoint`), so memory
        for the meta-gradient stays O(1) in K instead of O(K) activations.

    Returns:
      The final inner state and per-step metrics, each with a leading axis of length K.
    """
    step_fn = functools.partial(
        inner_step, inner_loss=inner_loss, optimizer=optimizer, first_order=first_order
    )

    def body(carry: InnerState, xs: tuple[Batch, PRNGKey]) -> tuple[InnerState, Metrics]:
        batch, key = xs
        return step_fn(carry, meta_params, batch, key)

    if remat:
        body = jax.checkpoint(body)
    return jax.lax.scan(body, state, (batches, keys))


def _num_steps(keys: PRNGKey) -> int:
    return jax.tree.leaves(keys)[0].shape[0]


def meta_loss(
    meta_params: MetaParams,
    state: InnerState,
    batches: Batch,
    keys: PRNGKey,
    outer_batch: Batch,
    outer_key: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    estimator: str = "unrolled",
    window: int | None = None,
    remat: bool = False,
) -> tuple[Array, tuple[InnerState, Metrics]]:
    """The outer objective L_outer(θ_K(φ)) after unrolling K inner steps from `state`.

    `state` is an ordinary input: when a caller carries it across meta steps (the
    truncated estimator) no gradient flows back past it; when the caller builds it from
    what it differentiates (θ₀ = φ, MAML-like), the gradient flows through it too.

    With ``estimator="last_window"`` the first K − W steps run forward (no remat), and the
    last W start from their result with the optimizer and model state under
    `stop_gradient` and the parameters as `θ₀ + stop_gradient(θ_{K−W} − θ₀)`: the value of
    θ_{K−W}, the Jacobian of the identity with respect to θ₀ (zero when θ₀ is a constant of
    what is differentiated). Only the last W steps are differentiated.

    Args:
      meta_params: φ, the argument differentiated.
      state: the inner state the unroll starts from.
      batches: the K inner batches, leaves [K, ...].
      keys: the K inner keys, [K] (typed) or [K, 2].
      outer_batch, outer_key: what the outer loss is evaluated on at θ_K (no step axis).
      inner_loss, outer_loss, optimizer: see the module docstring.
      estimator: "unrolled", "first_order" or "last_window" (see `ESTIMATORS`);
        "truncated" belongs to `windowed_meta_steps` and is refused here.
      window: for "last_window" only, the W last steps differentiated, 1 <= W < K.
      remat: as in `unroll` (the differentiated steps).

    Returns:
      `(loss, (final_state, inner_metrics))`: a scalar loss, the state after K steps and
      the metrics stacked over K (leaves [K]).

    Raises:
      ValueError: for an unknown or inapplicable estimator, a bad `window`, or an
        optimizer whose update has a NaN derivative (Adam without `eps_root`).
    """
    num_steps = _num_steps(keys)
    _check_one_unroll(estimator, window, num_steps)
    if estimator in _NOT_BACKPROP:
        raise ValueError(
            f"estimator={estimator!r} computes the meta-gradient itself instead of "
            "differentiating meta_loss: call meta_grad, meta_grad_over_tasks or "
            "windowed_meta_steps with it."
        )
    check_differentiable_optimizer(optimizer, state.params)
    head_metrics = None
    if estimator == "last_window":
        cut = num_steps - window
        head, head_metrics = unroll(
            state,
            meta_params,
            jax.tree.map(lambda x: x[:cut], batches),
            keys[:cut],
            inner_loss=inner_loss,
            optimizer=optimizer,
        )
        # Straight-through: the value of the head's θ, the identity Jacobian to the input θ.
        start = jax.tree.map(
            lambda p, q: p + jax.lax.stop_gradient(q - p), state.params, head.params
        )
        state = head.replace(
            params=start,
            opt_state=jax.lax.stop_gradient(head.opt_state),
            model_state=jax.lax.stop_gradient(head.model_state),
        )
        batches, keys = jax.tree.map(lambda x: x[cut:], batches), keys[cut:]
    final, metrics = unroll(
        state,
        meta_params,
        batches,
        keys,
        inner_loss=inner_loss,
        optimizer=optimizer,
        first_order=estimator == "first_order",
        remat=remat,
    )
    loss = outer_loss(final.params, final.model_state, outer_batch, outer_key)
    if head_metrics is not None:
        metrics = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), head_metrics, metrics)
    return loss, (final, metrics)


def _noise_key(noise_key: PRNGKey | None, outer_key: PRNGKey) -> PRNGKey:
    return jax.random.fold_in(outer_key, OuterKey.ES_NOISE) if noise_key is None else noise_key


def _window_loss(
    meta_params, state, batches, keys, outer_batch, outer_key, *, inner_loss, outer_loss, optimizer
):
    """A forward unroll and its outer loss: `(loss, (final_state, metrics))`."""
    final, metrics = unroll(
        state, meta_params, batches, keys, inner_loss=inner_loss, optimizer=optimizer
    )
    return outer_loss(final.params, final.model_state, outer_batch, outer_key), (final, metrics)


def _estimated_grad(
    meta_params: MetaParams,
    state: InnerState,
    batches: Batch,
    keys: PRNGKey,
    outer_batch: Batch,
    outer_key: PRNGKey,
    noise_key: PRNGKey | None,
    *,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    estimator: str,
    options: EstimatorOptions,
) -> tuple[Array, MetaParams, InnerState, Metrics]:
    """`meta_grad` for "es" and "implicit": the unperturbed unroll runs forward only."""
    window_loss = functools.partial(
        _window_loss, inner_loss=inner_loss, outer_loss=outer_loss, optimizer=optimizer
    )
    phi = jax.lax.stop_gradient(meta_params)
    loss, (final, metrics) = window_loss(phi, state, batches, keys, outer_batch, outer_key)
    final = jax.lax.stop_gradient(final)
    if estimator == "es":
        grads, losses = estimators.antithetic_es(
            lambda f: window_loss(f, state, batches, keys, outer_batch, outer_key),
            phi,
            _noise_key(noise_key, outer_key),
            sigma=options.sigma,
            pairs=options.pairs,
        )
        extra = {"meta/es_loss_spread": jnp.std(losses)}
    else:  # implicit, at the Hessian of the last inner batch
        last_batch = jax.tree.map(lambda x: x[-1], batches)

        def inner_grad(params, mp):
            fn = lambda p: inner_loss(p, final.model_state, mp, last_batch, keys[-1])[0]  # noqa: E731
            return jax.grad(fn)(params)

        outer_grad = jax.grad(outer_loss)(final.params, final.model_state, outer_batch, outer_key)
        grads, residual = estimators.implicit_hypergradient(
            inner_grad,
            final.params,
            meta_params,
            outer_grad,
            cg_iters=options.cg_iters,
            damping=options.damping,
        )
        extra = {"meta/cg_residual": residual}
    num_steps = _num_steps(keys)
    metrics = {**metrics, **{k: jnp.broadcast_to(v, (num_steps,)) for k, v in extra.items()}}
    return loss, grads, final, metrics


def meta_grad(
    meta_params: MetaParams,
    state: InnerState,
    batches: Batch,
    keys: PRNGKey,
    outer_batch: Batch,
    outer_key: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    estimator: str = "unrolled",
    window: int | None = None,
    remat: bool = False,
    options: EstimatorOptions | None = None,
    noise_key: PRNGKey | None = None,
) -> tuple[Array, MetaParams, InnerState, Metrics]:
    """∇_φ of `meta_loss`, with its value: the meta-gradient of one K-step unroll.

    Args:
      As `meta_loss`: `meta_params` φ; `state` the starting inner state; `batches` leaves
      [K, ...] and `keys` [K]; `outer_batch`, `outer_key` for the outer loss at θ_K; the
      losses, inner optimizer, `estimator` ("unrolled", "first_order", "last_window",
      or "es" and "implicit", which do not backpropagate through the unroll), `window`
      (for "last_window") and `remat`.
      options: σ and pairs of "es", CG iterations and damping of "implicit"
        (`EstimatorOptions`; defaults if None).
      noise_key: the key of ES's perturbations; by default derived from `outer_key`.

    Returns:
      `(loss, grads, final_state, inner_metrics)`: scalar loss, grads shaped like φ, the
      state after K steps and metrics stacked over K ("es" adds `meta/es_loss_spread`,
      the std of the perturbed losses; "implicit" `meta/cg_residual`, the relative
      residual of its linear solve, each broadcast over K).
    """
    _check_one_unroll(estimator, window, _num_steps(keys))
    if estimator in _NOT_BACKPROP:
        return _estimated_grad(
            meta_params,
            state,
            batches,
            keys,
            outer_batch,
            outer_key,
            noise_key,
            inner_loss=inner_loss,
            outer_loss=outer_loss,
            optimizer=optimizer,
            estimator=estimator,
            options=EstimatorOptions.from_config(options),
        )
    fn = functools.partial(
        meta_loss,
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=optimizer,
        estimator=estimator,
        window=window,
        remat=remat,
    )
    (loss, (final, metrics)), grads = jax.value_and_grad(fn, has_aux=True)(
        meta_params, state, batches, keys, outer_batch, outer_key
    )
    return loss, grads, final, metrics


def momentum_lookahead(
    learning_rate: optax.ScalarOrSchedule, momentum: float, weight_decay: float = 0.0
) -> Callable[[Any, Any, Array], Any]:
    """The total displacement −η/(1−μ)·(g + λθ) that a gradient g causes under SGD with
    momentum μ (heavy-ball or Nesterov alike), at the learning rate η of `step`.

    For `one_step_meta_grad(..., lookahead=...)`: a one-step meta-objective that sees
    only the first momentum step (−η(1+μ)g for Nesterov) underestimates the step a loss
    implies by 1/((1−μ)(1+μ)), about 5× at μ = 0.9, and tunes it that much too large.
    """
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1); got {momentum}.")

    def lookahead(grads, params, step):
        lr = learning_rate(step) if callable(learning_rate) else learning_rate
        scale = -lr / (1.0 - momentum)
        return jax.tree.map(lambda g, p: scale * (g + weight_decay * p), grads, params)

    return lookahead


def one_step_meta_grad(
    meta_params: MetaParams,
    state: InnerState,
    batch: Batch,
    key: PRNGKey,
    outer_batch: Batch,
    outer_key: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    lookahead: Callable[[Any, Any, Array], Any] | None = None,
) -> tuple[Array, MetaParams, InnerState, Metrics]:
    """The exact meta-gradient of a one-step unroll, without backpropagating a backprop.

    For θ₁ = θ₀ + u(g), g = ∇_θ L_inner(θ₀, φ), with θ₀ a constant of φ:

        ∇_φ L_outer(θ₁) = ∇_φ ⟨g(φ), w⟩ = ∇_φ [d/dε L_inner(θ₀ + ε w, φ)]_{ε=0},
        w = (∂θ₁/∂g)ᵀ ∇_θ L_outer(θ₁),

    so it needs a backward pass at θ₀ (g), one at θ₁, a VJP of the optimizer's update
    (element-wise) and one forward-mode JVP of the inner loss at θ₀ along w, whose
    φ-dependent part is only where φ enters (the loss head for a learned loss). The
    same number as `meta_grad` over one step, which transposes the whole backward pass
    at θ₀ instead (much slower for convolutions on some backends).

    Args:
      meta_params: φ.
      state: θ₀ with its optimizer and model state (a constant of φ).
      batch, key: the one inner step's batch and key (no step axis).
      outer_batch, outer_key: what the outer loss is evaluated on at θ₁.
      inner_loss, outer_loss, optimizer: as in `meta_loss`.
      lookahead: optional `updates = lookahead(g, θ₀, step)`: the outer loss is then
        measured at θ₀ + lookahead(g) and differentiated through it, while the returned
        state still takes the optimizer's step. E.g. `momentum_lookahead`: the whole
        displacement a gradient causes under momentum, not just its first step.

    Returns:
      `(loss, grads, final_state, inner_metrics)` as `meta_grad` with K = 1, the metrics
      without a step axis.
    """
    check_differentiable_optimizer(optimizer, state.params)
    params = state.params
    (loss, (model_state, metrics)), grads = jax.value_and_grad(inner_loss, has_aux=True)(
        params, state.model_state, meta_params, batch, key
    )

    def apply(g):
        updates, opt_state = optimizer.update(g, state.opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    if lookahead is None:
        new_params, apply_vjp, opt_state = jax.vjp(apply, grads, has_aux=True)
        measured = new_params
    else:
        new_params, opt_state = apply(grads)
        measure = lambda g: optax.apply_updates(params, lookahead(g, params, state.step))  # noqa: E731
        measured, apply_vjp = jax.vjp(measure, grads)
    outer, outer_grads = jax.value_and_grad(outer_loss)(
        measured, model_state, outer_batch, outer_key
    )
    (direction,) = apply_vjp(outer_grads)

    def directional_derivative(phi):
        fn = lambda p: inner_loss(p, state.model_state, phi, batch, key)[0]  # noqa: E731
        return jax.jvp(fn, (params,), (direction,))[1]

    meta_grads = jax.grad(directional_derivative)(meta_params)
    final = InnerState(
        params=new_params, opt_state=opt_state, model_state=model_state, step=state.step + 1
    )
    return outer, meta_grads, final, {"inner/loss": loss, **metrics}


def meta_grad_over_tasks(
    meta_params: MetaParams,
    states: InnerState,
    batches: Batch,
    keys: PRNGKey,
    outer_batches: Batch,
    outer_keys: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    estimator: str = "unrolled",
    window: int | None = None,
    remat: bool = False,
    options: EstimatorOptions | None = None,
) -> tuple[Array, MetaParams, InnerState, Metrics]:
    """Meta-gradient of the mean outer loss over T independent tasks sharing one φ.

    Each task has its own inner state, batches and outer batch; the tasks run side by
    side under `jax.vmap` of `meta_loss`.

    Args:
      meta_params: φ, shared by the tasks (no task axis).
      states: the T inner states, leaves [T, ...].
      batches: inner batches, leaves [T, K, ...]; keys: [T, K].
      outer_batches: one outer batch per task, leaves [T, ...]; outer_keys: [T].
      inner_loss, outer_loss, optimizer, estimator, window, remat, options: as in
        `meta_grad`; ES draws each task's perturbations from a key derived from its
        outer key.

    Returns:
      `(mean_loss, grads, final_states, inner_metrics)`: the scalar mean over tasks, grads
      shaped like φ, final states with leaves [T, ...], metrics [T, K].
    """
    if estimator in _NOT_BACKPROP:
        _check_one_unroll(estimator, window, jax.tree.leaves(keys)[0].shape[1])
        one = functools.partial(
            meta_grad,
            inner_loss=inner_loss,
            outer_loss=outer_loss,
            optimizer=optimizer,
            estimator=estimator,
            options=EstimatorOptions.from_config(options),
        )
        losses, grads, finals, metrics = jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0))(
            meta_params, states, batches, keys, outer_batches, outer_keys
        )
        return losses.mean(), jax.tree.map(lambda g: g.mean(0), grads), finals, metrics
    per_task = functools.partial(
        meta_loss,
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        optimizer=optimizer,
        estimator=estimator,
        window=window,
        remat=remat,
    )

    def mean_loss(phi: MetaParams) -> tuple[Array, tuple[InnerState, Metrics]]:
        losses, aux = jax.vmap(per_task, in_axes=(None, 0, 0, 0, 0, 0))(
            phi, states, batches, keys, outer_batches, outer_keys
        )
        return losses.mean(), aux

    (loss, (finals, metrics)), grads = jax.value_and_grad(mean_loss, has_aux=True)(meta_params)
    return loss, grads, finals, metrics


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
    if estimator == "pes" and window == num_steps:
        raise ValueError(
            f"estimator='pes' with window={window}, all the inner steps given, has nothing to "
            "carry across windows: it is plain ES, say estimator='es'."
        )


def init_pes_over_tasks(states: InnerState, meta_params: MetaParams, pairs: int):
    """PES particles of T tasks at the start of an unroll: 2P copies of each task's state
    (leaves [T, 2P, ...]) and zero accumulated perturbations [T, P, n]."""
    return jax.vmap(lambda s: estimators.init_pes(s, meta_params, pairs))(states)


def pes_meta_grad_over_tasks(
    meta_params: MetaParams,
    states: InnerState,
    pes_states: estimators.PESState,
    batches: Batch,
    keys: PRNGKey,
    outer_batches: Batch,
    outer_keys: PRNGKey,
    *,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    options: EstimatorOptions | None = None,
) -> tuple[Array, MetaParams, InnerState, estimators.PESState, Metrics]:
    """One window of PES for T tasks: the PES estimate of this window's mean outer loss.

    Summed over the windows of an unroll with φ fixed, the estimates are unbiased for
    the gradient of the summed window losses through the whole unroll
    (`metalearn.estimators`). The unperturbed states run alongside, forward only, for
    the loss and metrics reported and the states returned.

    Args:
      meta_params: φ (no task axis).
      states: the unperturbed inner states, leaves [T, ...].
      pes_states: the particles, from `init_pes_over_tasks` at the unroll's start.
      batches: this window's inner batches, leaves [T, W, ...]; keys: [T, W].
      outer_batches: one outer batch per task, leaves [T, ...]; outer_keys: [T] (each
        task's perturbations are drawn from a key derived from its outer key).
      inner_loss, outer_loss, optimizer, options: as in `meta_grad`.

    Returns:
      `(mean_loss, grads, states, pes_states, metrics)`, metrics [T, W] plus
      `meta/es_loss_spread` (the std of the particles' losses).
    """
    options = EstimatorOptions.from_config(options)
    window_loss = functools.partial(
        _window_loss, inner_loss=inner_loss, outer_loss=outer_loss, optimizer=optimizer
    )
    phi = jax.lax.stop_gradient(meta_params)

    def one(state, pes_state, batch, key, outer_batch, outer_key):
        loss, (final, metrics) = window_loss(phi, state, batch, key, outer_batch, outer_key)

        def particle(f, s):
            value, (end, _) = window_loss(f, s, batch, key, outer_batch, outer_key)
            return value, end

        grads, pes_state, losses = estimators.pes_step(
            particle, phi, pes_state, _noise_key(None, outer_key), sigma=options.sigma
        )
        spread = jnp.broadcast_to(jnp.std(losses), (_num_steps(key),))
        return loss, grads, final, pes_state, {**metrics, "meta/es_loss_spread": spread}

    losses, grads, finals, pes_states, metrics = jax.vmap(one)(
        states, pes_states, batches, keys, outer_batches, outer_keys
    )
    return losses.mean(), jax.tree.map(lambda g: g.mean(0), grads), finals, pes_states, metrics


def windowed_meta_steps(
    meta_state: MetaState,
    states: InnerState,
    batches: Batch,
    keys: PRNGKey,
    outer_batches: Batch,
    outer_keys: PRNGKey,
    *,
    window: int,
    meta_optimizer: optax.GradientTransformation,
    inner_loss: InnerLossFn,
    outer_loss: OuterLossFn,
    optimizer: optax.GradientTransformation,
    estimator: str,
    remat: bool = False,
    options: EstimatorOptions | None = None,
) -> tuple[MetaState, InnerState, Metrics]:
    """K inner steps of T tasks in windows of W, one meta update after each window.

    With W == K this is one meta step on the full unroll ("unrolled", "first_order",
    "es" or "implicit"); with a shorter window it is truncated backpropagation
    ("truncated", or "first_order", "es" or "implicit" within each window): each window
    starts from the state the previous one left, as a constant, and φ is updated between
    windows. "pes" (W < K) instead carries its perturbed particles across the windows
    too, which removes the truncation's bias. AdaLFL's online lock-step is W = 1 over
    the whole run.

    Args:
      meta_state: φ and its optimizer state.
      states: the inner states of the T tasks, leaves [T, ...].
      batches: inner data, leaves [T, K, ...]; keys: [T, K].
      outer_batches: one outer batch per window, leaves [T, K // W, ...]; outer_keys:
        [T, K // W].
      window: W, inner steps per meta update; must divide K.
      meta_optimizer: the outer optax optimizer.
      inner_loss, outer_loss, optimizer, remat: as in `meta_loss`.
      estimator: "unrolled" (W == K), "truncated" or "pes" (W < K), or "first_order",
        "es" or "implicit" (any W).
      options: the settings of "es", "pes" and "implicit" (`EstimatorOptions`).

    Returns:
      `(meta_state, final_states, metrics)`: φ after K // W updates, the inner states
      after K steps (leaves [T, ...]), and metrics stacked over the K // W windows:
      `meta/loss`, `meta/grad_norm` and the inner metrics averaged over tasks and steps.
    """
    num_steps = jax.tree.leaves(keys)[0].shape[1]
    _check_windowed(estimator, window, num_steps)
    num_windows = num_steps // window
    options = EstimatorOptions.from_config(options)
    losses = dict(inner_loss=inner_loss, outer_loss=outer_loss, optimizer=optimizer)
    per_window = functools.partial(
        meta_grad_over_tasks,
        **losses,
        # Each window is one exact unroll; the truncation is this scan's carry.
        estimator="unrolled" if estimator == "truncated" else estimator,
        remat=remat,
        options=options,
    )
    pes_window = functools.partial(pes_meta_grad_over_tasks, **losses, options=options)

    def by_window(x):  # [T, K, ...] -> [K // W, T, W, ...]
        x = x.reshape(x.shape[0], num_windows, window, *x.shape[2:])
        return jnp.swapaxes(x, 0, 1)

    def body(carry, xs):
        meta_state, states, pes_states = carry
        batch, key, outer_batch, outer_key = xs
        if estimator == "pes":
            loss, grads, states, pes_states, metrics = pes_window(
                meta_state.params, states, pes_states, batch, key, outer_batch, outer_key
            )
        else:
            loss, grads, states, metrics = per_window(
                meta_state.params, states, batch, key, outer_batch, outer_key
            )
        meta_state = meta_step(meta_state, grads, meta_optimizer=meta_optimizer)
        metrics = {
            "meta/loss": loss,
            "meta/grad_norm": optax.global_norm(grads),
            **{k: jnp.mean(v) for k, v in metrics.items()},
        }
        return (meta_state, states, pes_states), metrics

    xs = (
        jax.tree.map(by_window, batches),
        by_window(keys),
        jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), outer_batches),
        jnp.swapaxes(outer_keys, 0, 1),
    )
    pes_states = (
        init_pes_over_tasks(states, meta_state.params, options.pairs) if estimator == "pes" else ()
    )
    (meta_state, states, _), metrics = jax.lax.scan(body, (meta_state, states, pes_states), xs)
    return meta_state, states, metrics


def meta_step(
    meta_state: MetaState,
    grads: MetaParams,
    *,
    meta_optimizer: optax.GradientTransformation,
) -> MetaState:
    """Applies one outer optimizer step to φ given its meta-gradient.

    Args:
      meta_state: φ, its optimizer state and step count.
      grads: ∇_φ, shaped like φ.
      meta_optimizer: the outer optax optimizer (its state is `meta_state.opt_state`).

    Returns:
      The next `MetaState` (step + 1).
    """
    updates, opt_state = meta_optimizer.update(grads, meta_state.opt_state, meta_state.params)
    return MetaState(
        params=optax.apply_updates(meta_state.params, updates),
        opt_state=opt_state,
        step=meta_state.step + 1,
    )
