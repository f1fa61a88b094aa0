"""The programs in experiments/ stay apart: none imports another (what two of them share
lives in the library or in a private helper module of experiments/, named `_...`)."""

import ast
import pathlib

import experiments

ROOT = pathlib.Path(experiments.__file__).parent


def _imported_modules(tree: ast.AST, package: str) -> set[str]:
    """The submodules of `package` that a module's imports (anywhere in it) name."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else node.module or ""
            if node.level and node.module:
                base = f"{package}.{node.module}"
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    prefix = package + "."
    return {n[len(prefix) :].split(".")[0] for n in names if n.startswith(prefix)}


def _cross_imports() -> dict[str, set[str]]:
    modules = {p.stem for p in ROOT.glob("*.py")}
    found = {}
    for path in sorted(ROOT.glob("*.py")):
        imported = _imported_modules(ast.parse(path.read_text()), "experiments")
        others = {m for m in imported & modules if not m.startswith("_") and m != path.stem}
        if others:
            found[path.name] = others
    return found


def test_no_experiment_module_imports_another():
    assert _cross_imports() == {}, "import from the library or an experiments/_private module"


def test_the_scan_sees_every_form_of_import():
    forms = {
        "from experiments.gist_lm import GistLM": {"gist_lm"},
        "from experiments import self_loss_lm, _runs": {"self_loss_lm", "_runs"},
        "import experiments.ml3_sine as m": {"ml3_sine"},
        "from . import ml3_mbrl": {"ml3_mbrl"},
        "from .image_classification import X": {"image_classification"},
        "def f():\n    from experiments._text import TextState": {"_text"},
        "import experiments": set(),
    }
    for source, expected in forms.items():
        assert _imported_modules(ast.parse(source), "experiments") == expected, source
