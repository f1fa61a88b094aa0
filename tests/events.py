"""Reads back the TensorBoard event files of a run directory, for tests."""

import glob
import os
import struct

from tensorboardX.proto.event_pb2 import Event


def read_scalars(workdir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of every scalar in the run's TensorBoard event files (each
    record: a little-endian length, its CRC, the serialized `Event`, the data's CRC).

    A resumed run writes a file of its own, which may log again the steps after the
    checkpoint it resumed from: a later file's value wins, as the rerun's does. Within
    one file a series has one value a step (else AssertionError).
    """
    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "*"))):
        seen = set()
        with open(path, "rb") as f:
            while header := f.read(12):
                (length,) = struct.unpack("<Q", header[:8])
                event = Event.FromString(f.read(length))
                f.read(4)
                for value in event.summary.value:
                    key = (value.tag, event.step)
                    assert key not in seen, f"{value.tag} at step {event.step} twice in {path}"
                    seen.add(key)
                    out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out
