"""The watcher: connections stuck in SYN_SENT are reported as ``dropped``.

A packet dropped by a NetworkPolicy looks like a hang to the code that sent it. Every
:data:`INTERVAL` seconds the watcher reads ``/proc/net/tcp`` and ``/proc/net/tcp6`` (the
sandbox's own network namespace), and a socket still in SYN_SENT after ``threshold``
seconds is reported once, with the process that owns it (socket inode → pid → command).
Works for any language and any subprocess. Standard library only.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import struct
import threading
import time
from typing import Callable

from .protocol import BlockedRecord, ProcessInfo, blocked_record

INTERVAL = 0.1
SYN_SENT = "02"

#: set to False to pause the watcher (benchmarks measure its cost this way)
enabled = True


def _decode_addr(text: str) -> tuple[str, int]:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = str(ipaddress.IPv4Address(struct.pack("<I", struct.unpack(">I", raw)[0])))
    else:
        # four 32-bit words, each in host (little-endian) order
        words = struct.unpack(">4I", raw)
        ip = ipaddress.IPv6Address(struct.pack("<4I", *words))
        ip = str(ip.ipv4_mapped or ip)
    return ip, int(port, 16)


def syn_sent(paths=("/proc/net/tcp", "/proc/net/tcp6")) -> dict[str, tuple[str, int]]:
    """inode -> (remote ip, remote port) of every socket in SYN_SENT."""
    found: dict[str, tuple[str, int]] = {}
    for path in paths:
        try:
            with open(path) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == SYN_SENT:
                        found[fields[9]] = _decode_addr(fields[2])
        except OSError:
            continue
    return found


def active_opens(path: str = "/proc/net/snmp") -> int | None:
    """The namespace's count of TCP connects so far (cheap to read, unlike /proc/net/tcp,
    whose every read walks the kernel's whole connection hash table)."""
    try:
        with open(path) as f:
            rows = [line.split() for line in f if line.startswith("Tcp:")]
        header, values = rows[0], rows[1]
        return int(values[header.index("ActiveOpens")])
    except (OSError, IndexError, ValueError):
        return None


def owner_of(inode: str) -> ProcessInfo | None:
    """The process holding socket ``inode`` (name and pid), if it can be seen."""
    target = f"socket:[{inode}]"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            for fd in os.listdir(fd_dir):
                try:
                    if os.readlink(f"{fd_dir}/{fd}") == target:
                        with open(f"/proc/{pid}/comm") as f:
                            return {"name": f.read().strip(), "pid": int(pid)}
                except OSError:
                    continue
        except OSError:
            continue
    return None


class Watcher(threading.Thread):
    """Reports sockets stuck in SYN_SENT longer than ``threshold`` seconds."""

    def __init__(self, report: Callable[[BlockedRecord], None], threshold: float = 0.5,
                 host_of: Callable[[str], str | None] = lambda ip: None):
        super().__init__(name="sandbox-netwatch", daemon=True)
        self._report = report
        self.threshold = threshold
        self._host_of = host_of
        self._first_seen: dict[str, float] = {}
        self._reported: set[str] = set()
        self._opens: int | None = None

    def run(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        while True:
            time.sleep(INTERVAL)
            if not enabled:
                continue
            try:
                self.scan()
            except Exception:  # noqa: BLE001 - the watcher must never take the agent down
                continue

    def scan(self) -> None:
        opens = active_opens()
        if opens is not None and opens == self._opens and not self._first_seen:
            return  # no connect since the last look and nothing pending: nothing to find
        self._opens = opens
        now = time.time()
        current = syn_sent()
        for inode in list(self._first_seen):
            if inode not in current:
                del self._first_seen[inode]
                self._reported.discard(inode)
        for inode, (ip, port) in current.items():
            first = self._first_seen.setdefault(inode, now)
            if inode in self._reported or now - first < self.threshold:
                continue
            self._reported.add(inode)
            self._report(blocked_record(host=self._host_of(ip), ip=ip, port=port, protocol="tcp",
                                        verdict="dropped", process=owner_of(inode),
                                        first_seen=first, last_seen=now))

