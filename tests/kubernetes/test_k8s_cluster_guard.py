"""The real-cluster suite's guard (issue 15, point 12): a KUBECONFIG that names no file is
no credentials (the guard used to accept any non-empty KUBECONFIG)."""

from __future__ import annotations

import os

from clusterlib import credentials_present


def test_a_kubeconfig_that_does_not_exist_is_no_credentials(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config either
    assert not credentials_present({"KUBECONFIG": str(tmp_path / "missing")})
    assert not credentials_present({"KUBECONFIG": os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")])})
    assert not credentials_present({})
    real = tmp_path / "kubeconfig"
    real.write_text("apiVersion: v1\nkind: Config\n")
    assert credentials_present({"KUBECONFIG": os.pathsep.join([str(tmp_path / "a"), str(real)])})
    assert credentials_present({"KUBERNETES_SERVICE_HOST": "10.96.0.1"})
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("apiVersion: v1\n")
    assert credentials_present({})
