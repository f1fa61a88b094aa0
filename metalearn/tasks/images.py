"""Image-classification data: MNIST, Fashion-MNIST, CIFAR-10/100 and SVHN as numpy arrays.

Splits are read once with `tfds.data_source` (array_record files, no TensorFlow at run
time) or from CIFAR's own binary files, decoded into in-memory uint8 arrays and cached in
the process. Batching is stateless: the batch of global step `s` is a pure function of
(seed, s), so resuming a run only needs the step number: on the host (`batch_indices`,
`host_batches`, `prefetch_to_device`), or, for a dataset kept in device memory
(`choose_on_device`), on the device inside a compiled loop of steps
(`device_batch_indices`). Normalisation and augmentation (random crop, horizontal flip)
run on device inside the jitted train step (`preprocess`).
"""

import dataclasses
import functools
import gzip
import os
import queue
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from metalearn import streams
from metalearn.tasks import prepared
from metalearn.types import Array, PRNGKey


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about one dataset.

    Attributes:
      tfds_name: the tensorflow-datasets name.
      num_classes: number of labels.
      image_shape: (H, W, C).
      mean, std: per-channel statistics of the training set in [0, 1] pixel units.
      augment: default augmentation, one of `AUGMENTATIONS`.
    """

    tfds_name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), (0.1307,), (0.3081,), "none"),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,), "none"),
    "cifar10": DatasetInfo(
        "cifar10", 10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "crop_flip"
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        100,
        (32, 32, 3),
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
        "crop_flip",
    ),
    "svhn_cropped": DatasetInfo(
        "svhn_cropped", 10, (32, 32, 3), (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), "crop"
    ),
}
SOURCES = ("tfds", "cifar_binary", "idx", "synthetic")
AUGMENTATIONS = ("none", "crop", "crop_flip")

ON_DEVICE = ("auto", "true", "false")  # config.data.on_device
DEVICE_DATA_FRACTION = 0.25  # 'auto': the share of a device's memory the data may take
DEFAULT_DEVICE_BUDGET_GIB = 2.0  # 'auto' on devices that report no memory size (CPU)
_CROP_PADDING = 4
_DECODE_CHUNK = 4096  # records per `__getitems__` call: bounds the list of decoded dicts
_CIFAR_PIXELS = 32 * 32 * 3
_CIFAR_FILES = {
    "cifar10": (tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",)),
    "cifar100": (("train.bin",), ("test.bin",)),
}
_CIFAR_LABEL_BYTES = {"cifar10": 1, "cifar100": 2}  # CIFAR-100: coarse, then fine


# eq=False: the fields are arrays, whose == is elementwise.
@dataclasses.dataclass(frozen=True, eq=False)
class ImageData:
    """The splits of one dataset as host arrays.

    Attributes:
      info: the dataset's `DatasetInfo`; `num_classes` reflects any class selection.
      train_images, val_images, test_images: uint8 [N, H, W, C] (V = 0 without validation).
      train_labels, val_labels, test_labels: int32 [N].

    Arrays that no selection touched are read-only views of the per-process cache.
    """

    info: DatasetInfo
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_images(config: ml_collections.ConfigDict) -> ImageData:
    """Loads the dataset that `config` (the `config.data` group) names.

    Order of operations: read train/test (cached per process, read-only arrays), keep only
    `classes` (relabelled 0..k−1 in the given order), keep the first `max_train_examples`
    / `max_test_examples`, then carve a validation split out of what is left of the
    training data: `validation_fraction` of it (if > 0) or else `validation_size`
    examples, stratified by class (each class keeps its share, to within one example),
    chosen by a permutation from `validation_seed`. With `max_train_examples`
    and no class selection only that many records are decoded.

    Args:
      config: fields `name`, `source` (one of `SOURCES`: 'tfds', 'cifar_binary', 'idx'
        = the original (Fashion-)MNIST files `{train,t10k}-{images-idx3,labels-idx1}-ubyte
        [.gz]` in `data_dir`, or 'synthetic' = random pixels for smoke runs), `data_dir`,
        optionally `fallback_data_dir` (tfds: read from `data_dir`, else $TFDS_DATA_DIR,
        else `fallback_data_dir`, else tfds's default folder; see
        `prepared.resolve_data_dir`), `download`, `train_files`, `test_files`,
        `validation_size`, optionally `validation_fraction`, `validation_seed`,
        `classes`, `max_train_examples`,
        `max_test_examples`.

    Returns:
      The splits as `ImageData`.

    Raises:
      FileNotFoundError: the dataset is not prepared (tfds) or a binary file is missing.
      ValueError: an unknown name or source, or an invalid selection.
    """
    if config.name not in DATASETS:
        raise ValueError(f"Unknown dataset {config.name!r}; choose one of {sorted(DATASETS)}.")
    info = DATASETS[config.name]
    classes = tuple(int(c) for c in config.classes)
    if len(set(classes)) != len(classes) or any(not 0 <= c < info.num_classes for c in classes):
        raise ValueError(
            f"classes={classes} must be distinct labels of {info.tfds_name} "
            f"in [0, {info.num_classes})."
        )

    if config.source == "tfds":
        data_dir = prepared.resolve_data_dir(config.data_dir, config.get("fallback_data_dir", ""))
        version = prepared.prepared_version(info.tfds_name, data_dir, bool(config.download))
        # Without a class selection the first examples are the ones kept: decode only those.
        train_limit = (
            None if classes or not config.max_train_examples else config.max_train_examples
        )
        test_limit = None if classes or not config.max_test_examples else config.max_test_examples
        train = _read_tfds_split(info.tfds_name, version, data_dir, "train", train_limit)
        test = _read_tfds_split(info.tfds_name, version, data_dir, "test", test_limit)
    elif config.source == "cifar_binary":
        train_names, test_names = _cifar_file_names(config)
        train = _read_cifar_binary(info.tfds_name, config.data_dir, train_names)
        test = _read_cifar_binary(info.tfds_name, config.data_dir, test_names)
    elif config.source == "idx":
        if config.name not in ("mnist", "fashion_mnist"):
            raise ValueError(f"source='idx' reads mnist or fashion_mnist, not {config.name!r}.")
        train = _read_idx_pair(config.data_dir, "train")
        test = _read_idx_pair(config.data_dir, "t10k")
    elif config.source == "synthetic":
        train = _synthetic(info, config.max_train_examples or 1024, streams.SyntheticImages.TRAIN)
        test = _synthetic(info, config.max_test_examples or 256, streams.SyntheticImages.TEST)
    else:
        raise ValueError(f"Unknown data source {config.source!r}; choose one of {SOURCES}.")

    if config.source != "synthetic":
        _check_pixel_mean(info, train[0], config)
    if classes:
        train, test = _select_classes(*train, classes), _select_classes(*test, classes)
        info = dataclasses.replace(info, num_classes=len(classes))
    if config.max_train_examples:
        train = (train[0][: config.max_train_examples], train[1][: config.max_train_examples])
    if config.max_test_examples:
        test = (test[0][: config.max_test_examples], test[1][: config.max_test_examples])
    fraction = config.get("validation_fraction", 0.0)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_fraction={fraction} must be in [0, 1).")
    size = int(round(fraction * len(train[1]))) if fraction else config.validation_size
    train, val = _carve_validation(*train, size, config.validation_seed)
    return ImageData(info, *train, *val, *test)


def _synthetic(info: DatasetInfo, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniformly random pixels and labels of the dataset's shapes: for smoke runs and
    benchmarks where the real data is absent. Nothing can be learned from them."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *info.image_shape), dtype=np.uint8)
    return images, rng.integers(0, info.num_classes, n).astype(np.int32)


def _freeze(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    # Cached arrays are shared by every caller: make accidental in-place edits fail.
    for a in arrays:
        a.flags.writeable = False
    return arrays


@functools.lru_cache(maxsize=8)
def _read_tfds_split(
    name: str, version: str, data_dir: str, split: str, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
    source = prepared.tfds().data_source(
        f"{name}:{version}", split=split, data_dir=data_dir, download=False
    )
    n = len(source) if limit is None else min(limit, len(source))
    images = np.empty((n, *DATASETS[name].image_shape), np.uint8)
    labels = np.empty((n,), np.int32)
    # Batched reads are ~3x faster than indexing records one at a time.
    for start in range(0, n, _DECODE_CHUNK):
        stop = min(start + _DECODE_CHUNK, n)
        records = source.__getitems__(list(range(start, stop)))
        images[start:stop] = np.stack([r["image"] for r in records])
        labels[start:stop] = [r["label"] for r in records]
    return _freeze(images, labels)


def _cifar_file_names(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], ...]:
    if config.name not in _CIFAR_FILES:
        raise ValueError(f"source='cifar_binary' reads cifar10 or cifar100, not {config.name!r}.")
    if not config.data_dir:
        raise ValueError("source='cifar_binary' needs config.data_dir: the folder of the files.")
    default_train, default_test = _CIFAR_FILES[config.name]
    return tuple(config.train_files) or default_train, tuple(config.test_files) or default_test


def _read_cifar_binary(
    name: str, data_dir: str, file_names: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    paths = tuple(os.path.abspath(os.path.join(data_dir, f)) for f in file_names)
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name} binary file {path} is missing.")
    return _read_cifar_files(name, paths)


@functools.lru_cache(maxsize=8)
def _read_cifar_files(name: str, paths: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    label_bytes = _CIFAR_LABEL_BYTES[name]
    record_size = label_bytes + _CIFAR_PIXELS
    records = []
    for path in paths:
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size % record_size:
            raise ValueError(f"{path} is not {name} binary data ({record_size}-byte records).")
        records.append(raw.reshape(-1, record_size))
    data = np.concatenate(records)
    labels = data[:, label_bytes - 1].astype(np.int32)  # CIFAR-100: the fine label
    # Each record stores the R, G and B planes one after another, each 32x32 row-major.
    images = np.ascontiguousarray(
        data[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    )
    return _freeze(images, labels)


def _check_pixel_mean(info: DatasetInfo, images: np.ndarray, config) -> None:
    """Warns when the data's mean pixel is far from the dataset's published one.

    A prepared folder can hold the wrong dataset under the right name (it happened here:
    a `fashion_mnist` folder with MNIST digits), and nothing else would notice.
    """
    mean = float(images[:2000].mean()) / 255.0
    expected = float(np.mean(info.mean))
    if abs(mean - expected) > 0.05:
        warnings.warn(
            f"The training images read as {info.tfds_name!r} (source={config.source!r}, "
            f"data_dir={config.data_dir!r}) have mean pixel {mean:.3f}, but "
            f"{info.tfds_name} has {expected:.3f}: the folder may hold another dataset.",
            stacklevel=3,
        )


def _read_idx_pair(data_dir: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, 28, 28, 1] and labels of one split in the original (Fashion-)MNIST format."""
    paths = []
    for kind in ("images-idx3", "labels-idx1"):
        base = os.path.abspath(os.path.join(data_dir, f"{prefix}-{kind}-ubyte"))
        path = next((p for p in (base, base + ".gz") if os.path.isfile(p)), None)
        if path is None:
            raise FileNotFoundError(f"{base}[.gz] is missing (source='idx').")
        paths.append(path)
    return _read_idx_files(*paths)


