"""The sandbox's DNS resolver: answers only for names the policy allows.

The local backend points the sandbox's ``/etc/resolv.conf`` at 127.0.0.53, where this
proxy listens — inside the sandbox's network namespace, but run by the kernel process,
outside the sandbox. For each query it decides with the policy in force:

- a name the policy allows (an exact domain, a name under a wildcard, or any name when
  the allowlist has CIDR entries, which are judged at connect time) is forwarded to the
  upstream resolver; the addresses in the answer are added to the nftables set of the
  matching entry *before* the answer is relayed, so a wildcard entry (``*.pythonhosted.org``)
  opens exactly the addresses its names resolve to, for every process in the sandbox;
- any other name gets REFUSED at once, and is reported as a blocked lookup (a notice);
- an answer's address that the ceiling's :class:`~sandbox_kernel.policy.destinations.AddressScreen`
  refuses (always blocked, or not globally routable and not permitted: ``10-0-0-5.nip.io``)
  joins no set and is reported as a blocked connection to that name: an allowed name can
  never open a private or in-cluster address.

This also closes the simplest DNS exfiltration path: names outside the policy never reach
an outside resolver. The sandbox cannot make the proxy (a task of the kernel process) hold
more than :data:`MAX_INFLIGHT` upstream queries at once: past that, a query is dropped (the
client retries), so a flood against a slow upstream costs neither descriptors nor memory. Queries come over UDP and TCP (a client retries over TCP when a UDP
answer was truncated); each is forwarded upstream over the transport it came on.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from typing import Any, Callable

import dns.flags
import dns.message
import dns.opcode
import dns.rcode

from ..agent.protocol import BlockedRecord, blocked_record
from ..policy.compile_nftables import set_for_entry
from ..policy.resolve import DNSFormatError, from_wire, name_text, parse_resolver, parse_response
from .netns import in_netns

LISTEN = ("127.0.0.53", 53)
TCP_IDLE = 10.0  # seconds a TCP client may keep a connection without a query
TCP_MAX_CLIENTS = 64
MAX_INFLIGHT = 64  # upstream queries (UDP and TCP) waiting for an answer at once
TYPE_A, TYPE_AAAA = 1, 28


def upstream_from_resolv_conf(path: str = "/etc/resolv.conf") -> str | None:
    """The host's first nameserver (the proxy runs on the host side, so loopback ones work)."""
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


def name_matches(entry, name: str) -> bool:
    """Whether ``name`` falls under a domain or wildcard entry (whatever its ports)."""
    name = name.lower().rstrip(".")
    if entry.kind == "domain":
        return name == entry.value
    if entry.kind == "wildcard":
        suffix = entry.value[1:]  # ".pythonhosted.org"
        head = name[: -len(suffix)] if name.endswith(suffix) else ""
        return bool(head) and "." not in head
    return False


def parse_question(query: bytes) -> tuple[int, str, int]:
    """(id, name, qtype) of a query (dnspython reads its header and question, nothing after);
    DNSFormatError when it is not one question, or not a query."""
    message = from_wire(query, question_only=True)
    if message.flags & dns.flags.QR or len(message.question) != 1:
        raise DNSFormatError("not a single-question query")
    (question,) = message.question
    return message.id, name_text(question.name), int(question.rdtype)


