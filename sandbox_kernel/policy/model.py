"""The egress policy model: entries, policies, their text syntax, and the typed errors.

Who uses what:

* ``%sandbox allow/deny`` magics and the policy widget call :func:`parse_entry` and the
  ``with_*`` methods, then hand the new policy to ``AdminPolicy.check_change`` (admin.py)
  and ``Session.apply_policy``.
* The compilers (``compile_*.py``) read :meth:`EgressPolicy.expanded_entries`.
* The kernel sends :meth:`EgressPolicy.to_dict` to the agent (the ``policy`` frame) and
  uses :meth:`EgressPolicy.allows` when it writes a blocked-connection notice.

Entry syntax (whitespace around an entry is ignored; inside it is an error)::

    api.github.com                 exact domain, any port, tcp and udp
    api.github.com:443             one port
    api.github.com:80,443          several ports
    example.com:8000-8100          a port range (inclusive); ranges and ports mix: 80,8000-8100
    *.pythonhosted.org             wildcard: exactly one label in front of the name
    10.1.2.0/24:5432/tcp           IPv4 CIDR, port, protocol
    10.1.2.3                       a single address (= 10.1.2.3/32)
    2001:db8::1                    bare IPv6 address or CIDR (no port)
    [2001:db8::/32]:443            IPv6 with ports: in brackets
    dns.example.com/udp            protocol without port: any port of that protocol

Every invalid input raises a subclass of :class:`~sandbox_kernel.errors.PolicyError`
that names the input and the reason.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from ..errors import PolicyError
from .names import NameRejected, is_public_suffix, normalize_domain
from .presets import PRESETS, preset_names

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
PortRange = tuple[int, int]

MODES = ("deny", "allowlist")
KINDS = ("domain", "wildcard", "cidr")
PROTOCOLS = ("tcp", "udp")
POLICY_KEYS = ("name", "mode", "entries", "presets")

_PORT_ITEM = re.compile(r"^(\d{1,5})(?:-(\d{1,5}))?$")
_PROTOCOL_SUFFIX = re.compile(r"/([A-Za-z]+)$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# --------------------------------------------------------------------------- errors


class InvalidEntry(PolicyError):
    """One egress entry cannot be parsed; ``.entry`` is the input, ``.reason`` says why."""

    ename = "InvalidEntry"

    def __init__(self, entry: Any, reason: str, where: str = ""):
        self.entry = entry if isinstance(entry, str) else repr(entry)
        self.reason = reason
        self.where = where
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}{self.entry!r} is not a valid egress entry: {reason}")


class InvalidPolicy(PolicyError):
    """A policy document is malformed (unknown key, bad mode, wrong type)."""

    ename = "InvalidPolicy"

    def __init__(self, reason: str, where: str = ""):
        self.reason = reason
        self.where = where
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}invalid egress policy: {reason}")


class UnknownPreset(InvalidPolicy):
    """A preset name that does not exist."""

    ename = "UnknownPreset"

    def __init__(self, preset: str, where: str = ""):
        self.preset = preset
        known = ", ".join(preset_names())
        super().__init__(f"unknown preset {preset!r}; known presets: {known}", where)


class PolicyFileError(InvalidPolicy):
    """A policy file cannot be read or is not valid YAML/JSON."""

    ename = "PolicyFileError"

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        super().__init__(reason, where=self.path)


class EntryNotFound(PolicyError):
    """``with_entries_removed`` was asked to remove an entry the policy does not have."""

    ename = "EntryNotFound"

    def __init__(self, entry: str, present: Iterable[str]):
        self.entry = entry
        listed = ", ".join(present) or "none"
        super().__init__(f"{entry!r} is not in the policy (its entries: {listed}); nothing was changed")


class UnsupportedByEnforcer(PolicyError):
    """An entry cannot be expressed by an enforcer; raised by a compiler, nothing is applied."""

    ename = "UnsupportedByEnforcer"

    def __init__(self, entry: Entry | str, enforcer: str, reason: str):
        self.entry = str(entry)
        self.enforcer = enforcer
        self.reason = reason
        super().__init__(f"the {enforcer} enforcer cannot enforce {self.entry!r}: {reason}")


# --------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """One allowed destination. Build it with :func:`parse_entry`, which normalizes.

    ``value`` is the lowercase ASCII domain (``api.github.com``), the wildcard
    (``*.pythonhosted.org``) or the CIDR with its prefix (``10.1.2.0/24``,
    ``2001:db8::1/128``). ``ports`` is a sorted tuple of merged inclusive ranges, empty
    for any port. ``protocol`` is ``"tcp"``, ``"udp"`` or ``None`` for both.
    """

    kind: str
    value: str
    ports: tuple[PortRange, ...] = ()
    protocol: str | None = None

    def __post_init__(self) -> None:
        # Guards against hand-built entries; parse_entry already guarantees all of this.
        if self.kind not in KINDS:
            raise InvalidEntry(self.value, f"unknown kind {self.kind!r}")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise InvalidEntry(self.value, f"unknown protocol {self.protocol!r}")
        for lo, hi in self.ports:
            if not (1 <= lo <= hi <= 65535):
                raise InvalidEntry(self.value, f"bad port range {lo}-{hi}")

    @property
    def network(self) -> IPNetwork:
        """The CIDR of a ``cidr`` entry (ValueError for other kinds)."""
        if self.kind != "cidr":
            raise ValueError(f"{self} is a {self.kind} entry, not a CIDR")
        return ipaddress.ip_network(self.value)

    @property
    def sort_key(self) -> tuple:
        """Deterministic order for compiled output: kind, then value, ports, protocol."""
        return (KINDS.index(self.kind), self.value, self.ports, self.protocol or "")

    def matches(self, ip: IPAddress | None, port: int | None, protocol: str | None, host: str | None) -> bool:
        """Whether a connection to ``ip``/``host`` on ``port``/``protocol`` falls under this entry.

        Domain entries match by ``host`` only (the caller's resolution is trusted for
        advice; the network is the enforcer). A wildcard matches exactly one label.
        """
        if self.protocol is not None and protocol != self.protocol:
            return False
        if self.ports and (port is None or not any(lo <= port <= hi for lo, hi in self.ports)):
            return False
        if self.kind == "cidr":
            return ip is not None and ip.version == self.network.version and ip in self.network
        if host is None:
            return False
        if self.kind == "domain":
            return host == self.value
        suffix = self.value[1:]  # ".pythonhosted.org"
        return host.endswith(suffix) and "." not in host[: -len(suffix)] and len(host) > len(suffix)

    def __str__(self) -> str:
        host = self.value
        ipv6 = False
        if self.kind == "cidr":
            net = self.network
            ipv6 = net.version == 6
            host = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        text = f"[{host}]" if ipv6 and (self.ports or self.protocol) else host
        if self.ports:
            text += ":" + ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports)
        if self.protocol:
            text += "/" + self.protocol
        return text


def parse_entry(text: Any) -> Entry:
    """Parse one entry in the syntax above; raise :class:`InvalidEntry` naming it and why."""
    if isinstance(text, Entry):
        return text
    if not isinstance(text, str):
        raise InvalidEntry(text, f"an entry must be a string, not {type(text).__name__}")
    original = text
    text = text.strip()
    if not text:
        raise InvalidEntry(original, "the entry is empty")
    if any(ch.isspace() for ch in text):
        raise InvalidEntry(original, "the entry contains whitespace; write one entry per item")
    try:
        return _parse(text)
    except _Reject as err:
        raise InvalidEntry(original, str(err)) from None


class _Reject(ValueError):
    """Internal: the reason an entry is invalid (parse_entry adds the entry)."""


def _parse(text: str) -> Entry:
    protocol = None
    match = _PROTOCOL_SUFFIX.search(text)
    if match:
        protocol = match.group(1).lower()
        if protocol not in PROTOCOLS:
            raise _Reject(f"unknown protocol {match.group(1)!r}; use /tcp or /udp (or nothing for both)")
        text = text[: match.start()]
        if not text:
            raise _Reject("there is a protocol but no destination")

    portspec = None
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise _Reject("'[' without a closing ']'")
        host, rest = text[1:close], text[close + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise _Reject(f"unexpected {rest!r} after ']'; ports follow as ']:443'")
            portspec = rest[1:]
        if not _looks_like_ip(host) or ":" not in host:
            raise _Reject("brackets are only for IPv6 addresses, e.g. [2001:db8::1]:443")
    elif text.count(":") >= 2:
        host = text  # bare IPv6: a port needs brackets, so every ':' is part of the address
    elif ":" in text:
        host, portspec = text.split(":", 1)
    else:
        host = text

    ports = _parse_ports(portspec) if portspec is not None else ()
    if not host:
        raise _Reject("there is no destination before the port")
    if _looks_like_ip(host):
        return Entry("cidr", _parse_network(host), ports, protocol)
    if "*" in host:
        return Entry("wildcard", _parse_wildcard(host), ports, protocol)
    try:
        return Entry("domain", normalize_domain(host), ports, protocol)
    except NameRejected as err:
        raise _Reject(str(err)) from None


def _looks_like_ip(host: str) -> bool:
    # IPv6 always has ':'; a host made only of digits, dots and a prefix is meant as IPv4.
    return ":" in host or bool(re.fullmatch(r"[0-9./]+", host))


def _parse_network(host: str) -> str:
    if "%" in host:
        raise _Reject("zone indices (%eth0) are not allowed in egress entries")
    try:
        net = ipaddress.ip_network(host, strict=True)
    except ValueError as err:
        reason = str(err)
        if "host bits set" in reason:
            fixed = ipaddress.ip_network(host, strict=False)
            raise _Reject(f"{host} has host bits set; did you mean {fixed}?") from None
        raise _Reject(f"not a valid IP address or CIDR: {reason}") from None
    if net.version == 6 and (net.network_address.ipv4_mapped or net.network_address.sixtofour):
        raise _Reject("IPv4-mapped and 6to4 IPv6 addresses are not allowed; write the IPv4 address")
    return str(net)


def _parse_wildcard(host: str) -> str:
    if not host.startswith("*.") or "*" in host[1:]:
        raise _Reject(
            "'*' is only allowed as the whole first label (as in *.example.com), "
            "and it matches exactly one label"
        )
    base = host[2:].rstrip(".")
    if base and "." not in base:
        raise _Reject(f"*.{base} would allow every name under the top-level domain {base!r}")
    try:
        base = normalize_domain(base)
    except NameRejected as err:
        raise _Reject(str(err)) from None
    if is_public_suffix(base):
        raise _Reject(
            f"*.{base} would allow every site under the public suffix {base!r}; "
            "list the exact names instead"
        )
    return f"*.{base}"


def _parse_ports(spec: str) -> tuple[PortRange, ...]:
    if not spec:
        raise _Reject("':' is not followed by a port")
    ranges = []
    for item in spec.split(","):
        match = _PORT_ITEM.match(item)
        if not match:
            raise _Reject(f"port {item!r} is not a number or a range like 8000-8100")
        lo = int(match.group(1))
        hi = int(match.group(2)) if match.group(2) else lo
        for port in (lo, hi):
            if not 1 <= port <= 65535:
                raise _Reject(f"port {port} is out of range (1-65535)")
        if lo > hi:
            raise _Reject(f"port range {item} is reversed; write {hi}-{lo}")
        ranges.append((lo, hi))
    return merge_port_ranges(ranges)


def merge_port_ranges(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """Sort ranges and merge the ones that overlap or touch (80,81 → 80-81)."""
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class EgressPolicy:
    """What one sandbox may connect to.

    ``deny``: nothing leaves the sandbox (not even DNS). ``allowlist``: DNS to the
    sandbox's resolver plus the destinations in ``presets`` and ``entries``. In ``deny``
    mode the entries are kept (so toggling back restores them) but not enforced.
    Immutable: every change returns a new policy, which makes apply-or-keep-the-old
    atomic for the caller.
    """

    mode: str = "deny"
    entries: tuple[Entry, ...] = ()
    presets: tuple[str, ...] = ()
    name: str = "default"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InvalidPolicy(f"mode must be 'deny' or 'allowlist', not {self.mode!r}")
        if not isinstance(self.name, str) or len(self.name) > 63 or not _NAME.match(self.name):
            raise InvalidPolicy(
                f"name {self.name!r} must be a lowercase DNS label (letters, digits, '-', at most 63)"
            )
        if isinstance(self.entries, (str, bytes)) or isinstance(self.presets, (str, bytes)):
            raise InvalidPolicy("entries and presets must be lists, not a single string")
        entries = tuple(dict.fromkeys(parse_entry(e) for e in self.entries))
        for preset in self.presets:
            if preset not in PRESETS:
                raise UnknownPreset(preset)
        object.__setattr__(self, "entries", entries)
        object.__setattr__(self, "presets", tuple(dict.fromkeys(self.presets)))

    # -- construction

    @classmethod
    def parse(cls, obj: Any, where: str = "") -> EgressPolicy:
        """Build a policy from a dict, a list of entry strings, or a string.

        * dict: ``{mode, entries, presets, name}`` (all optional; mode defaults to deny)
        * list: entries, mode ``allowlist``
        * str: ``"deny"``, ``"allowlist"``, or entries separated by whitespace (allowlist)
        """
        if isinstance(obj, EgressPolicy):
            return obj
        if isinstance(obj, str):
            words = obj.split()
            if words in (["deny"], ["allowlist"]):
                return cls(mode=words[0])
            return cls._from_entries(words, where)
        if isinstance(obj, (list, tuple)):
            return cls._from_entries(obj, where)
        if isinstance(obj, dict):
            return cls._from_dict(obj, where)
        raise InvalidPolicy(f"expected a mapping, a list or a string, not {type(obj).__name__}", where)

    @classmethod
    def _from_entries(cls, items: Iterable[Any], where: str) -> EgressPolicy:
        return cls(mode="allowlist", entries=_parse_entries(items, where))

    @classmethod
    def _from_dict(cls, obj: dict, where: str) -> EgressPolicy:
        unknown = [k for k in obj if k not in POLICY_KEYS]
        if unknown:
            raise InvalidPolicy(
                f"unknown key {unknown[0]!r}; a policy has {', '.join(POLICY_KEYS)}", where
            )
        mode = obj.get("mode", "deny")
        if mode not in MODES:
            raise InvalidPolicy(f"mode must be 'deny' or 'allowlist', not {mode!r}", where)
        entries = _as_list(obj.get("entries"), "entries", where)
        presets = _as_list(obj.get("presets"), "presets", where)
        for i, preset in enumerate(presets):
            if not isinstance(preset, str) or preset not in PRESETS:
                raise UnknownPreset(str(preset), _join(where, f"presets[{i}]"))
        name = obj.get("name", "default")
        try:
            return cls(mode=mode, entries=_parse_entries(entries, where), presets=tuple(presets), name=name)
        except InvalidPolicy as err:
            raise InvalidPolicy(err.reason, where) from None

    # -- reading

    def expanded_entries(self) -> tuple[Entry, ...]:
        """Preset entries (in preset order) then own entries, without duplicates."""
        out: dict[Entry, None] = {}
        for preset in self.presets:
            for text in PRESETS[preset]:
                out[parse_entry(text)] = None
        for entry in self.entries:
            out[entry] = None
        return tuple(out)

    def domains(self) -> tuple[str, ...]:
        """Exact domain names to resolve at apply time (resolve.py), sorted."""
        return tuple(sorted({e.value for e in self.expanded_entries() if e.kind == "domain"}))

    def wildcards(self) -> tuple[Entry, ...]:
        """Wildcard entries: no enforcer that works on addresses can apply them ahead of time."""
        return tuple(e for e in self.expanded_entries() if e.kind == "wildcard")

    def allows(self, ip: Any, port: int | None, protocol: str | None, host: str | None = None) -> bool:
        """Whether the policy allows a connection (advice for notices and the guard).

        ``ip`` is an address string or object (IPv4-mapped IPv6 is treated as IPv4),
        ``host`` the name the program asked for, when known. Does not know about the
        administrator's always-blocked set (``AdminPolicy.blocks``) or DNS to the
        resolver (always allowed in allowlist mode); loopback is always allowed.
        """
        if self.mode != "allowlist":
            return False
        address = _as_address(ip)
        name = _as_hostname(host)
        return any(e.matches(address, port, protocol, name) for e in self.expanded_entries())

    # -- changing (each returns a new policy)

    def with_mode(self, mode: str) -> EgressPolicy:
        return EgressPolicy(mode=mode, entries=self.entries, presets=self.presets, name=self.name)

    def with_entries_added(self, *entries: str | Entry) -> EgressPolicy:
        """Add entries (duplicates ignored). Does not change the mode."""
        added = _parse_entries(entries, "")
        return EgressPolicy(self.mode, self.entries + added, self.presets, self.name)

    def with_entries_removed(self, *entries: str | Entry) -> EgressPolicy:
        """Remove entries; raise :class:`EntryNotFound` if one is not in the policy."""
        removed = _parse_entries(entries, "")
        for entry in removed:
            if entry not in self.entries:
                raise EntryNotFound(str(entry), (str(e) for e in self.entries))
        kept = tuple(e for e in self.entries if e not in removed)
        return EgressPolicy(self.mode, kept, self.presets, self.name)

    def with_presets_added(self, *names: str) -> EgressPolicy:
        return EgressPolicy(self.mode, self.entries, self.presets + tuple(names), self.name)

    def with_presets_removed(self, *names: str) -> EgressPolicy:
        for preset in names:
            if preset not in self.presets:
                raise EntryNotFound(f"preset {preset}", self.presets)
        return EgressPolicy(self.mode, self.entries, tuple(p for p in self.presets if p not in names), self.name)

    # -- display

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form; ``EgressPolicy.parse(p.to_dict()) == p``. Sent to the agent."""
        return {
            "name": self.name,
            "mode": self.mode,
            "entries": [str(e) for e in self.entries],
            "presets": list(self.presets),
        }

    def describe(self) -> str:
        """One line for status displays: ``default-deny``, ``allowlist (3 entries)``."""
        if self.mode == "deny":
            return "default-deny"
        count = len(self.entries)
        text = f"{count} entr{'y' if count == 1 else 'ies'}"
        if self.presets:
            text += f", presets: {', '.join(self.presets)}"
        return f"allowlist ({text})"


