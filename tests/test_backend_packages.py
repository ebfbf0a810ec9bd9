"""The backends as packages (issue 16, knot 5): what their packages export resolves, neither
backend imports the other, and the enforcer log's reader process starts without the backend."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from test_layers import import_graph, reaches

PACKAGES = ["sandbox_kernel.backends.local", "sandbox_kernel.backends.kubernetes"]


@pytest.mark.parametrize("name", PACKAGES)
def test_every_export_resolves(name):
    package = importlib.import_module(name)
    for export in package.__all__:
        assert getattr(package, export) is not None, export
    with pytest.raises(AttributeError):
        package.no_such_name  # noqa: B018 - the lookup is the test


def test_the_paths_configuration_and_docs_use():
    from sandbox_kernel.backends import kubernetes as kb
    from sandbox_kernel.backends.kubernetes import KubernetesBackend, gc_command
    from sandbox_kernel.backends.local import LocalBackend, gc

    assert LocalBackend.__module__ == "sandbox_kernel.backends.local.backend"
    assert KubernetesBackend.__module__ == "sandbox_kernel.backends.kubernetes.backend"
    assert callable(gc) and callable(gc_command)
    assert kb.objects.MANAGED_BY_LABEL == "app.kubernetes.io/managed-by"
    assert ("", "pods", "create") in kb.REQUIRED_PERMISSIONS


def test_neither_backend_imports_the_other():
    graph = import_graph()
    for mine, other in [(PACKAGES[0], PACKAGES[1]), (PACKAGES[1], PACKAGES[0])]:
        for module in [m for m in graph if m == mine or m.startswith(mine + ".")]:
            reached = reaches(graph, module)
            crossing = [m for m in reached if m == other or m.startswith(other + ".")]
            assert crossing == [], f"{module} imports {crossing[0]} through {reached[crossing[0]]}"


def test_the_enforcer_log_reader_starts_without_the_backend():
    # the reader process runs `python -m sandbox_kernel.backends.local.enforcerlog`; each
    # sandbox start waits for it, so it must not import the backend (traitlets, the agent…)
    code = ("import sys, sandbox_kernel.backends.local.enforcerlog\n"
            "print(sorted(m for m in sys.modules if m.startswith(('traitlets', 'sandbox_kernel.backends.local.backend',"
            " 'sandbox_kernel.agent', 'asyncio'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
