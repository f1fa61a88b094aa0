"""Checkpoints through orbax: atomic, step-numbered, restored into the same structure.

Orbax writes each checkpoint to a temporary directory and renames it into place when
complete, so an interrupted save never leaves a checkpoint that restores half-written.
A checkpoint damaged afterwards (a truncated file on a full disk, a bad copy) is not
deleted: `Checkpointer.restore_latest` moves it aside to `<workdir>/checkpoints_unreadable/`
and falls back to the newest one it can read, saying so in one line.
"""

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp

UNREADABLE_DIR = "checkpoints_unreadable"


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
        self._workdir = os.path.abspath(workdir)
        self._options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
                [
                    ocp.checkpoint_managers.LatestN(max_to_keep),
                    ocp.checkpoint_managers.CustomSteps(list(keep_steps)),
                ]
            ),
            create=True,
        )
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        folder = os.path.join(self._workdir, "checkpoints")
        return ocp.CheckpointManager(folder, options=self._options)

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

    def restore_latest(self, like: Any, say: Callable[[str], None] = print) -> tuple[Any, Any]:
        """`(step, state)` of the newest checkpoint that can be read, `(None, like)` if none.

        A checkpoint that fails to restore is moved to `<workdir>/checkpoints_unreadable/`
        (never deleted), with one line through `say` naming it, why, and what is used
        instead; the next older one is tried.
        """
        for step in sorted(self.all_steps(), reverse=True):
            try:
                return step, self.restore(step, like)
            except Exception as e:  # noqa: BLE001 - any failure to read means unreadable
                aside = self._move_aside(step)
                older = [s for s in self.all_steps() if s < step]
                then = f"resuming from step {max(older)}" if older else "starting from step 0"
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                say(
                    f"The checkpoint at step {step} cannot be read ({type(e).__name__}: "
                    f"{reason}); moved it to {aside}, {then}."
                )
        return None, like

    def _move_aside(self, step: int) -> str:
        """Moves checkpoint `step` out of orbax's folder; reopens the manager."""
        self._manager.close()
        aside = os.path.join(
            self._workdir, UNREADABLE_DIR, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(aside), exist_ok=True)
            os.replace(os.path.join(self._workdir, "checkpoints", str(step)), aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self._manager = self._open()
        return aside

    def close(self) -> None:
        self._manager.close()
