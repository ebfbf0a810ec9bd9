"""Compile an egress policy to one nftables script for the local backend.

Called by the local backend (``backends/local/enforcer.py``) each time a policy is applied or
its DNS answers expire; it pipes the text to ``nft -f -`` inside the sandbox's network
namespace. The script creates the table, deletes it, and defines it again, all in one
``nft -f`` transaction: either the whole new ruleset is in force or the old one stays.

The output chain (``policy drop``), in order:

1. ``oif lo``: the sandbox's own loopback (it is not the host's: separate namespace);
2. ICMP errors related to a tracked connection (never data);
3. IPv6 neighbour discovery (hop limit 255, so only on-link), without which no IPv6
   destination is reachable at all;
4. allowlist mode only: DNS (udp and tcp 53) to ``resolver`` and nowhere else, ahead of
   the always-blocked rule so a link-local resolver (169.254.x) still answers on port 53;
5. always-blocked destinations: counted, logged to NFLOG with
   :data:`LOG_PREFIX_ALWAYS_BLOCKED`, rejected (tcp reset / icmpx admin-prohibited);
6. allowlist mode only: the allowed destinations, as interval sets per (protocol, ports),
   and one set pair per wildcard entry (filled at run time);
7. everything else: counted, logged with :data:`LOG_PREFIX_DENIED`, rejected. Rejecting
   rather than dropping makes a refused connect fail at once instead of hanging.

There is deliberately no blanket ``ct state established accept``: every packet of every
flow, new or long established, is judged by the policy in force, so narrowing the policy
cuts flows it no longer allows at the next packet (TCP gets a reset, UDP an ICMP error).
The input chain mirrors the allow rules (the reply's source is the flow's destination), so
a flow cut on the way out is cut on the way in too.

IPv4 and IPv6 go through the same rules (``inet`` family): nothing is left open on v6.

Wildcard entries cannot be resolved ahead of time. The script declares their sets
(possibly empty) and lists them in a comment; the local backend adds addresses to
:func:`set_name` when the guard reports a resolution (``nft add element``). Exact
domains use the ``resolved`` addresses, from :func:`sandbox_kernel.policy.resolve.resolve_policy`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping, Sequence

from ..errors import PolicyError
from .destinations import AddressScreen, Plan, parse_networks, plan_destinations
from .model import EgressPolicy, Entry, IPNetwork, PortRange

#: NFLOG prefixes: the kernel tells an always-blocked destination from a merely
#: not-allowed one by these (they end with a space because the log text follows).
LOG_PREFIX_ALWAYS_BLOCKED = "sandbox-kernel:always-blocked "
LOG_PREFIX_DENIED = "sandbox-kernel:denied "
#: learn mode (``log_accepted=True``): the first packet of each allowed connection is
#: logged with this prefix, so the kernel learns what was reached, not only what was refused
LOG_PREFIX_ACCEPTED = "sandbox-kernel:accepted "

#: how a refused packet ends, for TCP and for everything else
_REFUSALS = {
    "reject": ("reject with tcp reset", "reject with icmpx type admin-prohibited"),
    "drop": ("drop", "drop"),
}

_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")
_FAMILIES = ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr"))


def compile_nftables(
    policy: EgressPolicy,
    *,
    table: str = "sandbox_kernel",
    resolved: Mapping[str, Sequence[str]] | None,
    resolver: str | None,
    always_blocked: Sequence[str | IPNetwork],
    nflog_group: int = 42,
    refuse_with: str = "reject",
    log_accepted: bool = False,
    screen: AddressScreen | None = None,
) -> str:
    """Return the ``nft -f`` script that enforces ``policy`` in one network namespace.

    ``resolved`` maps each exact domain to its addresses; ``resolver`` is the one DNS
    server the sandbox may query (allowlist mode only; None allows no DNS at all).
    ``refuse_with`` is ``"reject"`` (TCP reset / ICMP admin-prohibited: code fails at once)
    or ``"drop"`` (silence, as a Kubernetes NetworkPolicy does). ``log_accepted`` logs the
    first packet of every allowed connection with :data:`LOG_PREFIX_ACCEPTED` (learn mode).
    ``screen`` (the ceiling's :class:`~.destinations.AddressScreen`) decides which resolved
    addresses may be opened.
    """
    if not _TABLE.match(table):
        raise PolicyError(f"nftables table name {table!r} must be a short identifier (letters, digits, _)")
    if not 0 <= nflog_group <= 65535:
        raise PolicyError(f"NFLOG group {nflog_group} is out of range (0-65535)")
    if refuse_with not in _REFUSALS:
        raise PolicyError(f"refuse_with must be one of {', '.join(_REFUSALS)}, not {refuse_with!r}")
    reject_tcp, reject_other = _REFUSALS[refuse_with]
    resolver_ip = _parse_resolver(resolver)
    blocked = parse_networks(always_blocked)
    plan = plan_destinations(policy, resolved, blocked, screen)
    groups = _group(plan)

    out = [
        f"# sandbox-kernel egress ruleset for policy {policy.name!r}: {policy.describe()}",
        "# generated by sandbox_kernel.policy.compile_nftables; replaced atomically, do not edit",
        *_notes(plan),
        f"table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
    ]
    out += _set("blocked_v4", "ipv4_addr", [n for n in blocked if n.version == 4])
    out += _set("blocked_v6", "ipv6_addr", [n for n in blocked if n.version == 6])
    for (protocol, ports), nets in groups.items():
        for version, _, addr_type in _FAMILIES:
            out += _set(set_name(version, protocol, ports), addr_type, [n for n in nets if n.version == version])
    wildcards = list(dict.fromkeys(plan.wildcards))
    for entry in wildcards:
        for version, _, addr_type in _FAMILIES:
            out += _set(wildcard_set_name(version, entry), addr_type, [])
    # (set name, protocol, ports) of every allow rule, in order
    allows = [(set_name(version, protocol, ports), family, protocol, ports)
              for protocol, ports in groups for version, family, _ in _FAMILIES]
    allows += [(wildcard_set_name(version, entry), family, entry.protocol, entry.ports)
               for entry in wildcards for version, family, _ in _FAMILIES]

    log = f"counter log prefix \"{{prefix}}\" group {nflog_group}"
    out += [
        "\tchain output {",
        "\t\ttype filter hook output priority filter; policy drop;",
        '\t\toif "lo" accept',
        "\t\tct state invalid drop",
        "\t\tct state related meta l4proto { icmp, ipv6-icmp } accept",
        "\t\tip6 hoplimit 255 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit } accept",
    ]
    resolver_family = None
    if policy.mode == "allowlist" and resolver_ip is not None:
        resolver_family = "ip" if resolver_ip.version == 4 else "ip6"
        out.append(f"\t\t{resolver_family} daddr {resolver_ip} meta l4proto {{ tcp, udp }} th dport 53 accept")
    for version, family, _ in _FAMILIES:
        blocked_log = log.format(prefix=LOG_PREFIX_ALWAYS_BLOCKED)
        out.append(f"\t\t{family} daddr @blocked_v{version} meta l4proto tcp {blocked_log} {reject_tcp}")
        out.append(f"\t\t{family} daddr @blocked_v{version} {blocked_log} {reject_other}")
    # learn mode: a flow's first packet is logged (every packet passes these rules: no blanket
    # "established: accept" above), by a rule of its own that does not decide anything
    accepted_log = log.format(prefix=LOG_PREFIX_ACCEPTED)
    for name, family, protocol, ports in allows:
        if log_accepted:
            out.append(f"\t\t{family} daddr @{name}{_l4_match(protocol, ports)} ct state new {accepted_log}")
        out.append(f"\t\t{family} daddr @{name}{_l4_match(protocol, ports)} accept")
    denied_log = log.format(prefix=LOG_PREFIX_DENIED)
    out += [
        f"\t\tmeta l4proto tcp {denied_log} {reject_tcp}",
        f"\t\t{denied_log} {reject_other}",
        "\t}",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy drop;",
        '\t\tiif "lo" accept',
        "\t\tct state invalid drop",
        "\t\tct state related meta l4proto { icmp, ipv6-icmp } accept",
        "\t\tip6 hoplimit 255 icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert } accept",
    ]
    # replies of flows the output rules allow now, and nothing else: what a narrowing cut
    # on the way out stays cut on the way in
    if resolver_family is not None:
        out.append(f"\t\tct state established {resolver_family} saddr {resolver_ip} "
                   "meta l4proto { tcp, udp } th sport 53 accept")
    for name, family, protocol, ports in allows:
        out.append(f"\t\tct state established {family} saddr @{name}"
                   f"{_l4_match(protocol, ports, 'sport')} accept")
    out += ["\t}", "}"]
    return "\n".join(out) + "\n"


def set_name(version: int, protocol: str | None, ports: tuple[PortRange, ...]) -> str:
    """Name of the allowed-address set for one (IP version, protocol, ports) group.

    The local backend calls this (via :func:`set_for_entry`) to add the addresses of a
    wildcard entry at run time.
    """
    port_text = "_".join(str(lo) if lo == hi else f"{lo}to{hi}" for lo, hi in ports) or "all"
    name = f"allow_v{version}_{protocol or 'any'}_{port_text}"
    if len(name) > 48:  # keep names short and bounded; the hash keeps them distinct
        digest = hashlib.sha256(port_text.encode()).hexdigest()[:10]
        name = f"allow_v{version}_{protocol or 'any'}_h{digest}"
    return name


def wildcard_set_name(version: int, entry: Entry) -> str:
    """Name of a wildcard entry's own set: its addresses are learned one answer at a time,
    and revoking the entry must close exactly them, not another wildcard's."""
    digest = hashlib.sha256(str(entry).encode()).hexdigest()[:12]
    return f"wild_v{version}_{digest}"


def set_for_entry(entry: Entry, address: str) -> str:
    """The set an address of ``entry`` belongs in (for wildcard addresses learned later)."""
    version = ipaddress.ip_address(address).version
    if entry.kind == "wildcard":
        return wildcard_set_name(version, entry)
    return set_name(version, entry.protocol, entry.ports)


def _group(plan: Plan) -> dict[tuple[str | None, tuple[PortRange, ...]], list[IPNetwork]]:
    groups: dict[tuple[str | None, tuple[PortRange, ...]], list[IPNetwork]] = {}
    for dest in plan.destinations:
        if dest.entry.kind == "wildcard":  # own sets: see wildcard_set_name
            continue
        nets = groups.setdefault((dest.protocol, dest.ports), [])
        for block in dest.blocks:
            nets.extend(block.networks())
    return {key: groups[key] for key in sorted(groups, key=lambda k: (k[0] or "", k[1]))}


def _set(name: str, addr_type: str, nets: list[IPNetwork]) -> list[str]:
    lines = [f"\tset {name} {{", f"\t\ttype {addr_type}", "\t\tflags interval"]
    collapsed = list(ipaddress.collapse_addresses(nets))
    if collapsed:
        lines.append("\t\telements = { " + ", ".join(map(_element, collapsed)) + " }")
    return lines + ["\t}"]


def _element(net: IPNetwork) -> str:
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def _l4_match(protocol: str | None, ports: tuple[PortRange, ...], field: str = "dport") -> str:
    port_set = ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)
    port_expr = port_set if len(ports) == 1 and "," not in port_set else f"{{ {port_set} }}"
    if protocol and ports:
        return f" {protocol} {field} {port_expr}"
    if protocol:
        return f" meta l4proto {protocol}"
    if ports:
        return f" meta l4proto {{ tcp, udp }} th {field} {port_expr}"
    return ""


def _notes(plan: Plan) -> list[str]:
    notes = []
    for entry in plan.wildcards:
        sets = ", ".join(wildcard_set_name(v, entry) for v in (4, 6))
        notes.append(f"# deferred wildcard {entry}: addresses are added at run time to {sets}")
    notes += [f"# unresolved {name}: no address, nothing opened" for name in plan.unresolved]
    notes += [f"# dropped {what}: {why}" for what, why in plan.dropped]
    return notes


def _parse_resolver(resolver: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if resolver is None:
        return None
    try:
        return ipaddress.ip_address(resolver)
    except ValueError:
        raise PolicyError(f"resolver {resolver!r} must be an IP address") from None
