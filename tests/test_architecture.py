"""The package's layers (docs/architecture.md): imports flow one way, no module imports
another in a cycle (lazy imports inside functions included), and no private name is imported
from another module."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src" / "choicesae"
# each subpackage's layer: a module may import its own subpackage and lower layers only
LAYER = {
    "errors": 0,
    "threads": 0,
    "core": 1,
    "data": 1,
    "step": 2,
    "parallel": 3,
    "training": 4,
    "evaluation": 5,
    "interop": 5,
    "bench": 6,
    "cli": 7,
    "__init__": 8,
    "__main__": 8,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every choicesae import in the file, wherever it stands; name is ""
    for `import module`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, "") for a in node.names if a.name.startswith("choicesae")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("choicesae"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub, "") if sub in MODULES else (node.module, alias.name))
    return found


def layer(module: str) -> tuple[str, int]:
    """The subpackage (or top-level module) of a module and its layer."""
    part = module.split(".")[1] if "." in module else "__init__"
    return part, LAYER[part]


def test_every_module_has_a_layer():
    assert all(layer(name)[0] in LAYER for name in MODULES)


def test_imports_flow_down_the_layers():
    wrong = []
    for name, path in MODULES.items():
        part, rank = layer(name)
        for target, _ in imports(path):
            other, other_rank = layer(target)
            if other != part and other_rank >= rank:
                wrong.append(f"{name} imports {target}")
    assert not wrong, wrong


def test_no_import_cycle():
    graph = {name: {t for t, _ in imports(path) if t != name} for name, path in MODULES.items()}
    done, path = set(), []

    def visit(node: str) -> None:  # depth first; a node met again on the path is a cycle
        if node in path:
            raise AssertionError(" -> ".join([*path[path.index(node) :], node]))
        if node in done:
            return
        path.append(node)
        for target in sorted(graph.get(node, ())):
            visit(target)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)


def test_no_private_name_crosses_modules():
    crossing = [
        f"{name} imports {target}.{imported}"
        for name, path in MODULES.items()
        for target, imported in imports(path)
        if imported.startswith("_") and target != name
    ]
    assert not crossing, crossing
