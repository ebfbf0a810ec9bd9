"""Against a REAL cluster (kind in CI, or GKE): skipped unless one is configured.

Run with ``SANDBOX_KERNEL_TEST_CLUSTER=1 pytest -m cluster tests/kubernetes`` and a
kubeconfig whose current context may create namespaces (see .github/workflows/kind.yml).
The cluster's CNI must enforce NetworkPolicy (kind's kindnet does).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from sandbox_kernel.backends import kubernetes as kb
from sandbox_kernel.policy.model import EgressPolicy

pytestmark = pytest.mark.cluster

#: a public address outside any cluster (Cloudflare DNS over HTTPS), port 443
OUTSIDE = "1.1.1.1"

if os.environ.get("SANDBOX_KERNEL_TEST_CLUSTER") != "1":
    pytest.skip("needs a real cluster: set SANDBOX_KERNEL_TEST_CLUSTER=1 with a kubeconfig (kind or GKE)",
                allow_module_level=True)
if not (os.environ.get("KUBECONFIG") or Path("~/.kube/config").expanduser().exists()
        or os.environ.get("KUBERNETES_SERVICE_HOST")):
    pytest.skip("SANDBOX_KERNEL_TEST_CLUSTER=1 but no kubeconfig or in-cluster credentials",
                allow_module_level=True)

CONNECT = f"""
import socket
s = socket.socket()
s.settimeout(4)
try:
    s.connect(("{OUTSIDE}", 443))
    print("connected")
except OSError as err:
    print("blocked", type(err).__name__)
"""


async def run_cell(transport, code, cell_id):
    await transport.send({"type": "execute", "id": cell_id, "code": code, "silent": False,
                          "store_history": True, "user_expressions": {}, "allow_stdin": False})
    out = []
    while True:
        frame = await asyncio.wait_for(transport.recv(), 60)
        assert frame is not None
        if frame["type"] == "stream":
            out.append(frame["text"])
        if frame["type"] == "done":
            return "".join(out), frame


def test_sandbox_on_a_real_cluster():
    async def main():
        backend = kb.KubernetesBackend(user=f"ci-{uuid.uuid4().hex[:6]}", start_timeout=300)
        backend.always_blocked = ["169.254.0.0/16"]
        lines = []
        try:
            await backend.start(uuid.uuid4().hex, EgressPolicy(), lines.append)
            assert "Ready" in lines
            transport = await backend.attach()
            assert (await asyncio.wait_for(transport.recv(), 60))["type"] == "hello"
            out, done = await run_cell(transport, "print(1 + 1)", 1)
            assert out == "2\n" and done["exit_status"] == 0
            out, _ = await run_cell(transport, CONNECT, 2)
            assert out.startswith("blocked"), out
            await backend.apply_policy(EgressPolicy(mode="allowlist", entries=(f"{OUTSIDE}:443",)))
            await asyncio.sleep(5)  # NetworkPolicy programming is asynchronous in every CNI
            out, _ = await run_cell(transport, CONNECT, 3)
            assert out.startswith("connected"), out
            await transport.close()
        finally:
            await backend.stop()
        namespace = backend.namespace
        from kubernetes import client

        core = client.CoreV1Api(backend.api_client())
        pods = core.list_namespaced_pod(namespace, label_selector=kb.objects.MANAGED_BY_LABEL).items
        assert [p for p in pods if not p.metadata.deletion_timestamp] == []
        core.delete_namespace(namespace)

    asyncio.run(main())
