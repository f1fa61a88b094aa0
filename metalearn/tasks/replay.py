"""A fixed-size ring buffer of transitions (s, a, s′), as a pytree of arrays.

The buffer lives inside a jitted experiment state: its shapes never change, `count` says
how many rows hold data, and new transitions overwrite the oldest once it is full. Model-
based RL (`experiments/ml3_mbrl.py`) fits its dynamics model on it.
"""

import functools

import flax
import jax.numpy as jnp

from metalearn.types import Array


@flax.struct.dataclass
class ReplayBuffer:
    """A fixed-size ring buffer of transitions (s, a, s'); `count` of the rows are valid."""

    states: Array  # [C, S]
    actions: Array  # [C, A]
    next_states: Array  # [C, S]
    ptr: Array  # next row to write
    count: Array  # valid rows, at most C


def buffer_init(capacity: int, state_dim: int, action_dim: int) -> ReplayBuffer:
    """An empty buffer of `capacity` transitions (float32 rows)."""
    zeros = functools.partial(jnp.zeros, dtype=jnp.float32)
    return ReplayBuffer(
        zeros((capacity, state_dim)),
        zeros((capacity, action_dim)),
        zeros((capacity, state_dim)),
        jnp.zeros((), jnp.int32),
        jnp.zeros((), jnp.int32),
    )


def buffer_add(
    buffer: ReplayBuffer, states: Array, actions: Array, next_states: Array
) -> ReplayBuffer:
    """Writes n transitions at the ring pointer, overwriting the oldest rows once full.

    Args:
      buffer: the buffer.
      states, actions, next_states: [n, S], [n, A], [n, S]; n at most the capacity.

    Returns:
      The new buffer.
    """
    capacity, n = buffer.states.shape[0], states.shape[0]
    if n > capacity:
        raise ValueError(f"Adding {n} transitions to a buffer of capacity {capacity}.")
    rows = (buffer.ptr + jnp.arange(n)) % capacity
    return ReplayBuffer(
        buffer.states.at[rows].set(states.astype(buffer.states.dtype)),
        buffer.actions.at[rows].set(actions.astype(buffer.actions.dtype)),
        buffer.next_states.at[rows].set(next_states.astype(buffer.next_states.dtype)),
        (buffer.ptr + n) % capacity,
        jnp.minimum(buffer.count + n, capacity),
    )
