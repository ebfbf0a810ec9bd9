"""From a policy to concrete allowed destinations, with the always-blocked set taken out.

Every compiler starts here (one way to do it), so the rule "no entry can open an
always-blocked address" lives in one function, :func:`plan_destinations`, and is
property-tested once for all enforcers:

* a CIDR entry inside an always-blocked range is dropped;
* a CIDR entry containing always-blocked ranges keeps them as exceptions
  (NetworkPolicy/Cilium ``except``) which :func:`subtract` turns into plain networks for
  enforcers without exceptions (nftables sets, Istio addresses);
* a resolved address inside an always-blocked range is dropped (DNS rebinding to
  169.254.169.254 opens nothing);
* wildcards cannot be resolved ahead of time and are listed apart.

Two CIDRs either do not overlap or one contains the other, which is why an entry is
always either dropped, excepted, or left alone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .model import EgressPolicy, Entry, IPNetwork, PortRange


@dataclass(frozen=True)
class IPBlock:
    """A network with the always-blocked ranges inside it excepted."""

    cidr: IPNetwork
    excepted: tuple[IPNetwork, ...] = ()

    def networks(self) -> list[IPNetwork]:
        """The block as plain networks (``cidr`` minus ``excepted``)."""
        return subtract(self.cidr, self.excepted)


@dataclass(frozen=True)
class Destination:
    """One entry with the addresses it opens (empty for wildcards)."""

    entry: Entry
    blocks: tuple[IPBlock, ...]

    @property
    def ports(self) -> tuple[PortRange, ...]:
        return self.entry.ports

    @property
    def protocol(self) -> str | None:
        return self.entry.protocol


@dataclass(frozen=True)
class Plan:
    """What a policy opens, ready for a compiler.

    ``destinations`` keep the policy's entry order (domains with their resolved
    addresses, CIDRs with exceptions); ``wildcards`` need name-based enforcement;
    ``unresolved`` are domains without a usable address; ``dropped`` lists
    ``(what, why)`` for entries and addresses removed because they are always blocked.
    """

    destinations: tuple[Destination, ...] = ()
    wildcards: tuple[Entry, ...] = ()
    unresolved: tuple[str, ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()


def parse_networks(items: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    """Parse CIDR strings (admin config) into networks; ValueError names the bad one."""
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item, strict=True))
        except ValueError as err:
            raise ValueError(f"{item!r} is not a CIDR: {err}") from None
    return tuple(out)


def plan_destinations(
    policy: EgressPolicy,
    resolved: Mapping[str, Sequence[str]] | None,
    always_blocked: Sequence[IPNetwork],
) -> Plan:
    """Turn ``policy`` into destinations. Deny mode opens nothing: an empty plan."""
    if policy.mode != "allowlist":
        return Plan()
    resolved = resolved or {}
    destinations, wildcards, unresolved, dropped = [], [], [], []
    for entry in policy.expanded_entries():
        if entry.kind == "wildcard":
            wildcards.append(entry)
            destinations.append(Destination(entry, ()))
            continue
        if entry.kind == "cidr":
            block = except_blocked(entry.network, always_blocked)
            if block is None:
                dropped.append((str(entry), "inside an always-blocked range"))
            else:
                destinations.append(Destination(entry, (block,)))
            continue
        blocks = []
        for text in resolved.get(entry.value, ()):
            address = ipaddress.ip_address(text)
            net = ipaddress.ip_network(address)
            if is_blocked(net, always_blocked):
                dropped.append((f"{entry.value} -> {address}", "resolves into an always-blocked range"))
            else:
                blocks.append(IPBlock(net))
        blocks = sorted(set(blocks), key=lambda b: (b.cidr.version, b.cidr))
        if not blocks:
            unresolved.append(entry.value)
        destinations.append(Destination(entry, tuple(blocks)))
    return Plan(tuple(destinations), tuple(wildcards), tuple(dict.fromkeys(unresolved)), tuple(dropped))


def is_blocked(net: IPNetwork, always_blocked: Sequence[IPNetwork]) -> bool:
    """Whether all of ``net`` lies inside one always-blocked range."""
    return any(net.version == b.version and net.subnet_of(b) for b in always_blocked)


def except_blocked(net: IPNetwork, always_blocked: Sequence[IPNetwork]) -> IPBlock | None:
    """``net`` with the blocked ranges inside it excepted, or None if it is all blocked."""
    if is_blocked(net, always_blocked):
        return None
    inside = [b for b in always_blocked if b.version == net.version and b.subnet_of(net)]
    return IPBlock(net, tuple(_collapse(inside)))


def subtract(net: IPNetwork, excepted: Iterable[IPNetwork]) -> list[IPNetwork]:
    """``net`` minus ``excepted``, as the fewest networks, sorted."""
    remaining = [net]
    for hole in _collapse(excepted):
        next_remaining = []
        for part in remaining:
            if hole.version != part.version or not part.overlaps(hole):
                next_remaining.append(part)
            elif hole.subnet_of(part):
                next_remaining.extend(part.address_exclude(hole))
            # else part lies inside the hole: drop it
        remaining = next_remaining
    return sorted(_collapse(remaining), key=lambda n: (n.version, n))


def _collapse(nets: Iterable[IPNetwork]) -> list[IPNetwork]:
    nets = list(nets)
    out: list[IPNetwork] = []
    for version in (4, 6):
        same = [n for n in nets if n.version == version]
        out.extend(ipaddress.collapse_addresses(same))
    return out
