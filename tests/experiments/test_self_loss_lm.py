"""The self-loss language-model experiment end to end, on tiny_shakespeare from ../shared.

In the slow tier: one smoke run of the document's setting shared by three tests (moved
there from the default tier, whose time it dominated), every variant of the sweep and
every detector action, each checked for the effect its name promises. Each variant runs
once, driven chunk by chunk (`variant_runs`); the document's setting alone also runs
through `runtime.loop` to its summary, on the same experiment.
"""

import dataclasses
import json
from typing import Any

import chex
import jax
import numpy as np
import pytest

import experiments
from configs import self_loss_lm
from metalearn.models.transformer import param_groups
from metalearn.runtime.loop import train_and_evaluate
from metalearn.runtime.metrics import read_metrics
from tests.experiments._detector_actions import check_rollback, check_stop, equal


def _config(variant: str = ""):
    return self_loss_lm.get_config(",".join(p for p in (variant, "smoke") if p))


def _rows(workdir) -> list[dict]:
    return [r for r in read_metrics(str(workdir)) if "phase" in r]


def _chunk_states(experiment, chunk: int) -> tuple[list, list[dict]]:
    """The states at every multiple of `chunk` steps (0 included) and the metrics of each
    step as `metrics.jsonl` has them (with their `step`), from driving the experiment's
    chunks directly."""
    state, states, metrics = experiment.init(), [], []
    states.append(state)
    for start in range(0, experiment.num_steps, chunk):
        state, m = experiment.train_chunk(state, start, chunk)
        states.append(state)
        m = jax.device_get(m)
        metrics += [
            {"step": start + i + 1, **{k: v[i].item() for k, v in m.items()}} for i in range(chunk)
        ]
    return states, metrics


def _group(params, name: str) -> list:
    groups = jax.tree.leaves(param_groups(params))
    return [p for p, g in zip(jax.tree.leaves(params), groups, strict=True) if g == name]


def test_bad_input_fails_with_a_message_saying_what_to_change(tmp_path):
    config = _config("file")
    config.data.path = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="--config.data.path"):
        experiments.make(config)
    config = _config()
    config.data.data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match="tiny_shakespeare.*dataset_info.json"):
        experiments.make(config)
    with pytest.raises(ValueError, match="Unknown variant part 'nope'"):
        _config("nope")
    config = _config()
    config.meta.steps = 3
    config.log_every = 2
    with pytest.raises(ValueError, match="multiple of log_every"):
        experiments.make(config)
    with pytest.raises(ValueError, match="shared_prefix"):
        experiments.make(_config("frozen,prefix"))
    config = _config()
    config.meta.estimator = "truncated"  # the heart's windowed estimator: not one meta step
    with pytest.raises(ValueError, match="is the full unroll; say estimator='unrolled'"):
        experiments.make(config)
    config = _config("truncated")
    config.meta.window = config.meta.inner_steps
    with pytest.raises(ValueError, match="window"):
        experiments.make(config)


@dataclasses.dataclass(frozen=True)
class Run:
    """A smoke run of one variant, driven chunk by chunk: the states at every chunk
    boundary (0 included) and the rows it logs."""

    config: Any
    experiment: Any
    rows: list[dict]
    states: list


@pytest.fixture(scope="module")
def variant_runs():
    """`run(variant)`: the variant's `Run`, made once for the module."""
    cache = {}

    def run(variant):
        if variant not in cache:
            config = _config(variant)
            experiment = experiments.make(config)
            states, rows = _chunk_states(experiment, config.eval.every)
            cache[variant] = Run(config, experiment, rows, states)
        return cache[variant]

    return run


@pytest.fixture(scope="module")
def hard_run(variant_runs, tmp_path_factory):
    """The document's setting (hard tokens, the same live critic; the cheapest variant to
    compile) as a smoke run to the end through `runtime.loop`, on the experiment of its
    `Run`, and that run's states at every chunk boundary."""
    run = variant_runs("hard")
    workdir = tmp_path_factory.mktemp("self_loss_hard")
    summary = train_and_evaluate(run.experiment, run.config, str(workdir))
    return run.experiment, workdir, summary, run.states


