"""The experiment programs: one module per experiment, named by `config.experiment`.

`make(config)` imports `experiments.<config.experiment>` lazily and builds the one
`metalearn.runtime.Experiment` subclass that module defines, so adding an experiment is
one module here plus one config, with no registry to edit.
"""

import importlib
import inspect
import pkgutil

import ml_collections


def available() -> list[str]:
    """Names of the experiment modules (everything here but the entry and table scripts)."""
    return sorted(
        m.name
        for m in pkgutil.iter_modules(__path__)
        if not m.name.startswith(("_", "run", "sweep_", "reproduce_"))
    )


def experiment_class(name: str) -> type:
    """The `Experiment` subclass defined in `experiments.<name>`."""
    from metalearn.runtime.experiment import Experiment

    if name not in available():
        raise ValueError(
            f"Unknown experiment {name!r} (config.experiment); known: {', '.join(available())}."
        )
    module = importlib.import_module(f"{__name__}.{name}")
    classes = [
        c
        for _, c in inspect.getmembers(module, inspect.isclass)
        if issubclass(c, Experiment)
        and c.__module__ == module.__name__
        and not inspect.isabstract(c)
    ]
    if len(classes) != 1:
        raise TypeError(
            f"experiments.{name} must define exactly one concrete Experiment subclass; "
            f"found {[c.__name__ for c in classes]}."
        )
    return classes[0]


def make(config: ml_collections.ConfigDict, *, mesh=None):
    """Builds the experiment `config.experiment` names, on `mesh` (default: its own)."""
    if "experiment" not in config:
        raise ValueError(
            "The config has no 'experiment' key naming its module in experiments/ "
            f"(one of: {', '.join(available())})."
        )
    return experiment_class(config.experiment)(config, mesh=mesh)
