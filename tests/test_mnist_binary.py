"""ML³ binary MNIST: the task split per seed, the task samples, and resumption."""

import numpy as np
import pytest

from configs import ml3_mnist_binary
from metalearn import algorithms
from metalearn.algorithms.ml3_mnist_binary import sample_tasks, task_pairs
from metalearn.runtime.loop import train_and_evaluate
from metalearn.tasks.images import DATASETS, ImageData


def test_each_seed_partitions_the_digits_into_five_pairs():
    for seed in range(10):
        pairs = task_pairs(seed)
        assert pairs.shape == (5, 2)
        np.testing.assert_array_equal(np.sort(pairs.ravel()), np.arange(10))
    meta_train = {frozenset(task_pairs(s)[0].tolist()) for s in ml3_mnist_binary.get_config().seeds}
    assert len(meta_train) == len(ml3_mnist_binary.get_config().seeds)


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
    config = ml3_mnist_binary.get_config().data
    config.examples_per_task, config.heldout_examples, config.test_examples_per_task = 20, 40, 8
    out = sample_tasks(data, 3, config)
    pairs = task_pairs(3)
    assert out["train_x"].shape == (5, 20, 28, 28, 1) and out["test_y"].shape == (5, 8)
    for split, labels in (("train", train[1]), ("test", test[1])):
        digits = labels[_index(out[f"{split}_x"])]  # [5, N]
        np.testing.assert_array_equal(digits, pairs[np.arange(5)[:, None], out[f"{split}_y"]])
        assert (out[f"{split}_y"].sum(1) * 2 == out[f"{split}_y"].shape[1]).all()
    assert not set(_index(out["heldout_x"])) & set(_index(out["train_x"][0]))
    np.testing.assert_array_equal(train[1][_index(out["heldout_x"])], pairs[0][out["heldout_y"]])
    config.heldout_examples = 62  # 31 of each digit, but only 40 − 10 are unused
    with pytest.raises(ValueError, match="fewer than the 31"):
        sample_tasks(data, 3, config)


def test_resume_gives_the_same_summary_as_an_uninterrupted_run(tmp_path):
    # The smoke config, so that the programs compiled here are those of the end-to-end
    # smoke test (tests share a compilation cache).
    config = ml3_mnist_binary.get_config("smoke")
    full = train_and_evaluate(algorithms.make(config), config, str(tmp_path / "full"))
    cut = str(tmp_path / "cut")
    stop = config.checkpoint_every
    assert train_and_evaluate(algorithms.make(config), config, cut, stop_at=stop) is None
    assert train_and_evaluate(algorithms.make(config), config, cut) == full
    assert full["task_pairs"] == [task_pairs(s).tolist() for s in config.seeds]
