"""ML³ sine regression (Bechtle et al., Fig. 2c/2d), all 5 seeds in one program.

    python -m experiments.run --config=configs/ml3_sine.py
    python -m experiments.run --config=configs/ml3_sine.py:smoke   # seconds

The public ML³ code's protocol: optimizee MLP 1→100→10→1 (ReLU), learned loss
2→50→50→1 without biases (ReLU, Softplus output); inner SGD lr 1e-3, meta Adam lr 1e-3;
500 meta iterations of one inner step on the fixed task y = sin(x − π), 100 points
x ~ U[−2, 2], θ re-initialised (Xavier) before each; meta-test on 10 tasks with
A ~ U[0.2, 5], phase ~ U[−π, π], x ~ U[−5, 5], 100 SGD steps from PyTorch's default init.
Published (public code, seeds 0-4): final meta-test MSE 2.26 ± 0.54 (learned) vs
3.59 ± 0.85 (MSE).

Runtime on an idle 2-core CPU: about 17 s cold (5 s of it compilation), 13 s with the
compilation cache warm (`experiments.run` keeps one); see `python -m benchmarks.ml3_sine`.
"""

import math

import ml_collections

from configs._common import loss_net


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "ml3_sine"  # the module experiments/ml3_sine.py
    c.algorithm = "ml3"
    c.task = "sine"
    c.fast_compile = False  # most XLA optimisations off (smoke runs: compile-bound)
    # LLVM at O2 for every program instead of XLA's default O3: each of the two large
    # programs compiles in about half the time, and they run as fast
    # (`python -m benchmarks.ml3_sine --compare_level=3` compares the whole protocol cold).
    c.compiler_options = {"xla_backend_optimization_level": 2}
    c.seeds = (0, 1, 2, 3, 4)

    c.model = ml_collections.ConfigDict(
        {
            "hidden": (100, 10),
            "activation": "relu",
            "meta_train_init": "xavier_uniform",  # the public code's reset()
            "meta_test_init": "torch_default",  # fresh nn.Linear modules at evaluation
        }
    )
    c.loss_net = loss_net(hidden=(50, 50), use_bias=False)

    c.data = ml_collections.ConfigDict(
        {
            "num_points": 100,
            "train_amp": (1.0, 1.0),
            "train_phase": (math.pi, math.pi),
            "train_x": (-2.0, 2.0),
            "num_test_tasks": 10,
            "test_amp": (0.2, 5.0),
            "test_phase": (-math.pi, math.pi),
            "test_x": (-5.0, 5.0),
        }
    )
    c.inner = ml_collections.ConfigDict(
        {"optimizer": {"name": "sgd", "lr": 1e-3}, "episode_length": 1}
    )
    c.meta = ml_collections.ConfigDict(
        {
            "optimizer": {"name": "adam", "lr": 1e-3},
            "estimator": "unrolled",
            "window": 1,
            "remat": False,
            "steps": 500,
        }
    )
    c.eval = ml_collections.ConfigDict({"every": 10, "test_steps": 100})
    c.log_every = 1
    c.checkpoint_every = 100

    if arg == "smoke":
        c.seeds = (0, 1)
        c.meta.steps = 20
        c.eval.every = 10
        c.eval.test_steps = 10
        c.checkpoint_every = 10
        c.fast_compile = True
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of ml3_sine; known: 'smoke'.")
    return c
