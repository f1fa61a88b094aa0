"""Runs any experiment from a config file.

    python -m experiments.run --config=configs/ml3_sine.py[:variant] [--workdir=DIR]
        [--config.meta.lr=3e-4 ...]

The config names its program (`config.experiment`, a module of this package), which is
imported only after the flags are parsed, so `--help` and flag errors do not import JAX.
Re-running the same command on the same workdir resumes from the last checkpoint.
Errors that are the user's to fix (an unknown config key or variant, a bad value, a
missing dataset, a non-finite loss) are printed as their message alone, with exit status
2 for flags and 1 otherwise; set METALEARN_TRACEBACK=1 to see the traceback instead.
SIGTERM (what TPU VMs, SLURM and Kubernetes send before preempting a job) or Ctrl-C
(SIGINT) stops the run after the step under way, with a checkpoint of that step and a
message saying where it is, exit status 75 (`PREEMPTED_STATUS`, EX_TEMPFAIL: re-run to
resume, to the result of an uninterrupted run). A second signal stops it at once, the
step under way not saved, exit status 130 (SIGINT) or 143 (SIGTERM).
"""

import importlib.util
import os
import signal
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory; defaults to runs/<config name>[_<variant>]."
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache", "auto", "JAX's compilation cache: auto, none or a directory."
)
_CONFIG_ARG = None  # the --config value, configs/<name>.py[:variant]
_CONFIG = None  # its ConfigDict, with the --config.<key> overrides applied by absl


def default_workdir(config_arg: str) -> str:
    """runs/<config file stem>[_<variant>] for a --config value."""
    path, _, variant = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join("runs", f"{name}_{variant}" if variant else name)


def _fail(message: str, status: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def load_config(config_arg: str) -> ml_collections.ConfigDict:
    """Loads `configs/<name>.py[:variant]` once; a bad path or variant is a ValueError."""
    path, _, variant = config_arg.partition(":")
    if not os.path.exists(path):
        raise ValueError(f"Config file {path!r} does not exist (from --config={config_arg}).")
    spec = importlib.util.spec_from_file_location("_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant or None)


PREEMPTED_STATUS = 75  # stopped on a signal with a checkpoint of the step reached


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, as Ctrl-C's KeyboardInterrupt is."""


_SIGNALS: list[int] = []  # the stopping signals received, first first


def _on_signal(signum, frame) -> None:
    """The first signal asks the loop to stop after the call under way (`should_stop`);
    a second stops the run at once."""
    del frame
    _SIGNALS.append(signum)
    if len(_SIGNALS) == 1:
        name = signal.Signals(signum).name
        print(
            f"\n{name}: stopping after the step under way, with a checkpoint of it "
            "(send it again to stop now, without).",
            file=sys.stderr,
            flush=True,
        )
        return
    # Python prints and drops an exception raised inside a garbage-collection callback:
    # the loop then stops at its next call (`should_stop`).
    raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _unraisable(info) -> None:
    """Python's hook for exceptions it cannot raise, silent about a dropped signal's."""
    if not issubclass(info.exc_type, KeyboardInterrupt):
        sys.__unraisablehook__(info)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _fail(f"Unexpected arguments: {' '.join(argv[1:])}", 2)
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    signal.signal(signal.SIGTERM, _on_signal)  # kept by `initialize_distributed`
    sys.unraisablehook = _unraisable
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not ignored
        signal.signal(signal.SIGINT, _on_signal)
    workdir = _WORKDIR.value or default_workdir(_CONFIG_ARG)
    try:
        _train(_CONFIG.value, workdir)
    except KeyboardInterrupt as e:
        if os.environ.get("METALEARN_TRACEBACK"):
            raise
        print(f"\n{_interrupted_message(e, workdir)}", file=sys.stderr, flush=True)
        if type(e).__name__ == "Preempted":  # loop.Preempted, without importing the loop
            sys.exit(PREEMPTED_STATUS)
        signum = _SIGNALS[-1] if _SIGNALS else signal.SIGINT
        sys.exit(128 + signum)


def _train(config: ml_collections.ConfigDict, workdir: str) -> None:
    print(f"Workdir: {os.path.abspath(workdir)}", flush=True)
    print("Loading the data and building the experiment ...", flush=True)
    import experiments
    from metalearn.runtime.cache import enable_compilation_cache
    from metalearn.runtime.loop import DivergenceError, train_and_evaluate
    from metalearn.runtime.sharding import initialize_distributed

    enable_compilation_cache(_COMPILATION_CACHE.value)  # before anything compiles
    try:
        initialize_distributed()  # on a multi-host launch; a no-op on one machine
        summary = train_and_evaluate(
            experiments.make(config), config, workdir, should_stop=lambda: bool(_SIGNALS)
        )
    except (ValueError, FileNotFoundError, DivergenceError) as e:
        if os.environ.get("METALEARN_TRACEBACK"):
            raise
        _fail(str(e), 1)
    print(f"Done: {os.path.join(workdir, 'summary.json')}")
    for line in _flat_lines(summary):
        print(line)


def _interrupted_message(error: KeyboardInterrupt, workdir: str) -> str:
    """The loop's message (`loop.Interrupted`), or the same for a run stopped before it."""
    try:
        from metalearn.runtime import checkpoint, loop
    except Exception:  # stopped while importing them: the libraries are half loaded
        return (
            "Interrupted while starting, before any step. Re-running the same command "
            f"resumes from the last checkpoint in {os.path.join(workdir, 'checkpoints')}, "
            "if there is one."
        )
    if isinstance(error, loop.Interrupted):
        return str(error)
    return loop.interrupted_message(workdir, None, None, checkpoint.latest_checkpoint(workdir))


def _flat_lines(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and "mean" in v:
            yield f"  {prefix}{k}: {v['mean']:.4g} ± {v['std']:.4g}"
        elif isinstance(v, dict):
            yield from _flat_lines(v, f"{prefix}{k}.")


def unknown_key_message(config: ml_collections.ConfigDict, key: str) -> str | None:
    """Which part of a `--config.<key>` override the config lacks, and what is there."""
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
                f"Unknown config key {key!r} in '--config.{key}': {parent} has no {part!r}. "
                f"Known keys there: {known}."
            )
        node = node[part]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """Loads the config (once), checks the overrides against it, then absl's parsing.

    Every error is printed as its message alone (see the module docstring).
    """
    global _CONFIG, _CONFIG_ARG
    rest, config_args = [argv[0]], []
    args = iter(argv[1:])
    for arg in args:
        if arg.startswith("--config="):
            config_args.append(arg.split("=", 1)[1])
        elif arg == "--config":
            config_args.append(next(args, ""))
        else:
            rest.append(arg)
    if not config_args:
        if any(a in ("--help", "-h", "--helpfull") for a in rest):
            return flags.FLAGS(rest)
        _fail("--config=configs/<name>.py[:variant] is required.", 2)
    _CONFIG_ARG = config_args[-1]
    try:
        config = load_config(_CONFIG_ARG)
    except ValueError as e:
        _fail(str(e), 2)
    for arg in rest:
        if arg.startswith("--config."):
            key = arg[len("--config.") :].split("=", 1)[0]
            message = unknown_key_message(config, key)
            if message:
                _fail(message, 2)
    _CONFIG = config_flags.DEFINE_config_dict("config", config, lock_config=True, sys_argv=rest)
    try:
        return flags.FLAGS(rest)
    except flags.Error as e:
        _fail(str(e), 2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
