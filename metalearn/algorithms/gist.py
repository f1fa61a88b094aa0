"""Gist tokens and losses in the space they span, as pure functions.

Gisting (Mu, Li & Goodman, "Learning to Compress Prompts with Gist Tokens"): k gist
tokens are inserted after a span, and the attention mask stops every token after the
last gist from attending to anything before the first gist, so whatever the later
tokens need of the span must pass through the gists. Here (research plans 2 and 3):

- **Phase G, the bottleneck** (`bottleneck_loss`): windows laid out as
  [context c][k gists][chunk x], next-token cross-entropy under the gist mask
  (`gist_mask`). The controls bound what compression can achieve: 'positive' (plain
  causal attention: x sees c) and 'negative' (x sees neither c nor the gists).
  `encode` is the gist encoding E(s) of a span s: the final hidden states at the gist
  positions of [s][k gists].
- **Self-training in gist space** (`gist_self_loss`, the heart's `inner_loss` with the
  encoder as φ): the model's predictions of a window's last `Spec.chunk` tokens x̂ and
  the observed tokens x are encoded, and θ descends 1 − cos per gist slot between
  E(x̂) and E(x) (plan 2, `Spec.target` 'observed'), or between E(x̂) and E(x̂ ⊕ x)
  (plan 3, 'output_and_observed', the encoder then learned by the one-step
  meta-gradient on validation cross-entropy: `algorithms.adalfl.lockstep`).
  `Spec.path` says how x̂ enters the encoder: 'soft' (probability-weighted
  embeddings), 'straight_through' (one-hot argmax forward, soft gradient back) or
  'score_function' (sampled tokens, REINFORCE with the batch-mean baseline).
- **Diagnostics**: `collapse` (mean pairwise cosine of the gists of different chunks,
  and the effective rank of their matrix) and the cross-entropy of every sequence, so
  the rank correlation of the gist loss with the true loss can be read per batch.
"""

import dataclasses

import jax
import jax.numpy as jnp

from metalearn.algorithms.self_loss import cross_entropy
from metalearn.hacking import spearman
from metalearn.models.transformer import Transformer
from metalearn.tasks.text import GIST, NUM_GIST
from metalearn.types import Array, Params, PRNGKey

MODES = ("gist", "positive", "negative")
PATHS = ("soft", "straight_through", "score_function")
TARGETS = ("observed", "output_and_observed")


def gist_ids(k: int) -> Array:
    """The ids of the first k gist tokens [k]; 1 ≤ k ≤ `text.NUM_GIST`."""
    if not 1 <= k <= NUM_GIST:
        raise ValueError(f"k = {k} gist tokens; the vocabulary reserves 1 … {NUM_GIST}.")
    return GIST + jnp.arange(k)


