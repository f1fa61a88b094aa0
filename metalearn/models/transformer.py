"""A decoder-only, pre-norm transformer that is both a language model and a loss predictor.

One network, two output stacks over a shared trunk:

    tokens ──embed──▶ trunk blocks ─┬─▶ lm blocks ─▶ norm ─▶ unembed ─▶ next-token logits
                                    └─▶ loss blocks ─▶ norm ─▶ readout ─▶ per-position score

With `loss_layers = 0` (the document's single homogeneous model) there are no loss
blocks: the loss pass runs through the very same blocks as the language model, and the
score is read either as the mean of the output logits (`readout = "mean"`) or by a
separate linear head (`readout = "head"`). With `loss_layers = k > 0` the top k blocks
are disjoint ("disjoint upper layers"): the language model and the critic each have k
blocks of their own over `num_layers − k` shared ones. `param_groups` labels every
parameter `trunk`, `lm` or `loss`, which is how training routes each loop's gradient.

Inputs are token ids [B, T] or distributions over the vocabulary [B, T, V] (soft
tokens: the embedding is the probability-weighted mean of the token embeddings, so a
score is differentiable with respect to the predictions that produced it).

A third stack, `critic` (models built with `observe` 'gain' or 'embed'), is the targets
critic that reads the observed continuation: the language model's next-token logits at
position i plus a learned gain g on the logit of the observed next token y_{i+1} (its
trust in the observation, in nats); with 'embed' also learned embeddings of y_{i+1} and
of a prediction of it (a distribution over the vocabulary) added to the final hidden
state before the unembedding, so that the targets can move mass to any token. All start
at zero, so an untrained critic's targets are its own next-token distribution.

A pass may continue a cached prefix: the language-model pass returns every block's keys
and values, and a loss pass over `prediction ⊕ [LOSS]` attends to them through a block
mask (the new tokens see the whole prefix and each other causally) instead of
recomputing the prefix: the same numbers as one forward over `input ⊕ prediction ⊕
[LOSS]`, at about half the cost.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from metalearn.tasks.text import VOCAB_SIZE
from metalearn.types import Array, Params

POSITIONS = ("rotary", "learned")
READOUTS = ("mean", "head")
GROUPS = ("trunk", "lm", "loss")
STACKS = ("lm", "loss", "critic")
OBSERVE = ("none", "gain", "embed")


def causal_mask(length: int, prefix: int = 0) -> Array:
    """bool [length, prefix + length]: query i sees the whole prefix and keys ≤ i after it."""
    causal = jnp.tril(jnp.ones((length, length), bool))
    return jnp.concatenate([jnp.ones((length, prefix), bool), causal], axis=1)


def rotary(x: Array, positions: Array, base: float = 10_000.0) -> Array:
    """Rotary position embedding of x [B, T, N, H] (H even) at integer positions [T]."""
    half = x.shape[-1] // 2
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    freqs = base ** (-jnp.arange(half, dtype=dtype) / half)
    angles = positions.astype(dtype)[:, None] * freqs[None, :]  # [T, H/2]
    sin = jnp.sin(angles)[None, :, None, :].astype(x.dtype)
    cos = jnp.cos(angles)[None, :, None, :].astype(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Softmax attention: q [B, Tq, N, H], k and v [B, Tk, N, H], mask bool [Tq, Tk] (or
    [B, Tq, Tk], one per sequence).

    The softmax runs in at least float32 and in float64 when the inputs are (which
    `jax.nn.dot_product_attention` does not do, and finite-difference tests need).
    """
    dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(dtype) / jnp.sqrt(q.shape[-1])
    mask = mask[None, None] if mask.ndim == 2 else mask[:, None]
    logits = jnp.where(mask, logits, jnp.finfo(dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknh->bqnh", weights, v)


class Block(nn.Module):
    """Pre-norm attention and MLP with residuals; returns its keys and values for caching."""

    num_heads: int
    mlp_ratio: int
    rotary: bool
    dtype: Any

    @nn.compact
    def __call__(
        self, h: Array, positions: Array, mask: Array, prefix: tuple[Array, Array] | None
    ) -> tuple[Array, tuple[Array, Array]]:
        d = h.shape[-1]
        if d % self.num_heads:
            raise ValueError(f"d_model ({d}) must be divisible by num_heads ({self.num_heads}).")
        head_dim = d // self.num_heads
        x = nn.LayerNorm(dtype=self.dtype, name="attn_norm")(h)
        qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype, name="qkv")(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.rotary:
            q, k = rotary(q, positions), rotary(k, positions)
        kv = (k, v)
        if prefix is not None:
            k = jnp.concatenate([prefix[0].astype(k.dtype), k], axis=1)
            v = jnp.concatenate([prefix[1].astype(v.dtype), v], axis=1)
        att = attention(q, k, v, mask)
        h = h + nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, name="attn_out")(att)
        x = nn.LayerNorm(dtype=self.dtype, name="mlp_norm")(h)
        x = nn.Dense(self.mlp_ratio * d, dtype=self.dtype, name="mlp_in")(x)
        x = nn.Dense(d, dtype=self.dtype, name="mlp_out")(nn.gelu(x))
        return h + x, kv


class Transformer(nn.Module):
    """The self-loss transformer; see the module docstring.

    Attributes:
      num_layers: blocks of the language model (trunk + lm blocks).
      loss_layers: disjoint top blocks (0: the loss pass shares every block).
      d_model, num_heads, mlp_ratio: block sizes.
      max_len: longest sequence (learned positions only; a loss pass over a context of T
        tokens is 2T + 1 long).
      positions: 'rotary' or 'learned'.
      readout: 'mean' (the mean of the output logits) or 'head' (a linear head).
      vocab_size: token count (bytes plus specials).
      dtype: computation dtype; parameters stay float32.
      observe: the `critic` stack (`OBSERVE`): 'none' (no critic stack), 'gain' (the
        observed token's gain, parameter `loss_gain`) or 'embed' (also the embeddings of
        the observed token and of the prediction, `loss_observed` and `loss_prediction`).
    """

    num_layers: int
    loss_layers: int
    d_model: int
    num_heads: int
    mlp_ratio: int
    max_len: int
    positions: str
    readout: str
    vocab_size: int = VOCAB_SIZE
    dtype: Any = jnp.float32
    observe: str = "none"

    def setup(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"Unknown positions {self.positions!r}; choose one of {POSITIONS}.")
        if self.readout not in READOUTS:
            raise ValueError(f"Unknown readout {self.readout!r}; choose one of {READOUTS}.")
        if not 0 <= self.loss_layers < self.num_layers:
            raise ValueError(
                f"loss_layers ({self.loss_layers}) must be in [0, num_layers = "
                f"{self.num_layers}): the trunk needs at least one shared block."
            )
        block = lambda name: Block(  # noqa: E731
            self.num_heads, self.mlp_ratio, self.positions == "rotary", self.dtype, name=name
        )
        init = nn.initializers.normal(0.02)
        self.embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=init, name="embed")
        if self.positions == "learned":
            self.pos_embed = nn.Embed(self.max_len, self.d_model, embedding_init=init)
        trunk = self.num_layers - self.loss_layers
        self.trunk = [block(f"trunk_{i}") for i in range(trunk)]
        self.lm = [block(f"lm_{i}") for i in range(self.loss_layers)]
        self.lm_norm = nn.LayerNorm(dtype=self.dtype)
        # Small output weights: the initial prediction is near uniform (CE ≈ log V).
        self.unembed = nn.Dense(self.vocab_size, dtype=self.dtype, kernel_init=init)
        if self.loss_layers:
            self.loss = [block(f"loss_{i}") for i in range(self.loss_layers)]
            self.loss_norm = nn.LayerNorm(dtype=self.dtype)
        if self.readout == "head":
            self.loss_head = nn.Dense(1, dtype=self.dtype)
        elif self.loss_layers:  # the "mean" readout of a disjoint critic needs its own logits
            self.loss_unembed = nn.Dense(self.vocab_size, dtype=self.dtype)
        if self.observe not in OBSERVE:
            raise ValueError(f"Unknown observe {self.observe!r}; choose one of {OBSERVE}.")
        zeros = nn.initializers.zeros
        if self.observe != "none":
            self.loss_gain = self.param("loss_gain", zeros, ())
        if self.observe == "embed":
            self.loss_observed = nn.Embed(self.vocab_size, self.d_model, embedding_init=zeros)
            self.loss_prediction = nn.Dense(
                self.d_model, use_bias=False, kernel_init=zeros, dtype=self.dtype
            )

    def __call__(
        self,
        inputs: Array,
        *,
        stack: str = "lm",
        cache: dict | None = None,
        observed: Array | None = None,
        prediction: Array | None = None,
        mask: Array | None = None,
    ) -> tuple[Array, dict]:
        """One pass.

        Args:
          inputs: int token ids [B, T] or float distributions [B, T, V].
          stack: 'lm' returns next-token logits [B, T, V]; 'loss' returns the critic's
            score at every position [B, T] (the caller reads the `[LOSS]` position);
            'critic' returns target logits [B, T, V] (needs `observe`).
          cache: a previous pass's cache; these T tokens then continue it at positions
            P … P + T − 1 (P the cached length).
          observed: stack 'critic': the observed next tokens [B, T] (int).
          prediction: stack 'critic': a prediction of them [B, T, V] (e.g. the model's
            softmax).
          mask: the attention mask, bool [T, T] or [B, T, T] (query, key), instead of the
            causal one: e.g. `metalearn.algorithms.gist.gist_mask`. Not with `cache`, and
            not for disjoint loss blocks (they read the trunk causally).

        Returns:
          `(output, cache)`: the cache holds every block's keys and values, the trunk's
          output, and for the 'lm' and 'critic' stacks the final normed hidden states
          `hidden` [B, T, D] (what a gist encoding reads), for a later pass to continue.
        """
        if stack not in STACKS:
            raise ValueError(f"Unknown stack {stack!r}; choose one of {STACKS}.")
        if stack == "critic" and self.observe == "none":
            raise ValueError(
                "stack='critic' reads an observed token (and a prediction): build the model "
                "with observe='gain' or 'embed' (make_transformer(..., observe='gain'))."
            )
        if stack == "critic" and (observed is None or prediction is None):
            raise ValueError("stack='critic' needs `observed` [B, T] and `prediction` [B, T, V].")
        if inputs.ndim == 2:
            h = self.embed(inputs)
        else:
            h = jnp.einsum("btv,vd->btd", inputs, self.embed.embedding.astype(inputs.dtype))
        h = h.astype(self.dtype)
        length = h.shape[1]
        prefix = 0 if cache is None else cache["trunk_out"].shape[1]
        positions = prefix + jnp.arange(length)
        if prefix + length > self.max_len:
            raise ValueError(
                f"A pass of {prefix + length} tokens exceeds max_len ({self.max_len}); a loss "
                "pass over a context of T tokens needs 2T + 1."
            )
        if self.positions == "learned":
            h = h + self.pos_embed(positions)[None].astype(self.dtype)
        given_mask = mask is not None
        if not given_mask:
            mask = causal_mask(length, prefix)
        elif cache is not None or mask.shape[-2:] != (length, length):
            raise ValueError(
                f"mask must be [{length}, {length}] or [B, {length}, {length}] for a pass of "
                f"{length} tokens without a cache; got shape {mask.shape}"
                + (" and a cache" if cache is not None else "")
                + "."
            )
        cached = lambda name, i: None if cache is None else cache[name][i]  # noqa: E731
        new = {"trunk": [], "lm": []}
        for i, blk in enumerate(self.trunk):
            h, kv = blk(h, positions, mask, cached("trunk", i))
            new["trunk"].append(kv)
        new["trunk_out"] = h if cache is None else jnp.concatenate([cache["trunk_out"], h], 1)
        if stack != "loss" or not self.loss_layers:
            for i, blk in enumerate(self.lm):
                h, kv = blk(h, positions, mask, cached("lm", i))
                new["lm"].append(kv)
            h = self.lm_norm(h)
            new["hidden"] = h
            if stack == "loss":
                return self._score(h, self.unembed), new
            if stack == "critic" and self.observe == "embed":
                h = h + self.loss_observed(observed).astype(self.dtype)
                h = h + self.loss_prediction(prediction.astype(self.dtype))
            if stack == "critic":
                logits = self.unembed(h).astype(self._out_dtype)
                gain = jax.nn.one_hot(observed, self.vocab_size, dtype=logits.dtype)
                return logits + self.loss_gain.astype(logits.dtype) * gain, new
            return self.unembed(h).astype(self._out_dtype), new
        if given_mask:
            raise ValueError("A mask is not taken by the disjoint loss blocks (stack='loss').")
        # Disjoint loss blocks never ran on a cached prefix: run them over the whole
        # sequence of trunk outputs and keep the new positions.
        h_all = new["trunk_out"]
        full = jnp.arange(h_all.shape[1])
        all_mask = causal_mask(h_all.shape[1])
        for blk in self.loss:
            h_all, _ = blk(h_all, full, all_mask, None)
        h = self.loss_norm(h_all[:, prefix:])
        return self._score(h, None if self.readout == "head" else self.loss_unembed), new

    def _score(self, h: Array, unembed: nn.Module | None) -> Array:
        if self.readout == "head":
            return self.loss_head(h)[..., 0].astype(self._out_dtype)
        return jnp.mean(unembed(h).astype(self._out_dtype), axis=-1)

    @property
    def _out_dtype(self):
        # Outputs in at least float32 (bfloat16 logits lose the loss's precision).
        return jnp.promote_types(self.dtype, jnp.float32)


