"""Fixtures for the Kubernetes backend tests: the fake API server from ``tests/fakekube``."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[1])
if _TESTS not in sys.path:
    sys.path.append(_TESTS)  # appended: never shadows the real ``kubernetes`` package

from fakekube.fixtures import fakekube, kube_api  # noqa: E402,F401
