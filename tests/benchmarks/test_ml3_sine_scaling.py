"""benchmarks/ml3_sine_scaling.py: its --dry run prints every table with its rows, and the
figures under the tables follow from the rows."""

import math
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def tables(text: str) -> dict[str, list[list[str]]]:
    """The rows of each table (cells as text), by the first word of the caption above it."""
    out, name = {}, None
    for line in text.splitlines():
        if re.match(r"(Seeds|Devices|Limit|Images): ", line):
            name = line.split(":")[0]
        elif line.startswith("| ") and name and not line.startswith("| seeds |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if cells[0] not in ("devices", "program", "model"):  # the headers
                out.setdefault(name, []).append(cells)
    return out


def number(cell: str) -> float:
    return float(cell.split()[0].rstrip(","))


def positive(cell: str) -> bool:
    x = number(cell)
    return math.isfinite(x) and x > 0


def measured(cell: str) -> bool:
    """A finite, non-negative figure (a short phase may round to 0.00 s)."""
    x = number(cell)
    return math.isfinite(x) and x >= 0


@pytest.mark.slow  # about 75 s on an idle 2-core CPU
def test_dry_run_prints_every_table_and_its_figures_follow_from_the_rows():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.ml3_sine_scaling", "--dry"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.startswith("DRY RUN") and "load " in out.splitlines()[-1]
    t = tables(out)
    assert sorted(t) == ["Devices", "Images", "Limit", "Seeds"], out

    seeds = t["Seeds"]
    assert [r[0] for r in seeds] == ["1", "2"]
    for r in seeds:
        assert all(measured(c) for c in r[1:8]) and positive(r[1]) and positive(r[6]), r
        assert all(c == "—" for c in r[8:]) or all(positive(c) for c in r[8:]), r
    wall = [number(r[1]) for r in seeds]
    printed = re.search(r"seeds\): ours (-?[\d.]+) s of wall time", out)
    slope = np.polyfit([1, 2], wall, 1)[0]
    assert abs(float(printed.group(1)) - slope) <= 0.011  # the rows are rounded to 0.01 s

    devices = t["Devices"]
    assert [r[:2] for r in devices] == [["1", "2"], ["2", "1"]]
    for r in devices:
        assert all(measured(c) for c in r[2:]) and positive(r[2]) and positive(r[7]), r
    # Seeds are independent: spreading them over devices changes no number.
    assert devices[0][-1] == devices[1][-1]

    limit = t["Limit"]
    assert [r[0].split()[0] for r in limit] == ["init", "meta-train", "evaluation", "one"]
    per_run = [number(r[-1]) for r in limit]
    assert all(x > 0 for x in per_run)
    assert abs(per_run[-1] - sum(per_run[:-1])) <= 2e-4
    for r in limit[1:3]:  # a call = outside + trips × a trip, calls a run of them
        calls, trips, trip, outside = number(r[1]), number(r[2]), number(r[5]), number(r[6])
        assert abs(calls * (outside + trips * trip) / 1e3 - number(r[-1])) <= 1e-3 * calls
    gflop, rate, seconds = map(
        float, re.search(r"limit: ([\d.]+) GFLOP / ([\d.]+) GFLOP/s = ([\d.]+) s", out).groups()
    )
    assert gflop == per_run[-1] and seconds == pytest.approx(gflop / rate, rel=0.02)
    assert re.search(r"marginal meta-train \+ evaluation [\d.]+ s a seed = [\d.]+× the limit", out)

    images = t["Images"]
    assert [r[:2] for r in images] == [["lenet5", "8"], ["lenet5", "16"]]
    for r in images:
        assert all(positive(c) for c in r[2:]), r
        ratio = number(r[3]) / number(r[2])
        assert abs(ratio - number(r[4])) <= 0.01 + 0.01 * ratio
