"""Datasets prepared for tensorflow-datasets: find them, prepare them when allowed, and say
clearly what is missing when neither works. Shared by every task that reads tfds data.

Before a download starts, the hosts of the dataset's download URLs (those tfds registers
with its checksums) are probed once, a TCP connection each within `PROBE_TIMEOUT_S`: on a
machine without internet tfds would retry every URL ten times, minutes, before failing. A
failed download leaves nothing behind in the data folder: what the attempt created there
is removed. `METALEARN_OFFLINE=1` treats every download host as unreachable (no
connection is tried), e.g. for tests on machines that have internet.
"""

import importlib.util
import os
import shutil
import socket
import threading
import urllib.parse
import urllib.request

PROBE_TIMEOUT_S = 3.0
OFFLINE_ENV = "METALEARN_OFFLINE"


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
        no_tensorflow = importlib.util.find_spec("tensorflow") is None
        unreachable = unreachable_host(name)
        if unreachable is not None:
            reason = f"the download failed: {unreachable}" + (
                "; preparing it would also need TensorFlow, which is not installed"
                if no_tensorflow
                else ""
            )
        elif no_tensorflow:
            reason = "download=True, but preparing it needs TensorFlow, which is not installed"
        else:
            try:
                with _removed_on_failure(data_dir, name):
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


def download_hosts(name: str) -> list[tuple[str, int]]:
    """The (host, port) pairs of the download URLs tfds registers for dataset `name`.

    Returns:
      Each distinct pair once, in the order of the URLs; [] when tfds knows no builder of
      that name or registers no URLs for it (nothing to probe).
    """
    try:
        infos = tfds().builder_cls(name).url_infos or {}
    except Exception:  # an unknown name: tfds's own error comes when it is built
        return []
    hosts = {}
    for url in infos:
        parts = urllib.parse.urlsplit(url)
        if parts.hostname:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            hosts[(parts.hostname, port, parts.scheme)] = None
    return [_via_proxy(host, port, scheme) for host, port, scheme in hosts]


def _via_proxy(host: str, port: int, scheme: str) -> tuple[str, int]:
    """Where a connection to (host, port) goes: the proxy the environment names, if any."""
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return host, port
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return parts.hostname or host, parts.port or 80


def unreachable_host(name: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the download of dataset `name` cannot start, or None if its hosts answer.

    Connects to each of `download_hosts(name)` at once (name lookup included) and waits
    at most `timeout` seconds in all; with $METALEARN_OFFLINE set it tries none.

    Returns:
      A sentence naming the first host that did not answer and why, or None when every
      host accepted a connection (or there is none to probe).
    """
    hosts = download_hosts(name)
    if not hosts:
        return None
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        host, port = hosts[0]
        return f"{OFFLINE_ENV} is set, so its download host {host}:{port} is not tried"
    results: dict[tuple[str, int], str | None] = {}
    threads = [
        threading.Thread(target=_connect, args=(h, timeout, results), daemon=True) for h in hosts
    ]
    for t in threads:
        t.start()
    deadline = timeout + 0.5  # the connections' own timeout, and a little slack
    for t in threads:
        t.join(deadline)
    for host, port in hosts:
        error = results.get((host, port), f"no connection within {timeout:g} s")
        if error is not None:
            return (
                f"its download host {host}:{port} cannot be reached ({error}), so this "
                "machine looks offline"
            )
    return None


def _connect(host: tuple[str, int], timeout: float, results: dict) -> None:
    try:
        socket.create_connection(host, timeout=timeout).close()
        results[host] = None
    except OSError as err:
        results[host] = f"{type(err).__name__}: {err}"


class _removed_on_failure:
    """Removes what a failed `download_and_prepare` created in `data_dir`: the folder
    (and the missing folders above it) if it was not there, else its new entries and
    those of its `<name>/`, `downloads/` and `downloads/extracted/` folders. What was
    there before stays."""

    def __init__(self, data_dir: str, name: str):
        self.folders = [
            data_dir,
            os.path.join(data_dir, name),
            os.path.join(data_dir, "downloads"),
            os.path.join(data_dir, "downloads", "extracted"),
        ]
        # The topmost folder of data_dir's path that does not exist yet, if any.
        self.created_root = None
        path = data_dir
        while not os.path.exists(path) and os.path.dirname(path) != path:
            self.created_root, path = path, os.path.dirname(path)

    def __enter__(self):
        self.before = {f: set(os.listdir(f)) if os.path.isdir(f) else None for f in self.folders}
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            return False
        if self.created_root is not None:  # everything in it is the attempt's
            shutil.rmtree(self.created_root, ignore_errors=True)
            return False
        for folder in reversed(self.folders):  # the deepest first
            if self.before[folder] is None or not os.path.isdir(folder):
                continue  # new (its parent's entry goes), or gone
            for entry in set(os.listdir(folder)) - self.before[folder]:
                path = os.path.join(folder, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
        return False


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
