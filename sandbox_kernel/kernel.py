"""SandboxKernel: Jupyter messages in, sandboxed execution out.

The kernel runs next to Jupyter and never executes user code itself: every cell goes
to the :class:`~sandbox_kernel.session.Session`, which forwards it to the agent in the
sandbox. What comes back is published on IOPub, followed by a one-line footer with the
cell's exit status (footer.py), and the ``execute_reply`` carries ``metadata["sandbox"]``.

The policy in force, the ceiling and what the ``%sandbox`` magics and the panels act on live in
:class:`~sandbox_kernel.controls.Controls` (``self.controls``); the kernel builds them, tells
them when a cell starts and ends and what was blocked, and never hears from the UI directly.
The running cell's output state is a :class:`~sandbox_kernel.cellstate.CellState`.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid

import zmq
from ipykernel.kernelbase import Kernel
from traitlets import Bool, Enum, Float, Instance, Integer, TraitError, Unicode, default

from . import __version__
from .backends.base import Backend
from .cellstate import CellState
from .config import env_bool, env_default
from .controls import Controls
from .errors import SandboxError
from .footer import FOOTER_MODES, footer_for, format_bytes
from .history import CellHistory
from .magics import SandboxMagics, split_cell
from .notices import DISPLAY_ID_PREFIX, NOTICE_MIME, NoticeBoard
from .policy.admin import AdminPolicy
from .policy.model import EgressPolicy
from .session import CellResult, Session
from .untrusted import screen_bundle


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

    interrupt_timeout = Float(
        help="Seconds a cell has to end after an interrupt; a sandbox that does not answer in "
        "time (wedged, or code that ignores interrupts) is killed and the cell says so. 0: wait "
        "forever. Env: SANDBOX_KERNEL_INTERRUPT_TIMEOUT.",
        config=True,
    )

    @default("interrupt_timeout")
    def _interrupt_timeout_default(self):
        return float(env_default("SANDBOX_KERNEL_INTERRUPT_TIMEOUT", 5.0))

    notice_limit = Integer(
        help="Most blocked-connection notices one cell shows of each kind (verified by the kernel, "
        "reported by the sandbox); further destinations are counted in one line. Env: "
        "SANDBOX_KERNEL_NOTICE_LIMIT.",
        config=True,
    )

    @default("notice_limit")
    def _notice_limit_default(self):
        return max(1, int(env_default("SANDBOX_KERNEL_NOTICE_LIMIT", 20)))

    notice_bytes_limit = Integer(
        256 * 1024,
        help="Most bytes of notice updates one cell sends while it runs (counts going up, notices "
        "shown again after a clear_output); past it, the notices are brought up to date once, "
        "when the cell ends.",
        config=True,
    )

    #: seconds between two updates of the same cell's notices (counts, re-shows)
    notice_update_interval = 0.25

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
        admin = AdminPolicy(parent=self)
        #: a bad administrator setting: every cell reports it and nothing runs
        self.config_error: Exception | None = None
        try:
            policy = admin.default_policy()
            admin.locked, admin.user_may_allow, admin.blocked_networks()  # noqa: B018
        except (TraitError, SandboxError, ValueError) as err:
            self.config_error = err
            admin = AdminPolicy(parent=None, locked=True, always_blocked=[], cluster_ranges=[],
                                entries=[], presets=[], mode="deny", user_may_allow=[], max_entries=0)
            policy = EgressPolicy()
        self.sandbox_backend = self._make_backend()
        admin.reserved = dict(self.sandbox_backend.reserved_ranges)
        self.sandbox_backend.always_blocked = [str(n) for n in admin.blocked_networks()]
        self.sandbox_backend.address_screen = admin.address_screen()
        #: the policy in force, the ceiling, status, blocked history: what the magics and panels use
        self.controls = Controls(admin, policy, self.sandbox_backend, log=self.log, say=self.show_in_running_cell)
        self._progress_lines: list[str] = []
        self._progress_live = False
        self._progress_parent: dict = {}
        self.sandbox = Session(self.sandbox_backend, self.kernel_id, policy, self.log,
                               progress=self._on_progress, start_timeout=self.start_timeout,
                               agent_view=self.controls.agent_view, on_blocked=self._blocked_between_cells,
                               interrupt_timeout=self.interrupt_timeout)
        self.controls.bind(self.sandbox)
        if self.backend_name == "hub" and self.config_error is None:
            self.controls.adopt_service_ceiling()
        self._cell: CellState | None = None
        self._idle_board: NoticeBoard | None = None  # what was blocked since the last cell began
        self._last_sandbox_meta: dict = {}
        self.magics = SandboxMagics(self.controls)
        self._init_comms()
        #: the cells' input history (history_request); outlives sandbox restarts
        self.history = CellHistory()

    # -- construction ---------------------------------------------------------------
    def _init_comms(self) -> None:
        """Comms for ipywidgets (the policy panel): ipykernel's comm implementation, with
        this kernel as the one that publishes."""
        import comm
        import ipykernel.ipkernel  # noqa: F401 - sets comm.create_comm / get_comm_manager

        self.comm_manager = comm.get_comm_manager()
        for msg_type in ("comm_open", "comm_msg", "comm_close"):
            self.shell_handlers[msg_type] = getattr(self.comm_manager, msg_type)

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
        state = self._cell
        if state is None or state.silent or not state.parent:
            return False
        self.session.send(self.iopub_socket, "stream", {"name": "stderr", "text": line.rstrip("\n") + "\n"},
                          parent=state.parent, ident=self._topic("stream"))
        return True

    def on_event(self, frame: dict) -> None:
        """Called by the Session for every event of the running cell."""
        state = self._cell
        kind = frame.get("type")
        if state is not None and state.error is not None and kind != "error" and not frame.get("late"):
            self._publish_error(state.take_error())
        if kind in ("stream", "display", "execute_result") and state is not None and not self._within_limit(state, frame):
            return
        if kind == "stream":
            name = frame.get("name") if frame.get("name") in ("stdout", "stderr") else "stdout"
            text = frame.get("text")
            if isinstance(text, str) and text:
                self._stream(name, text)
        elif kind == "display":
            msg_type = "update_display_data" if frame.get("update") else "display_data"
            display_id = _dict(frame.get("transient")).get("display_id")
            if isinstance(display_id, str) and display_id.startswith(DISPLAY_ID_PREFIX):
                # the notices' ids are the kernel's: the sandbox may neither overwrite nor reuse one
                self._stream("stderr", "[sandbox] output from the sandbox that used a notice's display id "
                                       "was not shown\n")
                return
            data, metadata = self.screen(frame.get("data"), frame.get("metadata"))
            self.send_response(self.iopub_socket, msg_type, {
                "data": data, "metadata": metadata, "transient": _dict(frame.get("transient")),
            })
        elif kind == "execute_result":
            if state is not None and state.silent:
                return
            data, metadata = self.screen(frame.get("data"), frame.get("metadata"))
            if state is not None:
                text = data.get("text/plain")
                state.result_text = text if isinstance(text, str) else None
            self.send_response(self.iopub_socket, "execute_result", {
                "data": data, "metadata": metadata, "execution_count": self.execution_count,
            })
        elif kind == "clear_output":
            if frame.get("late"):
                return  # an earlier cell's: it may not clear this one
            self.send_response(self.iopub_socket, "clear_output", {"wait": bool(frame.get("wait"))})
            if state is not None and state.board.total():
                # the sandbox may clear its own output, not the kernel's notices: show them again
                state.cleared = True
                self._schedule_notice_flush(state)
        elif kind == "error":
            content = {
                "ename": str(frame.get("ename", "Error")),
                "evalue": str(frame.get("evalue", "")),
                "traceback": [str(line) for line in frame.get("traceback") or []],
            }
            if state is not None and not frame.get("late"):
                # held until the cell ends so the footer can be its last line
                state.error = content
            else:
                self._publish_error(content)
        elif kind == "blocked":
            self._on_blocked(frame.get("record"), frame.get("source") or "guard", late=bool(frame.get("late")))
        elif kind == "reached":
            self.controls.learner.observe_reported(frame.get("record"))
        elif kind == "forged_done":
            if state is not None:
                state.forged_done += 1
                if state.forged_done == 1:
                    self._stream("stderr", "[sandbox] code in the sandbox sent a false end-of-cell frame: ignored, "
                                           "this cell's result is the agent's own\n")
        elif kind == "late":
            if frame.get("reason") == "between_cells":
                dropped = frame.get("dropped") or 0
                more = f" ({dropped} more frames were not kept)" if dropped else ""
                self._stream("stderr", f"[sandbox] while no cell ran, the sandbox reported what follows{more}\n")
            else:
                self._stream("stderr", "[sandbox] what follows comes from an earlier cell that went on after "
                                       "it had reported its end\n")
        elif kind == "late_done":
            if frame.get("real"):
                if state is not None:
                    state.late_end = True
                self._stream("stderr", "[sandbox] an earlier cell really ended only now: code in the sandbox had "
                                       "sent its end-of-cell early, so its reply (status, exit code, blocked list) "
                                       "was not its real result\n")
            else:
                self._stream("stderr", "[sandbox] a false end-of-cell frame for an earlier cell was ignored\n")

    def screen(self, data, metadata=None, *, note: bool = True) -> tuple[dict, dict]:
        """A MIME bundle from the sandbox as it may be published (sanitised, code-running types
        dropped: sandbox_kernel.untrusted); what was removed is said once per cell on stderr.
        Called for every bundle that comes from the sandbox, never for the kernel's own."""
        screened = screen_bundle(data, metadata, trusted=self.trust_sandbox_output)
        line = screened.note() if note else None
        if line:
            state = self._cell
            said = state.screen_notes if state is not None else set()
            if line not in said and not (state is not None and state.silent):
                said.add(line)
                self._stream("stderr", line)
        return screened.data, screened.metadata

    def _screen_reply(self, content: dict) -> dict:
        """Inspection replies and pager payloads carry bundles from the sandbox too."""
        if isinstance(content.get("data"), dict):
            content["data"], content["metadata"] = self.screen(content["data"], content.get("metadata"), note=False)
        return content

    def _within_limit(self, state: CellState, frame: dict) -> bool:
        """Count a cell's output; past ``output_limit`` drop it (the count goes on)."""
        if not self.output_limit:
            return True
        if frame["type"] == "stream":
            size = len(frame.get("text") or "")
        else:
            size = sum(len(v) if isinstance(v, str) else len(str(v)) for v in _dict(frame.get("data")).values())
        sent = state.out_bytes
        state.out_bytes = sent + size
        if sent + size <= self.output_limit:
            return True
        if not state.truncated:
            state.truncated = True
            self._stream("stderr", f"[sandbox] output limit of {format_bytes(self.output_limit)} reached: "
                                   "further output of this cell is not shown (the cell keeps running)\n")
        state.dropped += size
        return False

    def _on_blocked(self, record, source: str, late: bool = False) -> None:
        state = self._cell
        if state is None:
            self._blocked_between_cells(record, source)
            return
        if not late:  # a late record was learned when it came, between cells
            self.controls.learner.observe(record, source)
        board = state.board
        merged = board.add(record, source)
        if merged is None:
            if board.more_changed and not state.silent:
                self._schedule_notice_flush(state)
            return
        conn, new = merged
        if new:
            if not late:  # a late one was kept for %sandbox blocked when it arrived
                self.controls.remember_blocked(conn)
            self.controls.show_blocked(conn)
        if state.silent:
            return
        if new and conn.verified:
            self._publish_notice(conn, new=True)
        elif new:
            # reported by the sandbox: shown with the next update, so that the enforcer's record
            # of the guard's witness packet usually arrives first and it is shown verified
            state.unshown[conn.display_id] = conn
            self._schedule_notice_flush(state)
        elif conn.display_id in state.unshown:
            pass  # not shown yet: it will be, as it is then
        else:
            # counts going up: at most one update per interval (a flood is one line, not 20,000)
            state.dirty[conn.display_id] = conn
            self._schedule_notice_flush(state)

    def _schedule_notice_flush(self, state: CellState) -> None:
        if state.flush is None:
            loop = asyncio.get_running_loop()
            state.flush = loop.call_later(self.notice_update_interval, self._flush_notices, state)

    def _flush_notices(self, state: CellState, final: bool = False) -> None:
        """Bring the cell's notices up to date: counts, the "and N more" line, a re-show after
        the sandbox cleared the output. Called by a timer while the cell runs (within
        ``notice_bytes_limit``) and once when it ends (always)."""
        state.cancel_flush()  # from the timer: it has fired; at the end: no later update
        if self._cell is not state or state.silent:
            return
        board = state.board
        over = not final and state.notice_bytes > self.notice_bytes_limit
        if state.cleared and not over:
            state.cleared = False
            state.take_unshown()
            state.take_dirty()
            for conn in board.connections():
                self._publish_notice(conn, new=True)
            if board.more:
                self._publish_more(board, new=True)
                state.more_shown = True
            return
        for conn in state.take_unshown():  # new notices are few (notice_limit)
            self._publish_notice(conn, new=True)
        if over:
            return  # the rest waits for the cell's end
        for conn in state.take_dirty():
            if conn.to_json() != conn.published:
                self._publish_notice(conn, new=False)
        if board.more_changed:
            self._publish_more(board, new=not state.more_shown)
            state.more_shown = True

    def _publish_more(self, board: NoticeBoard, new: bool) -> None:
        board.more_changed = False
        self._publish_display(board.more_bundle(), board.more_display_id, new)

    def _publish_notice(self, conn, new: bool) -> None:
        bundle = conn.bundle()
        conn.published = bundle[NOTICE_MIME]
        self._publish_display(bundle, conn.display_id, new)

    def _publish_display(self, bundle: dict, display_id: str, new: bool) -> None:
        state = self._cell
        if state is not None:
            state.notice_bytes += sum(len(v) if isinstance(v, str) else 256 for v in bundle.values())
        self.send_response(self.iopub_socket, "display_data" if new else "update_display_data", {
            "data": bundle, "metadata": {}, "transient": {"display_id": display_id},
        })

    def _blocked_between_cells(self, record, source: str) -> None:
        """A background process was blocked while no cell ran: keep it for %sandbox blocked
        (the Session also keeps it for the next cell)."""
        self.controls.learner.observe(record, source)
        # one board from one cell to the next (capped like a cell's): a flood between cells
        # costs a count, not a notice per frame
        if self._idle_board is None:
            self._idle_board = self._new_board()
        merged = self._idle_board.add(record, source)
        if merged is not None and merged[1]:
            self.controls.remember_blocked(merged[0])

    def _new_board(self) -> NoticeBoard:
        return NoticeBoard(self.controls.policy, self.controls.admin, limit=self.notice_limit,
                           requests=self.sandbox_backend.takes_requests)

    def _publish_error(self, content: dict) -> None:
        self.send_response(self.iopub_socket, "error", content)

    async def on_input_request(self, prompt: str, password: bool) -> str | None:
        """Ask the frontend for a line on the stdin channel without blocking the event loop."""
        if self._cell is None or not self._cell.allow_stdin:
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
        self._idle_board = None
        state = self._cell = CellState(self._new_board(), silent=silent, allow_stdin=allow_stdin,
                                       parent=self.get_parent("shell"))
        self.controls.cell = self.execution_count
        if not silent:
            for line in self.controls.grants.take_pending():  # said while no cell ran (a grant expired)
                self._stream("stderr", line + "\n")
        try:
            return await self._execute(code, silent, store_history, user_expressions, allow_stdin)
        finally:
            if store_history and not silent:
                self.history.record(self.execution_count, code, state.result_text)
            state.cancel_flush()
            self._cell = None
            self.controls.cell = None

    async def _execute(self, code, silent, store_history, user_expressions, allow_stdin):
        loop = asyncio.get_running_loop()
        started = loop.time()
        result = CellResult(status="ok", exit_status=0, duration_ms=0.0)
        if self.config_error is not None:
            message = (f"the administrator's policy settings are invalid, so no code runs: {self.config_error} "
                       "(fix c.AdminPolicy / SANDBOX_KERNEL_POLICY_* and restart the kernel)")
            self._cell.error = {"ename": "ConfigurationError", "evalue": message,
                                "traceback": [f"ConfigurationError: {message}"]}
            return self._finish(CellResult(status="error", exit_status=126, duration_ms=0.0), silent)
        for kind, part in split_cell(code) or [("code", code)]:
            if kind == "magic":
                result = await self._run_magic(part, silent)
            else:
                result = await self._run_code(part, silent, store_history, user_expressions, allow_stdin)
            if result.exit_status != 0 or self._cell.error is not None:
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
            self._cell.error = {"ename": ename, "evalue": str(err), "traceback": [f"{ename}: {err}"]}
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
            self._cell.error = {"ename": err.ename, "evalue": str(err), "traceback": [f"{err.ename}: {err}"]}
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
        state = self._cell
        error = state.error
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
        board = state.board
        if state.dropped and not silent:
            self._stream("stderr", f"[sandbox] {format_bytes(state.dropped)} of output were dropped "
                                   f"(limit {format_bytes(self.output_limit)}: c.SandboxKernel.output_limit)\n")
        if not silent:
            for conn in board.connections():  # e.g. last_seen of a retransmitted SYN
                state.dirty[conn.display_id] = conn
            self._flush_notices(state, final=True)
        self.controls.cell_ended()
        forged = result.forged_done or state.forged_done
        self._last_sandbox_meta = {
            "exit_status": result.exit_status,
            "duration_ms": round(result.duration_ms, 3),
            "blocked": board.records(),
            "blocked_more": board.more,
            # the sandbox wrote a done of its own for this cell (ignored: the result is the agent's)
            "forged_done": forged,
            # an earlier cell's real end arrived during this one (that cell's reply came too early)
            "late_end": state.late_end,
        }
        footer = footer_for(self.footer, result.exit_status, result.duration_ms, self.controls.policy, board.total())
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

    async def do_history(self, hist_access_type, output, raw, session=None, start=None, stop=None,
                         n=None, pattern=None, unique=False):
        """history_request, answered from this kernel's own record (see history.py): ``tail``,
        ``range`` and ``search`` as ipykernel answers them; raw and translated input are the same
        text here (the sandbox, not the kernel, translates ``!cmd`` and magics)."""
        bad = [name for name, value, ok in (
            ("n", n, n is None or _is_int(n)), ("start", start, start is None or _is_int(start)),
            ("stop", stop, stop is None or _is_int(stop)), ("session", session, session is None or _is_int(session)),
            ("pattern", pattern, pattern is None or isinstance(pattern, str))) if not ok]
        if bad:
            message = f"history_request: {', '.join(bad)} must be an integer (pattern: a string)"
            return {"status": "error", "ename": "ValueError", "evalue": message, "traceback": [message], "history": []}
        if hist_access_type == "tail":
            rows = self.history.tail(n, output=output)
        elif hist_access_type == "range":
            rows = self.history.range(session, start, stop, output=output)
        elif hist_access_type == "search":
            rows = self.history.search(pattern, n=n, unique=unique, output=output)
        else:
            rows = []
        return {"status": "ok", "history": rows}

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


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}
