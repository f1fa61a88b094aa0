"""A learned inertia matrix M_θ(q), positive definite by construction (Deep Lagrangian Networks).

Lutter et al. (2019) parametrise the inertia matrix of a rigid-body system by its Cholesky
factor: an MLP of the joint angles outputs the entries of a lower-triangular L(q) whose
diagonal goes through a softplus (plus a small ε), so M(q) = L(q)L(q)ᵀ + εI is symmetric
positive definite for every input and every θ. The inverse-dynamics model of ML³'s
physics-prior experiment (Bechtle et al., Sec. IV-B 2) keeps the analytical bias forces
F(q, q̇) and learns only the inertia:

    û = M_θ(q) q̈ + F(q, q̇).

Revolute joints enter through (cos q, sin q), so M_θ is 2π-periodic in every angle like
the true M(q).
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from metalearn.models.mlp import MLP
from metalearn.types import Array


def cholesky_to_inertia(entries: Array, num_joints: int, eps: float) -> Array:
    """M = L Lᵀ + εI from the n(n+1)/2 free entries of L.

    Args:
      entries: [..., n(n+1)/2]: the first n are the raw diagonal (through softplus + ε),
        the rest the strictly lower triangle in row-major order.
      num_joints: n.
      eps: the floor on L's diagonal and on M's eigenvalues.

    Returns:
      M [..., n, n], symmetric positive definite.
    """
    n = num_joints
    if entries.shape[-1] != n * (n + 1) // 2:
        raise ValueError(
            f"{n} joints need {n * (n + 1) // 2} Cholesky entries; got {entries.shape[-1]}."
        )
    diag = jax.nn.softplus(entries[..., :n]) + eps
    # L's entries placed by a constant 0/1 matrix: a matmul, cheap to compile and to
    # differentiate twice, where a scatter is neither.
    rows, cols = np.tril_indices(n, k=-1)
    place = np.zeros((n * (n + 1) // 2, n * n), np.float32)
    place[np.arange(n), np.arange(n) * (n + 1)] = 1.0
    place[n + np.arange(rows.size), rows * n + cols] = 1.0
    values = jnp.concatenate([diag, entries[..., n:]], axis=-1)
    lower = (values @ jnp.asarray(place, entries.dtype)).reshape(*entries.shape[:-1], n, n)
    eye = jnp.eye(n, dtype=entries.dtype).reshape((1,) * (entries.ndim - 1) + (n, n))
    return lower @ jnp.swapaxes(lower, -1, -2) + eps * eye


class InertiaNet(nn.Module):
    """q [..., n] -> M̃_θ(q) [..., n, n] = L Lᵀ + εI (DeLaN).

    Attributes:
      num_joints: n.
      hidden: widths of the MLP's hidden layers.
      activation: hidden activation name (see `metalearn.models.mlp.activation`).
      eps: floor on L's diagonal and on M's eigenvalues.
    """

    num_joints: int
    hidden: Sequence[int] = (64, 64)
    activation: str = "softplus"
    eps: float = 1e-3

    @nn.compact
    def __call__(self, q: Array) -> Array:
        n = self.num_joints
        features = jnp.concatenate([jnp.cos(q), jnp.sin(q)], axis=-1)
        hidden = MLP(self.hidden, activation=self.activation, output_activation=self.activation)
        # A small output layer starts M̃ near softplus(0)²·I, a well-conditioned guess,
        # instead of a random matrix with eigenvalues spread over orders of magnitude.
        entries = nn.Dense(
            n * (n + 1) // 2,
            kernel_init=nn.initializers.variance_scaling(0.1, "fan_in", "normal"),
        )(hidden(features))
        return cholesky_to_inertia(entries, n, self.eps)


def predicted_torque(inertia: Array, bias: Array, qdd: Array) -> Array:
    """û = M q̈ + F for a batch.

    Args:
      inertia: M [B, n, n] (learned or true).
      bias: F(q, q̇) [B, n].
      qdd: q̈ [B, n].

    Returns:
      Torques [B, n].
    """
    return jnp.einsum("bij,bj->bi", inertia, qdd) + bias
