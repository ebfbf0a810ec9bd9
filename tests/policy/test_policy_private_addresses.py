"""A domain entry never opens a private or in-cluster address (issue 15, point 2).

A name such as ``10-0-0-5.nip.io`` resolves to 10.0.0.5: compiled as it was, it became an
ipBlock for a pod, a node or an internal load balancer. Now every resolved address goes
through the ceiling's :class:`AddressScreen`: always-blocked ranges are never opened, and an
address that is not globally routable only when the ceiling permits its range. The same
screen judges the local backend's DNS proxy answers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct

import pytest

from sandbox_kernel.backends.local.dnsproxy import DnsProxy
from sandbox_kernel.policy.admin import DEFAULT_CLUSTER_RANGES, AdminPolicy
from sandbox_kernel.policy.destinations import AddressScreen, plan_destinations
from sandbox_kernel.policy.enforcers import render
from sandbox_kernel.policy.model import EgressPolicy
from sandbox_kernel.policy.resolve import build_query

SELECTOR = {"sandbox-kernel/kernel-id": "k-1"}
POLICY = EgressPolicy.parse({"mode": "allowlist", "entries": ["10-0-0-5.nip.io:443", "mixed.example:443"]})
RESOLVED = {"10-0-0-5.nip.io": ["10.0.0.5"],
            "mixed.example": ["151.101.0.223", "192.168.1.9", "100.64.3.4", "198.18.0.1", "fd12::1", "2a04:4e42::223"]}


@pytest.fixture
def default_admin(monkeypatch):
    """A ceiling with the built-in defaults (the test run's environment narrows cluster_ranges)."""
    monkeypatch.delenv("SANDBOX_KERNEL_POLICY_CLUSTER_RANGES", raising=False)
    return AdminPolicy()


def _cidrs(objects) -> set[str]:
    return {peer["ipBlock"]["cidr"] for obj in objects for rule in obj["spec"].get("egress", [])
            for peer in rule["to"] if "ipBlock" in peer}


def test_cluster_ranges_default_to_the_private_ranges(default_admin):
    assert default_admin.cluster_ranges == ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7"]
    assert list(DEFAULT_CLUSTER_RANGES) == default_admin.cluster_ranges
    blocked = set(default_admin.blocked_networks())
    for text in DEFAULT_CLUSTER_RANGES:
        assert ipaddress.ip_network(text) in blocked
    assert "a cluster-internal range" in default_admin.blocked_reason("10.0.0.5")


def test_an_administrator_can_change_the_cluster_ranges(monkeypatch):
    monkeypatch.setenv("SANDBOX_KERNEL_POLICY_CLUSTER_RANGES", "10.96.0.0/12")
    assert AdminPolicy().cluster_ranges == ["10.96.0.0/12"]
    monkeypatch.setenv("SANDBOX_KERNEL_POLICY_CLUSTER_RANGES", "")
    assert AdminPolicy().cluster_ranges == []  # set but empty: none
    assert AdminPolicy(cluster_ranges=["172.16.0.0/12"]).cluster_ranges == ["172.16.0.0/12"]


def test_a_name_resolving_to_a_private_address_opens_nothing(default_admin):
    screen = default_admin.address_screen()
    objects = render(POLICY, "networkpolicy", pod_selector=SELECTOR, resolved=RESOLVED,
                     always_blocked=default_admin.blocked_networks(), screen=screen)
    assert _cidrs(objects) == {"151.101.0.223/32", "2a04:4e42::223/128"}
    nft = render(POLICY, "nftables", resolved=RESOLVED, resolver="10.96.0.10",
                 always_blocked=default_admin.blocked_networks(), screen=screen)
    rules = [line for line in nft.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in rules if "10.0.0.5" in line or "192.168.1.9" in line or "fd12::1" in line]
    assert "# dropped 10-0-0-5.nip.io -> 10.0.0.5: 10.0.0.5 is in 10.0.0.0/8, which is always blocked" in nft
    assert "198.18.0.1 is not globally routable (198.18.0.0/15)" in nft


def test_without_a_screen_compilers_keep_only_globally_routable_addresses():
    # a caller that passes no screen gets the strict one, never the old "only always_blocked"
    plan = plan_destinations(POLICY, RESOLVED, [ipaddress.ip_network("169.254.0.0/16")])
    kept = {str(b.cidr) for d in plan.destinations for b in d.blocks}
    assert kept == {"151.101.0.223/32", "2a04:4e42::223/128"}
    dropped = dict(plan.dropped)
    assert set(dropped) == {"10-0-0-5.nip.io -> 10.0.0.5", "mixed.example -> 192.168.1.9", "mixed.example -> 100.64.3.4",
                            "mixed.example -> 198.18.0.1", "mixed.example -> fd12::1"}
    assert "not globally routable" in dropped["10-0-0-5.nip.io -> 10.0.0.5"]


def test_the_ceiling_can_permit_a_private_range(monkeypatch):
    # the administrator takes 192.168.0.0/16 out of cluster_ranges and lets users open it
    monkeypatch.setenv("SANDBOX_KERNEL_POLICY_CLUSTER_RANGES", "10.0.0.0/8 172.16.0.0/12 100.64.0.0/10 fc00::/7")
    admin = AdminPolicy(user_may_allow=["public", "192.168.0.0/16"])
    screen = admin.address_screen()
    assert screen.why_not("192.168.1.9") is None
    assert "always blocked" in screen.why_not("10.0.0.5")  # still in cluster_ranges
    assert "not globally routable" in screen.why_not("198.18.0.1")  # not permitted
    objects = render(POLICY, "networkpolicy", pod_selector=SELECTOR, resolved=RESOLVED,
                     always_blocked=admin.blocked_networks(), screen=screen)
    assert _cidrs(objects) == {"151.101.0.223/32", "192.168.1.9/32", "2a04:4e42::223/128"}
    # a port-limited pattern permits that port only through CIDR entries, not through names
    assert AdminPolicy(user_may_allow=["192.168.0.0/16:5432/tcp"], cluster_ranges=[]).address_screen().why_not("192.168.1.9")
    # "any" permits everything that is not blocked; the admin's own CIDR entries are permitted
    assert AdminPolicy(user_may_allow=["any"], cluster_ranges=[]).address_screen().why_not("198.18.0.1") is None
    assert AdminPolicy(user_may_allow=[], cluster_ranges=[], mode="allowlist",
                       entries=["198.18.0.0/15:80"]).address_screen().why_not("198.18.0.1") is None


def test_split_reports_every_dropped_address(default_admin):
    kept, dropped = default_admin.address_screen().split(RESOLVED)
    assert kept == {"10-0-0-5.nip.io": [], "mixed.example": ["151.101.0.223", "2a04:4e42::223"]}
    assert [(name, address) for name, address, _ in dropped] == [
        ("10-0-0-5.nip.io", "10.0.0.5"), ("mixed.example", "192.168.1.9"), ("mixed.example", "100.64.3.4"),
        ("mixed.example", "198.18.0.1"), ("mixed.example", "fd12::1")]


def test_a_blocked_connection_to_a_screened_name_is_not_offered_to_the_user(default_admin):
    decision = default_admin.decide_connection("10.0.0.5", 443, "tcp", host="10-0-0-5.nip.io")
    assert not decision.allowed
    assert "10.0.0.5 is in 10.0.0.0/8 (a cluster-internal range: RFC 1918 private)" in decision.reason
    admin = AdminPolicy(cluster_ranges=[])
    decision = admin.decide_connection("192.168.1.9", 443, "tcp", host="printer.example")
    assert not decision.allowed
    assert "printer.example resolves to 192.168.1.9 is not globally routable" in decision.reason
    assert admin.decide_connection("151.101.0.223", 443, "tcp", host="pypi.org").allowed


def _response(query: bytes, addresses: list[str]) -> bytes:
    """An upstream answer to ``query`` with one A record per address."""
    qid = query[:2]
    end = query.index(b"\x00", 12) + 5
    answers = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + ipaddress.ip_address(a).packed
                       for a in addresses)
    return qid + struct.pack("!HHHHH", 0x8180, 1, len(addresses), 0, 0) + query[12:end] + answers


