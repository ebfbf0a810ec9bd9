"""The backend on the local cluster of scripts/cluster.sh (see tests/localcluster.py).

Run with ``SANDBOX_KERNEL_TEST_CLUSTER=auto pytest -m cluster tests/kubernetes``. The sandbox
image is the one scripts/cluster-images.sh builds (an archive in the cluster cache, imported
by ``up``); egress goes to a test host in a network namespace on this machine.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from clusterlib import connect, run_cell
from sandbox_kernel.backends import kubernetes as kb
from sandbox_kernel.policy.model import EgressPolicy

pytestmark = pytest.mark.cluster

SANDBOX_IMAGE = os.environ.get("SANDBOX_KERNEL_CLUSTER_SANDBOX_IMAGE", "sandbox-kernel.local/sandbox:cluster")


def test_sandbox_on_a_real_cluster(local_cluster, test_host, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(local_cluster.kubeconfig))
    images = local_cluster.kubectl("get", "node", local_cluster.node_name, "-o",
                                   "jsonpath={.status.images[*].names}").stdout
    if SANDBOX_IMAGE not in images:
        pytest.fail(f"the sandbox image {SANDBOX_IMAGE} is not on the node: build it with "
                    "scripts/cluster-images.sh sandbox, then scripts/cluster.sh up imports it", pytrace=False)
    host = test_host()

    async def main():
        backend = kb.KubernetesBackend(user=f"ci-{uuid.uuid4().hex[:6]}", start_timeout=300,
                                       image=SANDBOX_IMAGE, image_pull_policy="Never")
        backend.always_blocked = ["169.254.0.0/16"]
        lines = []
        try:
            await backend.start(uuid.uuid4().hex, EgressPolicy(), lines.append)
            assert "Ready" in lines
            transport = await backend.attach()
            assert (await asyncio.wait_for(transport.recv(), 60))["type"] == "hello"
            out, done = await run_cell(transport, "print(1 + 1)", 1)
            assert out == "2\n" and done["exit_status"] == 0
            out, _ = await run_cell(transport, connect(host.ip, host.port), 2)
            assert out.startswith("blocked"), out
            await backend.apply_policy(EgressPolicy(mode="allowlist", entries=(f"{host.ip}:{host.port}",)))
            for cell in range(3, 60):  # NetworkPolicy programming is asynchronous in every enforcer
                out, _ = await run_cell(transport, connect(host.ip, host.port), cell)
                if out.startswith("connected"):
                    break
                await asyncio.sleep(1)
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
