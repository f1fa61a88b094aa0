"""ML³ inverse dynamics with a physics prior (Bechtle et al., Fig. 5c-d).

    python -m experiments.run --config=configs/ml3_inverse_dynamics.py
    python -m experiments.run --config=configs/ml3_inverse_dynamics.py:smoke   # seconds
    python -m experiments.run --config=configs/ml3_inverse_dynamics.py:reacher  # one arm
    python -m experiments.run --config=configs/ml3_inverse_dynamics.py:sawyer

A Deep Lagrangian inertia network M_θ(q) (2×32 softplus) with analytical bias forces is
trained on 32 points of one trajectory per task, for the 2-link ReacherGoal arm and a
7-link Sawyer stand-in in one run, with MSE, ML³ (MSE task loss) and ML³ shaped by the
simulator's M(q). Learned loss 2→40→40→1 (ELU hidden, identity output) on the z-scored
torques (u, û), output-wise over joints; inner Adam lr 3e-3 (the best of {3e-3, 1e-2} for
the MSE baseline; SGD diverges on the Sawyer), the same optimizer and number of steps for
every loss; meta Adam lr 3e-3; 50 episodes of fresh θ on 2 pool trajectories, 100 inner
steps each with a meta update after every step (truncated, window 1), as the public ML³
code does. Meta-test: 100 steps on 8 new trajectories per seed, 5 seeds.

Why not ML³'s ReLU + Softplus loss network: its random initial loss drives the first
episodes' θ far off, and the meta-gradient's cheapest cure is to shrink the loss until
Adam's ε swamps its gradient, so θ stops moving; a Softplus output saturates on the way
(the loss vanishes everywhere), its gradient vanishes and φ can never recover (in a first
version, both learned losses of one seed died on both arms). An identity output cannot
saturate and ELU units cannot die, so a shrunken loss keeps an O(1) meta-gradient. Tried
and not kept: ELU + Softplus output (still collapses on several seeds), episodes of 25
steps ×200 (generalises to the 100-step meta-test, no better and noisier than 100 steps
×50 at the same cost).

Runtime: about 5 min of CPU time on a 2-core CPU (shared machine: ~15 min wall). The smoke
variant: about 30 s of CPU time (fast_compile; 50 s without), mostly compilation of the
simulator's nested derivatives and the second-order meta step.
"""

import ml_collections

from configs._common import loss_net

ARM_VARIANTS = ("reacher", "sawyer")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "ml3_inverse_dynamics"  # the module experiments/ml3_inverse_dynamics.py
    c.algorithm = "ml3"
    c.task = "inverse_dynamics"
    c.arms = ("reacher", "sawyer")
    c.fast_compile = False  # most XLA optimisations off (smoke runs: compile-bound)
    c.seeds = (0, 1, 2, 3, 4)

    c.model = ml_collections.ConfigDict({"hidden": (32, 32), "activation": "softplus", "eps": 1e-3})
    c.loss_net = loss_net(
        activation="elu",  # ELU units cannot die (see the module docstring)
        output_activation="identity",  # a Softplus output saturates and kills ℓ_φ
    )

    c.data = ml_collections.ConfigDict(
        {
            "num_train": 32,  # training points per task (one trajectory): the small budget
            "num_outer": 32,  # held-out points of the same trajectory for the task loss
            "num_tasks": 2,  # trajectories per meta iteration
            "duration": 10.0,  # s
            "num_sinusoids": 3,
            "amplitude": 0.5,  # rad, per sinusoid
            "frequency_range": (0.5, 3.0),  # rad/s
            "q0_range": 1.0,  # rad
            "points_per_trajectory": 160,  # meta-test: num_train to train on, the rest held out
            "pool_trajectories": 256,  # meta-train trajectories, shared by the seeds
            "pool_key": 12345,
        }
    )
    c.inner = ml_collections.ConfigDict(
        {
            "optimizer": {"name": "adam", "lr": 3e-3, "eps_root": 1e-8},
            "episode_length": 100,
        }
    )
    c.meta = ml_collections.ConfigDict(
        {
            "optimizer": {"name": "adam", "lr": 3e-3},
            "estimator": "truncated",
            "window": 1,
            "remat": False,
            "steps": 50,  # meta iterations (episodes), each with episode_length meta updates
        }
    )
    c.eval = ml_collections.ConfigDict({"every": 10, "num_tasks": 8, "test_steps": 100})
    c.log_every = 1
    c.checkpoint_every = 10

    if arg == "smoke":
        c.seeds = (0, 1)
        c.model.hidden = (16,)
        c.data.num_outer = 16
        c.data.num_tasks = 2
        c.data.points_per_trajectory = 48
        c.data.pool_trajectories = 8
        c.inner.episode_length = 4
        c.meta.steps = 4
        c.eval.every = 2
        c.eval.num_tasks = 2
        c.eval.test_steps = 8
        c.checkpoint_every = 2
        c.fast_compile = True
    elif arg in ARM_VARIANTS:
        c.arms = (arg,)
    elif arg:
        raise ValueError(
            f"Unknown variant {arg!r} of ml3_inverse_dynamics; known: 'smoke', 'reacher', 'sawyer'."
        )
    return c
