"""The agent's interpreter: runs cells, streams their output, reports exit status.

Runs inside the sandbox, standard library only; uses IPython when it is installed
(magics, rich display, completion) and a small built-in runner otherwise.

Threads: the main thread runs cells (signals, and so interrupts, only reach the main
thread in Python); a reader thread receives frames from the kernel; a flusher thread
sends buffered ``print`` output at least every :data:`FLUSH_INTERVAL` seconds; a capture
thread forwards what anything writes to file descriptors 1 and 2 (subprocesses, C code).
"""

from __future__ import annotations

import ast
import builtins
import codecs
import codeop
import errno
import fcntl
import io
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings

from . import guard as guards
from . import protocol
from .channel import Channel
from .netwatch import Watcher

FLUSH_INTERVAL = 0.02
_SHELL = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"


def _quiet_thread() -> None:
    """Keep SIGINT for the main thread, where the running cell is."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


class OutStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` for cells: buffered, flushed by size or by time."""

    def __init__(self, agent: Agent, name: str, fd: int):
        super().__init__()
        self._agent = agent
        self.name = name
        self._fd = fd
        self._buf: list[str] = []
        self._size = 0
        self._lock = threading.Lock()

    encoding = "utf-8"
    errors = "replace"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self._fd

    def write(self, text) -> int:
        __tracebackhide__ = True  # noqa: F841 - a KeyboardInterrupt may surface here: not the user's code
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not text:
            return 0
        with self._lock:
            self._buf.append(text)
            self._size += len(text)
            if self._size >= protocol.STREAM_CHUNK:
                self._flush_locked()
                return len(text)
        self._agent.flusher.poke()
        return len(text)

    def flush(self) -> None:
        __tracebackhide__ = True  # noqa: F841 - a KeyboardInterrupt may surface here: not the user's code
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        __tracebackhide__ = True  # noqa: F841 - a KeyboardInterrupt may surface here: not the user's code
        if not self._buf:
            return
        text = "".join(self._buf)
        self._buf.clear()
        self._size = 0
        for start in range(0, len(text), protocol.STREAM_CHUNK):
            self._agent.send_stream(self.name, text[start : start + protocol.STREAM_CHUNK])


class Flusher(threading.Thread):
    """Sends buffered stream output shortly after it was written."""

    def __init__(self, streams: list[OutStream]):
        super().__init__(name="sandbox-flusher", daemon=True)
        self._streams = streams
        self._event = threading.Event()

    def poke(self) -> None:
        if not self._event.is_set():
            self._event.set()

    def run(self) -> None:
        _quiet_thread()
        while True:
            self._event.wait()
            time.sleep(FLUSH_INTERVAL)
            self._event.clear()
            for stream in self._streams:
                stream.flush()


