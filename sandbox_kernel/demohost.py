"""``sandbox-kernel demo-host start|stop|status``: a destination for the teaching notebooks.

The notebooks may only reach hosts set up on the machine itself. ``start`` creates one:
a network namespace ``skdemo`` joined to the host by a veth pair (host side
``10.231.254.1/24``, demo side ``10.231.254.2/24``) and a tiny server on port 8080 that
answers "hello from the demo host". A sandbox reaches it like any outside address,
through its uplink, when the policy allows ``10.231.254.2:8080``. ``start`` is
idempotent; ``stop`` removes the namespace, the veth pair and the server. Needs root.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

NETNS = "skdemo"
HOST_IF = "skdemo-h"
DEMO_IF = "skdemo-d"
HOST_ADDR = "10.231.254.1"
DEMO_ADDR = "10.231.254.2"
PORT = 8080
GREETING = b"hello from the demo host\n"
#: a client that sends nothing within this time gets the greeting as a plain line
PLAIN_AFTER = 0.3


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _netns_exists() -> bool:
    return Path("/run/netns", NETNS).exists()


def _answers(timeout: float = 2.0) -> bool:
    """Whether the demo server answers with its greeting (asked from the host)."""
    try:
        with socket.create_connection((DEMO_ADDR, PORT), timeout=timeout) as conn:
            conn.settimeout(timeout)
            return conn.recv(len(GREETING)) == GREETING
    except OSError:
        return False


def start() -> int:
    """Create whatever is missing of the demo host; print where it is."""
    if not _netns_exists():
        _ip("netns", "add", NETNS)
    if _ip("-n", NETNS, "link", "show", DEMO_IF, check=False).returncode != 0:
        _ip("link", "del", HOST_IF, check=False)  # a half-made pair from an interrupted start
        _ip("link", "add", HOST_IF, "type", "veth", "peer", "name", DEMO_IF, "netns", NETNS)
    _ip("addr", "replace", f"{HOST_ADDR}/24", "dev", HOST_IF)
    _ip("link", "set", HOST_IF, "up")
    _ip("-n", NETNS, "addr", "replace", f"{DEMO_ADDR}/24", "dev", DEMO_IF)
    _ip("-n", NETNS, "link", "set", DEMO_IF, "up")
    _ip("-n", NETNS, "link", "set", "lo", "up")
    if not _answers(timeout=0.5):
        subprocess.Popen(
            ["ip", "netns", "exec", NETNS, sys.executable, "-m", "sandbox_kernel.demohost", "serve"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not _answers(timeout=0.5):
            if time.monotonic() > deadline:
                print(f"demo host: the server on {DEMO_ADDR}:{PORT} did not start", file=sys.stderr)
                return 1
            time.sleep(0.1)
    print(f"demo host: running at {DEMO_ADDR}:{PORT} (network namespace {NETNS})")
    print(f"  a notebook may allow it with: %sandbox allow {DEMO_ADDR}:{PORT}")
    print(f"  if your administrator's ceiling forbids that, start Jupyter with "
          f"SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW='public {DEMO_ADDR}'")
    return 0


def stop() -> int:
    """Kill the server and remove the namespace and the veth pair. Idempotent."""
    removed = []
    if _netns_exists():
        for pid in _ip("netns", "pids", NETNS, check=False).stdout.split():
            subprocess.run(["kill", "-9", pid], capture_output=True, check=False)
        _ip("netns", "del", NETNS, check=False)
        removed.append(f"network namespace {NETNS}")
    # deleting the namespace deletes the pair; this catches a half-made one
    if _ip("link", "del", HOST_IF, check=False).returncode == 0:
        removed.append(f"interface {HOST_IF}")
    print("demo host: removed " + ", ".join(removed) if removed else "demo host: not running")
    return 0


def status() -> int:
    """Print whether the demo host is up; exit status 0 when it answers, 1 otherwise."""
    if not _netns_exists():
        print("demo host: not running (sandbox-kernel demo-host start)")
        return 1
    if _answers():
        print(f"demo host: running at {DEMO_ADDR}:{PORT} (network namespace {NETNS})")
        return 0
    print(f"demo host: namespace {NETNS} exists but {DEMO_ADDR}:{PORT} does not answer "
          "(sandbox-kernel demo-host start repairs it)")
    return 1


def serve(port: int = PORT) -> None:
    """The demo server (runs inside the namespace): HTTP for clients that send a request,
    the greeting as a plain line for clients that only read."""
    import socketserver

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.settimeout(PLAIN_AFTER)
            try:
                request = self.request.recv(4096)
            except OSError:
                request = b""
            if request.split(b" ", 1)[0] in (b"GET", b"HEAD", b"POST"):
                self.request.settimeout(2)
                body = GREETING if request.startswith(b"GET") or request.startswith(b"POST") else b""
                self.request.sendall(
                    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    + f"Content-Length: {len(GREETING)}\r\nConnection: close\r\n\r\n".encode() + body)
            else:
                self.request.sendall(GREETING)

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    with Server(("0.0.0.0", port), Handler) as server:
        server.serve_forever()


def main(argv: list[str]) -> int:
    """``sandbox-kernel demo-host ACTION`` (called from cli.py) and ``python -m``."""
    action = argv[0] if argv else "status"
    if action == "serve":
        serve()
        return 0
    actions = {"start": start, "stop": stop, "status": status}
    if action not in actions:
        print("usage: sandbox-kernel demo-host start|stop|status", file=sys.stderr)
        return 2
    try:
        return actions[action]()
    except subprocess.CalledProcessError as err:
        print(f"demo host: `{' '.join(err.cmd)}` failed: {(err.stderr or '').strip()} "
              "(the demo host needs root and iproute2)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
