"""The agent: one persistent interpreter serving one kernel, request by request.

Runs inside the sandbox, standard library only. The parts, each in its own module:
:mod:`.streams` (a cell's output and what is written to fds 1 and 2), :mod:`.interpreters`
(IPython, or the built-in interpreter, running the code), :mod:`.processes` (shell
commands, signals, zombies), :mod:`.guard` and :mod:`.netwatch` (refused connections),
:mod:`.channel` (the link to the kernel). This module is the loop between them.

Threads: the main thread runs cells (signals, and so interrupts, only reach the main
thread in Python); a reader thread receives frames from the kernel; the streams' flusher
and capture threads send output (see :mod:`.streams`).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

from . import guard as guards
from . import processes, protocol
from .channel import Channel
from .interpreters import make_interpreter, system_exit_status
from .netwatch import Watcher
from .streams import FdCapture, Flusher, OutStream, quiet_thread


class Agent:
    """One persistent interpreter serving one kernel over a :class:`Channel`."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.cell_id: object = None
        self.executing = False
        self.allow_stdin = False
        self.shell_status: int | None = None
        self.payload: list[dict] = []
        self.policy: dict | None = None
        self.queue: queue.Queue[dict] = queue.Queue()
        self.inputs: queue.Queue[object] = queue.Queue()
        self.capture = FdCapture(self.send_stream)
        self.flusher = Flusher()
        self.stdout = OutStream("stdout", 1, self.send_stream, self.flusher)
        self.stderr = OutStream("stderr", 2, self.send_stream, self.flusher)
        self.guard = guards.Guard(self.report_guarded, self.report_reached)
        self.watcher = Watcher(self.report_blocked, host_of=self.guard.host_of)
        self.interpreter = make_interpreter(self)

    # -- output -----------------------------------------------------------------
    def send(self, frame: dict) -> None:
        __tracebackhide__ = True  # noqa: F841 - a KeyboardInterrupt may surface here: not the user's code
        self.channel.send(frame)

    def send_stream(self, name: str, text: str) -> None:
        __tracebackhide__ = True  # noqa: F841 - a KeyboardInterrupt may surface here: not the user's code
        self.send({"type": "stream", "id": self.cell_id, "name": name, "text": text})

    def flush_output(self) -> None:
        """Send pending output so that it precedes the next event."""
        self.stdout.flush()
        self.stderr.flush()
        self.capture.drain()

    def send_display(self, data, metadata=None, transient=None, update=False) -> None:
        self.flush_output()
        self.send({"type": "display", "id": self.cell_id, "data": data,
                   "metadata": metadata or {}, "transient": transient or {}, "update": bool(update)})

    def report_blocked(self, record: dict) -> None:
        """A connection the watcher saw dropped (watcher thread)."""
        self.send({"type": "blocked", "id": self.cell_id, "record": record})

    def report_guarded(self, record: dict) -> None:
        """A connection the guard refused (the cell's own thread): keep it in output order."""
        self.stdout.flush()
        self.stderr.flush()
        self.report_blocked(record)

    def report_reached(self, record: dict) -> None:
        """Learn mode: a connection the guard let through (the cell's own thread)."""
        self.stdout.flush()
        self.stderr.flush()
        self.send({"type": "reached", "id": self.cell_id, "record": record})

    def send_error(self, ename: str, evalue: str, tb: list[str]) -> None:
        self.flush_output()
        self.send({"type": "error", "id": self.cell_id, "ename": ename, "evalue": evalue,
                   "traceback": tb})

    # -- frames from the kernel ---------------------------------------------------
    def hello(self) -> dict:
        return {"type": "hello", "version": protocol.VERSION, "pid": os.getpid(),
                "python": sys.version.split()[0], "ipython": self.interpreter.ipython_version}

    def on_frame(self, frame: dict) -> None:
        """Called in the reader thread for every frame."""
        kind = frame["type"]
        if kind == "interrupt":
            self.interrupt()
        elif kind == "input_reply":
            self.inputs.put(frame.get("value"))
        elif kind == "ping":
            self.send({"type": "pong", "id": frame.get("id")})
        elif kind == "policy":
            policy = frame.get("policy")
            if isinstance(policy, dict):
                self.policy = policy
                self.guard.set_policy(policy)
                threshold = policy.get("watch_threshold")
                if isinstance(threshold, (int, float)) and threshold > 0:
                    self.watcher.threshold = float(threshold)
        else:
            self.queue.put(frame)

    def interrupt(self) -> None:
        if not self.executing:
            return
        try:
            # the whole process group: the cell (main thread) and the shell commands it started
            processes.signal_group(signal.SIGINT)
        except OSError:
            os.kill(os.getpid(), signal.SIGINT)

    # -- main loop ----------------------------------------------------------------
    def run(self) -> None:
        if os.getpgrp() != os.getpid():
            # interrupts go to our process group: make sure it holds only the sandbox
            try:
                os.setpgid(0, 0)
            except OSError:
                pass
        sys.stdout, sys.stderr = self.stdout, self.stderr
        sys.stdin = open(os.devnull)  # noqa: SIM115 - input() goes through the protocol
        self.capture.start()
        self.flusher.start()
        self.watcher.start()
        guards.install(self.guard)
        reader = threading.Thread(target=self._serve, name="sandbox-reader", daemon=True)
        reader.start()
        while True:
            try:
                frame = self.queue.get()
                if frame["type"] == "shutdown":
                    self.flush_output()
                    return
                self.handle(frame)
            except KeyboardInterrupt:
                continue  # an interrupt that arrived between cells

    def _serve(self) -> None:
        quiet_thread()
        self.channel.serve(self.on_frame, self.hello)
        # stdio: the kernel closed our input, so it is gone (or asked us to stop)
        self.queue.put({"type": "shutdown"})

    def handle(self, frame: dict) -> None:
        kind = frame["type"]
        fid = frame.get("id")
        if kind == "execute":
            self.execute(frame)
            return
        try:
            if kind == "complete":
                content = self.interpreter.complete(str(frame.get("code", "")), _int(frame.get("cursor_pos")))
            elif kind == "inspect":
                content = self.interpreter.inspect(str(frame.get("code", "")), _int(frame.get("cursor_pos")),
                                              _int(frame.get("detail_level"), 0))
            elif kind == "is_complete":
                content = self.interpreter.is_complete(str(frame.get("code", "")))
            else:
                content = {"status": "error", "ename": "ProtocolError",
                           "evalue": f"unexpected frame {kind!r}", "traceback": []}
        except Exception as err:  # noqa: BLE001 - a helper request must never kill the agent
            content = {"status": "error", "ename": type(err).__name__, "evalue": str(err),
                       "traceback": []}
        self.send({"type": "reply", "id": fid, "content": content})

    def execute(self, frame: dict) -> None:
        code = frame.get("code")
        if not isinstance(code, str):
            code = ""
        # a local, not an attribute, and taken out of the frame: code in the cell has to dig
        # through the interpreter's frames to find it (see docs/security.md for the limits)
        nonce = frame.pop("nonce", None)
        self.cell_id = frame.get("id")
        self.allow_stdin = bool(frame.get("allow_stdin", False))
        self.shell_status = None
        self.payload = []
        with_inputs_cleared(self.inputs)
        start = time.perf_counter()
        status = "ok"
        exit_status = 0
        count = _int(frame.get("execution_count"), 0)
        user_expressions: dict = {}
        processes.reap_forgotten_children()  # zombies of earlier cells would count against the process limit
        self.executing = True
        try:
            error = self.interpreter.run(code, count, silent=bool(frame.get("silent")),
                                    store_history=bool(frame.get("store_history", True)))
            exprs = frame.get("user_expressions")
            if isinstance(exprs, dict) and exprs:
                user_expressions = self.interpreter.user_expressions(exprs)
        except KeyboardInterrupt:
            # the interrupt landed in the runner's own bookkeeping, after or around the code
            self.send_error("KeyboardInterrupt", "", ["KeyboardInterrupt"])
            error = KeyboardInterrupt()
        finally:
            self.executing = False
        try:
            self.flush_output()
        except KeyboardInterrupt:
            self.flush_output()
        if isinstance(error, SystemExit):
            exit_status = system_exit_status(error)
        elif error is not None:
            exit_status = 1
        elif self.shell_status is not None:
            exit_status = self.shell_status
        if exit_status != 0:
            status = "error"
        processes.reap_forgotten_children()
        self.send({"type": "done", "id": self.cell_id, "nonce": nonce, "status": status, "exit_status": exit_status,
                   "duration_ms": round((time.perf_counter() - start) * 1000, 3),
                   "execution_count": count, "payload": self.payload, "user_expressions": user_expressions})
        self.cell_id = None

    # -- services for cells ---------------------------------------------------------
    def input(self, prompt: object = "", password: bool = False) -> str:
        """``input()`` and ``getpass()`` inside a cell: ask the kernel for a line."""
        self.flush_output()
        if not self.allow_stdin:
            raise RuntimeError("input() is not available: this frontend does not support input requests")
        with_inputs_cleared(self.inputs)
        self.send({"type": "input_request", "id": self.cell_id, "prompt": str(prompt),
                   "password": bool(password)})
        while True:
            try:
                value = self.inputs.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        if value is None:
            raise KeyboardInterrupt("Interrupted by user")
        value = str(value)
        if value == "\x04":
            raise EOFError
        return value

    def system(self, cmd) -> int:
        """Run a shell command with its output streamed (``!cmd``, ``%%bash``); record its status."""
        self.flush_output()
        proc = subprocess.Popen(processes.shell_argv(cmd), stdin=subprocess.DEVNULL)
        try:
            status = proc.wait()
        except KeyboardInterrupt:
            processes.stop(proc)
            self.shell_status = 130
            self.capture.drain()
            raise
        self.capture.drain()
        status = processes.exit_status(status)
        self.shell_status = status
        return status


def with_inputs_cleared(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def _int(value, default=None):
    return value if isinstance(value, int) and not isinstance(value, bool) else default
