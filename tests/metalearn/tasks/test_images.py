"""Image data: real MNIST and CIFAR-10 pixels, tfds mock data, batching and preprocessing."""

import importlib.util
import os
import re
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tensorflow_datasets.core.data_sources import array_record

from metalearn.tasks import images as image_data
from metalearn.tasks import prepared

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")
SHARED_TFDS = os.path.join(SHARED_DATA, "tfds")
CIFAR10_SUBSET = os.path.join(SHARED_DATA, "raw", "cifar10_subset")

RAW_MNIST = os.path.join(SHARED_DATA, "raw", "mnist")

needs_mnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(SHARED_TFDS, "mnist", "3.0.1", "dataset_info.json")),
    reason=f"prepared MNIST not found in {SHARED_TFDS} (see ../shared/data/README.md)",
)
needs_raw_mnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(RAW_MNIST, "train-images-idx3-ubyte.gz")),
    reason=f"the original MNIST files are not in {RAW_MNIST} (see ../shared/data/README.md)",
)
needs_cifar_subset = pytest.mark.skipif(
    not os.path.isfile(os.path.join(CIFAR10_SUBSET, "train_first4000.bin")),
    reason=f"the CIFAR-10 subset is not in {CIFAR10_SUBSET} (see ../shared/data/README.md)",
)
# Decoding tfds's 70,000 MNIST records takes seconds: tests read the first ones of the
# training split through tfds, and the whole dataset from the original (IDX) files.
TFDS_TRAIN_EXAMPLES = 2000


def _config(**overrides) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(
        {
            "name": "mnist",
            "source": "tfds",
            "data_dir": SHARED_TFDS,
            "download": False,
            "train_files": (),
            "test_files": (),
            "validation_size": 0,
            "validation_seed": 0,
            "classes": (),
            "max_train_examples": 0,
            "max_test_examples": 0,
        }
    )
    c.update(overrides)
    return c


def _idx_config(**overrides) -> ml_collections.ConfigDict:
    return _config(source="idx", data_dir=RAW_MNIST, **overrides)


