import os
import tempfile

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

# Tests compile with XLA's CPU fusion emitters off (its older loop emitters), which takes
# 20-60 % less compilation time, most of what the test tiers spend (docs/testing.md). Their
# numbers differ from a user's run of the same config in the last bits only, and no test
# compares against such a run. Read when the backend starts, so it reaches every program
# of the session and every subprocess (which inherit it; tests that set XLA_FLAGS for a
# subprocess append to it).
TEST_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

# Tests build the same small programs many times (one experiment per run directory), and
# the end-to-end ones do so in subprocesses: share one compilation cache for the session
# unless the caller set one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="metalearn-jax-cache-")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture
def float64():
    """Runs a test in float64 (finite differences need it) and restores float32 after."""
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", False)


@pytest.fixture
def fast_compile():
    """Skips most XLA optimisations: for tests whose time is compilation, not running."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)
