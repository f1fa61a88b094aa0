"""The shared builder of the ML³ model-based RL configs (Fig. 3): `mbrl_config(env, arg)`.

Fields (protocol in `experiments/ml3_mbrl.py`):
  experiment: the module experiments/ml3_mbrl.py, for both environments.
  env, horizon: the environment (it fixes the start state) and the rollout length.
  features: fixed scales dividing the learned loss's inputs (positions, states; actions
    are divided by the environment's action scale).
  policy.hidden: the policy MLP's hidden widths (tanh), fresh per goal and episode;
    preact_penalty (0: off) and preact_bound: a penalty on the pre-tanh outputs beyond the
    bound, added to the learned loss's inner objective (`control.preactivation_penalty`).
  dynamics: the ensemble (members, hidden, activation, Adam optimizer, minibatch), the
    ring buffer's capacity, exploration (init_rollouts before meta-training, then
    explore_rollouts and the current policies' rollouts with policy_noise every
    refit_every meta iterations, each followed by refit_steps Adam steps).
  data: goals_per_step per meta iteration, from train_region (a box, or an annulus in
    polar (radius, angle)), or from num_train_goals fixed goals per seed when > 0.
  inner: the policy optimizer (shared by every meta-test method) and episode_length.
  meta: φ's optimizer, the gradient estimator, window, meta iterations; learn_step_size
    adds log_step to φ, the inner step on the learned loss being scaled by
    exp(step_size_gain · log_step) (gain: so φ's Adam moves it about gain × lr per update),
    starting at init_step_size.
  fast_compile: jit with most XLA optimisations off (the smoke variant: compile-bound).
  eval: meta-test goals (num_goals from the train region and from test_region),
    test_steps updates, early_step for the "speeds up learning" number, the step-size
    factors tried for the task-loss baselines, model_error_rollouts, and reference: whether
    to add the task loss through the true simulator (an upper bound the paper lacks).
"""

import ml_collections

from configs._common import loss_net

ENVS = ("pointmass", "reacher")


def mbrl_config(env: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The full config for `env`, or its `smoke` variant."""
    c = ml_collections.ConfigDict()
    c.experiment = "ml3_mbrl"  # the module experiments/ml3_mbrl.py
    c.algorithm = "ml3"
    c.task = "mbrl"
    c.env = env
    c.seeds = (0, 1, 2)

    c.loss_net = loss_net(
        hidden=(40, 40),
        activation="elu",
        output_activation="identity",
        output_wise=False,  # one row per time step: (goal, position, state, action, t)
    )

    # preact_penalty · mean(max(|z| − preact_bound, 0)²) on the pre-tanh outputs z joins the
    # learned loss's inner objective (0: off), so the tanh cannot saturate for good.
    c.policy = ml_collections.ConfigDict(
        {"hidden": (32,), "preact_penalty": 0.0, "preact_bound": 2.0}
    )
    c.dynamics = ml_collections.ConfigDict(
        {
            "members": 5,
            "hidden": (32, 32),
            "activation": "elu",
            "optimizer": {"name": "adam", "lr": 3e-3},
            "batch_size": 128,
            "capacity": 20_000,
            "init_rollouts": 64,
            "init_fit_steps": 1000,
            "explore_rollouts": 8,
            "explore_noise": 0.3,  # × action scale, around a random constant action
            "policy_noise": 0.2,  # × action scale
            "refit_every": 10,
            "refit_steps": 100,
        }
    )
    c.data = ml_collections.ConfigDict({"goals_per_step": 8, "num_train_goals": 0})
    c.inner = ml_collections.ConfigDict({"episode_length": 10})
    c.meta = ml_collections.ConfigDict(
        {
            "optimizer": {"name": "adam", "lr": 1e-3},
            "estimator": "truncated",
            "window": 1,
            "remat": False,
            "steps": 300,
            # Meta-learn a step-size factor exp(gain · log_step) of the learned loss's inner
            # step (the paper's learned step size; for SGD the same as a learned rate).
            "learn_step_size": False,
            "step_size_gain": 10.0,
            "init_step_size": 1.0,  # the factor's initial value
        }
    )
    c.eval = ml_collections.ConfigDict(
        {
            "every": 50,
            "num_goals": 10,
            "test_steps": 20,
            "early_step": 3,
            "baseline_lr_factors": (0.1, 0.3, 1.0, 3.0, 10.0),
            "model_error_rollouts": 16,
            "reference": True,  # also the task loss through the true simulator (upper bound)
        }
    )
    c.log_every = 1
    c.checkpoint_every = 100
    c.fast_compile = False  # most XLA optimisations off (smoke runs: compile-bound)

    if env == "pointmass":
        c.horizon = 20
        c.features = ml_collections.ConfigDict(
            {"position_scale": 1.0, "state_scale": (1.0, 1.0, 1.0, 1.0)}
        )
        # Fig. 3a: meta-train in the quadrant x > 0, y > 0, meta-test in x < 0, y > 0.
        c.data.train_region = {"kind": "box", "low": (0.2, 0.2), "high": (1.0, 1.0)}
        c.eval.test_region = {"kind": "box", "low": (-1.0, 0.2), "high": (-0.2, 1.0)}
        c.inner.optimizer = {"name": "sgd", "lr": 0.1}
    elif env == "reacher":
        c.horizon = 20
        c.features = ml_collections.ConfigDict(
            {"position_scale": 0.2, "state_scale": (3.0, 3.0, 10.0, 10.0)}
        )
        # Training goals: fresh draws from the reachable annulus each meta iteration
        # (data.num_train_goals = 8 fixes 8 per seed instead); test goals are new.
        c.data.train_region = {"kind": "annulus", "low": (0.08, -3.1416), "high": (0.2, 3.1416)}
        c.eval.num_goals = 8  # 8 goals of the training region, and 8 new ones
        c.eval.test_region = {"kind": "annulus", "low": (0.08, -3.1416), "high": (0.2, 3.1416)}
        c.inner.optimizer = {"name": "sgd", "lr": 1.0}
        # Issue 17: φ is scored after the whole episode (the unroll), the learned loss's
        # step is meta-learned from 0.1 × the shared one, and training goals are fresh
        # draws from the annulus (8 fixed goals: 0.143 ± 0.067, the model 0.139 ± 0.028).
        c.meta.estimator = "unrolled"
        c.meta.window = c.inner.episode_length
        c.meta.learn_step_size = True
        c.meta.init_step_size = 0.1
    else:
        raise ValueError(f"Unknown environment {env!r}; choose one of {ENVS}.")

    if arg == "smoke":
        c.seeds = (0, 1)
        c.meta.steps = 6
        c.inner.episode_length = 2
        if c.meta.estimator == "unrolled":
            c.meta.window = c.inner.episode_length
        c.data.goals_per_step = 2
        c.dynamics.init_rollouts = 8
        c.dynamics.init_fit_steps = 20
        c.dynamics.refit_every = 3
        c.dynamics.refit_steps = 5
        c.dynamics.capacity = 1000
        c.eval.every = 3
        c.eval.num_goals = 2
        c.eval.test_steps = 4
        c.eval.early_step = 2
        c.eval.model_error_rollouts = 2
        c.eval.reference = False  # its graph dominates the arm's compile time
        c.checkpoint_every = 3
        c.fast_compile = True  # halves its CPU time, nearly all of it compilation
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of ml3_mbrl_{env}; known: 'smoke'.")
    return c