@pytest.mark.slow  # the shared smoke run compiles for ~35 s
def test_a_run_logs_both_phases_and_writes_its_summary_and_figure(hard_run, variant_runs):
    experiment, workdir, summary, _ = hard_run
    config = experiment.config
    assert {"steps_to_hack", "best_val_ce", "control_final_val_ce", "min_pred_loss"} <= set(summary)
    assert np.isfinite(summary["test_ce"]["mean"])
    rows = _rows(workdir)
    assert [r["phase"] for r in rows] == [1] * config.meta.steps + [2] * config.phase2.steps
    assert all(np.isfinite(r["true/val_ce"]) for r in rows)
    # The rows the variants are checked on, from their chunks, are the ones a run logs.
    assert rows == variant_runs("hard").rows
    assert (workdir / "plots" / "self_loss.png").exists()
    assert list((workdir / "tensorboard").iterdir())


@pytest.mark.slow  # the shared smoke run compiles for ~35 s
def test_the_control_forks_at_the_end_of_phase1_and_learns_on_the_true_loss(hard_run):
    experiment, workdir, _, states = hard_run
    config = experiment.config
    end_of_phase1, final = states[config.meta.steps // config.eval.every], states[-1]
    chex.assert_trees_all_equal(end_of_phase1.control, end_of_phase1.params)
    chex.assert_trees_all_equal(end_of_phase1.critic, end_of_phase1.params)
    rows = _rows(workdir)
    phase2 = [r for r in rows if r["phase"] == 2]
    # the control descends the true loss and leaves θ to the self-produced one
    assert phase2[-1]["control/val_ce"] < phase2[0]["control/val_ce"]
    assert not np.allclose(final.control["embed"]["embedding"], final.params["embed"]["embedding"])
    assert not np.allclose(
        final.params["embed"]["embedding"], end_of_phase1.params["embed"]["embedding"]
    )


@pytest.mark.slow  # the shared smoke run compiles for ~35 s
def test_resume_is_exact(hard_run, tmp_path):
    """Preempted in the middle of Phase 2 and re-run on the same workdir: the same metrics
    and summary as the uninterrupted run (the programs are shared; the state is restored)."""
    experiment, workdir, whole, _ = hard_run
    config = experiment.config
    stop_at = config.meta.steps + config.eval.every
    assert train_and_evaluate(experiment, config, str(tmp_path), stop_at=stop_at) is None
    resumed = train_and_evaluate(experiment, config, str(tmp_path))
    assert resumed == whole
    assert read_metrics(str(tmp_path)) == read_metrics(str(workdir))


# --- the slow tier: every variant of the sweep, every detector action ---------------------

# What each variant changes, checked against the run of the variant it modifies: a part
# that did nothing would give that run's numbers exactly.
REFERENCE = {
    "hard": "st",  # the same forward values, no gradient through the predictions
    "soft": "hard",
    "st": "soft",
    "same_sg,soft": "soft",
    "frozen,hard": "hard",
    "frozen,soft": "soft",
    "ema,soft": "soft",
    "hard,positive": "hard",
    "hard,head": "hard",
    "hard,norm": "hard",
    "hard,mono": "hard",
    "hard,disjoint": "hard",
    "hard,anchor": "hard",
    "hard,first_order": "hard",
    "hard,truncated": "hard",
    "targets": "soft",
    "targets,continuation": "targets",
    "targets,frozen,continuation": "targets,continuation",
    "targets,ema,continuation": "targets,continuation",
    "observed,frozen": "gain,frozen",  # free embeddings on top of the gain
    "gain,frozen": "gain",
    "gain": "targets",
    "gain,same_sg": "gain",
    "gain,ema": "gain",
    "gain,refresh": "gain,frozen",
    "gain,frozen,long": "gain,frozen",
    "gain,frozen,adversarial": "gain,frozen",
    "observed,frozen,adversarial": "observed,frozen",
    "targets,frozen,continuation,long": "targets,frozen,continuation",
    "prefix,softplus": "soft",
}
# A refreshed critic moves by what a few smoke steps move θ (about 1e-6 in the traced
# numbers): its effect is checked on the state (`_check_variant`) instead.
STATE_ONLY = {"gain,refresh"}
# Variants whose detector acts (their Phase 1 returns): `test_the_detect_meta_cycle_...`.
ACTING = [v for v in self_loss_lm.SWEEP if "meta" in v.split(",")]
TRACED = ("self/pred_loss", "true/val_ce", "meta/outer_ce")


def _check_variant(variant, config, rows, states):
    """The effect the variant's own parts promise, beyond changing the numbers."""
    end_of_phase1, final = states[config.meta.steps // config.eval.every], states[-1]
    phase2 = [r for r in rows if r["phase"] == 2]
    parts = variant.split(",")
    if "positive" in parts or "softplus" in parts:
        assert all(r["self/pred_loss"] > 0 for r in rows)
    if "norm" in parts:  # the standardised values average to zero over the batch
        assert all(abs(r["self/pred_loss"]) < 1e-4 for r in phase2 if not r["self/anchor"])
    if "anchor" in parts:
        every = config.phase2.anchor_every
        assert [r["self/anchor"] for r in phase2] == [
            int((i + 1) % every == 0) for i in range(len(phase2))
        ]
        for r in phase2:
            if r["self/anchor"]:  # a true cross-entropy step: the loss it descends is the CE
                assert r["self/pred_loss"] == r["true/train_ce"]
            else:
                assert r["self/pred_loss"] != r["true/train_ce"]
    if "head" in parts:
        assert "loss_head" in final.params
    if "disjoint" in parts:  # Phase 2 never trains the critic's own blocks
        assert _group(final.params, "loss")
        chex.assert_trees_all_equal(
            _group(final.params, "loss"), _group(end_of_phase1.params, "loss")
        )
        assert not np.allclose(
            _group(final.params, "trunk")[0], _group(end_of_phase1.params, "trunk")[0]
        )
    if "frozen" in parts:
        chex.assert_trees_all_equal(final.critic, end_of_phase1.params)
    if "ema" in parts:  # between where it started and where θ went
        critic, start = final.critic["embed"]["embedding"], end_of_phase1.params["embed"]
        assert not np.allclose(critic, start["embedding"])
        assert not np.allclose(critic, final.params["embed"]["embedding"])
    if "truncated" in parts:  # three inner steps a meta step
        assert config.meta.inner_steps == 3 and config.meta.estimator == "last_window"
    if "adversarial" in parts:  # three inner steps, every one differentiated
        assert config.meta.inner_steps == 3 and config.meta.estimator == "unrolled"
    if "long" in parts:
        assert config.meta.steps == 8
    if "gain" in parts or "observed" in parts:  # the critic stack and its quality metrics
        assert "loss_gain" in final.params
        assert ("loss_observed" in final.params) == ("observed" in parts)
        assert all(np.isfinite(r["critic/target_ce"]) for r in rows)
        assert float(end_of_phase1.params["loss_gain"]) != 0.0  # meta-trained
    if "refresh" in parts:  # the copy became θ at a refresh, and θ moved on since
        assert not equal(final.critic, end_of_phase1.params)
        assert not equal(final.critic, final.params)


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant", [*(v for v in self_loss_lm.SWEEP if v not in ACTING), "prefix,softplus"]
)
def test_every_variant_runs_and_changes_the_run_it_modifies(variant, variant_runs):
    run = variant_runs(variant)
    config, rows, states = run.config, run.rows, run.states
    assert len(rows) == config.meta.steps + config.phase2.steps
    assert [r["phase"] for r in rows] == [1] * config.meta.steps + [2] * config.phase2.steps
    assert all(np.isfinite(r["self/pred_loss"]) and np.isfinite(r["true/val_ce"]) for r in rows)
    # The final θ, critic and control, whose cross-entropy the last row logs, are finite.
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(states[-1]))
    reference = variant_runs(REFERENCE[variant]).rows
    n = min(len(rows), len(reference))  # `long` runs more Phase 1 steps
    assert (
        variant in STATE_ONLY or np.max(np.abs(_traced(rows[:n]) - _traced(reference[:n]))) > 1e-5
    ), f"{variant} gives the numbers of {REFERENCE[variant]}"
    _check_variant(variant, config, rows, states)
    if "prefix" in variant.split(","):  # the same numbers as the separate loss pass
        assert run.experiment.spec.layout == "shared_prefix"
        separate = variant_runs(variant.replace("prefix,", "")).rows
        np.testing.assert_allclose(_traced(rows), _traced(separate), rtol=1e-4, atol=1e-6)


