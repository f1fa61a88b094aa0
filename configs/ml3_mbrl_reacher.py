"""ML³ for model-based RL on ReacherGoal (Bechtle et al., Fig. 3c).

    python -m experiments.run --config=configs/ml3_mbrl_reacher.py
    python -m experiments.run --config=configs/ml3_mbrl_reacher.py:smoke   # compile-bound

ReacherGoal (paper Fig. 3c): a 2-link planar arm (0.1 m and 0.11 m links, torques up to
0.05 N m, dt 0.05 s) starts at rest stretched along x and must bring its end effector to a
goal at the end of a 20-step rollout. The learned loss is meta-trained on 8 fixed goals per
seed in the reachable annulus through a learned ensemble dynamics model and meta-tested
with real rollouts and no model on those goals and on 8 new ones (3 seeds × 8 goals),
against the final-distance task loss through the learned model and through the true
simulator (the reference: the arm steps with the closed-form 2-link dynamics,
`dynamics.two_link_forward_dynamics`, so its derivative compiles in seconds). 3 seeds, 300
meta iterations of 10 inner steps on 8 goals. summary.json also records the fraction of
the real rollouts' actions at the torque limit per update (`saturated_action_fraction`)
and the model's one-step error.

ML³'s policies saturate the tanh after one update (95 % of actions at the limit, 100 %
at the end) and stall there. Keeping them off the limit with `policy.preact_penalty`
(0.03, bound 2) halves the saturation but makes the final distance on new goals worse
(0.225 against 0.165 m without it), so it is off by default.

Every field is described in configs/_mbrl.py, the protocol in experiments/ml3_mbrl.py.

Runtime: about 4 minutes on a 2-core CPU (under 2 min of CPU time, mostly compilation;
11 minutes while sharing it with three other jobs); the smoke variant about 40 s.
"""

import ml_collections

from configs._mbrl import mbrl_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return mbrl_config("reacher", arg)
