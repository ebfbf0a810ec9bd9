"""The local sandbox's namespaces when the kernel does not run as root.

Used by the local backend (``backends/local/backend.py``) when ``c.LocalBackend.rootless`` is set.
An unprivileged process may create a user namespace and, owned by it, a network namespace;
inside them it is "root" for that network only. So:

1. a *holder* process (``unshare --user --map-root-user --net``) creates both and keeps them
   while the sandbox lives; it exits when the kernel closes its stdin (or dies);
2. the kernel runs ``ip`` and ``nft`` in them through ``nsenter --user --net
   --preserve-credentials`` (the user namespace's owner may enter it);
3. sockets the kernel serves from the host side (NFLOG, the DNS proxy's, socket lookups) are made
   inside by a short helper (:data:`_HELPER`, standard library only) and handed back over a
   socket pair: a multithreaded process cannot join a user namespace itself;
4. bubblewrap starts the agent from inside, with ``--unshare-user --disable-userns``: the code
   runs in a further user namespace with no capabilities, where it cannot touch the rules.

slirp4netns needs a tun device this user may open: ``/dev/net/tun`` when it is 0666 (most
distributions), else a node the administrator made for this user (``c.LocalBackend.tun_device``),
bound over ``/dev/net/tun`` for slirp4netns alone (:meth:`RootlessNamespaces.uplink_argv`).
Without either slirp4netns cannot attach; the namespace then gets a default
route into a veth pair that leads nowhere, so refused packets still cross the rules and are logged, and
only ``deny`` can be enforced.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from ...errors import SandboxStartError

#: the holder: report, then hold the namespaces until stdin closes
_HOLDER = "echo ready; read _"

#: the helper, run inside the namespaces with ``python -I -S`` (the standard library only: it
#: starts at every sandbox start): makes the sockets its JSON argument names, in this order —
#: NFLOG (bound by the given netlink messages, each acknowledged), the DNS proxy's UDP and TCP,
#: socket lookups (sock_diag) — and sends them over the descriptor ``fd``
_HELPER = r"""
import json, socket, struct, sys
spec = json.loads(sys.argv[1])
made = []
if spec["nflog"] is not None:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind((0, 0))
    for message in spec["nflog"]:
        s.send(bytes.fromhex(message))
        data = s.recv(65536)
        if struct.unpack_from("=H", data, 4)[0] == 2 and struct.unpack_from("=i", data, 16)[0] != 0:
            sys.exit(f"NFLOG configuration refused: error {-struct.unpack_from('=i', data, 16)[0]}")
    made.append(s)
if spec["dns"] is not None:
    address = tuple(spec["dns"])
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(address)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(address)
    tcp.listen(16)
    made += [udp, tcp]
if spec["diag"]:
    made.append(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 4))  # NETLINK_SOCK_DIAG
with socket.socket(fileno=spec["fd"]) as channel:
    socket.send_fds(channel, [b"s"], [s.fileno() for s in made])
