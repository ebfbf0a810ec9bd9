"""Blocked-connection notices: one per destination, right fields, while the cell runs."""

import time

import pytest

from sandbox_kernel.notices import NOTICE_MIME


@pytest.fixture(scope="module")
def _module_kernel():
    from kerneltest import shared_kernel

    yield from shared_kernel({"SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "10.231.0.0/16"})


@pytest.fixture
def kernel(_module_kernel):
    from kerneltest import reset_between_tests

    return reset_between_tests(_module_kernel)


def notices(cell):
    """The notices of a cell, as their final JSON (display_data updated by update_display_data)."""
    by_id = {}
    for out in cell.outputs:
        if out["msg_type"] in ("display_data", "update_display_data") and NOTICE_MIME in out["content"]["data"]:
            by_id[out["content"]["transient"]["display_id"]] = out["content"]["data"][NOTICE_MIME]
    return list(by_id.values())


def footer(cell) -> str:
    """The footer line: last stdout line of an ok cell, last traceback line of an error cell."""
    errors = cell.of_type("error")
    return errors[-1]["content"]["traceback"][-1] if errors else cell.stream().splitlines()[-1]


def only_notice(cell):
    found = notices(cell)
    assert len(found) == 1, found
    assert cell.sandbox["blocked"] == found
    return found[0]


@pytest.mark.parametrize(
    ("name", "code", "verdict", "process"),
    [
        ("python socket", "import socket\ntry:\n    socket.create_connection(({ip!r}, {port}), timeout=3)\nexcept OSError as e:\n    print(e)",
         "guarded", "python"),
        ("urllib", "import urllib.request\ntry:\n    urllib.request.urlopen('http://{ip}:{port}/', timeout=3)\nexcept OSError as e:\n    print(e)",
         "guarded", "python"),
        ("subprocess", "!python3 -c \"import socket; socket.create_connection(('{ip}', {port}), timeout=3)\" 2>/dev/null",
         "rejected", None),
        ("shell cell", "%%bash\nexec 3<>/dev/tcp/{ip}/{port} || echo refused",
         "rejected", None),
        ("C-level connect in a child", "import subprocess, sys\nsubprocess.run([sys.executable, '-c', '''\nimport ctypes, socket, struct\nlibc = ctypes.CDLL(None)\ns = socket.socket()\naddr = struct.pack('!HH4s8x', socket.AF_INET, {port}, socket.inet_aton('{ip}'))\naddr = struct.pack('H', socket.AF_INET) + addr[2:]\nprint(libc.connect(s.fileno(), addr, len(addr)))\n'''])",
         "rejected", None),
    ],
)
def test_each_path_yields_exactly_one_notice(kernel, test_host, name, code, verdict, process):
    host = test_host(8080)
    cell = kernel.execute(code.format(ip=host.ip, port=host.port))
    notice = only_notice(cell)
    assert notice["ip"] == host.ip and notice["port"] == host.port
    assert notice["protocol"] == "tcp"
    assert notice["verdict"] == verdict, name
    assert notice["policy"] == {"mode": "deny", "name": "default", "label": "default-deny"}
    assert notice["count"] == 1
    assert notice["first_seen"] <= notice["last_seen"]
    assert notice["remedy"] == {"action": "allow", "command": f"%sandbox allow {host.ip}:8080/tcp",
                                "entry": f"{host.ip}:8080/tcp"}
    if process:
        assert notice["process"]["name"].startswith(process) and notice["process"]["pid"]
    bundle = [o for o in cell.outputs if o["msg_type"] == "display_data"][0]["content"]["data"]
    assert bundle["text/plain"].startswith(f"⛔ egress blocked: {host.ip}:8080")
    assert "you may allow it: %sandbox allow" in bundle["text/plain"]
    assert "sandbox-kernel-notice" in bundle["text/html"]
    assert footer(cell).endswith("· 1 blocked")
    assert host.seen() == 0


@pytest.mark.parametrize("kind", ["ipv6", "udp"])
def test_ipv6_and_udp(kernel, test_host, kind):
    host = test_host(8080)
    if kind == "ipv6":
        code = f"import socket\ntry:\n    socket.create_connection(({host.ip6!r}, 8080), timeout=3)\nexcept OSError: pass"
        ip, proto = host.ip6, "tcp"
    else:
        code = (f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"try:\n    s.sendto(b'x', ({host.ip!r}, 8080))\nexcept OSError: pass")
        ip, proto = host.ip, "udp"
    notice = only_notice(kernel.execute(code))
    assert (notice["ip"], notice["port"], notice["protocol"]) == (ip, 8080, proto)


def test_metadata_server_is_forbidden_not_allowable(kernel):
    cell = kernel.execute("import socket\ntry:\n    socket.create_connection(('169.254.169.254', 80), timeout=3)\nexcept OSError: pass")
    notice = only_notice(cell)
    assert notice["remedy"]["action"] == "forbidden"
    assert "169.254.0.0/16" in notice["remedy"]["reason"]
    text = [o for o in cell.outputs if o["msg_type"] == "display_data"][0]["content"]["data"]["text/plain"]
    assert "not permitted by your administrator" in text


def test_repeated_attempts_are_counted_in_one_notice(kernel, test_host):
    host = test_host(8080)
    cell = kernel.execute(
        "import socket\nfor _ in range(12):\n    try:\n"
        f"        socket.create_connection(({host.ip!r}, 8080), timeout=3)\n    except OSError: pass\n"
        f"!for n in 1 2 3; do python3 -c \"import socket; socket.create_connection(('{host.ip}', 8081), timeout=3)\" 2>/dev/null; done"
    )
    found = {n["port"]: n for n in notices(cell)}
    assert found[8080]["count"] == 12 and found[8081]["count"] == 3
    assert len(found) == 2
    assert footer(cell).endswith("· 2 blocked")
    assert any("×12" in o["content"]["data"]["text/plain"] for o in cell.of_type("update_display_data"))


def test_notice_appears_while_the_cell_still_runs(kernel, test_host):
    host = test_host(8080)
    seen = {}

    def watch(msg):
        if msg["msg_type"] == "display_data" and NOTICE_MIME in msg["content"]["data"]:
            seen.setdefault("at", time.monotonic())

    start = time.monotonic()
    cell = kernel.execute(
        f"!python3 -c \"import socket; socket.create_connection(('{host.ip}', 8080), timeout=3)\" 2>/dev/null\n"
        "import time\ntime.sleep(5)", on_output=watch)
    end = time.monotonic()
    assert "at" in seen
    assert seen["at"] - start < 2.0 and end - seen["at"] > 3.0
    assert only_notice(cell)["verdict"] == "rejected"


def test_guard_disabled_still_yields_the_enforcer_notice(kernel, test_host):
    host = test_host(8080)
    cell = kernel.execute(
        "import sandbox_agent.guard as guard\nguard.enabled = False\nimport socket\n"
        f"try:\n    socket.create_connection(({host.ip!r}, 8080), timeout=3)\nexcept OSError as e:\n    print(type(e).__name__)\n"
        "guard.enabled = True")
    assert "ConnectionRefusedError" in cell.stream()
    assert only_notice(cell)["verdict"] == "rejected"


def test_allowed_destination_yields_no_notice(kernel, test_host):
    host = test_host(8080)
    kernel.execute(f"%sandbox allow {host.ip}:8080/tcp")
    try:
        cell = kernel.execute(f"import socket\nsocket.create_connection(({host.ip!r}, 8080), timeout=3).recv(5)")
        assert cell.status == "ok"
        assert notices(cell) == [] and cell.sandbox["blocked"] == []
    finally:
        kernel.execute("%sandbox mode deny")


def test_dropped_connection_is_reported_within_a_second(fresh_kernel, test_host):
    kernel = fresh_kernel({"SANDBOX_KERNEL_REFUSE_WITH": "drop"})
    host = test_host(8080)
    seen = {}

    def watch(msg):
        if msg["msg_type"] == "display_data" and NOTICE_MIME in msg["content"]["data"]:
            seen.setdefault("at", time.monotonic())

    sent = time.monotonic()
    cell = kernel.execute(
        "import sandbox_agent.guard as guard\nguard.enabled = False\nimport socket\n"
        f"try:\n    socket.create_connection(({host.ip!r}, 8080), timeout=2.5)\nexcept OSError as e:\n    print(type(e).__name__)",
        on_output=watch)
    assert "TimeoutError" in cell.stream() or "timeout" in cell.stream()
    assert seen["at"] - sent < 1.0
    notice = only_notice(cell)
    assert notice["verdict"] == "dropped"
    assert notice["count"] == 1  # the enforcer and the watcher saw the same attempt
