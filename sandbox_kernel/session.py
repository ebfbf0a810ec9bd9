"""One kernel's sandbox: lifecycle, the execute stream, crash recovery.

The :class:`Session` sits between the kernel (Jupyter messages) and a backend
(sandboxes). It talks to the agent through an :class:`~sandbox_kernel.agentlink.AgentLink`
(greeting, the one reader, replies, the cell's nonce) and routes the agent's frames:
cell events to the running cell, what arrives between cells to the next cell.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .agent import protocol
from .agentlink import AgentLink
from .backends.base import Backend, SandboxInfo
from .errors import ProtocolError, SandboxError, SandboxStartError


class CellSink(Protocol):
    """Where a running cell's events go (implemented by the kernel)."""

    def on_event(self, frame: dict) -> None: ...

    async def on_input_request(self, prompt: str, password: bool) -> str | None: ...


@dataclass
class CellResult:
    """What the session knows about a finished cell."""

    status: str
    exit_status: int
    duration_ms: float
    execution_count: int | None = None
    user_expressions: dict = field(default_factory=dict)
    crashed: str | None = None  # plain-words reason when the sandbox died during the cell
    payload: list = field(default_factory=list)
    #: ``done`` frames for this cell that did not carry its nonce (written by other code in
    #: the sandbox): ignored as the cell's end, counted so that the reply can say so
    forged_done: int = 0


#: frames kept while no cell runs, shown by the next cell (the rest is counted)
LATE_FRAMES = 1000
LATE_BYTES = 1 << 20


_END = object()


