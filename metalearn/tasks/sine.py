"""Sine tasks of the ML³ paper, sampled purely from a PRNG key.

- Sine regression: y = A·sin(x − φ) (amplitude A, phase φ); each task is a fixed set of
  points, as in the public ML³ code.
- Shaped sine: y = sin(ν·x) with frequency ν; the optimizee is sin(ω·x) and the extra
  meta-train information is ν itself.

Every sampler returns arrays with a leading task axis: x, y [T, N, 1] plus the task
parameters, so many tasks run at once under vmap.
"""

import jax
import jax.numpy as jnp

from metalearn.types import Array, PRNGKey


def _uniform(key: PRNGKey, shape: tuple[int, ...], bounds: tuple[float, float]) -> Array:
    lo, hi = bounds
    return jax.random.uniform(key, shape, minval=lo, maxval=hi)


def sample_sine_tasks(
    key: PRNGKey,
    num_tasks: int,
    num_points: int,
    amp_range: tuple[float, float],
    phase_range: tuple[float, float],
    x_range: tuple[float, float],
) -> dict[str, Array]:
    """Sine-regression tasks y = A·sin(x − φ).

    Returns:
      {'x': [T, N, 1], 'y': [T, N, 1], 'amp': [T], 'phase': [T]}.
    """
    k_amp, k_phase, k_x = jax.random.split(key, 3)
    amp = _uniform(k_amp, (num_tasks,), amp_range)
    phase = _uniform(k_phase, (num_tasks,), phase_range)
    x = _uniform(k_x, (num_tasks, num_points, 1), x_range)
    y = amp[:, None, None] * jnp.sin(x - phase[:, None, None])
    return {"x": x, "y": y, "amp": amp, "phase": phase}


def sample_frequency_tasks(
    key: PRNGKey,
    num_tasks: int,
    num_points: int,
    freq_range: tuple[float, float],
    x_range: tuple[float, float],
) -> dict[str, Array]:
    """Sine-frequency tasks y = sin(ν·x).

    Returns:
      {'x': [T, N, 1], 'y': [T, N, 1], 'freq': [T]}.
    """
    k_freq, k_x = jax.random.split(key)
    freq = _uniform(k_freq, (num_tasks,), freq_range)
    x = _uniform(k_x, (num_tasks, num_points, 1), x_range)
    return {"x": x, "y": jnp.sin(freq[:, None, None] * x), "freq": freq}
