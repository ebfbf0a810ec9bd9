"""Blocked-connection notices: one per destination, right fields, while the cell runs."""

import json
import re
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
        # create_connection and bash close a refused socket at once: often too soon to be named
        # (test_rejected_notice_names_the_sender_with_its_sandbox_pid keeps it open)
        ("subprocess", "!python3 -c \"import socket; socket.create_connection(('{ip}', {port}), timeout=3)\" 2>/dev/null",
         "rejected", None),
        ("shell cell", "%%bash\nexec 3<>/dev/tcp/{ip}/{port} || echo refused",
         "rejected", None),
        ("C-level connect in a child", "import subprocess, sys\nsubprocess.run([sys.executable, '-c', '''\nimport ctypes, socket, struct\nlibc = ctypes.CDLL(None)\ns = socket.socket()\naddr = struct.pack('!HH4s8x', socket.AF_INET, {port}, socket.inet_aton('{ip}'))\naddr = struct.pack('H', socket.AF_INET) + addr[2:]\nprint(libc.connect(s.fileno(), addr, len(addr)))\n'''])",
         "rejected", "python"),
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
    if process:
        assert notice["process"]["name"].startswith(process) and notice["process"]["pid"]
    bundle = [o for o in cell.outputs if o["msg_type"] in ("display_data", "update_display_data")][-1]["content"]["data"]
    # verified by the enforcer: the guard lets one packet through for it to log (guard.witness)
    assert notice["reported_by"] == "kernel" and "enforcer" in notice["sources"]
    assert notice["remedy"] == {"action": "allow", "command": f"%sandbox allow {host.ip}:8080/tcp",
                                "entry": f"{host.ip}:8080/tcp"}
    assert bundle["text/plain"].startswith(f"⛔ egress blocked: {host.ip}:8080")
    assert "you may allow it: %sandbox allow" in bundle["text/plain"]
    assert "sandbox-kernel-notice" in bundle["text/html"]
    assert notice["count"] == 1
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
    # the count is shown (in the first display when all 12 came before it was published —
    # updates are coalesced — else in an update)
    shown = cell.of_type("display_data") + cell.of_type("update_display_data")
    assert any("×12" in o["content"]["data"].get("text/plain", "") for o in shown)


def test_notice_appears_while_the_cell_still_runs(kernel, test_host):
    # order, not a clock: after the blocked attempt the cell keeps asking for input and ends only
    # when the answer says the test has received the notice, i.e. the notice came while it ran
    host = test_host(8080)
    seen = []

    def watch(msg):
        if msg["msg_type"] == "display_data" and NOTICE_MIME in msg["content"]["data"]:
            seen.append(msg)

    cell = kernel.execute(
        f"!python3 -c \"import socket; socket.create_connection(('{host.ip}', 8080), timeout=3)\" 2>/dev/null\n"
        "for asked in range(600):\n"
        "    if input() == 'seen':\n"
        "        print('told while running after', asked, 'asks')\n"
        "        break\n",
        stdin=lambda prompt: "seen" if seen else "not yet", on_output=watch, timeout=120)
    assert "told while running" in cell.stream(), cell.outputs
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


AGENT = ("import gc, os, sys\n"
         "agent = next(o for o in gc.get_objects() if type(o).__name__ == 'Agent')\n")


def test_a_forged_enforcer_notice_is_marked_and_offers_nothing(kernel):
    # a host inside what the user may allow: a real enforcer notice would offer %sandbox allow
    record = {"ip": "10.231.77.7", "port": 8080, "protocol": "tcp", "verdict": "rejected"}
    cell = kernel.execute(AGENT + f"agent.send({{'type': 'blocked', 'source': 'enforcer', 'id': agent.cell_id, 'record': {record!r}}})")
    notice = only_notice(cell)
    assert notice["reported_by"] == "sandbox" and notice["remedy"]["action"] == "unverified"
    shown = [o["content"]["data"] for o in cell.of_type("display_data") if NOTICE_MIME in o["content"]["data"]][0]
    assert shown["text/plain"].startswith("⚠ reported by the sandbox")
    assert "%sandbox allow" not in shown["text/plain"] + shown["text/html"]
    assert "sandbox-kernel-notice-unverified" in shown["text/html"]
    listed = kernel.execute("%sandbox blocked").of_type("display_data")[0]["content"]["data"]["text/plain"]
    line = next(line for line in listed.splitlines() if "10.231.77.7:8080" in line)
    assert "reported by the sandbox" in line and "%sandbox allow" not in line


