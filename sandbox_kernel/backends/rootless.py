"""The local sandbox's namespaces when the kernel does not run as root.

Used by the local backend (``backends/local.py``) when ``c.LocalBackend.rootless`` is set.
An unprivileged process may create a user namespace and, owned by it, a network namespace;
inside them it is "root" for that network only. So:

1. a *holder* process (``unshare --user --map-root-user --net``) creates both and keeps them
   while the sandbox lives; it exits when the kernel closes its stdin (or dies);
2. the kernel runs ``ip`` and ``nft`` in them through ``nsenter --user --net
   --preserve-credentials`` (the user namespace's owner may enter it);
3. sockets the kernel serves from the host side (NFLOG, the DNS proxy's, socket lookups) are made inside by
   a short helper (``python -m sandbox_kernel.backends.rootless``) and handed back over a
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

import os
import socket
import subprocess
import sys

from ..errors import SandboxStartError

#: the holder: report, then hold the namespaces until stdin closes
_HOLDER = "echo ready; read _"


def tun_usable(device: str = "/dev/net/tun") -> bool:
    """Whether this process may open ``device`` (a tun node: slirp4netns needs one)."""
    return bool(device) and os.access(device, os.R_OK | os.W_OK)


class RootlessNamespaces:
    """A user namespace and a network namespace owned by the kernel's own user."""

    def __init__(self) -> None:
        self._holder: subprocess.Popen | None = None

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

    def sockets(self, kind: str, *args: str, count: int) -> list[socket.socket]:
        """``count`` sockets made inside by :func:`_helper_main` (``kind``: nflog GROUP | dns | diag)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            result = subprocess.run(
                [*self.enter(), sys.executable, "-m", __name__, kind, *args, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), capture_output=True, text=True, timeout=30)
            theirs.close()
            if result.returncode != 0:
                raise OSError(f"the namespace helper failed: {result.stderr.strip()}")
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


def _helper_main(argv: list[str]) -> int:
    """Inside the namespaces: make the sockets and send them to the kernel."""
    kind, *args, fd = argv
    if kind == "nflog":
        from .nflog import open_here

        made = [open_here(int(args[0]))]
    elif kind == "dns":
        from .dnsproxy import bind_here

        made = list(bind_here())
    elif kind == "diag":  # socket lookups (sockowner.SocketDiag): who sent a refused packet
        from .sockowner import NETLINK_SOCK_DIAG

        made = [socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)]
    else:
        print(f"unknown socket kind {kind!r}", file=sys.stderr)
        return 2
    with socket.socket(fileno=int(fd)) as channel:
        socket.send_fds(channel, [b"s"], [s.fileno() for s in made])
    return 0


if __name__ == "__main__":
    sys.exit(_helper_main(sys.argv[1:]))

__all__ = ["RootlessNamespaces", "tun_usable"]
