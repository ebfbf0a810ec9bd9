"""Property: no entry, in any compiler, opens an address of the always-blocked set.

Entries are drawn at random (CIDRs of every size, including 0.0.0.0/0 and ::/0, and
domains whose resolved addresses may fall in blocked ranges); every compiler's output
is then read back and each address it allows is checked against the blocked set.
"""

from __future__ import annotations

import ipaddress
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox_kernel.policy.admin import AdminPolicy
from sandbox_kernel.policy.enforcers import render
from sandbox_kernel.policy.model import EgressPolicy, Entry, UnsupportedByEnforcer

BLOCKED = AdminPolicy(cluster_ranges=["10.96.0.0/12", "fd12:3456::/48"]).blocked_networks()
SELECTOR = {"sandbox-kernel/kernel-id": "k"}

# Addresses near and inside the blocked ranges make collisions likely, not lucky.
INTERESTING = [str(n.network_address) for n in BLOCKED] + ["169.254.169.254", "10.100.0.1", "127.0.0.1", "8.8.8.8", "2001:db8::1"]


@st.composite
def cidr_entries(draw):
    version = draw(st.sampled_from([4, 6]))
    bits = 32 if version == 4 else 128
    base = draw(st.sampled_from(INTERESTING)) if draw(st.booleans()) else None
    if base is not None and ipaddress.ip_address(base).version == version:
        address = int(ipaddress.ip_address(base))
    else:
        address = draw(st.integers(0, 2**bits - 1))
    prefix = draw(st.integers(0, bits))
    cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    net = cls((address, prefix), strict=False)
    if version == 6 and (net.network_address.ipv4_mapped or net.network_address.sixtofour):
        net = ipaddress.ip_network("::/0")
    ports = draw(st.sampled_from([(), ((443, 443),), ((1, 65535),)]))
    protocol = draw(st.sampled_from([None, "tcp", "udp"]))
    return Entry("cidr", str(net), ports, protocol)


ADDRESSES = st.one_of(
    st.sampled_from(INTERESTING),
    st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i))),
)


@st.composite
def scenarios(draw):
    cidrs = draw(st.lists(cidr_entries(), max_size=6))
    names = [f"host{i}.example.com" for i in range(draw(st.integers(0, 3)))]
    resolved = {name: draw(st.lists(ADDRESSES, min_size=1, max_size=3)) for name in names}
    policy = EgressPolicy(mode="allowlist", entries=tuple(cidrs) + tuple(Entry("domain", n) for n in names))
    return policy, resolved


def _open_networks(net, excepted):
    """Addresses an ipBlock-like (cidr, except) opens, as networks."""
    remaining = [net]
    for hole in excepted:
        remaining = [p for part in remaining for p in ([part] if not part.overlaps(hole) else (part.address_exclude(hole) if hole.subnet_of(part) else []))]
    return remaining


def _assert_clear(nets, where):
    for net in nets:
        for blocked in BLOCKED:
            assert not (net.version == blocked.version and net.overlaps(blocked)), f"{where}: {net} opens part of {blocked}"


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(scenarios())
def test_nftables_allow_sets_exclude_blocked(scenario):
    policy, resolved = scenario
    text = render(policy, "nftables", resolved=resolved, resolver="10.96.0.10", always_blocked=BLOCKED)
    for name, body in re.findall(r"set (allow_\S+) \{(.*?)\n\t\}", text, re.S):
        match = re.search(r"elements = \{ (.*) \}", body)
        if match:
            _assert_clear([ipaddress.ip_network(e) for e in match.group(1).split(", ")], name)
    # and the blocked verdict comes before any allow rule
    assert text.index("daddr @blocked_v4") < text.find("daddr @allow_") or "daddr @allow_" not in text


@SETTINGS
@given(scenarios())
def test_networkpolicy_ipblocks_exclude_blocked(scenario):
    policy, resolved = scenario
    (obj,) = render(policy, "networkpolicy", pod_selector=SELECTOR, resolved=resolved, always_blocked=BLOCKED)
    for rule in obj["spec"].get("egress", [])[1:]:  # [0] is DNS to kube-dns
        for peer in rule["to"]:
            block = peer["ipBlock"]
            net = ipaddress.ip_network(block["cidr"])
            _assert_clear(_open_networks(net, [ipaddress.ip_network(e) for e in block.get("except", [])]), "ipBlock")


@SETTINGS
@given(scenarios())
def test_cilium_cidrs_exclude_blocked_and_deny_covers_them(scenario):
    policy, _ = scenario
    (obj,) = render(policy, "cilium", pod_selector=SELECTOR, always_blocked=BLOCKED)
    denied = {item["cidr"] for item in obj["spec"]["egressDeny"][0]["toCIDRSet"]}
    assert {str(n) for n in BLOCKED} <= denied
    for rule in obj["spec"]["egress"]:
        for item in rule.get("toCIDRSet", []):
            net = ipaddress.ip_network(item["cidr"])
            _assert_clear(_open_networks(net, [ipaddress.ip_network(e) for e in item.get("except", [])]), "toCIDRSet")


def test_everything_entry_opens_everything_but_the_blocked_set():
    policy = EgressPolicy.parse(["0.0.0.0/0", "::/0"])
    (obj,) = render(policy, "networkpolicy", pod_selector=SELECTOR, resolved={}, always_blocked=BLOCKED)
    blocks = {p["ipBlock"]["cidr"]: p["ipBlock"].get("except", []) for r in obj["spec"]["egress"][1:] for p in r["to"]}
    assert set(blocks) == {"0.0.0.0/0", "::/0"}
    assert "169.254.0.0/16" in blocks["0.0.0.0/0"] and "fd00:ec2::254/128" in blocks["::/0"]
