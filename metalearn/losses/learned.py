"""Learned loss networks ℓ_φ and their portable artifacts.

The learned loss of ML³ and AdaLFL is applied output-wise:

    L_φ(y, ŷ) = mean over samples b and outputs c of ℓ_φ(y_bc, ŷ_bc [, extra_b])

where ℓ_φ is a small MLP (default 2×40) and `extra` are optional per-sample inputs
available at meta-train time (e.g. x). Applied output-wise the network is invariant to
the number of outputs; with `output_wise=False` it sees the whole vectors at once.

`kind="scaled_ce"` is the one-parameter family exp(s)·cross-entropy (φ = {s}): a
learned loss that can change only the size of cross-entropy's step, never its shape, so
adapted online (AdaLFL's `OnlineLearner`) it is a learning-rate multiplier meta-learned
by the one-step meta-gradient, hypergradient descent (Baydin et al. 2018) in log space.

For classification (y one-hot, ŷ probabilities) `ce_term=True` makes the loss
cross-entropy plus the learned term, as in the same authors' NPBML:

    L_φ(y, ŷ) = mean_b[−Σ_c y_bc log ŷ_bc] + mean_bc ℓ_φ(y_bc, ŷ_bc)

so that a learned term of zero (e.g. φ's last layer zero, no output activation) trains
exactly as cross-entropy does, and φ learns a correction to it.

A trained loss is saved as a directory (`loss_net.json` + orbax parameters) and
`load_learned_loss(path)` returns a pure `loss(y, y_hat, extra=None) -> scalar` that any
JAX training loop can differentiate.
"""

import difflib
import functools
import json
import os
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from metalearn.models.mlp import MLP
from metalearn.types import Array, MetaParams, PRNGKey

LOSS_NET_FILE = "loss_net.json"
PARAMS_DIR = "params"


def default_loss_net_config() -> ml_collections.ConfigDict:
    """The loss-network config group with its defaults (ML³: ReLU + Softplus, 2×40)."""
    return ml_collections.ConfigDict(
        {
            "hidden": (40, 40),
            "activation": "relu",  # or "smooth_leaky_relu" (AdaLFL), "elu", "tanh"
            "output_activation": "softplus",  # or "smooth_leaky_relu", "identity"
            "use_bias": True,
            "init": "xavier_uniform",
            "bias_init": 0.0,
            "beta": 10.0,  # smooth leaky ReLU smoothness
            "gamma": 0.01,  # smooth leaky ReLU leak
            "output_wise": True,
            "ce_term": False,  # classification: cross-entropy + the learned term (NPBML)
            "anchor": "none",  # or one of ANCHORS below
            "kind": "mlp",  # or "scaled_ce": exp(s)·cross-entropy, one parameter (KINDS)
        }
    )


# Keys a loss_net group may hold that experiments read and the library ignores.
EXPERIMENT_KEYS = ("max_grad_ratio", "normalise_grad")  # experiments/image_classification.py


def check_loss_net_config(config: ml_collections.ConfigDict) -> None:
    """Refuses a `loss_net` group with a key the library does not know (a typo such as
    `anchr`), naming the closest known key; a missing key takes its default."""
    known = [*default_loss_net_config().keys(), *EXPERIMENT_KEYS]
    for key in config.keys():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Unknown loss_net key {key!r}.{hint} Known keys: {sorted(known)}.")


# The families of learned losses (`loss_net.kind`).
KINDS = ("mlp", "scaled_ce")


def _with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    check_loss_net_config(config)
    full = default_loss_net_config()
    full.update(dict(config.items()))
    if full.kind not in KINDS:
        raise ValueError(f"Unknown loss_net.kind {full.kind!r}; choose one of {KINDS}.")
    if full.kind == "scaled_ce" and (not full.output_wise or full.ce_term or full.anchor != "none"):
        raise ValueError(
            "loss_net.kind='scaled_ce' is exp(s)·cross-entropy of one-hot y and probabilities "
            "ŷ, output-wise, with nothing added: set output_wise=True, ce_term=False and "
            f"anchor='none' (got output_wise={full.output_wise}, ce_term={full.ce_term}, "
            f"anchor={full.anchor!r})."
        )
    return full


# Ways of tying ℓ_φ's minimum to ŷ = y (`loss_net.anchor`; configs without it: "none").
# An unanchored ℓ_φ is minimised over θ only where its per-sample terms cancel on
# average, which moves with the sample and with φ's approximation error.
ANCHORS = ("none", "weighted_squared_error", "target_distance")

# ŷ below this floor is treated as this floor in the cross-entropy term (float32 softmax
# probabilities underflow to 0 only for logit gaps over ~87; there its gradient is 0).
PROBABILITY_FLOOR = 1e-30


