"""Resolve the exact domains of a policy, with TTLs, at apply time.

Called by backends before compiling a policy for an address-based enforcer (nftables,
NetworkPolicy) and again when :attr:`Resolution.expires_at` passes, so the rules follow
the DNS answers. It asks the same resolver the sandbox will use (``resolver``), so the
addresses allowed are the ones the sandbox's own lookups return.

With ``resolver`` set it speaks DNS itself (standard library only): one UDP socket, all
A and AAAA queries sent at once, answers matched by id, source and question (a spoofed
or stray packet is ignored), CNAME chains followed, TTLs kept, TCP when an answer is
truncated. Without ``resolver`` it falls back to :func:`socket.getaddrinfo`, which has
no TTLs: :data:`DEFAULT_TTL` applies.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import math
import secrets
import select
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .model import EgressPolicy

DEFAULT_TTL = 60.0
#: bounds on how soon rules are refreshed: not in a tight loop, not never
MIN_TTL = 5.0
MAX_TTL = 3600.0
#: a failed name is retried this soon
ERROR_RETRY = 30.0

TYPE_A, TYPE_CNAME, TYPE_AAAA, TYPE_OPT = 1, 5, 28, 41
CLASS_IN = 1
_EDNS_UDP_SIZE = 1232  # the DNS-flag-day size: large answers, no IP fragmentation


@dataclass(frozen=True)
class Resolution:
    """Addresses per domain (sorted, IPv4 first), when to resolve again, and failures."""

    addresses: dict[str, list[str]] = field(default_factory=dict)
    expires_at: float = math.inf
    errors: dict[str, str] = field(default_factory=dict)


class DNSFormatError(ValueError):
    """A DNS message that cannot be parsed."""


def resolve_policy(policy: EgressPolicy, resolver: str | None = None, timeout: float = 2.0) -> Resolution:
    """Resolve every exact domain of ``policy`` (presets included); wildcards are skipped."""
    return resolve_names(policy.domains(), resolver=resolver, timeout=timeout)


def resolve_names(names: Iterable[str], resolver: str | None = None, timeout: float = 2.0) -> Resolution:
    """Resolve ``names`` (ASCII domains) through ``resolver`` (``ip``, ``ip:port``, ``[ip6]:port``)."""
    names = sorted(set(names))
    now = time.time()
    if not names:
        return Resolution({}, math.inf, {})
    if resolver is None:
        found, errors = _resolve_system(names, timeout)
    else:
        found, errors = _resolve_dns(names, parse_resolver(resolver), timeout)
    addresses: dict[str, list[str]] = {}
    ttls = []
    for name in names:
        if name in found and found[name][0]:
            addrs, ttl = found[name]
            addresses[name] = sorted(set(addrs), key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))
            ttls.append(min(max(ttl, MIN_TTL), MAX_TTL))
        else:
            errors.setdefault(name, "no A or AAAA record")
    if errors:
        ttls.append(ERROR_RETRY)
    return Resolution(addresses, now + min(ttls), errors)


def parse_resolver(text: str) -> tuple[str, int]:
    """``"10.0.0.2"`` → (ip, 53); ``"127.0.0.1:5353"`` and ``"[::1]:5353"`` carry a port."""
    host, port = text, 53
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            port = int(rest.lstrip(":"))
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = int(port_text)
    ipaddress.ip_address(host)  # a resolver is an address: never resolve the resolver
    return host, port


def upstream_from_resolv_conf(path: str = "/etc/resolv.conf") -> str | None:
    """The host's first nameserver: the default resolver of the local backend's DNS proxy
    (which runs on the host side, so loopback ones work) and of the Kubernetes backend."""
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    ipaddress.ip_address(parts[1].split("%")[0])
                    return parts[1]
    except (OSError, ValueError):
        return None
    return None


# --------------------------------------------------------------------------- messages


def build_query(qid: int, name: str, qtype: int) -> bytes:
    """A recursive query for ``name``/``qtype`` with an EDNS0 OPT record."""
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1)
    opt = b"\x00" + struct.pack("!HHIH", TYPE_OPT, _EDNS_UDP_SIZE, 0, 0)
    return header + encode_name(name) + struct.pack("!HH", qtype, CLASS_IN) + opt


def encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise ValueError(f"bad DNS label in {name!r}")
        out += bytes([len(raw)]) + raw
    return out + b"\x00"


def decode_name(msg: bytes, offset: int) -> tuple[str, int]:
    """Read a (possibly compressed) name at ``offset``; return it and the offset after it."""
    labels, end, jumps = [], None, 0
    while True:
        if offset >= len(msg):
            raise DNSFormatError("name runs past the end of the message")
        length = msg[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(msg):
                raise DNSFormatError("truncated compression pointer")
            jumps += 1
            if jumps > 32:
                raise DNSFormatError("compression pointer loop")
            if end is None:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | msg[offset + 1]
            continue
        if length & 0xC0:
            raise DNSFormatError("unknown label type")
        offset += 1
        if length == 0:
            break
        labels.append(msg[offset : offset + length].decode("ascii", "replace").lower())
        offset += length
    return ".".join(labels), end if end is not None else offset


@dataclass
class Answer:
    """What one response says: rcode, truncation, the question, and the records."""

    qid: int
    rcode: int
    truncated: bool
    question: tuple[str, int]
    cnames: dict[str, tuple[str, int]]
    addresses: dict[str, list[tuple[str, int]]]


def parse_response(msg: bytes) -> Answer:
    """Parse a response into an :class:`Answer`; :class:`DNSFormatError` if malformed."""
    if len(msg) < 12:
        raise DNSFormatError("shorter than a DNS header")
    qid, flags, qdcount, ancount, _, _ = struct.unpack("!HHHHHH", msg[:12])
    if not flags & 0x8000:
        raise DNSFormatError("not a response")
    offset, question = 12, ("", 0)
    for _ in range(qdcount):
        qname, offset = decode_name(msg, offset)
        if offset + 4 > len(msg):
            raise DNSFormatError("truncated question")
        qtype, _ = struct.unpack("!HH", msg[offset : offset + 4])
        offset += 4
        question = (qname, qtype)
    cnames: dict[str, tuple[str, int]] = {}
    addresses: dict[str, list[tuple[str, int]]] = {}
    for _ in range(ancount):
        owner, offset = decode_name(msg, offset)
        if offset + 10 > len(msg):
            raise DNSFormatError("truncated record")
        rtype, rclass, ttl, rdlen = struct.unpack("!HHIH", msg[offset : offset + 10])
        offset += 10
        rdata = msg[offset : offset + rdlen]
        if len(rdata) != rdlen:
            raise DNSFormatError("truncated record data")
        if rclass == CLASS_IN and rtype == TYPE_CNAME:
            cnames[owner] = (decode_name(msg, offset)[0], ttl)
        elif rclass == CLASS_IN and (rtype, rdlen) in ((TYPE_A, 4), (TYPE_AAAA, 16)):
            addresses.setdefault(owner, []).append((str(ipaddress.ip_address(rdata)), ttl))
        offset += rdlen
    return Answer(qid, flags & 0x000F, bool(flags & 0x0200), question, cnames, addresses)


def follow(answer: Answer, name: str) -> tuple[list[str], float]:
    """Addresses of ``name`` through its CNAME chain, and the smallest TTL on the way."""
    ttl, seen = math.inf, set()
    while name in answer.cnames and name not in seen:
        seen.add(name)
        name, cname_ttl = answer.cnames[name]
        ttl = min(ttl, cname_ttl)
    records = answer.addresses.get(name, [])
    for _, record_ttl in records:
        ttl = min(ttl, record_ttl)
    return [address for address, _ in records], ttl


_RCODES = {1: "the resolver could not parse the query (FORMERR)", 2: "the resolver failed (SERVFAIL)",
           3: "no such domain (NXDOMAIN)", 5: "the resolver refused the query (REFUSED)"}


# --------------------------------------------------------------------------- transports


def _resolve_dns(names: list[str], server: tuple[str, int], timeout: float):
    """Ask ``server`` A and AAAA for every name over one UDP socket (TCP if truncated)."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    pending: dict[int, tuple[str, int]] = {}
    for name in names:
        for qtype in (TYPE_A, TYPE_AAAA):
            qid = secrets.randbits(16)
            while qid in pending:
                qid = secrets.randbits(16)
            pending[qid] = (name, qtype)
    answers: dict[tuple[str, int], Answer | str] = {}
    truncated: list[tuple[int, tuple[str, int]]] = []
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        server_addr = socket.getaddrinfo(server[0], server[1], family, socket.SOCK_DGRAM)[0][4]
        sent_at: dict[int, float] = {}
        while pending and time.monotonic() < deadline:
            now = time.monotonic()
            for qid, (name, qtype) in pending.items():
                # send once, and once more after half the timeout (UDP may lose a packet)
                if qid not in sent_at or (now - sent_at[qid] > timeout / 2 and sent_at[qid] >= 0):
                    sock.sendto(build_query(qid, name, qtype), server_addr)
                    sent_at[qid] = now if qid not in sent_at else -1.0
            ready, _, _ = select.select([sock], [], [], min(0.05, max(0.0, deadline - now)))
            if not ready:
                continue
            while True:
                try:
                    data, source = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                if source[:2] != server_addr[:2]:
                    continue  # not from our resolver: ignore (spoofing defence)
                try:
                    answer = parse_response(data)
                except DNSFormatError:
                    continue
                key = pending.get(answer.qid)
                if key is None or answer.question != key:
                    continue
                del pending[answer.qid]
                if answer.truncated:
                    truncated.append((answer.qid, key))
                else:
                    answers[key] = answer
    for qid, key in truncated:
        try:
            answers[key] = _query_tcp(server, family, qid, key, deadline)
        except (OSError, DNSFormatError) as err:
            answers[key] = f"TCP query failed: {err}"
    for key in pending.values():
        answers[key] = f"no answer from {server[0]} within {timeout:g} s"
    return _collect(names, answers)


