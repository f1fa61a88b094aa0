"""The self-loss transformer's objectives and steps, as pure functions.

One transformer (`metalearn.models.transformer`) is the language model and its own
critic. The self-produced training signal (`Spec.signal`) is either

- ``"scalar"``: the critic reads `input ⊕ prediction ⊕ [LOSS]` and its score at
  `[LOSS]` is the predicted loss of that prediction; or
- ``"targets"``: the critic produces a target distribution for every next token and the
  model is trained against it with cross-entropy (the research plan's first experiment).
  It reads the input (`Spec.sees` 'input'), the input and the observed continuation
  ('input_and_continuation'), or the input, the model's prediction and the observed
  next token ('observed': the transformer's `critic` stack). `target_quality` measures
  the targets against the true next tokens.

Phase 1 (`meta_objective`) meta-trains θ: K inner steps on the self-produced loss from
θ, then the true cross-entropy of another batch at θ', differentiated through the inner
steps with the heart (an estimator's `loss`) or estimated from forward unrolls alone by
antithetic ES (`meta_grad` with `bilevel.ES`: on path 'hard', where the token choice has no
gradient); the outer update is followed by θ ← (1 − τ)θ + τθ' (`interpolate`). Phase 2
updates θ by the self-produced loss (`self_loss`) alone.

The critic (`Spec.critic`) is θ itself ('same'), a copy frozen at the end of Phase 1
('frozen') or an exponential moving average of θ ('ema'). Only for 'same' without
`stop_gradient` does the inner gradient reach the critic's weights: that is the channel
through which a model can lower its predicted loss without predicting better.

The reward-hacking detector that watches Phase 2 is `metalearn.hacking`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from metalearn import bilevel, estimators
from metalearn.bilevel.forward import es_diagnostics
from metalearn.models.mlp import smooth_leaky_relu
from metalearn.models.transformer import Transformer, param_groups
from metalearn.state import init_inner_state
from metalearn.tasks.text import LOSS
from metalearn.types import Array, Params, PRNGKey

SIGNALS = ("scalar", "targets")
PATHS = ("soft", "straight_through", "hard")
OUTPUTS = ("identity", "softplus", "smooth_leaky_relu")
CRITICS = ("same", "frozen", "ema")
SEES = ("input", "input_and_continuation", "observed")
LAYOUTS = ("separate", "shared_prefix")


@dataclasses.dataclass(frozen=True)
class Spec:
    """What the self-produced loss is; static (hashable) so that it can close over jit.

    Attributes:
      signal: one of `SIGNALS`.
      path: how predictions enter the loss pass (`PATHS`): 'soft' (probability-weighted
        embeddings), 'straight_through' (one-hot forward, soft gradient back) or 'hard'
        (one-hot argmax tokens: no gradient through the predictions).
      output: the transform of the critic's score (`OUTPUTS`); 'identity' is the
        document's unconstrained scalar, the others are positive and smooth.
      normalise: standardise the per-sequence predicted losses over the batch with the
        batch's mean and std held constant: the value no longer carries the critic's
        offset or scale, and the step size no longer grows with the critic's scale.
      critic: one of `CRITICS`.
      stop_gradient: for critic 'same', block the gradient through the critic's weights.
      sees: what a 'targets' critic reads (`SEES`).
      layout: 'separate' runs the loss pass as its own forward over `input ⊕ prediction ⊕
        [LOSS]`; 'shared_prefix' continues the language-model pass's keys and values
        (critic 'same' without stop_gradient only, where the weights are the same).
      monotonicity: weight of a pairwise ranking penalty in the Phase 1 outer objective:
        across a batch, sequences with a higher true cross-entropy should get a higher
        predicted loss.
      disjoint: the model has disjoint upper layers; each loop then updates only its own
        (inner: trunk + lm; outer: trunk + loss).
    """

    signal: str = "scalar"
    path: str = "soft"
    output: str = "identity"
    normalise: bool = False
    critic: str = "same"
    stop_gradient: bool = False
    sees: str = "input"
    layout: str = "separate"
    monotonicity: float = 0.0
    disjoint: bool = False

    def __post_init__(self):
        for name, allowed in (
            ("signal", SIGNALS),
            ("path", PATHS),
            ("output", OUTPUTS),
            ("critic", CRITICS),
            ("sees", SEES),
            ("layout", LAYOUTS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"Unknown {name} {getattr(self, name)!r}; choose one of {allowed}."
                )
        if self.layout == "shared_prefix" and not self.live_critic:
            raise ValueError(
                "layout='shared_prefix' reuses the language model's keys and values in the loss "
                "pass, so the critic must be the same, live weights: use critic='same' without "
                "stop_gradient, or layout='separate'."
            )
        if self.layout == "shared_prefix" and self.signal != "scalar":
            raise ValueError("layout='shared_prefix' applies to signal='scalar' only.")
        if self.sees != "input" and self.signal != "targets":
            raise ValueError(
                f"sees={self.sees!r} says what a targets critic reads: use signal='targets' "
                "(the scalar critic reads input ⊕ prediction ⊕ [LOSS])."
            )

    @property
    def live_critic(self) -> bool:
        """Whether the inner gradient flows through the critic's weights."""
        return self.critic == "same" and not self.stop_gradient


