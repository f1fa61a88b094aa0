"""The loop (metalearn/runtime/loop.py) on a data-free toy experiment: what it reports."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from metalearn.runtime.experiment import Experiment
from metalearn.runtime.loop import NonFiniteError, train_and_evaluate


class Counter(Experiment):
    """x ← x + 1 a step; `train/x` logged every step, NaN from step `nan_at` on."""

    def __init__(self, config, *, estimators=(), nan_at=None):
        super().__init__(config)
        self.num_steps = config.steps
        self._estimators, self.nan_at = estimators, nan_at

    def init(self):
        return {"x": jnp.zeros((), jnp.float32)}

    def train_chunk(self, state, start, num):
        steps = np.arange(start + 1, start + num + 1, dtype=np.float32)
        if self.nan_at is not None:
            steps = np.where(steps >= self.nan_at, np.nan, steps)
        return {"x": state["x"] + num}, {"train/x": steps}

    def evaluate(self, state, step):
        return {"eval/x": state["x"]}

    def finalize(self, state, history, workdir):
        return {"x": {"mean": float(state["x"]), "std": 0.0}}

    def estimators(self):
        return self._estimators


def counter_config(steps=8, every=4):
    return ml_collections.ConfigDict(
        {"steps": steps, "eval": {"every": every}, "checkpoint_every": every, "log_every": 1}
    )


@pytest.mark.parametrize(
    "estimators, hint",
    [(("implicit",), "raise meta.estimator_options.damping"), (("es",), "lower meta.estimat")],
)
def test_a_non_finite_loss_hints_at_the_estimators_the_experiment_names(estimators, hint, tmp_path):
    config = counter_config()
    experiment = Counter(config, estimators=("unrolled", *estimators), nan_at=6)
    with pytest.raises(NonFiniteError, match="at step 6") as err:
        train_and_evaluate(experiment, config, str(tmp_path / "run"))
    assert hint in str(err.value)
    # The config names no estimator: the hint comes from the experiment alone.
    assert str(err.value).count("With estimator=") == 1
