"""Import direction (ARCHITECTURE.md): a module's top-level liftquant imports stay in its layer
or go down. Imports inside functions are how upper layers are reached lazily (the method
registry, the transformers integration) and are not constrained here. A new module must be
given a layer below, which keeps ARCHITECTURE.md's table current."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "liftquant"

# layer -> module prefixes (relative to liftquant); a module takes its longest matching prefix
LAYERS = {
    0: ("log", "fileio", "provenance", "records", "errors", "config", "latticespec", "methods",
        "finetune_config", "hadamard", "pack", "proxy"),
    1: ("lattice", "lattice_train", "whiten", "kernels", "linear", "models"),
    2: ("integrity", "checkpoint", "size", "integrations"),
    3: ("cache", "capture", "stream", "blocktrain", "plan", "blockstore", "calibrate", "rate",
        "distributed", "baselines"),
    4: ("assets", "data", "eval", "lmeval", "tasks", "pareto"),
    5: ("api", "finetune", "chat", "engine"),
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


def test_every_module_has_a_layer_and_imports_point_down():
    problems = []
    for path in sorted(PKG.rglob("*.py")):
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
