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


# The slow tier's files, longest first (seconds in CI's cold run on 2 cores, roughly:
# docs/testing.md). pytest-xdist hands out whole files (--dist loadfile), by default the
# ones with the most tests first; .ci/run gives the slow tier --no-loadscope-reorder, so
# files are handed out in this order instead, the longest first (a short file last
# cannot leave one worker running a 90-second test alone at the end). Files not listed
# follow, in their usual order.
LONGEST_FIRST = (
    "tests/experiments/test_run.py",  # ~500: the CLI smoke runs, the reacher's 200
    "tests/experiments/test_self_loss_lm.py",  # ~230
    "tests/experiments/test_gist_lm.py",  # ~220
    "tests/experiments/test_image_classification.py",  # ~150
    "tests/experiments/test_multiprocess.py",  # ~130
    "tests/experiments/test_ml3_mfrl.py",  # ~100
    "tests/metalearn/algorithms/test_self_loss.py",  # ~100
    "tests/benchmarks/test_ml3_sine_scaling.py",  # ~85, one test
    "tests/benchmarks/test_gpu_script.py",  # ~85, one test
    "tests/experiments/test_self_loss_lm_es.py",  # ~75
    "tests/experiments/test_ml3_reacher_demos.py",  # ~55
    "tests/experiments/test_ml3_mnist_binary.py",  # ~50
    "tests/experiments/test_ml3_devices.py",  # ~45
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    root = config.rootpath
    items.sort(key=lambda item: rank.get(item.path.relative_to(root).as_posix(), len(rank)))
