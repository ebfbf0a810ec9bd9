"""One kernel's sandbox: lifecycle, the execute stream, crash recovery.

The :class:`Session` sits between the kernel (Jupyter messages) and a backend
(sandboxes). It owns the transport to the agent and the single reader task that
routes the agent's frames: cell events to the running cell, replies to whoever asked.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from .agent import protocol
from .backends.base import Backend, SandboxInfo, Transport
from .errors import ProtocolError, SandboxCrashed, SandboxError, SandboxStartError


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
#: frames the reader handles before it lets other tasks (shell requests) run
READER_BATCH = 64


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
        self._transport: Transport | None = None
        self._reader: asyncio.Task | None = None
        self._starting: asyncio.Task | None = None
        self._cell: asyncio.Queue | None = None
        self._fid: str | None = None  # id of the running cell
        self._nonce: str | None = None  # its nonce, which only the agent's own done echoes
        self._answered = False  # the reader saw the running cell's real done
        self._ended: collections.deque = collections.deque(maxlen=32)  # ids of cells that ended
        self._done_nonces: dict = {}  # their nonces (pruned with _ended)
        #: what arrived while no cell ran (shown by the next cell), and how much was not kept
        self._late: list = []
        self._late_bytes = 0
        self._late_dropped = 0
        self._watchdog: asyncio.Task | None = None
        #: why the link to the sandbox is broken (a protocol error, an unanswered interrupt)
        self.broken: str | None = None
        self._replies: dict[Any, asyncio.Future] = {}
        self._input_task: asyncio.Task | None = None
        self.hello: dict = {}
        self.info: SandboxInfo | None = None
        self.start_error: BaseException | None = None
        self.restarts = 0
        #: why the previous sandbox ended between cells (the kernel tells the next cell once)
        self.lost: str | None = None

    # -- lifecycle ----------------------------------------------------------------
    def start_soon(self) -> asyncio.Task:
        """Begin starting the sandbox in the background (kernel start, after a crash)."""
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start())
        return self._starting

    async def ready(self) -> None:
        """Wait until the sandbox runs; raise the start error (typed) if it cannot."""
        if self._transport is not None and self._reader is not None and not self._reader.done():
            return
        if self._reader is not None and self._reader.done() and self._transport is not None:
            # the sandbox ended between cells: clean it up, say why, then start a fresh one
            self.lost = self.broken or await self.backend.exit_reason()
            self.log.warning("sandbox ended between cells: %s", self.lost)
            await self._teardown()
            self.restarts += 1
        task = self.start_soon()
        await asyncio.shield(task)

    async def _start(self) -> None:
        self.start_error = None
        self.broken = None
        try:
            self.info = await self.backend.start(self.kernel_id, self.policy, self._progress)
            self._transport = await self.backend.attach()
            hello = await asyncio.wait_for(self._transport.recv(), self.start_timeout)
            if not hello or hello.get("type") != "hello":
                raise SandboxStartError(
                    f"the agent did not start: {await self.backend.exit_reason()}"
                )
            if hello.get("version") != protocol.VERSION:
                raise SandboxStartError(
                    f"the agent in the sandbox speaks protocol {hello.get('version')!r}, "
                    f"this kernel speaks {protocol.VERSION}: use matching versions"
                )
            self.hello = hello
            self._reader = asyncio.ensure_future(self._read())
            await self._transport.send({"type": "policy", "policy": self.agent_view(self.policy)})
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
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        if self._transport is not None:
            try:
                await self._transport.close()
            except Exception:  # noqa: BLE001 - closing a dead stream
                pass
            self._transport = None
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

    # -- the reader ---------------------------------------------------------------
    async def _read(self) -> None:
        """The one reader of the agent's frames. A frame it cannot decode or check is a
        protocol error that ends the link (see protocol.py): the cell gets a plain message
        and the next cell a fresh sandbox. It never dies silently and never starves the
        event loop (a flood yields to other tasks every :data:`READER_BATCH` frames)."""
        transport = self._transport
        assert transport is not None
        handled = 0
        while True:
            try:
                frame = await transport.recv()
                if frame is not None:
                    protocol.check_agent_frame(frame)
            except protocol.FrameError as err:
                self.log.warning("protocol error from the sandbox: %s", err)
                self.broken = f"the sandbox broke the protocol ({err}), so it was stopped"
                break
            except (ConnectionError, OSError) as err:
                self.log.warning("stream to the sandbox failed: %s", err)
                frame = None
            except Exception as err:  # noqa: BLE001 - a reader that dies silently wedges every cell
                self.log.error("reading from the sandbox failed", exc_info=True)
                self.broken = f"reading from the sandbox failed ({type(err).__name__}), so it was stopped"
                break
            if frame is None:
                break
            kind = frame["type"]
            if kind == "blocked":
                # only the backend may speak for the enforcer; the agent is guard or watcher
                frame.pop("source", None)
                frame["source"] = _source(frame)
            if kind in ("reply", "pong"):
                fut = self._replies.pop(frame.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
            else:
                if kind == "done" and frame.get("id") == self._fid and self._is_real_done(frame):
                    self._answered = True
                self._to_cell(frame)
            handled += 1
            if handled % READER_BATCH == 0:
                await asyncio.sleep(0)
        self._link_ended()

    def _link_ended(self) -> None:
        """The agent is gone (or the link broken): fail everything that waits on it."""
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(SandboxCrashed("the sandbox stopped"))
        self._replies.clear()
        self._to_cell(_END)

    def _is_real_done(self, frame: dict) -> bool:
        return _same_nonce(frame.get("nonce"), self._nonce)

    def _to_cell(self, frame) -> None:
        if self._cell is not None:
            self._cell.put_nowait(frame)
            return
        if frame is _END or not isinstance(frame, dict):
            return
        if frame.get("type") == "blocked":
            self.on_blocked(frame.get("record"), _source(frame))
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
        assert self._transport is not None
        fid = f"r{next(self._ids)}"
        fut = asyncio.get_running_loop().create_future()
        self._replies[fid] = fut
        try:
            await self._transport.send({**frame, "id": fid})
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._replies.pop(fid, None)
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
        if self._transport is not None:
            try:
                await self._transport.send({"type": "interrupt"})
                return  # one interrupt: a second would hit the cell's own clean-up
            except (ConnectionError, OSError):
                pass
        await self.backend.interrupt()  # the in-band frame could not be sent

    async def _escalate(self, cell: asyncio.Queue) -> None:
        await asyncio.sleep(self.interrupt_timeout)
        if self._cell is not cell or self._answered:
            return
        self.log.warning("the sandbox did not answer an interrupt within %g s: stopping it", self.interrupt_timeout)
        self.broken = (f"the sandbox did not answer an interrupt within {self.interrupt_timeout:g} s, "
                       "so it was stopped")
        if self._reader is not None:
            self._reader.cancel()
        self._link_ended()

    async def apply_policy(self, policy: Any) -> dict:
        """Enforce a new policy (atomic in the backend), then tell the agent about it."""
        details = await self.backend.apply_policy(policy)
        self.policy = policy
        if self._transport is not None:
            try:
                await self._transport.send({"type": "policy", "policy": self.agent_view(policy)})
            except (ConnectionError, OSError):
                pass
        return details

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
        assert self._transport is not None
        fid = f"c{next(self._ids)}"
        nonce = secrets.token_hex(16)
        cell: asyncio.Queue = asyncio.Queue()
        late = self._take_late() if not silent else []
        self._cell, self._fid, self._nonce, self._answered = cell, fid, nonce, False
        forged = 0
        try:
            for frame in late:
                sink.on_event(frame)
            await self._transport.send({
                "type": "execute", "id": fid, "nonce": nonce, "code": code, "silent": silent,
                "store_history": store_history, "user_expressions": user_expressions or {},
                "allow_stdin": allow_stdin, "execution_count": execution_count,
            })
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
                        sink.on_event({"type": "late_done", "id": frame.get("id"), "real": self._done_matches(frame)})
                        continue
                    if kind != "input_request":
                        sink.on_event({**frame, "late": True})
                        continue
                elif kind == "done" and frame.get("id") == fid:
                    if not _same_nonce(frame.get("nonce"), nonce):
                        forged += 1  # not the agent's: the cell goes on until the real one
                        sink.on_event({"type": "forged_done"})
                        continue
                    self._ended.append(fid)
                    self._done_nonces = {i: self._done_nonces[i] for i in self._ended if i in self._done_nonces}
                    self._done_nonces[fid] = nonce
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
                self._cell, self._fid, self._nonce = None, None, None
            if self._watchdog is not None and not self._watchdog.done():
                self._watchdog.cancel()

    def _done_matches(self, frame: dict) -> bool:
        """Whether a ``done`` for an ended cell carries that cell's nonce (the agent's real end
        after an early ``done`` that had it too) rather than being one more forgery."""
        return _same_nonce(frame.get("nonce"), self._done_nonces.get(frame.get("id")))

    def _keep_late(self, frame: dict) -> None:
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
        for frame in frames:
            if frame.get("type") == "done":
                out.append({"type": "late_done", "id": frame.get("id"), "real": self._done_matches(frame)})
            else:
                out.append({**frame, "late": True})
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
        if self._transport is not None:
            await self._transport.send({"type": "input_reply", "id": frame.get("id"), "value": value})

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


def _source(frame: dict) -> str:
    """Who reported a blocked connection: the enforcer (set by us), else the agent's guard
    or watcher (told apart by verdict; the agent's word is never taken for 'enforcer')."""
    if frame.get("source") == "enforcer":
        return "enforcer"
    record = frame.get("record")
    verdict = record.get("verdict") if isinstance(record, dict) else None
    return "guard" if verdict == "guarded" else "watcher"


def _same_nonce(sent, nonce: str | None) -> bool:
    """Whether a frame's ``nonce`` (any JSON value from the sandbox) is ``nonce``."""
    if nonce is None or not isinstance(sent, str):
        return False
    return secrets.compare_digest(sent.encode("utf-8", "surrogatepass"), nonce.encode("ascii"))


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
