"""The ring buffer of transitions."""

import jax.numpy as jnp
import numpy as np
import pytest

from metalearn.tasks import replay


def _column(*values):
    return jnp.asarray(values, jnp.float32)[:, None]


def test_replay_buffer_ring_wraps_around_and_counts_valid_rows():
    buffer = replay.buffer_init(5, 1, 1)
    assert int(buffer.count) == 0
    buffer = replay.buffer_add(buffer, _column(1, 2, 3), _column(1, 2, 3), _column(1, 2, 3))
    assert int(buffer.ptr) == 3 and int(buffer.count) == 3
    four = _column(4, 5, 6, 7)
    buffer = replay.buffer_add(buffer, four, -four, 10 * four)
    assert int(buffer.ptr) == 2 and int(buffer.count) == 5
    np.testing.assert_array_equal(buffer.states[:, 0], [6, 7, 3, 4, 5])
    np.testing.assert_array_equal(buffer.actions[:, 0], [-6, -7, 3, -4, -5])
    np.testing.assert_array_equal(buffer.next_states[:, 0], [60, 70, 3, 40, 50])


def test_replay_buffer_rejects_more_transitions_than_its_capacity():
    with pytest.raises(ValueError, match="capacity 5"):
        replay.buffer_add(replay.buffer_init(5, 1, 1), *(jnp.zeros((6, 1)),) * 3)
