"""Digit-pair tasks: the pairs of a seed, the balanced task samples, the mini-batches."""

import jax
import numpy as np
import pytest

from metalearn.tasks.digit_pairs import sample_batches, sample_tasks, task_pairs
from metalearn.tasks.images import DATASETS, ImageData


def test_each_seed_partitions_the_digits_into_five_pairs():
    for seed in range(10):
        pairs = task_pairs(seed)
        assert pairs.shape == (5, 2)
        np.testing.assert_array_equal(np.sort(pairs.ravel()), np.arange(10))
    assert len({frozenset(task_pairs(s)[0].tolist()) for s in range(10)}) > 1


def _indexed_digits(n_per_digit: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose first two pixels encode their index; labels 0…9 cycling."""
    n = 10 * n_per_digit
    images = np.zeros((n, 28, 28, 1), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 1, 0] = np.arange(n) % 256, np.arange(n) // 256
    return images, np.arange(n, dtype=np.int32) % 10


def _index(images: np.ndarray) -> np.ndarray:
    return images[..., 0, 0, 0].astype(int) + 256 * images[..., 0, 1, 0].astype(int)


def test_task_samples_are_balanced_labelled_by_pair_and_the_heldout_set_is_disjoint():
    train, test = _indexed_digits(40), _indexed_digits(10)
    data = ImageData(DATASETS["mnist"], *train, train[0][:0], train[1][:0], *test)
    sizes = {"examples_per_task": 20, "heldout_examples": 40, "test_examples_per_task": 8}
    out = sample_tasks(data, 3, **sizes)
    pairs = task_pairs(3)
    assert out["train_x"].shape == (5, 20, 28, 28, 1) and out["test_y"].shape == (5, 8)
    for split, labels in (("train", train[1]), ("test", test[1])):
        digits = labels[_index(out[f"{split}_x"])]  # [5, N]
        np.testing.assert_array_equal(digits, pairs[np.arange(5)[:, None], out[f"{split}_y"]])
        assert (out[f"{split}_y"].sum(1) * 2 == out[f"{split}_y"].shape[1]).all()
    assert not set(_index(out["heldout_x"])) & set(_index(out["train_x"][0]))
    np.testing.assert_array_equal(train[1][_index(out["heldout_x"])], pairs[0][out["heldout_y"]])
    with pytest.raises(ValueError, match="fewer than the 31"):  # only 40 − 10 are unused
        sample_tasks(data, 3, **{**sizes, "heldout_examples": 62})
    with pytest.raises(ValueError, match="must be even"):
        sample_tasks(data, 3, **{**sizes, "test_examples_per_task": 7})


def test_mini_batches_are_drawn_without_replacement_and_keep_examples_with_labels():
    x, y = np.arange(10.0)[:, None] * 10, np.arange(10)
    out = sample_batches(jax.random.key(0), x, y, 6, 10)
    assert out["x"].shape == (6, 10, 1) and out["y"].shape == (6, 10)
    np.testing.assert_array_equal(out["x"][..., 0], 10 * out["y"])
    assert all(sorted(b.tolist()) == list(range(10)) for b in out["y"])  # each a permutation
    assert len({tuple(b.tolist()) for b in out["y"]}) > 1  # and a different one per batch
