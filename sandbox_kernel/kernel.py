"""SandboxKernel: Jupyter messages in, sandboxed execution out.

The kernel runs next to Jupyter and never executes user code itself: every cell goes
to the :class:`~sandbox_kernel.session.Session`, which forwards it to the agent in the
sandbox. What comes back is published on IOPub, followed by a one-line footer with the
cell's exit status, and the ``execute_reply`` carries ``metadata["sandbox"]``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import signal
import sys
import uuid

import zmq
from ipykernel.kernelbase import Kernel
from traitlets import Bool, Enum, Float, Instance, Integer, TraitError, Unicode, default

from . import __version__
from .backends.base import Backend
from .config import env_bool, env_default
from .errors import SandboxError
from .grants import Grants
from .learn import Learner
from .magics import SandboxMagics, split_cell
from .notices import NOTICE_MIME, NoticeBoard
from .policy.admin import AdminPolicy, agent_view
from .policy.model import EgressPolicy
from .session import CellResult, Session
from .untrusted import screen_bundle

FOOTER_MODES = ("always", "on-failure", "never")


def format_duration(ms: float) -> str:
    """``12 ms``, ``3.2 s``, ``2 min 5 s`` — the footer's duration."""
    if ms < 1000:
        return f"{ms:.0f} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest} s"