def _query_tcp(server: tuple[str, int], family: int, qid: int, key: tuple[str, int], deadline: float) -> Answer:
    query = build_query(qid, *key)
    with socket.create_connection(server, timeout=max(0.1, deadline - time.monotonic())) as conn:
        conn.sendall(struct.pack("!H", len(query)) + query)
        length = struct.unpack("!H", _recv_exact(conn, 2))[0]
        answer = parse_response(_recv_exact(conn, length))
    if answer.qid != qid or answer.question != key:
        raise DNSFormatError("TCP answer does not match the question")
    return answer


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise DNSFormatError("connection closed mid-message")
        data += chunk
    return data


def _collect(names: list[str], answers: dict[tuple[str, int], Answer | str]):
    found: dict[str, tuple[list[str], float]] = {}
    errors: dict[str, str] = {}
    for name in names:
        addrs: list[str] = []
        ttl = math.inf
        problems = []
        for qtype in (TYPE_A, TYPE_AAAA):
            answer = answers.get((name, qtype))
            if isinstance(answer, str) or answer is None:
                problems.append(answer or "no answer")
            elif answer.rcode:
                problems.append(_RCODES.get(answer.rcode, f"DNS error (rcode {answer.rcode})"))
            else:
                got, got_ttl = follow(answer, name)
                addrs += got
                ttl = min(ttl, got_ttl)
        if addrs:
            found[name] = (addrs, ttl)
        elif problems:
            errors[name] = problems[0]
    return found, errors


def _resolve_system(names: list[str], timeout: float):
    """getaddrinfo in threads (it has no timeout of its own); TTL is DEFAULT_TTL."""
    found: dict[str, tuple[list[str], float]] = {}
    errors: dict[str, str] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(names)))
    try:
        futures = {pool.submit(socket.getaddrinfo, name, None, 0, socket.SOCK_STREAM): name for name in names}
        done, not_done = concurrent.futures.wait(futures, timeout=timeout)
        for future in done:
            name = futures[future]
            try:
                infos = future.result()
            except OSError as err:
                errors[name] = f"lookup failed: {err}"
                continue
            found[name] = ([info[4][0].split("%")[0] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)], DEFAULT_TTL)
        for future in not_done:
            errors[futures[future]] = f"no answer within {timeout:g} s"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return found, errors
