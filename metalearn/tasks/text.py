"""Byte-level text data: tiny_shakespeare from tfds, or any text file, as token arrays.

Tokens are the 256 byte values plus special tokens (`SPECIALS`), so no vocabulary is ever
downloaded and any UTF-8 text works. Splits are uint8 arrays kept on the device; a batch
of windows is a pure function of (key, step), drawn inside the jitted step (`windows`).
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metalearn.tasks import prepared
from metalearn.types import Array, PRNGKey

NUM_BYTES = 256
LOSS = 256  # the loss-mode token: `input ⊕ prediction ⊕ [LOSS]`
PAD = 257
GIST = 258  # first of `NUM_GIST` ids reserved for gist tokens (not used yet)
NUM_GIST = 8
VOCAB_SIZE = NUM_BYTES + 2 + NUM_GIST
SPECIALS = {"[LOSS]": LOSS, "[PAD]": PAD, "[GIST]": GIST}
SOURCES = ("tfds", "file")
SPLITS = ("train", "validation", "test")


# eq=False: the fields are arrays, whose == is elementwise.
@dataclasses.dataclass(frozen=True, eq=False)
class TextData:
    """The three splits of a corpus as read-only uint8 byte arrays."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray

    def split(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise ValueError(f"Unknown split {name!r}; choose one of {SPLITS}.")
        return getattr(self, name)


def encode(text: str | bytes) -> np.ndarray:
    """uint8 byte tokens of a string (UTF-8) or bytes."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return np.frombuffer(raw, dtype=np.uint8)


def decode(tokens) -> str:
    """Text of byte tokens; specials are shown by name, invalid UTF-8 replaced."""
    names = {v: k for k, v in SPECIALS.items()}
    out, buf = [], bytearray()
    for t in np.asarray(tokens).reshape(-1).tolist():
        if t < NUM_BYTES:
            buf.append(t)
            continue
        out.append(buf.decode("utf-8", errors="replace"))
        buf = bytearray()
        out.append(names.get(t, f"[GIST{t - GIST}]" if t >= GIST else f"[{t}]"))
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)


def load_text(config: ml_collections.ConfigDict) -> TextData:
    """Reads the corpus a `data` config group names.

    Args:
      config: fields `source` ('tfds' | 'file'); for 'tfds' `name`, `data_dir` ('' =
        $TFDS_DATA_DIR or tfds's default) and `download`; for 'file' `path` and
        `split_fractions` (validation, test: the last parts of the file, in that order).

    Raises:
      FileNotFoundError: the dataset or file is missing, with how to provide it.
      ValueError: an unknown source, bad fractions, or a split too short for a window.
    """
    if config.source == "tfds":
        data_dir = prepared.resolve_data_dir(config.data_dir)
        version = prepared.prepared_version(config.name, data_dir, bool(config.download))
        return _read_tfds(config.name, version, data_dir)
    if config.source == "file":
        return _read_file(os.path.abspath(os.path.expanduser(config.path)), config.split_fractions)
    raise ValueError(f"Unknown text source {config.source!r}; choose one of {SOURCES}.")


@functools.lru_cache(maxsize=4)
def _read_tfds(name: str, version: str, data_dir: str) -> TextData:
    splits = {}
    for split in SPLITS:
        source = prepared.tfds().data_source(
            f"{name}:{version}", split=split, data_dir=data_dir, download=False
        )
        records = [source[i] for i in range(len(source))]
        if not records or "text" not in records[0]:
            raise ValueError(
                f"{name}/{split} has no 'text' feature; a text dataset needs one string feature "
                "named 'text' (as tiny_shakespeare has)."
            )
        splits[split] = _frozen(b"\n".join(r["text"] for r in records))
    return TextData(**splits)


@functools.lru_cache(maxsize=4)
def _read_file(path: str, fractions: tuple[float, float]) -> TextData:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Text file {path} does not exist; set --config.data.path to a UTF-8 text file, or "
            "use --config.data.source=tfds."
        )
    val_frac, test_frac = fractions
    if not (0 < val_frac < 1 and 0 < test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(
            f"data.split_fractions {fractions} must be two fractions in (0, 1) with a sum "
            "below 1: the validation and test parts taken from the end of the file."
        )
    with open(path, "rb") as f:
        raw = f.read()
    n_test, n_val = int(len(raw) * test_frac), int(len(raw) * val_frac)
    n_train = len(raw) - n_test - n_val
    return TextData(
        train=_frozen(raw[:n_train]),
        validation=_frozen(raw[n_train : n_train + n_val]),
        test=_frozen(raw[n_train + n_val :]),
    )


def _frozen(raw: bytes) -> np.ndarray:
    arr = encode(raw).copy()
    arr.flags.writeable = False  # cached and shared by every caller
    return arr


def check_length(data: TextData, window: int) -> None:
    """Raises ValueError if a split cannot hold one window of `window` + 1 tokens."""
    for name in SPLITS:
        if len(data.split(name)) <= window + 1:
            raise ValueError(
                f"The {name} split has {len(data.split(name))} bytes, too few for one window "
                f"of {window} + 1 tokens; use a longer text or a shorter model.context."
            )


def windows(key: PRNGKey, tokens: Array, batch_size: int, length: int) -> Array:
    """`batch_size` random windows of `length` + 1 consecutive tokens (input and target).

    Args:
      key: PRNG key; the windows are a pure function of it.
      tokens: uint8 or int [N] byte tokens (a device array).
      batch_size, length: static.

    Returns:
      int32 [batch_size, length + 1].
    """
    starts = jax.random.randint(key, (batch_size,), 0, tokens.shape[0] - length)
    idx = starts[:, None] + jnp.arange(length + 1)[None, :]
    return tokens[idx].astype(jnp.int32)


def fixed_windows(tokens: np.ndarray, num: int, length: int) -> np.ndarray:
    """`num` evenly spaced windows of `length` + 1 tokens spanning a split: a fixed,
    deterministic evaluation set. int32 [num, length + 1]."""
    starts = np.linspace(0, len(tokens) - length - 1, num).astype(np.int64)
    return np.stack([tokens[s : s + length + 1] for s in starts]).astype(np.int32)


def mean_over_windows(fn, windows: Array, batch: int = 64) -> Array:
    """The mean of fn(w) (a per-batch mean, e.g. a cross-entropy) over many windows
    [N, L], `batch` windows at a time (bounded memory); pure and jit-able."""
    n = windows.shape[0]
    full = n - n % batch
    total = jnp.zeros(())
    if full:
        chunks = windows[:full].reshape(-1, batch, windows.shape[-1])
        total = jnp.sum(jax.lax.map(fn, chunks)) * batch
    if n % batch:
        total = total + fn(windows[full:]) * (n % batch)
    return total / n
