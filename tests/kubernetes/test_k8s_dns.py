"""The Kubernetes backend's resolved addresses: screened, and refreshed before they expire.

Issue 15 points 2 and 6. The backend asks a fake DNS server on 127.0.0.1 (with the TTLs it
chooses) and applies NetworkPolicies to the fake API server; the test watches what the
fake holds. No cluster, no traffic beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio

import pytest

from fakedns import FakeUpstream
from sandbox_kernel.backends import kubernetes as kb
from sandbox_kernel.policy.admin import AdminPolicy
from sandbox_kernel.policy.model import EgressPolicy

POLICY = EgressPolicy.parse({"mode": "allowlist", "entries": ["cdn.test:443/tcp", "10-0-0-5.nip.io:443/tcp"]})


@pytest.fixture
def upstream():
    server = FakeUpstream(ttl=5)  # the resolver's shortest TTL: refreshed about once a second before
    yield server
    server.close()


def _egress_cidrs(fakekube, namespace: str, pod: str) -> set[str]:
    obj = fakekube.get_object("networkpolicies", namespace, f"{pod}-egress")
    if obj is None:
        return set()
    return {peer["ipBlock"]["cidr"] for rule in obj["spec"].get("egress", []) for peer in rule["to"]
            if "ipBlock" in peer and not peer["ipBlock"]["cidr"].startswith("169.254.")}


def test_addresses_are_screened_and_refreshed_before_they_expire(fakekube, upstream, monkeypatch):
    monkeypatch.delenv("SANDBOX_KERNEL_POLICY_CLUSTER_RANGES", raising=False)  # the default ceiling
    upstream.records = {"cdn.test": "151.101.0.1", "10-0-0-5.nip.io": "10.0.0.5"}
    admin = AdminPolicy()
    backend = kb.KubernetesBackend(client_configuration=fakekube.configuration(), user="alice",
                                   start_timeout=20.0, resolver=f"127.0.0.1:{upstream.port}")
    backend.always_blocked = [str(n) for n in admin.blocked_networks()]
    backend.address_screen = admin.address_screen()
    seen: list[frozenset[str]] = []

    async def main():
        await backend.start("5e1f0c0ffee", POLICY, lambda line: None)
        try:
            ns, pod = backend.namespace, backend.pod
            applied = backend.applied
            assert applied["screened"] == [{"host": "10-0-0-5.nip.io", "ip": "10.0.0.5",
                                            "why": "10.0.0.5 is in 10.0.0.0/8, which is always blocked"}]
            assert applied["expires_at"] - applied["resolved_at"] == pytest.approx(5, abs=0.5)
            seen.append(frozenset(_egress_cidrs(fakekube, ns, pod)))
            upstream.records["cdn.test"] = "151.101.0.2"  # the CDN moved
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 25
            while len(seen) < 3 and loop.time() < deadline:
                await asyncio.sleep(0.1)
                now = frozenset(_egress_cidrs(fakekube, ns, pod))
                if now != seen[-1]:
                    seen.append(now)
        finally:
            await backend.stop()

    asyncio.run(asyncio.wait_for(main(), 60))
    # first the old address; then old and new together (answers cached in the sandbox stay
    # good until they expire); then the new one alone. 10.0.0.5 is never opened.
    assert seen == [frozenset({"151.101.0.1/32"}), frozenset({"151.101.0.1/32", "151.101.0.2/32"}),
                    frozenset({"151.101.0.2/32"})], seen
    assert upstream.queries.count("cdn.test") >= 3


def test_refresh_stops_with_the_sandbox(fakekube, upstream):
    upstream.records = {"cdn.test": "151.101.0.1"}
    backend = kb.KubernetesBackend(client_configuration=fakekube.configuration(), user="bob",
                                   start_timeout=20.0, resolver=f"127.0.0.1:{upstream.port}")

    async def main():
        await backend.start("5e1f0c0ffef", POLICY, lambda line: None)
        assert backend._refresh is not None and not backend._refresh.done()
        task = backend._refresh
        await backend.stop()
        await asyncio.sleep(0)
        assert task.cancelled() or task.done()
        assert backend._refresh is None

    asyncio.run(asyncio.wait_for(main(), 60))
