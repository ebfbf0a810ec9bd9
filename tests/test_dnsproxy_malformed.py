"""The DNS proxy runs as root and reads bytes the sandbox chose: whatever comes, a malformed query
gets a clear FORMERR (its id, when it has a header), nothing raises, and the proxy goes on
answering. A real DnsProxy on loopback sockets of the test's own namespace, a fake upstream."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading

import dns.flags
import dns.message
import dns.rcode
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakedns import FakeUpstream
from sandbox_kernel.backends.dnsproxy import DnsProxy
from sandbox_kernel.policy.model import EgressPolicy

HEADER = struct.Struct("!HHHHHH")


def _query(name: str, qid: int = 0x4242) -> bytes:
    return dns.message.make_query(name, "A", id=qid).to_wire()


#: hand-made malformed queries, each with a header (id 0x1234) the proxy can answer to
MALFORMED = {
    "compression loop": HEADER.pack(0x1234, 0x0100, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01",
    "pointer past the end": HEADER.pack(0x1234, 0x0100, 1, 0, 0, 0) + b"\xc0\xff\x00\x01\x00\x01",
    "label past the end": HEADER.pack(0x1234, 0x0100, 1, 0, 0, 0) + b"\x3fabc",
    "reserved label type": HEADER.pack(0x1234, 0x0100, 1, 0, 0, 0) + b"\x80abc\x00\x00\x01\x00\x01",
    "truncated question": HEADER.pack(0x1234, 0x0100, 1, 0, 0, 0) + b"\x07example\x00\x00",
    "two questions": HEADER.pack(0x1234, 0x0100, 2, 0, 0, 0) + (b"\x01a\x00\x00\x01\x00\x01" * 2),
    "no question": HEADER.pack(0x1234, 0x0100, 0, 0, 0, 0),
    "a response, not a query": HEADER.pack(0x1234, 0x8180, 1, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01",
    "question count beyond the data": HEADER.pack(0x1234, 0x0100, 65535, 0, 0, 0) + b"\x01a\x00\x00\x01\x00\x01",
    "name longer than 255": HEADER.pack(0x1234, 0x0100, 1, 0, 0, 0) + b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63
    + b"\x3f" + b"c" * 63 + b"\x3f" + b"d" * 63 + b"\x00\x00\x01\x00\x01",
}


class Proxy:
    """A DnsProxy on 127.0.0.1 (UDP and TCP), its loop in a thread; allowlist: allowed.test."""

    def __init__(self):
        self.upstream = FakeUpstream()
        self.upstream.records["allowed.test"] = "10.231.9.9"
        self.reports: list = []
        self.loop = asyncio.new_event_loop()
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(4)
        udp.setblocking(False)
        tcp.setblocking(False)
        self.udp_addr, self.tcp_addr = udp.getsockname(), tcp.getsockname()
        self.errors: list = []
        self.loop.set_exception_handler(lambda loop, context: self.errors.append(context))
        policy = EgressPolicy.parse({"mode": "allowlist", "entries": ["allowed.test"]})
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.proxy = asyncio.run_coroutine_threadsafe(DnsProxy.start(
            None, sockets=(udp, tcp), policy=lambda: policy, upstream=f"127.0.0.1:{self.upstream.port}",
            add_addresses=lambda elements: None, report=self.reports.append,
            log=logging.getLogger("test-dnsproxy")), self.loop).result(10)

    def ask_udp(self, data: bytes) -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            s.sendto(data, self.udp_addr)
            try:
                return s.recv(4096)
            except socket.timeout:
                return None

    def close(self):
        self.loop.call_soon_threadsafe(self.proxy.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.upstream.close()


@pytest.fixture
def proxy():
    made = Proxy()
    yield made
    made.close()
    assert made.errors == []


def _works(proxy: Proxy) -> None:
    """The proxy still answers: an allowed name resolves, another is refused."""
    answer = dns.message.from_wire(proxy.ask_udp(_query("allowed.test.")))
    assert answer.rcode() == dns.rcode.NOERROR and answer.answer[0][0].address == "10.231.9.9"
    refused = dns.message.from_wire(proxy.ask_udp(_query("elsewhere.test.", qid=7)))
    assert (refused.id, refused.rcode()) == (7, dns.rcode.REFUSED)
    assert str(refused.question[0].name) == "elsewhere.test."


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_query_gets_formerr_and_the_proxy_goes_on(proxy, case):
    reply = proxy.ask_udp(MALFORMED[case])
    assert reply is not None, case
    answer = dns.message.from_wire(reply)
    assert answer.id == 0x1234 and answer.flags & dns.flags.QR
    assert answer.rcode() == dns.rcode.FORMERR and not answer.question and not answer.answer
    _works(proxy)


def test_less_than_a_header_gets_no_answer(proxy):
    for data in (b"", b"\x12", b"\x12\x34\x01\x00\x00\x01"):
        assert proxy.ask_udp(data) is None
    _works(proxy)


def test_malformed_queries_over_tcp_get_formerr_on_the_same_connection(proxy):
    with socket.create_connection(proxy.tcp_addr, timeout=5) as s:
        for data in [MALFORMED["compression loop"], MALFORMED["two questions"], _query("allowed.test.", qid=9)]:
            s.sendall(struct.pack("!H", len(data)) + data)
            size = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
            answer = dns.message.from_wire(s.recv(size, socket.MSG_WAITALL))
        assert (answer.id, answer.rcode()) == (9, dns.rcode.NOERROR)
    _works(proxy)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=12, max_size=300) | st.builds(lambda tail: HEADER.pack(1, 0x0100, 1, 0, 0, 0) + tail,
                                                        st.binary(max_size=80)))
def test_random_bytes_never_break_the_proxy(proxy, data):
    reply = proxy.ask_udp(data)
    if reply is not None:  # an answer (FORMERR, REFUSED or the upstream's) to that id
        answer = dns.message.from_wire(reply, question_only=True, ignore_trailing=True)
        assert answer.id == int.from_bytes(data[:2], "big")
    assert proxy.errors == []


def test_random_bytes_leave_it_answering(proxy):
    import random

    rng = random.Random(17)
    for _ in range(200):
        proxy.ask_udp(bytes(rng.randrange(256) for _ in range(rng.randrange(12, 120))))
    _works(proxy)