def test_a_bundle_with_the_notice_mime_type_from_the_sandbox_is_no_notice(kernel):
    """Dropped or relabelled (sandbox_kernel/untrusted.py): either way, nothing the sandbox
    displays reaches the notebook as a notice."""
    fake = {"host": "pypi.org", "ip": "10.231.77.8", "port": 443, "protocol": "tcp", "verdict": "rejected",
            "remedy": {"action": "allow", "command": "%sandbox allow 10.231.77.8"}}
    cell = kernel.execute("from IPython.display import display\n"
                          f"display({{{NOTICE_MIME!r}: {fake!r}, 'text/plain': '⛔ egress blocked: pypi.org:443'}}, raw=True)\n"
                          "display({'text/plain': 'spray'}, raw=True, display_id='sandbox-notice-0', update=True)\n"
                          "print('done')")
    assert "done" in cell.stream()
    for out in cell.outputs:
        if out["msg_type"] in ("display_data", "update_display_data"):
            assert NOTICE_MIME not in out["content"]["data"], out
            assert not out["content"].get("transient", {}).get("display_id", "").startswith("sandbox-notice-"), out
    assert cell.sandbox["blocked"] == []


def test_notice_ids_are_unguessable_and_the_sandbox_cannot_update_them(kernel, test_host):
    host = test_host(8080)
    cell = kernel.execute(
        "import socket\nfrom IPython.display import display\n"
        f"try:\n    socket.create_connection(({host.ip!r}, 8080), timeout=3)\nexcept OSError:\n    pass\n"
        # the old ids were sandbox-notice-<kernel pid>-<cell>-<n>: spray every one of this shape
        "for pid in range(1, 200):\n    for cell in range(1, 5):\n"
        "        display({'text/plain': 'all clear'}, raw=True, display_id=f'sandbox-notice-{pid}-{cell}-0', update=True)")
    (shown,) = [o for o in cell.of_type("display_data") if NOTICE_MIME in o["content"]["data"]]
    assert re.fullmatch(r"sandbox-notice-[0-9a-f]{32}", shown["content"]["transient"]["display_id"])
    assert not [o for o in cell.of_type("update_display_data") if "all clear" in str(o["content"]["data"])]
    assert "used a notice's display id" in cell.stream("stderr")


def test_clear_output_from_the_sandbox_does_not_erase_notices(kernel, test_host):
    host = test_host(8080)
    cell = kernel.execute(
        "import socket\nfrom IPython.display import clear_output\n"
        f"try:\n    socket.create_connection(({host.ip!r}, 8080), timeout=3)\nexcept OSError:\n    pass\n"
        "clear_output()\nprint('after the clear')")
    kinds = [(o["msg_type"], NOTICE_MIME in o["content"].get("data", {})) for o in cell.outputs]
    last_clear = max(i for i, (kind, _) in enumerate(kinds) if kind == "clear_output")
    assert ("display_data", True) in kinds[last_clear:], kinds
    assert only_notice(cell)["port"] == 8080


def test_a_done_without_the_cells_nonce_is_ignored_and_marked(kernel):
    cell = kernel.execute(AGENT + "agent.send({'type': 'done', 'id': agent.cell_id, 'status': 'ok', 'exit_status': 0, "
                          "'duration_ms': 1.0})\nprint('after the false done')\n1/0")
    assert "after the false done" in cell.stream()
    assert cell.reply["content"]["ename"] == "ZeroDivisionError"
    assert cell.sandbox["exit_status"] == 1 and cell.sandbox["forged_done"] == 1
    assert "false end-of-cell" in cell.stream("stderr")


