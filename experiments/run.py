"""Runs any experiment from a config file.

    python -m experiments.run --config=configs/ml3_sine.py[:variant] [--workdir=DIR]
        [--config.meta.lr=3e-4 ...]

Re-running the same command on the same workdir resumes from the last checkpoint.
Overrides of keys the config does not have are rejected.
"""

import importlib.util
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, optionally with a variant: configs/<name>.py[:variant].",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory; defaults to runs/<config name>[_<variant>]."
)
flags.mark_flags_as_required(["config"])


def default_workdir(config_arg: str) -> str:
    """runs/<config file stem>[_<variant>] for a --config value."""
    path, _, variant = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}_{variant}" if variant else name)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    # Imported here so that --help and flag errors do not pay for importing JAX.
    from metalearn import algorithms
    from metalearn.runtime.loop import train_and_evaluate
    from metalearn.runtime.sharding import initialize_distributed

    initialize_distributed()  # on a multi-host launch; a no-op on one machine

    config = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].serialize().split("=", 1)[1])
    print(f"Workdir: {os.path.abspath(workdir)}")
    summary = train_and_evaluate(algorithms.make(config), config, workdir)
    print(f"Done: {os.path.join(workdir, 'summary.json')}")
    for line in _flat_lines(summary):
        print(line)


def _flat_lines(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and "mean" in v:
            yield f"  {prefix}{k}: {v['mean']:.4g} ± {v['std']:.4g}"
        elif isinstance(v, dict):
            yield from _flat_lines(v, f"{prefix}{k}.")


def check_overrides(argv: list[str]) -> str | None:
    """A message naming the first `--config.<key>` override the config lacks, else None.

    ml_collections rejects such keys too, but with a bare AttributeError; this says which
    key and what the valid ones next to it are.
    """
    config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if config_arg is None:
        return None
    path, _, variant = config_arg.partition(":")
    if not os.path.exists(path):
        return f"Config file {path!r} does not exist (from --config={config_arg})."
    spec = importlib.util.spec_from_file_location("_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        config = module.get_config(variant or None)
    except ValueError as e:
        return str(e)
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        node = config
        for i, part in enumerate(key.split(".")):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                parent = ".".join(key.split(".")[:i]) or "<top level>"
                known = (
                    ", ".join(sorted(node.keys()))
                    if isinstance(node, ml_collections.ConfigDict)
                    else "(not a group)"
                )
                return (
                    f"Unknown config key {key!r} in {arg!r}: {parent} has no {part!r}. "
                    f"Known keys there: {known}."
                )
            node = node[part]
    return None


if __name__ == "__main__":
    error = check_overrides(sys.argv[1:])
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    app.run(main)