def _row_hashes(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The examples as sorted byte strings (image, then label), to compare splits as multisets."""
    assert labels.max(initial=0) < 256
    rows = np.concatenate([images.reshape(len(images), -1), labels[:, None].astype(np.uint8)], 1)
    return np.sort(np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1])))[:, 0])


@pytest.fixture(scope="module")
def mnist() -> image_data.ImageData:
    """All of MNIST, from the original files."""
    return image_data.load_images(_idx_config())


@pytest.fixture(scope="module")
def mnist_tfds() -> image_data.ImageData:
    """MNIST from the prepared tfds folder: the first training examples, all test ones."""
    return image_data.load_images(_config(max_train_examples=TFDS_TRAIN_EXAMPLES))


@needs_raw_mnist
def test_mnist_is_the_real_dataset(mnist):
    assert mnist.info == image_data.DATASETS["mnist"]
    assert mnist.train_images.shape == (60000, 28, 28, 1)
    assert mnist.test_images.shape == (10000, 28, 28, 1)
    assert mnist.val_images.shape == (0, 28, 28, 1) and mnist.val_labels.shape == (0,)
    for images, labels in [
        (mnist.train_images, mnist.train_labels),
        (mnist.test_images, mnist.test_labels),
    ]:
        assert images.dtype == np.uint8 and labels.dtype == np.int32
        assert labels.min() == 0 and labels.max() == 9
    # MNIST's published class counts.
    np.testing.assert_array_equal(
        np.bincount(mnist.train_labels),
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    )
    np.testing.assert_array_equal(
        np.bincount(mnist.test_labels), [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    )
    counts = np.bincount(mnist.train_images.ravel(), minlength=256)  # one pass over 47M
    values = np.arange(256) / 255
    mean = counts @ values / counts.sum()
    assert mean == pytest.approx(0.1307, abs=1e-3)
    assert np.sqrt(counts @ values**2 / counts.sum() - mean**2) == pytest.approx(0.3081, abs=1e-3)
    np.testing.assert_array_equal(mnist.train_labels[:5], [5, 0, 4, 1, 9])  # the file's order


@needs_mnist
@needs_raw_mnist
def test_the_prepared_tfds_folder_holds_the_same_examples_as_the_original_files(mnist, mnist_tfds):
    assert mnist_tfds.info == image_data.DATASETS["mnist"]
    assert mnist_tfds.train_images.shape == (TFDS_TRAIN_EXAMPLES, 28, 28, 1)
    assert mnist_tfds.train_images.dtype == np.uint8 and mnist_tfds.test_labels.dtype == np.int32
    # tfds shuffles the records when preparing, so compare the splits as multisets.
    np.testing.assert_array_equal(
        _row_hashes(mnist_tfds.test_images, mnist_tfds.test_labels),
        _row_hashes(mnist.test_images, mnist.test_labels),
    )
    first = _row_hashes(mnist_tfds.train_images, mnist_tfds.train_labels)
    assert np.isin(first, _row_hashes(mnist.train_images, mnist.train_labels)).all()
    # The first records only: a limit decodes no more than it keeps.
    fewer = image_data.load_images(_config(max_train_examples=300, max_test_examples=50))
    np.testing.assert_array_equal(fewer.train_images, mnist_tfds.train_images[:300])
    np.testing.assert_array_equal(fewer.test_labels, mnist_tfds.test_labels[:50])


@needs_raw_mnist
def test_mnist_validation_carve_is_a_deterministic_partition(mnist):
    data = image_data.load_images(_idx_config(validation_size=5000, validation_seed=3))
    assert data.train_images.shape == (55000, 28, 28, 1)
    assert data.val_images.shape == (5000, 28, 28, 1) and data.val_labels.shape == (5000,)
    carved = _row_hashes(
        np.concatenate([data.train_images, data.val_images]),
        np.concatenate([data.train_labels, data.val_labels]),
    )
    np.testing.assert_array_equal(carved, _row_hashes(mnist.train_images, mnist.train_labels))
    np.testing.assert_array_equal(data.test_labels, mnist.test_labels)  # test is untouched

    again = image_data.load_images(_idx_config(validation_size=5000, validation_seed=3))
    np.testing.assert_array_equal(again.val_images, data.val_images)
    np.testing.assert_array_equal(again.train_labels, data.train_labels)
    other = image_data.load_images(_idx_config(validation_size=5000, validation_seed=4))
    assert not np.array_equal(other.val_images, data.val_images)


@needs_raw_mnist
def test_mnist_class_selection_relabels_in_the_given_order(mnist):
    data = image_data.load_images(_idx_config(classes=(9, 4)))
    assert data.info.num_classes == 2
    for split in ("train", "test"):
        full_images, full_labels = (
            getattr(mnist, f"{split}_images"),
            getattr(mnist, f"{split}_labels"),
        )
        images, labels = getattr(data, f"{split}_images"), getattr(data, f"{split}_labels")
        assert set(np.unique(labels)) == {0, 1}
        for new, old in [(0, 9), (1, 4)]:
            np.testing.assert_array_equal(images[labels == new], full_images[full_labels == old])

    with pytest.raises(ValueError, match="classes"):
        image_data.load_images(_idx_config(classes=(4, 4)))
    with pytest.raises(ValueError, match="classes"):
        image_data.load_images(_idx_config(classes=(10,)))


@needs_raw_mnist
def test_mnist_max_examples_keeps_the_first_ones(mnist):
    data = image_data.load_images(_idx_config(max_train_examples=300, max_test_examples=50))
    np.testing.assert_array_equal(data.train_images, mnist.train_images[:300])
    np.testing.assert_array_equal(data.test_labels, mnist.test_labels[:50])
    # With a class selection the limit applies to the selected examples.
    data = image_data.load_images(_idx_config(classes=(0, 1), max_train_examples=100))
    keep = np.isin(mnist.train_labels, (0, 1))
    np.testing.assert_array_equal(data.train_images, mnist.train_images[keep][:100])
    # ... and the validation set is carved from what is left.
    data = image_data.load_images(_idx_config(max_train_examples=300, validation_size=100))
    assert len(data.train_labels) == 200 and len(data.val_labels) == 100


@needs_cifar_subset
def test_cifar10_binary_subset_is_real_cifar():
    data = image_data.load_images(
        _config(
            name="cifar10",
            source="cifar_binary",
            data_dir=CIFAR10_SUBSET,
            train_files=("train_first4000.bin",),
            test_files=("test_first1000.bin",),
        )
    )
    assert data.train_images.shape == (4000, 32, 32, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (1000, 32, 32, 3) and data.test_labels.dtype == np.int32
    assert set(np.unique(data.train_labels)) == set(range(10))
    # The first training images are frog, truck, truck, deer, car; the first test image a cat.
    np.testing.assert_array_equal(data.train_labels[:5], [6, 9, 9, 4, 1])
    np.testing.assert_array_equal(data.test_labels[:4], [3, 8, 8, 0])
    mean = data.train_images.reshape(-1, 3).mean(axis=0) / 255
    np.testing.assert_allclose(mean, image_data.DATASETS["cifar10"].mean, atol=0.02)


@pytest.mark.filterwarnings("ignore:The training images read as 'cifar100'")
def test_cifar100_binary_takes_the_fine_label_and_planes_in_rgb_order(tmp_path):
    labels = np.array([[3, 71], [19, 5]], np.uint8)  # coarse, fine
    pixels = np.zeros((2, 3, 32, 32), np.uint8)
    pixels[:, 0, 1, 2], pixels[:, 2, 3, 4] = 200, 100  # red at (1, 2), blue at (3, 4)
    (tmp_path / "train.bin").write_bytes(
        np.concatenate([labels, pixels.reshape(2, -1)], axis=1).tobytes()
    )
    (tmp_path / "test.bin").write_bytes((tmp_path / "train.bin").read_bytes()[: 2 + 3072])
    data = image_data.load_images(
        _config(name="cifar100", source="cifar_binary", data_dir=str(tmp_path))
    )
    np.testing.assert_array_equal(data.train_labels, [71, 5])
    assert data.train_images[0, 1, 2, 0] == 200 and data.train_images[0, 3, 4, 2] == 100
    assert data.train_images.sum() == 2 * 300 and len(data.test_labels) == 1
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        image_data.load_images(
            _config(
                name="cifar100",
                source="cifar_binary",
                data_dir=str(tmp_path),
                train_files=("missing.bin",),
            )
        )


@pytest.mark.parametrize("name", ["cifar100", "svhn_cropped"])
def test_tfds_mock_data_goes_through_the_data_source_path(name, tmp_path):
    # load_images checks for a prepared folder before calling tfds: write tfds's own
    # metadata there; MockPolicy.USE_CODE then serves random records from the builder code.
    builder = tfds.builder(name, data_dir=str(tmp_path))
    os.makedirs(builder.data_dir)
    builder.info.write_to_directory(builder.data_dir)

    # tfds 4.9.10's mock sets `__getitems__` on a MagicMock instance, where it is called
    # without `self` (TypeError); its `__getitem__` works, so batch reads go through it.
    def getitems(source, keys):
        return [source[k] for k in keys]

    with (
        tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE),
        mock.patch.object(array_record.ArrayRecordDataSource, "__getitems__", getitems),
    ):
        data = image_data.load_images(
            _config(name=name, data_dir=str(tmp_path), validation_size=4, max_test_examples=5)
        )
    info = image_data.DATASETS[name]
    assert data.info == info
    assert data.train_images.shape == (8, *info.image_shape) and data.train_images.dtype == np.uint8
    assert data.val_images.shape == (4, *info.image_shape)
    assert data.test_images.shape == (5, *info.image_shape)
    for labels in (data.train_labels, data.val_labels, data.test_labels):
        assert labels.dtype == np.int32 and 0 <= labels.min() and labels.max() < info.num_classes


def test_data_dir_is_the_flag_else_tfds_data_dir_else_the_fallback_else_tfds_default(
    tmp_path, monkeypatch
):
    flag, env, fallback = (str(tmp_path / name) for name in ("flag", "env", "fallback"))
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    default = tfds.core.constants.get_default_data_dir()
    assert prepared.resolve_data_dir("") == os.path.abspath(os.path.expanduser(default))
    assert prepared.resolve_data_dir("", fallback) == fallback
    assert prepared.resolve_data_dir(flag, fallback) == flag
    monkeypatch.setenv("TFDS_DATA_DIR", env)
    assert prepared.resolve_data_dir("", fallback) == env
    assert prepared.resolve_data_dir(flag, fallback) == flag
    monkeypatch.chdir(tmp_path)
    assert prepared.resolve_data_dir("relative") == str(tmp_path / "relative")
    # load_images resolves it when it reads: `fallback_data_dir` is a field of the config.
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(env, "mnist"))):
        image_data.load_images(_config(data_dir="", fallback_data_dir=fallback))
    monkeypatch.delenv("TFDS_DATA_DIR")
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(fallback, "mnist"))):
        image_data.load_images(_config(data_dir="", fallback_data_dir=fallback))


def test_missing_dataset_says_what_is_missing_and_where(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        image_data.load_images(_config(name="cifar10", data_dir=str(tmp_path)))
    message = str(err.value)
    assert "'cifar10'" in message and os.path.join(str(tmp_path), "cifar10") in message
    assert "dataset_info.json" in message and "TFDS_DATA_DIR" in message


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="TF installed")
def test_download_without_tensorflow_fails_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="TensorFlow"):
        image_data.load_images(_config(name="svhn_cropped", data_dir=str(tmp_path), download=True))


def test_batch_indices_are_epoch_permutations():
    n, b = 23, 5  # 4 steps per epoch, 3 examples dropped
    epoch = np.concatenate([image_data.batch_indices(n, b, seed=7, step=s) for s in range(4)])
    assert len(np.unique(epoch)) == 20 and epoch.min() >= 0 and epoch.max() < n
    np.testing.assert_array_equal(epoch[:5], image_data.batch_indices(n, b, seed=7, step=0))
    next_epoch = np.concatenate([image_data.batch_indices(n, b, 7, s) for s in range(4, 8)])
    assert len(np.unique(next_epoch)) == 20 and not np.array_equal(epoch, next_epoch)
    other_seed = np.concatenate([image_data.batch_indices(n, b, 8, s) for s in range(4)])
    assert not np.array_equal(epoch, other_seed)
    with pytest.raises(ValueError, match="batch_size"):
        image_data.batch_indices(4, 5, 0, 0)


def test_host_batches_resume_and_split_across_hosts():
    images = np.arange(30, dtype=np.uint8).reshape(30, 1, 1, 1)
    labels = np.arange(30, dtype=np.int64)
    from_zero = image_data.host_batches(images, labels, 8, seed=1, start_step=0)
    batches = [next(from_zero) for _ in range(9)]  # crosses two epoch boundaries
    resumed = image_data.host_batches(images, labels, 8, seed=1, start_step=5)
    for expected in batches[5:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["label"], expected["label"])
    assert batches[0]["label"].dtype == np.int32 and batches[0]["image"].shape == (8, 1, 1, 1)
    np.testing.assert_array_equal(batches[3]["label"], image_data.batch_indices(30, 8, 1, 3))

    hosts = [
        image_data.host_batches(images, labels, 8, 1, 2, process_index=i, process_count=2)
        for i in range(2)
    ]
    for expected in batches[2:5]:
        parts = [next(h) for h in hosts]
        assert parts[0]["image"].shape == (4, 1, 1, 1)
        np.testing.assert_array_equal(
            np.concatenate([p["label"] for p in parts]), expected["label"]
        )
    with pytest.raises(ValueError, match="divisible"):
        image_data.host_batches(images, labels, 9, 1, 0, process_index=0, process_count=2)


def _sharding() -> NamedSharding:
    return NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), P("data"))


def test_prefetch_to_device_matches_host_batches_and_ends():
    images = np.random.default_rng(0).integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(20)
    source = image_data.host_batches(images, labels, 4, seed=0, start_step=0)
    host = [next(source) for _ in range(6)]
    source = image_data.host_batches(images, labels, 4, seed=0, start_step=0)
    finite = (next(source) for _ in range(6))
    device = list(image_data.prefetch_to_device(finite, _sharding(), size=2))
    assert len(device) == 6
    for h, d in zip(host, device, strict=True):
        assert isinstance(d["image"], jax.Array) and d["image"].sharding == _sharding()
        np.testing.assert_array_equal(np.asarray(d["image"]), h["image"])
        np.testing.assert_array_equal(np.asarray(d["label"]), h["label"])


def test_prefetch_to_device_reraises_source_errors():
    def failing():
        yield {"x": np.zeros((2, 3), np.float32)}
        raise RuntimeError("source broke")

    batches = image_data.prefetch_to_device(failing(), _sharding())
    assert next(batches)["x"].shape == (2, 3)
    with pytest.raises(RuntimeError, match="source broke"):
        next(batches)


def _info(mean: float = 0.5, std: float = 0.25) -> image_data.DatasetInfo:
    return image_data.DatasetInfo("test", 10, (6, 6, 2), (mean, 0.1), (std, 0.2), "crop_flip")


def _find_window(padded: np.ndarray, window: np.ndarray) -> tuple[int, int] | None:
    h, w = window.shape[:2]
    for dy in range(padded.shape[0] - h + 1):
        for dx in range(padded.shape[1] - w + 1):
            if np.array_equal(padded[dy : dy + h, dx : dx + w], window):
                return dy, dx
    return None


def _denormalise(x: jax.Array, info: image_data.DatasetInfo) -> np.ndarray:
    raw = (np.asarray(x) * np.array(info.std) + np.array(info.mean)) * 255
    return np.rint(raw).astype(np.uint8)


@pytest.mark.usefixtures("fast_compile")
def test_preprocess_none_is_normalisation():
    info = _info()
    x = np.random.default_rng(0).integers(0, 256, (3, 6, 6, 2), dtype=np.uint8)
    out = jax.jit(lambda x: image_data.preprocess(x, info, augment="none", key=None))(x)
    expected = (x / 255.0 - np.array(info.mean)) / np.array(info.std)
    assert out.dtype == jnp.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("fast_compile")
def test_preprocess_crop_takes_windows_of_the_zero_padded_image():
    info = _info()
    x = np.random.default_rng(1).integers(1, 256, (16, 6, 6, 2), dtype=np.uint8)  # no zeros
    crop = jax.jit(lambda x, k: image_data.preprocess(x, info, augment="crop", key=k))
    out = crop(x, jax.random.key(0))
    assert out.shape == x.shape
    raw = _denormalise(out, info)
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    offsets = [_find_window(padded[i], raw[i]) for i in range(len(x))]
    assert None not in offsets
    assert len(set(offsets)) > 4  # offsets differ per example
    np.testing.assert_array_equal(out, crop(x, jax.random.key(0)))
    other = crop(x, jax.random.key(1))
    assert not np.array_equal(out, other)


@pytest.mark.usefixtures("fast_compile")
def test_preprocess_crop_flip_flips_about_half():
    info = _info()
    x = np.random.default_rng(2).integers(1, 256, (64, 6, 6, 2), dtype=np.uint8)
    step = jax.jit(lambda x, k: image_data.preprocess(x, info, augment="crop_flip", key=k))
    raw = _denormalise(step(x, jax.random.key(3)), info)
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    flipped = 0
    for i in range(len(x)):
        if _find_window(padded[i], raw[i]) is None:
            assert _find_window(padded[i], raw[i, :, ::-1]) is not None
            flipped += 1
    assert 16 <= flipped <= 48


def test_preprocess_rejects_bad_arguments():
    x = jnp.zeros((2, 6, 6, 2), jnp.uint8)
    with pytest.raises(ValueError, match="key"):
        image_data.preprocess(x, _info(), augment="crop", key=None)
    with pytest.raises(ValueError, match="Unknown augmentation"):
        image_data.preprocess(x, _info(), augment="flip", key=jax.random.key(0))


def test_eval_batches_cover_every_example_once_with_a_padding_mask():
    images = np.arange(1, 11, dtype=np.uint8).reshape(10, 1, 1, 1)
    labels = np.arange(10, 20)
    batches = list(image_data.eval_batches(images, labels, 4))
    assert len(batches) == 3
    for b in batches:
        assert b["image"].shape == (4, 1, 1, 1) and b["label"].dtype == np.int32
        assert b["mask"].dtype == np.float32
    np.testing.assert_array_equal(batches[-1]["mask"], [1, 1, 0, 0])
    np.testing.assert_array_equal(batches[-1]["image"][2:], 0)
    np.testing.assert_array_equal(batches[-1]["label"][2:], 0)
    mask = np.concatenate([b["mask"] for b in batches]) == 1
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask], labels)
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches])[mask], images)
    assert list(image_data.eval_batches(images[:0], labels[:0], 4)) == []


def test_data_far_from_the_datasets_published_mean_pixel_is_flagged(tmp_path):
    import gzip

    # A tiny IDX pair of all-white images named fashion_mnist: mean 1.0, expected 0.286.
    for prefix, n in (("train", 8), ("t10k", 4)):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x03" + np.array([n, 28, 28], ">i4").tobytes())
            f.write(np.full((n, 28, 28), 255, np.uint8).tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x01" + np.array([n], ">i4").tobytes())
            f.write(np.arange(n, dtype=np.uint8).tobytes())
    config = _config(name="fashion_mnist", source="idx", data_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"mean pixel 1.000, but fashion_mnist has 0.286"):
        data = image_data.load_images(config)
    assert data.train_images.shape == (8, 28, 28, 1) and list(data.test_labels) == [0, 1, 2, 3]


def test_the_validation_split_is_stratified_by_class():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), [50, 30, 15, 5]).astype(np.int32)[rng.permutation(100)]
    x = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)
    (tx, ty), (vx, vy) = image_data._carve_validation(x, labels, 10, seed=3)
    assert len(vy) == 10 and len(ty) == 90
    np.testing.assert_array_equal(np.bincount(vy, minlength=4), [5, 3, 2, 0])  # 1.5, 0.5 → 2, 0
    assert sorted(np.concatenate([tx, vx]).ravel().tolist()) == list(range(100))
