"""Helpers of the real-cluster suite (tests/kubernetes/test_k8s_cluster.py) that are
tested without a cluster (tests/kubernetes/test_k8s_cluster_guard.py)."""

from __future__ import annotations

import os
from pathlib import Path


def credentials_present(environ=os.environ) -> bool:
    """A kubeconfig file that exists (KUBECONFIG may list several), ~/.kube/config, or
    in-cluster credentials. A KUBECONFIG naming no existing file is none: the suite would
    otherwise start and fail on credentials instead of saying why it cannot run."""
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return True
    if environ.get("KUBECONFIG"):
        return any(Path(p).expanduser().is_file() for p in environ["KUBECONFIG"].split(os.pathsep) if p)
    return Path("~/.kube/config").expanduser().is_file()