def format_bytes(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


def policy_label(policy) -> str:
    """How the footer names the policy in force: ``default-deny``, ``allowlist (3 entries)``."""
    if policy is None:
        return "default-deny"
    describe = getattr(policy, "describe", None)
    if callable(describe):
        return str(describe())
    return "default-deny"


def footer_line(exit_status: int, duration_ms: float, policy, blocked: int = 0) -> str:
    parts = [f"exit {exit_status}", format_duration(duration_ms), f"egress: {policy_label(policy)}"]
    if blocked:
        parts.append(f"{blocked} blocked")
    return " · ".join(parts)


class SandboxKernel(Kernel):
    """The "Sandbox" kernel (kernelspec name ``sandbox``)."""

    implementation = "sandbox_kernel"
    implementation_version = __version__
    banner = (
        f"Sandbox kernel {__version__}: Python cells run in an isolated sandbox "
        "with controlled network egress. Type %sandbox help for the controls."
    )
    language_info = {
        "name": "python",
        "version": sys.version.split()[0],
        "mimetype": "text/x-python",
        "file_extension": ".py",
        "pygments_lexer": "ipython3",
        "codemirror_mode": {"name": "ipython", "version": 3},
        "nbconvert_exporter": "python",
    }
    help_links = [{"text": "Sandbox kernel manual", "url": "https://github.com/sandbox-kernel/sandbox-kernel/tree/main/docs"}]

    backend_name = Unicode(
        help="Which backend runs the sandboxes: 'local' (this machine: netns + nftables + "
        "bubblewrap), 'kubernetes' (a pod per kernel), or 'hub' (ask the JupyterHub sandbox "
        "service, which holds the credentials and the ceiling). Env: SANDBOX_KERNEL_BACKEND.",
        config=True,
    )

    @default("backend_name")
    def _backend_default(self):
        return env_default("SANDBOX_KERNEL_BACKEND", "local")

    footer = Enum(
        FOOTER_MODES,
        help="When to show the one-line footer (exit status, duration, egress policy) after a "
        "cell: 'always', 'on-failure' or 'never'. The exit status is always in the reply "
        "metadata. Env: SANDBOX_KERNEL_FOOTER.",
        config=True,
    )

    @default("footer")
    def _footer_default(self):
        value = env_default("SANDBOX_KERNEL_FOOTER", "always")
        return value if value in FOOTER_MODES else "always"

    start_timeout = Float(
        120.0, help="Seconds a cell waits for its sandbox to start before giving up.", config=True
    )

    output_limit = Integer(
        help="Most bytes of output (streams and rich output) one cell may send to the notebook; "
        "the rest is dropped and a note says how much. Protects the browser and the kernel's "
        "memory. 0 for no limit. Env: SANDBOX_KERNEL_OUTPUT_LIMIT.",
        config=True,
    )

    @default("output_limit")
    def _output_limit_default(self):
        return int(env_default("SANDBOX_KERNEL_OUTPUT_LIMIT", 10 * 1024 * 1024))

    progress_delay = Float(
        help="Seconds a cell waits for its sandbox before the start-up progress lines are shown "
        "(0: always show them). Env: SANDBOX_KERNEL_PROGRESS_DELAY.",
        config=True,
    )

    @default("progress_delay")
    def _progress_delay_default(self):
        return float(env_default("SANDBOX_KERNEL_PROGRESS_DELAY", 1.5))

    trust_sandbox_output = Bool(
        help="Publish rich output from the sandbox as it is, scripts included. Off by default: "
        "HTML, Markdown and SVG are sanitised and MIME types that run code in the browser "
        "(application/javascript, widget views, unknown application/* types) are dropped, "
        "because a script in a cell's output acts in the user's Jupyter session with the "
        "user's rights (docs/security.md, 'Untrusted output'). Turn it on only when every "
        "piece of code the sandbox can run is trusted. Read once when the kernel starts; no "
        "magic, panel or notebook metadata can change it. The kernel's own notice MIME type "
        "is dropped from sandbox output either way. Env: SANDBOX_KERNEL_TRUST_SANDBOX_OUTPUT.",
        config=True,
    )

    @default("trust_sandbox_output")
    def _trust_sandbox_output_default(self):
        return env_bool("SANDBOX_KERNEL_TRUST_SANDBOX_OUTPUT", False)

    sandbox = Instance(Session, allow_none=True)
    sandbox_backend = Instance(Backend, allow_none=True)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.kernel_id = env_default("SANDBOX_KERNEL_ID", "") or uuid.uuid4().hex
        self.admin = AdminPolicy(parent=self)
        #: a bad administrator setting: every cell reports it and nothing runs
        self.config_error: Exception | None = None
        try:
            self.policy = self.admin.default_policy()
            self.admin.locked, self.admin.user_may_allow, self.admin.blocked_networks()  # noqa: B018
        except (TraitError, SandboxError, ValueError) as err:
            self.config_error = err
            self.admin = AdminPolicy(parent=None, locked=True, always_blocked=[], cluster_ranges=[],
                                     entries=[], presets=[], mode="deny", user_may_allow=[], max_entries=0)
            self.policy = EgressPolicy()
        self.sandbox_backend = self._make_backend()
        self.sandbox_backend.always_blocked = [str(n) for n in self.admin.blocked_networks()]
        self.policy_applied_at: float | None = None
        self._policy_lock = asyncio.Lock()
        self._progress_lines: list[str] = []
        self._progress_live = False
        self._progress_parent: dict = {}
        self.sandbox = Session(self.sandbox_backend, self.kernel_id, self.policy, self.log,
                               progress=self._on_progress, start_timeout=self.start_timeout,
                               agent_view=self.agent_policy_view, on_blocked=self._blocked_between_cells)
        if self.backend_name == "hub" and self.config_error is None:
            self._adopt_service_ceiling()
        self._cell_state: dict | None = None
        self._last_sandbox_meta: dict = {}
        self.recent_blocked: collections.deque = collections.deque(maxlen=200)
        self.magics = SandboxMagics(self)
        self.grants = Grants(self)
        self.learner = Learner(self)
        self._init_comms()
        self._cells = itertools.count(1)

    def _adopt_service_ceiling(self) -> None:
        """Hub mode: the service's ceiling for this user is the one that counts (it enforces it
        server side); the kernel shows it and follows policies the service forces."""
        try:
            self.admin = AdminPolicy(parent=None, **self.sandbox_backend.fetch_ceiling())
            self.policy = self.admin.default_policy()
            self.sandbox.policy = self.policy
        except SandboxError as err:
            self.log.warning("could not read the ceiling from the sandbox service: %s", err)

        def forced(policy, reason) -> None:
            self.policy = policy
            self.sandbox.policy = policy
            panels = sys.modules.get("sandbox_kernel.widgets")
            if panels is not None:
                panels.refresh_all(self)

        self.sandbox_backend.on_policy_forced = forced

    # -- the policy: one source of truth, changed only here ----------------------------
    async def set_policy(self, new, who: str = "user") -> dict:
        """Check ``new`` against the administrator's ceiling, enforce it, make it current.

        Called by the ``%sandbox`` magics and the policy panel (and tests). Atomic: on any
        error (ceiling refused, bad rules, enforcer failure) the old policy stays in force
        and is still ``self.policy``; the error propagates, typed.
        """
        async with self._policy_lock:
            old = self.policy
            if not self.sandbox_backend.enforces_ceiling:
                self.admin.check_change(old, new, who=who)
            # else (hub mode) the sandbox service decides, and audits the refusal with its reason
            await self.sandbox.ready()
            details = await self.sandbox.apply_policy(new)
            self.policy = new
            self.policy_applied_at = details.get("applied_at")
            self.grants.policy_changed(new)
        panels = sys.modules.get("sandbox_kernel.widgets")
        if panels is not None:
            panels.refresh_all(self)
        return details

    # -- construction ---------------------------------------------------------------
    def _init_comms(self) -> None:
        """Comms for ipywidgets (the policy panel): ipykernel's comm implementation, with
        this kernel as the one that publishes."""
        import comm
        import ipykernel.ipkernel  # noqa: F401 - sets comm.create_comm / get_comm_manager

        self.comm_manager = comm.get_comm_manager()
        for msg_type in ("comm_open", "comm_msg", "comm_close"):
            self.shell_handlers[msg_type] = getattr(self.comm_manager, msg_type)

    def agent_policy_view(self, policy) -> dict:
        """What the agent's guard needs to know about ``policy`` (plain JSON)."""
        view = agent_view(policy, self.admin, self.sandbox_backend.applied)
        return self.learner.agent_view(view) if hasattr(self, "learner") else view

    def _make_backend(self) -> Backend:
        if self.backend_name == "local":
            from .backends.local import LocalBackend, gc

            backend = LocalBackend(parent=self)
            try:
                # the configured state directory: the owner records of live kernels are there
                for line in gc(backend.state_dir):
                    self.log.info("removed leftover %s", line)
            except OSError as err:  # cleaning others' leftovers must not stop this kernel
                self.log.warning("could not clean leftover sandboxes: %s", err)
            return backend
        if self.backend_name == "kubernetes":
            from .backends.kubernetes import KubernetesBackend

            return KubernetesBackend(parent=self)
        if self.backend_name == "hub":
            from .hub.backend import HubBackend

            return HubBackend(parent=self)
        raise SandboxError(
            f"unknown backend {self.backend_name!r}: use 'local', 'kubernetes' or 'hub' "
            "(c.SandboxKernel.backend_name or SANDBOX_KERNEL_BACKEND)"
        )

    def start(self):
        super().start()
        self.io_loop.add_callback(self._start_sandbox)
        # "signal" interrupt mode, or a SIGINT sent by hand: forward it to the sandbox
        signal.signal(signal.SIGINT, lambda *_: self.io_loop.add_callback_from_signal(self._interrupt))

    async def _start_sandbox(self):
        try:
            await self.sandbox.start_soon()
        except Exception as err:  # noqa: BLE001 - reported to the first cell instead
            self.log.warning("the sandbox did not start: %s", err)

    async def _interrupt(self):
        await self.sandbox.interrupt()

    def _on_progress(self, line: str) -> None:
        """Called by the backend (through the Session) for each start-up step."""
        self.log.info("sandbox: %s", line)
        self._progress_lines.append(line)
        if self._progress_live:
            self._publish_progress(line)

    def _publish_progress(self, line: str) -> None:
        # the start task runs outside any request, so name the waiting cell as parent
        self.session.send(self.iopub_socket, "stream", {"name": "stdout", "text": f"[sandbox] {line}\n"},
                          parent=self._progress_parent, ident=self._topic("stream"))

    # -- publishing -------------------------------------------------------------------
    def _stream(self, name: str, text: str) -> None:
        self.send_response(self.iopub_socket, "stream", {"name": name, "text": text})

    def show_in_running_cell(self, line: str) -> bool:
        """Write ``line`` to the stderr of the cell running now (from a timer, outside any
        request); False when no cell runs."""
        state = self._cell_state
        if state is None or state.get("silent") or not state.get("parent"):
            return False
        self.session.send(self.iopub_socket, "stream", {"name": "stderr", "text": line.rstrip("\n") + "\n"},
                          parent=state["parent"], ident=self._topic("stream"))
        return True

    def on_event(self, frame: dict) -> None:
        """Called by the Session for every event of the running cell."""
        state = self._cell_state
        kind = frame.get("type")
        if state is not None and state.get("error") is not None and kind != "error":
            self._publish_error(state.pop("error"))
            state["error"] = None
        if kind in ("stream", "display", "execute_result") and state is not None and not self._within_limit(state, frame):
            return
        if kind == "stream":
            name = frame.get("name") if frame.get("name") in ("stdout", "stderr") else "stdout"
            text = frame.get("text")
            if isinstance(text, str) and text:
                self._stream(name, text)
        elif kind == "display":
            msg_type = "update_display_data" if frame.get("update") else "display_data"
            data, metadata = self.screen(frame.get("data"), frame.get("metadata"))
            self.send_response(self.iopub_socket, msg_type, {
                "data": data, "metadata": metadata, "transient": _dict(frame.get("transient")),
            })
        elif kind == "execute_result":
            if state is not None and state.get("silent"):
                return
            data, metadata = self.screen(frame.get("data"), frame.get("metadata"))
            self.send_response(self.iopub_socket, "execute_result", {
                "data": data, "metadata": metadata, "execution_count": self.execution_count,
            })
        elif kind == "clear_output":
            self.send_response(self.iopub_socket, "clear_output", {"wait": bool(frame.get("wait"))})
        elif kind == "error":
            content = {
                "ename": str(frame.get("ename", "Error")),
                "evalue": str(frame.get("evalue", "")),
                "traceback": [str(line) for line in frame.get("traceback") or []],
            }
            if state is not None:
                # held until the cell ends so the footer can be its last line
                state["error"] = content
            else:
                self._publish_error(content)
        elif kind == "blocked":
            self._on_blocked(frame.get("record"), frame.get("source") or "guard")
        elif kind == "reached":
            self.learner.observe_reported(frame.get("record"))
        elif kind == "protocol_error":
            self._stream("stderr", f"[sandbox] protocol error from the sandbox, ignored: {frame.get('message')}\n")

    def screen(self, data, metadata=None, *, note: bool = True) -> tuple[dict, dict]:
        """A MIME bundle from the sandbox as it may be published (sanitised, code-running types
        dropped: sandbox_kernel.untrusted); what was removed is said once per cell on stderr.
        Called for every bundle that comes from the sandbox, never for the kernel's own."""
        screened = screen_bundle(data, metadata, trusted=self.trust_sandbox_output)
        line = screened.note() if note else None
        if line:
            state = self._cell_state
            said = state.setdefault("screen_notes", set()) if state is not None else set()
            if line not in said and not (state or {}).get("silent"):
                said.add(line)
                self._stream("stderr", line)
        return screened.data, screened.metadata

    def _screen_reply(self, content: dict) -> dict:
        """Inspection replies and pager payloads carry bundles from the sandbox too."""
        if isinstance(content.get("data"), dict):
            content["data"], content["metadata"] = self.screen(content["data"], content.get("metadata"), note=False)
        return content

    def _within_limit(self, state: dict, frame: dict) -> bool:
        """Count a cell's output; past ``output_limit`` drop it (the count goes on)."""
        if not self.output_limit:
            return True
        if frame["type"] == "stream":
            size = len(frame.get("text") or "")
        else:
            size = sum(len(v) if isinstance(v, str) else len(str(v)) for v in _dict(frame.get("data")).values())
        sent = state.get("out_bytes", 0)
        state["out_bytes"] = sent + size
        if sent + size <= self.output_limit:
            return True
        if not state.get("truncated"):
            state["truncated"] = True
            self._stream("stderr", f"[sandbox] output limit of {format_bytes(self.output_limit)} reached: "
                                   "further output of this cell is not shown (the cell keeps running)\n")
        state["dropped"] = state.get("dropped", 0) + size
        return False

    def _on_blocked(self, record, source: str) -> None:
        state = self._cell_state
        if state is None or state.get("board") is None:
            self._blocked_between_cells(record, source)
            return
        self.learner.observe(record, source)
        merged = state["board"].add(record, source)
        if merged is None:
            return
        conn, new = merged
        if new:
            self.recent_blocked.append(conn)
            panels = sys.modules.get("sandbox_kernel.widgets")
            if panels is not None:
                panels.blocked_everywhere(self, conn)
        if not state.get("silent"):
            self._publish_notice(conn, new)

    def _publish_notice(self, conn, new: bool) -> None:
        bundle = conn.bundle()
        conn.published = bundle[NOTICE_MIME]
        self.send_response(self.iopub_socket, "display_data" if new else "update_display_data", {
            "data": bundle, "metadata": {}, "transient": {"display_id": conn.display_id},
        })

    def _blocked_between_cells(self, record, source: str) -> None:
        """A background process was blocked while no cell ran: keep it for %sandbox blocked."""
        self.learner.observe(record, source)
        board = NoticeBoard(self.policy, self.admin, "idle")
        merged = board.add(record, source)
        if merged is not None:
            self.recent_blocked.append(merged[0])

    def _publish_error(self, content: dict) -> None:
        self.send_response(self.iopub_socket, "error", content)

    async def on_input_request(self, prompt: str, password: bool) -> str | None:
        """Ask the frontend for a line on the stdin channel without blocking the event loop."""
        state = self._cell_state or {}
        if not state.get("allow_stdin"):
            return "\x04"
        sys.stdout.flush()
        while True:
            try:
                self.stdin_socket.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                break
        ident = self._get_shell_context_var(self._shell_parent_ident)
        parent = self.get_parent("shell")
        self.session.send(self.stdin_socket, "input_request",
                          {"prompt": prompt, "password": password}, parent, ident=ident)
        while True:
            try:
                _, reply = self.session.recv(self.stdin_socket, mode=zmq.NOBLOCK)
            except Exception:  # noqa: BLE001 - a bad message on stdin: keep waiting
                self.log.warning("invalid message on the stdin channel", exc_info=True)
                reply = None
            if reply is not None:
                try:
                    return str(reply["content"]["value"])
                except (KeyError, TypeError):
                    return ""
            await asyncio.sleep(0.01)

    # -- Jupyter handlers -----------------------------------------------------------
    async def do_execute(self, code, silent, store_history=True, user_expressions=None,
                         allow_stdin=False, *, cell_meta=None, cell_id=None):
        self._cell_state = {"error": None, "silent": silent, "allow_stdin": allow_stdin,
                            "board": NoticeBoard(self.policy, self.admin, f"{os.getpid()}-{next(self._cells)}"),
                            "parent": self.get_parent("shell")}
        if not silent:
            for line in self.grants.take_pending():  # said while no cell ran (a grant expired)
                self._stream("stderr", line + "\n")
        try:
            return await self._execute(code, silent, store_history, user_expressions, allow_stdin)
        finally:
            self._cell_state = None

    async def _execute(self, code, silent, store_history, user_expressions, allow_stdin):
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = CellResult(status="ok", exit_status=0, duration_ms=0.0)
        if self.config_error is not None:
            message = (f"the administrator's policy settings are invalid, so no code runs: {self.config_error} "
                       "(fix c.AdminPolicy / SANDBOX_KERNEL_POLICY_* and restart the kernel)")
            self._cell_state["error"] = {"ename": "ConfigurationError", "evalue": message,
                                         "traceback": [f"ConfigurationError: {message}"]}
            return self._finish(CellResult(status="error", exit_status=126, duration_ms=0.0), silent)
        for kind, part in split_cell(code) or [("code", code)]:
            if kind == "magic":
                result = await self._run_magic(part, silent)
            else:
                result = await self._run_code(part, silent, store_history, user_expressions, allow_stdin)
            if result.exit_status != 0 or self._cell_state.get("error") is not None:
                break
        result.duration_ms = (loop.time() - started) * 1000
        return self._finish(result, silent)

    async def _run_magic(self, line: str, silent: bool) -> CellResult:
        try:
            out = await self.magics.run(line)
        except Exception as err:  # noqa: BLE001 - a magic must answer, never leave the cell hanging
            if not isinstance(err, (SandboxError, ValueError)):
                self.log.error("%%sandbox failed", exc_info=True)
            ename = getattr(err, "ename", type(err).__name__)
            self._cell_state["error"] = {"ename": ename, "evalue": str(err), "traceback": [f"{ename}: {err}"]}
            return CellResult(status="error", exit_status=1, duration_ms=0.0)
        if not silent:
            if out.text and out.html is None:
                self._stream("stdout", out.text.rstrip("\n") + "\n")
            elif out.text:
                self.send_response(self.iopub_socket, "display_data", {
                    "data": {"text/plain": out.text, "text/html": out.html}, "metadata": {}, "transient": {}})
            for bundle in out.displays:
                self.send_response(self.iopub_socket, "display_data", {"data": bundle, "metadata": {}, "transient": {}})
        return CellResult(status="ok", exit_status=0, duration_ms=0.0, payload=out.payload)

    async def _run_code(self, code, silent, store_history, user_expressions, allow_stdin) -> CellResult:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            await self._wait_for_sandbox()
            if self.sandbox.lost and not silent:
                self._stream("stderr", f"[sandbox] the previous sandbox ended ({self.sandbox.lost}): this cell "
                                       "runs in a fresh one, so variables and imports were reset\n")
            self.sandbox.lost = None
            return await self.sandbox.execute(
                code, self, silent=silent, store_history=store_history,
                user_expressions=user_expressions or {}, allow_stdin=allow_stdin,
                execution_count=self.execution_count,
            )
        except SandboxError as err:
            self._cell_state["error"] = {
                "ename": err.ename, "evalue": str(err),
                "traceback": [f"{err.ename}: {err}"],
            }
            return CellResult(status="error", exit_status=126,
                              duration_ms=(loop.time() - started) * 1000)

    async def _wait_for_sandbox(self):
        task = asyncio.ensure_future(self.sandbox.ready())
        # a running sandbox answers at once; only a real wait shows progress
        done, _ = await asyncio.wait({task}, timeout=max(self.progress_delay, 0.01))
        if not done:
            self._progress_parent = self.get_parent("shell")
            self._progress_live = True
            for line in self._progress_lines or ["Starting the sandbox…"]:
                self._publish_progress(line)
        try:
            await task
        finally:
            self._progress_live = False
            self._progress_lines = []

    def _finish(self, result: CellResult, silent: bool) -> dict:
        state = self._cell_state
        error = state.get("error")
        if result.crashed:
            error = {
                "ename": "SandboxCrashed",
                "evalue": result.crashed,
                "traceback": [
                    f"SandboxCrashed: {result.crashed}.",
                    "Variables and imports of this sandbox are lost; the next cell runs in a fresh sandbox.",
                ],
            }
        elif result.exit_status != 0 and error is None:
            error = {
                "ename": "NonZeroExitStatus",
                "evalue": f"exit status {result.exit_status}",
                "traceback": [f"The cell's last command exited with status {result.exit_status}."],
            }
        board = state["board"]
        if state.get("dropped") and not silent:
            self._stream("stderr", f"[sandbox] {format_bytes(state['dropped'])} of output were dropped "
                                   f"(limit {format_bytes(self.output_limit)}: c.SandboxKernel.output_limit)\n")
        if not silent:
            for conn in board.connections():  # e.g. last_seen of a retransmitted SYN
                if conn.to_json() != conn.published:
                    self._publish_notice(conn, new=False)
        self._last_sandbox_meta = {
            "exit_status": result.exit_status,
            "duration_ms": round(result.duration_ms, 3),
            "blocked": board.records(),
        }
        footer = None
        if self.footer == "always" or (self.footer == "on-failure" and result.exit_status != 0):
            footer = footer_line(result.exit_status, result.duration_ms, self.policy, len(board))
        if error is not None:
            if footer and not silent:
                error["traceback"] = [*error["traceback"], footer]
            if not silent:
                self._publish_error(error)
            return {"status": "error", "execution_count": self.execution_count, **error}
        if footer and not silent:
            self._stream("stdout", footer + "\n")
        return {"status": "ok", "execution_count": self.execution_count,
                "payload": [self._screen_reply(dict(page)) for page in result.payload],
                "user_expressions": {name: self._screen_reply(dict(value)) if isinstance(value, dict) else value
                                     for name, value in _dict(result.user_expressions).items()}}

    def finish_metadata(self, parent, metadata, reply_content):
        metadata = super().finish_metadata(parent, metadata, reply_content)
        if parent.get("header", {}).get("msg_type") == "execute_request":
            metadata["sandbox"] = dict(self._last_sandbox_meta)
        return metadata

    async def do_complete(self, code, cursor_pos):
        content = await self._ask({"type": "complete", "code": code, "cursor_pos": cursor_pos})
        if content is None:
            pos = len(code) if cursor_pos is None else cursor_pos
            return {"status": "ok", "matches": [], "cursor_start": pos, "cursor_end": pos, "metadata": {}}
        return content

    async def do_inspect(self, code, cursor_pos, detail_level=0, omit_sections=()):
        content = await self._ask({"type": "inspect", "code": code, "cursor_pos": cursor_pos,
                                   "detail_level": detail_level})
        if content is None:
            return {"status": "ok", "found": False, "data": {}, "metadata": {}}
        return self._screen_reply(content)

    async def do_is_complete(self, code):
        content = await self._ask({"type": "is_complete", "code": code})
        return content or {"status": "unknown"}

    async def _ask(self, frame: dict) -> dict | None:
        try:
            return await self.sandbox.request(frame)
        except (SandboxError, asyncio.TimeoutError, ConnectionError) as err:
            self.log.warning("%s request failed: %s", frame["type"], err)
            return None

    async def interrupt_request(self, stream, ident, parent):
        """Control channel (its own thread): forward the interrupt to the sandbox."""
        self.io_loop.add_callback(self._interrupt)
        self.session.send(stream, "interrupt_reply", {"status": "ok"}, parent, ident=ident)

    async def do_shutdown(self, restart):
        """Control channel (its own thread and loop): stop the sandbox on the main loop."""
        future = asyncio.run_coroutine_threadsafe(self.sandbox.stop(), self.io_loop.asyncio_loop)
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), 30)
        except Exception as err:  # noqa: BLE001 - shutting down regardless; gc removes leftovers
            self.log.warning("stopping the sandbox failed: %s", err)
        return {"status": "ok", "restart": restart}


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}
