"""benchmarks/gpu.sh and the table it ends with (benchmarks/gpu_table.py).

The slow test runs the whole script with `--dry` (every part at a tiny size on the CPU,
the same commands as on a GPU); the others build the table from made-up part files, for
the rows a GPU run can produce and a dry run does not (failures, time-outs, skips, a
finished part e).
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from benchmarks import gpu_table

ROOT = pathlib.Path(__file__).resolve().parents[2]


def table_rows(text: str) -> dict[str, list[list[str]]]:
    """The table's rows by part letter, each as its cells after the part."""
    rows: dict[str, list[list[str]]] = {}
    for line in text.splitlines():
        m = re.match(r"\| ([a-e]) \| (.*) \|$", line)
        if m:
            rows.setdefault(m.group(1), []).append(m.group(2).split(" | "))
    return rows


@pytest.mark.slow  # about 60 s on an idle 2-core CPU, 150 s under a load of 6
def test_dry_run_gives_every_part_a_row_and_exits_0(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--dry", f"--out={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    page = (out / "gpu.md").read_text()
    assert page in proc.stdout  # the table is printed too
    assert "DRY RUN" in page and "Device: no nvidia-smi · jax " in page
    rows = table_rows(page)
    assert sorted(rows) == ["a", "b", "c", "d", "e"]
    for part in "abcd":  # these finish at the dry size; their results, no failure rows
        cells = [c for row in rows[part] for c in row]
        assert not any(re.match("FAILED|TIMEOUT|SKIPPED", c) for c in cells), rows[part]
    assert any("profile of the worst ratio, LeNet-5" in row[0] for row in rows["b"])
    assert {row[0] for row in rows["c"]} == {
        "transformer `small`, bfloat16, CE step",
        "transformer `small`, float32, CE step",
    }
    assert rows["d"][0][0] == "ant env steps/s, batch 2"
    # The tiny AntGoal run outlasts its 10 s guard on a CPU: stopped, reported, not fatal.
    assert rows["e"][-1][1].startswith(("TIMEOUT", "final return")), rows["e"]


def write_part(folder, part, status, rows=(), log=""):
    (folder / f"{part}.status").write_text(status + "\n")
    (folder / f"{part}.log").write_text(log)
    with open(folder / f"{part}.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_the_table_reports_failures_time_outs_skips_and_a_finished_run(tmp_path):
    (tmp_path / "settings.txt").write_text("dry 0\nbudget_s 600\nparts a,b,c,d,e\n")
    (tmp_path / "device.txt").write_text("NVIDIA H100 80GB HBM3, 81559 MiB\njax 0.10.2: [Cuda]\n")
    a_row = {
        "model": "resnet20",
        "algorithm": "adalfl",
        "batch": 128,
        "chunk": 100,
        "chunks": 3,
        "paths": {
            "host": {"steps_per_s": 100.0, "first_chunk_s": 30.0},
            "device": {"steps_per_s": 250.0, "first_chunk_s": 40.0},
        },
    }
    write_part(tmp_path, "a", "0 95 110", [a_row])
    failed_model = {"model": "wrn28_10", "failed": "Traceback\nRESOURCE_EXHAUSTED: out of memory"}
    # b ran out of time after one failed model; the row it wrote is kept.
    write_part(tmp_path, "b", "124 180 180", [failed_model], log="wrn28_10: failed\n")
    (tmp_path / "b-profile.status").write_text("skipped part b measured no model to profile\n")
    # A torn last line (the part was killed mid-write) is ignored.
    write_part(tmp_path, "c-bf16", "0 50 70")
    (tmp_path / "c-bf16.jsonl").write_text('{"size": "gpu", "ki')
    write_part(tmp_path, "c-f32", "1 3 55", log="a\nb\nTypeError: boom | here\n")
    (tmp_path / "d.status").write_text("skipped only 4 s of the 600 s budget were left\n")
    write_part(tmp_path, "e", "0 90 100")
    (tmp_path / "e_run").mkdir()
    result = {"mean": -9.5, "std": 0.4, "per_seed": [-9.1, -9.9]}
    method = {
        "initial_return": result,
        "final_return": result,
        "initial_mean_distance": result,
        "mean_distance": result,
        "samples_to_80pct_own_final": [2000.0, 3000.0],
    }
    summary = {"env": "ant", "budget_samples": 20000, "ml3": method, "ppo": method}
    (tmp_path / "e_run" / "summary.json").write_text(json.dumps(summary))

    rows = table_rows(gpu_table.table(str(tmp_path)))

    assert rows["a"] == [
        [
            "steps/s, ResNet-20 adalfl, batch 128",
            "host 100.0 · device 250.0 (2.50×)",
            "median of 3 chunks of 100 steps; first chunk (compilation): host 30 s, device 40 s",
        ]
    ]
    assert rows["b"][0][:2] == ["AdaLFL / baseline, WRN-28-10", "FAILED"]
    assert "RESOURCE_EXHAUSTED" in rows["b"][0][2]
    assert rows["b"][1][1] == "TIMEOUT after 180 s (time guard 180 s)"
    assert rows["b"][2][1:] == ["SKIPPED", "part b measured no model to profile"]
    assert rows["c"][0][1] == "FAILED (no results)"
    assert rows["c"][1][1] == "FAILED (exit 1, 3 s)"
    assert "TypeError: boom \\| here" in rows["c"][1][2]  # a pipe cannot split the cell
    assert rows["d"][0][1] == "SKIPPED"
    assert [r[:2] for r in rows["e"]] == [
        ["ant: ML³ loss, 20000 samples per policy", "final return -9.5 ± 0.4"],
        ["ant: PPO (brax), 20000 samples per policy", "final return -9.5 ± 0.4"],
    ]


def test_a_timed_out_run_reports_its_last_progress_and_a_part_not_asked_for(tmp_path):
    log = (
        "train: step 0/200: compiling the initial state and evaluation\n"
        "train: step 40/200 (20%), 0.5 steps/s, ETA 5m20s\n"
        "SIGTERM: stopping after the step under way\n"
    )
    write_part(tmp_path, "e", "124 60 60", log=log)
    (tmp_path / "settings.txt").write_text("e_config configs/ml3_mfrl_ant.py\n")
    rows = table_rows(gpu_table.table(str(tmp_path)))
    assert rows["a"] == [[gpu_table.PARTS["a"], "NOT RUN", "not in --parts"]]
    _, result, details = rows["e"][0]
    assert result == "TIMEOUT after 60 s (time guard 60 s)"
    assert details.startswith(
        "configs/ml3_mfrl_ant.py; last progress: train: step 40/200 (20%), 0.5 steps/s, "
        "ETA 5m20s; no checkpoint was written yet"
    )
    (tmp_path / "e_run" / "checkpoints" / "40").mkdir(parents=True)
    details = table_rows(gpu_table.table(str(tmp_path)))["e"][0][2]
    assert "resumes it from its checkpoint at step 40" in details