@functools.lru_cache(maxsize=8)
def _read_idx_files(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    arrays = []
    for path in (images_path, labels_path):
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
        # Header: two zero bytes, a dtype code (0x08 = uint8), the rank, then the big-endian
        # int32 size of each dimension.
        if raw[:3] != b"\x00\x00\x08":
            raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
        ndim = raw[3]
        shape = np.frombuffer(raw, ">i4", count=ndim, offset=4)
        arrays.append(np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape))
    images, labels = arrays
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path} and {labels_path} hold different numbers of examples.")
    return _freeze(np.ascontiguousarray(images[..., None]), labels.astype(np.int32))


def _select_classes(
    images: np.ndarray, labels: np.ndarray, classes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    lookup = np.full((max(int(labels.max(initial=0)), *classes) + 1,), -1, np.int32)
    lookup[list(classes)] = np.arange(len(classes), dtype=np.int32)
    new_labels = lookup[labels]
    keep = new_labels >= 0
    return images[keep], new_labels[keep]


def _carve_validation(
    images: np.ndarray, labels: np.ndarray, size: int, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """`size` examples, stratified by class, as validation; the rest (in order) as training.

    Class c gets floor(size·n_c/n) examples, and the remainder goes one each to the
    classes of the largest fractional parts; within a class the examples are the first
    of a permutation from `seed`.
    """
    if not size:
        return (images, labels), (images[:0], labels[:0])
    if not 0 < size < len(labels):
        raise ValueError(f"validation_size={size} must be in [0, {len(labels)}).")
    classes, counts = np.unique(labels, return_counts=True)
    exact = size * counts / len(labels)
    quota = np.floor(exact).astype(int)
    quota[np.argsort(quota - exact, kind="stable")[: size - quota.sum()]] += 1
    perm = np.random.default_rng(seed).permutation(len(labels))
    shuffled = labels[perm]
    chosen = [perm[shuffled == c][:q] for c, q in zip(classes, quota, strict=True)]
    val = np.sort(np.concatenate(chosen))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return (images[train], labels[train]), (images[val], labels[val])


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    (perm,) = _freeze(np.random.default_rng([seed, epoch]).permutation(num_examples))
    return perm


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of global batch `step`.

    Epoch e is the permutation of range(num_examples) from np.random.default_rng([seed, e]);
    an epoch has num_examples // batch_size steps and drops the remainder.

    Args:
      num_examples: size of the split.
      batch_size: global batch size.
      seed: non-negative data-order seed.
      step: global step, ≥ 0.

    Returns:
      int64 [batch_size] indices into the split.
    """
    if not 0 < batch_size <= num_examples:
        raise ValueError(f"batch_size={batch_size} must be in [1, num_examples={num_examples}].")
    if step < 0:
        raise ValueError(f"step={step} must be non-negative.")
    epoch, position = divmod(step, num_examples // batch_size)
    start = position * batch_size
    return _epoch_permutation(num_examples, seed, epoch)[start : start + batch_size]


@functools.partial(jax.jit, static_argnames=("num_examples", "batch_size", "num"))
def device_batch_indices(
    key: PRNGKey, num_examples: int, batch_size: int, start: Array | int, num: int
) -> Array:
    """Indices of global batches start … start+num−1, computed on the device; jit-able.

    The device-resident counterpart of `batch_indices`: another order, as deterministic.
    Epoch e is `jax.random.permutation(jax.random.fold_in(key, e), num_examples)`; an
    epoch has num_examples // batch_size steps and drops the remainder. Only the epochs
    the steps fall in are permuted, so batch t is a pure function of (key, t) whatever
    `start` and `num` it is computed with.

    Args:
      key: the stream's PRNG key.
      num_examples: size of the split.
      batch_size: global batch size.
      start: the first step, ≥ 0 (may be traced).
      num: how many steps, ≥ 1 (static).

    Returns:
      int32 [num, batch_size] indices into the split.
    """
    if not 0 < batch_size <= num_examples:
        raise ValueError(f"batch_size={batch_size} must be in [1, num_examples={num_examples}].")
    if num < 1:
        raise ValueError(f"num={num} must be at least 1.")
    per_epoch = num_examples // batch_size
    first = jnp.asarray(start, jnp.int32) // per_epoch
    spanned = (per_epoch + num - 2) // per_epoch + 1  # epochs that `num` steps can touch
    perms_ExN = jax.vmap(
        lambda e: jax.random.permutation(jax.random.fold_in(key, e), num_examples)
    )(first + jnp.arange(spanned, dtype=jnp.int32))
    epoch, position = jnp.divmod(jnp.asarray(start, jnp.int32) + jnp.arange(num), per_epoch)
    offsets = position[:, None] * batch_size + jnp.arange(batch_size)[None, :]
    return perms_ExN[(epoch - first)[:, None], offsets].astype(jnp.int32)


def choose_on_device(
    setting: str | bool, nbytes: int, budget_gib: float, device: jax.Device
) -> tuple[bool, str]:
    """Whether a dataset of `nbytes` is kept in device memory, and why (for the run's record).

    Args:
      setting: 'auto' (on the device if `nbytes` is within the budget; on a CPU without
        an explicit budget, the host), 'true' or 'false' (or a bool), as
        `config.data.on_device`.
      nbytes: the bytes that would be resident on each device (images and labels).
      budget_gib: the budget in GiB; ≤ 0: `DEVICE_DATA_FRACTION` of the device's memory,
        or `DEFAULT_DEVICE_BUDGET_GIB` where it reports none (CPU).
      device: one device of the mesh.

    Returns:
      (on device, a one-line reason).
    """
    setting = str(setting).lower()
    if setting not in ON_DEVICE:
        raise ValueError(f"data.on_device={setting!r}; choose one of {ON_DEVICE}.")
    size = f"{nbytes / 2**20:.1f} MiB"
    if setting != "auto":
        return setting == "true", f"data.on_device={setting} ({size})"
    if budget_gib <= 0 and device.platform == "cpu":
        # The host's memory is the device's, and the steps are compute-bound: measured
        # no faster (benchmarks/image_loop.py), and the host path keeps the batch order
        # of every earlier CPU result.
        return False, f"data.on_device=auto on a CPU: the host path ({size})"
    if budget_gib <= 0:
        stats = device.memory_stats() if device.platform != "cpu" else None
        limit = (stats or {}).get("bytes_limit")
        budget_gib = DEVICE_DATA_FRACTION * limit / 2**30 if limit else DEFAULT_DEVICE_BUDGET_GIB
    fits = nbytes <= budget_gib * 2**30
    relation = "within" if fits else "over"
    return fits, f"data.on_device=auto: {size} {relation} the budget of {budget_gib:.2f} GiB"


def host_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    seed: int,
    start_step: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's part of the global batches of steps start_step, start_step + 1, …

    Args:
      images: uint8 [N, H, W, C].
      labels: int [N].
      batch_size: global batch size, divisible by `process_count`.
      seed: data-order seed (see `batch_indices`).
      start_step: the first step to yield; resuming at step k yields what skipping k would.
      process_index, process_count: this host and the number of hosts (default: jax's).

    Returns:
      An endless iterator of {'image': uint8 [B_local, H, W, C], 'label': int32 [B_local]},
      B_local = batch_size // process_count: host i's contiguous slice i of each batch.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} hosts.")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    local = batch_size // process_count
    batch_indices(len(labels), batch_size, seed, start_step)  # validates before iterating

    def generate() -> Iterator[dict[str, np.ndarray]]:
        step = start_step
        while True:
            idx = batch_indices(len(labels), batch_size, seed, step)
            idx = idx[process_index * local : (process_index + 1) * local]
            yield {"image": images[idx], "label": labels[idx].astype(np.int32)}
            step += 1

    return generate()


def prefetch_to_device(
    iterator: Iterator[Any], sharding: jax.sharding.Sharding, size: int = 2
) -> Iterator[Any]:
    """Moves host batches to the devices, `size` batches ahead, in a background thread.

    Every leaf becomes a global jax.Array via `jax.make_array_from_process_local_data`.
    The thread starts on the first `next`; an exception raised by `iterator` is re-raised
    here, and closing the returned generator stops the thread.

    Args:
      iterator: host batches (pytrees of numpy arrays, this process's slice).
      sharding: how the global batch is laid out, e.g. NamedSharding(mesh, P('data')).
      size: how many batches to hold ready, ≥ 1.

    Returns:
      An iterator of the same pytrees with global jax.Array leaves; it ends when
      `iterator` does.
    """
    if size < 1:
        raise ValueError(f"size={size} must be at least 1.")

    def generate() -> Iterator[Any]:
        ready: queue.Queue = queue.Queue(maxsize=size)
        stop = threading.Event()

        def put(item: tuple[str, Any]) -> None:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def produce() -> None:
            try:
                for batch in iterator:
                    if stop.is_set():
                        return
                    put(("batch", jax.tree.map(_to_global(sharding), batch)))
            except BaseException as err:  # handed to the consumer, which re-raises it
                put(("error", err))
            else:
                put(("end", None))

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while True:
                kind, value = ready.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                yield value
        finally:
            stop.set()

    return generate()


def _to_global(sharding: jax.sharding.Sharding):
    return lambda x: jax.make_array_from_process_local_data(sharding, x)


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This host's part of the whole split in order, in fixed-size batches with a mask.

    Args:
      images: uint8 [N, H, W, C].
      labels: int [N].
      batch_size: examples per global batch, divisible by `process_count`.
      process_index, process_count: this host and the number of hosts (default: jax's).

    Returns:
      An iterator of {'image': [B_local, H, W, C], 'label': int32 [B_local], 'mask':
      float32 [B_local]}, ceil(N / B) batches, B_local = batch_size // process_count:
      host i's contiguous slice i of each global batch. The last global batch is padded
      with zero images and label 0, and `mask` is 1 for real examples and 0 for padding.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    if batch_size % process_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by {process_count} hosts.")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    local = batch_size // process_count

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(labels), batch_size):
            first = start + process_index * local  # this host's slice of the global batch
            image = images[first : min(first + local, start + batch_size)]
            label = labels[first : min(first + local, start + batch_size)].astype(np.int32)
            real, pad = len(label), local - len(label)
            if pad:
                image = np.concatenate([image, np.zeros((pad, *images.shape[1:]), images.dtype)])
                label = np.concatenate([label, np.zeros((pad,), np.int32)])
            mask = (np.arange(local) < real).astype(np.float32)
            yield {"image": image, "label": label, "mask": mask}

    return generate()


def preprocess(
    images_uint8: Array, info: DatasetInfo, *, augment: str, key: PRNGKey | None
) -> Array:
    """Normalises (and optionally augments) a batch on device; pure and jit-able.

    Args:
      images_uint8: uint8 [B, H, W, C].
      info: gives the per-channel mean and std.
      augment: 'none'; 'crop': pad each raw image with 4 black pixels and crop back to H×W
        at a random offset per example; 'crop_flip': also flip horizontally with p = 0.5
        per example. Pass 'none' for evaluation.
      key: PRNG key, required unless augment == 'none'.

    Returns:
      float32 [B, H, W, C]: (x / 255 − mean) / std after augmentation.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation {augment!r}; choose one of {AUGMENTATIONS}.")
    if augment != "none" and key is None:
        raise ValueError(f"augment={augment!r} needs a PRNG key.")
    x = images_uint8
    if augment != "none":
        crop_key, flip_key = jax.random.split(key)
        x = jax.vmap(_random_crop)(x, jax.random.split(crop_key, x.shape[0]))
        if augment == "crop_flip":
            flip = jax.random.bernoulli(flip_key, 0.5, (x.shape[0],))
            x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
    mean = jnp.asarray(info.mean, jnp.float32).reshape(1, 1, 1, -1)
    std = jnp.asarray(info.std, jnp.float32).reshape(1, 1, 1, -1)
    return (x.astype(jnp.float32) / 255.0 - mean) / std


def _random_crop(image: Array, key: PRNGKey) -> Array:
    """One [H, W, C] image padded by `_CROP_PADDING` zeros and cropped at a random offset."""
    p = _CROP_PADDING
    padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
    dy, dx = jax.random.randint(key, (2,), 0, 2 * p + 1)
    return jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)
