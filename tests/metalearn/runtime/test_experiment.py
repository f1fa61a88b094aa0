"""The experiment protocol (metalearn/runtime/experiment.py): every experiment program
follows it through its public methods and hooks, and the loop reads no experiment's keys."""

import ast
import os

from metalearn.runtime import experiment as protocol

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
BASES = {"Experiment": protocol.Experiment, "ML3Experiment": protocol.ML3Experiment}


def _experiment_classes():
    """(file, class name, names it defines) of every class of experiments/ built on a base."""
    folder = os.path.join(ROOT, "experiments")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = {b.id for b in node.bases if isinstance(b, ast.Name)} & set(BASES)
                if bases:
                    defined = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
                    yield name, node.name, bases, defined


def test_experiments_override_no_private_method_of_the_protocol():
    classes = list(_experiment_classes())
    assert len(classes) >= 10  # every experiment program, not an empty walk
    for file, cls, bases, defined in classes:
        private = {
            attr
            for base in bases
            for klass in BASES[base].__mro__
            for attr in vars(klass)
            if attr.startswith("_") and not attr.startswith("__")
        }
        assert not defined & private, f"{file}: {cls} overrides {sorted(defined & private)}"


def test_the_loop_reads_no_config_key_but_its_own_two():
    tree = ast.parse(open(os.path.join(ROOT, "metalearn", "runtime", "loop.py")).read())
    keys = set()
    for node in ast.walk(tree):
        # config.<key> and config.get("<key>") / meta.get("<key>")
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "config":
            keys.add(node.attr)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            keys.add(node.args[0].value)
    assert keys - {"get", "to_json_best_effort"} == {"log_every", "checkpoint_every_minutes"}
