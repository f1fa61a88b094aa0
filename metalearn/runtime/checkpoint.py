"""Checkpoints through orbax: atomic, step-numbered, restored into the same structure.

Orbax writes each checkpoint to a temporary directory and renames it into place when
complete, so an interrupted save never leaves a checkpoint that restores half-written.
"""

import os
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp


def latest_checkpoint(workdir: str) -> int | None:
    """The step of the newest complete checkpoint in `workdir`, or None; read from the
    folder names alone (orbax renames a checkpoint into place when it is complete)."""
    folder = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=None)


class Checkpointer:
    """Saves and restores an experiment state pytree under `<workdir>/checkpoints`.

    The newest `max_to_keep` checkpoints are kept, and those of `keep_steps` for good
    (e.g. the end of an offline phase, which another run may start from).
    """

    def __init__(self, workdir: str, max_to_keep: int = 2, keep_steps: Sequence[int] = ()):
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(max_to_keep),
                ocp.checkpoint_managers.CustomSteps(list(keep_steps)),
            ]
        )
        self._manager = ocp.CheckpointManager(
            os.path.join(os.path.abspath(workdir), "checkpoints"),
            options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=True),
        )

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any) -> None:
        self._manager.save(step, args=ocp.args.StandardSave(state))
        self._manager.wait_until_finished()

    def restore(self, step: int, like: Any) -> Any:
        """Restores step `step` into the structure, shapes and dtypes of `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def close(self) -> None:
        self._manager.close()
