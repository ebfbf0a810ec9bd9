"""Egress policy end to end on the local backend: allowlist exactly, switch back to deny."""

import re
import subprocess

import pytest

# each kernel test runs against a root kernel and a rootless one (uid 65534; conftest.py)
pytestmark = pytest.mark.both_modes


@pytest.fixture(scope="module")
def _module_kernel():
    from kerneltest import shared_kernel

    yield from shared_kernel({"SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "any"})


@pytest.fixture
def kernel(_module_kernel):
    from kerneltest import reset_between_tests

    return reset_between_tests(_module_kernel)


def connect(kernel, ip, port, family="AF_INET", kind="SOCK_STREAM"):
    """Try a connection from the sandbox; return (reached, cell)."""
    if kind == "SOCK_DGRAM":
        code = (f"import socket\ns = socket.socket(socket.{family}, socket.SOCK_DGRAM); s.settimeout(2)\n"
                f"s.sendto(b'ping', ({ip!r}, {port}))\nprint('REPLY', s.recvfrom(10)[0])")
    else:
        code = (f"import socket\nc = socket.create_connection(({ip!r}, {port}), timeout=3)\n"
                "print('REPLY', c.recv(100))")
    cell = kernel.execute(code, timeout=30)
    return "REPLY" in cell.stream(), cell


def test_allowlist_reaches_exactly_the_allowed_host_and_port(kernel, test_host):
    a, b = test_host(8080), test_host(8080)
    change = kernel.execute(f"%sandbox allow {a.ip}:8080/tcp")
    assert change.status == "ok", change.outputs
    assert "egress now: allowlist (1 entry)" in change.stream()

    reached, cell = connect(kernel, a.ip, 8080)
    assert reached, cell.outputs
    assert "hello from test host" in cell.stream()
    assert cell.sandbox["blocked"] == []
    seen = a.seen()
    assert seen == 1

    for ip, port, family, kind in [
        (a.ip, 8081, "AF_INET", "SOCK_STREAM"),      # another port on the same host
        (b.ip, 8080, "AF_INET", "SOCK_STREAM"),      # another host
        (a.ip6, 8080, "AF_INET6", "SOCK_STREAM"),    # the same host over IPv6
        (a.ip, 8080, "AF_INET", "SOCK_DGRAM"),       # UDP to the allowed port
        ("169.254.169.254", 80, "AF_INET", "SOCK_STREAM"),  # cloud metadata
    ]:
        reached, cell = connect(kernel, ip, port, family, kind)
        assert not reached, (ip, port, kind)
        assert cell.status == "error"
        assert cell.sandbox["duration_ms"] < 2500  # refused, not a hang
    assert a.seen() == seen and b.seen() == 0

    # back to deny: new connections are refused at once
    change = kernel.execute("%sandbox mode deny")
    assert "egress now: default-deny" in change.stream()
    reached, cell = connect(kernel, a.ip, 8080)
    assert not reached and cell.status == "error"
    assert a.seen() == seen


def test_the_sandbox_cannot_widen_its_own_policy(kernel, test_host):
    a = test_host(8080)
    # %sandbox inside indented code goes to the sandbox, where it has no power
    cell = kernel.execute(f"if True:\n    %sandbox allow {a.ip}:8080\n")
    assert cell.status == "error"
    reached, _ = connect(kernel, a.ip, 8080)
    assert not reached and a.seen() == 0
    # nor can the agent's guard be switched off to open anything: the network still refuses
    kernel.execute("import sandbox_agent.guard as g\ng.enabled = False")
    reached, _ = connect(kernel, a.ip, 8080)
    assert not reached and a.seen() == 0
    kernel.execute("g.enabled = True")


def test_bad_entries_and_ceiling_change_nothing(kernel, test_host):
    a = test_host(8080)
    kernel.execute(f"%sandbox allow {a.ip}:8080")
    before = kernel.execute("%sandbox status").of_type("display_data")[0]["content"]["data"]["text/plain"]
    for line, ename in [
        ("%sandbox allow 10.0.0.1/8", "InvalidEntry"),          # host bits set
        ("%sandbox allow example.com:70000", "InvalidEntry"),   # port out of range
        ("%sandbox allow 169.254.169.254", "CeilingRefused"),    # always blocked
        ("%sandbox allow ok.example.com:443 a.*.b", "InvalidEntry"),  # one bad entry: none added
    ]:
        cell = kernel.execute(line)
        assert cell.status == "error", line
        assert cell.reply["content"]["ename"] == ename, (line, cell.reply["content"])
    after = kernel.execute("%sandbox status").of_type("display_data")[0]["content"]["data"]["text/plain"]
    strip = lambda text: [l for l in text.splitlines() if not l.startswith(("applied", "recent"))]  # noqa: E731
    assert strip(before) == strip(after)
    assert connect(kernel, a.ip, 8080)[0]
    kernel.execute("%sandbox revoke " + f"{a.ip}:8080")
    assert not connect(kernel, a.ip, 8080)[0]


def test_a_preset_is_revoked_by_name_and_a_missing_one_changes_nothing(kernel):
    kernel.execute("%sandbox mode deny")
    added = kernel.execute("%sandbox preset pypi")
    assert added.status == "ok", added.reply["content"]
    assert kernel.execute("%sandbox revoke preset github").reply["content"]["ename"] == "EntryNotFound"
    assert kernel.execute("%sandbox revoke preset").reply["content"]["ename"] == "UsageError"
    assert re.search(r"^presets +pypi$", _status(kernel), re.M)  # the refusals changed nothing
    removed = kernel.execute("%sandbox revoke preset pypi")
    assert removed.status == "ok", removed.reply["content"]
    # revoking keeps the mode, as for entries
    line = removed.stream().splitlines()[0]
    assert re.match(r"egress now: allowlist \(\d+ entr(y|ies)\)", line) and "preset" not in line, line
    assert re.search(r"^presets +none$", _status(kernel), re.M)
    kernel.execute("%sandbox mode deny")


def _status(kernel) -> str:
    return kernel.execute("%sandbox status").of_type("display_data")[0]["content"]["data"]["text/plain"]


def test_exam_mode_refuses_every_change(fresh_kernel):
    kernel = fresh_kernel({"SANDBOX_KERNEL_POLICY_LOCKED": "true"})
    for line in ("%sandbox allow pypi.org:443", "%sandbox mode allowlist", "%sandbox preset pypi"):
        cell = kernel.execute(line)
        assert cell.status == "error"
        assert "administrator" in cell.reply["content"]["evalue"]
        assert "exam mode" in cell.reply["content"]["evalue"]
    assert "locked by your administrator" in kernel.execute("%sandbox status").of_type(
        "display_data")[0]["content"]["data"]["text/plain"]


# -- narrowing cuts flows that are already open (issue 20, point 4) ----------------------

FLOWS = r"""
import socket, threading, time
flows = {"tcp_sent": 0, "tcp_error": None, "udp_sent": 0, "udp_error": None, "stop": False}
tcp = socket.create_connection((IP, SINK), timeout=3)
tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.connect((IP, PORT))
udp.send(b"hello"); udp.settimeout(3); udp.recv(10)   # a reply: the flow is established
def pump(sock, key):
    while not flows["stop"]:
        try:
            sock.send(b"x" * 64)
            flows[key + "_sent"] += 1
        except OSError as err:
            flows[key + "_error"] = type(err).__name__
            flows[key + "_sent"] += 1  # an attempt all the same
        time.sleep(0.005)
for sock, key in ((tcp, "tcp"), (udp, "udp")):
    threading.Thread(target=pump, args=(sock, key), daemon=True).start()
print("FLOWS UP")
"""


def _host_counters(host) -> dict[str, int]:
    """Packets of the flows that reached the test host (its own nftables input counters)."""
    from kerneltest import _sh

    out = _sh("ip", "netns", "exec", host.name, "nft", "-j", "list", "table", "inet", "sktcount").stdout
    import json

    counts = {}
    for item in json.loads(out)["nftables"]:
        rule = item.get("rule")
        if rule:
            counter = next(e["counter"] for e in rule["expr"] if "counter" in e)
            counts[rule["comment"]] = counter["packets"]
    return counts


def test_narrowing_cuts_open_tcp_and_udp_flows(kernel, test_host):
    """A TCP connection and a UDP flow opened under an allowlist stop at the apply of
    ``%sandbox mode deny``: once the apply has returned, no packet of theirs reaches the host."""
    a = test_host(8080)
    sink = a.port + 2
    script = (
        "table inet sktcount {\n chain input {\n  type filter hook input priority -10; policy accept;\n"
        f'  tcp dport {sink} counter comment "tcp"\n'
        f'  udp dport {a.port} counter comment "udp"\n }}\n}}\n'
    )
    subprocess.run(["ip", "netns", "exec", a.name, "nft", "-f", "-"], input=script, text=True, check=True)
    change = kernel.execute(f"%sandbox allow {a.ip}:{sink}/tcp {a.ip}:{a.port}/udp")
    assert change.status == "ok", change.outputs
    cell = kernel.execute(f'IP, SINK, PORT = {a.ip!r}, {sink}, {a.port}\n' + FLOWS, timeout=30)
    assert "FLOWS UP" in cell.stream(), cell.outputs
    try:
        # both flows are alive: packets keep arriving under the allowlist
        first = _host_counters(a)
        kernel.execute("import time\nn = flows['tcp_sent'], flows['udp_sent']\n"
                       "while min(flows['tcp_sent'] - n[0], flows['udp_sent'] - n[1]) < 20: time.sleep(0.01)")
        alive = _host_counters(a)
        assert alive["tcp"] > first["tcp"] and alive["udp"] > first["udp"], (first, alive)

        deny = kernel.execute("%sandbox mode deny")
        assert "egress now: default-deny" in deny.stream()
        # the apply has returned: from here on nothing of either flow may reach the host
        after_apply = _host_counters(a)
        # the sandbox keeps trying on both flows (at least 40 more attempts each)
        tries = kernel.execute(
            "import time\nn = flows['tcp_sent'], flows['udp_sent']\ndeadline = time.monotonic() + 20\n"
            "while min(flows['tcp_sent'] - n[0], flows['udp_sent'] - n[1]) < 40 and "
            "(flows['tcp_error'] is None or time.monotonic() < deadline): time.sleep(0.01)\n"
            "print('ERRORS', flows['tcp_error'], flows['udp_error'])", timeout=60)
        later = _host_counters(a)
        assert later == after_apply, (after_apply, later)
        # the TCP connection was reset, not left hanging
        assert "ERRORS ConnectionResetError" in tries.stream() or "ERRORS BrokenPipeError" in tries.stream(), \
            tries.stream()
    finally:
        kernel.execute("flows['stop'] = True\ntcp.close(); udp.close()")
