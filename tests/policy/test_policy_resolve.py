"""The resolver, against a tiny DNS server on 127.0.0.1 (no traffic leaves loopback)."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time

import pytest

from sandbox_kernel.policy import resolve
from sandbox_kernel.policy.model import EgressPolicy
from sandbox_kernel.policy.resolve import TYPE_A, TYPE_AAAA, TYPE_CNAME, resolve_names, resolve_policy

# name -> list of (type, ttl, value); "NXDOMAIN" / "SERVFAIL" / "SILENT" for failures
ZONE = {
    "pypi.org": [(TYPE_A, 300, "151.101.0.223"), (TYPE_AAAA, 120, "2a04:4e42::223")],
    "api.github.com": [(TYPE_CNAME, 50, "lb.github.com")],
    "lb.github.com": [(TYPE_CNAME, 3600, "lb2.github.com")],
    "lb2.github.com": [(TYPE_A, 200, "140.82.112.5"), (TYPE_A, 200, "140.82.112.6")],
    "gone.example.com": "NXDOMAIN",
    "broken.example.com": "SERVFAIL",
    "silent.example.com": "SILENT",
    "big.example.com": [(TYPE_A, 90, f"198.51.100.{i}") for i in range(1, 41)],
    "loop.example.com": [(TYPE_CNAME, 60, "loop.example.com")],
}
TRUNCATE = {"big.example.com"}


def _name(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"


def _answer(query: bytes, over_tcp: bool) -> bytes | None:
    qid, _, _, _, _, _ = struct.unpack("!HHHHHH", query[:12])
    offset, labels = 12, []
    while query[offset]:
        labels.append(query[offset + 1 : offset + 1 + query[offset]].decode())
        offset += 1 + query[offset]
    qname = ".".join(labels)
    qtype = struct.unpack("!H", query[offset + 1 : offset + 3])[0]
    question = query[12 : offset + 5]
    records = ZONE.get(qname, [])
    if records == "SILENT":
        return None
    rcode = {"NXDOMAIN": 3, "SERVFAIL": 2}.get(records, 0) if isinstance(records, str) else 0
    answers = []
    name, seen = qname, set()
    while not isinstance(ZONE.get(name), str) and name not in seen:
        seen.add(name)
        step = [r for r in ZONE.get(name, []) if r[0] in (TYPE_CNAME, qtype)]
        for rtype, ttl, value in step:
            if rtype == TYPE_CNAME:
                # compression pointer to the question name when possible, as real servers do
                owner = b"\xc0\x0c" if name == qname else _name(name)
                rdata = _name(value)
            else:
                owner, rdata = _name(name), ipaddress.ip_address(value).packed
            answers.append(owner + struct.pack("!HHIH", rtype, 1, ttl, len(rdata)) + rdata)
        cname = [v for t, _, v in step if t == TYPE_CNAME]
        if not cname:
            break
        name = cname[0]
    truncated = qname in TRUNCATE and not over_tcp
    if truncated:
        answers = []
    flags = 0x8180 | (0x0200 if truncated else 0) | rcode
    return struct.pack("!HHHHHH", qid, flags, 1, len(answers), 0, 0) + question + b"".join(answers)


@pytest.fixture
def dns_server():
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    port = udp.getsockname()[1]
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", port))
    tcp.listen()
    udp.settimeout(0.1)
    tcp.settimeout(0.1)
    stop = threading.Event()
    seen: list[str] = []

    def serve_udp():
        while not stop.is_set():
            try:
                data, peer = udp.recvfrom(4096)
            except socket.timeout:
                continue
            reply = _answer(data, over_tcp=False)
            seen.append("udp")
            if reply:
                udp.sendto(reply, peer)

    def serve_tcp():
        while not stop.is_set():
            try:
                conn, _ = tcp.accept()
            except socket.timeout:
                continue
            with conn:
                length = struct.unpack("!H", conn.recv(2))[0]
                reply = _answer(conn.recv(length), over_tcp=True)
                seen.append("tcp")
                conn.sendall(struct.pack("!H", len(reply)) + reply)

    threads = [threading.Thread(target=f, daemon=True) for f in (serve_udp, serve_tcp)]
    for t in threads:
        t.start()
    yield f"127.0.0.1:{port}", seen
    stop.set()
    for t in threads:
        t.join()
    udp.close()
    tcp.close()


def test_addresses_cname_chains_and_ttl(dns_server):
    server, _ = dns_server
    before = time.time()
    result = resolve_names(["pypi.org", "api.github.com"], resolver=server, timeout=2)
    assert result.addresses == {
        "pypi.org": ["151.101.0.223", "2a04:4e42::223"],
        "api.github.com": ["140.82.112.5", "140.82.112.6"],
    }
    assert result.errors == {}
    # the smallest TTL on any chain: the 50 s CNAME of api.github.com
    assert before + 50 - 1 <= result.expires_at <= time.time() + 50


def test_failures_are_reported_per_name(dns_server):
    server, _ = dns_server
    result = resolve_names(["gone.example.com", "broken.example.com", "silent.example.com", "loop.example.com", "pypi.org"], resolver=server, timeout=0.5)
    assert result.addresses == {"pypi.org": ["151.101.0.223", "2a04:4e42::223"]}
    assert "NXDOMAIN" in result.errors["gone.example.com"]
    assert "SERVFAIL" in result.errors["broken.example.com"]
    assert "no answer" in result.errors["silent.example.com"]
    assert "loop.example.com" in result.errors
    assert result.expires_at <= time.time() + resolve.ERROR_RETRY


def test_truncated_answers_are_retried_over_tcp(dns_server):
    server, seen = dns_server
    result = resolve_names(["big.example.com"], resolver=server, timeout=2)
    assert len(result.addresses["big.example.com"]) == 40
    assert "tcp" in seen


def test_resolve_policy_takes_exact_domains_only(dns_server):
    server, _ = dns_server
    policy = EgressPolicy.parse(["pypi.org:443", "*.pythonhosted.org", "10.0.0.0/8"])
    result = resolve_policy(policy, resolver=server)
    assert list(result.addresses) == ["pypi.org"]
    assert resolve_policy(EgressPolicy()).expires_at == float("inf")


def test_system_fallback_uses_the_default_ttl(monkeypatch):
    def fake_getaddrinfo(name, port, family=0, type=0):
        if name == "nope.example.com":
            raise socket.gaierror("Name or service not known")
        return [(socket.AF_INET, type, 6, "", ("192.0.2.1", 0)), (socket.AF_INET6, type, 6, "", ("2001:db8::1", 0, 0, 0))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    before = time.time()
    result = resolve_names(["a.example.com", "nope.example.com"])
    assert result.addresses == {"a.example.com": ["192.0.2.1", "2001:db8::1"]}
    assert "not known" in result.errors["nope.example.com"]
    assert result.expires_at <= before + resolve.DEFAULT_TTL + 1


@pytest.mark.parametrize("text, expected", [("10.0.0.2", ("10.0.0.2", 53)), ("127.0.0.1:5353", ("127.0.0.1", 5353)), ("[::1]:5353", ("::1", 5353)), ("::1", ("::1", 53))])
def test_parse_resolver(text, expected):
    assert resolve.parse_resolver(text) == expected


def test_parse_response_rejects_garbage():
    with pytest.raises(resolve.DNSFormatError):
        resolve.parse_response(b"\x00\x01")
    loop = struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"\xc0\x0c"
    with pytest.raises(resolve.DNSFormatError):
        resolve.parse_response(loop)