def cross_entropy(logits: Array, targets: Array) -> Array:
    """Per-sequence mean next-token cross-entropy in nats: logits [B, T, V], targets [B, T]
    -> [B]."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], axis=-1)


def prediction_inputs(logits: Array, path: str) -> Array:
    """The predictions as loss-pass inputs [B, T, V] (see `Spec.path`)."""
    soft = jax.nn.softmax(logits)
    hard = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=soft.dtype)
    if path == "soft":
        return soft
    if path == "straight_through":
        return hard + soft - jax.lax.stop_gradient(soft)
    if path == "hard":
        return hard
    raise ValueError(f"Unknown prediction path {path!r}; choose one of {PATHS}.")


def transform_output(score: Array, output: str) -> Array:
    """The predicted loss from the critic's raw score (see `Spec.output`)."""
    if output == "identity":
        return score
    if output == "softplus":
        return jax.nn.softplus(score)
    if output == "smooth_leaky_relu":
        return smooth_leaky_relu(score)
    raise ValueError(f"Unknown output {output!r}; choose one of {OUTPUTS}.")


def loss_pass(
    model: Transformer,
    critic: Params,
    inputs: Array,
    predictions: Array,
    *,
    output: str,
    cache: dict | None = None,
) -> Array:
    """Per-sequence predicted losses [B] of `predictions` [B, T, V] for `inputs` [B, T].

    The critic reads `inputs ⊕ predictions ⊕ [LOSS]` and its score at `[LOSS]` is the
    predicted loss. With `cache` (the language-model pass's, same weights) only
    `predictions ⊕ [LOSS]` is computed, attending to the cached inputs.
    """
    b, _, v = predictions.shape
    loss_token = jax.nn.one_hot(jnp.full((b, 1), LOSS), v, dtype=predictions.dtype)
    if cache is None:
        seq = jnp.concatenate([jax.nn.one_hot(inputs, v, dtype=predictions.dtype), predictions], 1)
    else:
        seq = predictions
    score, _ = model.apply(
        {"params": critic}, jnp.concatenate([seq, loss_token], 1), stack="loss", cache=cache
    )
    return transform_output(score[:, -1], output)


