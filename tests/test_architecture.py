"""Import direction (ARCHITECTURE.md): the package is split into layer packages, and a module's
top-level liftquant imports stay in its layer or go down. Imports inside functions are how upper
layers are reached lazily (the method registry, the transformers integration) and are not
constrained here. A new package or top-level module must be given a layer below, which keeps
ARCHITECTURE.md's table current; the packages' top-level imports form no cycle."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "liftquant"

# layer -> packages (or top-level modules) of liftquant; a module takes its longest matching prefix
LAYERS = {
    0: ("util",),
    1: ("core", "kernels", "models"),
    2: ("cli", "demo"),
    3: ("io",),
    4: ("quantize", "evaluation"),
    5: ("apps", "engine"),
}


def _name(path: Path) -> str:
    parts = path.relative_to(PKG).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__")


def _layer(module: str) -> int | None:
    best = None
    for layer, prefixes in LAYERS.items():
        for p in prefixes:
            matches = module == p or module.startswith(p + ".")
            if matches and (best is None or len(p) > len(best[1])):
                best = (layer, p)
    return None if best is None else best[0]


def _top_level_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "liftquant":
                out |= {a.name for a in node.names}
            elif node.module.startswith("liftquant."):
                out.add(node.module.removeprefix("liftquant."))
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("liftquant.") for a in node.names
                    if a.name.startswith("liftquant.")}
    return out


def _modules():
    return [p for p in sorted(PKG.rglob("*.py")) if "__pycache__" not in p.parts]


def test_every_module_has_a_layer_and_imports_point_down():
    problems = []
    for path in _modules():
        module = _name(path)
        if not module:  # liftquant/__init__.py: lazy re-exports only
            assert not _top_level_imports(path), "liftquant/__init__.py must import lazily"
            continue
        layer = _layer(module)
        if layer is None:
            problems.append(f"{module}: no layer (add it to LAYERS and ARCHITECTURE.md)")
            continue
        for dep in _top_level_imports(path):
            dep_layer = _layer(dep)
            if dep_layer is not None and dep_layer > layer:
                problems.append(f"{module} (layer {layer}) imports {dep} (layer {dep_layer})")
    assert not problems, "\n".join(problems)


def test_layer_packages_say_what_they_own_and_import_nothing():
    """Each layer package's ``__init__`` is a docstring (what it owns, what it may import) and
    imports nothing at top level, so ``import liftquant.core.pack`` stays as cheap as the
    module itself."""
    for names in LAYERS.values():
        for name in names:
            init = PKG / name / "__init__.py"
            if not init.is_file() or name in ("kernels", "models", "engine"):
                continue  # a top-level module (chat) or a package with its own API
            tree = ast.parse(init.read_text())
            doc = ast.get_docstring(tree)
            assert doc and "import" in doc, f"liftquant/{name}/__init__.py: say what it may import"
            assert not _top_level_imports(init), f"liftquant/{name}/__init__.py imports"


def test_packages_import_no_cycle():
    """Top-level imports between the packages (and top-level modules) form a DAG."""
    graph: dict[str, set[str]] = {}
    for path in _modules():
        module = _name(path)
        if not module:
            continue
        src = module.split(".")[0]
        for dep in _top_level_imports(path):
            dst = dep.split(".")[0]
            if dst != src:
                graph.setdefault(src, set()).add(dst)
    state: dict[str, int] = {}

    def visit(node, trail):
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*trail, node]))
        if state.get(node) == 2:
            return
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        visit(node, [])
