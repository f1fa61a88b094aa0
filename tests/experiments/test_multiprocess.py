"""Runs as several JAX processes (2 × 4 CPU devices, gloo) compute what 1 process of 8 does.

The multi-host code path on one machine (`tests.multiprocess.run_processes`): the
processes share one workdir, where process 0 alone writes metrics, figures, artifacts and
summaries; each reads its own share of every image batch; an orbax checkpoint they write
together resumes exactly, on the same number of processes or on one.
"""

import json
import os
import re
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from metalearn.losses.learned import load_learned_loss
from metalearn.tasks import images
from tests.experiments._multiprocess_child import RESULT_PREFIX
from tests.multiprocess import ROOT, failure_message, run_processes, start_processes

# Where the MNIST smoke reads the data: $TFDS_DATA_DIR, else ../shared/data/tfds.
TFDS = os.environ.get("TFDS_DATA_DIR") or os.path.join(ROOT, "..", "shared", "data", "tfds")
needs_mnist = pytest.mark.skipif(
    not os.path.isdir(os.path.join(TFDS, "mnist")), reason=f"no MNIST in {TFDS}"
)
DEVICES = 8  # in all: 1 process of 8 devices, or 2 processes of 4
TIMEOUT_S = 240  # one launch; each takes 5-45 s on a 2-core CPU
CHILD = ["-m", "tests.experiments._multiprocess_child"]
# ML³ sine: 4 seeds (2 a process), 10 meta steps, a checkpoint every 5.
SINE = [
    "--config=configs/ml3_sine.py:smoke",
    "--set=seeds=[0,1,2,3]",
    "--set=meta.steps=10",
    "--set=eval.every=5",
    "--set=checkpoint_every=5",
]
# AdaLFL on MNIST, LeNet-5: 10 offline and 10 online steps; an evaluation batch that
# splits over 8 devices.
MNIST = [
    "--config=configs/adalfl_mnist.py:smoke",
    "--set=meta.init_steps=10",
    "--set=inner.steps=10",
    "--set=inner.optimizer.schedule.steps=10",
    "--set=eval.every=10",
    "--set=checkpoint_every=10",
    "--set=eval.batch_size=200",
]