def cross_entropy_of_probabilities(y: Array, y_hat: Array) -> Array:
    """mean_b[−Σ_c y_bc log ŷ_bc]: the cross-entropy term of `ce_term=True` (a scalar).

    With ŷ = softmax(z) its gradient in z is ŷ − y, that of cross-entropy on logits.
    """
    return -jnp.mean(jnp.sum(y * jnp.log(jnp.maximum(y_hat, PROBABILITY_FLOOR)), axis=-1))


class ScaledCrossEntropy(nn.Module):
    """ℓ_s(y_c, ŷ_c) = −exp(s)·y_c·log ŷ_c on output-wise features [..., 2] (y, ŷ):
    summed over the outputs, exp(s) times cross-entropy. One parameter, `log_scale` s,
    0 at initialisation (cross-entropy itself)."""

    @nn.compact
    def __call__(self, features: Array) -> Array:
        log_scale = self.param("log_scale", nn.initializers.zeros, ())
        y, y_hat = features[..., 0], features[..., 1]
        term = -y * jnp.log(jnp.maximum(y_hat, PROBABILITY_FLOOR))
        return (jnp.exp(log_scale) * term)[..., None]


def make_loss_network(config: ml_collections.ConfigDict) -> MLP | ScaledCrossEntropy:
    """The network ℓ_φ described by a `loss_net` config group (scalar output): an MLP,
    or for `kind="scaled_ce"` the one-parameter `ScaledCrossEntropy`.

    Raises:
      ValueError: for a key the library does not know (`check_loss_net_config`), an
        unknown kind, or a scaled_ce with settings it cannot take.
    """
    config = _with_defaults(config)
    if config.kind == "scaled_ce":
        return ScaledCrossEntropy()
    return MLP(
        features=(*config.hidden, 1),
        activation=config.activation,
        output_activation=config.output_activation,
        use_bias=config.use_bias,
        initializer=config.init,
        bias_init=config.bias_init,
        beta=config.beta,
        gamma=config.gamma,
    )


def loss_features(y: Array, y_hat: Array, extra: Array | None, output_wise: bool) -> Array:
    """Stacks the inputs of ℓ_φ.

    Args:
      y: targets [B, C] (one-hot or real-valued).
      y_hat: predictions [B, C].
      extra: optional per-sample inputs [B, E].
      output_wise: one feature row per (sample, output) pair, else one per sample.

    Returns:
      [B, C, 2 + E] if output-wise, else [B, 2C + E].
    """
    if y.shape != y_hat.shape or y.ndim != 2:
        raise ValueError(
            f"A learned loss takes y and y_hat of equal shape [batch, outputs]; got "
            f"{y.shape} and {y_hat.shape}. Reshape regression targets to [B, 1]."
        )
    if extra is not None and (extra.ndim != 2 or extra.shape[0] != y.shape[0]):
        raise ValueError(
            f"extra must be [batch, features] with batch {y.shape[0]}; got {extra.shape}."
        )
    if output_wise:
        feats = jnp.stack([y, y_hat], axis=-1)
        if extra is not None:
            extra_bc = jnp.broadcast_to(extra[:, None, :], (*y.shape, extra.shape[-1]))
            feats = jnp.concatenate([feats, extra_bc], axis=-1)
        return feats
    parts = [y, y_hat] + ([] if extra is None else [extra])
    return jnp.concatenate(parts, axis=-1)


def apply_learned_loss(
    network: MLP,
    output_wise: bool,
    params: MetaParams,
    y: Array,
    y_hat: Array,
    extra: Array | None = None,
    *,
    ce_term: bool = False,
    anchor: str = "none",
) -> Array:
    """L_φ(y, ŷ[, extra]): the mean of ℓ_φ over samples (and outputs). Returns a scalar.

    With `ce_term`, plus `cross_entropy_of_probabilities(y, ŷ)` (y one-hot, ŷ
    probabilities). `anchor` (see `ANCHORS`) makes ŷ = y a minimum of every sample's term
    whatever φ, so a model that fits its targets exactly is a minimiser of the loss: with
    "weighted_squared_error" the term is (ŷ − y)²·g_φ(y, ŷ, extra) (g_φ ≥ 0 with a
    softplus output), with "target_distance" it is (g_φ(y, ŷ, extra) − g_φ(y, y, extra))².
    """
    if isinstance(network, ScaledCrossEntropy) and extra is not None:
        raise ValueError(
            "A scaled_ce learned loss (exp(s)·cross-entropy) takes no extra inputs; got extra "
            f"of shape {extra.shape}. Use kind='mlp' to meta-train with extra information."
        )
    out = network.apply(params, loss_features(y, y_hat, extra, output_wise))
    if isinstance(network, ScaledCrossEntropy):  # exp(s)·CE: summed over the outputs
        return jnp.mean(jnp.sum(out[..., 0], axis=-1))
    if anchor == "weighted_squared_error":
        squared = (y_hat - y) ** 2
        out = out * (squared[..., None] if output_wise else jnp.mean(squared, -1, keepdims=True))
    elif anchor == "target_distance":
        out = (out - network.apply(params, loss_features(y, y, extra, output_wise))) ** 2
    elif anchor != "none":
        raise ValueError(f"Unknown anchor {anchor!r}; known: {ANCHORS}.")
    learned = jnp.mean(out)
    return learned + cross_entropy_of_probabilities(y, y_hat) if ce_term else learned


