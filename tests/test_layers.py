"""The package's layers point one way, and no two files import each other through a cycle.

Every `import` in `lmlab/` counts, at module level or inside a function: an import hidden
in a function to dodge a cycle is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lmlab"

# low to high; a module may import its own layer or a lower one
LAYERS = [
    {"lmlab.utils", "lmlab.errors", "lmlab.console", "lmlab.config", "lmlab.render"}
    | {"lmlab.version"},
    {"lmlab.model"},
    {"lmlab.data", "lmlab.tokenizer"},
    {"lmlab.train", "lmlab.infer"},
    {"lmlab.prompt"},
    {"lmlab.eval", "lmlab.adapt", "lmlab.trust"},
    {"lmlab.serve", "lmlab.guide"},
    {"lmlab.run", "lmlab.recipes"},
    {"lmlab.cli"},
]
# the package itself (`from lmlab import load_model`) re-exports the model loader and the
# tokenizer, so it sits with the tokenizer: a model module may not import it
PACKAGE_LAYER = 2


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> int:
    if module == "lmlab":
        return PACKAGE_LAYER
    for i, group in enumerate(LAYERS):
        if any(module == g or module.startswith(g + ".") for g in group):
            return i
    raise AssertionError(f"{module}: in no layer; add its package to LAYERS")


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, path: Path) -> dict[str, int]:
    """The lmlab modules `module` imports, each with the line of its first import."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(module, path.name == "__init__.py", node)
            names = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        for name in names:
            while name and name not in MODULES:  # `lmlab.a.b.func` -> the module `lmlab.a.b`
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith("lmlab"):
                found.setdefault(name, node.lineno)
    return found


GRAPH = {m: imports(m, p) for m, p in MODULES.items()}


def where(module: str, dep: str) -> str:
    return f"{MODULES[module].relative_to(ROOT)}:{GRAPH[module][dep]} imports {dep}"


def test_no_import_points_up_the_layers():
    assert len(MODULES) > 50  # the walk found the package
    up = []
    for module, deps in GRAPH.items():
        lm = layer(module)
        if module == "lmlab":  # the package's own re-exports, checked by its layer below
            continue
        up += [where(module, dep) for dep in deps if layer(dep) > lm]
    assert layer("lmlab") >= max(layer(d) for d in GRAPH["lmlab"])  # what it re-exports
    assert not up, "imports against the layer order:\n" + "\n".join(sorted(up))


def test_no_import_cycles():
    """Tarjan's strongly connected components: any component of two or more modules is a
    cycle; the message names each file and the import that closes it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    lines = []
    for comp in cycles:
        members = set(comp)
        lines += [where(m, d) for m in comp for d in GRAPH[m] if d in members]
    assert not cycles, "import cycles:\n" + "\n".join(lines)


def test_the_checker_sees_hidden_imports(tmp_path):
    """The walk must see an import inside a function (the way cycles used to hide)."""
    code = "def f():\n    from lmlab.cli import main\n    return main\n"
    path = tmp_path / "mod.py"
    path.write_text(code)
    assert imports("lmlab.model.fake", path) == {"lmlab.cli": 2}