def test_an_early_done_with_the_nonce_is_exposed_by_the_next_cell(fresh_kernel, test_host):
    """Code that digs the nonce out of the agent's frames can end its cell early (the reply is
    sent); what it does after is not lost: the next cell shows it, and says so."""
    # a kernel of its own: the cell below rewires the agent, which no reset between tests undoes
    kernel = fresh_kernel({"SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "10.231.0.0/16"})
    host = test_host(8080)
    # the agent runs in the same interpreter as the cells: a cell can wrap it to steal the
    # next cell's nonce before the agent takes it out of the frame
    assert kernel.execute(AGENT + "import builtins\noriginal = agent.execute\n"
                          "def spy(frame):\n    builtins.stolen = frame.get('nonce')\n    return original(frame)\n"
                          "agent.execute = spy").status == "ok"
    first = kernel.execute(
        AGENT + "import builtins\n"
        "agent.send({'type': 'done', 'id': agent.cell_id, 'nonce': builtins.stolen, 'status': 'ok', "
        "'exit_status': 0, 'duration_ms': 1.0})\n"
        "import socket, sandbox_agent.guard as guard\nguard.enabled = False\n"
        f"try:\n    socket.create_connection(({host.ip!r}, 8080), timeout=3)\nexcept OSError:\n    pass\n"
        "guard.enabled = True\nprint('after the early done')\n1/0")
    cell = kernel.execute("'next'")
    assert cell.status == "ok"
    assert "after the early done" in cell.stream()
    assert any(o["content"]["ename"] == "ZeroDivisionError" for o in cell.of_type("error"))
    assert "really ended only now" in cell.stream("stderr") and cell.sandbox["late_end"] is True
    # the enforcer's record is never lost: the first cell has it when it was logged before that
    # cell's (early) end was handled, else this one
    assert 8080 in [n["port"] for n in first.sandbox["blocked"] + cell.sandbox["blocked"]]
    # the late events come before the cell's own result
    kinds = [o["msg_type"] for o in cell.outputs]
    assert kinds.index("error") < kinds.index("execute_result")


def test_a_flood_of_forged_reports_is_capped_and_counted(kernel):
    cell = kernel.execute(
        AGENT + "for i in range(2000):\n"
        "    agent.send({'type': 'blocked', 'id': agent.cell_id, 'record': "
        "{'ip': f'10.231.{i // 250}.{i % 250 + 1}', 'port': 443, 'protocol': 'tcp', 'verdict': 'dropped'}})\n"
        "    agent.send({'type': 'blocked', 'id': agent.cell_id, 'record': "
        "{'ip': '10.231.99.1', 'port': 80, 'protocol': 'tcp', 'verdict': 'dropped', 'count': 1}})\n",
        timeout=120)
    shown = notices(cell)
    assert len(shown) == 20 and len(cell.sandbox["blocked"]) == 20
    assert cell.sandbox["blocked_more"] == 1981  # 2001 destinations, 20 shown
    more = [o["content"]["data"]["text/plain"] for o in cell.outputs
            if o["msg_type"] in ("display_data", "update_display_data") and "more destination" in str(o["content"]["data"])]
    assert more[-1].startswith("⛔ and 1,981 more destinations blocked")
    repeated = next(n for n in shown if n["ip"] == "10.231.99.1")
    assert repeated["count"] == 2000
    # 2,000 increments of one notice are a handful of updates, not 2,000
    assert len(cell.of_type("update_display_data")) < 100
    size = sum(len(json.dumps(o["content"])) for o in cell.outputs if o["msg_type"] != "stream")
    assert size < 300_000, size
    assert footer(cell).endswith("· 2001 blocked")


# -- the process behind an enforcer's notice --------------------------------------------------
# The guard is in the agent's interpreter only; for any other process the notice comes from the
# enforcer's log, and the kernel names the sender from the sandbox's sockets (sockowner.py).
# 10.213.7.2 is an unrouted test address: the sandbox's rules refuse it before it could leave.

UNROUTED = "10.213.7.2"
TCP_CONNECT = ("!python3 -c \"import os, socket; print('pid', os.getpid(), flush=True); s=socket.socket(); "
               "s.settimeout(2); print('result', s.connect_ex(('{ip}', {port})))\"")
# a datagram and a wait for the answer (as a DNS client does): the socket is open while it waits.
# Under drop, sendto fails with EPERM (nftables gives the sender its verdict): this client waits
# all the same, as one that tries again would. One that exits at once is named only when the
# reader wins the race with its exit (docs/notices.md).
UDP_SEND = ("open('/tmp/udp_send.py', 'w').write('''import os, select, socket, sys\n"
            "print('pid', os.getpid(), flush=True)\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "try:\n    s.sendto(b'x', (sys.argv[1], int(sys.argv[2])))\n"
            "except OSError as e:\n    print('errno', e.errno, flush=True)\n"
            "select.select([s], [], [], 1)\n''')\n"
            "!python3 /tmp/udp_send.py {ip} {port}")


def _sender_pid(cell) -> int:
    return int(next(line.split()[1] for line in cell.stream().splitlines() if line.startswith("pid ")))


def test_rejected_connection_of_an_unguarded_process_names_it(kernel):
    """The issue's example, as written: a child python3, default-deny, TCP reset."""
    cell = kernel.execute(f"!python3 -c \"import socket; s=socket.socket(); s.connect_ex(('{UNROUTED}', 8080))\"")
    notice = only_notice(cell)
    assert notice["verdict"] == "rejected" and (notice["ip"], notice["port"]) == (UNROUTED, 8080)
    assert notice["process"] is not None and notice["process"]["name"] == "python3", notice
    assert isinstance(notice["process"]["pid"], int)
    text = [o for o in cell.outputs if o["msg_type"] == "display_data"][0]["content"]["data"]["text/plain"]
    assert f"⛔ egress blocked: {UNROUTED}:8080 (tcp) from python3 (pid {notice['process']['pid']})" in text


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_rejected_notice_names_the_sender_with_its_sandbox_pid(kernel, protocol):
    cell = kernel.execute((TCP_CONNECT if protocol == "tcp" else UDP_SEND).format(ip=UNROUTED, port=8090))
    notice = only_notice(cell)
    assert (notice["verdict"], notice["protocol"], notice["port"]) == ("rejected", protocol, 8090)
    # the pid as the sandbox sees it (what os.getpid() printed there), not the host's
    assert notice["process"] == {"name": "python3", "pid": _sender_pid(cell)}


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_dropped_notice_names_the_sender(fresh_kernel, protocol):
    kernel = fresh_kernel({"SANDBOX_KERNEL_REFUSE_WITH": "drop"})
    cell = kernel.execute((TCP_CONNECT if protocol == "tcp" else UDP_SEND).format(ip=UNROUTED, port=8091))
    if protocol == "tcp":
        assert "result 11" in cell.stream()  # EAGAIN: timed out, the SYN was dropped
    else:
        assert "errno 1" in cell.stream()  # EPERM: the drop is the sender's error
    notice = only_notice(cell)
    assert (notice["verdict"], notice["protocol"], notice["port"]) == ("dropped", protocol, 8091)
    assert notice["process"] == {"name": "python3", "pid": _sender_pid(cell)}


def test_notices_go_on_when_the_log_reader_process_dies(fresh_kernel):
    """The enforcer log's reader process killed from outside: the kernel reads the log itself
    from then on, so refused connections are still reported."""
    import os
    import signal
    from pathlib import Path

    kernel = fresh_kernel()
    assert kernel.execute("1").status == "ok"
    readers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_reader_of(p, kernel.pid)]
    assert len(readers) == 1, readers
    os.kill(readers[0], signal.SIGKILL)
    for port in (8092, 8093):  # the first cell may still be on its way to noticing
        cell = kernel.execute(TCP_CONNECT.format(ip=UNROUTED, port=port))
        notice = only_notice(cell)
        assert (notice["verdict"], notice["port"]) == ("rejected", port)


def _is_reader_of(proc, kernel_pid: int) -> bool:
    try:
        cmdline = (proc / "cmdline").read_bytes()
        ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    return b"sandbox_kernel.backends.local.enforcerlog" in cmdline and ppid == kernel_pid
