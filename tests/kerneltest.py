"""Helpers for the kernel tests: a real Sandbox kernel driven through jupyter_client,
and test hosts in network namespaces. Fixtures using them are in conftest.py.

(A module of its own, not conftest.py: several test directories have a conftest, and
``from conftest import …`` would pick whichever comes first on sys.path.)
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def sandbox_namespaces() -> set[str]:
    netns = Path("/run/netns")
    return {p.name for p in netns.iterdir() if p.name.startswith("sbx-")} if netns.exists() else set()


def namespaces_of(kernel_pid: int, state_dir: str = "/run/sandbox-kernel") -> set[str]:
    """The sandbox namespaces owned by one kernel process (other kernels may be running)."""
    import json

    owned = set()
    for owner in Path(state_dir).glob("*/owner.json"):
        try:
            if json.loads(owner.read_text()).get("kernel_pid") == kernel_pid:
                owned.add(f"sbx-{owner.parent.name}")
        except (OSError, ValueError):
            continue
    return owned & sandbox_namespaces()


def agent_pid(kernel_pid: int) -> int:
    """The pid (as the host sees it) of the sandbox agent a kernel started, root or rootless:
    the kernel's descendant running ``python -s /opt/sandbox-agent/agent.pyz``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    todo = list(children.get(kernel_pid, []))
    while todo:
        pid = todo.pop()
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        if argv[-1:] == [b"/opt/sandbox-agent/agent.pyz"] and b"bwrap" not in argv[0]:
            return pid
        todo += children.get(pid, [])
    raise AssertionError(f"no sandbox agent under kernel {kernel_pid}")


@dataclass
class Cell:
    """Everything one execute_request produced."""

    reply: dict
    outputs: list[dict] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.reply["content"]["status"]

    @property
    def sandbox(self) -> dict:
        return self.reply["metadata"]["sandbox"]

    def stream(self, name: str = "stdout") -> str:
        return "".join(o["content"]["text"] for o in self.outputs
                       if o["msg_type"] == "stream" and o["content"]["name"] == name)

    def of_type(self, msg_type: str) -> list[dict]:
        return [o for o in self.outputs if o["msg_type"] == msg_type]


