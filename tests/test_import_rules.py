"""The package rules of docs/concepts/kernel.md, checked on the source.

Every ``import`` counts, at module level or inside a function, ``TYPE_CHECKING`` blocks
included: an import hidden in a function is still an arrow between modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"cortex": ROOT / "cortex", "cortex_plugins": ROOT / "plugins"}

#: cortex's own layers, lowest first: a module may import its own layer and those below
LAYERS = ["cortex.kernel", "cortex.core", "cortex.model", "cortex.assembly", "cortex.runtime",
          "cortex.bench", "cortex.cli", "cortex.testing", "cortex"]


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that module ``name`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
                break
    return targets


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def layer(name: str) -> int:
    return next(i for i, prefix in enumerate(LAYERS) if name == prefix or name.startswith(prefix + "."))


def test_no_import_cycles():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert cycles == [], f"import cycles: {cycles}"


def test_cortex_never_imports_plugins():
    offenders = {name: sorted(t for t in targets if t.startswith("cortex_plugins"))
                 for name, targets in graph().items() if name.startswith("cortex.") or name == "cortex"}
    assert {n: t for n, t in offenders.items() if t} == {}


def test_arrows_point_down():
    wrong = []
    for name, targets in graph().items():
        if not name.startswith("cortex"):
            continue
        if name.startswith("cortex_plugins"):
            # plugins build on everything but the command line (they add commands through a hook)
            wrong += [(name, t) for t in targets if t.startswith("cortex.") and layer(t) >= layer("cortex.cli")]
            continue
        wrong += [(name, t) for t in targets if t.startswith("cortex") and layer(t) > layer(name)]
    assert wrong == []


def test_kernel_imports_no_torch_at_import():
    code = ("import sys, cortex, cortex.kernel.manifest, cortex.kernel.plugins, cortex.kernel.interfaces; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("manifest", ["examples/quickstart.yaml", "examples/full.yaml"])
def test_validate_never_imports_torch(manifest):
    code = (
        "import sys\n"
        "from cortex.cli.app import main\n"
        f"sys.argv = ['cortex', 'validate', {str(ROOT / manifest)!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith(": ok")


def test_the_public_api_resolves_every_name():
    code = ("import cortex.assembly, cortex.runtime.rundir, cortex\n"  # submodules first: no name is shadowed
            "missing = [n for n in cortex.__all__ if getattr(cortex, n, None) is None]\n"
            "assert not missing, missing\n"
            "assert callable(cortex.assemble) and cortex.load.__module__ == 'cortex.runtime.rundir'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_kernel_and_the_transformer_read_in_one_sitting():
    def lines(path: Path) -> int:
        return len(path.read_text(encoding="utf-8").splitlines())

    assert sum(lines(p) for p in (ROOT / "cortex" / "kernel").glob("*.py")) <= 1500
    assert lines(ROOT / "cortex" / "core" / "transformer.py") <= 400  # the CPU kernels live beside it
