"""The local sandbox's enforcer: its nftables table, and the log of what the table refuses.

:func:`compile_ruleset` resolves a policy's domains and compiles the table
(:func:`~sandbox_kernel.policy.compile_nftables.compile_nftables`); :class:`NftTable` puts it
in force in the sandbox's network namespace in one ``nft -f`` transaction (all or nothing),
keeping the addresses the DNS proxy opened for wildcard entries. The table's output chain
drops everything that is not loopback or allowed by the policy; refused TCP gets a reset and
everything else an ICMP "administratively prohibited" (or silence with ``refuse_with =
"drop"``), and each refused packet is logged to NFLOG.

:class:`EnforcerLog` reads that log — in a reader process of its own (enforcerlog.py), else
in a thread of the kernel (nflog.py) — and names the sandbox process that sent each packet
(sockowner.py); :func:`enforcer_record` makes a packet a blocked-connection record.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from ...agent.protocol import BlockedRecord, blocked_record
from ...errors import PolicyError
from ...policy.compile_nftables import compile_nftables
from ...policy.resolve import resolve_policy
from . import nflog, sockowner
from .enforcerlog import EnforcerLogProcess
from .layout import NFT_TABLE, SANDBOX_RESOLVER, run

#: most lookups of a refused packet's sender a second (sockowner.py); beyond, notices name no process
OWNER_LOOKUPS_PER_S = 200


def default_blocked() -> list[str]:
    """The default ceiling's always-blocked networks (when the kernel set none)."""
    from ...policy.enforcers import default_always_blocked

    return [str(net) for net in default_always_blocked()]


def add_elements_script(by_set: dict[str, Any]) -> str:
    """The nft commands that add addresses to the table's sets (set name -> addresses)."""
    return "".join(f"add element inet {NFT_TABLE} {name} {{ {', '.join(sorted(set(addrs)))} }}\n"
                   for name, addrs in sorted(by_set.items()) if addrs)


def compile_ruleset(policy: Any, *, screen: Any, always_blocked: list[str], upstream_dns: str | None,
                    nflog_group: int, refuse_with: str, log_accepted: bool, log) -> tuple[str, dict]:
    """Resolve the policy's domains (allowlist mode) and compile the nftables script; also
    what it opened (the details :attr:`Backend.applied` shows)."""
    resolved: dict[str, list[str]] = {}
    screened: list[tuple[str, str, str]] = []
    expires_at = None
    if policy is not None and policy.mode == "allowlist" and policy.domains():
        resolution = resolve_policy(policy, resolver=upstream_dns or None)
        resolved, screened = screen.split(resolution.addresses)
        expires_at = resolution.expires_at
        if resolution.errors:
            log.warning("could not resolve %s", ", ".join(sorted(resolution.errors)))
        for name, address, why in screened:
            log.warning("not opening %s for %s: %s", address, name, why)
    ruleset = compile_nftables(
        policy, table=NFT_TABLE, resolved=resolved, resolver=SANDBOX_RESOLVER,
        always_blocked=always_blocked, nflog_group=nflog_group,
        refuse_with=refuse_with, log_accepted=log_accepted, screen=screen,
    )
    return ruleset, {"resolved": resolved, "expires_at": expires_at, "resolver": SANDBOX_RESOLVER,
                     "screened": [{"host": n, "ip": a, "why": w} for n, a, w in screened]}


class NftTable:
    """The sandbox's table, changed with ``nft`` run through ``enter`` (the argv prefix that
    runs a command in the sandbox's network namespace with the rights to change it).
    Blocking methods: called from worker threads."""

    def __init__(self, enter: list[str]):
        self.enter = enter
        #: wildcard set name -> addresses the DNS proxy opened in it
        self.learned: dict[str, set[str]] = {}

    def apply(self, compiled: tuple[str, dict]) -> dict[str, Any]:
        """Replace the whole table in one ``nft -f`` transaction: all or nothing. Returns
        what is in force (PolicyError, with the old table in force, when nft refuses)."""
        ruleset, details = compiled
        # a wildcard's addresses learned from DNS answers stay open while the wildcard is in
        # the policy (every packet is judged by the new ruleset: without them a re-apply
        # would cut its open connections); a revoked wildcard's set is gone, and so are they
        self.learned = {name: addrs for name, addrs in self.learned.items()
                        if f"\tset {name} {{" in ruleset}
        ruleset += add_elements_script(self.learned)
        started = time.monotonic()
        result = run([*self.enter, "nft", "-f", "-"], input=ruleset, check=False)
        if result.returncode != 0:
            raise PolicyError(f"nftables refused the ruleset; the previous one stays in force: "
                              f"{result.stderr.strip()}")
        return {"enforcer": "nftables", "applied_at": time.time(),
                "apply_ms": round((time.monotonic() - started) * 1000, 1), **details}

    def add_addresses(self, elements: list[tuple[str, str]]) -> None:
        """Open addresses a wildcard's names resolved to ((set name, address) pairs)."""
        by_set: dict[str, list[str]] = {}
        for set_name, address in elements:
            by_set.setdefault(set_name, []).append(address)
        script = add_elements_script(by_set)
        result = run([*self.enter, "nft", "-f", "-"], input=script, check=False)
        if result.returncode != 0:
            raise PolicyError(f"nftables refused {script.strip()!r}: {result.stderr.strip()}")
        for name, addrs in by_set.items():
            self.learned.setdefault(name, set()).update(addrs)