def _traced(rows) -> np.ndarray:
    return np.array([[r[k] for k in TRACED] for r in rows])


def _steps(action: str):
    """The 'hard' smoke run with a detector `action`, one step at a time: the state before
    every step and each step's metrics. With a tolerance of 10 nats validation never
    improves, so the best copy stays the end of Phase 1 and a full window of falling
    predicted loss is a detection."""
    config = _config(f"hard,{action}")
    config.detector.tolerance = 10.0
    experiment = experiments.make(config)
    states, metrics = _chunk_states(experiment, 1)
    return config, states, metrics


@pytest.mark.slow
def test_detector_action_stop_freezes_theta_from_the_detection_on():
    config, states, metrics = _steps("stop")
    check_stop(states, metrics, config.meta.steps)


@pytest.mark.slow
def test_detector_action_rollback_restores_the_best_theta():
    config, states, metrics = _steps("rollback")
    end_of_phase1 = states[config.meta.steps].params
    for t in check_rollback(states, metrics, config.meta.steps):
        assert not np.allclose(
            states[t].params["embed"]["embedding"], end_of_phase1["embed"]["embedding"]
        )


@pytest.mark.slow
def test_detector_action_meta_runs_phase1_again_then_refreshes_the_critic():
    config, states, metrics = _steps("meta")
    phases = [int(m["phase"]) for m in metrics]
    first = next(t for t, m in enumerate(metrics) if m["diag/hacked"])
    again = range(first + 1, first + 1 + config.detector.meta_steps)
    assert [phases[t] for t in again] == [1] * len(again)
    assert all(metrics[t]["meta/outer_ce"] > 0 for t in again)  # real meta steps
    handover = states[again[-1] + 1]
    chex.assert_trees_all_equal(handover.critic, handover.params)
    assert int(handover.detector.count) == 0  # a fresh window for the next Phase 2
    assert 2 in phases[again[-1] + 1 :]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ACTING)
