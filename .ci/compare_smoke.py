"""Compares the `:smoke` runs of two trees: summary.json and metrics.jsonl byte for byte.

    python .ci/compare_smoke.py BEFORE_ROOT AFTER_ROOT

Each root holds run directories (found by their config.json, at any depth); a run of
AFTER is paired with the run of BEFORE whose config.json is the same. Wall-clock
fields (names with time, seconds, wall, per_sec or steps_per_s) are left out.
"""

import json
import os
import re
import sys

_CLOCK = re.compile(r"time|seconds|wall|per_sec|steps_per_s|_s$")


def _runs(root):
    for d, _, files in os.walk(root):
        if "config.json" in files and "summary.json" in files:
            with open(os.path.join(d, "config.json")) as f:
                yield json.dumps(json.load(f), sort_keys=True), d


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not _CLOCK.search(k)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _read(d):
    with open(os.path.join(d, "summary.json")) as f:
        summary = json.dumps(_strip(json.load(f)), sort_keys=True)
    with open(os.path.join(d, "metrics.jsonl")) as f:
        rows = [json.dumps(_strip(json.loads(line)), sort_keys=True) for line in f]
    return summary, rows


def main(before_root, after_root):
    before = dict(_runs(before_root))
    bad = 0
    for key, d in sorted(_runs(after_root), key=lambda kv: kv[1]):
        if key not in before:
            print(f"NO BASELINE  {d}")
            continue
        same = _read(before[key]) == _read(d)
        bad += not same
        print(f"{'IDENTICAL' if same else 'DIFFERENT'}  {d}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
