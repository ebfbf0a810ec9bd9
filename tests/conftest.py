"""Shared fixtures: a real Sandbox kernel through jupyter_client, and test hosts.

Test hosts live in network namespaces these fixtures create (prefix ``skt-``) with
addresses in 10.231.0.0/16, and are always removed, even when a test fails. No test
sends traffic anywhere else.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_report_header(config):
    return [f"sandbox-kernel tests as uid {os.geteuid()}; netns/nft/bwrap: "
            f"{all(shutil.which(t) for t in ('ip', 'nft', 'bwrap', 'slirp4netns'))}"]


@pytest.fixture(scope="session", autouse=True)
def kernelspec_path(tmp_path_factory):
    """Install the ``sandbox`` kernelspec into a private JUPYTER_PATH for the test run."""
    from sandbox_kernel.cli import install

    prefix = tmp_path_factory.mktemp("jupyter-prefix")
    install(prefix=str(prefix))
    data = prefix / "share" / "jupyter"
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(data), *([old] if old else [])])
    yield data
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def sandbox_namespaces() -> set[str]:
    netns = Path("/run/netns")
    return {p.name for p in netns.iterdir() if p.name.startswith("sbx-")} if netns.exists() else set()


@dataclass
class Cell:
    """Everything one execute_request produced."""

    reply: dict
    outputs: list[dict] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.reply["content"]["status"]

    @property
    def sandbox(self) -> dict:
        return self.reply["metadata"]["sandbox"]

    def stream(self, name: str = "stdout") -> str:
        return "".join(o["content"]["text"] for o in self.outputs
                       if o["msg_type"] == "stream" and o["content"]["name"] == name)

    def of_type(self, msg_type: str) -> list[dict]:
        return [o for o in self.outputs if o["msg_type"] == msg_type]


class KernelDriver:
    """A real Sandbox kernel started by jupyter_client, and a blocking client to it."""

    def __init__(self, env: dict | None = None):
        from jupyter_client.manager import KernelManager

        self.km = KernelManager(kernel_name="sandbox")
        kernel_env = {**os.environ, **(env or {})}
        self.km.start_kernel(env=kernel_env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def execute(self, code: str, timeout: float = 60, stdin=None, on_output=None, **kwargs) -> Cell:
        """Run ``code``; answer input requests with ``stdin(prompt)``; return the Cell."""
        msg_id = self.kc.execute(code, allow_stdin=stdin is not None, **kwargs)
        start = time.monotonic()
        outputs, times = [], []
        deadline = start + timeout
        idle = False
        while not idle:
            if stdin is not None:
                try:
                    req = self.kc.get_stdin_msg(timeout=0.01)
                    if req["parent_header"].get("msg_id") == msg_id:
                        self.kc.input(stdin(req["content"]["prompt"]))
                except Exception:  # noqa: BLE001 - queue.Empty: no request yet
                    pass
            try:
                msg = self.kc.get_iopub_msg(timeout=0.05)
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cell did not finish in {timeout} s: {code!r}")
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status":
                idle = msg["content"]["execution_state"] == "idle"
                continue
            if msg["msg_type"] == "execute_input":
                continue
            outputs.append(msg)
            times.append(time.monotonic() - start)
            if on_output:
                on_output(msg)
        while True:
            reply = self.kc.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        return Cell(reply=reply, outputs=outputs, times=times)

    def shutdown(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            self.km.shutdown_kernel(now=False)


@pytest.fixture(scope="module")
def kernel():
    """One Sandbox kernel shared by a test module (state carries between its tests)."""
    driver = KernelDriver()
    yield driver
    driver.shutdown()


@pytest.fixture
def fresh_kernel():
    """A kernel of its own for a test that crashes, restarts or configures it."""
    drivers = []

    def start(env: dict | None = None) -> KernelDriver:
        driver = KernelDriver(env)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.shutdown()


# -- test hosts -------------------------------------------------------------------------

@dataclass
class TestHost:
    """A host in a network namespace of its own, reachable from the host: TCP on ``port``
    and ``port + 1`` (IPv4 and IPv6), UDP on ``port``; it logs every contact."""

    name: str
    ip: str
    ip6: str
    port: int
    connections: list = field(default_factory=list)

    def seen(self) -> int:
        """How many connections/datagrams reached the host (read from its log)."""
        log = Path(f"/tmp/{self.name}.log")
        return len(log.read_text().splitlines()) if log.exists() else 0


_HOST_SERVER = r"""
import socket, sys, threading, os
port, log = int(sys.argv[1]), sys.argv[2]
def note(what):
    with open(log, "a") as f:
        f.write(what + "\n")
def tcp(family, addr, port):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port)); s.listen(16)
    while True:
        c, peer = s.accept(); note(f"tcp {peer[0]}")
        try:
            c.sendall(b"hello from test host\n")
        finally:
            c.close()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    while True:
        data, peer = s.recvfrom(2048); note(f"udp {peer[0]}")
        s.sendto(b"pong", peer)
targets = [udp]
for p in (port, port + 1):
    targets += [lambda p=p: tcp(socket.AF_INET, "0.0.0.0", p), lambda p=p: tcp(socket.AF_INET6, "::", p)]
for target in targets:
    threading.Thread(target=target, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


_HOST_INDEX = itertools.count(1)


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


@pytest.fixture
def test_host():
    """Create test hosts on demand; every namespace, veth and process is removed after."""
    made: list[tuple[str, subprocess.Popen | None]] = []

    def make(port: int = 8080) -> TestHost:
        # a new subnet for every host of the run, so no policy entry left by an earlier
        # test can match a later test's host
        index = (os.getpid() * 7 + next(_HOST_INDEX)) % 250 + 1
        name = f"skt-{uuid.uuid4().hex[:6]}"
        host_if, peer_if = f"{name}h", f"{name}p"
        ip, gw = f"10.231.{index}.2", f"10.231.{index}.1"
        ip6, gw6 = f"fd00:231:{index:x}::2", f"fd00:231:{index:x}::1"
        made.append((name, None))
        _sh("ip", "netns", "add", name)
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        _sh("ip", "link", "set", peer_if, "netns", name)
        _sh("ip", "addr", "add", f"{gw}/24", "dev", host_if)
        _sh("ip", "-6", "addr", "add", f"{gw6}/64", "dev", host_if, "nodad")
        _sh("ip", "link", "set", host_if, "up")
        _sh("ip", "-n", name, "addr", "add", f"{ip}/24", "dev", peer_if)
        _sh("ip", "-n", name, "-6", "addr", "add", f"{ip6}/64", "dev", peer_if, "nodad")
        _sh("ip", "-n", name, "link", "set", peer_if, "up")
        _sh("ip", "-n", name, "link", "set", "lo", "up")
        _sh("ip", "-n", name, "route", "add", "default", "via", gw)
        _sh("ip", "-n", name, "-6", "route", "add", "default", "via", gw6)
        log = Path(f"/tmp/{name}.log")
        log.unlink(missing_ok=True)
        proc = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", _HOST_SERVER,
                                 str(port), str(log)], stdout=subprocess.PIPE, text=True)
        made[-1] = (name, proc)
        assert proc.stdout.readline().strip() == "ready"
        return TestHost(name=name, ip=ip, ip6=ip6, port=port)

    yield make
    for name, proc in made:
        if proc is not None:
            proc.kill()
            proc.wait()
        _sh("ip", "link", "del", f"{name}h", check=False)
        _sh("ip", "netns", "del", name, check=False)
        Path(f"/tmp/{name}.log").unlink(missing_ok=True)