def bind_here() -> tuple[socket.socket, socket.socket]:
    """The proxy's UDP and TCP sockets on :data:`LISTEN` in the calling thread's namespace."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        udp.bind(LISTEN)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind(LISTEN)
        tcp.listen(16)
    except BaseException:
        udp.close()
        tcp.close()
        raise
    udp.setblocking(False)
    tcp.setblocking(False)
    return udp, tcp


def refused(query: bytes) -> bytes:
    """A REFUSED answer to ``query`` (same id and question, as it was sent, no records)."""
    return _answer_with(from_wire(query, question_only=True), dns.rcode.REFUSED)


def format_error(query: bytes) -> bytes | None:
    """A FORMERR answer to a malformed query: its id, no question; None when not even a DNS
    header came (nothing to answer to)."""
    if len(query) < 12:
        return None
    response = dns.message.Message(id=int.from_bytes(query[:2], "big"))
    response.flags = dns.flags.QR | dns.flags.RA | (int.from_bytes(query[2:4], "big") & dns.flags.RD)
    response.set_rcode(dns.rcode.FORMERR)
    return response.to_wire()


def _answer_with(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    response = dns.message.make_response(query, recursion_available=True)
    response.set_opcode(dns.opcode.QUERY)
    response.set_rcode(rcode)
    return response.to_wire()


class DnsProxy(asyncio.DatagramProtocol):
    """Serves one sandbox. Created and closed by the local backend."""

    def __init__(self, *, policy: Callable[[], Any], upstream: str, add_addresses: Callable[[list[tuple[str, str]]], None],
                 report: Callable[[BlockedRecord], None], log,
                 observe: Callable[[BlockedRecord], None] | None = None,
                 screen: Any = None):
        self._policy = policy
        self._upstream = parse_resolver(upstream)
        self._add = add_addresses
        self._report = report
        self._observe = observe  # learn mode: names answered, with their addresses
        self._log = log
        self._screen = screen
        self._transport: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._tcp_clients: set[asyncio.Task] = set()
        self._tasks: set[asyncio.Task] = set()
        self.inflight = 0  # upstream queries waiting for an answer
        self.shed = 0  # queries dropped because MAX_INFLIGHT were in flight

    @classmethod
    async def start(cls, netns_path: str | None, *, sockets: tuple[socket.socket, socket.socket] | None = None,
                    **kwargs) -> DnsProxy:
        """Listen in the namespace at ``netns_path``, or on ``sockets`` made there already
        (:func:`bind_here`, run by the rootless backend's helper)."""
        if sockets is None:
            assert netns_path is not None
            sockets = await asyncio.to_thread(in_netns, netns_path, bind_here)
        udp, tcp = sockets
        proxy = cls(**kwargs)
        try:
            await asyncio.get_running_loop().create_datagram_endpoint(lambda: proxy, sock=udp)
            proxy._tcp = await asyncio.start_server(proxy._serve_tcp, sock=tcp)
        except BaseException:
            proxy.close()
            udp.close()
            tcp.close()
            raise
        return proxy

    def connection_made(self, transport) -> None:
        self._transport = transport

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        for task in list(self._tcp_clients) + list(self._tasks):
            task.cancel()

    def datagram_received(self, data: bytes, addr) -> None:
        # a refusal is answered here and now; only an allowed name becomes a task, and only
        # while fewer than MAX_INFLIGHT are waiting for the upstream
        try:
            _, name, _ = parse_question(data)
        except DNSFormatError:
            answer = format_error(data)
            if answer is not None and self._transport is not None:
                self._transport.sendto(answer, addr)
            return
        if not self.decide(name)[0]:
            response = self._refuse(data, name)
            if self._transport is not None:
                self._transport.sendto(response, addr)
            return
        if len(self._tasks) >= MAX_INFLIGHT:
            self._shed()
            return
        task = asyncio.ensure_future(self._answer_udp(data, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _shed(self) -> None:
        self.shed += 1
        if self.shed in (1, 1000) or self.shed % 100_000 == 0:
            self._log.warning("DNS proxy: %d queries dropped, %d already waiting for the upstream",
                              self.shed, MAX_INFLIGHT)

    async def _answer_udp(self, query: bytes, addr) -> None:
        response = await self._answer(query, self._forward)
        if response is not None and self._transport is not None:
            self._transport.sendto(response, addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """DNS over TCP (RFC 7766): two-byte length, message; several queries per connection,
        answered in order; closed after :data:`TCP_IDLE` s without a query."""
        task = asyncio.current_task()
        if len(self._tcp_clients) >= TCP_MAX_CLIENTS:
            writer.close()
            return
        self._tcp_clients.add(task)
        try:
            while True:
                size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TCP_IDLE))[0]
                query = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE)
                response = await self._answer(query, self._forward_tcp)
                if response is None:
                    break
                writer.write(struct.pack("!H", len(response)) + response)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tcp_clients.discard(task)
            writer.close()

    # -- deciding -----------------------------------------------------------------------
    def decide(self, name: str) -> tuple[bool, list]:
        """Whether ``name`` may be resolved, and the entries whose sets its addresses join."""
        policy = self._policy()
        if policy is None or policy.mode != "allowlist":
            return False, []
        entries = policy.expanded_entries()
        matching = [e for e in entries if name_matches(e, name)]
        if matching:
            return True, matching
        # a CIDR entry may cover whatever this name resolves to: connect() decides
        return any(e.kind == "cidr" for e in entries), []

    async def _answer(self, query: bytes, forward: Callable[[bytes], Any]) -> bytes | None:
        """The response to relay (None: none, e.g. a malformed query or upstream down)."""
        try:
            _, name, qtype = parse_question(query)
        except DNSFormatError:
            return format_error(query)
        allowed, entries = self.decide(name)
        if not allowed:
            return self._refuse(query, name)
        if self.inflight >= MAX_INFLIGHT:
            self._shed()
            return None
        self.inflight += 1
        try:
            response = await forward(query)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as err:
            self._log.warning("DNS upstream %s failed for %s: %s", self._upstream, name, err)
            return None
        finally:
            self.inflight -= 1
        addresses = []
        if qtype in (TYPE_A, TYPE_AAAA):
            try:
                answer = parse_response(response)
                addresses = [a for records in answer.addresses.values() for a, _ in records]
            except DNSFormatError:
                addresses = []
        if self._observe is not None:
            record = blocked_record(host=name, protocol="dns", verdict="allowed")
            record["addresses"] = addresses
            self._observe(record)
        if entries and addresses:
            addresses = self._screened(name, qtype, addresses)
            elements = [(set_for_entry(entry, a), a) for entry in entries for a in addresses]
            if elements:
                try:
                    await asyncio.to_thread(self._add, elements)
                except Exception as err:  # noqa: BLE001 - the answer still goes out; connect is refused
                    self._log.warning("could not open %s for %s: %s", addresses, name, err)
        return response

    def _screened(self, name: str, qtype: int, addresses: list[str]) -> list[str]:
        """``addresses`` the screen lets ``name`` open; each refused one is reported."""
        if self._screen is None:
            return addresses
        kept = []
        for address in addresses:
            why = self._screen.why_not(address)
            if why is None:
                kept.append(address)
                continue
            self._log.warning("DNS answer for %s: not opening %s: %s", name, address, why)
            self._report(blocked_record(host=name, ip=address, protocol="dns", verdict="rejected",
                                        attempt=f"dns-screen:{name}:{address}"))
        return kept

    def _refuse(self, query: bytes, name: str) -> bytes:
        """REFUSED for a name outside the policy, reported as a blocked lookup."""
        qid, _, qtype = parse_question(query)
        self._report(blocked_record(host=name, protocol="dns", verdict="rejected", attempt=f"dns:{qid}:{qtype}"))
        return refused(query)

    async def _forward(self, query: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self._upstream[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            await loop.sock_connect(sock, self._upstream)
            await loop.sock_sendall(sock, query)
            return await asyncio.wait_for(loop.sock_recv(sock, 65535), 3.0)

    async def _forward_tcp(self, query: bytes) -> bytes:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*self._upstream), 3.0)
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 3.0))[0]
            return await asyncio.wait_for(reader.readexactly(size), 3.0)
        finally:
            writer.close()


__all__ = ["DnsProxy", "upstream_from_resolv_conf", "LISTEN"]
