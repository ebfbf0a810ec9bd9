"""The kernel's layers import one way: kernel → magics → widgets → learnview → controls.

Issue 16, knot 2: the kernel, the magics and the panels imported each other and the kernel
found the panel through ``sys.modules``. Checked two ways: the package's import graph read
from the source (every import that runs, at module level or inside a function; imports under
``if TYPE_CHECKING:`` are for type checkers only and never run), and each UI module imported
in a fresh interpreter, where the kernel module must not be loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sandbox_kernel"
#: the modules between the kernel and the user: none of them may reach the kernel
UI = ["magics", "widgets", "learnview", "views", "controls", "access", "grants", "learn", "history",
      "notices", "cellstate", "footer"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Modules of the package that ``module`` imports when it runs."""
    found: set[str] = set()
    base = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sandbox_kernel"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                target = f"{anchor}.{node.module}" if node.module else anchor
            else:
                target = node.module or ""
            if target.startswith("sandbox_kernel"):
                found.add(target)
                # "from . import x" / "from .pkg import mod": the submodule when there is one
                found.update(f"{target}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        targets = _runtime_imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def reaches(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module ``start`` imports, directly or not, each with the module that imports it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        here = todo.pop()
        for target in graph[here]:
            if target not in seen:
                seen[target] = here
                todo.append(target)
    return seen


def cycles(graph: dict[str, set[str]], among: set[str]) -> list[list[str]]:
    """Import cycles through the modules ``among``."""
    found = []
    for start in sorted(among):
        parents = reaches(graph, start)
        if start in parents:
            path, here = [start], parents[start]
            while here != start and here not in path:
                path.append(here)
                here = parents[here]
            found.append(list(reversed(path)))
    return found


def test_the_walker_sees_a_real_import():
    graph = import_graph()
    assert "sandbox_kernel.controls" in graph["sandbox_kernel.magics"]
    assert "sandbox_kernel.widgets" in graph["sandbox_kernel.magics"]  # %sandbox policy, a lazy import
    assert "sandbox_kernel.magics" in graph["sandbox_kernel.kernel"]


@pytest.mark.parametrize("name", UI)
def test_no_ui_module_reaches_the_kernel(name):
    graph = import_graph()
    module = f"sandbox_kernel.{name}"
    imported = reaches(graph, module)
    assert "sandbox_kernel.kernel" not in imported, (
        f"{module} imports the kernel through {imported.get('sandbox_kernel.kernel')}")
    assert "sandbox_kernel.kernelapp" not in imported


def test_no_import_cycle_in_the_package():
    # before issue 16: magics -> grants -> magics and magics -> learn -> magics (lazy imports)
    graph = import_graph()
    assert cycles(graph, set(graph)) == []


@pytest.mark.parametrize("name", ["magics", "widgets", "learnview", "controls"])
def test_a_fresh_interpreter_importing_a_ui_module_does_not_load_the_kernel(name):
    code = (f"import sys, sandbox_kernel.{name}\n"
            "print(sorted(m for m in sys.modules if m in ('sandbox_kernel.kernel', 'sandbox_kernel.kernelapp')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_kernel_module_does_not_look_for_its_panels_in_sys_modules():
    for name in ["kernel", *UI]:
        source = (PACKAGE / f"{name}.py").read_text()
        assert "sys.modules" not in source, name


def test_one_agent_link_below_the_session_and_the_hub_service():
    # Issue 16, knot 1: the hub's Manager had its own copy of the Session's handshake and reader.
    graph = import_graph()
    assert "sandbox_kernel.agentlink" in graph["sandbox_kernel.session"]
    assert "sandbox_kernel.agentlink" in graph["sandbox_kernel.hub.manager"]
    # the link knows neither of its users; the service knows nothing of the kernel's side
    forbidden = {"sandbox_kernel.agentlink": "sandbox_kernel.hub",
                 "sandbox_kernel.hub.manager": "sandbox_kernel.hub.backend"}
    for module, prefix in forbidden.items():
        above = {m for m in reaches(graph, module)
                 if m in ("sandbox_kernel.session", "sandbox_kernel.kernel") or m.startswith(prefix)}
        assert not above, (module, sorted(above))
    # the sandbox's side of the protocol imports nothing but itself (it runs as sandbox_agent)
    for name, targets in graph.items():
        if name.startswith("sandbox_kernel.agent.") and name != "sandbox_kernel.agent.bundle":
            assert all(t.startswith("sandbox_kernel.agent") for t in targets), (name, targets)
