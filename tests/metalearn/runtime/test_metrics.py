"""`metrics.jsonl` and TensorBoard events as `MetricWriter` writes them, read back."""

import json

import numpy as np
import pytest

from metalearn.runtime.metrics import MetricWriter, read_metrics
from tests.events import read_scalars


def test_every_row_reaches_jsonl_and_tensorboard_with_the_per_seed_series(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write(0, {"loss": np.float32(2.0), "eval/mse": np.array([1.0, 3.0])})
    writer.write(5, {"loss": 1.5, "curve/loss": np.arange(3.0), "eval/mse": [0.5, 0.25]})
    writer.write(6, {})  # nothing to log: no row
    writer.close()

    assert read_metrics(str(tmp_path)) == [
        {"step": 0, "loss": 2.0, "eval/mse": [1.0, 3.0]},
        {"step": 5, "loss": 1.5, "curve/loss": [0.0, 1.0, 2.0], "eval/mse": [0.5, 0.25]},
    ]
    # A vector: its mean under the plain name, each entry under /seed_<i>; curves stay
    # out of TensorBoard.
    assert read_scalars(tmp_path) == {
        "loss": {0: 2.0, 5: 1.5},
        "eval/mse": {0: 2.0, 5: 0.375},
        "eval/mse/seed_0": {0: 1.0, 5: 0.5},
        "eval/mse/seed_1": {0: 3.0, 5: 0.25},
    }


def test_the_reader_sees_a_series_written_twice_at_one_step(tmp_path):
    writer = MetricWriter(str(tmp_path))
    writer.write(3, {"loss": 1.0})
    writer.write(3, {"loss": 2.0})
    writer.close()
    with pytest.raises(AssertionError, match="loss at step 3 twice in "):
        read_scalars(tmp_path)
    assert [json.dumps(r) for r in read_metrics(str(tmp_path))] == [
        '{"step": 3, "loss": 1.0}',
        '{"step": 3, "loss": 2.0}',
    ]
