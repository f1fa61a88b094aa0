"""ML³ for model-free RL on AntGoal against brax's PPO (Bechtle et al., Fig. 4).

    python -m experiments.run --config=configs/ml3_mfrl_ant.py
    python -m experiments.run --config=configs/ml3_mfrl_ant.py:smoke
    python -m experiments.run --config=configs/ml3_mfrl_ant.py --config.meta.estimator=es \
        --config.meta.window=20  # ES on the return after all 20 inner steps

Every field is described in configs/_mfrl.py, the protocol in experiments/ml3_mfrl.py.
"""

import ml_collections

from configs._mfrl import mfrl_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return mfrl_config("ant", arg)
