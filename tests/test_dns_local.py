"""The sandbox's DNS proxy: allowed names resolve (wildcards open their addresses),
other names are refused at once and reported. The upstream is a fake DNS server on
127.0.0.1 run by the test; no query leaves the machine."""

import socket
import struct
import threading

import pytest

from fakedns import FakeUpstream
from kerneltest import KernelDriver

# each kernel test runs against a root kernel and a rootless one (uid 65534; conftest.py)
pytestmark = pytest.mark.both_modes


@pytest.fixture
def upstream():
    server = FakeUpstream()
    yield server
    server.close()


@pytest.fixture
def kernel(upstream, kernel_mode, request):
    name = request.getfixturevalue("rootless_kernels").name if kernel_mode == "rootless" else "sandbox"
    driver = KernelDriver({"SANDBOX_KERNEL_UPSTREAM_DNS": f"127.0.0.1:{upstream.port}",
                           "SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "any"}, name)
    yield driver
    driver.shutdown()


CONNECT = "import socket\nprint('REPLY', socket.create_connection(({name!r}, 8080), timeout=3).recv(5))"
SUBPROCESS = "!python3 -c \"import socket; print('REPLY', socket.create_connection(('{name}', 8080), timeout=3).recv(5))\""


def test_wildcard_opens_exactly_the_addresses_its_names_resolve_to(kernel, upstream, test_host):
    a, b = test_host(8080), test_host(8080)
    upstream.records.update({"one.wild.test": a.ip, "two.wild.test": b.ip, "deep.one.wild.test": a.ip})
    assert kernel.execute("%sandbox allow *.wild.test:8080/tcp").status == "ok"
    # python, through the guard and the proxy
    assert "REPLY" in kernel.execute(CONNECT.format(name="one.wild.test")).stream()
    # a subprocess the guard never sees: only the proxy opens the address
    assert "REPLY" in kernel.execute(SUBPROCESS.format(name="two.wild.test")).stream()
    # one label only: deep.one.wild.test is not covered, even though it resolves to an allowed host
    cell = kernel.execute(SUBPROCESS.format(name="deep.one.wild.test") + " 2>&1")
    assert "REPLY" not in cell.stream()
    assert "deep.one.wild.test" not in upstream.queries  # refused before any upstream query
    # the address of an allowed name is open only on the allowed port
    cell = kernel.execute(f"import socket\nsocket.create_connection(({a.ip!r}, 8081), timeout=3)")
    assert cell.status == "error"


def test_names_outside_the_policy_are_refused_and_reported(kernel, upstream, test_host):
    host = test_host(8080)
    upstream.records["elsewhere.test"] = host.ip
    cell = kernel.execute("!getent hosts elsewhere.test || echo refused")
    assert "refused" in cell.stream()
    notices = cell.sandbox["blocked"]
    assert [(n["host"], n["protocol"], n["verdict"]) for n in notices] == [("elsewhere.test", "dns", "rejected")]
    assert notices[0]["remedy"]["command"] == "%sandbox allow elsewhere.test"
    assert upstream.queries == []  # default-deny: not even the lookup left the machine


def test_exact_domain_resolved_at_apply_time(kernel, upstream, test_host):
    host = test_host(8080)
    upstream.records["exact.test"] = host.ip
    assert kernel.execute("%sandbox allow exact.test:8080/tcp").status == "ok"
    assert "exact.test" in upstream.queries  # resolved by the kernel when the policy was applied
    assert "REPLY" in kernel.execute(SUBPROCESS.format(name="exact.test")).stream()


TCP_QUERY = """
import socket, struct
def ask(name):
    q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\\0" + struct.pack("!HH", 1, 1)
    with socket.create_connection(("127.0.0.53", 53), timeout=5) as s:
        s.sendall(struct.pack("!H", len(q)) + q)
        size = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
        r = s.recv(size, socket.MSG_WAITALL)
    rcode, answers = r[3] & 0xF, struct.unpack("!H", r[6:8])[0]
    return rcode, socket.inet_ntoa(r[-4:]) if answers else None
"""


def test_dns_over_tcp_is_answered_by_the_same_rules(kernel, upstream, test_host):
    """A client retries over TCP when a UDP answer is truncated: the proxy answers TCP
    too, with the same decisions, and opens the addresses it relays."""
    host = test_host(8080)
    upstream.records.update({"tcp.wild.test": host.ip, "outside.test": host.ip})
    assert kernel.execute("%sandbox allow *.wild.test:8080/tcp").status == "ok"
    assert kernel.execute(TCP_QUERY).status == "ok"
    assert "REPLY" not in kernel.execute(SUBPROCESS.format(name=host.ip) + " 2>&1").stream()  # not yet resolved
    cell = kernel.execute("print('ANSWER', ask('tcp.wild.test'))")
    assert f"ANSWER (0, '{host.ip}')" in cell.stream(), cell.outputs
    assert ("tcp.wild.test", "tcp") in upstream.transports  # forwarded over TCP as it came
    # the relayed address is open, for a process the guard never sees
    assert "REPLY" in kernel.execute(SUBPROCESS.format(name=host.ip)).stream()
    cell = kernel.execute("print('ANSWER', ask('outside.test'))")
    assert "ANSWER (5, None)" in cell.stream()  # REFUSED, never forwarded
    assert "outside.test" not in upstream.queries
    assert [(n["host"], n["protocol"]) for n in cell.sandbox["blocked"]] == [("outside.test", "dns")]


def test_a_wildcards_learned_addresses_survive_a_reapply_and_go_with_the_wildcard(kernel, upstream, test_host):
    """Every packet is judged by the policy in force (issue 20, point 4), so a re-apply that
    keeps a wildcard keeps the addresses its names opened, and revoking it closes exactly them."""
    a, b = test_host(8080), test_host(8080)
    upstream.records.update({"one.keep.test": a.ip, "one.other.test": b.ip})
    assert kernel.execute("%sandbox allow *.keep.test:8080/tcp *.other.test:8080/tcp").status == "ok"
    assert "REPLY" in kernel.execute(SUBPROCESS.format(name="one.keep.test")).stream()
    assert "REPLY" in kernel.execute(SUBPROCESS.format(name="one.other.test")).stream()
    # an unrelated change re-applies the whole ruleset: the learned address stays open
    assert kernel.execute(f"%sandbox allow {b.ip}:9/udp").status == "ok"
    assert "REPLY" in kernel.execute(SUBPROCESS.format(name=a.ip)).stream()
    # revoking one wildcard (same protocol and port as the other) closes only its addresses
    assert kernel.execute("%sandbox revoke *.keep.test:8080/tcp").status == "ok"
    assert "REPLY" not in kernel.execute(SUBPROCESS.format(name=a.ip) + " 2>&1").stream()
    assert "REPLY" in kernel.execute(SUBPROCESS.format(name=b.ip)).stream()


UPLINK_PROBE = """
import socket
import sandbox_agent.guard as guard
guard.enabled = False  # advisory only: this probes the network rules
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
try:
    s.connect(({target!r}, 53))
    s.send(b"probe")
    s.recv(512); print("ANSWERED")
except socket.timeout:
    print("TIMEOUT")
except OSError as err:
    print("REFUSED", type(err).__name__)
finally:
    guard.enabled = True
"""


def test_the_uplinks_own_ranges_stay_closed_whatever_the_policy(kernel, upstream):
    """slirp4netns's resolver (10.0.2.3) would forward to the host's resolver, past the DNS
    proxy: no entry opens the uplink's ranges, neither a name resolving there nor a CIDR
    (issue 20, point 5). The probe is refused inside the sandbox's namespace: nothing leaves."""
    upstream.records["slirpdns.test"] = "10.0.2.3"
    # the ceiling knows the uplink's ranges: an entry inside them is refused, saying why
    for entry in ("10.0.2.0/24", "10.0.2.3:53/udp", "[fd00::3]:53"):
        refused = kernel.execute(f"%sandbox allow {entry}")
        assert refused.reply["content"]["ename"] == "CeilingRefused", (entry, refused.reply["content"])
        assert "the sandbox's own" in refused.reply["content"]["evalue"]
    # a name cannot be judged before it resolves: the enforcer drops its uplink address
    change = kernel.execute("%sandbox allow slirpdns.test:53/udp")
    assert change.status == "ok", change.outputs
    for target, ip in (("slirpdns.test", "10.0.2.3"), ("10.0.2.3", "10.0.2.3"), ("10.0.2.2", "10.0.2.2")):
        cell = kernel.execute(UPLINK_PROBE.format(target=target), timeout=30)
        assert "REFUSED" in cell.stream(), (target, cell.stream(), cell.outputs)
        # a name's answer inside the uplink's (private) range is screened by the DNS proxy too,
        # and that is reported with the name (issue 15 point 2)
        screened = [(ip, None, "dns")] if target == "slirpdns.test" else []
        assert [(n["ip"], n["port"], n["protocol"]) for n in cell.sandbox["blocked"]] == screened + [(ip, 53, "udp")]
    cell = kernel.execute(UPLINK_PROBE.format(target="fd00::3").replace("AF_INET,", "AF_INET6,"), timeout=30)
    assert "REFUSED" in cell.stream(), cell.stream()
    kernel.execute("%sandbox mode deny")


def test_a_flood_against_a_slow_upstream_holds_few_descriptors(fresh_kernel):
    """Queries for an allowed name while the upstream never answers: the proxy (in the kernel
    process) forwards at most MAX_INFLIGHT at once and drops the rest; a refusal is still
    answered at once meanwhile."""
    import os

    from sandbox_kernel.backends.local.dnsproxy import MAX_INFLIGHT

    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # an upstream that never answers
    silent.bind(("127.0.0.1", 0))
    try:
        kernel = fresh_kernel({"SANDBOX_KERNEL_UPSTREAM_DNS": f"127.0.0.1:{silent.getsockname()[1]}",
                               "SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "any"})
        assert kernel.execute("%sandbox allow slow.test:443").status == "ok"
        fds = f"/proc/{kernel.pid}/fd"
        before = len(os.listdir(fds))
        peak = [before]
        done = threading.Event()

        def sample():
            while not done.is_set():
                peak.append(len(os.listdir(fds)))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            cell = kernel.execute(
                "import socket, struct, time\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                "def query(name, qid):\n    return struct.pack('!HHHHHH', qid, 0x0100, 1, 0, 0, 0) + "
                "b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\\0\\0\\1\\0\\1'\n"
                "for i in range(3000):\n    s.sendto(query('slow.test', i), ('127.0.0.53', 53))\n"
                # while the flood waits upstream, a name outside the policy is still refused (asked
                # again as a resolver would: the flood may overrun the socket's buffer)
                "s.settimeout(0.5)\nanswer = b''\n"
                "for attempt in range(40):\n    s.sendto(query('other.test', 65000), ('127.0.0.53', 53))\n"
                "    try:\n        while answer[:2] != struct.pack('!H', 65000):\n            answer = s.recv(512)\n"
                "        break\n    except OSError:\n        pass\n"
                "print('RCODE', answer[3] & 15)\ntime.sleep(1)", timeout=60)
        finally:
            done.set()
            sampler.join()
        assert "RCODE 5" in cell.stream(), cell.outputs
        assert max(peak) - before <= MAX_INFLIGHT + 16, (before, max(peak))
    finally:
        silent.close()