class Session:
    """Runs cells in a sandbox created by ``backend``; replaces the sandbox after a crash."""

    def __init__(self, backend: Backend, kernel_id: str, policy: Any, log,
                 progress: Callable[[str], None] | None = None, start_timeout: float = 60.0,
                 agent_view: Callable[[Any], dict] | None = None,
                 on_blocked: Callable[[dict, str], None] | None = None,
                 interrupt_timeout: float = 5.0):
        self.backend = backend
        #: what the agent is told about the policy (for the guard and the notices)
        self.agent_view = agent_view or _policy_dict
        #: blocked connections reported while no cell runs (source: guard|watcher|enforcer)
        self.on_blocked = on_blocked or (lambda record, source: None)
        backend.blocked_sink = self._enforcer_blocked
        self.kernel_id = kernel_id
        self.policy = policy
        self.log = log
        self.start_timeout = start_timeout
        #: seconds a cell has to end after an interrupt before its sandbox is killed (0: never)
        self.interrupt_timeout = interrupt_timeout
        self._progress = progress or (lambda line: None)
        self._ids = itertools.count(1)
        self._link: AgentLink | None = None
        self._starting: asyncio.Task | None = None
        self._cell: asyncio.Queue | None = None
        self._fid: str | None = None  # id of the running cell
        self._answered = False  # the reader saw the running cell's real done
        self._ended: collections.deque = collections.deque(maxlen=32)  # ids of cells that ended
        #: what arrived while no cell ran (shown by the next cell), and how much was not kept
        self._late: list = []
        self._late_bytes = 0
        self._late_dropped = 0
        self._watchdog: asyncio.Task | None = None
        self._input_task: asyncio.Task | None = None
        self.hello: dict = {}
        self.info: SandboxInfo | None = None
        self.start_error: BaseException | None = None
        self.restarts = 0
        #: why the previous sandbox ended between cells (the kernel tells the next cell once)
        self.lost: str | None = None

    @property
    def broken(self) -> str | None:
        """Why the link to the sandbox is broken (a protocol error, an unanswered interrupt)."""
        return self._link.broken if self._link is not None else None

    # -- lifecycle ----------------------------------------------------------------
    def start_soon(self) -> asyncio.Task:
        """Begin starting the sandbox in the background (kernel start, after a crash)."""
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start())
        return self._starting

    async def ready(self) -> None:
        """Wait until the sandbox runs; raise the start error (typed) if it cannot."""
        if self._link is not None and self._link.alive:
            return
        if self._link is not None:
            # the sandbox ended between cells: clean it up, say why, then start a fresh one
            self.lost = self.broken or await self.backend.exit_reason()
            self.log.warning("sandbox ended between cells: %s", self.lost)
            await self._teardown()
            self.restarts += 1
        task = self.start_soon()
        await asyncio.shield(task)

    async def _start(self) -> None:
        self.start_error = None
        try:
            self.info = await self.backend.start(self.kernel_id, self.policy, self._progress)
            self._link = await AgentLink.attach(self.backend, timeout=self.start_timeout, log=self.log,
                                                on_frame=self._on_frame, on_end=self._link_ended)
            self.hello = self._link.hello
            await self._link.send({"type": "policy", "policy": self.agent_view(self.policy)})
        except asyncio.TimeoutError:
            self.start_error = SandboxStartError(
                f"the sandbox did not start within {self.start_timeout:.0f} s"
            )
            await self._teardown()
            raise self.start_error from None
        except BaseException as err:
            self.start_error = err
            await self._teardown()
            raise

    async def _teardown(self) -> None:
        link, self._link = self._link, None
        if link is not None:
            await link.close()
        await self.backend.stop()
        self.info = None

    async def stop(self) -> None:
        """Stop the sandbox and remove everything (kernel shutdown)."""
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            try:
                await self._starting
            except BaseException:  # noqa: BLE001 - we are stopping anyway
                pass
        await self._teardown()

    async def restart(self) -> None:
        """Replace the sandbox with a fresh one (``%sandbox restart``, after a crash)."""
        await self._teardown()
        self.restarts += 1
        await self.ready()

    # -- the agent's frames -----------------------------------------------------------
    def _on_frame(self, frame: dict) -> None:
        """Each checked frame from the agent (called by the link's reader, in order)."""
        kind = frame["type"]
        if kind in ("reply", "pong"):
            return  # nobody waits for it (any more)
        if kind == "done" and frame.get("id") == self._fid and self._link is not None and self._link.real_done(frame):
            self._answered = True
        self._to_cell(frame)

    def _link_ended(self, link: AgentLink) -> None:
        """The agent is gone (or the link broken): the running cell ends."""
        self._to_cell(_END)

    def _to_cell(self, frame) -> None:
        if self._cell is not None:
            self._cell.put_nowait(frame)
            return
        if frame is _END or not isinstance(frame, dict):
            return
        if frame.get("type") == "blocked":
            self.on_blocked(frame.get("record"), frame["source"])
        # kept for the next cell: output of code that outlived its cell, or that wrote a
        # false ``done`` (bounded: a flood between cells costs a count, not memory)
        self._keep_late(frame)

    def _enforcer_blocked(self, record: dict) -> None:
        """Called by the backend (event loop) for each packet its enforcer refused."""
        self._to_cell({"type": "blocked", "source": "enforcer", "record": record})

    # -- requests -----------------------------------------------------------------
    async def request(self, frame: dict, timeout: float = 10.0) -> dict:
        """Send a request that gets one ``reply`` (complete, inspect, is_complete)."""
        await self.ready()
        assert self._link is not None
        reply = await self._link.request(frame, timeout)
        content = reply.get("content")
        if not isinstance(content, dict):
            raise ProtocolError("the agent's reply has no content")
        return content

    async def interrupt(self) -> None:
        """Interrupt the running cell (and any pending input request). A cell that has not
        ended :attr:`interrupt_timeout` seconds later is ended by killing its sandbox (the
        agent may be wedged, or the code may ignore interrupts): never a hang."""
        if self._input_task is not None and not self._input_task.done():
            self._input_task.cancel()
        cell = self._cell
        if cell is not None and self.interrupt_timeout > 0 and (self._watchdog is None or self._watchdog.done()):
            self._watchdog = asyncio.ensure_future(self._escalate(cell))
        if self._link is not None and await self._link.send_quietly({"type": "interrupt"}):
            return  # one interrupt: a second would hit the cell's own clean-up
        await self.backend.interrupt()  # the in-band frame could not be sent

    async def _escalate(self, cell: asyncio.Queue) -> None:
        await asyncio.sleep(self.interrupt_timeout)
        if self._cell is not cell or self._answered:
            return
        self.log.warning("the sandbox did not answer an interrupt within %g s: stopping it", self.interrupt_timeout)
        if self._link is not None:
            self._link.abort(f"the sandbox did not answer an interrupt within {self.interrupt_timeout:g} s, "
                             "so it was stopped")

    async def apply_policy(self, policy: Any) -> dict:
        """Enforce a new policy (atomic in the backend), then tell the agent about it."""
        details = await self.backend.apply_policy(policy)
        self.policy = policy
        await self.tell_policy()
        return details

    async def tell_policy(self) -> None:
        """Send the agent its view of the policy in force again (learn mode changes what the
        guard reports), without touching the enforcer."""
        if self._link is not None:
            await self._link.send_quietly({"type": "policy", "policy": self.agent_view(self.policy)})

    async def execute(self, code: str, sink: CellSink, *, silent: bool = False,
                      store_history: bool = True, user_expressions: dict | None = None,
                      allow_stdin: bool = False, execution_count: int = 0) -> CellResult:
        """Run one cell; stream its events to ``sink``; return its result.

        A sandbox that dies during the cell gives a result with ``crashed`` set, and a
        fresh sandbox is started in the background for the next cell.
        """
        # refused before it becomes the current cell: a refused cell must not leave a queue
        # behind that swallows what arrives between cells
        if len(code.encode("utf-8", "surrogatepass")) > protocol.MAX_FRAME - 4096:
            raise ProtocolError(f"this cell is {len(code) / 2**20:.1f} MB of code; the most a cell may "
                                f"send to the sandbox is {protocol.MAX_FRAME // 2**20} MB: load big data from a file")
        started = time.perf_counter()
        await self.ready()
        link = self._link
        assert link is not None
        fid = f"c{next(self._ids)}"
        cell: asyncio.Queue = asyncio.Queue()
        late = self._take_late() if not silent else []
        self._cell, self._fid, self._answered = cell, fid, False
        forged = 0
        try:
            for frame in late:
                sink.on_event(frame)
            await link.execute(fid, code, silent=silent, store_history=store_history,
                               user_expressions=user_expressions or {}, allow_stdin=allow_stdin,
                               execution_count=execution_count)
            told_late = False
            while True:
                frame = await cell.get()
                if frame is _END:
                    result = await self._crashed(started)
                    result.forged_done = forged
                    return result
                kind = frame.get("type")
                if frame.get("id") in self._ended:
                    # an earlier cell, still running after its ``done`` (a false one that had the
                    # nonce, or code that outlived its cell): shown here, marked
                    if not told_late:
                        told_late = True
                        sink.on_event({"type": "late", "id": frame.get("id"), "reason": "after_done"})
                    if kind == "done":
                        sink.on_event({"type": "late_done", "id": frame.get("id"), "real": link.real_done(frame)})
                        continue
                    if kind != "input_request":
                        sink.on_event({**frame, "late": True})
                        continue
                elif kind == "done" and frame.get("id") == fid:
                    if not link.real_done(frame):
                        forged += 1  # not the agent's: the cell goes on until the real one
                        sink.on_event({"type": "forged_done"})
                        continue
                    self._ended.append(fid)
                    self.backend.drain_blocked()
                    while not cell.empty():  # what the enforcer logged before the cell ended
                        late_frame = cell.get_nowait()
                        if isinstance(late_frame, dict) and late_frame.get("type") == "blocked":
                            sink.on_event(late_frame)
                        elif late_frame is not _END and isinstance(late_frame, dict):
                            self._keep_late(late_frame)
                    return CellResult(
                        status="error" if frame.get("status") == "error" else "ok",
                        exit_status=_as_int(frame.get("exit_status"), 1),
                        duration_ms=_as_float(frame.get("duration_ms"),
                                              (time.perf_counter() - started) * 1000),
                        execution_count=_as_int(frame.get("execution_count"), None),
                        user_expressions=frame.get("user_expressions") or {},
                        payload=_pages(frame.get("payload")),
                        forged_done=forged,
                    )
                if kind == "input_request":
                    await self._answer_input(frame, sink)
                    continue
                sink.on_event(frame)
        except (ConnectionError, OSError):
            result = await self._crashed(started)
            result.forged_done = forged
            return result
        finally:
            if self._cell is cell:
                self._cell, self._fid = None, None
            if self._watchdog is not None and not self._watchdog.done():
                self._watchdog.cancel()

    def _keep_late(self, frame: dict) -> None:
        if frame.get("type") == "done":
            # judged now, by the link that sent its cell: the agent's real end after an early
            # ``done`` that had the nonce too, or one more forgery
            frame = {"type": "late_done", "id": frame.get("id"),
                     "real": self._link is not None and self._link.real_done(frame)}
        size = _frame_size(frame)
        if len(self._late) < LATE_FRAMES and self._late_bytes + size <= LATE_BYTES:
            self._late.append(frame)
            self._late_bytes += size
        else:
            self._late_dropped += 1

    def _take_late(self) -> list:
        """What arrived while no cell ran, as events for the next cell (headed by a marker)."""
        if not self._late and not self._late_dropped:
            return []
        frames, dropped = self._late, self._late_dropped
        self._late, self._late_bytes, self._late_dropped = [], 0, 0
        out: list = [{"type": "late", "id": None, "reason": "between_cells", "dropped": dropped}]
        out += [frame if frame["type"] == "late_done" else {**frame, "late": True} for frame in frames]
        return out

    async def _answer_input(self, frame: dict, sink: CellSink) -> None:
        self._input_task = asyncio.ensure_future(
            sink.on_input_request(str(frame.get("prompt", "")), bool(frame.get("password")))
        )
        try:
            value = await self._input_task
        except asyncio.CancelledError:
            value = None
        finally:
            self._input_task = None
        if self._link is not None:
            await self._link.send({"type": "input_reply", "id": frame.get("id"), "value": value})

    async def _crashed(self, started: float) -> CellResult:
        reason = self.broken or await self.backend.exit_reason()
        self.log.warning("sandbox ended during a cell: %s", reason)
        code = _as_int(getattr(self.backend, "last_exit_status", None), None) or 1
        await self._teardown()
        self.restarts += 1
        self.start_soon()
        return CellResult(status="error", exit_status=code,
                          duration_ms=(time.perf_counter() - started) * 1000, crashed=reason)


def _policy_dict(policy: Any) -> dict:
    if policy is None:
        return {"mode": "deny", "entries": []}
    if hasattr(policy, "to_dict"):
        return policy.to_dict()
    return dict(policy)


def _frame_size(frame: dict) -> int:
    """About how many bytes a frame holds (for the late-frame bound; no re-encoding)."""
    size = 64
    for value in frame.values():
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, (dict, list)):
            size += len(str(value)) if len(value) < 64 else 1 << 16
    return size


def _pages(payload) -> list:
    """Pager payloads only (``obj?``): the one kind a sandbox may ask the frontend for."""
    if not isinstance(payload, list):
        return []
    return [{"source": "page", "data": p["data"], "start": p.get("start", 0) if isinstance(p.get("start"), int) else 0}
            for p in payload[:5] if isinstance(p, dict) and p.get("source") == "page" and isinstance(p.get("data"), dict)]


def _as_int(value, default):
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _as_float(value, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


__all__ = ["Session", "CellResult", "CellSink", "SandboxError"]
