"""Read the packets a sandbox's nftables rules logged (NFLOG) — the enforcer's own record.

nftables ``log group N`` hands each refused packet to netlink (NETLINK_NETFILTER,
subsystem ULOG); a plain ``log`` would go to the kernel log, which is silent inside a
network namespace. The listening socket must be created inside the sandbox's namespace,
so :func:`open_in_netns` enters it in a short-lived thread (``setns`` is per thread).

Only the first bytes of each packet are copied: enough for the IP and transport headers.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

from .netns import in_netns

NETLINK_NETFILTER = 12
NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_NLBUFSIZ = 3
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_UID = 11
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NLMSG_ERROR = 2
COPY_RANGE = 96


@dataclass(frozen=True)
class LoggedPacket:
    """One packet the sandbox's rules refused."""

    prefix: str
    family: int  # 4 or 6
    protocol: str  # tcp | udp | icmp | icmpv6 | other
    src: str
    dst: str
    sport: int | None
    dport: int | None
    uid: int | None
    at: float


def _nlmsg(msg_type: int, flags: int, payload: bytes, seq: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), msg_type, flags, seq, 0) + payload


def _attr(kind: int, data: bytes) -> bytes:
    length = 4 + len(data)
    return struct.pack("=HH", length, kind) + data + b"\0" * ((4 - length % 4) % 4)


def _config(group: int, attr: bytes, family: int = socket.AF_UNSPEC) -> bytes:
    # nfgenmsg: family, version, res_id (the group, big endian)
    nfgen = struct.pack("=BBH", family, 0, socket.htons(group))
    return _nlmsg((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, nfgen + attr)


def open_in_netns(netns_path: str, group: int) -> socket.socket:
    """A netlink socket, in the namespace at ``netns_path``, bound to NFLOG ``group``.

    Called by the local backend when a sandbox starts. The returned socket is
    non-blocking; read it with :func:`parse`.
    """
    return in_netns(netns_path, lambda: open_here(group))


def config_messages(group: int) -> list[bytes]:
    """The netlink messages that bind a socket to NFLOG ``group`` and set how it delivers, each
    to be acknowledged (:func:`open_here`; the rootless backend's helper sends the same)."""
    mode = struct.pack(">IB", COPY_RANGE, NFULNL_COPY_PACKET) + b"\0"
    return [
        _config(group, _attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))),
        _config(group, _attr(NFULA_CFG_MODE, mode)),
        # deliver every packet at once: by default the kernel batches them for up to 1 s
        _config(group, _attr(NFULA_CFG_QTHRESH, struct.pack(">I", 1))),
        _config(group, _attr(NFULA_CFG_TIMEOUT, struct.pack(">I", 0))),
    ]


