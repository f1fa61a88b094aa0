"""ML³ binary digit classification (Bechtle et al., Fig. 2c/2d bottom row), 5 seeds in one program.

    python -m experiments.run --config=configs/ml3_mnist_binary.py --workdir=runs/ml3_mnist_binary
    python -m experiments.run --config=configs/ml3_mnist_binary.py:smoke   # under a minute

Protocol: each seed partitions the ten digits into five random pairs; the first pair is
the meta-train task, the other four are the meta-test tasks; every task is a fixed,
class-balanced sample (1,000 training and 250 test images; the meta-train task also 1,000
held-out training images). Optimizee LeNet-5 (2 logits); learned loss 2→40→40→1 (ReLU,
Softplus output), applied output-wise to the one-hot target and the softmax probability.
Inner SGD with lr 1e-3 (the paper's α), batch 16; outer Adam with lr 1e-3 (the paper's η;
Adam as in the public code). Each meta iteration is one episode of `inner.episode_length`
(here 1, as in the public code) SGD steps from a fresh θ on the meta-train task, with a
meta step on the cross-entropy at the new θ on a held-out batch of 32 after every
`meta.window` inner steps. Meta-test: 100 SGD steps from a fresh θ on each test pair,
learned loss vs cross-entropy from the same θ₀ and batches, test-set CE and accuracy
recorded every `eval.trace_every` steps.

Data: `data.data_dir` points at the project's prepared tfds folder; real users set it to
'' (then $TFDS_DATA_DIR or tfds's default folder is used) and `data.download=True`.

Runtime (2-core CPU shared with other jobs, all 5 seeds in one program): about 6 min
(400 meta iterations at ~2 it/s, about 1.5 min of compilation and the meta-test); the
smoke variant well under a minute, mostly compilation.
"""

import ml_collections

from configs._common import loss_net


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "ml3_mnist_binary"  # the module experiments/ml3_mnist_binary.py
    c.algorithm = "ml3"
    c.task = "mnist_binary"
    c.fast_compile = False  # most XLA optimisations off (smoke runs: compile-bound)
    c.seeds = (0, 1, 2, 3, 4)

    c.data = ml_collections.ConfigDict(
        {
            "name": "mnist",
            "source": "tfds",
            "data_dir": "../shared/data/tfds",  # '' = $TFDS_DATA_DIR or tfds's default
            "download": False,
            "train_files": (),
            "test_files": (),
            "validation_size": 0,
            "validation_seed": 0,
            "classes": (),  # must stay (): the pairs are drawn from each seed
            "max_train_examples": 0,
            "max_test_examples": 0,
            # Fixed per-task samples (balanced between the two digits), so seeds vmap.
            "examples_per_task": 1000,
            "heldout_examples": 1000,  # meta-train task only: the meta objective's data
            "test_examples_per_task": 250,
        }
    )
    c.model = ml_collections.ConfigDict({"name": "lenet5"})
    c.loss_net = loss_net()
    c.inner = ml_collections.ConfigDict(
        {"optimizer": {"name": "sgd", "lr": 1e-3}, "episode_length": 1, "batch_size": 16}
    )
    c.meta = ml_collections.ConfigDict(
        {
            "optimizer": {"name": "adam", "lr": 1e-3},
            "estimator": "unrolled",
            "window": 1,
            "remat": False,
            "steps": 400,
            "batch_size": 32,
        }
    )
    # Meta-test curves: test-set CE and accuracy every `trace_every` of `test_steps` steps.
    c.eval = ml_collections.ConfigDict({"every": 100, "test_steps": 100, "trace_every": 10})
    c.log_every = 1
    c.checkpoint_every = 100

    if arg == "smoke":
        c.seeds = (0, 1)
        c.data.max_train_examples = 6000
        c.data.max_test_examples = 2000
        c.data.examples_per_task = 64
        c.data.heldout_examples = 64
        c.data.test_examples_per_task = 64
        c.inner.batch_size = 8
        c.meta.batch_size = 8
        c.meta.steps = 10
        c.eval.every = 5
        c.eval.test_steps = 4
        c.eval.trace_every = 2
        c.checkpoint_every = 5
        c.fast_compile = True
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of ml3_mnist_binary; known: 'smoke'.")
    return c
