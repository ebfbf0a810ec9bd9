"""The enforcer's log reader: a small process of its own that reads a sandbox's NFLOG socket and
names the process that sent each refused packet (sockowner.py), the moment it is logged.

Why a process and not a thread of the kernel: the sender is looked up in /proc while it still
holds its socket, often a matter of a millisecond after the refusal (a refused TCP connect is
closed at once). A thread of the kernel would need the kernel's GIL first, and the kernel's main
thread may hold it while the machine is busy; this process holds nothing else, runs at a real-time
priority (as long as the refusals stay under :data:`LOOKUPS_PER_S`) and does only this.

Started by the local backend when a sandbox starts (:class:`EnforcerLogProcess`), with the NFLOG
socket and a sock_diag socket it created in the sandbox's namespace. It exits when its stdin
closes (the backend stops it, or the kernel died). Lines it writes, one JSON object each:
``{"ready": true}`` once it reads, ``{"packet": {LoggedPacket fields}, "process": {"name", "pid"}
| null}``, and ``{"drained": N}`` after the backend's ``drain N`` (a cell ended: everything
logged so far has been written).
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Callable

from . import nflog, sockowner

if TYPE_CHECKING:  # the reader process must start fast: it does not import asyncio
    import asyncio

#: most sender lookups a second; beyond that (a flood of refusals) packets are passed on
#: without a process and the reader drops its real-time priority for the rest of the second
LOOKUPS_PER_S = 200


# -- the reader process --------------------------------------------------------------

def _priority(realtime: bool) -> None:
    try:
        if realtime:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        else:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    """``python -m sandbox_kernel.backends.local.enforcerlog NFLOG_FD DIAG_FD NETNS CGROUP_DIR…``"""
    log_sock = socket.socket(fileno=int(argv[0]))
    log_sock.setblocking(False)
    diag = sockowner.SocketDiag.from_fd(int(argv[1])) if int(argv[1]) >= 0 else None
    netns, cgroups = argv[2], argv[3:]
    out = sys.stdout
    window, lookups, realtime = time.monotonic(), 0, True
    _priority(True)
    pending = b""
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()

    def handle() -> None:
        nonlocal window, lookups, realtime
        pids = None
        while True:
            try:
                data = log_sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ENOBUFS: the kernel dropped log messages; go on
                continue
            for packet in nflog.parse(data):
                now = time.monotonic()
                if now - window >= 1:
                    window, lookups = now, 0
                    if not realtime:
                        realtime = True
                        _priority(True)
                process = None
                if lookups < LOOKUPS_PER_S:
                    lookups += 1
                    if pids is None:  # once per read: its packets come from the same moment
                        pids = sockowner.sandbox_pids(cgroups, netns)
                    process = sockowner.owner(pids, packet.protocol, packet.src, packet.sport,
                                              packet.dst, packet.dport, diag=diag)
                elif realtime:
                    realtime = False
                    _priority(False)
                out.write(json.dumps({"packet": dataclasses.asdict(packet), "process": process}) + "\n")
        out.flush()

    while True:
        readable, _, _ = select.select([log_sock, 0], [], [])
        if log_sock in readable:
            handle()
        if 0 in readable:
            chunk = os.read(0, 4096)
            if not chunk:
                return 0
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if line.startswith(b"drain "):
                    handle()
                    out.write(json.dumps({"drained": int(line.split()[1])}) + "\n")
                    out.flush()


# -- the kernel's side -----------------------------------------------------------------

class EnforcerLogProcess:
    """Starts the reader process for one sandbox and hands its packets to the event loop.

    ``deliver(packet, process)`` is called on the loop for each refused packet, in order.
    ``on_exit()`` is called once if the reader ends on its own (the backend then reads the log
    itself). Used by the local backend only.
    """

    def __init__(self, log_sock: socket.socket, diag_sock: socket.socket | None, netns_path: str,
                 cgroup_dirs: list[str], loop: asyncio.AbstractEventLoop,
                 deliver: Callable[[nflog.LoggedPacket, dict | None], None], on_exit: Callable[[], None], log):
        fds = [log_sock.fileno()] + ([diag_sock.fileno()] if diag_sock is not None else [])
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "sandbox_kernel.backends.local.enforcerlog", str(log_sock.fileno()),
             str(diag_sock.fileno() if diag_sock is not None else -1), netns_path, *cgroup_dirs],
            pass_fds=fds, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            close_fds=True)
        self._out = self._proc.stdout.fileno()
        os.set_blocking(self._out, False)
        self._loop = loop
        self._deliver = deliver
        self._on_exit = on_exit
        self._log = log
        self._buffer = b""
        self._drained = 0
        self._asked = 0
        self._closed = False
        self._ready = loop.create_future()
        loop.add_reader(self._out, self._readable)

    async def wait_ready(self, timeout: float = 5.0) -> None:
        """Wait until the reader runs (the backend, while the agent starts), so that the first
        cell's refusals are looked up at once; on a timeout the packets wait in the log."""
        import asyncio

        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except asyncio.TimeoutError:
            self._log.warning("the enforcer log reader did not start within %.0f s", timeout)

    def _readable(self) -> None:
        if not self._read():
            self._gone()

    def _read(self) -> bool:
        """Take what the reader wrote; False at its end."""
        while True:
            try:
                chunk = os.read(self._out, 1 << 16)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not chunk:
                return False
            self._buffer += chunk
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                self._line(line)

    def _line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
            if "drained" in message:
                self._drained = int(message["drained"])
            elif "ready" in message:
                if not self._ready.done():
                    self._ready.set_result(True)
            else:
                self._deliver(nflog.LoggedPacket(**message["packet"]), message.get("process"))
        except (ValueError, TypeError, KeyError) as err:
            self._log.warning("enforcer log reader: bad line %r: %s", line[:200], err)

    def _gone(self) -> None:
        if not self._ready.done():
            self._ready.set_result(False)
        if self._closed:
            return
        self._log.warning("the enforcer log reader ended (status %s); reading the log in the kernel",
                          self._proc.poll())
        self.close()
        self._on_exit()

    def drain(self, timeout: float = 1.0) -> None:
        """Deliver every packet logged up to now (a cell ended). Blocks up to ``timeout``."""
        if self._closed:
            return
        self._asked += 1
        try:
            self._proc.stdin.write(f"drain {self._asked}\n".encode())
            self._proc.stdin.flush()
        except OSError:
            self._gone()
            return
        deadline = time.monotonic() + timeout
        while self._drained < self._asked:
            left = deadline - time.monotonic()
            if left <= 0:
                self._log.warning("the enforcer log reader did not answer within %.1f s", timeout)
                return
            select.select([self._out], [], [], left)
            if not self._read():
                self._gone()
                return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.remove_reader(self._out)
        except (RuntimeError, ValueError):
            pass
        try:
            self._proc.stdin.close()  # the reader exits at the end of its stdin
        except OSError:
            pass
        try:
            self._proc.wait(1)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
