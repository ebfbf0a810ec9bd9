"""The guard: fail a forbidden connection at once, with a message that names the policy.

An audit hook (PEP 578) sees ``socket.connect``, ``socket.sendto`` and
``socket.getaddrinfo`` in the agent's Python. It knows the policy the kernel sent and
raises ``ConnectionRefusedError`` (or ``socket.gaierror`` for a lookup) before the call
is made, instead of letting the code wait on a packet the network drops. It also
remembers which hostname each address came from, so notices can name hosts.

Advisory only: the network (nftables, NetworkPolicy) is the enforcer. The guard never
allows anything the network blocks, and user code that disables it gains nothing.

The kernel does not believe the guard (it runs next to the code it watches, so its reports
could be forged). So that a refused connection still gets a notice the kernel can verify,
the guard lets the network see the attempt: one packet to the same destination (a SYN it
abandons at once, or an empty datagram), which the enforcer refuses and logs. The record
names that packet's source port (``attempt``), so the kernel counts the two reports once.
Standard library only (runs inside the sandbox).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import sys
import threading
from typing import Callable

from .protocol import BlockedRecord, ProcessInfo, blocked_record

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

#: set to False to turn the guard off (enforcement does not change)
enabled = True
#: the guard's own witness packet is being sent (this thread): the hook lets it through
_witnessing = threading.local()


class Guard:
    """Decides, advisorily, whether the policy allows a destination; reports refusals."""

    def __init__(self, report: Callable[[BlockedRecord], None],
                 reached: Callable[[BlockedRecord], None] | None = None):
        self._report = report
        self._reached = reached  # learn mode: connections let through, when the policy asks
        self._policy: dict = {"mode": "deny", "label": "default-deny", "allow": [], "blocked": []}
        self._blocked: list = []
        self._allow: list = []
        self._resolved: dict[str, str] = {}  # ip -> hostname
        self._lock = threading.Lock()

    # -- configuration (reader thread) ------------------------------------------------
    def set_policy(self, policy: dict) -> None:
        if not isinstance(policy, dict):
            return
        blocked, allow = [], []
        for cidr in policy.get("blocked") or []:
            try:
                blocked.append(ipaddress.ip_network(str(cidr), strict=False))
            except ValueError:
                continue
        for entry in policy.get("allow") or []:
            if not isinstance(entry, dict):
                continue
            kind, value = entry.get("kind"), str(entry.get("value", ""))
            ports = [tuple(p) for p in entry.get("ports") or [] if isinstance(p, (list, tuple)) and len(p) == 2]
            proto = entry.get("protocol")
            if kind == "cidr":
                try:
                    allow.append(("cidr", ipaddress.ip_network(value, strict=False), ports, proto))
                except ValueError:
                    continue
            elif kind in ("domain", "wildcard"):
                allow.append((kind, value.lower().rstrip("."), ports, proto))
        with self._lock:
            self._policy, self._blocked, self._allow = policy, blocked, allow

    @property
    def label(self) -> str:
        return str(self._policy.get("label") or self._policy.get("mode") or "default-deny")

    def host_of(self, ip: str) -> str | None:
        return self._resolved.get(ip)

    # -- decisions --------------------------------------------------------------------
    def _matches_host(self, kind: str, value: str, host: str | None) -> bool:
        if not host:
            return False
        host = host.lower().rstrip(".")
        if kind == "domain":
            return host == value
        head, _, rest = host.partition(".")
        return bool(head) and rest == value

    def allows(self, ip: str, port: int | None, proto: str, host: str | None = None) -> bool:
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return True  # not an IP destination (unix socket path etc.)
        if getattr(addr, "ipv4_mapped", None):
            addr = addr.ipv4_mapped
        if any(addr in net for net in LOOPBACK):
            return True
        if any(addr.version == net.version and addr in net for net in self._blocked):
            return False
        policy = self._policy
        if policy.get("mode") != "allowlist":
            return False
        if port == 53 and str(addr) == policy.get("resolver"):
            return True
        host = host or self._resolved.get(str(addr))
        resolved = policy.get("resolved") or {}
        for kind, value, ports, entry_proto in self._allow:
            if entry_proto and entry_proto != proto:
                continue
            if ports and (port is None or not any(lo <= port <= hi for lo, hi in ports)):
                continue
            if kind == "cidr":
                if addr.version == value.version and addr in value:
                    return True
            elif self._matches_host(kind, value, host) or str(addr) in (resolved.get(value) or []):
                return True
        return False

    def lookup_allowed(self, host: str) -> bool:
        policy = self._policy
        if policy.get("mode") != "allowlist":
            return False
        if any(kind == "cidr" for kind, *_ in self._allow):
            return True  # a name may resolve into an allowed range: judge at connect time
        return any(self._matches_host(kind, value, host) for kind, value, *_ in self._allow
                   if kind in ("domain", "wildcard"))

    def remember(self, host: str, results) -> None:
        """Record which hostname each resolved address belongs to (for notices)."""
        try:
            for *_, sockaddr in results:
                if len(self._resolved) > 4096:
                    self._resolved.clear()
                self._resolved[str(sockaddr[0])] = host
        except (TypeError, ValueError, IndexError):
            pass

    # -- the audit hook ----------------------------------------------------------------
    def audit(self, event: str, args: tuple) -> None:
        __tracebackhide__ = True  # noqa: F841 - IPython leaves the guard's frames out of tracebacks
        if event not in ("socket.connect", "socket.sendto", "socket.getaddrinfo") or not enabled:
            return
        if getattr(_witnessing, "active", False):
            return
        if event == "socket.getaddrinfo":
            host = args[0]
            if isinstance(host, bytes):
                host = host.decode("ascii", "replace")
            if not isinstance(host, str) or not host or _is_literal(host) or host == "localhost":
                return
            if self.lookup_allowed(host):
                return
            port = args[1] if isinstance(args[1], int) else _int(args[1])
            proto = "udp" if args[3] == socket.SOCK_DGRAM else "tcp"
            self._refuse(host, None, port, proto, lookup=True)
            return
        sock, address = args[0], args[1]
        if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
            return
        if not isinstance(address, tuple) or len(address) < 2:
            return
        ip, port = str(address[0]), address[1]
        proto = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
        if not _is_literal(ip):
            return  # connect() with a name: the getaddrinfo event covers it
        if self.allows(ip, port, proto):
            if self._reached is not None and self._policy.get("report_allowed"):
                self._tell_reached(ip, port, proto)
            return
        self._refuse(self._resolved.get(ip), ip, port, proto)

    def _tell_reached(self, ip: str, port, proto: str) -> None:
        """Learn mode on a backend whose enforcer cannot see allowed connections."""
        try:
            addr = ipaddress.ip_address(ip.split("%", 1)[0])
            if any(addr in net for net in LOOPBACK) or (port == 53 and str(addr) == self._policy.get("resolver")):
                return
            self._reached(blocked_record(host=self._resolved.get(ip), ip=ip, port=port, protocol=proto,
                                         verdict="allowed", process=_this_process()))
        except Exception:  # noqa: BLE001 - reporting must never change the outcome
            pass

    def _refuse(self, host, ip, port, proto, lookup: bool = False) -> None:
        __tracebackhide__ = True  # noqa: F841
        attempt = witness(ip, port, proto) if ip is not None and isinstance(port, int) else None
        record = blocked_record(host=host, ip=ip, port=port, protocol=proto, verdict="guarded",
                                process=_this_process(), attempt=attempt)
        try:
            self._report(record)
        except Exception:  # noqa: BLE001 - reporting must never change the outcome
            pass
        where = f"{host or ip}:{port}" if port is not None else str(host or ip)
        message = (f"egress to {where} ({proto}) is blocked by the sandbox policy "
                   f"({self.label})")
        if lookup:
            raise socket.gaierror(socket.EAI_NONAME, f"DNS lookup refused: {message}")
        raise ConnectionRefusedError(errno.ECONNREFUSED, message)


def witness(ip: str, port: int, proto: str) -> str | None:
    """Send the one packet that lets the enforcer see a refused attempt: a SYN abandoned at
    once (non-blocking connect, then close) or an empty datagram. Returns the attempt's id
    as the enforcer's log names it (``tcp:<source port>``), None when it has none."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    _witnessing.active = True
    try:
        with socket.socket(family, kind) as sock:
            sock.setblocking(False)
            if kind == socket.SOCK_DGRAM:
                try:
                    sock.sendto(b"", (ip, port))
                except OSError:
                    pass  # EPERM: the rules refused it, which is what was to be logged
                return None
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            source = sock.getsockname()[1]
            sock.connect_ex((ip, port))
            return f"tcp:{source}"
    except OSError:
        return None
    finally:
        _witnessing.active = False


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        return False


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _this_process() -> ProcessInfo:
    return {"name": _process_name(), "pid": os.getpid()}


def _process_name() -> str:
    try:
        with open("/proc/self/comm") as f:
            return f.read().strip() or "python"
    except OSError:
        return os.path.basename(sys.executable) or "python"


def install(guard: Guard) -> None:
    """Install the audit hook and the hostname recorder (called once by the agent)."""
    sys.addaudithook(guard.audit)
    original = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        results = original(host, *args, **kwargs)
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if isinstance(host, str) and not _is_literal(host):
            guard.remember(host, results)
        return results

    getaddrinfo.__wrapped__ = original  # type: ignore[attr-defined]
    getaddrinfo.__doc__ = original.__doc__
    socket.getaddrinfo = getaddrinfo