def load_policy_file(path: str | Path) -> EgressPolicy:
    """Read a policy from a YAML or JSON file (``policy check``, ``policy render``, config).

    JSON is read with :mod:`json` for ``.json`` files and YAML (``safe_load``) otherwise.
    Errors name the file and, for entries, the position (``entries[3]``).
    """
    import yaml  # imported here: only file loading needs it

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PolicyFileError(path, f"cannot read the file: {err}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as err:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise PolicyFileError(path, f"not valid {kind}: {err}") from None
    if data is None:
        raise PolicyFileError(path, "the file is empty")
    return EgressPolicy.parse(data, where=str(path))


# --------------------------------------------------------------------------- helpers


def _parse_entries(items: Iterable[Any], where: str) -> tuple[Entry, ...]:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(parse_entry(item))
        except InvalidEntry as err:
            raise InvalidEntry(err.entry, err.reason, _join(where, f"entries[{i}]")) from None
    return tuple(out)


def _as_list(value: Any, key: str, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise InvalidPolicy(f"{key!r} must be a list, not {type(value).__name__}", where)
    return list(value)


def _join(where: str, more: str) -> str:
    return f"{where}: {more}" if where else more


def _as_address(ip: Any) -> IPAddress | None:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def _as_hostname(host: str | None) -> str | None:
    if not host:
        return None
    try:
        return normalize_domain(host.strip())
    except NameRejected:
        return None