def gist_mask(length: int, spans: tuple[tuple[int, int], ...], mode: str = "gist") -> Array:
    """The attention mask bool [length, length] (query, key) of a sequence with gist spans.

    Args:
      length: the sequence length.
      spans: `(start, k)` per gist span: k gist tokens at positions start … start + k − 1.
      mode: 'gist': causal, and every query after a span's last gist sees nothing before
        the span's first gist (the gists themselves see what precedes them); 'positive':
        plain causal attention (the control without a bottleneck); 'negative': causal,
        and every query after a span's last gist sees nothing up to and including its
        gists (the control with no information from before).

    Several spans compose: each forbids what it forbids, so a token after two spans
    sees neither the text before the first nor the text before the second.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown gist mask mode {mode!r}; choose one of {MODES}.")
    q = jnp.arange(length)[:, None]
    key = jnp.arange(length)[None, :]
    mask = key <= q
    for start, k in spans:
        if k < 1 or start < 0 or start + k > length:
            raise ValueError(
                f"A gist span (start {start}, k {k}) must have k ≥ 1 and lie within the "
                f"sequence of {length} tokens."
            )
        after = q >= start + k
        if mode == "gist":
            mask = mask & ~(after & (key < start))
        elif mode == "negative":
            mask = mask & ~(after & (key < start + k))
    return mask


def _one_hot(tokens: Array, like: Array) -> Array:
    return jax.nn.one_hot(tokens, like.shape[-1], dtype=like.dtype)


def with_gists(span: Array, k: int) -> Array:
    """[span][k gists]: ids [B, n] → [B, n + k]; distributions [B, n, V] → [B, n + k, V]."""
    ids = jnp.broadcast_to(gist_ids(k), (span.shape[0], k))
    if span.ndim == 2:
        return jnp.concatenate([span, ids.astype(span.dtype)], 1)
    return jnp.concatenate([span, _one_hot(ids, span)], 1)


def encode(model: Transformer, params: Params, span: Array, k: int) -> Array:
    """The gist encoding E(span) [B, k, D]: the final hidden states at the k gist
    positions of [span][k gists] (ids [B, n] or distributions [B, n, V])."""
    _, cache = model.apply({"params": params}, with_gists(span, k))
    return cache["hidden"][:, -k:]


def bottleneck_loss(
    params: Params, tokens: Array, *, model: Transformer, k: int, context: int, mode: str
) -> tuple[Array, dict[str, Array]]:
    """Phase G's objective on windows [B, T + 1]: cross-entropy under the gist mask.

    The window's first `context` tokens are c, the remaining T + 1 − context the chunk x;
    the pass reads [c][k gists][x without its last token]. Every position predicts the
    next token of the window except the last of c and the gists (their next token is a
    gist, or the first of x, which a gist position's query would predict having seen c).
    So x's first token is read, not predicted, and every prediction of x is made by a
    query after the gists.

    Returns:
      `(loss, {'ce_context', 'ce_chunk'})`: the mean cross-entropy over every predicted
      token, and its parts over c and over x (CE(x | gists)).
    """
    b, n = tokens.shape
    chunk = n - context
    if context < 2 or chunk < 2:
        raise ValueError(
            f"A window of {n} tokens split at context = {context} leaves a context of "
            f"{context} and a chunk of {chunk}; both need at least 2."
        )
    c, x = tokens[:, :context], tokens[:, context:]
    seq = jnp.concatenate([c, jnp.broadcast_to(gist_ids(k), (b, k)), x[:, :-1]], 1)
    mask = gist_mask(seq.shape[1], ((context, k),), mode)
    logits, _ = model.apply({"params": params}, seq, mask=mask)
    ce_context = jnp.mean(cross_entropy(logits[:, : context - 1], c[:, 1:]))
    ce_chunk = jnp.mean(cross_entropy(logits[:, context + k :], x[:, 1:]))
    n_c, n_x = context - 1, chunk - 1
    loss = (n_c * ce_context + n_x * ce_chunk) / (n_c + n_x)
    return loss, {"ce_context": ce_context, "ce_chunk": ce_chunk}


def distance(a: Array, b: Array, eps: float = 1e-8) -> Array:
    """1 − cosine per gist slot, averaged over the slots: a, b [B, k, D] → [B]."""
    dot = jnp.sum(a * b, -1)
    norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return jnp.mean(1.0 - dot / jnp.maximum(norms, eps), -1)


@dataclasses.dataclass(frozen=True)
class Spec:
    """The gist-space self-loss; static (hashable) so that it can close over jit.

    Attributes:
      k: gist tokens per encoding.
      chunk: the window's last `chunk` tokens are the continuation that is encoded.
      path: how the model's continuation enters the encoder (`PATHS`).
      target: what it is compared with (`TARGETS`): 'observed' E(x) (plan 2) or
        'output_and_observed' E(x̂ ⊕ x) (plan 3).
    """

    k: int = 4
    chunk: int = 16
    path: str = "soft"
    target: str = "observed"

    def __post_init__(self):
        gist_ids(self.k)
        for name, allowed in (("path", PATHS), ("target", TARGETS)):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"Unknown {name} {getattr(self, name)!r}; choose one of {allowed}."
                )
        if self.chunk < 1:
            raise ValueError(f"chunk must be ≥ 1 (the tokens encoded); got {self.chunk}.")


def gist_self_loss(
    params: Params,
    model_state: dict,
    encoder: Params,
    tokens: Array,
    key: PRNGKey,
    *,
    model: Transformer,
    spec: Spec,
) -> tuple[Array, tuple[dict, dict[str, Array]]]:
    """The gist-space objective of θ = `params` on windows [B, T + 1]; the heart's
    `inner_loss` with the encoder's parameters as φ.

    θ predicts every next token of the window; its predictions of the last `spec.chunk`
    tokens are x̂, the observed tokens x. The per-sequence loss is `distance` between
    E(x̂) and E(x) (or E(x̂ ⊕ x)), E the encoder. With path 'score_function' x̂ is
    sampled and the objective is the REINFORCE surrogate (its value is the distance's
    mean, its gradient (d − mean d) ∇ log p(x̂)); the encoder never sees a gradient path
    to θ then, only through the weights (the tokens are sampled).

    Returns:
      `(objective, (model_state, metrics))` with `pred_loss` (the mean distance),
      `train_ce` (the true cross-entropy, a diagnostic), `per_seq_distance` and
      `per_seq_ce` [B] and `rank_corr` (their Spearman correlation over the batch).
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if spec.chunk > targets.shape[1]:
        raise ValueError(
            f"spec.chunk ({spec.chunk}) exceeds the {targets.shape[1]} predicted tokens of a "
            "window: make the chunk shorter or the context longer."
        )
    logits, _ = model.apply({"params": params}, inputs)
    tail = logits[:, -spec.chunk :]
    observed = targets[:, -spec.chunk :]
    soft = jax.nn.softmax(tail)
    if spec.path == "soft":
        output = soft
    elif spec.path == "straight_through":
        output = _one_hot(jnp.argmax(tail, -1), soft) + soft - jax.lax.stop_gradient(soft)
    else:
        sample = jax.random.categorical(key, tail)
        output = jax.lax.stop_gradient(_one_hot(sample, soft))
    observed_in = _one_hot(observed, soft)
    if spec.target == "observed":
        reference = encode(model, encoder, observed, spec.k)
    else:
        reference = encode(model, encoder, jnp.concatenate([output, observed_in], 1), spec.k)
    d = distance(encode(model, encoder, output, spec.k), reference)
    objective = jnp.mean(d)
    if spec.path == "score_function":
        logp = jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(tail), sample[..., None], -1), (1, 2))
        advantage = jax.lax.stop_gradient(d - jnp.mean(d))
        surrogate = jnp.mean(advantage * logp)
        objective = jax.lax.stop_gradient(objective) + surrogate - jax.lax.stop_gradient(surrogate)
    ce = jax.lax.stop_gradient(cross_entropy(logits, targets))
    d_sg = jax.lax.stop_gradient(d)
    metrics = {
        "pred_loss": jax.lax.stop_gradient(jnp.mean(d)),
        "train_ce": jnp.mean(ce),
        "per_seq_distance": d_sg,
        "per_seq_ce": ce,
        "rank_corr": spearman(d_sg, ce, jnp.ones(d.shape, bool)),
    }
    return objective, (model_state, metrics)


def collapse(gists: Array) -> dict[str, Array]:
    """How far the gists of different chunks have collapsed onto each other.

    Args:
      gists: encodings [N, k, D] of N chunks.

    Returns:
      `gist/mean_cosine`: the mean cosine between the gists of two different chunks (per
      slot, averaged over the slots; 1 when every chunk has the same gist);
      `gist/effective_rank`: exp of the entropy of the normalised singular values of the
      centred [N, k·D] matrix (Roy & Vetterli), between 1 (one direction) and min(N, k·D).
    """
    n = gists.shape[0]
    unit = gists / jnp.maximum(jnp.linalg.norm(gists, axis=-1, keepdims=True), 1e-8)
    cos = jnp.einsum("akd,bkd->kab", unit, unit)  # [k, N, N]
    off = (jnp.sum(cos, (1, 2)) - jnp.trace(cos, axis1=1, axis2=2)) / (n * (n - 1))
    flat = gists.reshape(n, -1)
    s = jnp.linalg.svd(flat - jnp.mean(flat, 0, keepdims=True), compute_uv=False)
    p = s / jnp.maximum(jnp.sum(s), 1e-12)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return {"gist/mean_cosine": jnp.mean(off), "gist/effective_rank": jnp.exp(entropy)}