def critic_targets(
    model: Transformer,
    critic: Params,
    tokens: Array,
    sees: str,
    prediction: Array | None = None,
) -> Array:
    """The critic's target distributions [B, T, V] for the next tokens of `tokens` [B, T + 1].

    'input': the critic's own next-token distribution on the input. 'input_and_
    continuation': the critic reads the whole window (input and observed continuation),
    then `[LOSS]`, then the input again, and its outputs over that second copy are the
    targets: it may copy what it has seen, or not. 'observed': the `critic` stack reads
    the input and, at every position, the observed next token and `prediction` [B, T, V]
    (the model's prediction of it, as `prediction_inputs` gives it).
    """
    inputs = tokens[:, :-1]
    if sees == "observed":
        if prediction is None:
            raise ValueError("sees='observed' needs the model's prediction [B, T, V].")
        logits, _ = model.apply(
            {"params": critic},
            inputs,
            stack="critic",
            observed=tokens[:, 1:],
            prediction=prediction,
        )
        return jax.nn.softmax(logits)
    if sees == "input":
        logits, _ = model.apply({"params": critic}, inputs)
        return jax.nn.softmax(logits)
    if sees == "input_and_continuation":
        b, t = inputs.shape
        seq = jnp.concatenate([tokens, jnp.full((b, 1), LOSS, tokens.dtype), inputs], 1)
        logits, _ = model.apply({"params": critic}, seq)
        return jax.nn.softmax(logits[:, -t:])
    raise ValueError(f"Unknown critic view {sees!r}; choose one of {SEES}.")


def targets_of(model: Transformer, critic: Params, tokens: Array, logits: Array, spec: Spec):
    """The targets q [B, T, V] a 'targets' critic gives the model whose logits on
    `tokens[:, :-1]` are `logits` (for a live critic `critic` must be those params)."""
    if spec.live_critic and spec.sees == "input":
        return jax.nn.softmax(logits)  # the critic's pass is the model's own pass
    preds = prediction_inputs(logits, spec.path) if spec.sees == "observed" else None
    return critic_targets(model, critic, tokens, spec.sees, preds)


# The names of `target_quality`'s scalars, in its order.
QUALITY = tuple(
    f"critic/{name}"
    for name in ("target_ce", "target_entropy", "target_accuracy", "model_accuracy", "agreement")
)


def target_quality(targets: Array, logits: Array, tokens: Array) -> dict[str, Array]:
    """How good a critic's targets are, against the true next tokens and the model.

    Args:
      targets: the target distributions q [B, T, V].
      logits: the model's next-token logits [B, T, V].
      tokens: the true next tokens y [B, T].

    Returns:
      Scalars (means over every position): `critic/target_ce` −log q(y), the targets'
      cross-entropy to the truth (below the model's own `true/train_ce` when the targets
      are worth learning from); `critic/target_entropy` −Σ q log q; `critic/target_accuracy`
      [argmax q = y]; `critic/model_accuracy` [argmax p = y]; `critic/agreement`
      [argmax q = argmax p], how far the targets only echo the model.
    """
    q = jax.lax.stop_gradient(targets)
    logq = jnp.log(jnp.maximum(q, jnp.finfo(q.dtype).tiny))
    top_q, top_p = jnp.argmax(q, -1), jnp.argmax(jax.lax.stop_gradient(logits), -1)
    values = (
        -jnp.mean(jnp.take_along_axis(logq, tokens[..., None], -1)),
        -jnp.mean(jnp.sum(q * logq, -1)),
        jnp.mean(top_q == tokens),
        jnp.mean(top_p == tokens),
        jnp.mean(top_q == top_p),
    )
    return dict(zip(QUALITY, values, strict=True))


def normalise_batch(values: Array, eps: float = 1e-6) -> Array:
    """(values − mean) / std over the batch, the statistics held constant."""
    mean = jax.lax.stop_gradient(jnp.mean(values))
    std = jax.lax.stop_gradient(jnp.std(values))
    return (values - mean) / (std + eps)


