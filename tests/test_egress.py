"""Default-deny egress on the local backend, against test hosts in network namespaces."""

import pytest

# each kernel test runs against a root kernel and a rootless one (uid 65534; conftest.py)
pytestmark = pytest.mark.both_modes


@pytest.fixture
def host(test_host):
    return test_host(port=8080)


def test_host_is_reachable_from_outside_the_sandbox(host):
    """Sanity check of the fixture itself: the host answers when the policy is not in the way."""
    import socket

    with socket.create_connection((host.ip, host.port), timeout=3) as conn:
        assert conn.recv(100).startswith(b"hello from test host")
    assert host.seen() == 1


def test_default_deny_refuses_tcp_fast_with_a_clear_error(kernel, host):
    cell = kernel.execute(
        "import socket, time\nstart = time.monotonic()\n"
        f"socket.create_connection(({host.ip!r}, {host.port}), timeout=10)"
    )
    assert cell.status == "error"
    error = cell.of_type("error")[0]["content"]
    assert error["ename"] == "ConnectionRefusedError"
    assert cell.sandbox["duration_ms"] < 2000  # refused, not a hang until the timeout
    assert host.seen() == 0


@pytest.mark.parametrize("proto", ["udp", "ipv6", "curl"])
def test_default_deny_other_paths(kernel, host, proto):
    code = {
        "udp": f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.settimeout(1)\n"
               f"s.sendto(b'ping', ({host.ip!r}, {host.port}))\ns.recvfrom(10)",
        "ipv6": f"import socket\nsocket.create_connection(({host.ip6!r}, {host.port}), timeout=5)",
        "curl": f"!python3 -c \"import socket; socket.create_connection(('{host.ip}', {host.port}), timeout=5)\"",
    }[proto]
    cell = kernel.execute(code)
    assert cell.status == "error"
    assert cell.sandbox["exit_status"] != 0
    assert host.seen() == 0


def test_loopback_inside_the_sandbox_works(kernel):
    cell = kernel.execute(
        "import socket, threading\nsrv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen(1)\n"
        "port = srv.getsockname()[1]\n"
        "threading.Thread(target=lambda: srv.accept()[0].sendall(b'ok'), daemon=True).start()\n"
        "c = socket.create_connection(('127.0.0.1', port), timeout=3); c.recv(2)"
    )
    assert cell.status == "ok"
    assert cell.of_type("execute_result")[0]["content"]["data"]["text/plain"] == "b'ok'"


def test_metadata_address_is_refused(kernel):
    cell = kernel.execute("import socket\nsocket.create_connection(('169.254.169.254', 80), timeout=5)")
    assert cell.status == "error"
    assert cell.sandbox["duration_ms"] < 2000
