"""From a policy to concrete allowed destinations, with the always-blocked set taken out.

Every compiler starts here (one way to do it), so the rule "no entry can open an
always-blocked address" lives in one function, :func:`plan_destinations`, and is
property-tested once for all enforcers:

* a CIDR entry inside an always-blocked range is dropped;
* a CIDR entry containing always-blocked ranges keeps them as exceptions
  (NetworkPolicy/Cilium ``except``) which :func:`subtract` turns into plain networks for
  enforcers without exceptions (nftables sets);
* a resolved address inside an always-blocked range is dropped (DNS rebinding to
  169.254.169.254 opens nothing), and so is one that is not globally routable (a name
  such as ``10-0-0-5.nip.io`` resolving to a pod, a node or an internal load balancer)
  unless the administrator's ceiling permits that range: :class:`AddressScreen`;
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


#: Ranges that are not globally routable (IANA special-purpose registries). ``ipaddress``'s
#: ``is_global`` looks only at a network's two ends, and misses some of these on older
#: Pythons, so the list is spelled out.
NOT_GLOBAL: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(text)
    for text in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
        "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/128", "::1/128", "::ffff:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64",
        "2001::/23", "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10", "ff00::/8",
    )
)


@dataclass(frozen=True)
class AddressScreen:
    """Which resolved addresses a domain entry may open.

    Built by :meth:`AdminPolicy.address_screen` from the ceiling and handed to every
    backend: ``blocked`` are the always-blocked ranges (never opened), ``permitted`` the
    ranges the ceiling lets users open although they are not globally routable (a CIDR
    pattern of ``user_may_allow``, a CIDR of the administrator's default policy, or
    everything not blocked when ``user_may_allow`` has ``any``). A resolved address is
    kept only if it is not blocked and either globally routable or permitted. Used for the
    addresses compiled into rules (:func:`plan_destinations`) and for the answers the local
    backend's DNS proxy relays.
    """

    blocked: tuple[IPNetwork, ...] = ()
    permitted: tuple[IPNetwork, ...] = ()

    def why_not(self, address: str) -> str | None:
        """Why a domain may not open ``address`` (a sentence fragment), or None if it may."""
        try:
            ip = ipaddress.ip_address(str(address).split("%")[0])
        except ValueError:
            return "not an IP address"
        net = ipaddress.ip_network(ip)
        for blocked in self.blocked:
            if net.version == blocked.version and net.subnet_of(blocked):
                return f"{ip} is in {blocked}, which is always blocked"
        if is_blocked(net, self.permitted):
            return None
        for special in NOT_GLOBAL:
            if net.version == special.version and net.subnet_of(special):
                return (f"{ip} is not globally routable ({special}) and your administrator "
                        "does not permit that range")
        return None

    def split(self, resolved: Mapping[str, Sequence[str]]) -> tuple[dict[str, list[str]], list[tuple[str, str, str]]]:
        """``resolved`` without the addresses a domain may not open, and those addresses as
        ``(name, address, why)``. Called by the backends before compiling, to report them."""
        kept: dict[str, list[str]] = {}
        dropped: list[tuple[str, str, str]] = []
        for name, addresses in resolved.items():
            kept[name] = []
            for address in addresses:
                why = self.why_not(address)
                if why is None:
                    kept[name].append(address)
                else:
                    dropped.append((name, address, why))
        return kept, dropped


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
    screen: AddressScreen | None = None,
) -> Plan:
    """Turn ``policy`` into destinations. Deny mode opens nothing: an empty plan.

    Resolved addresses go through ``screen``; without one, only globally routable
    addresses outside ``always_blocked`` are kept (nothing private is permitted)."""
    if policy.mode != "allowlist":
        return Plan()
    resolved = resolved or {}
    if screen is None:
        screen = AddressScreen(tuple(always_blocked))
    else:
        screen = AddressScreen(tuple(dict.fromkeys((*always_blocked, *screen.blocked))), screen.permitted)
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
            why = screen.why_not(text)
            if why is not None:
                dropped.append((f"{entry.value} -> {address}", why))
            else:
                blocks.append(IPBlock(ipaddress.ip_network(address)))
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