class FdCapture(threading.Thread):
    """Forwards whatever is written to fds 1 and 2 (subprocesses, C code) as stream frames."""

    def __init__(self, agent: Agent):
        super().__init__(name="sandbox-fd-capture", daemon=True)
        self._agent = agent
        self.lock = threading.Lock()
        self._fds: dict[int, tuple[str, codecs.IncrementalDecoder]] = {}
        for target, name in ((1, "stdout"), (2, "stderr")):
            r, w = os.pipe()
            os.dup2(w, target)
            os.close(w)
            fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_NONBLOCK)
            self._fds[r] = (name, codecs.getincrementaldecoder("utf-8")("replace"))

    def run(self) -> None:
        _quiet_thread()
        fds = list(self._fds)
        while True:
            ready, _, _ = select.select(fds, [], [])
            with self.lock:
                for fd in ready:
                    self._read(fd)

    def drain(self) -> None:
        """Send everything already written to fds 1/2 (called before a cell's later events)."""
        with self.lock:
            for fd in self._fds:
                while self._read(fd):
                    pass

    def _read(self, fd: int) -> bool:
        try:
            data = os.read(fd, protocol.STREAM_CHUNK)
        except BlockingIOError:
            return False
        except OSError as err:
            if err.errno == errno.EINTR:
                return True
            return False
        if not data:
            return False
        name, decoder = self._fds[fd]
        text = decoder.decode(data)
        if text:
            self._agent.send_stream(name, text)
        return True


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
        self.capture = FdCapture(self)
        self.stdout = OutStream(self, "stdout", 1)
        self.stderr = OutStream(self, "stderr", 2)
        self.flusher = Flusher([self.stdout, self.stderr])
        self.guard = guards.Guard(self.report_guarded, self.report_reached)
        self.watcher = Watcher(self.report_blocked, host_of=self.guard.host_of)
        self.runner = _make_runner(self)

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
                "python": sys.version.split()[0], "ipython": self.runner.ipython_version}

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
            signal_group(signal.SIGINT)
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
        _quiet_thread()
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
                content = self.runner.complete(str(frame.get("code", "")), _int(frame.get("cursor_pos")))
            elif kind == "inspect":
                content = self.runner.inspect(str(frame.get("code", "")), _int(frame.get("cursor_pos")),
                                              _int(frame.get("detail_level"), 0))
            elif kind == "is_complete":
                content = self.runner.is_complete(str(frame.get("code", "")))
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
        reap_forgotten_children()  # zombies of earlier cells would count against the process limit
        self.executing = True
        try:
            error = self.runner.run(code, count, silent=bool(frame.get("silent")),
                                    store_history=bool(frame.get("store_history", True)))
            exprs = frame.get("user_expressions")
            if isinstance(exprs, dict) and exprs:
                user_expressions = self.runner.user_expressions(exprs)
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
            exit_status = _system_exit_status(error)
        elif error is not None:
            exit_status = 1
        elif self.shell_status is not None:
            exit_status = self.shell_status
        if exit_status != 0:
            status = "error"
        reap_forgotten_children()
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
        argv = [_SHELL, "-c", cmd] if isinstance(cmd, str) else list(cmd)
        self.flush_output()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        try:
            status = proc.wait()
        except KeyboardInterrupt:
            _stop(proc)
            self.shell_status = 130
            self.capture.drain()
            raise
        self.capture.drain()
        status = 128 - status if status < 0 else status
        self.shell_status = status
        return status


def signal_group(sig: int) -> None:
    """Send ``sig`` to every process of our process group.

    As PID 1 of a container (the Kubernetes backend's pod), the group is 1, and
    ``killpg(1, sig)`` is ``kill(-1, sig)``: every process in the PID namespace, including
    the exec'd ``attach`` that carries the kernel's stream, which then dies. There the
    members of group 1 are found in /proc and signalled one by one."""
    group = os.getpgrp()
    if group > 1:
        os.killpg(group, sig)
        return
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            # after "(comm)": state, ppid, pgrp, ...
            if int(stat[stat.rindex(")") + 2:].split()[2]) == group:
                os.kill(int(name), sig)
        except (OSError, ValueError, IndexError):
            continue


