"""Named random streams: no two streams of a namespace share a number, no code folds a bare
number into a key or adds one to a seed, and a name folds exactly as its number does."""

import ast
import enum
import pathlib

import jax
import numpy as np

from metalearn import streams

ROOT = pathlib.Path(__file__).parents[2]
SCANNED = ("metalearn", "experiments", "benchmarks")
# Calls that make a key or a generator from a seed.
_SEEDED_CALLS = {"key", "PRNGKey", "default_rng"}


def _namespaces() -> list[type[enum.IntEnum]]:
    return [
        v
        for v in vars(streams).values()
        if isinstance(v, type) and issubclass(v, enum.IntEnum) and v.__module__ == streams.__name__
    ]


def collisions(namespace: type[enum.IntEnum]) -> dict[int, list[str]]:
    """{number: the names that share it} of the numbers more than one member has.

    Reads `__members__`, which keeps the names an enum without `@enum.unique` turns into
    aliases of the first member with their number.
    """
    names: dict[int, list[str]] = {}
    for name, member in namespace.__members__.items():
        names.setdefault(int(member), []).append(name)
    return {number: shared for number, shared in names.items() if len(shared) > 1}


def test_every_namespace_gives_each_stream_its_own_number():
    assert _namespaces()
    found = {ns.__name__: collisions(ns) for ns in _namespaces()}
    assert not {name: c for name, c in found.items() if c}, found


def test_collisions_names_the_streams_that_share_a_number():
    class Shared(enum.IntEnum):  # no @enum.unique: what the check must catch
        INIT = 0
        INNER = 1
        OUTER = 1

    assert collisions(Shared) == {1: ["INNER", "OUTER"]}


def _has_int_literal(node: ast.AST) -> bool:
    return any(
        isinstance(n, ast.Constant) and type(n.value) is int  # bools are not numbers here
        for n in ast.walk(node)
    )


def _numbered_constants(tree: ast.Module) -> set[str]:
    """The module-level names bound to a value with an integer literal in it (`_INIT = 0`,
    `_A, _B = range(2)`, `FOLDS = {"train": 1000}`): streams numbered by hand, by name."""
    names = set()
    for stmt in tree.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            if _has_int_literal(stmt.value):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def _call_name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def _mentions_seed(node: ast.AST) -> bool:
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return "seed" in name.lower()


def numbered_streams(source: str) -> list[tuple[int, str]]:
    """(line, what) of every hand-numbered stream in `source`: a `fold_in` whose data has
    an integer literal or a numbered module constant (`_numbered_constants`), a key or
    generator made from a seed with one in it (a constant `key(0)` is none), and one added
    to a seed."""
    tree = ast.parse(source)
    constants = _numbered_constants(tree)

    def numbered(node: ast.AST) -> bool:
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        return _has_int_literal(node) or bool(names & constants)

    found: dict[int, str] = {}  # one report a line
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name, args = _call_name(node), node.args
            if name == "fold_in" and len(args) > 1 and numbered(args[1]):
                found.setdefault(node.lineno, f"fold_in(..., {ast.unparse(args[1])})")
            elif (
                name in _SEEDED_CALLS
                and args
                and not isinstance(args[0], ast.Constant)
                and numbered(args[0])
            ):
                found.setdefault(node.lineno, f"{name}({ast.unparse(args[0])})")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            sides = (node.left, node.right)
            if any(_mentions_seed(s) for s in sides) and any(numbered(s) for s in sides):
                found.setdefault(node.lineno, ast.unparse(node))
    return sorted(found.items())


def test_numbered_streams_finds_each_kind():
    source = (
        "a = jax.random.fold_in(key, 3)\n"
        "b = fold_in(key, 3 + k)\n"
        "c = jax.random.key(seed + 1)\n"
        "d = np.random.default_rng([seed, 1])\n"
        "e = c.seed + 100_003\n"
        "f = jax.random.fold_in(key, Streams.INNER + k)\n"
        "g = jax.random.key(0)\n"
        "h = jax.random.fold_in(key, step)\n"
        "_INIT, _INNER = range(2)\n"
        "FOLDS = {'train': 1000}\n"
        "OK = {'train': Streams.TRAIN}\n"
        "i = jax.random.fold_in(key, _INNER)\n"
        "j = jax.random.fold_in(key, FOLDS[name])\n"
        "k = jax.random.fold_in(key, OK[name])\n"
    )
    assert [line for line, _ in numbered_streams(source)] == [1, 2, 3, 4, 5, 12, 13]


def test_no_stream_is_numbered_by_hand():
    found = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            found += [
                f"{relative}:{line}: {what}" for line, what in numbered_streams(path.read_text())
            ]
    assert not found, "name these streams in metalearn/streams.py:\n" + "\n".join(found)


def test_a_member_folds_as_its_number():
    key = jax.random.key(0)
    for member in (m for ns in _namespaces() for m in ns):
        np.testing.assert_array_equal(
            jax.random.key_data(jax.random.fold_in(key, member)),
            jax.random.key_data(jax.random.fold_in(key, int(member))),
            err_msg=f"{type(member).__name__}.{member.name}",
        )


def test_a_seed_alone_seeds_the_generator_of_stream_zero():
    # task_pairs' generator was default_rng(seed) before it was named.
    for seed in (0, 3, 2**33 + 5):
        np.testing.assert_array_equal(
            np.random.default_rng([seed, streams.DigitPairs.PAIRS]).permutation(10),
            np.random.default_rng(seed).permutation(10),
        )
