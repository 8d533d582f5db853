"""The architecture as a contract: the import graph has no cycle and the flow's layering holds.

ARCHITECTURE.md: data moves left to right and nothing reaches back; ``pipelines/`` (the core) never
imports ``node/`` or ``db/`` (the shell). The contracts themselves are in pyproject.toml
(``[tool.importlinter]``) and are checked by import-linter's own engine here and in CI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

from tests.support import REPO

PACKAGES = ("node", "pipelines", "db", "onnx_models")


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), imports inside functions included."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return groups


def test_the_import_graph_has_no_cycle():
    assert _cycles(grimp.build_graph(*PACKAGES)) == []


def test_the_architecture_contracts_hold():
    lint_imports = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint_imports)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout
