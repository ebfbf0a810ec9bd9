"""``sandbox-kernel demo-host start|stop|status``: a destination for the teaching notebooks.

The notebooks may only reach hosts set up on the machine itself. ``start`` creates one:
a network namespace ``skdemo`` joined to the host by a veth pair (host side
``10.231.254.1/24``, demo side ``10.231.254.2/24``) and a tiny server on port 8080 that
answers "hello from the demo host". A sandbox reaches it like any outside address,
through its uplink, when the policy allows ``10.231.254.2:8080``. ``start`` is
idempotent; ``stop`` removes the namespace, the veth pair and the server. Needs root.

``hold PID`` / ``release PID`` are for commands that need the demo host while they run
(``scripts/lab.sh``): ``hold`` starts it if it is not running and records PID as a holder;
``release`` forgets PID and stops the demo host when no live holder is left — but only a
demo host that a holder started: one started by hand (``start``) is left running.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shlex
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
#: holders (one file per process that holds the demo host) and the on-demand marker
STATE_DIR = Path("/run/sandbox-kernel-demo")


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


def _start_by_hand() -> int:
    """``start``: the demo host stays up until ``stop``, whoever else holds it."""
    with _locked():
        (STATE_DIR / "on-demand").unlink(missing_ok=True)
        return start()


@contextlib.contextmanager
def _locked():
    """One demo-host change at a time on this machine (two lab.sh starting or ending at once)."""
    STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    (STATE_DIR / "holders").mkdir(exist_ok=True)
    with open(STATE_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _live_holders() -> list[int]:
    """Holders whose process still runs (the same process: pid and start time); forget the rest."""
    live = []
    for record in (STATE_DIR / "holders").iterdir():
        started = _start_time(int(record.name)) if record.name.isdigit() else None
        if started is not None and started == record.read_text().strip():
            live.append(int(record.name))
        else:
            record.unlink(missing_ok=True)
    return sorted(live)


def hold(pid: int) -> int:
    """Start the demo host unless it runs, and record ``pid`` as using it (lab.sh, at start)."""
    started = _start_time(pid)
    if started is None:
        print(f"demo host: no process {pid} to hold it for", file=sys.stderr)
        return 2
    with _locked():
        marker = STATE_DIR / "on-demand"
        if not _netns_exists():
            marker.touch()  # started for holders: the last one to leave stops it
        (STATE_DIR / "holders" / str(pid)).write_text(started)
        status = start()
        if status == 0:
            others = len(_live_holders()) - 1
            if not marker.exists():
                print("  it was started by hand: left running when this command ends")
            elif others:
                print(f"  shared with {others} other command(s): stopped when the last one ends")
            else:
                print("  stopped when this command ends")
        return status


def release(pid: int) -> int:
    """Forget ``pid``; stop the demo host if a holder started it and no live holder is left
    (lab.sh, on exit)."""
    with _locked():
        (STATE_DIR / "holders" / str(pid)).unlink(missing_ok=True)
        others = _live_holders()
        if not (STATE_DIR / "on-demand").exists():
            if _netns_exists():
                print("demo host: left running (it was started by hand: sandbox-kernel demo-host stop)")
            return 0
        if others:
            print(f"demo host: left running for {len(others)} other command(s) using it")
            return 0
        return stop()


def stop() -> int:
    """Kill the server and remove the namespace and the veth pair. Idempotent."""
    if STATE_DIR.exists():
        (STATE_DIR / "on-demand").unlink(missing_ok=True)
        for record in (STATE_DIR / "holders").glob("*"):
            record.unlink(missing_ok=True)
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


USAGE = "usage: sandbox-kernel demo-host start|stop|status | hold PID | release PID"


def demo_ceiling(environ) -> dict[str, str]:
    """The environment of the demo ceiling, for scripts/lab.sh only: users may also allow the demo
    host (appended to SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW, default 'public'), and where the
    built-in cluster ranges cover it (a private address), they leave out just the demo host —
    unless SANDBOX_KERNEL_POLICY_CLUSTER_RANGES is set, which is then the administrator's word."""
    from .policy import admin

    env = {"SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW":
           f"{environ.get('SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW') or 'public'} {DEMO_ADDR}"}
    defaults = getattr(admin, "DEFAULT_CLUSTER_RANGES", None)
    demo = ipaddress.ip_network(DEMO_ADDR)
    if defaults and "SANDBOX_KERNEL_POLICY_CLUSTER_RANGES" not in environ:
        kept: list[str] = []
        for text in defaults:
            net = ipaddress.ip_network(text)
            if net.version == demo.version and demo.subnet_of(net):
                kept += sorted(str(n) for n in net.address_exclude(demo))
            else:
                kept.append(text)
        if kept != list(defaults):
            env["SANDBOX_KERNEL_POLICY_CLUSTER_RANGES"] = " ".join(kept)
    return env


def main(argv: list[str]) -> int:
    """``sandbox-kernel demo-host ACTION [PID]`` (called from cli.py) and ``python -m``."""
    action = argv[0] if argv else "status"
    if action == "serve":
        serve()
        return 0
    if action == "ceiling":  # `eval "$(python -m sandbox_kernel.demohost ceiling)"` in lab.sh
        for name, value in demo_ceiling(os.environ).items():
            print(f"export {name}={shlex.quote(value)}")
        return 0
    actions = {"start": _start_by_hand, "stop": stop, "status": status}
    if action in ("hold", "release"):
        if len(argv) != 2 or not argv[1].isdigit():
            print(USAGE, file=sys.stderr)
            return 2
        pid = int(argv[1])
        actions = {action: lambda: (hold if action == "hold" else release)(pid)}
    elif action not in actions or len(argv) > 1:
        print(USAGE, file=sys.stderr)
        return 2
    try:
        return actions[action]()
    except subprocess.CalledProcessError as err:
        print(f"demo host: `{' '.join(err.cmd)}` failed: {(err.stderr or '').strip()} "
              "(the demo host needs root and iproute2)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
