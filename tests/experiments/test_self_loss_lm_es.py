"""The self-loss experiment with Phase 1's meta-gradient by antithetic ES
(`meta.estimator='es'`, σ and pairs from `meta.estimator_options`).

The smoke runs compile for ~30 s each, so they are in the slow tier; that the estimate
is right is checked on a small model in tests/metalearn/algorithms/test_self_loss_es.py.
"""

import numpy as np
import orbax.checkpoint as ocp
import pytest

import experiments
from configs import self_loss_lm
from metalearn.runtime.loop import NonFiniteError, train_and_evaluate
from metalearn.runtime.metrics import read_metrics


def _config(variant: str = "hard,es"):
    return self_loss_lm.get_config(f"{variant},smoke")


def test_unknown_estimator_options_are_refused_when_the_experiment_is_built():
    config = _config()
    config.meta.estimator_options = {"pairs": 4, "sigma_": 0.1}
    with pytest.raises(
        ValueError, match=r"Unknown estimator option 'sigma_'. Did you mean 'sigma'\?"
    ):
        experiments.make(config)
    config = _config()
    config.meta.estimator = "implicit"
    with pytest.raises(ValueError, match="not solved to a fixed point"):
        experiments.make(config)


@pytest.mark.slow  # compiles for ~30 s
def test_an_es_run_meta_trains_theta_and_logs_the_spread_of_its_perturbed_losses(tmp_path):
    config = _config()
    config.phase2.steps = 4
    assert config.meta.estimator == "es"
    train_and_evaluate(experiments.make(config), config, str(tmp_path))
    rows = [r for r in read_metrics(str(tmp_path)) if "phase" in r]
    phase1 = [r for r in rows if r["phase"] == 1]
    assert len(phase1) == config.meta.steps
    assert all(r["meta/es_loss_spread"] > 0 and r["meta/grad_norm"] > 0 for r in phase1)
    assert all(r["meta/es_loss_spread"] == 0 for r in rows if r["phase"] == 2)
    assert len({r["true/val_ce"] for r in phase1}) > 1  # θ moved
    assert all(np.isfinite(r["true/val_ce"]) for r in rows)


@pytest.mark.slow  # compiles for ~30 s
def test_an_exploding_es_estimate_stops_the_run_and_names_sigma(tmp_path):
    config = _config()
    config.meta.estimator_options = {"sigma": 1e30, "pairs": 2}  # θ ± 1e30: losses overflow
    with pytest.raises(NonFiniteError, match=r"at step 1 .*lower meta.estimator_options.sigma"):
        train_and_evaluate(experiments.make(config), config, str(tmp_path))
    assert ocp.CheckpointManager(str(tmp_path / "checkpoints")).latest_step() is None
