"""Which process in a sandbox sent a packet the enforcer refused: the "from …" of its notice.

The NFLOG record names addresses and ports, not processes. Called by the local backend's NFLOG
reader thread for each refused packet, at once (the process may end soon after), from the host:
the kernel runs as root and sees the sandbox's processes in /proc. In this order:

1. a snapshot of the sockets the sandbox's processes hold (``socket:[inode]`` links in their
   ``fd`` directories, the kind from the fd's ``system.sockprotoname``) and who they are — taken
   first, because it is fast and the process may be gone a moment later;
2. the socket of the packet, looked up exactly by its four addresses and ports through
   NETLINK_SOCK_DIAG in the sandbox's namespace (:class:`SocketDiag`; microseconds, unlike reading
   ``/proc/net/tcp``, which walks the host's whole connection table): found for a connection still
   waiting (dropped TCP, SYN_SENT) and for any UDP socket still open, refused or dropped;
3. a datagram whose socket is in the snapshot but no longer open when step 2 looks (the sender
   exited at once: under ``drop`` its ``sendto`` fails with EPERM, the rules' verdict, and a
   program that gives up then closes the socket within a millisecond or two): the one process
   whose UDP socket closed in between is named;
4. a TCP connect refused by a reset leaves its socket closed, out of every table (its port is
   released at once), but still open in the process until it closes it: then the process that
   holds TCP sockets is the one; if several do, the sockets in the tables are left out
   (``/proc/<pid>/net/tcp*``, slow, read only then) and the youngest remaining process is named.

A process that has already closed the socket (or exited) before step 1 cannot be named: the
notice then says no process. Pids are the sandbox's own (as ``ps`` in a cell shows them).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from pathlib import Path

from .netns import in_netns

_TABLES = {"tcp": ("tcp", "tcp6"), "udp": ("udp", "udp6")}


def sandbox_pids(cgroup_dirs, netns_path: str | None) -> list[int]:
    """The processes of a sandbox: its cgroup's members, else every process in its netns.

    One controller's list is enough: the backend puts the sandbox's first process in each of its
    cgroups, and children inherit them all. Reading one (of cgroup v1's several) halves the time
    this takes, and it runs while the sender may be about to close its socket."""
    pids: set[int] = set()
    for directory in cgroup_dirs:
        try:
            pids = {int(p) for p in Path(directory, "cgroup.procs").read_text().split()}
        except (OSError, ValueError):
            continue
        if pids:
            break
    if pids or netns_path is None:
        return sorted(pids)
    try:
        target = os.stat(netns_path).st_ino
    except OSError:
        return []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}/ns/net").st_ino == target:
                    pids.add(int(name))
            except OSError:
                continue
    return sorted(pids)


def _local_endpoint(text: str) -> tuple[str, int]:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = ipaddress.IPv4Address(struct.pack("<I", struct.unpack(">I", raw)[0]))
    else:
        ip = ipaddress.IPv6Address(struct.pack("<4I", *struct.unpack(">4I", raw)))
        ip = ip.ipv4_mapped or ip
    return str(ip), int(port, 16)


def _table_inodes(pid: int, protocol: str) -> dict[str, tuple[str, int]]:
    """inode -> local (ip, port) of every socket of ``protocol`` in the namespace of ``pid``."""
    found: dict[str, tuple[str, int]] = {}
    for table in _TABLES.get(protocol, ()):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 9 and fields[9] != "0":
                        found[fields[9]] = _local_endpoint(fields[1])
        except (OSError, ValueError):
            continue
    return found


def _sockets_of(pid: int) -> list[tuple[str, str]]:
    """(inode, fd path) of each socket ``pid`` holds."""
    out = []
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.append((link[8:-1], f"{fd_dir}/{fd}"))
    return out


def _describe(pid: int) -> dict | None:
    """{name, pid} with the pid as the sandbox sees it (innermost pid namespace)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    name = fields.get("Name", "").strip()
    nspids = fields.get("NSpid", "").split()
    inner = int(nspids[-1]) if nspids and nspids[-1].isdigit() else pid
    return {"name": name or None, "pid": inner}


def _start_time(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return -1


NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
_PROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


class SocketDiag:
    """Exact socket lookups (inet_diag) in one sandbox's network namespace.

    Opened by the local backend when a sandbox starts (the netlink socket must be created inside
    the namespace); used by one reader of the enforcer's log at a time (enforcerlog.py).
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.settimeout(0.5)
        self._seq = 0

    @classmethod
    def open(cls, netns_path: str) -> "SocketDiag":
        """A lookup socket in the namespace at ``netns_path`` (the local backend, at start)."""
        return cls(in_netns(netns_path, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)))

    @classmethod
    def from_fd(cls, fd: int) -> "SocketDiag":
        """The socket the backend opened, passed to the enforcer log reader (enforcerlog.py)."""
        return cls(socket.socket(fileno=fd))

    def inode(self, protocol: str, src: str, sport: int, dst: str, dport: int) -> str | None:
        """The inode of the socket sending ``src:sport → dst:dport``, or None (none open)."""
        proto = _PROTO.get(protocol)
        if proto is None:
            return None
        family = socket.AF_INET6 if ":" in src else socket.AF_INET
        if proto == socket.IPPROTO_UDP:
            # udp_diag looks the socket up as a receiver would: "source" is the far end
            src, sport, dst, dport = dst, dport, src, sport
        pad = lambda ip: socket.inet_pton(family, ip).ljust(16, b"\0")  # noqa: E731
        sockid = (struct.pack(">HH", sport, dport) + pad(src) + pad(dst)
                  + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF))
        request = struct.pack("=BBBBI", family, proto, 0, 0, 0xFFFFFFFF) + sockid
        self._seq += 1
        header = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, 1, self._seq, 0)  # NLM_F_REQUEST
        try:
            self.sock.send(header + request)
            while True:
                data = self.sock.recv(8192)
                _, kind, _, seq, _ = struct.unpack_from("=IHHII", data)
                if seq != self._seq:
                    continue  # an answer to an earlier lookup that timed out
                if kind == NLMSG_ERROR or len(data) < 16 + 72:
                    return None  # ENOENT: no such socket (closed, or never bound)
                (inode,) = struct.unpack_from("=I", data, 16 + 68)
                return str(inode) if inode else None
        except (OSError, struct.error, ValueError):
            return None

    def close(self) -> None:
        self.sock.close()


def _kind(path: str) -> str:
    try:
        return os.getxattr(path, "system.sockprotoname").rstrip(b"\0").decode("ascii", "replace")
    except OSError:
        return ""


def owner(pids: list[int], protocol: str, src: str, sport: int | None, dst: str | None = None,
          dport: int | None = None, diag: SocketDiag | None = None) -> dict | None:
    """The process of ``pids`` that sent a ``protocol`` packet ``src:sport → dst:dport``, or None."""
    if not pids or sport is None or protocol not in _TABLES:
        return None
    kinds = ("TCP", "TCPv6") if protocol == "tcp" else ("UDP", "UDPv6")
    held: dict[int, list[tuple[str, str]]] = {}  # pid -> (inode, fd path) of its sockets of this protocol
    who: dict[int, dict | None] = {}
    for pid in pids:
        for inode, path in _sockets_of(pid):
            if _kind(path) in kinds:
                held.setdefault(pid, []).append((inode, path))
        if pid in held:
            who[pid] = _describe(pid)
    if not held:
        return None
    if diag is not None and dst is not None and dport is not None:
        inode = diag.inode(protocol, src, sport, dst, dport)
        if inode is not None:
            return next((who[pid] for pid, socks in held.items() if any(i == inode for i, _ in socks)), None)
        if protocol == "udp":
            # the datagram's socket is open no more, yet was a moment ago, in the snapshot above:
            # a sender that exits at once (a drop makes sendto fail with EPERM, and a datagram
            # needs no answer). The one process whose UDP socket closed since then sent it.
            closed = [pid for pid, socks in held.items() if any(not _still_open(path, i) for i, path in socks)]
            if len(closed) == 1:
                return who[closed[0]]
    if len(held) == 1 and protocol == "tcp":
        return next(iter(who.values()))
    table: dict[str, tuple[str, int]] = {}
    for pid in pids:  # any live process of the namespace shows its tables
        if os.path.exists(f"/proc/{pid}"):
            table = _table_inodes(pid, protocol)
            break
    for pid, socks in held.items():
        if any(table.get(i, ("", -1))[1] == sport and table[i][0] in (src, "0.0.0.0", "::") for i, _ in socks):
            return who[pid]
    if protocol != "tcp":
        return None
    closed = [pid for pid, socks in held.items() if any(i not in table for i, _ in socks)]
    return who[max(closed, key=_start_time)] if closed else None


def _still_open(path: str, inode: str) -> bool:
    """Whether the descriptor at ``path`` (``/proc/<pid>/fd/<n>``) still holds socket ``inode``."""
    try:
        return os.readlink(path) == f"socket:[{inode}]"
    except OSError:
        return False