def test_the_local_dns_proxy_opens_no_screened_answer(default_admin):
    """The proxy relays the answer but adds only screened addresses to the entry's set, and
    reports each refused address as a blocked connection to that name."""
    policy = EgressPolicy.parse({"mode": "allowlist", "entries": ["*.nip.io:443"]})
    added, reported = [], []
    proxy = DnsProxy(policy=lambda: policy, upstream="127.0.0.1:9", add_addresses=added.extend,
                     report=reported.append, log=logging.getLogger("test"), screen=default_admin.address_screen())
    query = build_query(0x1234, "10-0-0-5.nip.io", 1)

    async def upstream(q):
        return _response(q, ["10.0.0.5", "151.101.0.223"])

    response = asyncio.run(proxy._answer(query, upstream))
    assert response is not None and response[:2] == b"\x12\x34"
    assert [address for _, address in added] == ["151.101.0.223"]
    assert [(r["host"], r["ip"], r["protocol"], r["verdict"]) for r in reported] == [
        ("10-0-0-5.nip.io", "10.0.0.5", "dns", "rejected")]


def test_address_screen_is_frozen_and_explicit():
    screen = AddressScreen(blocked=(ipaddress.ip_network("169.254.0.0/16"),))
    assert screen.why_not("169.254.169.254").endswith("which is always blocked")
    assert screen.why_not("8.8.8.8") is None
    assert screen.why_not("not-an-ip") == "not an IP address"
    with pytest.raises(AttributeError):
        screen.permitted = ()  # type: ignore[misc]
