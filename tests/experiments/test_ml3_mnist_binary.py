"""ML³ binary MNIST: the config's seeds, per-seed task samples, bad configs, resumption."""

import jax
import numpy as np
import pytest

import experiments
from configs import ml3_mnist_binary
from metalearn.runtime.loop import train_and_evaluate
from metalearn.tasks.digit_pairs import task_pairs


def _tiny(seeds):
    """The smoke config on synthetic pixels with the smallest task samples."""
    c = ml3_mnist_binary.get_config("smoke")
    c.seeds = seeds
    c.data.source = "synthetic"
    c.data.examples_per_task = c.data.heldout_examples = c.data.test_examples_per_task = 8
    c.inner.batch_size = c.meta.batch_size = 4
    return c


def test_the_default_seeds_meta_train_on_distinct_digit_pairs():
    seeds = ml3_mnist_binary.get_config().seeds
    assert len({frozenset(task_pairs(s)[0].tolist()) for s in seeds}) == len(seeds)


@pytest.mark.slow  # 6 s of compilation (the default tier was at 5 min)
def test_each_seed_meta_trains_on_its_own_task_samples():
    # Other task samples for the first seed only: its φ moves elsewhere and the second
    # seed's φ stays bit for bit, so each episode reads its own slice of the [S, ...]
    # samples (chunk_inputs), neither another seed's nor all of them.
    experiment = experiments.make(_tiny((3, 0)))
    state = experiment.init()
    phi = experiment.train_chunk(state, 0, 1)[0].params
    data = experiment.data
    experiment.data = {
        **data,
        "train_x": data["train_x"].at[0].set(255 - data["train_x"][0]),
        "heldout_y": data["heldout_y"].at[0].set(1 - data["heldout_y"][0]),
    }
    other = experiment.train_chunk(state, 0, 1)[0].params
    for a, b, start in zip(
        jax.tree.leaves(phi), jax.tree.leaves(other), jax.tree.leaves(state.params), strict=True
    ):
        np.testing.assert_array_equal(a[1], b[1])
        assert not np.array_equal(a[0], start[0])  # the meta step moved φ ...
        assert not np.array_equal(a[0], b[0])  # ... and where to depends on the samples


def test_class_selections_and_traces_that_do_not_divide_the_steps_are_rejected():
    config = _tiny((0,))
    config.data.classes = (0, 1)
    with pytest.raises(ValueError, match="data.classes must be"):
        experiments.make(config)
    config = _tiny((0,))
    config.eval.trace_every = 3
    with pytest.raises(ValueError, match="must be a multiple of eval.trace_every"):
        experiments.make(config)


@pytest.mark.slow
def test_resume_gives_the_same_summary_as_an_uninterrupted_run(tmp_path):
    # The smoke config (real MNIST): the cross-entropy traces cached by the first process
    # and the task samples must come out the same after a restart, in a fresh experiment
    # (the stopped run shares the uninterrupted one's programs: no restart between them).
    config = ml3_mnist_binary.get_config("smoke")
    first = experiments.make(config)
    full = train_and_evaluate(first, config, str(tmp_path / "full"))
    cut = str(tmp_path / "cut")
    stop = config.checkpoint_every
    assert train_and_evaluate(first, config, cut, stop_at=stop) is None
    assert train_and_evaluate(experiments.make(config), config, cut) == full
    assert full["task_pairs"] == [task_pairs(s).tolist() for s in config.seeds]
