"""Hand-designed task losses: `(y, y_hat) -> scalar` means over the batch, and the
REINFORCE surrogate of policy-gradient learning.

The argument order is metalearn's one order for every loss, learned or not: targets
first, then predictions, `loss(y, y_hat)`, as the papers write ℓ_φ(y, ŷ) and as a saved
learned loss describes itself. It is the reverse of optax's (predictions, targets):
call these by keyword (`mse(y=..., y_hat=...)`) where that is clearer. A swapped call is
refused where the shapes or dtypes show it.
"""

import jax
import jax.numpy as jnp
import optax

from metalearn.types import Array


def mse(y: Array, y_hat: Array) -> Array:
    """Mean squared error over every element. y, y_hat: same shape (no broadcasting:
    [B, 1] against [B] would silently average a [B, B] matrix)."""
    if jnp.shape(y) != jnp.shape(y_hat):
        raise ValueError(
            f"mse(y, y_hat) takes targets and predictions of the same shape; got "
            f"{jnp.shape(y)} and {jnp.shape(y_hat)}: reshape one (e.g. y[:, None])."
        )
    return jnp.mean((y_hat - y) ** 2)


def softmax_cross_entropy(labels: Array, logits: Array) -> Array:
    """Mean cross-entropy. labels: int [B] class indices; logits: [B, C] (targets first,
    as every metalearn loss; optax's functions take the logits first)."""
    labels, logits = jnp.asarray(labels), jnp.asarray(logits)
    if jnp.issubdtype(logits.dtype, jnp.integer) and jnp.issubdtype(labels.dtype, jnp.floating):
        raise ValueError(
            f"softmax_cross_entropy(labels, logits) takes the integer labels first; got float "
            f"{labels.shape} then integer {logits.shape}: the arguments look swapped "
            "(optax's order is (logits, labels), metalearn's (labels, logits))."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"softmax_cross_entropy(labels, logits) takes integer class indices [B] and "
            f"logits [B, C]; got {labels.dtype} {labels.shape} and {logits.shape}. For one-hot "
            "or soft labels use optax.softmax_cross_entropy(logits, labels)."
        )
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def reinforce(log_probs: Array, returns: Array, *, baseline: bool = True) -> Array:
    """The REINFORCE surrogate −mean_i[(R_i − b) Σ_t log π(a_it | s_it)] (ML³ Eq. 7-8).

    Its gradient in the policy's parameters is the score-function estimate of −∇E[R]
    from episodes sampled by the policy (their data held fixed).

    Args:
      log_probs: [N, T] log π(a_t | s_t) of N episodes' actions under the policy.
      returns: [N] the episodes' returns R_i (constants: their gradient is stopped).
      baseline: subtract the batch mean b of the returns (b = 0 otherwise).
    """
    if log_probs.ndim != 2 or returns.shape != log_probs.shape[:1]:
        raise ValueError(
            f"reinforce needs log_probs [N, T] and returns [N]; got {log_probs.shape} and "
            f"{returns.shape}."
        )
    returns = jnp.asarray(returns)
    advantage = returns - jnp.mean(returns) if baseline else returns
    advantage = jax.lax.stop_gradient(advantage)
    return -jnp.mean(advantage * jnp.sum(log_probs, axis=1))