def self_loss(
    params: Params,
    model_state: dict,
    critic: Params,
    tokens: Array,
    key: PRNGKey,
    *,
    model: Transformer,
    spec: Spec,
) -> tuple[Array, tuple[dict, dict[str, Array]]]:
    """The self-produced objective of θ = `params` on a batch of windows [B, T + 1].

    In the heart's `inner_loss` signature: `critic` plays φ. For a live critic
    (`spec.live_critic`) the critic is `params` itself and `critic` is ignored.

    Returns:
      `(objective, (model_state, {'pred_loss', 'train_ce', ...}))`; `train_ce` is the
      true cross-entropy of the batch, a diagnostic that never enters the objective; with
      `signal='targets'` also the targets' `target_quality`.
    """
    del key
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits, cache = model.apply({"params": params}, inputs)
    critic = params if spec.live_critic else critic
    quality = {}
    if spec.signal == "scalar":
        preds = prediction_inputs(logits, spec.path)
        use_cache = cache if spec.layout == "shared_prefix" else None
        values = loss_pass(model, critic, inputs, preds, output=spec.output, cache=use_cache)
        objective = jnp.mean(normalise_batch(values) if spec.normalise else values)
    else:
        q = targets_of(model, critic, tokens, logits, spec)
        objective = jnp.mean(-jnp.sum(q * jax.nn.log_softmax(logits), -1))
        quality = target_quality(q, logits, targets)
    ce = jax.lax.stop_gradient(jnp.mean(cross_entropy(logits, targets)))
    return objective, (model_state, {"pred_loss": objective, "train_ce": ce, **quality})


def true_loss(params: Params, model_state: dict, tokens: Array, key: PRNGKey, *, model) -> Array:
    """The true next-token cross-entropy of a batch of windows [B, T + 1]."""
    del model_state, key
    logits, _ = model.apply({"params": params}, tokens[:, :-1])
    return jnp.mean(cross_entropy(logits, tokens[:, 1:]))


def monotonicity_penalty(predicted: Array, true: Array, margin: float = 0.0) -> Array:
    """Pairwise ranking hinge over a batch: mean over pairs (i, j) with true_i > true_j of
    relu(margin − (predicted_i − predicted_j)). Zero when the ranking agrees."""
    diff_pred = predicted[:, None] - predicted[None, :]
    order = jax.lax.stop_gradient(jnp.sign(true[:, None] - true[None, :]))
    # A sequence is never paired with itself, even where XLA computes true_i − true_i from
    # two copies of true_i that differ in the last bit (unoptimised programs do).
    pairs = jnp.where(jnp.eye(true.shape[0], dtype=bool), 0.0, jnp.maximum(order, 0.0))
    return jnp.sum(pairs * jax.nn.relu(margin - diff_pred)) / jnp.maximum(jnp.sum(pairs), 1.0)


def outer_loss(
    params: Params, model_state: dict, tokens: Array, key: PRNGKey, *, model, spec: Spec
) -> Array:
    """Phase 1's outer objective at θ': the true cross-entropy, plus the monotonicity
    penalty of θ' as its own critic when `spec.monotonicity > 0`."""
    del model_state, key
    inputs = tokens[:, :-1]
    logits, _ = model.apply({"params": params}, inputs)
    per_seq = cross_entropy(logits, tokens[:, 1:])
    loss = jnp.mean(per_seq)
    if spec.monotonicity and spec.signal == "scalar":
        preds = prediction_inputs(logits, spec.path)
        values = loss_pass(model, params, inputs, preds, output=spec.output)
        loss = loss + spec.monotonicity * monotonicity_penalty(values, per_seq)
    return loss


def routed(
    optimizer: optax.GradientTransformation, frozen_group: str | None
) -> optax.GradientTransformation:
    """`optimizer` on every parameter outside `frozen_group` (a `param_groups` label),
    whose updates are zero: how each loop updates only its own layers."""
    if frozen_group is None:
        return optimizer
    return optax.multi_transform(
        {"trunk": optimizer, "lm": optimizer, "loss": optimizer, "frozen": optax.set_to_zero()},
        lambda p: jax.tree.map(lambda g: "frozen" if g == frozen_group else g, param_groups(p)),
    )


# The estimators of a Phase 1 meta step, one unroll from θ.
PHASE1_ESTIMATORS = (bilevel.Unrolled, bilevel.FirstOrder, bilevel.LastWindow, bilevel.ES)