def init_learned_loss(
    config: ml_collections.ConfigDict, key: PRNGKey, num_outputs: int = 1, num_extra: int = 0
) -> MetaParams:
    """Initial φ for a `loss_net` config, for `num_outputs` outputs and `num_extra` extras."""
    y = jnp.zeros((1, num_outputs))
    extra = jnp.zeros((1, num_extra)) if num_extra else None
    config = _with_defaults(config)
    if config.kind == "scaled_ce" and num_extra:
        raise ValueError(
            f"A scaled_ce learned loss (exp(s)·cross-entropy) takes no extra inputs; got "
            f"num_extra={num_extra}. Use kind='mlp' to meta-train with extra information."
        )
    feats = loss_features(y, y, extra, config.output_wise)
    return make_loss_network(config).init(key, feats)


def learned_loss_fn(
    config: ml_collections.ConfigDict,
) -> Callable[..., Array]:
    """`loss(params, y, y_hat, extra=None) -> scalar` for a `loss_net` config: targets
    before predictions, the order of every metalearn loss (`metalearn.losses.task`).
    y and y_hat of different shapes are refused."""
    config = _with_defaults(config)
    anchor = config.anchor
    if anchor not in ANCHORS:
        raise ValueError(f"Unknown loss_net.anchor {anchor!r}; known: {ANCHORS}.")
    return functools.partial(
        apply_learned_loss,
        make_loss_network(config),
        config.output_wise,
        ce_term=bool(config.get("ce_term", False)),
        anchor=anchor,
    )


DESCRIPTION_KEYS = ("y", "y_hat", "extra", "inner_optimizer", "inner_steps")


def save_learned_loss(
    path: str,
    config: ml_collections.ConfigDict,
    params: MetaParams,
    *,
    inner_optimizer: dict,
    inner_steps: int,
    y: str = "targets",
    y_hat: str = "model outputs",
    extra: tuple[str, ...] | list[str] = (),
) -> None:
    """Writes a learned-loss artifact: `loss_net.json` and orbax parameters under `path`.

    A learned loss only works when fed as it was meta-trained, and for the inner training
    it was meta-trained for (the same loss is broken at 10× the learning rate), so the
    artifact records both (returned by `load_learned_loss` as `loss.description`).

    Args:
      path: the artifact directory (created if missing; an artifact already there is
        replaced).
      config: the `loss_net` config group.
      params: φ (every leaf finite).
      inner_optimizer: the inner optimizer it was meta-trained for, as a JSON-able
        mapping with at least its name and learning rate, e.g. {"name": "sgd", "lr": 0.01}
        (not an optax object: that cannot be written down).
      inner_steps: the inner steps per episode it was meta-trained for.
      y: what the loss's `y` input is, e.g. "one-hot labels" or "targets".
      y_hat: what its `y_hat` input is, e.g. "softmax probabilities" or "raw outputs".
      extra: names of the extra per-sample inputs it was meta-trained with, in order.

    Everything is checked before anything is written; the parameters are written by orbax
    (atomically: a temporary directory renamed into place) and the json to a temporary
    file renamed, so a failure leaves no partial artifact.

    Raises:
      ValueError: for a non-finite φ (a diverged meta-training: save an earlier φ), an
        unknown loss_net key, or an inner_optimizer / inner_steps that does not describe
        the inner training.
      TypeError: for a description that cannot be written as JSON.
    """
    check_loss_net_config(config)
    bad = [
        jax.tree_util.keystr(k)
        for k, x in jax.tree_util.tree_leaves_with_path(jax.device_get(params))
        if not np.all(np.isfinite(x))
    ]
    if bad:
        raise ValueError(
            f"Refusing to save a learned loss whose φ is not finite (NaN or inf in {bad[:3]}"
            f"{' ...' if len(bad) > 3 else ''}): its meta-training diverged, and the loaded "
            "loss would return NaN. Save the φ of an earlier step (a checkpoint) instead."
        )
    if not isinstance(inner_optimizer, dict) or not {"name", "lr"} <= set(inner_optimizer):
        raise ValueError(
            "inner_optimizer must describe the inner optimizer the loss was meta-trained for "
            'as a mapping with its name and learning rate, e.g. {"name": "sgd", "lr": 0.01} '
            f"(an optax object cannot be written down); got {type(inner_optimizer).__name__}"
            f" {inner_optimizer!r:.80}."
        )
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
        raise ValueError(
            f"inner_steps must be the inner steps per episode the loss was meta-trained for, "
            f"an integer >= 1; got {inner_steps!r}."
        )
    description = {
        "y": y,
        "y_hat": y_hat,
        "extra": list(extra),
        "inner_optimizer": dict(inner_optimizer),
        "inner_steps": inner_steps,
    }
    try:
        group = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        text = json.dumps({**group, "description": description}, indent=2)
    except TypeError as e:
        raise TypeError(
            f"The learned loss's description cannot be written as JSON ({e}): pass plain "
            "numbers, strings, lists and dicts in inner_optimizer, y, y_hat and extra."
        ) from None
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    # On several processes every one takes part in orbax's save (it writes from process 0
    # between barriers of all), and process 0 alone writes the json.
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, PARAMS_DIR), jax.device_get(params), force=True)
    from metalearn.runtime.sharding import is_main_process  # runtime imports this module

    if not is_main_process():
        return
    tmp = os.path.join(path, LOSS_NET_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(path, LOSS_NET_FILE))


