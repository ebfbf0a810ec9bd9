"""The sandbox holds under floods, runaway code, crashes and escape attempts (local backend)."""

import os
import signal
import threading
import time

import pytest

from kerneltest import KernelDriver, reset_between_tests, sandbox_namespaces, shared_kernel
from sandbox_kernel.notices import NOTICE_MIME


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(l for l in f if l.startswith("VmRSS")).split()[1]) / 1024


@pytest.fixture(scope="module")
def _module_kernel():
    yield from shared_kernel({"SANDBOX_KERNEL_MEMORY_LIMIT": "400M", "SANDBOX_KERNEL_PIDS_LIMIT": "100",
                              "SANDBOX_KERNEL_WORK_SIZE": "64M", "SANDBOX_KERNEL_TMP_SIZE": "32M"})


@pytest.fixture
def kernel(_module_kernel):
    return reset_between_tests(_module_kernel)


def _peak_rss_during(kernel, code, timeout=300):
    pid = kernel.km.provisioner.process.pid
    peak = [rss_mb(pid)]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak.append(rss_mb(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        cell = kernel.execute(code, timeout=timeout)
    finally:
        stop.set()
        sampler.join()
    return cell, max(peak)


def test_one_gigabyte_of_output_is_truncated_and_memory_stays_bounded(kernel):
    cell, peak = _peak_rss_during(kernel, "import sys\nline = 'x' * 1023 + '\\n'\nfor _ in range(1024 * 1024):\n    sys.stdout.write(line)")
    assert cell.status == "ok"
    assert peak < 300, f"kernel RSS reached {peak:.0f} MB"
    shown = sum(len(o["content"]["text"]) for o in cell.of_type("stream") if o["content"]["name"] == "stdout")
    assert shown < 11 * 1024 * 1024
    notes = cell.stream("stderr")
    assert "output limit of 10.0 MB reached" in notes and "of output were dropped" in notes


def test_a_single_200_megabyte_line(kernel):
    cell, peak = _peak_rss_during(kernel, "print('y' * 200_000_000)")
    assert cell.status == "ok"
    assert peak < 300
    assert "of output were dropped" in cell.stream("stderr")


def test_interrupt_during_a_flood(kernel):
    outputs = []

    def interrupt_once_flooding(msg):  # after some of the flood arrived, not after a fixed delay
        outputs.append(msg)
        if len(outputs) == 20:
            kernel.km.interrupt_kernel()

    cell = kernel.execute("while True:\n    print('z' * 1000)", timeout=120, on_output=interrupt_once_flooding,
                          stop_on_error=False)
    assert len(outputs) >= 20
    assert cell.reply["content"]["ename"] == "KeyboardInterrupt"
    # the interrupt often lands while print() is sending: the frame is finished first (no
    # half-written frame, no "protocol error"), and the traceback shows the cell, not the agent
    assert "protocol error" not in cell.stream("stderr")
    traceback = "\n".join(cell.reply["content"]["traceback"])
    assert "sandbox_agent" not in traceback and "print" in traceback
    assert kernel.execute("1 + 1").status == "ok"


def test_memory_exhaustion_is_reported_and_the_next_cell_runs_fresh(kernel):
    kernel.execute("survivor = 1")
    cell = kernel.execute("hog = []\nwhile True:\n    hog.append(bytearray(50 * 1024 * 1024))", timeout=60)
    assert cell.status == "error"
    error = cell.of_type("error")[0]["content"]
    assert error["ename"] == "SandboxCrashed" and "out of memory" in error["evalue"]
    after = kernel.execute("'survivor' in globals()")
    assert after.of_type("execute_result")[0]["content"]["data"]["text/plain"] == "False"


def test_fork_bomb_hits_the_process_limit(kernel):
    cell = kernel.execute(
        "import os, time\nchildren = 0\ntry:\n    for _ in range(10_000):\n        if os.fork() == 0:\n"
        "            time.sleep(3)\n            os._exit(0)\n        children += 1\nexcept OSError as err:\n"
        "    print('stopped after', children, 'processes:', err.strerror)", timeout=60)
    line = next(l for l in cell.stream().splitlines() if l.startswith("stopped after"))
    assert int(line.split()[2]) < 100
    time.sleep(3.5)  # the bomb's processes end; the agent reaps them before the next cell
    after = kernel.execute("1 + 1")
    assert after.status == "ok", after.reply["content"]


@pytest.mark.parametrize("path", ["/home/sandbox/fill", "/tmp/fill"])
def test_disk_fill_stops_at_the_sandbox_quota(kernel, path):
    cell = kernel.execute(
        f"chunk = b'x' * (1024 * 1024)\nwritten = 0\ntry:\n    with open({path!r}, 'wb') as f:\n"
        "        while True:\n            f.write(chunk); f.flush(); written += 1\nexcept OSError as err:\n"
        f"    print('full after', written, 'MB:', err.strerror)\nimport os; os.remove({path!r})")
    line = next(l for l in cell.stream().splitlines() if l.startswith("full after"))
    assert "No space left on device" in line
    assert int(line.split()[2]) <= 64


def _agent_pids(netns_names):
    pids = []
    for ns in netns_names:
        for pid in os.popen(f"ip netns pids {ns}").read().split():
            try:
                if b"agent.pyz" in open(f"/proc/{pid}/cmdline", "rb").read():
                    pids.append(int(pid))
            except OSError:
                continue
    return pids


def test_sandbox_killed_from_outside_mid_cell_is_reported_and_replaced(fresh_kernel):
    kernel = fresh_kernel()
    kernel.execute("x = 1")
    mine = kernel.namespaces()  # its own: other kernels may be starting meanwhile
    assert len(mine) == 1
    killed = []

    def kill(msg):  # once the cell runs (it says so), not after a fixed delay
        if not killed and msg["msg_type"] == "stream" and "sleeping" in msg["content"]["text"]:
            for pid in _agent_pids(mine):
                os.kill(pid, signal.SIGKILL)
            killed.append(True)

    cell = kernel.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)", timeout=60, on_output=kill)
    assert killed
    assert cell.status == "error"
    error = cell.of_type("error")[0]["content"]
    assert error["ename"] == "SandboxCrashed" and "SIGKILL" in error["evalue"]
    assert kernel.execute("1 + 1").status == "ok"


def test_client_reconnects_mid_cell(kernel):
    msg_id = kernel.kc.execute("import time\nfor i in range(4):\n    print('tick', i)\n    time.sleep(0.5)")
    time.sleep(0.3)
    kernel.kc.stop_channels()  # the notebook goes away mid-cell ...
    client = kernel.km.client()  # ... and comes back
    client.start_channels()
    kernel.kc = client
    seen, idle = [], False
    deadline = time.monotonic() + 20
    while not idle and time.monotonic() < deadline:
        try:
            msg = client.get_iopub_msg(timeout=1)
        except Exception:  # noqa: BLE001 - queue.Empty
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            seen.append(msg["content"]["text"])
        idle = msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"
    assert idle, "the reconnected client never saw the cell finish"
    assert "tick 3" in "".join(seen)  # output produced after the reconnect reaches the new client
    assert kernel.execute("'after reconnect'").status == "ok"


@pytest.mark.parametrize(
    ("name", "code", "expected"),
    [
        ("raw socket", "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)",
         {"PermissionError"}),
        ("ptrace pid 1", "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                         "if libc.ptrace(16, 1, 0, 0) != 0:\n    raise PermissionError(ctypes.get_errno(), 'ptrace refused')",
         {"PermissionError"}),
        ("kill pid 1", "import os\nos.kill(1, 9)", {"PermissionError"}),
        ("host loopback", "import socket\nsocket.create_connection(('10.0.2.2', 8888), timeout=2)",
         {"ConnectionRefusedError"}),
        ("other DNS resolver", "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                               "s.sendto(b'\\x12\\x34\\x01\\x00\\x00\\x01' + bytes(6), ('10.231.1.53', 53))",
         {"ConnectionRefusedError"}),
        ("write system files", "open('/etc/passwd', 'a')", {"PermissionError", "OSError"}),
        ("write /usr", "open('/usr/lib/evil', 'w')", {"PermissionError", "OSError"}),
        ("change the firewall", "!nft flush ruleset", {"NonZeroExitStatus"}),
        ("ICMP", "!ping -c1 -W1 10.231.1.1", {"NonZeroExitStatus"}),
    ],
)
def test_escape_attempts_are_refused(kernel, name, code, expected):
    cell = kernel.execute(code, timeout=30)
    assert cell.status == "error", (name, cell.outputs)
    assert cell.reply["content"]["ename"] in expected, (name, cell.reply["content"]["ename"])
    assert cell.sandbox["exit_status"] != 0
    if name in ("host loopback", "other DNS resolver"):
        assert len(cell.sandbox["blocked"]) == 1


def test_nothing_of_the_host_home_is_visible(kernel):
    cell = kernel.execute("import os\nsorted(os.listdir('/root'))")
    # /root exists only as the parent of the interpreter's bind mount (when it lives there)
    assert cell.of_type("execute_result")[0]["content"]["data"]["text/plain"] in ("['.pyenv']", "[]")


def test_twenty_kernels_at_once_are_isolated_and_cleaned_up(test_host):
    """Counts only this test's sandboxes (each kernel's own, from its owner record): a
    bystander kernel, started meanwhile and still running at the end, changes nothing, as
    any other sandbox on the machine must not."""
    host = test_host(8080)
    drivers: list[KernelDriver] = []
    errors: list[BaseException] = []
    bystander: KernelDriver | None = None

    def start():
        try:
            drivers.append(KernelDriver({"SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "10.231.0.0/16"}))
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=start) for _ in range(20)]
    owned: dict[int, set[str]] = {}
    try:
        for t in threads:
            t.start()
        bystander = KernelDriver()
        assert bystander.execute("1").status == "ok"
        for t in threads:
            t.join(180)
        assert not errors, errors
        assert len(drivers) == 20
        results = [None] * 20

        def use(i):
            results[i] = drivers[i].execute(f"value = {i} * 2\nvalue", timeout=120)

        workers = [threading.Thread(target=use, args=(i,)) for i in range(20)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(180)
        assert [r.of_type("execute_result")[0]["content"]["data"]["text/plain"] for r in results] == \
            [str(i * 2) for i in range(20)]
        owned = {i: d.namespaces() for i, d in enumerate(drivers)}
        # one sandbox per kernel, twenty distinct ones, none of them the bystander's
        assert all(len(names) == 1 for names in owned.values()), owned
        ours = set().union(*owned.values())
        assert len(ours) == 20 and not ours & bystander.namespaces()
        # one kernel's policy change does not touch the others
        assert drivers[0].execute(f"%sandbox allow {host.ip}:8080/tcp").status == "ok"
        probe = f"import socket\nprint('REPLY', socket.create_connection(({host.ip!r}, 8080), timeout=3).recv(5))"
        assert "REPLY" in drivers[0].execute(probe).stream()
        assert "REPLY" not in drivers[1].execute(probe).stream()
    finally:
        for d in drivers:
            d.shutdown()
    try:
        ours = set().union(*owned.values()) if owned else set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sandbox_namespaces() & ours:
            time.sleep(0.2)
        assert not sandbox_namespaces() & ours
        # the bystander's sandbox is untouched by the twenty's cleanup
        assert bystander is not None and bystander.namespaces() and bystander.execute("2").status == "ok"
    finally:
        if bystander is not None:
            bystander.shutdown()


FORGE = """import gc, os, sys
channel = next(o for o in gc.get_objects() if type(o).__name__ == 'StdioChannel')
fd = channel._out
for frame in {frames!r}:
    os.write(fd, frame)
print('sent')
"""


@pytest.mark.parametrize("frame", [
    b"not json at all\n",
    b'["a", "list"]\n',
    b'{"type": "execute", "code": "import os"}\n',      # a kernel-to-agent type, from the agent
    b'{"type": "stream", "name": "stdout", "text": 42}\n',  # wrong field type
    b'{"type": "display", "data": "not a dict"}\n',
    b"\xff\xfe\xfd\n",
    b"[" * 200_000 + b"\n",  # json's decoder recursed until RecursionError, which killed the reader
], ids=["text", "list", "kernel-type", "field-type", "display-data", "bytes", "deep-nesting"])
def test_garbage_from_the_sandbox_ends_it_plainly_and_the_next_cell_runs_fresh(kernel, frame):
    kernel.execute("survivor = 1")
    cell = kernel.execute(FORGE.format(frames=[frame]) + "import time\ntime.sleep(60)", timeout=30)
    assert cell.status == "error"
    assert cell.reply["content"]["ename"] == "SandboxCrashed"
    assert "the sandbox broke the protocol" in cell.reply["content"]["evalue"]
    assert not any("Traceback" in line for line in cell.reply["content"]["traceback"])
    after = kernel.execute("'survivor' in globals()")
    assert after.of_type("execute_result")[0]["content"]["data"]["text/plain"] == "False"


def test_a_forged_enforcer_record_is_not_the_enforcers(kernel):
    frames = [b'{"type": "blocked", "source": "enforcer", "record": {"ip": "8.8.8.8", "port": 53}}\n']
    cell = kernel.execute(FORGE.format(frames=frames), timeout=30)
    assert "sent" in cell.stream()
    (record,) = cell.sandbox["blocked"]
    assert record["reported_by"] == "sandbox" and record["sources"] == ["watcher"]
    assert record["remedy"]["action"] != "allow"


def test_oversized_and_truncated_frames_from_the_sandbox(kernel):
    code = FORGE.format(frames=[b"BIG", b'{"type": "stream", "name": "stdout", "text": "half'])
    # the oversized frame is built in the sandbox: a cell that big is refused before it is sent
    code = code.replace("b'BIG'", "b'{\"type\": \"stream\", \"name\": \"stdout\", \"text\": \"' + b'x' * (17 * 2**20) + b'\"}\\n'")
    cell = kernel.execute(code, timeout=60)
    assert cell.status in ("ok", "error")
    after = kernel.execute("1 + 1", timeout=60)
    # either the stream was resynchronised, or the sandbox was replaced after reporting it
    if after.status == "error":
        after = kernel.execute("1 + 1", timeout=60)
    assert after.of_type("execute_result")[0]["content"]["data"]["text/plain"] == "2"


def test_the_hosts_own_addresses_are_refused(kernel, test_host):
    host = test_host(8080)
    gateway = host.ip.rsplit(".", 1)[0] + ".1"  # the host's end of the test host's link
    cell = kernel.execute(f"import socket\nsocket.create_connection(({gateway!r}, 22), timeout=3)")
    assert cell.status == "error"
    assert cell.reply["content"]["ename"] == "ConnectionRefusedError"
    assert cell.sandbox["blocked"][0]["ip"] == gateway


def test_a_cell_too_large_for_the_protocol_is_refused_clearly(kernel):
    cell = kernel.execute("x = '" + "y" * (17 * 2**20) + "'", timeout=60)
    assert cell.status == "error"
    assert cell.reply["content"]["ename"] == "ProtocolError"
    assert "load big data from a file" in cell.reply["content"]["evalue"]
    assert kernel.execute("1 + 1").status == "ok"


def test_a_protocol_stream_sent_to_dev_null_is_ended_by_the_interrupt(fresh_kernel, test_host):
    """The agent's output goes to /dev/null: nothing it says reaches the kernel any more, not
    even the end of the interrupted cell. The interrupt escalates: the sandbox is killed."""
    kernel = fresh_kernel({"SANDBOX_KERNEL_INTERRUPT_TIMEOUT": "3"})
    host = test_host(8080)
    code = ("import gc, os, socket, time\nimport sandbox_agent.guard as guard\n"
            "channel = next(o for o in gc.get_objects() if type(o).__name__ == 'StdioChannel')\n"
            "os.dup2(os.open('/dev/null', os.O_WRONLY), channel._out)\n"
            # the enforcer's notice (from outside the sandbox) says the stream is gone: interrupt then
            "guard.enabled = False\n"
            f"try:\n    socket.create_connection(({host.ip!r}, 8080), timeout=3)\nexcept OSError:\n    pass\n"
            "while True:\n    time.sleep(0.1)")
    events = []

    def on_output(msg):
        if msg["msg_type"] == "display_data" and NOTICE_MIME in msg["content"]["data"] and "interrupt" not in events:
            events.append("interrupt")
            kernel.km.interrupt_kernel()

    cell = kernel.execute(code, timeout=60, on_output=on_output)
    assert events == ["interrupt"]
    assert cell.reply["content"]["ename"] == "SandboxCrashed"
    assert "did not answer an interrupt within 3 s" in cell.reply["content"]["evalue"]
    after = kernel.execute("1 + 1")
    assert after.of_type("execute_result")[0]["content"]["data"]["text/plain"] == "2"


def test_a_refused_oversized_cell_leaves_no_stale_cell_behind(fresh_kernel, test_host):
    """Issue 16: the oversized cell used to become the current cell before it was refused, and
    its queue then swallowed what the sandbox reported between cells."""
    kernel = fresh_kernel({"SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "10.231.0.0/16"})
    host = test_host(8080)
    # a thread that outlives its cell and connects once the policy changes (a magic, no cell runs)
    kernel.execute("import gc, socket, threading, time\n"
                   "agent = next(o for o in gc.get_objects() if type(o).__name__ == 'Agent')\n"
                   "before = agent.policy\n"
                   "def later():\n    while agent.policy is before:\n        time.sleep(0.05)\n"
                   f"    try:\n        socket.create_connection(({host.ip!r}, 8080), timeout=3)\n    except OSError:\n        pass\n"
                   "threading.Thread(target=later, daemon=True).start()")
    assert kernel.execute("x = '" + "y" * (17 * 2**20) + "'", timeout=60).reply["content"]["ename"] == "ProtocolError"
    assert kernel.execute(f"%sandbox allow {host.ip}:9/tcp").status == "ok"
    deadline = time.monotonic() + 30
    def listed():
        cell = kernel.execute("%sandbox blocked")
        return "".join(o["content"]["data"]["text/plain"] for o in cell.of_type("display_data")) + cell.stream()

    while f"{host.ip}:8080" not in listed():
        assert time.monotonic() < deadline, "the connection blocked between cells was never listed"
        time.sleep(0.2)
    # and the next cell shows it, marked as reported while no cell ran
    cell = kernel.execute("'next'")
    assert "while no cell ran" in cell.stream("stderr")
    assert [n["port"] for n in cell.sandbox["blocked"]] == [8080]