def _problem(model: Transformer, spec: Spec, inner_optimizer) -> bilevel.Problem:
    return bilevel.Problem(
        functools.partial(self_loss, model=model, spec=spec),
        functools.partial(outer_loss, model=model, spec=spec),
        inner_optimizer,
    )


def meta_objective(
    theta: Params,
    tokens: Array,
    keys: PRNGKey,
    outer_tokens: Array,
    outer_key: PRNGKey,
    *,
    model: Transformer,
    spec: Spec,
    inner_optimizer: optax.GradientTransformation,
    estimator: bilevel.Estimator,
) -> tuple[Array, tuple[Params, dict[str, Array]]]:
    """L_true(θ'(θ)) after K inner steps on the self-produced loss from θ.

    θ enters twice: as the start of the unroll and as the critic (for K = 1 and any
    critic, or for a live critic, the same function the inner loop of Phase 2 uses).

    Args:
      theta: the parameters.
      tokens, keys: K inner batches [K, B, T + 1] and keys [K].
      outer_tokens, outer_key: the outer batch.
      estimator: how the objective is differentiated (see `check_estimator`):
        `bilevel.Unrolled` (through all K steps), `FirstOrder` (the inner gradient at
        stop_gradient(θ)) or `LastWindow(steps=W)` (only the last W steps are
        differentiated; the earlier ones enter the start of the window with an identity
        Jacobian to θ, since θ is also where the unroll starts), each with its `remat`.
        `ES` does not differentiate this function: `meta_grad` estimates its gradient.

    Returns:
      `(outer loss, (θ', inner metrics stacked over K))`.
    """
    check_estimator(estimator, tokens.shape[0])
    if isinstance(estimator, bilevel.ES):
        raise ValueError(
            "ES estimates the meta-gradient from forward unrolls instead of "
            "differentiating meta_objective: call self_loss.meta_grad(..., estimator=ES())."
        )
    loss, (final, metrics) = estimator.loss(
        _problem(model, spec, inner_optimizer),
        theta,
        init_inner_state(theta, inner_optimizer),
        tokens,
        keys,
        outer_tokens,
        outer_key,
    )
    return loss, (final.params, metrics)


def meta_grad(
    theta: Params,
    tokens: Array,
    keys: PRNGKey,
    outer_tokens: Array,
    outer_key: PRNGKey,
    *,
    model: Transformer,
    spec: Spec,
    inner_optimizer: optax.GradientTransformation,
    estimator: bilevel.Estimator,
    noise_key: PRNGKey | None = None,
) -> tuple[Array, Params, tuple[Params, dict[str, Array]]]:
    """Phase 1's meta-gradient: ∇_θ `meta_objective`, backpropagated or estimated.

    `bilevel.ES` (antithetic ES, `estimators.antithetic_es`, its σ and pairs) perturbs
    all of θ — the start of the unroll and the critic together — and runs 2P forward
    unrolls from θ ± ε, so its memory does not grow with K and it sees what
    backpropagation cannot: on path 'hard' how θ moves the argmax tokens the critic
    reads, and so the inner steps. It estimates the gradient of the Gaussian-smoothed
    objective; its variance grows with the number of parameters (see `bilevel.ES` on
    choosing σ and pairs).

    Args:
      theta, tokens, keys, outer_tokens, outer_key, model, spec, inner_optimizer,
        estimator: as in `meta_objective`, or `ES`.
      noise_key: the key of ES's perturbations (required by `ES`).

    Returns:
      `(outer loss, grads shaped like θ, (θ', inner metrics stacked over K))`: the loss,
      θ' and metrics of the unperturbed unroll; `ES` adds, each broadcast over K,
      `es_loss_spread` (the std of the 2P perturbed outer losses), `es_stderr` (the norm
      of the estimate's standard error, from the spread over the pairs) and
      `es_rel_stderr` (that over the estimate's norm: near or above 1, mostly noise).
    """
    objective = functools.partial(
        meta_objective,
        tokens=tokens,
        keys=keys,
        outer_tokens=outer_tokens,
        outer_key=outer_key,
        model=model,
        spec=spec,
        inner_optimizer=inner_optimizer,
    )
    if not isinstance(estimator, bilevel.ES):
        (loss, aux), grads = jax.value_and_grad(
            functools.partial(objective, estimator=estimator), has_aux=True
        )(theta)
        return loss, grads, aux
    check_estimator(estimator, tokens.shape[0])
    if noise_key is None:
        raise ValueError("ES draws its perturbations from noise_key: pass one.")
    forward = functools.partial(objective, estimator=bilevel.Unrolled())  # never differentiated
    theta = jax.lax.stop_gradient(theta)
    loss, (theta_prime, metrics) = forward(theta)
    grads, losses, stderr = estimators.antithetic_es(
        forward, theta, noise_key, sigma=estimator.sigma, pairs=estimator.pairs
    )
    extra = {
        k.removeprefix("meta/"): jnp.broadcast_to(v, (tokens.shape[0],))
        for k, v in es_diagnostics(losses, stderr, grads).items()
    }
    return loss, grads, (theta_prime, {**metrics, **extra})


