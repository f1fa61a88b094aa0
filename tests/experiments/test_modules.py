"""The experiment programs stay apart: what two of them share lives in the library (or in
a private `experiments/_*.py` helper), never in one experiment that another imports."""

import ast
import pathlib

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / "experiments"


def imported_experiments(source: str) -> set[str]:
    """The modules of `experiments` that `source` imports (private helpers `_*` aside)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] == "experiments" and len(parts) > 1:
                found.add(parts[1])
            elif parts == ["experiments"]:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "experiments" and len(parts) > 1:
                    found.add(parts[1])
    return {name for name in found if not name.startswith("_")}


def test_the_scan_finds_each_form_of_import():
    assert imported_experiments("from experiments.self_loss_lm import phase2_summary") == {
        "self_loss_lm"
    }
    assert imported_experiments("from experiments import ml3_sine, _runs") == {"ml3_sine"}
    assert imported_experiments("import experiments.gist_lm as g") == {"gist_lm"}
    assert imported_experiments("from experiments._runs import run\nimport experiments") == set()


def test_no_experiment_module_imports_another():
    programs = {p.stem for p in EXPERIMENTS.glob("*.py") if not p.stem.startswith("_")}
    # The entry point and the table scripts drive experiments; they are not experiments.
    drivers = {"run"} | {p for p in programs if p.startswith(("sweep_", "reproduce_"))}
    found = {
        name: sorted(imported_experiments((EXPERIMENTS / f"{name}.py").read_text()) & programs)
        for name in sorted(programs - drivers)
    }
    assert not {k: v for k, v in found.items() if v}, found
    helpers = {p.stem: p for p in EXPERIMENTS.glob("_*.py") if p.stem != "__init__"}
    for name, path in helpers.items():  # a shared helper imports no experiment either
        assert not imported_experiments(path.read_text()) & programs, name