class KernelDriver:
    """A real Sandbox kernel started by jupyter_client, and a blocking client to it."""

    def __init__(self, env: dict | None = None, kernel_name: str = "sandbox"):
        from jupyter_client.manager import KernelManager

        kernel_env = {**os.environ, **(env or {})}
        for attempt in range(3):
            self.km = KernelManager(kernel_name=kernel_name)
            self.km.start_kernel(env=kernel_env)
            self.kc = self.km.client()
            self.kc.start_channels()
            try:
                self.kc.wait_for_ready(timeout=60)
                break
            except RuntimeError as err:
                # jupyter_client picks the five ports before the kernel binds them: with many
                # kernels starting at once another process can take one first ("Address already
                # in use"), and the kernel dies at start. Start it again with new ports.
                self.kc.stop_channels()
                self.km.shutdown_kernel(now=True)
                if attempt == 2 or "died" not in str(err):
                    raise

    def execute(self, code: str, timeout: float = 60, stdin=None, on_output=None, **kwargs) -> Cell:
        """Run ``code``; answer input requests with ``stdin(prompt)``; return the Cell."""
        msg_id = self.kc.execute(code, allow_stdin=stdin is not None, **kwargs)
        start = time.monotonic()
        outputs, times = [], []
        deadline = start + timeout
        idle = False
        while not idle:
            if stdin is not None:
                try:
                    req = self.kc.get_stdin_msg(timeout=0.01)
                    if req["parent_header"].get("msg_id") == msg_id:
                        self.kc.input(stdin(req["content"]["prompt"]))
                except Exception:  # noqa: BLE001 - queue.Empty: no request yet
                    pass
            try:
                msg = self.kc.get_iopub_msg(timeout=0.05)
            except Exception:  # noqa: BLE001
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cell did not finish in {timeout} s: {code!r}")
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status":
                idle = msg["content"]["execution_state"] == "idle"
                continue
            if msg["msg_type"] == "execute_input":
                continue
            outputs.append(msg)
            times.append(time.monotonic() - start)
            if on_output:
                on_output(msg)
        while True:
            reply = self.kc.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        return Cell(reply=reply, outputs=outputs, times=times)

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid

    def status_rows(self, *names: str) -> list[str]:
        """The rows of ``%sandbox status`` whose first word is one of ``names``, as shown."""
        text = self.execute("%sandbox status").outputs[0]["content"]["data"]["text/plain"]
        return [row for row in text.splitlines() if row.split()[0] in names]

    def policy_state(self) -> dict[str, list[str] | str]:
        """The policy rows of ``%sandbox status``: mode, entries, presets."""
        text = self.execute("%sandbox status").outputs[0]["content"]["data"]["text/plain"]
        rows = dict(line.split(None, 1) for line in text.splitlines() if len(line.split(None, 1)) == 2)

        def items(row: str) -> list[str]:
            value = rows.get(row, "none")
            return [] if value == "none" else [v.split(" (expires")[0] for v in value.split(", ")]

        return {"mode": "allowlist" if rows["policy"].startswith("allowlist") else "deny",
                "entries": items("entries"), "presets": items("presets")}

    def reset(self, policy: dict | None = None) -> None:
        """Between tests that share this kernel: back to ``policy`` (as policy_state gives it)
        and no user variables, so no test depends on what an earlier one left behind."""
        if policy is not None:
            now = self.policy_state()
            extra = [e for e in now["entries"] if e not in policy["entries"]]
            missing = [e for e in policy["entries"] if e not in now["entries"]]
            lines = []
            if extra:
                lines.append("%sandbox revoke " + " ".join(extra))
            if [p for p in now["presets"] if p not in policy["presets"]]:
                lines.append("%sandbox revoke preset " + " ".join(p for p in now["presets"] if p not in policy["presets"]))
            if missing:
                lines.append("%sandbox allow " + " ".join(missing))
            if now["mode"] != policy["mode"] or lines:
                lines.append(f"%sandbox mode {policy['mode']}")
            for line in lines:
                cell = self.execute(line)
                assert cell.status == "ok", (line, cell.outputs)
            assert self.policy_state() == policy
        cell = self.execute("%reset -f")
        assert cell.status == "ok", cell.outputs

    def namespaces(self) -> set[str]:
        """This kernel's sandbox namespaces."""
        return namespaces_of(self.pid)

    def shutdown(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            self.km.shutdown_kernel(now=False)


# -- test hosts -------------------------------------------------------------------------

@dataclass
class TestHost:
    """A host in a network namespace of its own, reachable from the host: TCP on ``port``
    and ``port + 1`` (IPv4 and IPv6), UDP on ``port``; it logs every contact. TCP on
    ``port + 2`` is a sink: it keeps each connection open and reads until the peer closes."""

    name: str
    ip: str
    ip6: str
    port: int
    connections: list = field(default_factory=list)

    def seen(self) -> int:
        """How many connections/datagrams reached the host (read from its log)."""
        log = Path(f"/tmp/{self.name}.log")
        return len(log.read_text().splitlines()) if log.exists() else 0


_HOST_SERVER = r"""
import socket, sys, threading, os
port, log = int(sys.argv[1]), sys.argv[2]
def note(what):
    with open(log, "a") as f:
        f.write(what + "\n")
def tcp(family, addr, port):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr, port)); s.listen(16)
    while True:
        c, peer = s.accept(); note(f"tcp {peer[0]}")
        try:
            c.sendall(b"hello from test host\n")
        finally:
            c.close()
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", port))
    while True:
        data, peer = s.recvfrom(2048); note(f"udp {peer[0]}")
        s.sendto(b"pong", peer)
def sink():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port + 2)); s.listen(16)
    def drain(c):
        while c.recv(65536):
            pass
    while True:
        c, peer = s.accept(); note(f"sink {peer[0]}")
        threading.Thread(target=drain, args=(c,), daemon=True).start()
targets = [udp, sink]
for p in (port, port + 1):
    targets += [lambda p=p: tcp(socket.AF_INET, "0.0.0.0", p), lambda p=p: tcp(socket.AF_INET6, "::", p)]
for target in targets:
    threading.Thread(target=target, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


_HOST_INDEX = itertools.count(1)

#: a cell that prints ``connected`` or ``refused <error>`` for a TCP connection to
#: ``{ip}:{port}`` (fill in with ``CONNECT.format(ip=..., port=...)``). ``connected`` is printed
#: once the host's greeting has arrived: the test host logs a contact before it greets, so after
#: ``connected`` :meth:`TestHost.seen` counts it (a finished handshake alone says nothing about
#: whether the host's server has taken the connection yet)
CONNECT = ("import socket\n"
           "try:\n"
           "    with socket.create_connection(({ip!r}, {port}), timeout=3) as c:\n"
           "        c.recv(1)\n"
           "    print('connected')\n"
           "except OSError as e:\n"
           "    print('refused', type(e).__name__)\n")


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def add_host_namespace(name: str, ip: str, gateway: str, ip6: str | None = None,
                       gateway6: str | None = None) -> None:
    """Network namespace ``name`` joined to this one by a veth pair (``<name>h`` here with
    ``gateway``, ``<name>p`` there with ``ip``; /24, and /64 for the IPv6 pair), its default
    route through the gateway. Undo with :func:`remove_host` (also after a failure here)."""
    host_if, peer_if = f"{name}h", f"{name}p"
    _sh("ip", "netns", "add", name)
    _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
    _sh("ip", "link", "set", peer_if, "netns", name)
    _sh("ip", "addr", "add", f"{gateway}/24", "dev", host_if)
    if ip6:
        _sh("ip", "-6", "addr", "add", f"{gateway6}/64", "dev", host_if, "nodad")
    _sh("ip", "link", "set", host_if, "up")
    _sh("ip", "-n", name, "addr", "add", f"{ip}/24", "dev", peer_if)
    if ip6:
        _sh("ip", "-n", name, "-6", "addr", "add", f"{ip6}/64", "dev", peer_if, "nodad")
    _sh("ip", "-n", name, "link", "set", peer_if, "up")
    _sh("ip", "-n", name, "link", "set", "lo", "up")
    _sh("ip", "-n", name, "route", "add", "default", "via", gateway)
    if ip6:
        _sh("ip", "-n", name, "-6", "route", "add", "default", "via", gateway6)


def start_host_server(name: str, port: int) -> subprocess.Popen:
    """The test host's server (see :class:`TestHost`) in namespace ``name``, logging to
    /tmp/<name>.log; returns once it listens."""
    import sys

    log = Path(f"/tmp/{name}.log")
    log.unlink(missing_ok=True)
    proc = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", _HOST_SERVER,
                             str(port), str(log)], stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the test host's server in {name} did not start")
    return proc


def remove_host(name: str, server: subprocess.Popen | None = None) -> None:
    """Stop the host's server, remove its veth pair, namespace and log (what exists of them)."""
    if server is not None:
        server.kill()
        server.wait()
    _sh("ip", "link", "del", f"{name}h", check=False)
    _sh("ip", "netns", "del", name, check=False)
    Path(f"/tmp/{name}.log").unlink(missing_ok=True)


class Panel:
    """Finds the panel's widgets from their comm_open messages and drives them."""

    def __init__(self, kernel, cell):
        self.kernel = kernel
        self.models = {}
        for out in cell.outputs:
            if out["msg_type"] == "comm_open":
                state = out["content"]["data"]["state"]
                self.models[out["content"]["comm_id"]] = dict(state)
            elif out["msg_type"] == "comm_msg" and out["content"]["data"].get("method") == "update":
                self.models.setdefault(out["content"]["comm_id"], {}).update(out["content"]["data"]["state"])
        assert any(o["msg_type"] == "display_data" and "application/vnd.jupyter.widget-view+json" in o["content"]["data"]
                   for o in cell.outputs)

    def find(self, model, **match):
        for comm_id, state in self.models.items():
            if state.get("_model_name") == model and all(state.get(k) == v for k, v in match.items()):
                return comm_id
        raise KeyError((model, match))

    def send(self, comm_id, data):
        kc = self.kernel.kc
        msg = kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
        kc.shell_channel.send(msg)
        # wait until the kernel has handled it, keeping the widgets' state up to date
        while True:
            reply = kc.get_iopub_msg(timeout=30)
            if reply["msg_type"] == "comm_msg" and reply["content"]["data"].get("method") == "update":
                self.models.setdefault(reply["content"]["comm_id"], {}).update(reply["content"]["data"]["state"])
            if (reply["parent_header"].get("msg_id") == msg["header"]["msg_id"] and reply["msg_type"] == "status"
                    and reply["content"]["execution_state"] == "idle"):
                return

    def wait_for_html(self, *needles: str, timeout: float = 30.0) -> str:
        """Read widget updates until an HTML widget's value contains every needle (Apply
        reports when the change is enforced or refused, after the click's reply)."""
        deadline = time.monotonic() + timeout
        while True:
            for state in self.models.values():
                value = state.get("value")
                if state.get("_model_name") == "HTMLModel" and isinstance(value, str) and all(n in value for n in needles):
                    return value
            left = deadline - time.monotonic()
            assert left > 0, f"no widget says {needles}: {[m.get('value') for m in self.models.values()]}"
            try:
                reply = self.kernel.kc.get_iopub_msg(timeout=min(left, 1.0))
            except Exception:  # noqa: BLE001 - queue.Empty: look again
                continue
            if reply["msg_type"] == "comm_msg" and reply["content"]["data"].get("method") == "update":
                self.models.setdefault(reply["content"]["comm_id"], {}).update(reply["content"]["data"]["state"])

    def set(self, comm_id, **state):
        self.send(comm_id, {"method": "update", "state": state, "buffer_paths": []})

    def click(self, comm_id):
        self.send(comm_id, {"method": "custom", "content": {"event": "click"}})


def shared_kernel(env: dict | None = None, kernel_name: str = "sandbox"):
    """A module-scoped fixture body: one kernel for the module's tests (cheaper than one each)."""
    driver = KernelDriver(env, kernel_name)
    driver.initial_policy = driver.policy_state()
    yield driver
    driver.shutdown()


def reset_between_tests(driver: KernelDriver):
    """The function-scoped face of a shared kernel: each test starts from the kernel's initial
    policy and no user variables, whatever ran before it (order of tests does not matter)."""
    driver.reset(driver.initial_policy)
    return driver
