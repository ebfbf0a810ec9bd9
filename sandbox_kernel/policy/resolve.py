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

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype

from .model import EgressPolicy

DEFAULT_TTL = 60.0
#: bounds on how soon rules are refreshed: not in a tight loop, not never
MIN_TTL = 5.0
MAX_TTL = 3600.0
#: a failed name is retried this soon
ERROR_RETRY = 30.0

TYPE_A, TYPE_CNAME, TYPE_AAAA = 1, 5, 28
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


# --------------------------------------------------------------------------- messages


def build_query(qid: int, name: str, qtype: int) -> bytes:
    """A recursive query for ``name``/``qtype`` with an EDNS0 OPT record (dnspython)."""
    try:
        query = dns.message.make_query(_name(name), qtype, use_edns=0, payload=_EDNS_UDP_SIZE, id=qid)
    except dns.exception.DNSException as err:
        raise ValueError(f"bad DNS name {name!r}: {err}") from None
    return query.to_wire()


def _name(text: str) -> dns.name.Name:
    """``text`` as an absolute DNS name: ASCII labels of 1 to 63 bytes (ValueError if not)."""
    labels = text.rstrip(".").split(".")
    if any(not 0 < len(label.encode("ascii", "replace")) < 64 for label in labels) or not text.isascii():
        raise ValueError(f"bad DNS label in {text!r}")
    try:
        return dns.name.from_text(text.rstrip(".") + ".")
    except dns.exception.DNSException as err:
        raise ValueError(f"bad DNS name {text!r}: {err}") from None


def name_text(name: dns.name.Name) -> str:
    """A name as the policy compares it: lower case, no final dot, the root as ``""``."""
    if name == dns.name.root:
        return ""
    return name.to_text(omit_final_dot=True).lower()


def from_wire(msg: bytes, *, question_only: bool = False) -> dns.message.Message:
    """A DNS message parsed by dnspython; :class:`DNSFormatError` for anything malformed
    (it may come from the sandbox: nothing it sends raises anything else)."""
    try:
        return dns.message.from_wire(msg, question_only=question_only, ignore_trailing=question_only)
    except dns.exception.DNSException as err:
        raise DNSFormatError(f"malformed DNS message: {type(err).__name__}: {err}") from None
    except (ValueError, IndexError, TypeError, UnicodeError) as err:  # dnspython's own checks
        raise DNSFormatError(f"malformed DNS message: {err}") from None


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
    message = from_wire(msg)
    if not message.flags & dns.flags.QR:
        raise DNSFormatError("not a response")
    question = ("", 0)
    for rrset in message.question:
        question = (name_text(rrset.name), int(rrset.rdtype))
    cnames: dict[str, tuple[str, int]] = {}
    addresses: dict[str, list[tuple[str, int]]] = {}
    for rrset in message.answer:
        if rrset.rdclass != dns.rdataclass.IN:
            continue
        owner = name_text(rrset.name)
        if rrset.rdtype == dns.rdatatype.CNAME:
            for rdata in rrset:
                cnames[owner] = (name_text(rdata.target), int(rrset.ttl))
        elif rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            for rdata in rrset:
                addresses.setdefault(owner, []).append((str(ipaddress.ip_address(rdata.address)), int(rrset.ttl)))
    return Answer(message.id, message.rcode() & 0x000F, bool(message.flags & dns.flags.TC), question,
                  cnames, addresses)


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
