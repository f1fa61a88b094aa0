"""The single-process side of the multi-process helpers (tests/experiments/
test_multiprocess.py runs the other side: several processes)."""

import signal

import chex
import jax
import numpy as np
import pytest

from metalearn.runtime import sharding

CLUSTER_VARS = (
    sharding.COORDINATOR_ENV,
    sharding.NUM_PROCESSES_ENV,
    sharding.PROCESS_ID_ENV,
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
)


@pytest.fixture
def no_cluster(monkeypatch):
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_single_process_launch_initializes_nothing(no_cluster):
    no_cluster.setenv("SLURM_NTASKS", "1")
    assert sharding.initialize_distributed() is False
    assert not jax.distributed.is_initialized()
    assert sharding.is_main_process()


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({sharding.NUM_PROCESSES_ENV: "2"}, "go together"),
        ({sharding.PROCESS_ID_ENV: "0"}, "go together"),
        ({sharding.NUM_PROCESSES_ENV: "two", sharding.PROCESS_ID_ENV: "0"}, "integers"),
    ],
)
def test_a_half_described_launch_is_refused_before_jax_starts(no_cluster, env, match):
    no_cluster.setenv(sharding.COORDINATOR_ENV, "localhost:1")
    for name, value in env.items():
        no_cluster.setenv(name, value)
    with pytest.raises(ValueError, match=match):
        sharding.initialize_distributed()
    assert not jax.distributed.is_initialized()


@pytest.mark.parametrize("ours", [True, False])
def test_a_sigterm_handler_installed_before_initialize_stays(no_cluster, ours):
    """`jax.distributed.initialize` replaces SIGTERM's handler with JAX's preemption
    notifier (here a stand-in that does the same): the caller's is put back; with none,
    JAX's stays."""
    jax_notifier = lambda signum, frame: None  # noqa: E731
    mine = lambda signum, frame: None  # noqa: E731
    calls = []

    def fake_initialize(**kwargs):
        calls.append(kwargs)
        signal.signal(signal.SIGTERM, jax_notifier)

    previous = signal.signal(signal.SIGTERM, mine if ours else signal.SIG_DFL)
    try:
        no_cluster.setattr(jax.distributed, "initialize", fake_initialize)
        no_cluster.setenv(sharding.COORDINATOR_ENV, "localhost:1")
        assert sharding.initialize_distributed() is True
        assert calls == [{"coordinator_address": "localhost:1"}]
        assert signal.getsignal(signal.SIGTERM) is (mine if ours else jax_notifier)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_put_and_host_get_are_device_put_and_device_get_on_one_process():
    mesh = sharding.make_mesh()
    x, step = np.arange(4, dtype=np.float32), np.int32(3)
    placed = {
        "x": sharding.put(x, sharding.data_sharded(mesh)),
        "step": sharding.put(step, sharding.replicated(mesh)),
    }
    assert placed["x"].sharding == sharding.data_sharded(mesh)
    chex.assert_trees_all_equal(sharding.host_get(placed), {"x": x, "step": step})
    sharding.barrier("nothing to wait for")  # one process: returns at once
