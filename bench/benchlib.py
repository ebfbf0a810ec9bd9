"""What the benchmarks share: a kernel driven through jupyter_client, the kernel's memory,
and a destination host in a network namespace of its own.

Every host is named for its run (``skb-`` and random hex), sits on a /24 of 10.233.0.0/16
that no other interface of the machine uses, and is removed when its ``with`` block ends,
also on an error, Ctrl-C or SIGTERM; so two benchmarks can run at once, and beside the test
suite (whose hosts are in 10.231.0.0/16).
"""

from __future__ import annotations

import ipaddress
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from jupyter_client.manager import KernelManager

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from kerneltest import add_host_namespace, remove_host, start_host_server  # noqa: E402 - the test suite's hosts

#: where the benchmarks' hosts get their /24s
HOST_RANGE = ipaddress.ip_network("10.233.0.0/16")


def rss_mb(pid: int) -> float:
    """The resident memory of process ``pid`` (MiB)."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1024


class Sampler:
    """``with Sampler(pid) as s:`` ... ``s.peak``: the process's peak RSS (MiB) and its most
    open descriptors (``s.fds``) while the block ran, sampled every 50 ms."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, rss_mb(pid), threading.Event()
        self.fds = len(os.listdir(f"/proc/{pid}/fd"))
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(self.pid))
            self.fds = max(self.fds, len(os.listdir(f"/proc/{self.pid}/fd")))
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Ran:
    """One cell: its IOPub messages with the time each arrived (``time.time()``), and its reply."""

    seen: list[tuple[float, dict]]
    reply: dict

    @property
    def messages(self) -> list[dict]:
        return [msg for _, msg in self.seen]

    @property
    def sandbox(self) -> dict:
        """The reply's ``metadata["sandbox"]`` (exit status, blocked destinations, ...)."""
        return self.reply["metadata"].get("sandbox", {})


class Kernel:
    """A kernel (the Sandbox kernel unless named) started through jupyter_client, with a client;
    ``with Kernel() as k:`` shuts it down after the block."""

    def __init__(self, env: dict | None = None, kernel_name: str = "sandbox", ready_timeout: float = 60):
        self.km = KernelManager(kernel_name=kernel_name)
        self.km.start_kernel(env={**os.environ, **(env or {})})
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=ready_timeout)
        self.pid = self.km.provisioner.process.pid

    def run(self, code: str, timeout: float = 300, **execute) -> Ran:
        """Run ``code`` (``execute``: more fields of the request) and wait for its reply."""
        msg_id = self.kc.execute(code, **execute)
        seen = []
        while True:
            msg = self.kc.get_iopub_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            seen.append((time.time(), msg))
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        while True:
            reply = self.kc.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                return Ran(seen, reply)

    def kernel_info_s(self, channel: str) -> float:
        """One kernel_info round trip on ``channel`` (control or shell), in seconds."""
        start = time.monotonic()
        if channel == "control":
            msg = self.kc.session.msg("kernel_info_request")
            self.kc.control_channel.send(msg)
            while self.kc.control_channel.get_msg(timeout=30)["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
                pass
        else:
            msg_id = self.kc.kernel_info()
            while self.kc.get_shell_msg(timeout=30)["parent_header"].get("msg_id") != msg_id:
                pass
        return time.monotonic() - start

    def stop(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=False)

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass(frozen=True)
class Host:
    name: str  # its network namespace; its veth pair is <name>h (this side) and <name>p
    ip: str
    gateway: str


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


def _used_subnets() -> set[ipaddress.IPv4Network]:
    """The /24s of HOST_RANGE that an address of this machine (its own network namespace) is in."""
    used = set()
    for line in _sh("ip", "-4", "-o", "addr", "show").stdout.splitlines():
        address = ipaddress.ip_interface(line.split()[3])
        if address.ip in HOST_RANGE:
            used.add(ipaddress.ip_network(f"{address.ip}/24", strict=False))
    return used


@contextmanager
def netns_host(serve_port: int | None = None):
    """A host in a network namespace of this run, routed from the machine; removed after.

    With ``serve_port`` it runs the test suite's host server there (TCP ``serve_port``
    answers "hello from test host", see tests/kerneltest.py). Needs root."""
    name = f"skb-{uuid.uuid4().hex[:8]}"
    server = None
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM ends the run through the finally below, not around it
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        for _ in range(20):
            # 10.233.1.0/24 to 10.233.254.0/24, one that no interface here is in
            candidates = list(HOST_RANGE.subnets(new_prefix=24))[1:-1]
            used = _used_subnets()
            subnet = random.choice([n for n in candidates if n not in used])
            host = Host(name, str(subnet[2]), str(subnet[1]))
            add_host_namespace(name, host.ip, host.gateway)
            # another run may have taken the same /24 a moment ago: then both choose again
            if _owners(subnet) == [f"{name}h"]:
                break
            remove_host(name)
        else:
            raise RuntimeError(f"no free /24 in {HOST_RANGE} for a benchmark host")
        if serve_port is not None:
            server = start_host_server(name, serve_port)
        yield host
    finally:
        remove_host(name, server)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        elif threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _owners(subnet: ipaddress.IPv4Network) -> list[str]:
    """The interfaces of this machine with an address in ``subnet``."""
    out = _sh("ip", "-4", "-o", "addr", "show", "to", str(subnet)).stdout
    return sorted({line.split()[1].split("@")[0] for line in out.splitlines()})