def open_here(group: int) -> socket.socket:
    """:func:`open_in_netns` for the calling thread's own namespace."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, 0))
        for message in config_messages(group):
            sock.send(message)
            _expect_ack(sock)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def _expect_ack(sock: socket.socket) -> None:
    data = sock.recv(65536)
    _, msg_type = struct.unpack_from("=IH", data)
    if msg_type == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", data, 16)
        if code != 0:
            raise OSError(-code, f"NFLOG configuration refused: {os.strerror(-code)}")


def parse(data: bytes) -> list[LoggedPacket]:
    """Decode the NFLOG packet messages in one netlink read."""
    out: list[LoggedPacket] = []
    offset = 0
    while offset + 16 <= len(data):
        length, msg_type = struct.unpack_from("=IH", data, offset)
        if length < 16 or offset + length > len(data):
            break
        if msg_type == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            packet = _packet(data[offset + 20 : offset + length])
            if packet is not None:
                out.append(packet)
        offset += (length + 3) & ~3
    return out


def _packet(attrs: bytes) -> LoggedPacket | None:
    prefix, payload, uid = "", b"", None
    pos = 0
    while pos + 4 <= len(attrs):
        length, kind = struct.unpack_from("=HH", attrs, pos)
        if length < 4:
            break
        value = attrs[pos + 4 : pos + length]
        kind &= 0x7FFF
        if kind == NFULA_PREFIX:
            prefix = value.rstrip(b"\0").decode("ascii", "replace")
        elif kind == NFULA_PAYLOAD:
            payload = value
        elif kind == NFULA_UID and len(value) >= 4:
            (uid,) = struct.unpack(">I", value[:4])
        pos += (length + 3) & ~3
    return _decode_ip(payload, prefix, uid)


_PROTOCOLS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 132: "sctp"}


def _decode_ip(payload: bytes, prefix: str, uid: int | None) -> LoggedPacket | None:
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        ihl = (payload[0] & 0x0F) * 4
        proto = payload[9]
        src = str(ipaddress.IPv4Address(payload[12:16]))
        dst = str(ipaddress.IPv4Address(payload[16:20]))
        transport = payload[ihl:]
    elif version == 6 and len(payload) >= 40:
        proto = payload[6]
        src = str(ipaddress.IPv6Address(payload[8:24]))
        dst = str(ipaddress.IPv6Address(payload[24:40]))
        transport = payload[40:]
    else:
        return None
    sport = dport = None
    if proto in (6, 17, 132) and len(transport) >= 4:
        sport, dport = struct.unpack(">HH", transport[:4])
    return LoggedPacket(prefix=prefix, family=version, protocol=_PROTOCOLS.get(proto, "other"),
                        src=src, dst=dst, sport=sport, dport=dport, uid=uid, at=time.time())


class LogReader:
    """Reads an NFLOG socket in a thread of the kernel and hands what it made of each read to
    the event loop: the local backend's fallback when its reader process (enforcerlog.py) cannot
    run. A thread rather than an event-loop reader, so the per-packet work (``on_packets``: naming
    the sender) does not wait for a busy loop — though it does wait for the kernel's GIL.

    ``deliver`` is called on ``loop`` for each item, in order; :meth:`drain` (on the loop)
    delivers everything logged so far at once (a cell's end).
    """

    def __init__(self, sock: socket.socket, loop, on_packets, deliver, log):
        self._sock = sock
        self._loop = loop
        self._on_packets = on_packets
        self._deliver = deliver
        self._log = log
        self._lock = threading.Lock()
        self._pending: list = []
        self._stopped = threading.Event()
        sock.settimeout(0.2)  # the thread looks at _stopped this often
        self._thread = threading.Thread(target=self._run, name="sandbox-nflog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                data = self._sock.recv(1 << 16)
            except (TimeoutError, socket.timeout, InterruptedError):
                continue
            except OSError as err:  # ENOBUFS: the kernel dropped log messages; keep reading
                if self._stopped.is_set() or err.errno == 9:  # EBADF: closed
                    return
                self._log.debug("NFLOG read: %s", err)
                continue
            self._take(data)
            try:
                self._loop.call_soon_threadsafe(self._flush)
            except RuntimeError:  # the loop is closed: the kernel is going away
                return

    def _take(self, data: bytes) -> None:
        with self._lock:
            try:
                self._pending.extend(self._on_packets(parse(data)))
            except Exception:  # noqa: BLE001 - one bad read must not end the reader
                self._log.warning("NFLOG packet handling failed", exc_info=True)

    def _flush(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for item in items:
            self._deliver(item)

    def drain(self) -> None:
        """Deliver what was logged up to now, including reads the thread has not made yet."""
        with self._lock:
            while True:
                try:
                    data = self._sock.recv(1 << 16, socket.MSG_DONTWAIT)
                except OSError:
                    break
                try:
                    self._pending.extend(self._on_packets(parse(data)))
                except Exception:  # noqa: BLE001
                    self._log.warning("NFLOG packet handling failed", exc_info=True)
        self._flush()

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(1)
        self._sock.close()
