"""The probe of an inner optimizer, run when a meta-gradient through it is traced.

It differentiates `optimizer.update` once at a zero gradient from a fresh optimizer
state, on a copy of the parameter tree with scalar leaves, eagerly at trace time
(`jax.ensure_compile_time_eval`, so under `jit`, `vmap` and `grad` too), cached per
optimizer and tree structure, and acts on what it finds:

- a non-finite derivative from an Adam-family optimizer (its state has Adam's second
  moment `nu`: adam, adamw, nadam, amsgrad, ...): a ValueError naming `eps_root`, since
  d√ν/dν is infinite at ν = 0, which any parameter with an exactly zero gradient
  reaches, and the meta-gradient turns into NaN;
- a non-finite derivative from another optimizer (e.g. adafactor, whose RMS clipping
  has an infinite slope where a whole tensor's gradient is zero): a warning that says
  so, since with real gradients its meta-gradients are usually finite;
- a derivative that is exactly zero at the first step and the next (a sign-based update
  such as Lion or signSGD): a warning that the meta-gradient through it is zero, whatever φ does;
- an optimizer the probe cannot run on scalar leaves (one that needs the real shapes):
  a warning "could not check", with the exception.

`unprobed(optimizer)` marks an optimizer the probe skips (no check, no warning).
"""

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax

from metalearn.types import Params


class Unprobed(optax.GradientTransformation):
    """An optax transformation the probe skips (see `unprobed`)."""


def unprobed(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optimizer` unchanged, marked so that `check_differentiable_optimizer` skips it:
    for an optimizer you have checked yourself, or one the probe cannot run."""
    return Unprobed(optimizer.init, optimizer.update)


def _adam_family(opt_state: Any) -> bool:
    """Whether any part of an optimizer state holds Adam's second moment `nu`."""
    nodes = jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "nu"))
    return any(hasattr(node, "nu") for node in nodes)


@functools.lru_cache(maxsize=256)
def _probe(
    optimizer: optax.GradientTransformation, treedef: Any, dtypes: tuple[Any, ...]
) -> tuple[str, bool, str]:
    """`(verdict, adam_family, error)`: verdict "finite", "non_finite", "zero" (every
    tangent exactly zero) or "error" (the probe raised `error`)."""
    try:
        with jax.ensure_compile_time_eval():
            zeros = jax.tree.unflatten(treedef, [jnp.zeros((), d) for d in dtypes])
            ones = jax.tree.unflatten(treedef, [jnp.ones((), d) for d in dtypes])
            opt_state = optimizer.init(zeros)
            update = lambda g: optimizer.update(g, opt_state, zeros)[0]  # noqa: E731
            _, tangent = jax.jvp(update, (zeros,), (ones,))
            leaves = jax.tree.leaves(tangent)
            if not all(bool(jnp.all(jnp.isfinite(t))) for t in leaves):
                return "non_finite", _adam_family(opt_state), ""
            # Exactly zero at the first step and at the next (not a schedule starting at 0).
            _, later = optimizer.update(ones, opt_state, zeros)
            _, tangent = jax.jvp(lambda g: optimizer.update(g, later, zeros)[0], (zeros,), (ones,))
            if all(bool(jnp.all(t == 0)) for t in leaves + jax.tree.leaves(tangent)):
                return "zero", False, ""
            return "finite", False, ""
    except Exception as e:  # an optimizer that needs the real shapes, say
        return "error", False, f"{type(e).__name__}: {e}"


def check_differentiable_optimizer(optimizer: optax.GradientTransformation, params: Params) -> None:
    """Refuses an inner optimizer whose update has a NaN derivative; warns of one whose
    meta-gradient may be NaN or is exactly zero, or that could not be checked.

    Args:
      optimizer: the inner optax optimizer that meta-gradients flow through (skipped if
        marked by `unprobed`).
      params: θ (arrays or tracers; only their structure and dtypes are used).

    Raises:
      ValueError: naming `eps_root` and how to set it, for an Adam-family optimizer whose
        update has a non-finite derivative at a zero gradient.
    """
    if isinstance(optimizer, Unprobed):
        return
    leaves, treedef = jax.tree.flatten(params)
    dtypes = tuple(jnp.result_type(x) for x in leaves)
    if not all(jnp.issubdtype(d, jnp.inexact) for d in dtypes):
        return
    try:
        hash(optimizer)
        probe = _probe
    except TypeError:
        probe = _probe.__wrapped__
    verdict, adam_family, error = probe(optimizer, treedef, dtypes)
    skip = "Pass metalearn.bilevel.unprobed(optimizer) to skip this check."
    if verdict == "non_finite" and adam_family:
        raise ValueError(
            "The meta-gradient through this inner optimizer would be NaN: the derivative of "
            "its update is not finite at a zero gradient from a fresh state. This is Adam (or "
            "a relative: adamw, ...) built with eps_root=0: d sqrt(nu)/d nu is infinite at "
            "nu = 0, which every parameter with an exactly zero gradient reaches. Build it with "
            "eps_root > 0, e.g. optax.adam(lr, eps_root=1e-8), or from a config with "
            "metalearn.make_optimizer(config, differentiated=True) and config.eps_root = 1e-8."
        )
    if verdict == "non_finite":
        warnings.warn(
            "The derivative of this inner optimizer's update is not finite at a zero gradient "
            "from a fresh state (e.g. adafactor's RMS clipping where a whole tensor's gradient "
            "is zero): its meta-gradients are NaN wherever that happens, finite elsewhere. " + skip,
            stacklevel=3,
        )
    elif verdict == "zero":
        warnings.warn(
            "The meta-gradient through this inner optimizer is exactly zero: its update does "
            "not change with the gradient (a sign-based update such as optax.lion or signSGD "
            "has derivative zero almost everywhere), so φ gets no signal through the inner "
            "steps. Use a differentiable one (sgd, momentum, adam with eps_root > 0). " + skip,
            stacklevel=3,
        )
    elif verdict == "error":
        warnings.warn(
            f"Could not check this inner optimizer on scalar parameters ({error}); its "
            "meta-gradients are not checked for NaN. " + skip,
            stacklevel=3,
        )
