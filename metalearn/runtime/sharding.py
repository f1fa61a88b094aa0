"""Device meshes for data parallelism: the batch split across devices, parameters replicated.

One `jax.sharding.Mesh` with a single `data` axis over every device of every host. Jitted
steps take their state replicated and their batches sharded along the leading axis; XLA
inserts the cross-device reductions (gradient means, batch-norm statistics), so a step
on N devices computes the same numbers as on one, up to float reassociation.

ML³ experiments shard their independent seeds instead (`seed_mesh`): each device
meta-trains its own seeds, with no communication until the host reads metrics.

On several hosts (or several processes on one machine, `tests/multiprocess.py`), call
`initialize_distributed()` first (the entry point does). Every process then runs the
same programs on global arrays: it places host values with `put`, reads results with
`host_get` (which gathers what other processes hold), and reads only its own slice of
every global batch (`metalearn.tasks.images.host_batches`, `eval_batches`); process 0
alone writes files into the workdir they share (`is_main_process`).
"""

import os
import signal
import threading

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
# A launch of several processes names its coordinator (host:port) and, where no cluster
# manager (SLURM, Open MPI) tells JAX, the number of processes and this process's id.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
# Launchers whose environment jax.distributed.initialize() reads by itself.
_CLUSTER_SIZE_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def initialize_distributed(force: bool = False) -> bool:
    """Calls `jax.distributed.initialize()` when launched as several processes.

    A multi-process launch is recognised from its environment: `JAX_COORDINATOR_ADDRESS`
    (host:port of process 0's coordinator) with `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID` (or a cluster manager that supplies them), SLURM or Open MPI with
    more than one task; or it is forced. A single-process run does nothing. Must be
    called before anything else uses JAX. Collectives between the processes' CPU
    devices go through gloo over TCP (CPU-only launches, e.g. several processes on one
    machine; GPUs and TPUs use their own).

    Args:
      force: initialize even without such an environment (JAX's auto-detection then
        has to find the cluster).

    A Python SIGTERM handler installed before the call stays in place (JAX's
    initialization would otherwise replace it with its own preemption notifier).

    Returns:
      Whether this call initialized JAX's distributed runtime (False where it was
      already initialized, or for a single process).

    Raises:
      ValueError: only one of `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` is set, or
        either is not an integer.
    """
    if jax.distributed.is_initialized():
        return False
    address = os.environ.get(COORDINATOR_ENV)
    clustered = any(int(os.environ.get(v, "0") or 0) > 1 for v in _CLUSTER_SIZE_ENV)
    if not (force or address or clustered):
        return False
    kwargs = {}
    num, pid = os.environ.get(NUM_PROCESSES_ENV), os.environ.get(PROCESS_ID_ENV)
    if (num is None) != (pid is None):
        raise ValueError(
            f"{NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} go together (got only "
            f"{NUM_PROCESSES_ENV if pid is None else PROCESS_ID_ENV}): set both, or neither "
            "where a cluster manager (SLURM, Open MPI) supplies them."
        )
    if num is not None:
        try:
            kwargs = {"num_processes": int(num), "process_id": int(pid)}
        except ValueError:
            raise ValueError(
                f"{NUM_PROCESSES_ENV}={num!r} and {PROCESS_ID_ENV}={pid!r} must be integers."
            ) from None
    if not jax.config.jax_cpu_collectives_implementation:
        # Without CPU collectives a program over several processes' CPU devices fails
        # (older jax had none by default; this one defaults to gloo).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # `jax.distributed.initialize` puts JAX's preemption notifier on SIGTERM, which only
    # records the signal for `multihost_utils.reached_preemption_sync_point`: a handler
    # of the caller's (e.g. `experiments.run`'s checkpoint-and-stop) would never run.
    # Keep the caller's; with none, JAX's stays.
    before = signal.getsignal(signal.SIGTERM)
    jax.distributed.initialize(coordinator_address=address, **kwargs)
    if callable(before) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, before)
    return True


def is_main_process() -> bool:
    """Whether this is process 0, the one that writes a run's files (metrics, figures,
    summaries) into a workdir every process shares; True without a distributed runtime
    (asked then, it starts no JAX backend)."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis `data` over the first `num_devices` devices (default: all)."""
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"Asked for {num_devices} devices; {len(devices)} are available.")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer and loss state)."""
    return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split across the `data` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
    """Raises a ValueError unless `batch_size` splits evenly across the mesh's devices."""
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"The {what} ({batch_size}) must be divisible by the number of devices ({n}); "
            f"use a multiple of {n}."
        )


def seed_mesh(num_seeds: int, mesh: Mesh | None = None) -> Mesh:
    """The 1-D `data` mesh an ML³ experiment spreads its `num_seeds` seeds over.

    The largest number of devices of `mesh` (default: every device) that divides the
    seeds evenly: 8 seeds on 8 devices one each, 5 seeds on 8 devices one each on 5 of
    them, 2 seeds on 1 device both. Where the devices belong to several processes, every
    process takes the same share (the first devices of each): 4 seeds on 2 processes of
    4 devices each use 2 devices of each process, 2 seeds one device of each.

    Raises:
      ValueError: the seeds cannot be split evenly over the processes (5 seeds on 2).
    """
    devices = list((mesh.devices if mesh is not None else np.asarray(jax.devices())).flat)
    by_process: dict[int, list] = {}
    for d in devices:
        by_process.setdefault(d.process_index, []).append(d)
    processes = len(by_process)
    if num_seeds % processes:
        raise ValueError(
            f"{num_seeds} seeds cannot be split evenly over the mesh's {processes} "
            f"processes: use a multiple of {processes} seeds, or fewer processes."
        )
    per_process = min(len(ds) for ds in by_process.values())
    share = num_seeds // processes
    used = max(d for d in range(1, min(share, per_process) + 1) if share % d == 0)
    chosen = [d for _, ds in sorted(by_process.items()) for d in ds[:used]]
    return Mesh(np.asarray(chosen), (DATA_AXIS,))


def put(value, sharding: jax.sharding.Sharding):
    """`jax.device_put(value, sharding)` for a host value every process holds whole.

    On several processes `jax.device_put` refuses a sharding with devices of other
    processes; each process then places its devices' parts of the (same) value.

    Args:
      value: a pytree of host arrays or scalars, equal on every process.
      sharding: where the result lives (e.g. `replicated(mesh)`, `data_sharded(mesh)`).

    Returns:
      The pytree of global `jax.Array`s.
    """
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)),
        value,
    )


def host_get(tree):
    """`jax.device_get(tree)` that also reads arrays spread over several processes.

    An array with shards on other processes' devices (the seeds of an ML³ run on several
    hosts) is gathered whole to every process: a collective, so every process must call
    this at the same point with the same structure. On one process it is
    `jax.device_get`.

    Returns:
      The pytree with numpy leaves (and the non-array leaves unchanged).
    """
    leaves, treedef = jax.tree.flatten(tree)
    spread = [
        i
        for i, x in enumerate(leaves)
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated)
    ]
    if spread:
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather([leaves[i] for i in spread], tiled=True)
        for i, x in zip(spread, gathered, strict=True):
            leaves[i] = x
    return jax.device_get(jax.tree.unflatten(treedef, leaves))


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier `name` (nothing on one process):
    e.g. before other processes read a file process 0 has just written."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
