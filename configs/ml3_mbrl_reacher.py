"""ML³ for model-based RL on ReacherGoal (Bechtle et al., Fig. 3c).

    python -m experiments.run --config=configs/ml3_mbrl_reacher.py
    python -m experiments.run --config=configs/ml3_mbrl_reacher.py:smoke   # compile-bound

ReacherGoal (paper Fig. 3c): a 2-link planar arm (0.1 m and 0.11 m links, torques up to
0.05 N m, dt 0.05 s) starts at rest stretched along x and must bring its end effector to a
goal at the end of a 20-step rollout. The learned loss is meta-trained on 8 fixed goals per
seed in the reachable annulus through a learned ensemble dynamics model and meta-tested
with real rollouts and no model on those goals and on 8 new ones, against the final-distance
task loss through the learned model (the true-simulator reference is off here: its
derivatives of the arm's dynamics take minutes to compile). 3 seeds, 300 meta iterations
of 10 inner steps on 8 goals.

Not reproduced (numbers in the README): ML³ does not beat the task loss through the model
here. Its policies saturate the tanh (most actions at the torque limit after 2 updates
for 2 of 3 seeds) while the learned loss still pushes outward, so ∇_θ vanishes and so
does the meta-gradient. Feeding the loss the pre-tanh output instead did not help: the
loss then drives it without bound.

Every field is described in configs/_mbrl.py, the protocol in experiments/ml3_mbrl.py.

Runtime: about 4 minutes on a 2-core CPU (under 2 min of CPU time, mostly compilation;
11 minutes while sharing it with three other jobs); the smoke variant about 40 s.
"""

import ml_collections

from configs._mbrl import mbrl_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return mbrl_config("reacher", arg)