"""


def tun_usable(device: str = "/dev/net/tun") -> bool:
    """Whether this process may open ``device`` (a tun node: slirp4netns needs one)."""
    return bool(device) and os.access(device, os.R_OK | os.W_OK)


class RootlessNamespaces:
    """A user namespace and a network namespace owned by the kernel's own user."""

    def __init__(self) -> None:
        self._holder: subprocess.Popen | None = None
        #: sockets made ahead by :meth:`prepare`, by kind
        self._ready: dict[str, list[socket.socket]] = {}

    @property
    def pid(self) -> int:
        assert self._holder is not None
        return self._holder.pid

    @property
    def net_path(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    @property
    def user_path(self) -> str:
        return f"/proc/{self.pid}/ns/user"

    def create(self) -> None:
        """Create the namespaces (blocking; called from a worker thread)."""
        try:
            self._holder = subprocess.Popen(
                ["unshare", "--user", "--map-root-user", "--net", "sh", "-c", _HOLDER],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as err:
            raise SandboxStartError(f"cannot create the sandbox's namespaces: {err}") from None
        assert self._holder.stdout and self._holder.stderr
        if self._holder.stdout.readline() != b"ready\n":
            err = self._holder.stderr.read().decode(errors="replace").strip()
            self.close()
            raise SandboxStartError(f"cannot create the sandbox's user and network namespaces: {err}")

    def enter(self) -> list[str]:
        """The argv prefix that runs a command as root of the namespaces."""
        return ["nsenter", f"--target={self.pid}", "--user", "--net", "--preserve-credentials"]

    def uplink_argv(self, slirp_argv: list[str], tun_device: str) -> list[str] | None:
        """How to start slirp4netns (``slirp_argv``: its options, without the namespace
        arguments) for these namespaces, or None when no tun device is usable.

        With ``/dev/net/tun`` open to this user, slirp4netns joins the namespaces itself. Else a
        tun node the administrator gave this user (``tun_device``, e.g. made with ``mknod … c 10
        200`` and owned by the Jupyter user) is bound over ``/dev/net/tun`` in a mount namespace
        of slirp4netns's own, inside the sandbox's user namespace."""
        target = ["--netns-type=path", self.net_path, "tap0"]
        if tun_usable():
            return [*slirp_argv, f"--userns-path={self.user_path}", *target]
        if tun_usable(tun_device):
            return [*self.enter()[:3], "--preserve-credentials", "unshare", "--mount", "sh", "-c",
                    'mount --bind "$1" /dev/net/tun && shift && exec "$@"', "sh", tun_device,
                    *slirp_argv, *target]
        return None

    def prepare(self, nflog_group: int) -> None:
        """Make every socket the kernel serves from inside in one helper run, at once (each run
        is a Python start). On failure each kind is made, and fails, on its own later."""
        try:
            made = self._make({"nflog": nflog_group, "dns": True, "diag": True}, count=4)
        except OSError:
            return
        self._ready = {"nflog": made[:1], "dns": made[1:3], "diag": made[3:]}

    def sockets(self, kind: str, *args: str, count: int) -> list[socket.socket]:
        """``count`` sockets made inside (``kind``: nflog GROUP | dns | diag), or ahead by
        :meth:`prepare`."""
        ready = self._ready.pop(kind, None)
        if ready is not None and len(ready) == count:
            return ready
        if kind not in ("nflog", "dns", "diag"):
            raise ValueError(f"unknown socket kind {kind!r}")
        return self._make({kind: int(args[0]) if kind == "nflog" else True}, count=count)

    def _make(self, want: dict, count: int) -> list[socket.socket]:
        """Run :data:`_HELPER` inside the namespaces; it sends back the sockets ``want`` names."""
        from .dnsproxy import LISTEN
        from .nflog import config_messages

        spec = {"fd": 0, "dns": list(LISTEN) if want.get("dns") else None, "diag": bool(want.get("diag")),
                "nflog": [m.hex() for m in config_messages(want["nflog"])] if "nflog" in want else None}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            spec["fd"] = theirs.fileno()
            result = subprocess.run(
                [*self.enter(), sys.executable, "-I", "-S", "-c", _HELPER, json.dumps(spec)],
                pass_fds=(theirs.fileno(),), capture_output=True, text=True, timeout=30)
            theirs.close()
            if result.returncode != 0:
                raise OSError(f"the namespace helper failed: {result.stderr.strip()[-500:]}")
            _, fds, _, _ = socket.recv_fds(ours, 16, count)
        finally:
            ours.close()
            if theirs.fileno() >= 0:
                theirs.close()
        if len(fds) != count:
            for fd in fds:
                os.close(fd)
            raise OSError(f"the namespace helper sent {len(fds)} sockets, not {count}")
        made = [socket.socket(fileno=fd) for fd in fds]
        for sock in made:
            sock.setblocking(False)
        return made

    def close(self) -> None:
        """Let the holder go (the namespaces end with the last process in them)."""
        for unused in self._ready.values():
            for sock in unused:
                sock.close()
        self._ready = {}
        holder, self._holder = self._holder, None
        if holder is None:
            return
        for stream in (holder.stdin, holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()
        try:
            holder.wait(timeout=5)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


__all__ = ["RootlessNamespaces", "tun_usable"]
