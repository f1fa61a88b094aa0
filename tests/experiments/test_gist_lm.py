"""The gist-token experiment end to end, on tiny_shakespeare from ../shared: bad input in
the default tier; in the slow tier the smoke runs of the bottleneck, plan 2 and plan 3
(each made once, `gist_runs`) checked for what its name promises, and the detector's
actions."""

import jax
import numpy as np
import pytest

import experiments
from configs import gist_lm
from metalearn.runtime.loop import train_and_evaluate
from metalearn.runtime.metrics import read_metrics
from tests.experiments._detector_actions import check_rollback, check_stop, equal


def _config(variant: str = ""):
    return gist_lm.get_config(",".join(p for p in (variant, "smoke") if p))


def test_bad_input_fails_with_a_message_saying_what_to_change():
    with pytest.raises(ValueError, match="Unknown variant part 'plan4'"):
        _config("plan4")
    config = _config()
    config.gist.plan = "plan1"
    with pytest.raises(ValueError, match="Unknown gist.plan"):
        experiments.make(config)
    with pytest.raises(ValueError, match="applies to plan 2"):
        experiments.make(_config("plan3,ema"))
    config = _config("bottleneck")
    config.phase2.steps = 5
    with pytest.raises(ValueError, match="Phase G alone"):
        experiments.make(config)
    config = _config()
    config.gist.context = config.model.context
    with pytest.raises(ValueError, match="gist.context"):
        experiments.make(config)
    config = _config()
    config.detector.action = "pause"
    with pytest.raises(ValueError, match="Unknown detector.action 'pause'"):
        experiments.make(config)
    config = _config()
    config.gist.k = 9
    with pytest.raises(ValueError, match="reserves 1"):
        experiments.make(config)


@pytest.fixture(scope="module")
def gist_runs(tmp_path_factory):
    """`run(variant)`: the variant's smoke run to its summary, made once for the module:
    `(experiment, summary, rows, states)`, the states after every 2 steps from driving
    the same experiment's chunks (the program the run compiled)."""
    cache = {}

    def run(variant):
        if variant not in cache:
            config = _config(variant)
            experiment = experiments.make(config)
            workdir = tmp_path_factory.mktemp(variant.replace(",", "_"))
            summary = train_and_evaluate(experiment, config, str(workdir))
            rows = [r for r in read_metrics(str(workdir)) if "phase" in r]
            cache[variant] = experiment, summary, rows, _states(experiment, chunk=2)
        return cache[variant]

    return run


def _states(experiment, chunk):
    state, states = experiment.init(), []
    for start in range(0, experiment.num_steps, chunk):
        state, _ = experiment.train_chunk(state, start, chunk)
        states.append(state)
    return states


@pytest.mark.slow
def test_bottleneck_smoke_reports_the_held_out_chunk_loss(gist_runs):
    _, summary, rows, _ = gist_runs("bottleneck,k2")
    assert {r["phase"] for r in rows} == {1}
    assert summary["k"] == 2 and summary["mode"] == "gist"
    assert np.isfinite(summary["chunk_ce"]["mean"]) and "steps_to_hack" not in summary
    assert all(np.isfinite(r["gist/ce_chunk"]) for r in rows)


@pytest.mark.slow
def test_plan2_trains_on_the_gist_loss_against_a_frozen_encoder(gist_runs):
    """θ moves in Phase 2, the frozen encoder is θ at the end of Phase G, the control
    moves differently, and the summary has every column of the side-by-side table."""
    experiment, summary, rows, states = gist_runs("plan2")
    end_g = states[experiment.config.phase_g.steps // 2 - 1]
    last = states[-1]
    assert equal(end_g.params, last.encoder)
    assert not equal(last.params, end_g.params) and not equal(last.params, last.control)
    for key in (
        "steps_to_degrade",
        "best_val_ce",
        "final_val_ce",
        "control_final_val_ce",
        "phase1_end_val_ce",
        "gist_rank_corr",
        "final_mean_cosine",
        "final_effective_rank",
        "final_output_mean_cosine",
        "final_val_bits_per_byte",
    ):
        assert key in summary, key
    phase2 = [r for r in rows if r["phase"] == 2]
    assert len(phase2) == 6 and all(np.isfinite(r["self/pred_loss"]) for r in phase2)


@pytest.mark.slow
def test_plan2_resumes_exactly_whatever_the_chunking():
    experiment = experiments.make(_config("plan2,ema,score"))
    by_two, by_five = _states(experiment, chunk=2), _states(experiment, chunk=5)
    assert equal(by_two[-1], by_five[-1])


@pytest.mark.slow
def test_plan3_learns_its_encoder_by_the_meta_gradient(gist_runs):
    experiment, summary, rows, states = gist_runs("plan3")
    end_g = states[experiment.config.phase_g.steps // 2 - 1]
    assert not equal(end_g.encoder, states[-1].encoder)
    phase2 = [r for r in rows if r["phase"] == 2]
    assert all(r["meta/grad_norm"] > 0 for r in phase2)
    assert summary["plan"] == "plan3" and np.isfinite(summary["final_val_ce"]["mean"])


# --- the detector's actions (the shared base's, as plan 1 has them) ------------------


def _steps(action: str):
    """Plan 2's smoke run with a detector `action` and 10 Phase 2 steps, one step at a
    time: the state before every step and each step's metrics. With a tolerance of 10
    nats validation never improves, so the best copy stays the end of Phase G and a full
    window of falling gist loss is a detection."""
    config = _config(f"plan2,{action}")
    config.detector.tolerance = 10.0
    config.phase2.steps = 10
    experiment = experiments.make(config)
    state, states, metrics = experiment.init(), [], []
    for t in range(experiment.num_steps):
        states.append(state)
        state, m = experiment.train_chunk(state, t, 1)
        metrics.append({k: v[0].item() for k, v in jax.device_get(m).items()})
    return config, [*states, state], metrics


@pytest.mark.slow
def test_detector_action_stop_freezes_theta_from_the_detection_on():
    config, states, metrics = _steps("stop")
    check_stop(states, metrics, config.phase_g.steps)
    assert not equal(states[-2].control, states[-1].control)  # the control goes on


@pytest.mark.slow
def test_detector_action_rollback_restores_the_best_theta():
    config, states, metrics = _steps("rollback")
    end_g = states[config.phase_g.steps].params
    for t in check_rollback(states, metrics, config.phase_g.steps):
        assert not equal(states[t].params, end_g)


@pytest.mark.slow
def test_detector_action_meta_runs_phase_g_again_then_refreshes_the_encoder():
    config, states, metrics = _steps("meta")
    phases = [m["phase"] for m in metrics]
    first = next(t for t, m in enumerate(metrics) if m["diag/hacked"])
    again = range(first + 1, first + 1 + config.detector.meta_steps)
    assert [phases[t] for t in again] == [1] * len(again)
    assert all(metrics[t]["gist/ce_chunk"] > 0 for t in again)  # real Phase G steps
    assert not equal(states[first + 1].encoder, states[first + 1].params)
    handover = states[again[-1] + 1]
    assert equal(handover.encoder, handover.params)  # the frozen encoder refreshed
    assert not equal(handover.control, handover.params)  # the control forks only once
    assert int(handover.detector.count) == 0  # a fresh window for the next Phase 2
    assert 2 in phases[again[-1] + 1 :]
    assert metrics[-1]["diag/detections"] >= 1