def test_the_detect_meta_cycle_repeats_and_resumes_exactly(variant, tmp_path):
    """Detection, a return to meta-training, Phase 2 again, for several cycles; preempted
    in the middle of a cycle's Phase 1 and resumed, the same rows and summary."""
    config = _config(variant)
    config.detector.tolerance = 10.0  # validation never improves by 10 nats: detections
    config.detector.meta_steps = 6
    config.phase2.steps = 40
    experiment = experiments.make(config)
    whole = train_and_evaluate(experiment, config, str(tmp_path / "whole"))
    rows = _rows(tmp_path / "whole")
    assert whole["detections"] >= 2 and rows[-1]["diag/detections"] == whole["detections"]
    again = [r["step"] for r in rows if r["phase"] == 1 and r["step"] > config.meta.steps]
    assert len(again) >= 2 * config.detector.meta_steps  # two returns to meta-training
    # Stop at a chunk boundary inside the first return to Phase 1.
    stop_at = next(t for t in again if t % config.checkpoint_every == 0 and t + 1 in again)
    cut = str(tmp_path / "cut")
    assert train_and_evaluate(experiment, config, cut, stop_at=stop_at) is None
    assert train_and_evaluate(experiments.make(config), config, cut) == whole
    assert read_metrics(cut) == read_metrics(str(tmp_path / "whole"))
    report = json.load(open(tmp_path / "whole" / "hack_report.json"))
    assert report["detection"]["step"] - config.meta.steps == whole["hack_detected_at"]
    assert report["onset"]["phase2_step"] == whole["steps_to_hack"]
