"""fastar's Python modules form layers without a circle (issue 24): each module imports only modules of
lower layers, at the top or inside a function alike (a lazy import is still a dependency); imports
under `if TYPE_CHECKING:` are annotations only and do not count. The layers, bottom up:"""
from __future__ import annotations

import ast
import os

LAYERS = [
    {"settings", "policy", "trace", "_C"},  # no fastar imports: the knobs, the route's rules, timing
    {"topology"},                            # which ranks share a node, the processes
    {"groups"},                              # process groups and the node's segment
    {"state"},                               # fastar.init's state, its timeout, its end
    {"diagnose"},                            # which rank broke a collective
    {"collectives"},                         # fastar.all_reduce and the public calls
    {"backend", "data_parallel"},            # torch.distributed's "fastar", fastar.wrap
    {"__init__", "demo"},
]
PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fastar")


def _runtime_imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    skip = set()
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` blocks
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    deps = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastar.") and node.level == 0:
            deps.add(node.module.split(".")[1])
    return deps


def layer_violations(pkg: str = PKG) -> list[str]:
    level = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    out = []
    for f in sorted(os.listdir(pkg)):
        if not f.endswith(".py"):
            continue
        mod = f[:-3]
        if mod not in level:
            out.append(f"fastar/{f}: in no layer (add it to LAYERS in python_tests/test_layers.py)")
            continue
        for dep in sorted(_runtime_imports(os.path.join(pkg, f))):
            if dep in level and level[dep] >= level[mod] and dep != mod:
                out.append(f"fastar/{f} imports {dep} (layer {level[dep]}), not below its own layer {level[mod]}")
    return out


def test_python_modules_import_only_lower_layers():
    assert layer_violations() == []


def test_layer_check_catches_an_upward_import(tmp_path):
    for f in os.listdir(PKG):
        if f.endswith(".py"):
            (tmp_path / f).write_text(open(os.path.join(PKG, f)).read())
    state = tmp_path / "state.py"
    state.write_text(state.read_text() + "\n\ndef _late():\n    from . import backend  # noqa\n    return backend\n")
    assert layer_violations(str(tmp_path)) == ["fastar/state.py imports backend (layer 6), not below its own layer 3"]
