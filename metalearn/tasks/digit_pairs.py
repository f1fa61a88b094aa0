"""Binary digit-pair tasks of the ML³ paper (Fig. 2, bottom row) from a ten-class dataset.

A seed partitions the ten digits into five pairs (`task_pairs`): the first pair is the
meta-train task, the other four the meta-test tasks, each a binary problem with label 1
for the pair's second digit. Every task holds a fixed, class-balanced sample of training
and test images (`sample_tasks`), so the samples of many seeds stack into arrays
[S, ...] that run at once under vmap; `sample_batches` draws mini-batches from one
sample on device.
"""

import jax
import numpy as np

from metalearn import streams
from metalearn.tasks.images import ImageData
from metalearn.types import Array, Batch, PRNGKey

NUM_DIGITS = 10
NUM_PAIRS = NUM_DIGITS // 2  # 1 meta-train task + 4 meta-test tasks


def task_pairs(seed: int) -> np.ndarray:
    """The digit pairs of one seed: a random partition of 0…9 into 5 pairs.

    Returns:
      int [5, 2]; row 0 is the meta-train task, rows 1…4 the meta-test tasks. Within a
      row, the first digit gets label 0 and the second label 1.
    """
    return (
        np.random.default_rng([seed, streams.DigitPairs.PAIRS])
        .permutation(NUM_DIGITS)
        .reshape(NUM_PAIRS, 2)
    )


def _balanced_indices(
    labels: np.ndarray, pair: np.ndarray, n: int, rng: np.random.Generator, exclude=()
) -> np.ndarray:
    """n indices of examples of the two digits of `pair`, n // 2 of each, none in `exclude`."""
    if n % 2:
        raise ValueError(f"Per-task sample sizes must be even (balanced classes); got {n}.")
    chosen = []
    for digit in pair:
        pool = np.setdiff1d(np.flatnonzero(labels == digit), exclude)
        if len(pool) < n // 2:
            raise ValueError(
                f"Digit {digit} has only {len(pool)} unused examples, fewer than the {n // 2} "
                "asked for; lower the per-task sample sizes or raise data.max_*_examples."
            )
        chosen.append(rng.choice(pool, n // 2, replace=False))
    return rng.permutation(np.concatenate(chosen))


def sample_tasks(
    data: ImageData,
    seed: int,
    *,
    examples_per_task: int,
    heldout_examples: int,
    test_examples_per_task: int,
) -> dict[str, np.ndarray]:
    """The fixed task samples of one seed, as numpy arrays.

    Args:
      data: the full ten-class dataset (its validation split is not used).
      seed: chooses the pairs (`task_pairs`) and the examples.
      examples_per_task: N, training images of each task (even: half per digit).
      heldout_examples: H', training images of the meta-train task disjoint from its
        sample (the meta objective's data).
      test_examples_per_task: M, test images of each task, from the test split.

    Returns:
      {'train_x': uint8 [5, N, H, W, C], 'train_y': int32 [5, N], 'heldout_x': [H', ...],
      'heldout_y': [H'], 'test_x': [5, M, ...], 'test_y': [5, M]}; labels in {0, 1}.

    Raises:
      ValueError: a sample size is odd or a digit has too few (unused) examples.
    """
    pairs = task_pairs(seed)
    rng = np.random.default_rng([seed, streams.DigitPairs.EXAMPLES])
    labels = lambda y, idx, pair: (y[idx] == pair[1]).astype(np.int32)  # noqa: E731
    train = [_balanced_indices(data.train_labels, p, examples_per_task, rng) for p in pairs]
    test = [_balanced_indices(data.test_labels, p, test_examples_per_task, rng) for p in pairs]
    held = _balanced_indices(data.train_labels, pairs[0], heldout_examples, rng, exclude=train[0])
    return {
        "train_x": np.stack([data.train_images[i] for i in train]),
        "train_y": np.stack(
            [labels(data.train_labels, i, p) for i, p in zip(train, pairs, strict=True)]
        ),
        "heldout_x": data.train_images[held],
        "heldout_y": labels(data.train_labels, held, pairs[0]),
        "test_x": np.stack([data.test_images[i] for i in test]),
        "test_y": np.stack(
            [labels(data.test_labels, i, p) for i, p in zip(test, pairs, strict=True)]
        ),
    }


def sample_batches(key: PRNGKey, x: Array, y: Array, num: int, batch_size: int) -> Batch:
    """`num` mini-batches of `batch_size` examples, each drawn without replacement.

    Args:
      key: PRNG key (one split per batch).
      x: examples [N, ...].
      y: labels [N].
      num: number of batches.
      batch_size: examples per batch (at most N).

    Returns:
      {'x': [num, batch_size, ...], 'y': [num, batch_size]}.
    """
    idx = jax.vmap(lambda k: jax.random.choice(k, y.shape[0], (batch_size,), replace=False))(
        jax.random.split(key, num)
    )
    return {"x": x[idx], "y": y[idx]}
