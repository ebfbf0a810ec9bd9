"""The kubernetes client version that works is the one declared (issue 15, point 9).

``kubernetes>=29`` was declared, but server-side apply passes ``_content_type`` to the
typed patch methods (client 37 and later) and the old watch path needed 34: every start
failed on an older client, deep inside it. Now pyproject.toml declares 37.0.0, the
backend and the doctor refuse an older client up front with what to install, and the
client-versions workflow runs this suite with exactly the lowest declared version.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import kubernetes
import pytest

from sandbox_kernel.backends.kubernetes import doctor as doctor_k8s
from sandbox_kernel.backends import kubernetes as kb

ROOT = Path(__file__).resolve().parents[2]


def _lower_bounds() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [*project["optional-dependencies"]["kubernetes"], *project["optional-dependencies"]["test"]]
    return {re.fullmatch(r"kubernetes>=([0-9.]+)", d).group(1) for d in deps if re.match(r"kubernetes\b(?!-)", d)}


def test_declared_lower_bound_is_the_backends_minimum():
    assert _lower_bounds() == {".".join(map(str, kb.MIN_CLIENT_VERSION))}


def test_ci_runs_the_lowest_declared_client():
    workflow = (ROOT / ".github" / "workflows" / "client-versions.yml").read_text()
    assert "client: [lowest, newest]" in workflow
    assert '["optional-dependencies"]["kubernetes"]' in workflow  # the pin is read from pyproject.toml
    assert 'pip install "kubernetes==${lowest}"' in workflow


def test_the_installed_client_is_accepted():
    assert kb.check_client_version() == kubernetes.__version__


@pytest.mark.parametrize("version", ["29.0.0", "34.1.0", "36.0.3"])
def test_an_older_client_is_refused_up_front(version, monkeypatch, fakekube):
    with pytest.raises(kb.KubernetesUnavailable, match=rf"client {version} is too old: .* needs 37\.0\.0 or later"):
        kb.check_client_version(version)
    monkeypatch.setattr(kubernetes, "__version__", version)
    backend = kb.KubernetesBackend(client_configuration=fakekube.configuration(), user="alice")
    with pytest.raises(kb.KubernetesUnavailable, match="pip install 'kubernetes>=37.0.0'"):
        backend.check()
    (row,) = doctor_k8s.run_checks(backend)
    assert (row.name, row.status) == ("kubernetes client", "FAIL")
    assert fakekube.requests == []  # refused before any call


def test_newer_versions_pass():
    for version in ("37.0.0", "37.0.2", "38.1.0", "40.0.0a1"):
        assert kb.check_client_version(version) == version
