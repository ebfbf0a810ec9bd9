"""pytest fixtures for the fake API server (imported by tests/kubernetes/conftest.py)."""

from __future__ import annotations

import pytest

from .server import FakeKube


@pytest.fixture
def fakekube():
    """A running :class:`FakeKube`; stopped after the test, with every process it spawned killed."""
    fake = FakeKube().start()
    try:
        yield fake
    finally:
        fake.stop()
        leftover = [p.pid for p in fake._procs if p.returncode is None]
        assert not leftover, f"fake API server left processes running: {leftover}"


@pytest.fixture
def kube_api(fakekube):
    """An official ``kubernetes.client.ApiClient`` configured for the fake (host + bearer token)."""
    client = fakekube.api_client()
    try:
        yield client
    finally:
        client.close()


def _quiet_tornado() -> None:
    import logging

    # 4xx answers are the point of many tests; keep them out of the captured log noise
    logging.getLogger("tornado.access").setLevel(logging.ERROR)


_quiet_tornado()
