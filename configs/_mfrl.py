"""The shared builder of the ML³ model-free RL configs (Fig. 4): `mfrl_config(env, arg)`.

The paper's appendix with horizons, learning rates and iteration counts is not available;
the choices below are ours (docs/mfrl.md).

Fields (protocol in `experiments/ml3_mfrl.py`):
  experiment: the module experiments/ml3_mfrl.py, for both environments.
  env, horizon: the brax goal environment ('reacher' or 'ant', `tasks.goal_envs`) and the
    episode length in control steps.
  features: scales dividing the learned loss's inputs; reward_to_go: feed each
    transition's reward-to-go as y (else 0: the paper's inputs s, a, π(a|s), g alone).
  policy: the Gaussian policy's hidden widths (tanh) and initial log std.
  loss_net: M_φ, two hidden layers of 40 as in the paper, one row per transition.
  inner: SGD on M_φ, rollouts per update, episode_length (updates per meta episode).
  meta: φ's Adam, the estimator, the task loss's rollouts, meta iterations. 'truncated'
    (default) or 'first_order' with window 1: a meta step after every update on the
    REINFORCE surrogate of `rollouts` episodes, backpropagated through the update. 'es'
    (any window dividing inner.episode_length, up to all of it) or 'pes' (a shorter
    window): a meta step after every window on the mean return of `rollouts` episodes of
    the updated policy, estimated from 2 × estimator_options.pairs perturbations of φ of
    scale estimator_options.sigma (forward only; ignored by the others).
  data.goals_per_step: training goals per meta iteration (fresh from the goal region).
  eval: held-out goals (num_goals from goal_seed, the same for every seed and method),
    test_updates (the budget is test_updates × inner.rollouts × horizon samples),
    evaluation episodes, the architectures of the cross-architecture test, and whether to
    run PPO.
  ppo: brax's PPO seeds (one run per seed and goal) and settings. The published ones
    (brax's training notebook) for reacher:
    reward_scaling 5, normalize_observations, unroll_length 50, num_minibatches 32,
    num_updates_per_batch 8, discounting 0.95, learning_rate 3e-4, entropy_cost 1e-3,
    num_envs 2048, batch_size 256, action_repeat 4, episode_length 1000; for ant:
    reward_scaling 10, unroll_length 5, num_minibatches 32, num_updates_per_batch 4,
    discounting 0.97, learning_rate 3e-4, entropy_cost 1e-2, num_envs 4096, batch_size 2048.
    Kept, except: num_envs, batch_size and num_minibatches shrink so that PPO makes
    updates within the budget (one update of the published reacher setting alone uses
    1.6M samples) and so that it trains on exactly ML³'s budget (the experiment checks);
    action_repeat 1 and the episode length are those ML³ uses.
"""

import ml_collections

from configs._common import loss_net

ENVS = ("reacher", "ant")


def mfrl_config(env: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """The full config for `env`, or its `smoke` variant."""
    if env not in ENVS:
        raise ValueError(f"Unknown environment {env!r}; choose one of {ENVS}.")
    c = ml_collections.ConfigDict()
    c.experiment = "ml3_mfrl"  # the module experiments/ml3_mfrl.py
    c.algorithm = "ml3"
    c.task = "mfrl"
    c.env = env
    c.seeds = (0, 1, 2)
    c.horizon = 50
    c.features = ml_collections.ConfigDict(
        {"obs_scale": 1.0, "goal_scale": 0.2, "return_scale": 10.0, "reward_to_go": True}
    )
    c.policy = ml_collections.ConfigDict({"hidden": (32, 32), "init_log_std": -0.5})
    c.loss_net = loss_net(
        hidden=(40, 40), activation="elu", output_activation="identity", output_wise=False
    )
    c.inner = ml_collections.ConfigDict(
        {"optimizer": {"name": "sgd", "lr": 0.1}, "rollouts": 10, "episode_length": 20}
    )
    c.meta = ml_collections.ConfigDict(
        {
            "optimizer": {"name": "adam", "lr": 1e-3},
            "estimator": "truncated",
            "window": 1,
            "remat": False,
            "rollouts": 10,
            "steps": 200,
            "estimator_options": {"sigma": 0.01, "pairs": 8},
        }
    )
    c.data = ml_collections.ConfigDict({"goals_per_step": 4})
    c.eval = ml_collections.ConfigDict(
        {
            "every": 50,
            "goal_seed": 1000,
            "num_goals": 10,
            "test_updates": 20,  # = inner.episode_length: the horizon φ was trained for
            "episodes": 4,
            "architectures": ((32,), (32, 32), (32, 32, 32), (32, 32, 32, 32)),
            "ppo": True,
        }
    )
    c.ppo = ml_collections.ConfigDict(
        {
            "seeds": (0,),  # one brax run per (seed, goal); each compiles anew (~1.5 min CPU)
            # budget 20 × 10 × 50 = 10,000 = 10 evaluations × one update of 4 × 5 × 50
            "num_envs": 4,
            "batch_size": 4,
            "num_minibatches": 5,
            "unroll_length": 50,
            "num_updates_per_batch": 8,
            "learning_rate": 3e-4,
            "entropy_cost": 1e-3,
            "discounting": 0.95,
            "reward_scaling": 5.0,
            "normalize_observations": True,
            "value_hidden": (64, 64),
            "num_evals": 11,
        }
    )
    c.log_every = 1
    c.checkpoint_every = 50
    c.fast_compile = False

    if env == "ant":
        c.horizon = 100
        c.features.obs_scale = 5.0
        c.features.goal_scale = 3.0
        c.features.return_scale = 100.0
        # budget 20 × 10 × 100 = 20,000 = 10 evaluations × one update of 40 × 10 × 5
        c.ppo.update(
            {
                "unroll_length": 5,
                "num_updates_per_batch": 4,
                "discounting": 0.97,
                "entropy_cost": 1e-2,
                "reward_scaling": 10.0,
                "num_minibatches": 10,
                "num_envs": 20,
                "batch_size": 40,
            }
        )

    if arg == "smoke":
        c.seeds = (0, 1)
        c.horizon = 10
        c.inner.rollouts = 2
        c.inner.episode_length = 2
        c.meta.rollouts = 2
        c.meta.steps = 2
        c.data.goals_per_step = 2
        c.eval.every = 2
        c.eval.num_goals = 1
        c.eval.test_updates = 4
        c.eval.episodes = 1
        c.eval.architectures = ((8,), (8, 8))
        c.policy.hidden = (8, 8)
        c.ppo.update(
            {
                "num_envs": 4,
                "batch_size": 4,
                "num_minibatches": 1,
                "unroll_length": 20,
                "num_updates_per_batch": 1,
                "value_hidden": (8,),
                "num_evals": 2,
            }
        )
        c.checkpoint_every = 2
        c.fast_compile = True
    elif arg:
        raise ValueError(f"Unknown variant {arg!r} of ml3_mfrl_{env}; known: 'smoke'.")
    return c