def reap_forgotten_children() -> None:
    """Reap exited children nobody will wait for (``os.fork()`` in a cell), so zombies do
    not use up the sandbox's process limit. Children of live ``subprocess.Popen`` objects
    are left to them: reaping those would lose their exit status."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        return
    zombies = []
    for pid in children:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    zombies.append(pid)
        except OSError:
            continue
    if not zombies:
        return
    import gc

    owned = {obj.pid for obj in gc.get_objects() if isinstance(obj, subprocess.Popen)}
    for pid in zombies:
        if pid not in owned:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


def with_inputs_cleared(q: queue.Queue) -> None:
    while True:
        try:
            q.get_nowait()
        except queue.Empty:
            return


def _stop(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _int(value, default=None):
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _system_exit_status(err: SystemExit) -> int:
    code = err.code
    if code is None:
        return 0
    if isinstance(code, bool):
        return int(code)
    if isinstance(code, int):
        return code & 0xFF if code >= 0 else code
    return 1


# ---------------------------------------------------------------------------------
# Runners: how a cell's code is executed. IPython when present, else the built-in one.
# ---------------------------------------------------------------------------------

def _make_runner(agent: Agent):
    if os.environ.get("SANDBOX_AGENT_RUNNER") == "plain":
        return PlainRunner(agent)
    try:
        import IPython  # noqa: F401
    except ImportError:
        return PlainRunner(agent)
    return IPythonRunner(agent)


class PlainRunner:
    """Runs cells with the standard library only: Python, ``!cmd`` lines, ``%%bash``/``%%sh``."""

    ipython_version = None

    def __init__(self, agent: Agent):
        self.agent = agent
        self.ns: dict = {"__name__": "__main__", "__builtins__": builtins}
        builtins.input = agent.input  # type: ignore[assignment]

    def run(self, code: str, count: int, silent: bool, store_history: bool):
        first, _, rest = code.partition("\n")
        head = first.strip()
        if head in ("%%bash", "%%sh"):
            self.agent.system(rest)
            return None
        if head.startswith("%"):
            word = head.split()[0]
            self.agent.send_error("UsageError", f"{word} needs IPython, which is not installed in the sandbox",
                                  [f"UsageError: {word} needs IPython, which is not installed in the sandbox image"])
            return RuntimeError(word)
        try:
            tree = ast.parse(_transform_bang_lines(code), "<cell>", "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr) and not silent:
                last = ast.Expression(tree.body.pop().value)
            self.ns["__sandbox_system__"] = self.agent.system
            exec(compile(tree, "<cell>", "exec"), self.ns)  # noqa: S102 - running the user's cell is the point
            if last is not None:
                value = eval(compile(last, "<cell>", "eval"), self.ns)  # noqa: S307
                if value is not None:
                    self.ns["_"] = value
                    self.agent.flush_output()
                    self.agent.send({"type": "execute_result", "id": self.agent.cell_id,
                                     "data": _plain_mimebundle(value), "metadata": {},
                                     "execution_count": count})
        except BaseException as err:  # noqa: BLE001 - every error of the cell is reported
            if isinstance(err, SystemExit) and _system_exit_status(err) == 0:
                return err
            tb = traceback.format_exception(type(err), err, _user_tb(err.__traceback__))
            self.agent.send_error(type(err).__name__, str(err), "".join(tb).rstrip("\n").split("\n"))
            return err
        return None

    def user_expressions(self, exprs: dict) -> dict:
        out = {}
        for key, expr in exprs.items():
            try:
                value = eval(str(expr), self.ns)  # noqa: S307
                out[key] = {"status": "ok", "data": _plain_mimebundle(value), "metadata": {}}
            except Exception as err:  # noqa: BLE001
                out[key] = {"status": "error", "ename": type(err).__name__, "evalue": str(err),
                            "traceback": []}
        return out

    def complete(self, code: str, cursor_pos: int | None) -> dict:
        import rlcompleter

        pos = len(code) if cursor_pos is None else cursor_pos
        start = pos
        while start > 0 and (code[start - 1].isalnum() or code[start - 1] in "_."):
            start -= 1
        token = code[start:pos]
        completer = rlcompleter.Completer(self.ns)
        matches = []
        for i in range(1000):
            match = completer.complete(token, i)
            if match is None:
                break
            matches.append(match)
        return {"status": "ok", "matches": sorted(set(matches)), "cursor_start": start,
                "cursor_end": pos, "metadata": {}}

    def inspect(self, code: str, cursor_pos: int | None, detail_level: int) -> dict:
        import pydoc

        pos = len(code) if cursor_pos is None else cursor_pos
        start, end = pos, pos
        while start > 0 and (code[start - 1].isalnum() or code[start - 1] in "_."):
            start -= 1
        while end < len(code) and (code[end].isalnum() or code[end] == "_"):
            end += 1
        name = code[start:end]
        try:
            obj = eval(name, self.ns) if name else None  # noqa: S307
        except Exception:  # noqa: BLE001
            return {"status": "ok", "found": False, "data": {}, "metadata": {}}
        text = pydoc.render_doc(obj, renderer=pydoc.plaintext) if name else ""
        return {"status": "ok", "found": bool(name), "data": {"text/plain": text}, "metadata": {}}

    def is_complete(self, code: str) -> dict:
        try:
            compiled = codeop.compile_command(_transform_bang_lines(code), "<cell>", "exec")
        except (SyntaxError, ValueError, OverflowError):
            return {"status": "invalid"}
        if compiled is None:
            return {"status": "incomplete", "indent": "    " if code.rstrip().endswith(":") else ""}
        return {"status": "complete"}


def _transform_bang_lines(code: str) -> str:
    out = []
    for line in code.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("!"):
            indent = line[: len(line) - len(stripped)]
            out.append(f"{indent}__sandbox_system__({stripped[1:]!r})")
        else:
            out.append(line)
    return "\n".join(out)


def _user_tb(tb):
    """Drop the agent's own frames from the top and the bottom of a traceback."""
    while tb is not None and tb.tb_frame.f_code.co_filename != "<cell>":
        tb = tb.tb_next
    _trim_agent_tail(tb)
    return tb


