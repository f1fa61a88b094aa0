"""Hand-designed task losses, all `(y, y_hat) -> scalar` means over the batch."""

import jax.numpy as jnp
import optax

from metalearn.types import Array


def mse(y: Array, y_hat: Array) -> Array:
    """Mean squared error over every element. y, y_hat: same shape."""
    return jnp.mean((y_hat - y) ** 2)


def softmax_cross_entropy(labels: Array, logits: Array) -> Array:
    """Mean cross-entropy. labels: int [B] class indices; logits: [B, C]."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
