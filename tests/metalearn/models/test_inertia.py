"""The Deep Lagrangian inertia network: M_θ(q) = L Lᵀ + εI, positive definite for any θ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.models.inertia import InertiaNet, cholesky_to_inertia


@pytest.mark.parametrize("num_joints", [2, 7])
def test_inertia_is_symmetric_positive_definite_for_any_theta(float64, fast_compile, num_joints):
    q = jax.random.uniform(jax.random.key(1), (16, num_joints), minval=-4.0, maxval=4.0)
    net = InertiaNet(num_joints, hidden=(16,), eps=1e-3)
    init, apply = jax.jit(net.init), jax.jit(net.apply)  # compiled once, not op by op
    for seed in range(3):
        params = init(jax.random.key(seed), q)
        # Large and negative weights too: the softplus diagonal must keep M definite.
        params = jax.tree.map(lambda x, s=seed: x * (1.0 + 10.0 * s) * (-1) ** s, params)
        inertia = apply(params, q)
        np.testing.assert_allclose(inertia, jnp.swapaxes(inertia, -1, -2), atol=1e-12)
        assert np.all(np.linalg.eigvalsh(np.asarray(inertia)) >= 1e-3 * (1 - 1e-6))


def test_cholesky_entries_land_in_the_lower_triangle():
    n = 3
    entries = jnp.asarray([[0.1, 0.2, 0.3, 4.0, 5.0, 6.0]])
    lower = np.diag(np.asarray(jax.nn.softplus(entries[0, :n])) + 0.01)
    lower[1, 0], lower[2, 0], lower[2, 1] = 4.0, 5.0, 6.0  # row-major strictly lower part
    np.testing.assert_allclose(
        cholesky_to_inertia(entries, n, 0.01)[0], lower @ lower.T + 0.01 * np.eye(n), rtol=1e-6
    )
