"""The local sandbox's way out: a userspace uplink (slirp4netns) into its network namespace.

With default-deny nothing passes the nftables output chain anyway, but the route makes
refused connections fail fast and be logged (no route = no packet = no notice). slirp4netns
uses the host's own sockets: no veth, no NAT rule and no ``ip_forward`` change on the host,
and host loopback is not reachable through it. It exits when the kernel dies: it watches the
read end of a pipe the kernel holds (:meth:`Uplink.close` closes it).

Without a tun device slirp4netns may open (rootless mode), the namespace gets a route into a
veth pair that leads nowhere instead (:func:`route_to_nowhere`), so refused packets still
cross the rules and are logged.
"""

from __future__ import annotations

import os
import subprocess
from typing import Callable

from ...errors import SandboxStartError

#: the uplink's own networks (slirp4netns: gateway .2 = the host, resolver .3, the sandbox .100;
#: IPv6 fd00::/64 likewise). The kernel needs none of them from inside the sandbox (its DNS
#: proxy forwards from the host side), so no policy may open them: they are always blocked.
UPLINK_CIDR = "10.0.2.0/24"
UPLINK_RANGES = {
    UPLINK_CIDR: "the sandbox's uplink: slirp4netns's gateway to the host and its DNS forwarder",
    "fd00::/64": "the sandbox's IPv6 uplink (slirp4netns)",
}

#: slirp4netns's options, without the namespace arguments
SLIRP_ARGV = ["slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback",
              # --disable-dns: the sandbox resolves through the kernel's DNS proxy only, never
              # through slirp4netns's forwarder at 10.0.2.3 (which would ask the host's resolver)
              "--disable-dns", f"--cidr={UPLINK_CIDR}", "--enable-ipv6"]

#: the commands (run in the namespace) of a default route into a veth pair with both ends
#: inside: the dummy module may not be loaded, and an unprivileged user cannot load it
_NOWHERE = (["ip", "link", "add", "nowhere0", "type", "veth", "peer", "name", "nowhere1"],
            ["ip", "addr", "add", "10.0.2.100/24", "dev", "nowhere0"],
            ["ip", "link", "set", "nowhere0", "up"],
            ["ip", "link", "set", "nowhere1", "up"],
            ["ip", "route", "add", "default", "dev", "nowhere0"],
            ["ip", "-6", "route", "add", "default", "dev", "nowhere0"])


def route_to_nowhere(run_in_netns: Callable[[list[str]], object]) -> None:
    """No uplink: a route to nowhere, so refused packets still cross the rules and are logged."""
    for argv in _NOWHERE:
        run_in_netns(argv)


class Uplink:
    """One running slirp4netns, started for ``command`` (which must hold
    ``--netns-type=path``: the ready and exit descriptors go just before it). Blocking (a
    worker thread): returns once slirp4netns configured the namespace, else closes what it
    started and raises SandboxStartError."""

    def __init__(self, command: list[str]):
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        try:
            tail = command.index("--netns-type=path")
            self.process: subprocess.Popen | None = subprocess.Popen(
                [*command[:tail], f"--ready-fd={ready_w}", f"--exit-fd={exit_r}", *command[tail:]],
                pass_fds=(ready_w, exit_r), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            )
        except OSError as err:
            os.close(exit_w)
            os.close(ready_r)
            raise SandboxStartError(f"starting slirp4netns failed: {err}") from None
        finally:
            os.close(ready_w)
            os.close(exit_r)
        self._exit_fd: int | None = exit_w
        with os.fdopen(ready_r, "rb") as ready:
            ok = ready.read(1) == b"1"
        if not ok:
            err = self.process.stderr.read().decode(errors="replace").strip() if self.process.stderr else ""
            self.close()
            raise SandboxStartError(f"slirp4netns could not configure the sandbox network: {err}")

    def close(self) -> None:
        """Stop slirp4netns (blocking: a worker thread). Idempotent."""
        if self._exit_fd is not None:
            os.close(self._exit_fd)  # slirp4netns exits when this pipe closes
            self._exit_fd = None
        process, self.process = self.process, None
        if process is not None:
            try:
                process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stderr:
                process.stderr.close()