def check_estimator(estimator: bilevel.Estimator, inner_steps: int) -> None:
    """Validates Phase 1's gradient estimator; raises ValueError saying how to fix it.

    Args:
      estimator: one that fits one meta step from θ: `bilevel.Unrolled`, `FirstOrder`,
        `LastWindow` or `ES` (`meta_grad`), over the whole unroll (window None).
      inner_steps: K, the inner steps of a meta step.
    """
    bilevel.check_estimator_object(estimator)
    if isinstance(estimator, bilevel.PES):
        raise ValueError(
            "PES carries perturbed inner states from one window of a long unroll to the "
            "next; a Phase 1 meta step is one unroll that starts afresh from θ, with nothing "
            "carried between meta steps, so PES would be plain ES: use ES (forward unrolls "
            "only, memory independent of meta.inner_steps)."
        )
    if isinstance(estimator, bilevel.Implicit):
        raise ValueError(
            "Implicit differentiates the fixed point of the inner loss, where θ' no longer "
            "depends on where the unroll started; a Phase 1 unroll is "
            f"meta.inner_steps ({inner_steps}) steps from θ, not solved to a fixed point, and "
            "its dependence on that start is most of its meta-gradient: choose 'unrolled', "
            "'first_order', 'last_window', or 'es' (forward only, e.g. for path='hard')."
        )
    if isinstance(estimator, bilevel.Truncated) or estimator.window is not None:
        raise ValueError(
            f"{estimator!r} updates the meta-parameters after every window of a longer "
            "unroll; a Phase 1 meta step is one unroll from θ: choose 'unrolled', "
            "'first_order', 'last_window' (differentiate the last meta.window inner steps) or "
            "'es'."
        )
    if not isinstance(estimator, PHASE1_ESTIMATORS):
        raise ValueError(
            f"Phase 1 takes one of {[c.__name__ for c in PHASE1_ESTIMATORS]}; got {estimator!r}."
        )
    if isinstance(estimator, bilevel.LastWindow) and not estimator.steps < inner_steps:
        raise ValueError(
            f"estimator='last_window' differentiates the last meta.window steps of "
            f"meta.inner_steps; the window ({estimator.steps}) must be in [1, {inner_steps})."
        )


def interpolate(theta: Params, theta_prime: Params, tau: float) -> Params:
    """(1 − τ)θ + τθ'."""
    return jax.tree.map(lambda a, b: (1.0 - tau) * a + tau * b, theta, theta_prime)


def ema(average: Params, params: Params, decay: float) -> Params:
    """decay · average + (1 − decay) · params."""
    return jax.tree.map(lambda a, p: decay * a + (1.0 - decay) * p, average, params)
