"""The administrator's ceiling: what users may change, add, and what is always blocked.

``AdminPolicy`` is a traitlets ``Configurable``, so a Jupyter config file sets it::

    c.AdminPolicy.locked = True                       # exam mode
    c.AdminPolicy.user_may_allow = ["*.github.com", "pypi.org:443"]
    c.AdminPolicy.cluster_ranges = ["10.0.0.0/8"]

Each setting's default can also come from an environment variable named in its help
(config file > environment variable > built-in default), which is how the Helm chart
passes values to a kernel.

Who calls what:

* ``%sandbox allow`` / the widget → :meth:`AdminPolicy.check_change` before
  ``Session.apply_policy``; a :class:`CeilingRefused` leaves the policy in force untouched.
* blocked-connection notices → :meth:`AdminPolicy.decide_connection` for the advice line
  ("you may allow it: %sandbox allow X" / "not permitted by your administrator").
* backends → :meth:`AdminPolicy.blocked_networks` as ``always_blocked`` for every compiler.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any

from traitlets import Bool, Enum, Int, List, TraitError, Unicode, default, validate
from traitlets.config import Configurable

from ..config import env_bool
from ..errors import PolicyError
from .destinations import NOT_GLOBAL, AddressScreen, is_blocked, parse_networks
from .model import MODES, EgressPolicy, Entry, InvalidEntry, IPNetwork, parse_entry
from .presets import PRESETS

#: Always-blocked ranges by default, and why each one is there.
DEFAULT_ALWAYS_BLOCKED: dict[str, str] = {
    "169.254.0.0/16": "link-local, incl. the cloud metadata server 169.254.169.254",
    "fd00:ec2::254/128": "the AWS IPv6 metadata server",
    "fe80::/10": "IPv6 link-local",
    "127.0.0.0/8": "the host's loopback",
    "::1/128": "the host's IPv6 loopback",
    "0.0.0.0/8": "'this network': 0.0.0.0 reaches the host's own services on Linux",
    "::ffff:0:0/96": "IPv4-mapped IPv6, which would carry IPv4 ranges past IPv6 rules",
}

#: Blocked whatever the configuration says: one typo in a config must never expose the
#: cloud metadata server (node credentials) to the code in a sandbox.
METADATA_FLOOR = ("169.254.0.0/16", "fd00:ec2::254/128")

#: ``cluster_ranges`` by default: the private ranges a cluster's pods, services, nodes and
#: internal load balancers live in (RFC 1918, CGNAT 100.64.0.0/10 as GKE and EKS use it,
#: IPv6 ULA). An administrator whose network is elsewhere replaces the list.
DEFAULT_CLUSTER_RANGES: dict[str, str] = {
    "10.0.0.0/8": "RFC 1918 private",
    "172.16.0.0/12": "RFC 1918 private",
    "192.168.0.0/16": "RFC 1918 private",
    "100.64.0.0/10": "carrier-grade NAT (RFC 6598), used for pod ranges",
    "fc00::/7": "IPv6 unique local (ULA)",
}

# Ranges that are not "public" for the ``public`` pattern of ``user_may_allow``.
_NOT_PUBLIC = NOT_GLOBAL

PATTERN_KEYWORDS = ("public", "any")


class CeilingRefused(PolicyError):
    """A change goes beyond the administrator's ceiling; nothing was changed."""

    ename = "CeilingRefused"

    def __init__(self, reason: str, entry: Entry | None = None, requestable: bool = False,
                 request_hint: bool = False):
        self.reason = reason
        self.entry = entry
        #: an administrator could grant the entry (it is only outside ``user_may_allow``)
        self.requestable = requestable and entry is not None
        ask = "ask your administrator if you need this"
        if request_hint and self.requestable:
            # hub mode: the request reaches the administrator through the sandbox service
            ask = f"to ask your administrator for it: %sandbox request {entry} --reason '…'"
        super().__init__(f"Refused by your administrator's rule: {reason}. The policy in force was not changed; {ask}.")


@dataclass(frozen=True)
class Decision:
    """Whether a user may allow ``entry``, and the sentence to show them."""

    allowed: bool
    reason: str
    entry: Entry | None = None
    #: refused only because it is outside ``user_may_allow``: an administrator could grant it
    #: (hub mode: ``%sandbox request``); always-blocked ranges and exam mode are not requestable
    requestable: bool = False


