"""The compilation cache of the command-line programs (metalearn/runtime/cache.py): which
directory it picks, and that the flag and the environment variables are obeyed."""

import os
import subprocess
import sys

import jax
import pytest

from metalearn.runtime import cache

OPTIONS = (
    "jax_enable_compilation_cache",
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
)


@pytest.fixture(autouse=True)
def clean(monkeypatch, tmp_path):
    """No cache variable from the caller (conftest sets JAX_COMPILATION_CACHE_DIR), HOME in
    tmp_path, and JAX's options as they were afterwards (the session's cache among them)."""
    for name in (
        cache.ENV_VAR,
        "JAX_COMPILATION_CACHE_DIR",
        "XDG_CACHE_HOME",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    before = {name: getattr(jax.config, name) for name in OPTIONS}
    yield
    for name, value in before.items():
        jax.config.update(name, value)


def test_default_directory_is_per_jax_version_under_the_users_cache(monkeypatch, tmp_path):
    expected = tmp_path / "home" / ".cache" / "metalearn" / f"jax-{jax.__version__}"
    assert cache.enable_compilation_cache() == str(expected)
    assert expected.is_dir()
    assert jax.config.jax_compilation_cache_dir == str(expected)
    assert jax.config.jax_enable_compilation_cache
    assert jax.config.jax_persistent_cache_min_compile_time_secs == cache.MIN_COMPILE_TIME_S

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    expected = tmp_path / "xdg" / "metalearn" / f"jax-{jax.__version__}"
    assert cache.enable_compilation_cache("auto") == str(expected)


@pytest.mark.parametrize("off", ["none", "0", "off", "OFF"])
def test_opt_out_turns_the_cache_off_even_where_jax_was_told_a_directory(
    monkeypatch, tmp_path, off
):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert cache.enable_compilation_cache(off) is None
    assert not jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", True)
    monkeypatch.setenv(cache.ENV_VAR, off)  # the same through the environment
    assert cache.enable_compilation_cache() is None
    assert not jax.config.jax_enable_compilation_cache
    assert not (tmp_path / "home" / ".cache").exists()


def test_flag_then_metalearn_variable_then_jaxs_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert cache.enable_compilation_cache() == str(tmp_path / "jax")
    assert (tmp_path / "jax").is_dir()
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "ours"))
    assert cache.enable_compilation_cache() == str(tmp_path / "ours")
    assert cache.enable_compilation_cache(str(tmp_path / "flag")) == str(tmp_path / "flag")
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "flag")
    monkeypatch.setenv(cache.ENV_VAR, "~/here")  # `~` expanded
    assert cache.enable_compilation_cache() == os.path.join(str(tmp_path / "home"), "here")


def test_a_threshold_set_for_jax_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
    cache.enable_compilation_cache(str(tmp_path))
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 2.0


def test_experiments_run_has_the_flag():
    """`--help` lists it (and, as every flag error, imports no JAX: well under a second)."""
    done = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--help"],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))),
        env={**os.environ, "PYTHONPATH": "."},
    )
    assert "--compilation_cache" in done.stdout + done.stderr