def make_transformer(
    config: ml_collections.ConfigDict, context: int, *, observe: str = "none"
) -> Transformer:
    """The model a `model` config group describes, sized for a context of `context` tokens.

    Args:
      config: fields `num_layers`, `loss_layers`, `d_model`, `num_heads`, `mlp_ratio`,
        `positions`, `readout`, `dtype` ('float32' | 'bfloat16').
      context: the language model's context; passes up to 2·context + 2 long are allowed.
      observe: the model's `critic` stack, one of `OBSERVE` (see `Transformer`).
    """
    return Transformer(
        num_layers=config.num_layers,
        loss_layers=config.loss_layers,
        d_model=config.d_model,
        num_heads=config.num_heads,
        mlp_ratio=config.mlp_ratio,
        max_len=2 * context + 2,
        positions=config.positions,
        readout=config.readout,
        dtype=jnp.dtype(config.dtype),
        observe=observe,
    )


def init_transformer(model: Transformer, key: Array, context: int) -> Params:
    """Parameters of every group (the loss stack included) for a context of `context`."""
    tokens = jnp.zeros((1, context), jnp.int32)

    def both(module, x):
        module(x, stack="lm")
        if module.observe != "none":
            p = jnp.zeros((*x.shape, module.vocab_size), module.dtype)
            module(x, stack="critic", observed=x, prediction=p)
        return module(x, stack="loss")

    return model.init(key, tokens, method=both)["params"]