class AdminPolicy(Configurable):
    """The ceiling on every sandbox's egress policy, set by the administrator."""

    mode = Enum(
        MODES,
        help="Mode of the default policy of new sandboxes: 'deny' or 'allowlist'. "
        "Environment variable: SANDBOX_KERNEL_POLICY_MODE.",
    ).tag(config=True)

    entries = List(
        Unicode(),
        help="Entries of the default policy (e.g. 'pypi.org:443'). Environment variable: "
        "SANDBOX_KERNEL_POLICY_ENTRIES (entries separated by whitespace).",
    ).tag(config=True)

    presets = List(
        Unicode(),
        help=f"Presets of the default policy ({', '.join(sorted(PRESETS))}). Environment "
        "variable: SANDBOX_KERNEL_POLICY_PRESETS (comma or whitespace separated).",
    ).tag(config=True)

    locked = Bool(
        help="Exam mode: users may not change the policy at all (not even narrow it). "
        "Environment variable: SANDBOX_KERNEL_POLICY_LOCKED (true/false).",
    ).tag(config=True)

    user_may_allow = List(
        Unicode(),
        help="What users may add. Each item is 'public' (any domain, and CIDRs made only of "
        "public addresses), 'any' (anything not always blocked), or an entry pattern that "
        "contains what may be added: 'pypi.org:443', '*.github.com' (one label), "
        "'203.0.113.0/24', '10.0.0.0/8:5432/tcp', '[2001:db8::/32]:8000-8100'. An empty list "
        "means users may add nothing. Environment variable: SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW "
        "(whitespace separated).",
    ).tag(config=True)

    max_entries = Int(
        help="Most entries a policy may have, counted after presets are expanded. "
        "Environment variable: SANDBOX_KERNEL_POLICY_MAX_ENTRIES.",
    ).tag(config=True)

    always_blocked = List(
        Unicode(),
        help="CIDRs no entry can open, whatever the user or the default policy says: "
        + "; ".join(f"{k} ({v})" for k, v in DEFAULT_ALWAYS_BLOCKED.items())
        + f". {' and '.join(METADATA_FLOOR)} stay blocked even if removed here. "
        "Environment variable: SANDBOX_KERNEL_POLICY_ALWAYS_BLOCKED (comma or whitespace separated).",
    ).tag(config=True)

    cluster_ranges = List(
        Unicode(),
        help="Cluster-internal CIDRs (pod, service and node ranges, internal load balancers) "
        "that sandboxes must never reach; blocked like always_blocked. Default: the private "
        "ranges " + ", ".join(DEFAULT_CLUSTER_RANGES) + "; set your own list (or an empty "
        "one) to change it. Environment variable: SANDBOX_KERNEL_POLICY_CLUSTER_RANGES (comma "
        "or whitespace separated; set but empty means none).",
    ).tag(config=True)

    # -- defaults from the environment

    @default("mode")
    def _default_mode(self) -> str:
        return os.environ.get("SANDBOX_KERNEL_POLICY_MODE", "deny")

    @default("entries")
    def _default_entries(self) -> list[str]:
        return os.environ.get("SANDBOX_KERNEL_POLICY_ENTRIES", "").split()

    @default("presets")
    def _default_presets(self) -> list[str]:
        return _split_list(os.environ.get("SANDBOX_KERNEL_POLICY_PRESETS", ""))

    @default("locked")
    def _default_locked(self) -> bool:
        return env_bool("SANDBOX_KERNEL_POLICY_LOCKED", False)

    @default("user_may_allow")
    def _default_user_may_allow(self) -> list[str]:
        return os.environ.get("SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW", "public").split()

    @default("max_entries")
    def _default_max_entries(self) -> int:
        text = os.environ.get("SANDBOX_KERNEL_POLICY_MAX_ENTRIES", "100")
        try:
            return int(text)
        except ValueError:
            raise TraitError(f"SANDBOX_KERNEL_POLICY_MAX_ENTRIES={text!r} is not a number") from None

    @default("always_blocked")
    def _default_always_blocked(self) -> list[str]:
        text = os.environ.get("SANDBOX_KERNEL_POLICY_ALWAYS_BLOCKED")
        return _split_list(text) if text is not None else list(DEFAULT_ALWAYS_BLOCKED)

    @default("cluster_ranges")
    def _default_cluster_ranges(self) -> list[str]:
        text = os.environ.get("SANDBOX_KERNEL_POLICY_CLUSTER_RANGES")
        return _split_list(text) if text is not None else list(DEFAULT_CLUSTER_RANGES)

    # -- validation: a bad config fails when it is loaded, naming the setting

    @validate("entries")
    def _check_entries(self, proposal: Any) -> list[str]:
        for text in proposal["value"]:
            _trait_guard("AdminPolicy.entries", parse_entry, text)
        return proposal["value"]

    @validate("presets")
    def _check_presets(self, proposal: Any) -> list[str]:
        for name in proposal["value"]:
            if name not in PRESETS:
                raise TraitError(f"AdminPolicy.presets: unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return proposal["value"]

    @validate("user_may_allow")
    def _check_user_may_allow(self, proposal: Any) -> list[str]:
        for text in proposal["value"]:
            if text not in PATTERN_KEYWORDS:
                _trait_guard("AdminPolicy.user_may_allow", parse_entry, text)
        return proposal["value"]

    @validate("always_blocked", "cluster_ranges")
    def _check_ranges(self, proposal: Any) -> list[str]:
        _trait_guard(f"AdminPolicy.{proposal['trait'].name}", parse_networks, proposal["value"])
        return proposal["value"]

    @validate("max_entries")
    def _check_max_entries(self, proposal: Any) -> int:
        if proposal["value"] < 0:
            raise TraitError("AdminPolicy.max_entries must be 0 or more")
        return proposal["value"]

    # -- reading

    def default_policy(self) -> EgressPolicy:
        """The policy a new sandbox starts with."""
        return EgressPolicy(mode=self.mode, entries=tuple(self.entries), presets=tuple(self.presets))

    #: ranges the backend itself uses (the local uplink's: CIDR -> what it is), set by the
    #: kernel from ``Backend.reserved_ranges``; blocked like always_blocked, whatever the config
    reserved: dict[str, str] = {}

    def blocked_networks(self) -> tuple[IPNetwork, ...]:
        """Every range no entry may open: the floor, always_blocked, cluster_ranges, and the
        backend's reserved ranges."""
        nets = parse_networks([*METADATA_FLOOR, *self.always_blocked, *self.cluster_ranges, *self.reserved])
        return tuple(dict.fromkeys(nets))

    def address_screen(self) -> AddressScreen:
        """What a domain entry's resolved addresses may be (see :class:`AddressScreen`): never
        blocked, and globally routable unless the ceiling lets users open the range anyway
        (a CIDR pattern of ``user_may_allow`` without a port limit, ``any``, or a CIDR entry
        of the administrator's default policy). Set on every backend by the kernel and the
        hub service."""
        permitted: list[IPNetwork] = []
        for pattern in self.user_may_allow:
            if pattern == "any":
                permitted += parse_networks(["0.0.0.0/0", "::/0"])
            elif pattern != "public":
                entry = parse_entry(pattern)
                if entry.kind == "cidr" and not entry.ports and entry.protocol is None:
                    permitted.append(entry.network)
        permitted += [e.network for e in self.default_policy().expanded_entries() if e.kind == "cidr"]
        return AddressScreen(self.blocked_networks(), tuple(dict.fromkeys(permitted)))

    def blocked_reason(self, ip: Any) -> str | None:
        """Why ``ip`` is always blocked (for notices), or None if it is not."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        net = ipaddress.ip_network(address)
        for blocked in self.blocked_networks():
            if is_blocked(net, (blocked,)):
                why = self.reserved.get(str(blocked)) or DEFAULT_ALWAYS_BLOCKED.get(str(blocked))
                if why is None and str(blocked) in self.cluster_ranges:
                    why = "a cluster-internal range" + (
                        f": {DEFAULT_CLUSTER_RANGES[str(blocked)]}" if str(blocked) in DEFAULT_CLUSTER_RANGES else "")
                return f"{address} is in {blocked}" + (f" ({why})" if why else "")
        return None

    def blocks(self, ip: Any) -> bool:
        """Whether ``ip`` is always blocked, whatever the policy says."""
        return self.blocked_reason(ip) is not None

    # -- deciding

    def decide(self, entry: str | Entry) -> Decision:
        """May a user add ``entry``? ``reason`` is the sentence for the notebook."""
        entry = parse_entry(entry)
        if self.locked:
            return _refuse("the administrator has locked the egress policy (exam mode)", entry)
        if entry.kind == "cidr" and is_blocked(entry.network, self.blocked_networks()):
            why = self.blocked_reason(entry.network.network_address)
            if any(is_blocked(entry.network, (net,)) for net in parse_networks(self.reserved)):
                return _refuse(f"{why}, which the sandbox's own network uses: no policy may open it", entry)
            return _refuse(f"{why}, which your administrator always blocks", entry)
        if any(_permits(pattern, entry) for pattern in self.user_may_allow):
            return Decision(True, f"you may allow it: %sandbox allow {entry}", entry)
        allowed = ", ".join(self.user_may_allow) or "nothing"
        return Decision(False, f"not permitted by your administrator: {entry} is outside what your administrator "
                               f"lets users allow ({allowed})", entry, requestable=True)

    def decide_connection(self, ip: Any, port: int | None, protocol: str | None, host: str | None = None) -> Decision:
        """Advice for a blocked connection: the narrowest entry that would allow it, decided."""
        why = self.blocked_reason(ip)
        if why:
            return Decision(False, f"not permitted by your administrator: {why}, which is always blocked")
        if host and _is_address(ip):
            screened = self.address_screen().why_not(str(ip))
            if screened:
                return Decision(False, f"not permitted by your administrator: {host} resolves to {screened}")
        target = host if host else str(ip)
        if not host and ":" in target:
            target = f"[{target}]"
        text = target + (f":{port}" if port else "") + (f"/{protocol}" if protocol in ("tcp", "udp") else "")
        try:
            entry = parse_entry(text)
        except InvalidEntry:
            return Decision(False, f"{target} cannot be written as an egress entry")
        return self.decide(entry)

    def check_change(self, old: EgressPolicy, new: EgressPolicy, who: str = "user") -> None:
        """Raise :class:`CeilingRefused` if ``who`` may not go from ``old`` to ``new``.

        Called before every apply. ``who="admin"`` (the kernel applying the configured
        default) is not limited; ``who="expiry"`` (a timed entry ending) may only remove
        entries, and may do so even when the policy is locked. A user may always remove entries or switch to deny
        unless the policy is locked; every entry that would newly be enforced must be
        permitted (entries of the administrator's default policy always are).
        """
        if who == "admin" or old == new:
            return
        if who == "expiry":  # a timed entry ending: only ever removes what was in force
            if new.mode == old.mode and new.presets == old.presets and set(new.entries) <= set(old.entries):
                return
            raise CeilingRefused("an expiry may only remove entries")
        if self.locked:
            raise CeilingRefused("the administrator has locked the egress policy (exam mode)")
        count = len(new.expanded_entries())
        if count > self.max_entries:
            raise CeilingRefused(f"a policy may have at most {self.max_entries} entries; this one has {count}")
        before = set(old.expanded_entries())
        admin_given = set(self.default_policy().expanded_entries())
        switching_on = new.mode == "allowlist" and old.mode != "allowlist"
        for entry in new.expanded_entries():
            if entry in admin_given or (entry in before and not switching_on):
                continue
            decision = self.decide(entry)
            if not decision.allowed:
                raise CeilingRefused(decision.reason.removeprefix("not permitted by your administrator: "), entry,
                                     requestable=decision.requestable)


def _permits(pattern: str, entry: Entry) -> bool:
    """Whether the ceiling ``pattern`` contains everything ``entry`` would open."""
    if pattern == "any":
        return True
    if pattern == "public":
        if entry.kind != "cidr":
            return True
        net = entry.network
        return not any(net.version == n.version and net.overlaps(n) for n in _NOT_PUBLIC)
    allowed = parse_entry(pattern)
    if allowed.protocol is not None and entry.protocol != allowed.protocol:
        return False
    if allowed.ports:
        if not entry.ports:
            return False
        if not all(any(a <= lo and hi <= b for a, b in allowed.ports) for lo, hi in entry.ports):
            return False
    if allowed.kind == "cidr":
        return entry.kind == "cidr" and entry.network.version == allowed.network.version and entry.network.subnet_of(allowed.network)
    if allowed.kind == "domain":
        return entry.kind == "domain" and entry.value == allowed.value
    # wildcard pattern: the same wildcard, or one exact name one label below it
    if entry.kind == "wildcard":
        return entry.value == allowed.value
    return entry.kind == "domain" and Entry("wildcard", allowed.value).matches(None, None, None, entry.value)


def _refuse(reason: str, entry: Entry | None) -> Decision:
    return Decision(False, f"not permitted by your administrator: {reason}", entry)


def _trait_guard(name: str, func: Any, value: Any) -> None:
    try:
        func(value)
    except (PolicyError, ValueError) as err:
        raise TraitError(f"{name}: {err}") from None


def _is_address(value: Any) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _split_list(text: str) -> list[str]:
    return text.replace(",", " ").split()



def agent_view(policy: EgressPolicy, admin: AdminPolicy, applied: dict) -> dict:
    """What the agent's guard needs to know about ``policy`` under the ceiling ``admin``
    (plain JSON; ``applied`` is the backend's :attr:`~Backend.applied`). Sent to the agent by
    the kernel, or in hub mode by the service, never by anything in the sandbox."""
    allow = []
    if policy.mode == "allowlist":
        for entry in policy.expanded_entries():
            value = entry.value[2:] if entry.kind == "wildcard" else entry.value
            allow.append({"kind": entry.kind, "value": value,
                          "ports": [list(r) for r in entry.ports], "protocol": entry.protocol})
    return {"mode": policy.mode, "name": policy.name, "label": policy.describe(), "allow": allow,
            "blocked": [str(net) for net in admin.blocked_networks()],
            "resolved": applied.get("resolved", {}), "resolver": applied.get("resolver")}
