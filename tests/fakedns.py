"""A fake DNS server on 127.0.0.1 for tests: fixed answers, chosen TTL, every query recorded.

Used by the local DNS proxy tests (tests/test_dns_local.py), the private-address screen
(tests/policy/test_policy_private_addresses.py) and the Kubernetes backend's TTL refresh
(tests/kubernetes). No query leaves the machine.
"""

from __future__ import annotations

import socket
import struct
import threading


class FakeUpstream:
    """Answers A queries for names in ``records`` (one address or a list) with TTL ``ttl``,
    NXDOMAIN otherwise, over UDP and TCP on the same port; records each query's name (and
    its transport in ``transports``)."""

    def __init__(self, ttl: int = 60):
        self.records: dict[str, str | list[str]] = {}
        self.ttl = ttl
        self.queries: list[str] = []
        self.transports: list[tuple[str, str]] = []
        # UDP and TCP on one port: a free UDP port may be taken for TCP by someone else
        for _ in range(50):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.sock.bind(("127.0.0.1", 0))
            self.port = self.sock.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
                break
            except OSError:
                self.sock.close()
                self.tcp.close()
        else:
            raise OSError("no port free for both UDP and TCP on 127.0.0.1")
        self.tcp.listen(4)
        self._stop = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()
        threading.Thread(target=self.serve_tcp, daemon=True).start()

    def serve(self):
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(2048)
            except OSError:
                return
            self.sock.sendto(self.reply(data, "udp"), peer)

    def serve_tcp(self):
        while not self._stop:
            try:
                conn, _ = self.tcp.accept()
            except OSError:
                return
            with conn:
                size = struct.unpack("!H", conn.recv(2, socket.MSG_WAITALL))[0]
                reply = self.reply(conn.recv(size, socket.MSG_WAITALL), "tcp")
                conn.sendall(struct.pack("!H", len(reply)) + reply)

    def reply(self, data: bytes, transport: str) -> bytes:
        qid = data[:2]
        offset, labels = 12, []
        while data[offset]:
            labels.append(data[offset + 1: offset + 1 + data[offset]].decode())
            offset += 1 + data[offset]
        name = ".".join(labels).lower()
        qtype = struct.unpack("!H", data[offset + 1: offset + 3])[0]
        question = data[12: offset + 5]
        self.queries.append(name)
        self.transports.append((name, transport))
        ip = self.records.get(name)
        ips = [ip] if isinstance(ip, str) else list(ip or [])
        if ips and qtype == 1:
            answers = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, self.ttl, 4) + socket.inet_aton(a) for a in ips)
            return qid + struct.pack("!HHHHH", 0x8180, 1, len(ips), 0, 0) + question + answers
        rcode = 0 if ips else 3
        return qid + struct.pack("!HHHHH", 0x8180 | rcode, 1, 0, 0, 0) + question

    def close(self):
        self._stop = True
        self.sock.close()
        self.tcp.close()
