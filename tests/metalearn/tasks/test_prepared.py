"""Preparing tfds data (metalearn/tasks/prepared.py) when the download cannot happen: it
fails within seconds, with the usual message, and leaves nothing in the data folder.

No test here touches the network: unreachable hosts are a closed port on 127.0.0.1, or
$METALEARN_OFFLINE, which makes every host unreachable without trying it.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import time

import pytest

from metalearn.tasks import prepared

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the socket is


def _entries(folder):
    return sorted(
        os.path.relpath(os.path.join(d, n), folder)
        for d, ds, fs in os.walk(folder)
        for n in ds + fs
    )


def test_download_hosts_are_the_registered_urls_hosts():
    assert prepared.download_hosts("cifar10") == [("www.cs.toronto.edu", 443)]
    assert prepared.download_hosts("no_such_dataset_here") == []


def test_an_unreachable_download_host_fails_at_once_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(prepared.OFFLINE_ENV, raising=False)
    port = _closed_port()
    monkeypatch.setattr(prepared, "download_hosts", lambda name: [("127.0.0.1", port)])
    data_dir = tmp_path / "data"
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        prepared.prepared_version("cifar10", str(data_dir), download=True)
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert f"127.0.0.1:{port} cannot be reached" in message
    assert "Dataset 'cifar10' is not prepared in" in message and "TFDS_DATA_DIR" in message
    assert not data_dir.exists()


def _pretend_tensorflow(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: object() if n == "tensorflow" else find_spec(n, *a),
    )


class _FailingBuilder:
    """A tfds builder whose download creates tfds's folders and files, then fails."""

    def __init__(self, data_dir):
        self.data_dir = data_dir

    def download_and_prepare(self):
        for folder in ("cifar10/3.0.2.incomplete", "downloads/extracted/x.tmp"):
            os.makedirs(os.path.join(self.data_dir, folder), exist_ok=True)
        with open(os.path.join(self.data_dir, "downloads", "cifar.tar.gz.tmp"), "w") as f:
            f.write("partial")
        raise ConnectionError("Max retries exceeded")


@pytest.mark.parametrize("existing", [True, False], ids=["data_dir_existed", "new_data_dir"])
def test_a_failed_download_removes_only_what_it_created(existing, tmp_path, monkeypatch):
    monkeypatch.setattr(prepared, "unreachable_host", lambda name: None)
    _pretend_tensorflow(monkeypatch)

    class Tfds:  # tfds().builder is all prepared_version calls on a download
        @staticmethod
        def builder(name, data_dir, file_format):
            return _FailingBuilder(data_dir)

    monkeypatch.setattr(prepared, "tfds", lambda: Tfds)
    data_dir = tmp_path / "data" / "tfds"
    if existing:  # another dataset and an earlier download, kept
        (data_dir / "mnist" / "3.0.1").mkdir(parents=True)
        (data_dir / "downloads" / "extracted").mkdir(parents=True)
        (data_dir / "downloads" / "mnist.gz").write_text("kept")
    before = _entries(tmp_path)
    with pytest.raises(FileNotFoundError, match="the download failed: ConnectionError"):
        prepared.prepared_version("cifar10", str(data_dir), download=True)
    assert _entries(tmp_path) == before


def test_the_cli_without_network_fails_within_seconds_and_leaves_the_data_folder_empty(tmp_path):
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            "--config=configs/adalfl_cifar.py",
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        # Offline even where this machine has internet: no host is tried.
        env={**os.environ, "TFDS_DATA_DIR": str(data_dir), prepared.OFFLINE_ENV: "1"},
    )
    assert time.perf_counter() - start < 30
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: Dataset 'cifar10' is not prepared in" in proc.stderr
    assert "www.cs.toronto.edu:443" in proc.stderr and "Traceback" not in proc.stderr
    assert _entries(data_dir) == []
