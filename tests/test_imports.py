"""The import structure: no import cycles between modules (lazy, in-function imports included), Diffusers' private
names in one compatibility module, and the light modules (command line, registry, loader checks) free of torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import diasr_diffusers

PACKAGE = Path(diasr_diffusers.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _nodes(node: ast.AST, top_level_only: bool):
    """The nodes under ``node``, skipping `if TYPE_CHECKING:` blocks (and function/class bodies if asked)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue
        if top_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        yield child
        yield from _nodes(child, top_level_only)


def _import_graph(top_level_only: bool = False) -> dict[str, set[str]]:
    """Module -> the package modules it imports: anywhere in its code (function bodies too), or at import time only
    (``top_level_only``); `TYPE_CHECKING` blocks aside."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _nodes(tree, top_level_only):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    targets.add(sub if sub in modules else module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_packages():
    """No two modules of different sub-packages import each other, even through lazy imports (the issue's
    commands <-> training and processors.core <-> processors.parallel); within one sub-package a lazy import back
    is tolerated (training.config reads training.families' registry view while validating)."""
    graph = _import_graph()
    assert "diasr_diffusers.processors.parallel" not in graph["diasr_diffusers.processors.core"]
    assert not any(t.startswith("diasr_diffusers.commands") for m, ts in graph.items() if ".training" in m for t in ts)
    for component in _cycles(graph):
        packages = {m.split(".")[1] for m in component}
        assert len(packages) == 1, f"import cycle across packages: {component}"


def test_no_import_cycles_at_module_level():
    """Import-time imports alone form no cycle at all (no import order can see a half-initialised module)."""
    assert _cycles(_import_graph(top_level_only=True)) == []


def test_diffusers_private_names_live_in_the_compat_module_only():
    from diasr_diffusers import _diffusers_compat

    for key in _diffusers_compat.PRIVATE_NAMES:
        assert _diffusers_compat.private(key) is not None  # a Diffusers upgrade that drops one fails here
    for path in PACKAGE.rglob("*.py"):
        if path.name == "_diffusers_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("diffusers"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private and "._" not in node.module, f"{path.name} imports {node.module} {private}"


def test_light_modules_import_without_torch():
    code = (
        "import sys\n"
        "import diasr_diffusers.cli, diasr_diffusers.families, diasr_diffusers._diffusers_compat\n"
        "import diasr_diffusers.commands.generate, diasr_diffusers.commands.app, diasr_diffusers.commands.train\n"
        "import diasr_diffusers.pipelines.loading\n"
        "from diasr_diffusers.families import FAMILIES, family_for_pipeline\n"
        "assert family_for_pipeline('LTXPipeline') is FAMILIES['ltx']\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
