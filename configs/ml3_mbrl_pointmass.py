"""ML³ for model-based RL on PointmassGoal (Bechtle et al., Fig. 3a-b).

    python -m experiments.run --config=configs/ml3_mbrl_pointmass.py
    python -m experiments.run --config=configs/ml3_mbrl_pointmass.py:smoke   # compile-bound

PointmassGoal (paper Fig. 3a-b): a unit point mass (force input, damping 0.5, dt 0.1 s)
starts at rest at the origin and must end a 20-step rollout at a goal. The learned loss is
meta-trained on goals of the quadrant x > 0, y > 0 through a learned ensemble dynamics
model (refitted every 10 meta iterations on the current policies' real rollouts) and
meta-tested with real rollouts and no model on goals of the quadrant x < 0, y > 0 and on
new goals of the training quadrant, against the final-distance task loss optimised through
the learned model and, as a reference, through the true simulator. 3 seeds, 300 meta
iterations of 10 inner steps on 8 goals.

Every field is described in configs/_mbrl.py, the protocol in experiments/ml3_mbrl.py.

Runtime: about 6 minutes on a 2-core CPU shared with other jobs (about 1.5 min of CPU
time; most of it compilation); the smoke variant about 20 s.
"""

import ml_collections

from configs._mbrl import mbrl_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return mbrl_config("pointmass", arg)