def enforcer_record(packet: nflog.LoggedPacket, verdict: str = "rejected") -> BlockedRecord | None:
    """A logged packet as a blocked-connection record, or None for link-local noise
    (neighbour discovery, multicast) that no code asked for."""
    if packet.protocol == "icmpv6" or packet.dst.startswith(("ff", "224.", "239.")):
        return None
    return blocked_record(
        ip=packet.dst, port=packet.dport, protocol=packet.protocol, verdict=verdict, first_seen=packet.at,
        # a TCP attempt is one source port (retransmitted SYNs repeat it); UDP counts datagrams
        attempt=f"{packet.protocol}:{packet.sport}" if packet.protocol == "tcp" else None,
    )


class EnforcerLog:
    """The packets one sandbox's rules log, each with the sandbox process that sent it, handed
    to ``deliver(packet, process)`` on the event loop in order.

    ``ns`` is the sandbox's :class:`~sandbox_kernel.backends.local.rootless.RootlessNamespaces`
    (rootless mode: the sockets are made inside them) or None; ``cgroup_dirs`` its cgroups
    (root mode), which name its processes. Opened and closed by the local backend, on the loop.
    """

    def __init__(self, *, sandbox_id: str, netns_path: str, nflog_group: int, ns: Any, cgroup_dirs: list[str],
                 deliver: Callable[[nflog.LoggedPacket, dict | None], None], log):
        self._sandbox_id = sandbox_id
        self._netns_path = netns_path
        self._nflog_group = nflog_group
        self._ns = ns
        self._cgroup_dirs = cgroup_dirs
        self._deliver = deliver
        self._log = log
        self._reader: EnforcerLogProcess | nflog.LogReader | None = None
        self._sock = None
        self._diag: sockowner.SocketDiag | None = None
        #: (protocol, src, sport) -> (when, process) of refused packets' senders, and the lookup budget
        self._owners: dict[tuple, tuple[float, dict | None]] = {}
        self._owner_budget: tuple[float, int] = (0.0, 0)

    def open(self) -> None:
        """Start reading (the reader process, else a thread of the kernel); a log that cannot
        be opened is a warning: the sandbox runs without enforcer notices."""
        try:
            if self._ns is not None:
                (sock,) = self._ns.sockets("nflog", str(self._nflog_group), count=1)
            else:
                sock = nflog.open_in_netns(self._netns_path, self._nflog_group)
        except OSError as err:
            self._log.warning("no enforcer log for sandbox %s: %s", self._sandbox_id, err)
            return
        diag = None
        try:
            if self._ns is not None:
                diag = sockowner.SocketDiag(self._ns.sockets("diag", count=1)[0])
            else:
                diag = sockowner.SocketDiag.open(self._netns_path)
        except OSError as err:  # senders are then found from /proc/net alone (slower)
            self._log.warning("no socket lookups in sandbox %s: %s", self._sandbox_id, err)
        self._sock, self._diag = sock, diag
        try:
            self._reader = EnforcerLogProcess(sock, diag.sock if diag else None, self._netns_path,
                                              self._cgroup_dirs, asyncio.get_running_loop(), self._deliver,
                                              self._read_here, self._log)
        except OSError as err:
            self._log.warning("no enforcer log reader process for sandbox %s: %s", self._sandbox_id, err)
            self._read_here()

    async def wait_ready(self) -> None:
        """Wait until the reader process runs (the backend, while the agent starts)."""
        if isinstance(self._reader, EnforcerLogProcess):
            await self._reader.wait_ready()

    def _read_here(self) -> None:
        """Read the enforcer's log in the kernel (a thread): the reader process could not run."""
        if self._sock is None:
            return
        self._reader = nflog.LogReader(self._sock, asyncio.get_running_loop(), self._with_senders,
                                       lambda item: self._deliver(*item), self._log)

    def _with_senders(self, packets: list[nflog.LoggedPacket]) -> list[tuple]:
        """Each packet of one NFLOG read with the process that sent it (in the reader's thread)."""
        pids = None
        items = []
        for packet in packets:
            if pids is None:  # once per read: the packets of one read come from the same moment
                pids = sockowner.sandbox_pids(self._cgroup_dirs, self._netns_path)
            items.append((packet, self._sender(packet, pids)))
        return items

    def _sender(self, packet: nflog.LoggedPacket, pids: list[int]) -> dict | None:
        """The sandbox process that sent a refused packet (sockowner.py), looked up at once: the
        process may close the socket soon. Retransmissions of one attempt reuse the first answer,
        and at most OWNER_LOOKUPS_PER_S lookups run a second (a flood of refusals stays cheap)."""
        now = time.monotonic()
        key = (packet.protocol, packet.src, packet.sport)
        cached = self._owners.get(key)
        if cached is not None and now - cached[0] < 10 and cached[1] is not None:
            return cached[1]
        window, count = self._owner_budget
        if now - window >= 1:
            window, count = now, 0
        if count >= OWNER_LOOKUPS_PER_S:
            return None
        self._owner_budget = (window, count + 1)
        found = sockowner.owner(pids, packet.protocol, packet.src, packet.sport, packet.dst, packet.dport,
                                diag=self._diag)
        if len(self._owners) > 1000:
            self._owners.clear()
        self._owners[key] = (now, found)
        return found

    def drain(self) -> None:
        """Deliver every packet already logged (a cell ended)."""
        if self._reader is not None:
            self._reader.drain()

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        diag, self._diag = self._diag, None
        if diag is not None:
            diag.sock.close()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
