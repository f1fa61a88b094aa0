"""ML³ for model-based RL on ReacherGoal (Bechtle et al., Fig. 3c).

    python -m experiments.run --config=configs/ml3_mbrl_reacher.py
    python -m experiments.run --config=configs/ml3_mbrl_reacher.py:smoke   # compile-bound

ReacherGoal (paper Fig. 3c): a 2-link planar arm (0.1 m and 0.11 m links, torques up to
0.05 N m, dt 0.05 s) starts at rest stretched along x and must bring its end effector to a
goal at the end of a 20-step rollout. The learned loss is meta-trained on fresh goals of
the reachable annulus through a learned ensemble dynamics model and meta-tested with real
rollouts and no model on 8 goals of that annulus and 8 new ones per seed (3 seeds × 8
goals), against the final-distance task loss through the learned model and through the
true simulator (the reference: the arm steps with the closed-form 2-link dynamics,
`dynamics.two_link_forward_dynamics`, so its derivative compiles in seconds). 3 seeds, 300
meta iterations of 10 inner steps on 8 goals, φ scored on the task loss after the whole
10-step episode (`meta.estimator=unrolled`), with a meta-learned step size starting at 0.1
× the shared one (`meta.learn_step_size`, `meta.init_step_size`). summary.json also
records the fraction of the real rollouts' actions at the torque limit per update
(`saturated_action_fraction`), the model's one-step error and the learned step sizes.

Result (final distance on the new goals, from 0.2175 m, after 20 updates): ML³ 0.149 ±
0.058 m (per seed 0.088, 0.133, 0.226), the task loss through the same learned model 0.155
± 0.029 (0.131 ± 0.011 at its best step-size factor, tuned on the test goals), through
the true simulator 0.154 ± 0.045 (0.135 ± 0.032); learned step sizes 0.16-0.26; 64 % of
ML³'s actions at the limit at the end. The mean meets the task loss through the model at
the shared step size, but within the seeds' spread and not against its tuned step size.

Round 1 (truncated windows of 1 on 8 fixed goals per seed, step size 1): ML³ 0.165 ±
0.045 against 0.170 ± 0.017; its policies saturated the tanh after one update and
stalled. Round 2, each against the same run's task loss through the model: the unroll
alone 0.165 ± 0.039 (0.159 ± 0.029); truncated windows of 5 0.198 (0.164); the unroll
with the learned step size from 1.0 0.198 (0.162), from 0.1 on 8 fixed goals 0.143 ±
0.067 (0.139 ± 0.028); adding the better model (dynamics.hidden=(64,64),
init_rollouts=512, init_fit_steps=4000) 0.158 (0.141), with fresh goals 0.199 (0.170); the
20-step episode 0.156 (0.138); `policy.preact_penalty=0.03` with the unroll 0.200 (0.188).

Every field is described in configs/_mbrl.py, the protocol in experiments/ml3_mbrl.py.

Runtime: about 2 minutes on a 2-core CPU alone (3.5 minutes sharing it with another run);
the smoke variant about 40 s.
"""

import ml_collections

from configs._mbrl import mbrl_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return mbrl_config("reacher", arg)
