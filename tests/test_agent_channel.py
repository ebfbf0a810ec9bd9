"""The agent's socket channel (the Kubernetes exec path): numbered frames both ways, resume
after a dropped client, duplicates dropped, the replay ring's bound. Real unix sockets and
the real channel in a thread; the client side is written by hand here, as the wire sees it."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from sandbox_kernel.agent import protocol
from sandbox_kernel.agent.channel import SocketChannel


class Client:
    def __init__(self, path: str):
        deadline = time.monotonic() + 5
        while True:  # the socket file exists from bind(), connections succeed from listen()
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except ConnectionRefusedError:
                self.sock.close()
                assert time.monotonic() < deadline, "the channel does not listen"
                time.sleep(0.01)
        self.sock.settimeout(5)
        self.file = self.sock.makefile("rb")

    def send(self, frame: dict) -> None:
        self.sock.sendall(protocol.encode(frame))

    def recv(self) -> dict:
        line = self.file.readline()
        assert line, "the channel closed the connection"
        return json.loads(line)

    def recv_until(self, seq: int) -> list[dict]:
        frames = []
        while not frames or frames[-1].get("seq") != seq:
            frames.append(self.recv())
        return frames

    def cut(self) -> None:
        """As when the attach process dies with the exec stream."""
        self.sock.shutdown(socket.SHUT_RDWR)
        self.file.close()
        self.sock.close()


@pytest.fixture
def channel(tmp_path):
    path = str(tmp_path / "agent.sock")
    chan = SocketChannel(path)
    seen: list[dict] = []
    thread = threading.Thread(target=chan.serve, args=(seen.append, lambda: {"type": "hello", "version": 1}),
                              daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not (tmp_path / "agent.sock").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    chan.path, chan.seen = path, seen
    return chan


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + 5
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_resumed_client_gets_what_it_missed_and_its_resent_frames_run_once(channel):
    a = Client(channel.path)
    assert a.recv()["type"] == "hello"
    a.send({"type": "resume", "client": "k1", "since": None})
    for i in range(3):
        channel.send({"type": "stream", "id": 1, "name": "stdout", "text": f"{i}\n"})
    got = a.recv_until(3)
    assert [f["seq"] for f in got] == [1, 2, 3]
    a.send({"type": "execute", "id": 1, "code": "x", "seq": 1})
    a.send({"type": "ping", "id": 2, "seq": 2})
    wait_for(lambda: len(channel.seen) == 2, "the kernel's frames did not arrive")
    channel.send({"type": "pong", "id": 2})
    pong = a.recv()
    assert (pong["type"], pong["seq"], pong["ack"]) == ("pong", 4, 2)
    a.cut()
    # written while the stream is down (or into its buffers): kept
    channel.send({"type": "stream", "id": 1, "name": "stdout", "text": "late\n"})
    channel.send({"type": "done", "id": 1, "status": "ok", "exit_status": 0, "duration_ms": 1})

    b = Client(channel.path)  # the same client re-attached: it had received up to seq 2 only
    assert b.recv()["type"] == "hello"
    b.send({"type": "resume", "client": "k1", "since": 2})
    b.send({"type": "ping", "id": 2, "seq": 2})  # resent: the agent had it already
    b.send({"type": "ping", "id": 3, "seq": 3})
    got = b.recv_until(6)
    assert [f["seq"] for f in got] == [3, 4, 5, 6]
    assert got[-1]["type"] == "done" and got[-1]["ack"] == 2
    wait_for(lambda: len(channel.seen) == 3, "the new frame did not arrive")
    time.sleep(0.1)
    assert [(f["type"], f["id"]) for f in channel.seen] == [("execute", 1), ("ping", 2), ("ping", 3)]
    b.cut()

    c = Client(channel.path)  # a new client (a new transport): its numbering starts again
    assert c.recv()["type"] == "hello"
    c.send({"type": "resume", "client": "k2", "since": None})
    c.send({"type": "ping", "id": 9, "seq": 1})
    wait_for(lambda: len(channel.seen) == 4, "a new client's first frame was taken for a duplicate")
    channel.send({"type": "pong", "id": 9})
    pong = c.recv()  # nothing old is replayed to a new client: everything had been written
    assert (pong["type"], pong["seq"], pong["ack"]) == ("pong", 7, 1)
    c.cut()


def test_a_client_that_does_not_resume_gets_only_what_no_client_got(channel):
    channel.send({"type": "stream", "id": None, "name": "stdout", "text": "before anyone\n"})
    a = Client(channel.path)
    assert a.recv()["type"] == "hello"
    a.send({"type": "ping", "id": 1})  # an old-style client: no resume
    first = a.recv()
    assert (first["seq"], first["text"]) == (1, "before anyone\n")
    wait_for(lambda: channel.seen == [{"type": "ping", "id": 1}], "the first frame was not passed on")
    a.cut()


def test_frames_pushed_out_of_the_ring_are_reported(channel):
    channel.BUFFER_LIMIT = 1000
    for i in range(50):
        channel.send({"type": "stream", "id": 1, "name": "stdout", "text": f"line {i:03d} " + "x" * 40 + "\n"})
    a = Client(channel.path)
    assert a.recv()["type"] == "hello"
    a.send({"type": "resume", "client": "k1", "since": 0})
    note = a.recv()
    assert note["name"] == "stderr" and "output frames were dropped while detached" in note["text"]
    lost = int(note["text"].split("] ")[1].split()[0])
    rest = a.recv_until(50)
    assert lost + len(rest) == 50 and rest[0]["seq"] == lost + 1
    a.cut()
