"""The nftables ruleset in force, in throwaway network namespaces (root only).

Two namespaces joined by a veth pair: the sandbox side gets the compiled ruleset, the
other side runs TCP listeners. An allowlist of one host:port reaches exactly that; another
port is refused at once (tcp reset), and switching to deny takes effect for new
connections. The namespaces are always deleted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from sandbox_kernel.policy.admin import AdminPolicy
from sandbox_kernel.policy.compile_nftables import compile_nftables
from sandbox_kernel.policy.model import EgressPolicy

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"),
    reason="needs root, iproute2 and nft to create network namespaces",
)

CONNECT = """
import socket, sys
s = socket.socket(); s.settimeout(2)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print("open")
except ConnectionRefusedError: print("refused")
except OSError as e: print("error", e.errno)
"""

SERVE = """
import socket, sys, time
socks = []
for port in sys.argv[1:]:
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("10.231.252.2", int(port))); s.listen(); socks.append(s)
print("ready", flush=True); time.sleep(30)
"""


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def namespaces():
    sandbox, peer = f"skpt-{os.getpid()}-a", f"skpt-{os.getpid()}-b"
    created = []
    server = None
    try:
        for ns in (sandbox, peer):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", "skpt-a", "netns", sandbox, "type", "veth", "peer", "name", "skpt-b", "netns", peer)
        for ns, dev, addr in ((sandbox, "skpt-a", "10.231.252.1/24"), (peer, "skpt-b", "10.231.252.2/24")):
            _ip("-n", ns, "addr", "add", addr, "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", sandbox, "route", "add", "default", "via", "10.231.252.2")
        server = subprocess.Popen(["ip", "netns", "exec", peer, sys.executable, "-c", SERVE, "8080", "8081"], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        yield sandbox
    except subprocess.CalledProcessError as err:
        pytest.skip(f"cannot create network namespaces here: {err.stderr!r}")
    finally:
        if server is not None:
            server.kill()
            server.wait()
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _apply(ns, policy):
    script = compile_nftables(policy, resolved={}, resolver=None, always_blocked=AdminPolicy().blocked_networks())
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True, check=True)


def _connect(ns, host, port):
    result = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CONNECT, host, str(port)], capture_output=True, text=True, timeout=10)
    return result.stdout.strip()


def test_allowlist_reaches_exactly_the_listed_port_then_deny(namespaces):
    _apply(namespaces, EgressPolicy.parse(["10.231.252.2:8080/tcp"]))
    assert _connect(namespaces, "10.231.252.2", 8080) == "open"
    assert _connect(namespaces, "10.231.252.2", 8081) == "refused"  # tcp reset, not a hang
    assert _connect(namespaces, "10.231.252.9", 8080) == "refused"  # another host
    assert _connect(namespaces, "169.254.169.254", 80) == "refused"  # always blocked
    chain = subprocess.run(["ip", "netns", "exec", namespaces, "nft", "list", "chain", "inet", "sandbox_kernel", "output"], capture_output=True, text=True).stdout
    blocked_rule = next(line for line in chain.splitlines() if "@blocked_v4 meta l4proto tcp" in line)
    assert "packets 0 " not in blocked_rule  # the metadata attempt hit the always-blocked verdict
    _apply(namespaces, EgressPolicy())  # replaced atomically; new connections see it at once
    assert _connect(namespaces, "10.231.252.2", 8080) == "refused"
