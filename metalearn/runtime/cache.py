"""JAX's persistent compilation cache for the command-line programs, on by default.

Most of a short run's wall time on a CPU is XLA compiling its programs; with the cache
a second run of the same programs (the same config, shapes, XLA flags and jax version)
reads them from disk instead. `experiments.run` calls `enable_compilation_cache` before
anything is compiled. Where the cache lives, first match wins:

1. the `setting` argument (`experiments.run --compilation_cache=none|DIR`);
2. the environment variable `METALEARN_COMPILATION_CACHE` (`0`, `none` or `off`: no
   cache; anything else: a directory);
3. `JAX_COMPILATION_CACHE_DIR`, JAX's own variable (CI and the tests set it);
4. `$XDG_CACHE_HOME/metalearn/jax-<jax version>` (`~/.cache/...` without XDG_CACHE_HOME),
   one folder per jax version, since entries of another version are never read.
"""

import os

import jax

ENV_VAR = "METALEARN_COMPILATION_CACHE"
OFF = ("0", "none", "off", "false", "no")
# Programs that compile in at least this long are written to the cache. JAX's default of
# 1 s leaves out the small programs (init, the evaluation's reductions) that a CPU run
# compiles in 0.1-0.9 s each; reading one back takes a few milliseconds
# (docs/speed.md measures the whole sine protocol both ways).
MIN_COMPILE_TIME_S = 0.0


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/metalearn/jax-<jax version>`, `~/.cache/...` by default."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "metalearn", f"jax-{jax.__version__}")


def enable_compilation_cache(setting: str | None = None) -> str | None:
    """Turns JAX's persistent compilation cache on (or off), before the first compilation.

    Args:
      setting: `None` or `"auto"`: decide from the environment (the module docstring's
        order); `"none"` (or `"0"`, `"off"`): no cache; anything else: the cache's
        directory (`~` expanded).

    Returns:
      The cache directory (created if missing), or None when the cache is off.
    """
    if setting in (None, "", "auto"):
        setting = os.environ.get(ENV_VAR) or os.environ.get("JAX_COMPILATION_CACHE_DIR") or None
    if setting is not None and setting.strip().lower() in OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = os.path.abspath(os.path.expanduser(setting or default_cache_dir()))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    # A threshold the user set for JAX stays theirs.
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    return path
