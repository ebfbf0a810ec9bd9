"""Naming the sender of a refused packet (backends/sockowner.py), on loopback in the test's own
namespace with real processes, real sockets and real sock_diag lookups. The race with a sender
that closes its socket while it is looked up is made certain: the lookup closes it first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sandbox_kernel.backends import sockowner

# binds a UDP socket on loopback, sends one datagram to the discard port (nothing listens), says
# its port, then closes the socket at the first line on stdin and waits for stdin's end
SENDER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
s.sendto(b"x", ("127.0.0.1", 9))
print(s.getsockname()[1], flush=True)
sys.stdin.readline()
s.close()
print("closed", flush=True)
sys.stdin.read()
"""


class Sender:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", SENDER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())

    @property
    def name(self) -> str:
        return Path(f"/proc/{self.proc.pid}/comm").read_text().strip()

    def close_socket(self) -> None:
        self.proc.stdin.write("close\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "closed\n"

    def end(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(5)


@pytest.fixture
def senders():
    made: list[Sender] = []

    def make() -> Sender:
        made.append(Sender())
        return made[-1]

    yield make
    for sender in made:
        if sender.proc.poll() is None:
            sender.proc.kill()
            sender.proc.wait()


class ClosingDiag(sockowner.SocketDiag):
    """The real lookup, once ``sender`` has closed its socket: what happens when a program
    exits right after its datagram was refused, between the reader's snapshot and its lookup."""

    def __init__(self, sender: Sender):
        super().__init__(sockowner.SocketDiag.open("/proc/self/ns/net").sock)
        self.sender = sender

    def inode(self, *args):
        self.sender.close_socket()
        return super().inode(*args)


def test_a_udp_sender_is_named_by_its_open_socket(senders):
    first, second = senders(), senders()
    diag = sockowner.SocketDiag.open("/proc/self/ns/net")
    try:
        for sender in (first, second):
            found = sockowner.owner([first.proc.pid, second.proc.pid], "udp", "127.0.0.1", sender.port,
                                    "127.0.0.1", 9, diag=diag)
            assert found == {"name": sender.name, "pid": sender.proc.pid}
    finally:
        diag.close()


def test_a_udp_sender_that_closes_during_the_lookup_is_named(senders):
    """The other process keeps its UDP socket open: the one whose socket closed sent it."""
    other, sender = senders(), senders()
    diag = ClosingDiag(sender)
    try:
        found = sockowner.owner([other.proc.pid, sender.proc.pid], "udp", "127.0.0.1", sender.port,
                                "127.0.0.1", 9, diag=diag)
    finally:
        diag.close()
    assert found == {"name": sender.name, "pid": sender.proc.pid}


def test_a_udp_sender_gone_before_the_lookup_is_not_guessed(senders):
    """Closed before the snapshot: nothing tells it apart, so no process rather than a wrong one."""
    other, sender = senders(), senders()
    sender.close_socket()
    diag = sockowner.SocketDiag.open("/proc/self/ns/net")
    try:
        found = sockowner.owner([other.proc.pid, sender.proc.pid], "udp", "127.0.0.1", sender.port,
                                "127.0.0.1", 9, diag=diag)
    finally:
        diag.close()
    assert found is None


def test_one_of_two_closed_sockets_is_not_guessed(senders):
    """Two processes closed a UDP socket while the lookup ran: which one sent is unknown."""
    first, second = senders(), senders()

    class BothClose(ClosingDiag):
        def inode(self, *args):
            first.close_socket()
            return super().inode(*args)

    diag = BothClose(second)
    try:
        found = sockowner.owner([first.proc.pid, second.proc.pid], "udp", "127.0.0.1", second.port,
                                "127.0.0.1", 9, diag=diag)
    finally:
        diag.close()
    assert found is None