def param_groups(params: Params) -> Params:
    """A pytree like `params` with each leaf labelled 'trunk', 'lm' or 'loss'."""

    def group(name: str) -> str:
        if name.startswith(("lm_", "unembed")):
            return "lm"
        if name.startswith("loss"):
            return "loss"
        return "trunk"  # embed, pos_embed, trunk_*

    labels = {}
    for name, sub in params.items():
        label = group(name)
        labels[name] = jax.tree.map(lambda _, label=label: label, sub)
    return labels


def num_params(params: Params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


def generate(
    model: Transformer,
    params: Params,
    prompt: Array,
    steps: int,
    key: Array | None = None,
    *,
    temperature: float = 1.0,
    num_tokens: int | None = None,
) -> Array:
    """Continues `prompt` [B, T] by `steps` tokens; pure and jit-able (steps static).

    Each step reads the last T tokens (a sliding window of the prompt's length, the
    context the model was trained on) and takes the next token greedily (`key` None) or
    by sampling at `temperature`. `num_tokens` limits the choice to ids below it (e.g.
    `text.NUM_BYTES`: bytes only, no special tokens). Returns the new tokens [B, steps].
    """
    limit = model.vocab_size if num_tokens is None else num_tokens

    def step(window, k):
        logits, _ = model.apply({"params": params}, window)
        logits = logits[:, -1, :limit]
        if key is None:
            token = jnp.argmax(logits, -1)
        else:
            token = jax.random.categorical(k, logits / temperature)
        token = token.astype(window.dtype)
        return jnp.concatenate([window[:, 1:], token[:, None]], 1), token

    keys = jax.random.split(jax.random.key(0) if key is None else key, steps)
    _, tokens = jax.lax.scan(step, prompt, keys)
    return tokens.T
