"""Device meshes for data parallelism: the batch split across devices, parameters replicated.

One `jax.sharding.Mesh` with a single `data` axis over every device of every host. Jitted
steps take their state replicated and their batches sharded along the leading axis; XLA
inserts the cross-device reductions (gradient means, batch-norm statistics), so a step
on N devices computes the same numbers as on one, up to float reassociation.

ML³ experiments shard their independent seeds instead (`seed_mesh`, `seed_sharded`): each
device meta-trains its own seeds, with no communication until the host reads metrics.

On several hosts, call `initialize_distributed()` first (the entry point does); each host
then reads only its own slice of every global batch (`metalearn.tasks.images.host_batches`).
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
# Set by the launchers jax.distributed.initialize() can auto-detect, or by hand.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def initialize_distributed(force: bool = False) -> None:
    """Calls `jax.distributed.initialize()` when launched on several hosts.

    A multi-host launch is recognised from its environment (JAX_COORDINATOR_ADDRESS,
    SLURM, Open MPI) or forced; a single-host run does nothing.
    """
    if (
        force
        or any(int(os.environ.get(v, "0") or 0) > 1 for v in _CLUSTER_ENV[1:])
        or (os.environ.get(_CLUSTER_ENV[0]))
    ):
        jax.distributed.initialize()


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
    them, 2 seeds on 1 device both.
    """
    devices = list((mesh.devices if mesh is not None else np.asarray(jax.devices())).flat)
    used = max(d for d in range(1, min(num_seeds, len(devices)) + 1) if num_seeds % d == 0)
    return Mesh(np.asarray(devices[:used]), (DATA_AXIS,))
