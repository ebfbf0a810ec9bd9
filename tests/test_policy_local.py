"""Egress policy end to end on the local backend: allowlist exactly, switch back to deny."""

import re

import pytest


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
