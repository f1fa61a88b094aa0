"""The table scripts: their tables, and the shared job runner reusing finished runs."""

import json

import pytest

from experiments import _runs
from experiments.reproduce_control import table


def test_control_reproduction_table_has_a_column_per_method():
    summary = {
        "test/final": {"ml3": {"mean": 0.1, "std": 0.02}, "bc": {"mean": 0.3, "std": 0.1}},
        "test/initial": {"mean": 0.9, "std": 0.0},
        "seeds": [0, 1, 2],
    }
    lines = table(summary).splitlines()
    assert lines[0] == "| quantity | ml3 | bc | value |"
    assert lines[2] == "| test/final | 0.1 ± 0.02 | 0.3 ± 0.1 |  |"
    assert lines[3] == "| test/initial |  |  | 0.9 ± 0 |"


def test_a_finished_job_is_reused_and_a_failing_one_says_why(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"x": {"mean": 1.0, "std": 0.0}}))
    summary = _runs.run("configs/does_not_matter.py", str(done))  # no subprocess runs
    assert summary["x"] == {"mean": 1.0, "std": 0.0}
    with pytest.raises(RuntimeError, match=r"(?s)nope.py in .* failed \(exit 2\).*does not exist"):
        _runs.run("configs/nope.py", str(tmp_path / "new"))


def test_ce_search_runs_every_seed_at_the_rate_of_the_lowest_validation_error(
    tmp_path, monkeypatch
):
    """The strongest-CE search: each rate on the first seed, then every seed at the rate
    whose validation error is lowest (not the last one tried, not the test error)."""
    import argparse
    import concurrent.futures

    from experiments import reproduce_images

    val = {"0.01": 0.30, "0.03": 0.10, "0.1": 0.20}
    test = {"0.01": 0.05, "0.03": 0.40, "0.1": 0.50}  # would pick 0.01
    calls = []

    def fake_run_one(args, dataset, algorithm, seed, extra=(), name=None):
        lr = extra[-1].split("=")[1]
        calls.append((lr, seed))
        workdir = tmp_path / f"{name}_seed{seed}"
        workdir.mkdir(exist_ok=True)
        summary = {
            k: {"mean": v[lr], "std": 0.0} for k, v in (("val_error", val), ("test_error", test))
        }
        (workdir / "summary.json").write_text(json.dumps(summary))
        return {"workdir": str(workdir), "error": "", "diverged": None, "wall": 1.0}

    monkeypatch.setattr(reproduce_images, "run_one", fake_run_one)
    args = argparse.Namespace(ce_search="0.01,0.03,0.1", ce_optimizer="nesterov")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        label, results = reproduce_images.ce_search(args, "mnist", [3, 4, 5], pool)
    assert label == "baseline, nesterov lr 0.03 (best of 0.01,0.03,0.1)"
    assert sorted(calls[:3]) == [("0.01", 3), ("0.03", 3), ("0.1", 3)]
    assert sorted(calls[3:]) == [("0.03", 3), ("0.03", 4), ("0.03", 5)]
    assert [r["workdir"].rsplit("_seed", 1)[1] for r in results] == ["3", "4", "5"]


def test_the_decomposition_jobs_differ_from_their_base_only_in_the_loss():
    import argparse

    from experiments import reproduce_decomposition as d

    ce = d.job("tuned", "ce", "0.03", 1.0)
    assert ce[0] == "baseline" and ce[2] == "tuned_ce_lr0.03"
    assert "--config.inner.optimizer.schedule.name=cosine" in ce[1]
    for variant, bound in (("schedule", "0"), ("shape", "0"), ("full", "1")):
        algorithm, extra, name = d.job("tuned", variant, "0.03", 1.0)
        assert (algorithm, name) == ("adalfl", f"tuned_{variant}")
        assert extra[: len(ce[1])] == ce[1]  # the same optimizer and schedule
        assert extra[-1] == f"--config.loss_net.max_grad_ratio={bound}"
    # Hypergradient descent on the tuned base: no bound, no offline phase.
    args = argparse.Namespace(init_steps=2500, steps=10)
    assert d.job_namespace(args, "tuned", "schedule").init_steps == 0
    assert d.job_namespace(args, "tuned", "full") is args
    assert d.job_namespace(args, "paper", "schedule") is args
    assert d.job("paper", "full", "0.03", 1.0)[1] == []  # the config's own protocol
    assert d.job("paper", "shape", "", 1.0)[1][-1] == "--config.loss_net.max_grad_ratio=0"
    assert "--config.loss_net.kind=scaled_ce" in d.job("paper", "schedule", "", 1.0)[1]


def test_the_decomposition_step_sizes_are_the_schedule_times_the_ratio(tmp_path):
    from experiments import reproduce_decomposition as d

    config = {
        "algorithm": "adalfl",
        "meta": {"init_steps": 20},
        "inner": {
            "optimizer": {
                "name": "nesterov",
                "lr": 0.1,
                "schedule": {"name": "cosine", "steps": 200, "boundaries": [], "factor": 1.0},
            }
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    rows = [{"step": s, "train/ce": 1.0, "train/grad_ratio": 0.5} for s in range(10, 230, 10)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, sizes = d.step_sizes(str(tmp_path), every=100)
    assert list(steps) == [100, 200]  # model steps, after the 20 offline ones
    import math

    cosine = [0.1 * 0.5 * (1 + math.cos(math.pi * (s - 1) / 200)) for s in steps]
    assert sizes == pytest.approx([0.5 * c for c in cosine], rel=1e-5, abs=1e-8)


def test_the_decomposition_report_reads_jobs_as_they_stand(tmp_path):
    import argparse

    from experiments import reproduce_decomposition as d
    from experiments import reproduce_images

    args = argparse.Namespace(root=str(tmp_path))
    done = tmp_path / "fashion_mnist" / "tuned_full_seed0"
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    (done / "summary.json").write_text(json.dumps({"test_error": {"mean": 0.1, "std": 0.0}}))
    stopped = tmp_path / "fashion_mnist" / "tuned_full_seed1"
    stopped.mkdir()
    (stopped / "metrics.jsonl").write_text("{}\n")
    diverged = tmp_path / "fashion_mnist" / "tuned_full_seed2"
    diverged.mkdir()
    (diverged / "diverged.json").write_text(json.dumps({"step": 700, "message": "boom"}))
    results = [d.existing(args, "fashion_mnist", "adalfl", s, (), "tuned_full") for s in range(4)]
    assert [r["error"] for r in results] == ["", "not finished", "", "not started"]
    assert results[2]["diverged"] == 700
    line = reproduce_images.row("fashion_mnist", "tuned, full", results)
    assert "| 10.00, running, div@700, — | 1 |" in line


def test_the_decomposition_figures_are_drawn(tmp_path):
    from metalearn import plots

    x = [100, 200, 300]
    plots.implied_step_sizes(
        {"tuned ce": (x, [[0.1, 0.05, 0.0]]), "paper full": (x, [[0.2, 0.1, 0.05]] * 2)},
        str(tmp_path / "steps.png"),
    )
    p = [i / 10 for i in range(11)]
    plots.learned_loss_shapes_compared(
        {"paper full": ([1 - q for q in p], p), "flat": ([0.0] * 11, [0.0] * 11)},
        str(tmp_path / "shapes.png"),
    )
    assert (tmp_path / "steps.png").stat().st_size > 0
    assert (tmp_path / "shapes.png").stat().st_size > 0
