"""A fake Kubernetes API server for tests (real HTTP + exec WebSockets, no cluster).

Import from tests as ``fakekube`` (tests/kubernetes/conftest.py puts ``tests/`` on the
path). See :class:`fakekube.server.FakeKube` and docs/kubernetes.md.
"""

from .kubelet import LocalRunner, PodBehavior, PodFilesystem
from .server import ApiError, FakeKube, RecordedRequest, Rule, forbidden_message, parse_route

__all__ = ["FakeKube", "PodBehavior", "LocalRunner", "PodFilesystem", "RecordedRequest", "Rule",
           "ApiError", "forbidden_message", "parse_route"]
