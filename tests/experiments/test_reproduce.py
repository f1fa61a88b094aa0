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
