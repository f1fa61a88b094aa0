"""Metric logging: `metrics.jsonl` (one object per logged step) and TensorBoard events.

Values may be scalars or small per-seed vectors. JSONL keeps them as numbers or lists;
TensorBoard gets the scalar, or for a vector its mean under the plain name and each
entry under `<name>/seed_<i>`. Names under `curve/` (a function sampled on a grid, e.g.
a learned loss's shape) go to JSONL only. Only process 0 writes: the processes of a
multi-host run share the workdir, so this module's writers (`MetricWriter`,
`truncate_metrics`, `write_json`) do nothing on the others.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from tensorboardX import FileWriter
from tensorboardX.proto.summary_pb2 import Summary

from metalearn.runtime.sharding import is_main_process

METRICS_FILE = "metrics.jsonl"


def to_python(value: Any) -> Any:
    """Numbers and nested lists from arrays, for JSON."""
    arr = np.asarray(value)
    return arr.item() if arr.ndim == 0 else arr.tolist()


def mean_std(values) -> dict:
    """{'per_seed': [...], 'mean': m, 'std': s} of a 1-D array (population std): the form
    of every number in a `summary.json`."""
    arr = np.asarray(values, dtype=np.float64)
    return {"per_seed": arr.tolist(), "mean": float(arr.mean()), "std": float(arr.std())}


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All rows of `<workdir>/metrics.jsonl` (empty if there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: str, obj: Any) -> None:
    """Writes `obj` as indented JSON to `path` atomically (a temporary file renamed into
    place), on process 0 only."""
    if not is_main_process():
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def truncate_metrics(workdir: str, last_step: int) -> None:
    """Drops rows logged after `last_step`: a resumed run recomputes them (process 0)."""
    if not is_main_process():
        return
    rows = [r for r in read_metrics(workdir) if r["step"] <= last_step]
    path = os.path.join(workdir, METRICS_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


class MetricWriter:
    """Appends metrics to `metrics.jsonl` and to TensorBoard event files.

    Each `write` is one row of `metrics.jsonl` and one TensorBoard event holding every
    scalar of the row (a vector's mean and its entries): TensorBoard reads each as its own
    series, as it reads one event a scalar, which `SummaryWriter.add_scalar` writes at
    many times the cost (an event, a lock and a queue entry per value).
    """

    def __init__(self, workdir: str):
        self._active = is_main_process()
        if not self._active:
            return
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")  # noqa: SIM115
        self._tb = FileWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self._active or not metrics:
            return
        row = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        values = []
        for name, value in metrics.items():
            if name.startswith("curve/"):
                continue
            arr = np.asarray(value, dtype=np.float64)
            values.append(Summary.Value(tag=name, simple_value=float(arr.mean())))
            if arr.ndim == 1 and arr.size > 1:
                values += [
                    Summary.Value(tag=f"{name}/seed_{i}", simple_value=float(v))
                    for i, v in enumerate(arr)
                ]
        if values:
            self._tb.add_summary(Summary(value=values), int(step))

    def flush(self) -> None:
        if self._active:
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
            self._tb.flush()

    def close(self) -> None:
        if self._active:
            self.flush()
            self._jsonl.close()
            self._tb.close()
