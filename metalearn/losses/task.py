"""Hand-designed task losses: `(y, y_hat) -> scalar` means over the batch, and the
REINFORCE surrogate of policy-gradient learning."""

import jax
import jax.numpy as jnp
import optax

from metalearn.types import Array


def mse(y: Array, y_hat: Array) -> Array:
    """Mean squared error over every element. y, y_hat: same shape."""
    return jnp.mean((y_hat - y) ** 2)


def softmax_cross_entropy(labels: Array, logits: Array) -> Array:
    """Mean cross-entropy. labels: int [B] class indices; logits: [B, C]."""
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
