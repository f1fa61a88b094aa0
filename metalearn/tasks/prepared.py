"""Datasets prepared for tensorflow-datasets: find them, prepare them when allowed, and say
clearly what is missing when neither works. Shared by every task that reads tfds data.
"""

import importlib.util
import os


def tfds():
    """The tensorflow_datasets module."""
    # Imported on first use so that importing `metalearn.tasks` stays fast.
    import tensorflow_datasets as tfds

    return tfds


def resolve_data_dir(data_dir: str, fallback: str = "") -> str:
    """Where prepared tfds data is read: the first of `data_dir`, $TFDS_DATA_DIR,
    `fallback` and tfds's default folder that is set; absolute.

    Args:
      data_dir: the folder the user asked for ('' for none), e.g. `config.data.data_dir`.
      fallback: the folder to use when neither `data_dir` nor $TFDS_DATA_DIR is set ('' for
        tfds's default), e.g. a smoke config's ../shared/data/tfds.
    """
    data_dir = (
        data_dir
        or os.environ.get("TFDS_DATA_DIR")
        or fallback
        or tfds().core.constants.get_default_data_dir()
    )
    return os.path.abspath(os.path.expanduser(data_dir))


def find_version(name: str, data_dir: str) -> str | None:
    """The newest version folder under `<data_dir>/<name>/` holding dataset_info.json."""
    folder = os.path.join(data_dir, name)
    if not os.path.isdir(folder):
        return None
    versions = []
    for entry in os.listdir(folder):
        parts = entry.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            if os.path.isfile(os.path.join(folder, entry, "dataset_info.json")):
                versions.append(tuple(int(p) for p in parts))
    return ".".join(map(str, max(versions))) if versions else None


def prepared_version(name: str, data_dir: str, download: bool) -> str:
    """The prepared version of `name`, preparing it first when allowed and possible."""
    version = find_version(name, data_dir)
    if version is not None:
        return version
    reason = "download=False"
    if download:
        # Every image builder here reads its raw files with tf.io.gfile: without
        # TensorFlow a download would only fail after fetching the files.
        if importlib.util.find_spec("tensorflow") is None:
            reason = "download=True, but preparing it needs TensorFlow, which is not installed"
        else:
            try:
                tfds().builder(
                    name, data_dir=data_dir, file_format="array_record"
                ).download_and_prepare()
            except Exception as err:
                raise FileNotFoundError(
                    missing_message(name, data_dir, f"the download failed: {err!r}")
                ) from err
            version = find_version(name, data_dir)
            if version is not None:
                return version
            reason = "download_and_prepare ran but left no dataset_info.json"
    raise FileNotFoundError(missing_message(name, data_dir, reason))


def missing_message(name: str, data_dir: str, reason: str) -> str:
    return (
        f"Dataset {name!r} is not prepared in {data_dir}: "
        f"{os.path.join(data_dir, name, '<version>', 'dataset_info.json')} is missing ({reason}). "
        f"Provide it by running once on a machine with internet, with TensorFlow installed "
        f"(pip install -e '.[download]') and --config.data.download=True, or with "
        f"`tfds build {name} --data_dir=DIR`; then set "
        f"TFDS_DATA_DIR or --config.data.data_dir to the prepared folder. On the project's dev "
        f"machines ../shared/data/tfds holds mnist, fashion_mnist and tiny_shakespeare, and "
        f"the `:subset` image configs read the real CIFAR-10 subset in "
        f"../shared/data/raw/cifar10_subset."
    )
