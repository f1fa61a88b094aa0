"""ML³ shaped with expert demonstrations on ReacherGoal (Bechtle et al., Fig. 6c-d).

    python -m experiments.run --config=configs/ml3_reacher_demos.py
    python -m experiments.run --config=configs/ml3_reacher_demos.py:smoke   # seconds

A learned trajectory loss M_φ(τ, g) is meta-trained with a behavioural-cloning task loss
against iLQR experts for 4 training targets (an episode of inner steps from fresh θ on
each, a meta update after every step), then trains fresh policies alone for 8 new targets;
compared with behavioural cloning on the training targets' demonstrations (same optimizer,
same number of updates). 5 seeds.

Runtime: 349 s wall (170 s CPU) for the full config on a shared 2-core CPU while other
jobs ran; the iLQR experts take ~35 s, the 1000 meta iterations 1-3 minutes.
"""

import math

import ml_collections

from configs._common import loss_net


def _polar(points):
    return tuple((r * math.cos(math.radians(a)), r * math.sin(math.radians(a))) for r, a in points)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "ml3_reacher_demos"  # the module experiments/ml3_reacher_demos.py
    c.algorithm = "ml3"
    c.task = "reacher_demos"
    c.fast_compile = False  # most XLA optimisations off (smoke runs: compile-bound)
    c.seeds = (0, 1, 2, 3, 4)

    c.env = ml_collections.ConfigDict({"dt": 0.05, "substeps": 2, "horizon": 30})
    # Targets as (radius m, angle deg) around the base; the reach is 0.21 m.
    c.data = ml_collections.ConfigDict(
        {
            "train_targets": _polar([(0.13, 40), (0.17, 80), (0.13, 120), (0.17, 160)]),
            "test_targets": _polar(
                [
                    (0.15, 20),
                    (0.11, 60),
                    (0.19, 60),
                    (0.15, 100),
                    (0.11, 140),
                    (0.19, 140),
                    (0.15, 180),
                    (0.17, -20),
                ]
            ),
        }
    )
    c.expert = ml_collections.ConfigDict({"action": 1e-3, "velocity": 1e-3, "max_iter": 100})
    c.policy = ml_collections.ConfigDict(
        {"hidden": (32, 32), "activation": "tanh", "velocity_scale": 5.0}
    )
    # ELU: a smooth loss whose gradient (the policy's update) varies smoothly with the
    # action; ReLU's piecewise-constant gradients plateaued further from new targets.
    c.loss_net = loss_net(activation="elu", output_wise=False)
    # offset: also feed (g − x_t) to the loss (tried; no gain, see the module docstring).
    c.loss_inputs = ml_collections.ConfigDict({"offset": False})

    c.inner = ml_collections.ConfigDict(
        {"optimizer": {"name": "sgd", "lr": 0.5}, "episode_length": 10}
    )
    c.meta = ml_collections.ConfigDict(
        {
            "optimizer": {"name": "adam", "lr": 1e-3},
            "estimator": "truncated",
            "window": 1,
            "remat": False,
            "steps": 1000,  # meta iterations: episodes of `episode_length` inner steps
        }
    )
    c.eval = ml_collections.ConfigDict({"every": 100, "test_steps": 30})
    c.log_every = 1
    c.checkpoint_every = 200

    if arg == "smoke":
        c.seeds = (0, 1)
        # Fewer targets: a smaller meta-test and fewer iLQR solves (their one compilation,
        # not the solves, takes most of the experts' time).
        c.data.train_targets = c.data.train_targets[:2]
        c.data.test_targets = c.data.test_targets[:2]
        c.inner.episode_length = 2
        c.meta.steps = 4
        c.eval.every = 2
        c.eval.test_steps = 3
        c.checkpoint_every = 2
        c.fast_compile = True
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of ml3_reacher_demos; known: 'smoke'.")
    return c