def _is_agent_frame(frame) -> bool:
    return frame.f_globals.get("__name__", "").startswith(("sandbox_agent", "sandbox_kernel.agent"))


def _trim_agent_tail(tb) -> None:
    """Cut the agent's own frames off the bottom of a traceback (an interrupt that lands
    while a print() is being sent, the guard refusing a connection): the user sees where
    their code was, not the agent's plumbing. A traceback with no user frame is kept."""
    last_user = None
    while tb is not None:
        if not _is_agent_frame(tb.tb_frame):
            last_user = tb
        tb = tb.tb_next
    if last_user is not None:
        last_user.tb_next = None


def _plain_mimebundle(value) -> dict:
    data = {"text/plain": repr(value)}
    for mime, method in (("text/html", "_repr_html_"), ("image/png", "_repr_png_"),
                         ("text/markdown", "_repr_markdown_"), ("image/svg+xml", "_repr_svg_")):
        fn = getattr(value, method, None)
        if callable(fn):
            try:
                rendered = fn()
            except Exception:  # noqa: BLE001
                continue
            if rendered is not None:
                data[mime] = rendered
    return data


class IPythonRunner:
    """Runs cells in an IPython InteractiveShell whose output goes through the agent."""

    def __init__(self, agent: Agent):
        import IPython
        from IPython.core.displayhook import DisplayHook
        from IPython.core.displaypub import DisplayPublisher
        from IPython.core.interactiveshell import InteractiveShell

        self.agent = agent
        self.ipython_version = IPython.__version__

        class AgentDisplayPublisher(DisplayPublisher):
            def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kw):
                agent.send_display(data, metadata, transient, update)

            def clear_output(self, wait=False):
                agent.flush_output()
                agent.send({"type": "clear_output", "id": agent.cell_id, "wait": bool(wait)})

        class AgentDisplayHook(DisplayHook):
            def start_displayhook(self):
                self._data, self._md = None, None

            def write_output_prompt(self):
                pass

            def write_format_data(self, format_dict, md_dict=None):
                self._data, self._md = format_dict, md_dict or {}

            def finish_displayhook(self):
                if self._data:
                    agent.flush_output()
                    agent.send({"type": "execute_result", "id": agent.cell_id, "data": self._data,
                                "metadata": self._md, "execution_count": self.shell.execution_count})
                self._data, self._md = None, None

        class AgentShell(InteractiveShell):
            def showtraceback(self, exc_tuple=None, *args, **kwargs):
                try:
                    _trim_agent_tail(self._get_exc_info(exc_tuple)[2])
                except ValueError:  # no exception to show
                    pass
                return super().showtraceback(exc_tuple, *args, **kwargs)

            def _showtraceback(self, etype, evalue, stb):
                if etype is SystemExit and _system_exit_status(evalue) == 0:
                    return
                agent.send_error(etype.__name__, str(evalue), list(stb))

            def system(self, cmd):
                status = agent.system(self.var_expand(cmd, depth=1))
                self.user_ns["_exit_code"] = status

            def ask_exit(self):
                print("exit() does nothing in the Sandbox kernel: use Kernel → Restart to start a fresh sandbox.")

        warnings.filterwarnings("ignore", message="To exit: use")
        import importlib.util

        # find_spec, not import: importing matplotlib_inline imports matplotlib, which reads
        # MPLBACKEND once, at import
        if importlib.util.find_spec("matplotlib_inline") is not None:
            os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
        self.shell = AgentShell.instance(
            display_pub_class=AgentDisplayPublisher,
            displayhook_class=AgentDisplayHook,
            colors="Neutral",
            autocall=0,
            autoindent=False,
            history_length=0,
            history_load_length=0,
        )
        self.shell.Completer.use_jedi = False  # jedi is slow to start and optional
        self.shell.history_manager.enabled = False
        self.shell.history_manager.end_session()
        # ``obj?`` and %page go to the notebook's pager, as in ipykernel
        self.shell.set_hook("show_in_pager", self._page)
        self.shell.register_magic_function(self._shell_cell, "cell", "bash")
        self.shell.register_magic_function(self._shell_cell, "cell", "sh")
        builtins.input = agent.input  # type: ignore[assignment]
        import getpass

        getpass.getpass = lambda prompt="Password: ", stream=None: agent.input(prompt, password=True)
        if "" not in sys.path:
            sys.path.insert(0, "")

    def _page(self, shell, data, start=0, screen_lines=0, pager_cmd=None):
        bundle = data if isinstance(data, dict) else {"text/plain": str(data)}
        self.agent.payload.append({"source": "page", "data": bundle, "start": start})

    def _shell_cell(self, line, cell):
        status = self.agent.system(cell)
        self.shell.user_ns["_exit_code"] = status

    def run(self, code: str, count: int, silent: bool, store_history: bool):
        shell = self.shell
        if count:
            shell.execution_count = count
        result = shell.run_cell(code, store_history=store_history, silent=silent)
        return result.error_before_exec or result.error_in_exec

    def user_expressions(self, exprs: dict) -> dict:
        return self.shell.user_expressions(exprs)

    def complete(self, code: str, cursor_pos: int | None) -> dict:
        pos = len(code) if cursor_pos is None else cursor_pos
        line, offset = _line_at_cursor(code, pos)
        text, matches = self.shell.complete("", line, pos - offset)
        return {"status": "ok", "matches": list(matches), "cursor_start": pos - len(text),
                "cursor_end": pos, "metadata": {}}

    def inspect(self, code: str, cursor_pos: int | None, detail_level: int) -> dict:
        from IPython.utils.tokenutil import token_at_cursor

        pos = len(code) if cursor_pos is None else cursor_pos
        name = token_at_cursor(code, pos)
        try:
            bundle = self.shell.object_inspect_mime(name, detail_level=detail_level)
            found = True
        except KeyError:
            bundle, found = {}, False
        return {"status": "ok", "found": found, "data": bundle, "metadata": {}}

    def is_complete(self, code: str) -> dict:
        status, indent = self.shell.input_transformer_manager.check_complete(code)
        reply = {"status": status}
        if status == "incomplete":
            reply["indent"] = " " * (indent or 0)
        return reply


def _line_at_cursor(code: str, pos: int) -> tuple[str, int]:
    offset = 0
    for line in code.splitlines(True):
        if offset + len(line) >= pos and not (line.endswith("\n") and offset + len(line) == pos):
            return line, offset
        offset += len(line)
    return "", offset
