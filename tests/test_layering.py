"""Imports point one way: base < data < audio < models < train < {evaluate, predict, export,
folds, demo, report} < cli (README, "Architecture").

An AST walk over jaxser/**/*.py (no import runs): every `import` and `from ... import`, at
module level or inside a function, must name a module of the same or a lower layer, and the
modules must not import each other in a cycle (a function-level import that dodges one
counts too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxser"

# The first name under jaxser/ -> its layer (a package's modules share its layer).
LAYERS = {
    # base: no jaxser imports but each other
    "constants": 0, "errors": 0, "config": 0, "configs": 0, "accelerator": 0,
    "distributed": 0, "workdir": 0, "hugepages": 0,
    "data": 1,  # host side: manifests, decoding, labels, splits, shards, tf.data
    "audio": 2,  # on-device JAX: log-mel, augmentation, mixup
    "models": 3,  # encoders, pooling, heads, conversion
    "train": 4,  # losses, metrics, optimizer, sharding, checkpoints, the loop
    # what a user runs on a trained workdir or around training
    "evaluate": 5, "predict": 5, "export": 5, "folds": 5, "demo": 5, "report": 5,
    "cli": 6, "__main__": 6,  # the command line
}
NAMES = {0: "base", 1: "data", 2: "audio", 3: "models", 4: "train", 5: "evaluate/predict/...",
         6: "cli"}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """`jaxser.train.loop` for jaxser/train/loop.py, `jaxser.data` for its __init__.py."""
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int | None:
    """The layer of `jaxser.X...`; None: the package itself, or not in LAYERS (which
    `test_every_module_has_a_layer` reports)."""
    parts = module.split(".")
    return None if len(parts) == 1 else LAYERS.get(parts[1])


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[str, int, bool]]:
    """(imported jaxser module, line, at module level) of every jaxser import in a source.

    `from jaxser import evaluate` names jaxser.evaluate; `from jaxser.data import pipeline`
    names jaxser.data.pipeline (a module) or jaxser.data (when `pipeline` is not a module,
    which `known` below sorts out); relative imports are resolved against `module`.
    """
    tree = ast.parse(source)
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / `try:` blocks at the top count as top.
        if isinstance(node, ast.If | ast.Try):
            top_level.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        at_top = id(node) in top_level
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno, at_top) for a in node.names
                      if a.name.split(".")[0] == "jaxser"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "jaxser":
                continue
            found += [(f"{base}.{a.name}", node.lineno, at_top) for a in node.names]
    return found


def resolve(name: str, known: set[str]) -> str:
    """The longest prefix of `name` that is a module of the package."""
    parts = name.split(".")
    while len(parts) > 1 and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts)


def package_imports(package: Path = PACKAGE) -> dict[str, list[tuple[str, int, bool]]]:
    """{module: [(imported module, line, at module level)]} over every file of the package."""
    files = sorted(package.rglob("*.py"))
    known = {module_name(p, package) for p in files}
    graph = {}
    for path in files:
        module = module_name(path, package)
        found = imports(path.read_text(), module, path.name == "__init__.py")
        graph[module] = [(resolve(name, known), line, top) for name, line, top in found]
    return graph


def upward_imports(graph: dict) -> list[str]:
    bad = []
    for module, found in graph.items():
        for target, line, top in found:
            own, theirs = layer(module), layer(target)
            if own is not None and theirs is not None and theirs > own:
                where = "module level" if top else "inside a function"
                bad.append(f"{module}:{line} imports {target} ({where}): layer "
                           f"{NAMES[theirs]} is above {NAMES[own]}")
    return bad


def cycles(graph: dict) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a loop (the strongly
    connected components of the import graph with more than one module; Tarjan)."""
    edges = {m: sorted({t for t, _, _ in found if t != m and t in graph})
             for m, found in graph.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


@pytest.fixture(scope="module")
def graph():
    return package_imports()


def test_every_module_has_a_layer(graph):
    missing = sorted({m.split(".")[1] for m in graph if "." in m} - set(LAYERS))
    assert not missing, f"add {missing} to LAYERS in tests/test_layering.py"


def test_no_import_points_up(graph):
    bad = upward_imports(graph)
    assert not bad, "imports that point up a layer:\n" + "\n".join(bad)


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, "modules that import each other:\n" + "\n".join(", ".join(c)
                                                                   for c in found)


def test_the_walk_sees_what_it_must(tmp_path):
    """An upward import inside a function, a relative one and a cycle are all caught."""
    pkg = tmp_path / "jaxser"
    (pkg / "train").mkdir(parents=True)
    (pkg / "data").mkdir()
    for init in (pkg / "__init__.py", pkg / "train" / "__init__.py",
                 pkg / "data" / "__init__.py"):
        init.write_text("")
    (pkg / "evaluate.py").write_text("from jaxser.train import loop\n")
    (pkg / "train" / "loop.py").write_text(
        "import json\n\n\ndef f():\n    from jaxser import evaluate\n    return evaluate, json\n")
    (pkg / "data" / "pipeline.py").write_text("from . import shards\n")
    (pkg / "data" / "shards.py").write_text("from ..train import loop\n")
    graph = package_imports(pkg)
    assert graph["jaxser.data.pipeline"] == [("jaxser.data.shards", 1, True)]
    bad = upward_imports(graph)
    assert len(bad) == 2
    assert any(b.startswith("jaxser.train.loop:5 imports jaxser.evaluate (inside a function)")
               for b in bad)
    assert any(b.startswith("jaxser.data.shards:1 imports jaxser.train.loop") for b in bad)
    assert cycles(graph) == [["jaxser.evaluate", "jaxser.train.loop"]]
