"""The package's layers: imports go one way (down), with no cycle, counting imports inside functions.

docs/architecture.md explains the layers; this test is their definition.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clip_refine_lab"

# Top-level module or sub-package -> layer. A module may import its own layer or a lower one.
LAYERS = {
    "utils": 0, "config": 0, "losses": 0, "priors": 0, "methods": 0, "metrics": 0, "distributed": 0, "optim": 0,
    "progress": 0,
    "models": 1, "data": 1,
    "features": 2, "rundir": 2, "plots": 2, "regime": 2,
    "embedded": 3,
    "evaluation": 4,
    "training": 5,
    "sweep": 6,
    "ui": 7,
    "cli": 8, "__init__": 8,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Modules of the package that ``path`` imports anywhere (top level or inside functions)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("clip_refine_lab"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("clip_refine_lab"):
                continue
            # `from pkg import name`: name may itself be a module
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found.update(subs or {target})
    # importlib-based lazy exports in __init__ count as imports too
    if path.name == "__init__.py" and here == "clip_refine_lab":
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known:
                found.add(node.value)
    found.discard(here)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {name: imported_modules(path, known) for name, path in files.items()}


def layer_of(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    if key not in LAYERS:
        raise AssertionError(f"{module}: no layer assigned; add '{key}' to LAYERS in tests/test_architecture.py "
                             "and to docs/architecture.md")
    return LAYERS[key]


def test_every_import_goes_down_or_sideways():
    upward = []
    for module, imports in sorted(import_graph().items()):
        for target in sorted(imports):
            if target in ("clip_refine_lab",):
                continue
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_inner_and_relative_imports(tmp_path):
    pkg = tmp_path / "clip_refine_lab"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from .sub import high\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "high.py").write_text("from .. import low\n")
    known = {"clip_refine_lab.low", "clip_refine_lab.sub", "clip_refine_lab.sub.high", "clip_refine_lab"}
    global PACKAGE
    saved, PACKAGE = PACKAGE, pkg
    try:
        assert imported_modules(pkg / "low.py", known) == {"clip_refine_lab.sub.high"}
        assert imported_modules(pkg / "sub" / "high.py", known) == {"clip_refine_lab.low"}
    finally:
        PACKAGE = saved


@pytest.mark.parametrize("name", __import__("clip_refine_lab").__all__)
def test_public_api_names_resolve(name):
    import clip_refine_lab

    assert getattr(clip_refine_lab, name) is not None


def test_size_limits():
    """No module over ~700 lines and no class over ~300: units a reader can hold in mind."""
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > 700:
            too_big.append(f"{path.relative_to(PACKAGE.parent)}: {text.count(chr(10))} lines (limit 700)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 300:
                too_big.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} class {node.name}: "
                               f"{node.end_lineno - node.lineno + 1} lines (limit 300)")
    assert not too_big, "\n".join(too_big)
