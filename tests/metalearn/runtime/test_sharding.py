"""The single-process side of the multi-process helpers (tests/experiments/
test_multiprocess.py runs the other side: several processes)."""

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
