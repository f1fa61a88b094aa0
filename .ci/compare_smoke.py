"""Compares the `:smoke` runs of two trees: summary.json and metrics.jsonl byte for byte.

    python .ci/compare_smoke.py BEFORE_ROOT AFTER_ROOT [--by-name] [--new=KEY,...]

Each root holds run directories (found by their config.json, at any depth); a run of
AFTER is paired with the run of BEFORE whose config.json is the same (with --by-name:
the one at the same relative path, for a change that adds a config key on purpose).
Wall-clock fields (names with time, seconds, wall, per_sec or steps_per_s) are left out,
and so are the keys given with --new (fields a change adds on purpose, and the ones
below them: meta/finite/...), from AFTER only:
every other field must be byte-identical.
"""

import json
import os
import re
import sys

_CLOCK = re.compile(r"time|seconds|wall|per_sec|steps_per_s|_s$")


def _runs(root, by_name=False):
    for d, _, files in os.walk(root):
        if "config.json" in files and "summary.json" in files:
            if by_name:
                yield os.path.relpath(d, root), d
                continue
            with open(os.path.join(d, "config.json")) as f:
                yield json.dumps(json.load(f), sort_keys=True), d


def _strip(obj, new=()):
    if isinstance(obj, dict):
        drop = lambda k: _CLOCK.search(k) or any(k == n or k.startswith(n + "/") for n in new)  # noqa: E731
        return {k: _strip(v, new) for k, v in obj.items() if not drop(k)}
    if isinstance(obj, list):
        return [_strip(v, new) for v in obj]
    return obj


def _read(d, new=()):
    with open(os.path.join(d, "summary.json")) as f:
        summary = json.dumps(_strip(json.load(f), new), sort_keys=True)
    with open(os.path.join(d, "metrics.jsonl")) as f:
        rows = [json.dumps(_strip(json.loads(line), new), sort_keys=True) for line in f]
    return summary, rows


def main(before_root, after_root, *flags):
    by_name = "--by-name" in flags
    new = [k for f in flags if f.startswith("--new=") for k in f[len("--new=") :].split(",")]
    before = dict(_runs(before_root, by_name))
    bad = 0
    for key, d in sorted(_runs(after_root, by_name), key=lambda kv: kv[1]):
        if key not in before:
            print(f"NO BASELINE  {d}")
            continue
        same = _read(before[key]) == _read(d, new)
        bad += not same
        print(f"{'IDENTICAL' if same else 'DIFFERENT'}  {d}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
