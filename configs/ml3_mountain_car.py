"""ML³ shaping with an intermediate goal on the mountain car (Bechtle et al., Fig. 6a-b).

    python -m experiments.run --config=configs/ml3_mountain_car.py --workdir=runs/ml3_mountain_car
    python -m experiments.run --config=configs/ml3_mountain_car.py:short   # T = 75
    python -m experiments.run --config=configs/ml3_mountain_car.py:smoke   # seconds

Variants (comma-separated parts, e.g. ``:short,smoke``; ``smoke`` shrinks whatever the
other parts chose):

- (none): horizon T = 100 control steps, intermediate-goal term 0.2 · min_t |x_t − (−0.9)|.
- ``short``: T = 75, where the greedy push-right policy is a trap (the fastest swing-back
  needs about 65 steps, so the car must turn back at once), with the term
  0.5 · mean |x_t − (−0.9)| over the first third of the trajectory (``env.extra =
  "early_mean"``), which asks for the swing-back early.
- ``smoke``: 2 seeds, T = 30, 4 meta iterations of 2 steps, 3 meta-test updates.

Protocol: gym's MountainCarContinuous physics from (−0.5, 0), goal x ≥ 0.45, no action
repeat. Policy tanh(MLP 2→32→32→1), SGD lr 0.1 on the learned loss M_φ (ELU 5→40→40→1 over
(g, x_t, v_t, a_t, t/T), averaged over time). Adam lr 1e-3; 300 meta iterations, each an
episode of 10 inner steps from a fresh policy with a meta update after every step. Two
learned losses side by side from the same seeds: task loss max(g − x_T, 0) ("ml3") and the
same + the intermediate-goal term ("ml3_extra"). Meta-test: 4 fresh policies per seed,
50 updates; iLQR 50 iterations from zero actions on max(g − x_T, 0)² + 1e-4 Σ a².
"Reached" = within 0.01 of the goal; updates to goal = 51 when never reached.

Results: docs/control.md's table (5 seeds; per seed the mean over its 4 policies).

Runtime: about 7 minutes wall each on a 2-core CPU shared with other jobs (~65 s CPU);
about 3 minutes when the CPU is less loaded.
"""

import ml_collections

from configs._common import loss_net


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "ml3_mountain_car"  # the module experiments/ml3_mountain_car.py
    c.algorithm = "ml3"
    c.task = "mountain_car"
    c.fast_compile = False  # most XLA optimisations off (smoke runs: compile-bound)
    c.seeds = (0, 1, 2, 3, 4)

    c.env = ml_collections.ConfigDict(
        {
            "horizon": 100,
            "intermediate_goal": -0.9,
            # The form of the intermediate-goal term of the ml3_extra task loss:
            # "min_distance" (min_t |x_t − x_int|) or "early_mean" (mean |x_t − x_int| over
            # the first `extra_fraction` of the trajectory).
            "extra": "min_distance",
            "extra_fraction": 1 / 3,
            "extra_weight": 0.2,
        }
    )
    c.policy = ml_collections.ConfigDict({"hidden": (32, 32)})
    c.loss_net = loss_net(activation="elu", output_activation="identity", output_wise=False)

    c.inner = ml_collections.ConfigDict(
        {"optimizer": {"name": "sgd", "lr": 0.1}, "episode_length": 10}
    )
    c.meta = ml_collections.ConfigDict(
        {
            "optimizer": {"name": "adam", "lr": 1e-3},
            "estimator": "truncated",
            "window": 1,
            "remat": False,
            "num_policies": 1,  # fresh policies per episode
            "steps": 300,  # meta iterations: episodes of 10 inner steps, a meta update after each
        }
    )
    c.eval = ml_collections.ConfigDict(
        {"every": 50, "num_policies": 4, "test_steps": 50, "tolerance": 0.01}
    )
    # check_uninterrupted: also run the K iterations in one call (a second compilation) to check
    # that restarting the regularisation each iteration for the trace changes nothing much.
    c.ilqr = ml_collections.ConfigDict({"action_cost": 1e-4, "check_uninterrupted": True})
    c.log_every = 1
    c.checkpoint_every = 100

    parts = [p for p in (arg or "").split(",") if p]
    for part in parts:
        if part == "short":
            # T = 75: the fastest swing-back needs about 65 steps, so the policy must turn
            # back almost at once; pushing right is a local optimum of the final distance.
            c.env.horizon = 75
            c.env.extra = "early_mean"
            c.env.extra_weight = 0.5
        elif part != "smoke":
            raise ValueError(
                f"Unknown variant {part!r} of ml3_mountain_car; known: 'smoke', 'short' "
                "(comma-separated, e.g. 'short,smoke')."
            )
    if "smoke" in parts:  # last: shrinks whatever the other parts chose
        c.seeds = (0, 1)
        c.env.horizon = 30
        c.inner.episode_length = 2
        c.meta.steps = 4
        c.eval.every = 2
        c.eval.num_policies = 2
        c.eval.test_steps = 3
        c.checkpoint_every = 4
        c.ilqr.check_uninterrupted = False
        c.fast_compile = True
    return c