def start(config_args, workdir, processes, *, stop_at=None):
    """Starts the child on `processes` processes sharing `DEVICES` devices: a `Launch`."""
    args = [*CHILD, *config_args, f"--workdir={workdir}"]
    if stop_at is not None:
        args.append(f"--stop_at={stop_at}")
    return start_processes(args, processes, DEVICES // processes, TIMEOUT_S)


def outcome(launch, processes):
    """What each process of a started launch printed as its `RESULT` (with its stdout),
    checked to be the cluster asked for."""
    out = []
    for r in launch.wait():
        lines = [line for line in r.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        assert lines, f"process {r.process_id} printed no result:\n{r.stdout[-2000:]}"
        result = json.loads(lines[-1][len(RESULT_PREFIX) :])
        assert result["process_index"] == r.process_id
        assert (result["process_count"], result["device_count"]) == (processes, DEVICES)
        assert result["local_device_count"] == DEVICES // processes
        out.append({**result, "stdout": r.stdout})
    return out


def launch(config_args, workdir, processes, *, stop_at=None):
    """`start`, then its `outcome`."""
    with start(config_args, workdir, processes, stop_at=stop_at) as started:
        return outcome(started, processes)


def side_by_side(config_args, one, two):
    """The run on 1 process (in workdir `one`) and on 2 (in `two`), at the same time."""
    with start(config_args, one, 1) as a, start(config_args, two, 2) as b:
        return outcome(a, 1), outcome(b, 2)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def metric_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def numbers(tree, prefix=""):
    """{dotted key: float} of every number in a JSON tree (lists by index)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    out = {}
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list)):
            out.update(numbers(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


def assert_close(a, b, rtol, atol=0.0):
    """Same keys, every number within tolerance (both trees of JSON); the message names
    the numbers that differ."""
    na, nb = numbers(a), numbers(b)
    assert sorted(na) == sorted(nb)
    off = {
        k: (na[k], nb[k])
        for k in na
        if not np.isclose(na[k], nb[k], rtol=rtol, atol=atol, equal_nan=True)
    }
    assert not off, f"{len(off)} of {len(na)} numbers differ (rtol={rtol}, atol={atol}): {off}"


def layout(workdir):
    """What a run wrote, as sorted relative paths: checkpoints, TensorBoard events and the
    files inside orbax's `params/` folders left out (their names are hashes)."""
    found = set()
    for root, dirs, files in os.walk(workdir):
        rel = os.path.relpath(root, workdir)
        if rel.split(os.sep)[0] in ("checkpoints", "tensorboard"):
            continue
        if os.path.basename(root) == "params":
            found.add(rel + "/")
            dirs.clear()
            continue
        found.update(os.path.normpath(os.path.join(rel, f)) for f in files)
    return sorted(found)


def check_written_once(workdir, launches=1):
    """One writer: no step logged twice, one TensorBoard file a launch, no half-written
    file, and figures that are PNGs."""
    logged = {}  # a step's training metrics and its evaluation are rows of their own
    for row in metric_rows(workdir):
        names = logged.setdefault(row["step"], set())
        assert not names & row.keys() - {"step"}, f"step {row['step']} was logged twice"
        names.update(row.keys() - {"step"})
    assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == launches
    files = layout(workdir)
    assert not [f for f in files if f.endswith(".tmp")], files
    pngs = [f for f in files if f.endswith(".png")]
    assert pngs
    for f in pngs:
        with open(os.path.join(workdir, f), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n", f


def check_same_run(one, two, rtol, metrics_rtol, metrics_atol=0.0, launches=1):
    """The run in workdir `two` wrote what the one in `one` did, to float tolerance:
    summary, metrics, the same files (`two` in `launches` launches)."""
    assert layout(two) == layout(one)
    assert_close(read_json(f"{two}/summary.json"), read_json(f"{one}/summary.json"), rtol)
    rows_one, rows_two = metric_rows(one), metric_rows(two)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]
    assert_close(rows_two, rows_one, metrics_rtol, metrics_atol)
    check_written_once(two, launches)


def test_waiting_without_check_lets_every_process_finish():
    """A process that exits with a nonzero status (75: preempted) ends a checked wait;
    an unchecked one waits for the others, which may still be writing their part."""
    import subprocess
    import sys

    from tests.multiprocess import _wait

    def launch_two():
        quick = subprocess.Popen([sys.executable, "-c", "raise SystemExit(75)"])
        slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
        return [quick, slow]

    for stop_at_failure, slow_code in ((False, 0), (True, None)):
        procs = launch_two()
        t0 = time.monotonic()
        reason = _wait(procs, t0 + 60, 60, t0, stop_at_failure=stop_at_failure)
        assert reason.startswith("Process 0 of 2 exited with status 75"), reason
        assert [p.poll() for p in procs] == [75, slow_code]
        procs[1].kill()
        procs[1].wait()


@pytest.fixture(scope="module")
def sine_runs(tmp_path_factory):
    """Workdirs of the sine run on 1 process of 8 devices and on 2 processes of 4."""
    root = tmp_path_factory.mktemp("sine")
    one, two = side_by_side(SINE, root / "one", root / "two")
    return root, {"one": one, "two": two}


@pytest.mark.slow  # `sine_runs`: two smoke runs side by side (~30 s)
def test_ml3_sine_on_2_processes_equals_1_process_of_8_devices(sine_runs):
    root, runs = sine_runs
    # The seeds are spread over both processes' devices, 2 each.
    assert all(r["mesh_processes"] == [0, 1] and r["mesh_devices"] == 4 for r in runs["two"])
    check_same_run(root / "one", root / "two", rtol=1e-5, metrics_rtol=1e-5, metrics_atol=1e-7)
    for seed in range(4):  # the artifacts written by 2 processes load in one
        one = load_learned_loss(f"{root}/one/learned_loss/seed_{seed}")
        two = load_learned_loss(f"{root}/two/learned_loss/seed_{seed}")
        for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@needs_mnist
@pytest.mark.slow  # two smoke runs of LeNet-5 side by side (~45 s)
def test_adalfl_mnist_on_2_processes_equals_1_process_of_8_devices(tmp_path):
    one, two = side_by_side(MNIST, tmp_path / "one", tmp_path / "two")
    assert one[0]["mesh_devices"] == 8
    assert all(r["mesh_processes"] == [0, 1] and r["mesh_devices"] == 8 for r in two)
    # The batch's gradient is reduced across the processes (gloo) instead of within one:
    # the same sums in another order.
    check_same_run(tmp_path / "one", tmp_path / "two", 1e-4, 1e-4, metrics_atol=1e-7)


# Each process writes the examples it read of every train and evaluation batch, and the
# global batch it built from them, read back whole.
READ_SHARES = """
import sys
import numpy as np
from metalearn.runtime import sharding
sharding.initialize_distributed()
import jax
from metalearn.tasks import images

n, batch, seed, steps, out = 40, 8, 3, 10, sys.argv[1]
ids = np.arange(n)
pixels = ids.astype(np.uint8).reshape(n, 1, 1, 1)  # each image holds its index
train = images.host_batches(pixels, ids, batch, seed, 0)
local = [next(train)["label"] for _ in range(steps)]
evals = [b["label"][b["mask"] > 0] for b in images.eval_batches(pixels[:37], ids[:37], batch)]
mesh = sharding.make_mesh()
built = images.prefetch_to_device(
    images.host_batches(pixels, ids, batch, seed, 0), sharding.data_sharded(mesh)
)
whole = [sharding.host_get(next(built)["label"]) for _ in range(steps)]
seed_meshes = {s: [d.process_index for d in sharding.seed_mesh(s).devices.flat] for s in (2, 4, 16)}
try:
    sharding.seed_mesh(5)
    refused = ""
except ValueError as e:
    refused = str(e)
np.savez(f"{out}/{jax.process_index()}.npz", train=np.stack(local), whole=np.stack(whole),
         **{f"eval_{i}": e for i, e in enumerate(evals)},
         **{f"seed_mesh_{s}": np.asarray(p) for s, p in seed_meshes.items()}, refused=refused)
"""


def check_shares(shares, batches):
    """Each share of a batch disjoint from the others, all together the batch, in order.

    Args:
      shares: per process, its part of every batch [steps][B / processes].
      batches: the global batches [steps][B].
    """
    for step, batch in enumerate(batches):
        parts = [np.asarray(s[step]) for s in shares]
        seen = np.concatenate(parts)
        assert len(np.unique(seen)) == len(seen), f"step {step}: processes read the same examples"
        np.testing.assert_array_equal(seen, batch, err_msg=f"step {step}")


@pytest.fixture(scope="module")
def shares(tmp_path_factory):
    """What each of 2 processes of 4 devices saved of `READ_SHARES`."""
    out = tmp_path_factory.mktemp("shares")
    run_processes(["-c", READ_SHARES, str(out)], 2, 4, TIMEOUT_S)
    return [dict(np.load(out / f"{i}.npz")) for i in range(2)]


def test_each_process_reads_its_own_share_of_every_batch(shares):
    saved = shares
    n, batch, seed, steps = 40, 8, 3, 10
    full = [images.batch_indices(n, batch, seed, t) for t in range(steps)]
    shares = [s["train"] for s in saved]
    assert shares[0].shape == (steps, batch // 2)
    check_shares(shares, full)
    epoch = np.concatenate([np.concatenate([s[t] for s in shares]) for t in range(5)])
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))  # one epoch: every example once
    for s in saved:  # every process built the whole global batch from the shares
        np.testing.assert_array_equal(s["whole"], np.stack(full))
    # Evaluation: 37 examples in batches of 8, the last padded; real examples only.
    evals = [[s[f"eval_{i}"] for i in range(5)] for s in saved]
    check_shares(evals, [np.arange(37)[i : i + batch] for i in range(0, 37, batch)])
    # The check fails where every process read the same slice.
    with pytest.raises(AssertionError, match="the same examples"):
        check_shares([shares[0], shares[0]], full)


def test_the_seed_mesh_takes_the_same_devices_of_every_process(shares):
    for saved in shares:  # the same mesh on both
        np.testing.assert_array_equal(saved["seed_mesh_2"], [0, 1])  # one device of each
        np.testing.assert_array_equal(saved["seed_mesh_4"], [0, 0, 1, 1])
        np.testing.assert_array_equal(saved["seed_mesh_16"], [0] * 4 + [1] * 4)
        assert "5 seeds cannot be split evenly over the mesh's 2 processes" in str(saved["refused"])


@pytest.mark.slow  # three more sine runs (~35 s), after `sine_runs`
def test_a_checkpoint_of_2_processes_resumes_exactly_on_2_and_on_1(sine_runs, tmp_path):
    root, _ = sine_runs
    two = tmp_path / "two"
    stopped = launch(SINE, two, 2, stop_at=5)
    assert not any(r["finished"] for r in stopped)
    assert sorted(os.listdir(two / "checkpoints")) == ["5"]
    one = tmp_path / "one"
    shutil.copytree(two, one)

    with start(SINE, two, 2) as on_two, start(SINE, one, 1) as on_one:
        resumed, moved = outcome(on_two, 2), outcome(on_one, 1)
    assert all("Resuming from the checkpoint at step 5" in r["stdout"] for r in resumed + moved)
    # Bit for bit the uninterrupted run on 2 processes.
    assert read_json(two / "summary.json") == read_json(root / "two" / "summary.json")
    assert metric_rows(two) == metric_rows(root / "two")
    check_written_once(two, launches=2)

    # On 1 process of 8 devices orbax reads the shards both processes wrote: the run
    # ends where the uninterrupted one does, to float tolerance (other programs).
    check_same_run(root / "one", one, 1e-5, 1e-5, metrics_atol=1e-7, launches=2)
    assert_close(read_json(one / "summary.json"), read_json(root / "two" / "summary.json"), 1e-5)


@pytest.mark.slow  # two more 2-process sine runs through the CLI (~30 s), after `sine_runs`
def test_sigterm_to_one_process_stops_both_at_one_step_and_a_rerun_resumes_exactly(
    sine_runs, tmp_path
):
    """A preemption notice reaches one host: every process stops after the same step
    (the stop is agreed between them), writes its part of that step's checkpoint, exits
    with 75; the same command then resumes to the uninterrupted run bit for bit."""
    from experiments.run import PREEMPTED_STATUS

    root, _ = sine_runs
    workdir = tmp_path / "run"
    # SINE through `experiments.run`, checkpoints every 10 steps: a stop after step 5
    # comes between two of them.
    cli = [
        "-m",
        "experiments.run",
        "--config=configs/ml3_sine.py:smoke",
        "--config.seeds=(0,1,2,3)",
        "--config.meta.steps=10",
        "--config.eval.every=5",
        "--config.checkpoint_every=10",
        f"--workdir={workdir}",
    ]
    with start_processes(cli, 2, DEVICES // 2, TIMEOUT_S) as first:
        # Signalled while the first chunk of steps compiles (seconds): after the loop's
        # first poll, before its second.
        deadline = time.monotonic() + TIMEOUT_S
        while "compiling and running the first" not in first.output_so_far(0):
            assert time.monotonic() < deadline, first.output_so_far(0)
            time.sleep(0.02)
        first.send_signal(1, signal.SIGTERM)
        stopped = first.wait(check=False)
    for r in stopped:
        assert r.returncode == PREEMPTED_STATUS, failure_message("not preempted", stopped)
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
    steps = [re.search(r"Stopped at step (\d+) of 10 on request", r.stderr) for r in stopped]
    assert all(steps), failure_message("no stop message", stopped)
    (at, *others) = {int(m[1]) for m in steps}
    assert not others and at in (5, 10), steps  # one step for both; 5 unless the run was fast
    assert "SIGTERM: stopping" in stopped[1].stderr
    assert "SIGTERM" not in stopped[0].stderr  # process 0 stopped because process 1 did
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(at)]

    with start_processes(cli, 2, DEVICES // 2, TIMEOUT_S) as second:
        resumed = second.wait()
    assert all(f"Resuming from the checkpoint at step {at}" in r.stdout for r in resumed)
    assert read_json(workdir / "summary.json") == read_json(root / "two" / "summary.json")
    assert metric_rows(workdir) == metric_rows(root / "two")
    check_written_once(workdir, launches=2)