def _fan_in(params: MetaParams) -> int:
    """The input width of ℓ_φ's first layer (2, y and ŷ, for a `ScaledCrossEntropy`)."""
    if "log_scale" in params["params"]:
        return 2
    return int(params["params"]["Dense_0"]["kernel"].shape[0])


def load_learned_loss(path: str) -> Callable[..., Array]:
    """Loads an artifact written by `save_learned_loss`.

    Args:
      path: one artifact directory, e.g. `<workdir>/learned_loss/seed_0`.

    Returns:
      A pure `loss(y, y_hat, extra=None) -> scalar` with φ bound; `loss.params` holds φ,
      `loss.config` the loss-network config and `loss.description` how it must be fed
      (`y`, `y_hat`, `extra` names) and what it was meta-trained for (`inner_optimizer`,
      `inner_steps`). Passing `extra` of the wrong width raises a ValueError naming the
      inputs it was trained with.
    """
    path = os.path.abspath(path)
    cfg_file = os.path.join(path, LOSS_NET_FILE)
    if not os.path.exists(cfg_file):
        found = _artifacts_below(path)
        hint = (
            f" It holds {len(found)} artifacts, one per seed or variant: "
            + ", ".join(os.path.relpath(f, path) for f in found[:12])
            + (", ..." if len(found) > 12 else "")
            + ". Pass one of them."
            if found
            else " Pass the folder written by an ML³ run (its workdir holds "
            "learned_loss/seed_<i>/)."
        )
        raise FileNotFoundError(
            f"No learned-loss artifact at {path}: {LOSS_NET_FILE} is missing.{hint}"
        )
    with open(cfg_file) as f:
        saved = json.load(f)
    description = saved.pop("description", None) or {k: None for k in DESCRIPTION_KEYS}
    config = ml_collections.ConfigDict(saved)
    config.hidden = tuple(config.hidden)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, PARAMS_DIR))
    params = jax.tree.map(jnp.asarray, params)
    apply = functools.partial(learned_loss_fn(config), params)
    trained_extra = description.get("extra") or []
    fan_in = _fan_in(params)

    def loss(y: Array, y_hat: Array, extra: Array | None = None) -> Array:
        given = 0 if extra is None else extra.shape[-1]
        width = fan_in - (2 if config.output_wise else 2 * y.shape[-1])
        if given != width:
            names = f" ({', '.join(trained_extra)})" if trained_extra else ""
            if width == 0:
                raise ValueError(
                    f"The learned loss at {path} was meta-trained without extra inputs; got "
                    f"extra of width {given}. Call it as loss(y, y_hat)."
                )
            raise ValueError(
                f"The learned loss at {path} was meta-trained with {width} extra input(s)"
                f"{names}; got {given}. Pass extra=[batch, {width}]{names} as in training."
            )
        return apply(y, y_hat, extra)

    loss.params, loss.config, loss.description = params, config, description  # type: ignore
    return loss


def _artifacts_below(path: str) -> list[str]:
    if not os.path.isdir(path):
        return []
    return sorted(d for d, _, files in os.walk(path) if LOSS_NET_FILE in files)
