"""Optimizers from config: a thin, validated layer over optax.

Differentiating through Adam's update needs `eps_root > 0` (the square root of a zero
second moment has an infinite derivative), so `make_optimizer(..., differentiated=True)`
refuses Adam without it instead of letting the meta-gradient turn into NaN.
"""

import ml_collections
import optax

from metalearn import bilevel

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")
SCHEDULES = ("constant", "step", "cosine")
LOOKAHEADS = ("none", "momentum")


def make_schedule(config: ml_collections.ConfigDict | None, lr: float) -> optax.Schedule | float:
    """A learning-rate schedule over the optimizer's own step count.

    Args:
      config: None or fields `name` (one of `SCHEDULES`), `steps` (the run's length in
        optimizer steps), for "step" `boundaries` (fractions of `steps`) and `factor`
        (multiplier at each boundary), for "cosine" optional `warmup` (steps).
      lr: the peak learning rate.

    Returns:
      An optax schedule, or `lr` itself for a constant rate.
    """
    if config is None or config.name == "constant":
        return lr
    if config.name == "step":
        boundaries = {int(round(b * config.steps)): config.factor for b in config.boundaries}
        return optax.piecewise_constant_schedule(lr, boundaries)
    if config.name == "cosine":
        warmup = config.get("warmup", 0)
        if warmup:
            return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, config.steps)
        return optax.cosine_decay_schedule(lr, config.steps)
    raise ValueError(f"Unknown schedule {config.name!r}; choose one of {SCHEDULES}.")


def make_optimizer(
    config: ml_collections.ConfigDict, *, differentiated: bool = False
) -> optax.GradientTransformation:
    """Builds an optax optimizer from a config group.

    Args:
      config: fields `name` (one of `OPTIMIZERS`), `lr`, and as needed `momentum`
        (default 0.9), `b1`, `b2`, `eps`, `eps_root`, `weight_decay` (L2, added to the
        gradient before momentum as in PyTorch's SGD), `schedule` (see `make_schedule`),
        `clip_value` (clip every gradient entry to [−v, v] first, as NPBML does with the
        meta-gradient at 10) and `clip_norm` (rescale to at most this global norm first);
        0 or absent means no clipping.
      differentiated: whether meta-gradients flow through this optimizer's updates;
        then Adam without `eps_root > 0` is refused here, when it is built (the heart's
        `meta_loss` would refuse it when traced).

    Returns:
      An `optax.GradientTransformation`.
    """
    name = config.name
    lr = make_schedule(config.get("schedule"), config.lr)
    momentum = _momentum(config)
    if name == "sgd":
        opt = optax.sgd(lr)
    elif name in ("momentum", "nesterov"):
        opt = optax.sgd(lr, momentum=momentum, nesterov=name == "nesterov")
    elif name == "adam":
        eps_root = config.get("eps_root", 0.0)
        if differentiated and eps_root <= 0.0:
            raise ValueError(
                "Meta-gradients through Adam need eps_root > 0 (d/dv sqrt(v) is infinite at "
                "v = 0 and turns the meta-gradient into NaN); set eps_root in this optimizer's "
                "config, e.g. --config.inner.optimizer.eps_root=1e-8 (in code: "
                "optax.adam(lr, eps_root=1e-8))."
            )
        opt = optax.adam(
            lr,
            b1=config.get("b1", 0.9),
            b2=config.get("b2", 0.999),
            eps=config.get("eps", 1e-8),
            eps_root=eps_root,
        )
    else:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")
    weight_decay = _weight_decay(config)
    if weight_decay:
        opt = optax.chain(optax.add_decayed_weights(weight_decay), opt)
    clip_value, clip_norm = config.get("clip_value", 0.0), config.get("clip_norm", 0.0)
    if clip_value < 0 or clip_norm < 0:
        raise ValueError(
            f"clip_value and clip_norm must be positive (or 0 for none); got {clip_value} "
            f"and {clip_norm}."
        )
    if clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(clip_norm), opt)
    if clip_value:
        opt = optax.chain(optax.clip(clip_value), opt)
    return opt


def _momentum(config: ml_collections.ConfigDict) -> float:
    return 0.0 if config.name == "sgd" else config.get("momentum", 0.9)


def _weight_decay(config: ml_collections.ConfigDict) -> float:
    return config.get("weight_decay", 0.0)


def make_lookahead(name: str, config: ml_collections.ConfigDict):
    """Where a one-step meta-objective measures the task loss after the inner step of
    the optimizer `config` (for `bilevel.OneStep(lookahead=...)`).

    Args:
      name: "none", at the optimizer's step θ_{t+1} (returns None); or "momentum", at
        θ_t plus the whole displacement the gradient causes under the optimizer's
        momentum, −η/(1−μ)(g + λθ) (`bilevel.momentum_lookahead`), so that a learned
        loss's scale is tuned for the step it really takes (the same as "none" for plain
        SGD).
      config: the inner optimizer's config (as for `make_optimizer`); "momentum" needs
        sgd, momentum or nesterov.
    """
    if name not in LOOKAHEADS:
        raise ValueError(f"Unknown lookahead {name!r}; choose one of {LOOKAHEADS}.")
    if name == "none":
        return None
    if config.name not in ("sgd", "momentum", "nesterov"):
        raise ValueError(
            f"lookahead='momentum' needs an SGD-family inner optimizer (sgd, momentum, "
            f"nesterov); got {config.name!r}. Use lookahead='none'."
        )
    return bilevel.momentum_lookahead(
        make_schedule(config.get("schedule"), config.lr), _momentum(config), _weight_decay(config)
    )
