"""The link to one agent: attach, greeting, the one reader, replies, the end of a cell.

Two places talk to an agent, and both do it through an :class:`AgentLink`: the kernel's
:class:`~sandbox_kernel.session.Session` (over any backend's transport, the hub's websocket
included) and, in hub mode, the sandbox service's
:class:`~sandbox_kernel.hub.manager.Manager`, which relays frames between the agent and a
kernel. What the link guarantees, the same on both sides:

* the agent greets first with ``hello`` and speaks :data:`protocol.VERSION`, or the start
  fails with :class:`SandboxStartError` (a later ``hello`` is dropped);
* exactly one reader takes the agent's frames, checks each (``check_agent_frame``) and hands
  it to its owner in order; it yields to other tasks every :data:`READER_BATCH` frames;
* a frame it cannot decode or check is a protocol error: the link ends, :attr:`broken` says
  why in plain words, and the owner stops that sandbox (the sandbox is untrusted; nobody
  guesses what a broken stream meant) — it never drops a bad frame and reads on;
* who reported a ``blocked`` record is the link's word, never the agent's: ``source`` is
  "guard" or "watcher" (only a backend speaks for the enforcer);
* ``reply``/``pong`` frames go to whoever is waiting for them (:meth:`request`);
* each ``execute`` carries a fresh nonce that only the agent's own ``done`` echoes
  (:meth:`execute`, :meth:`real_done`): a ``done`` written by other code in the sandbox is
  told apart (protocol v2).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import secrets
from typing import Any, Callable

from .agent import protocol
from .backends.base import Backend, Transport
from .errors import SandboxCrashed, SandboxStartError

#: frames the reader handles before it lets other tasks (shell requests) run
READER_BATCH = 64
#: cells whose nonce the link remembers (a ``done`` for an older cell is not the agent's)
NONCES_KEPT = 64


class AgentLink:
    """One attached agent. Made by :meth:`attach`; its reader runs until the stream ends,
    the link is :meth:`abort`-ed or :meth:`close`-d.

    ``on_frame(frame)`` gets every checked frame that is not an awaited reply;
    ``on_end(link)`` is called once when the agent is gone or the link broke (not after
    :meth:`close`: the owner knows then)."""

    def __init__(self, transport: Transport, hello: dict, log, on_frame: Callable[[dict], None],
                 on_end: Callable[[AgentLink], None], name: str = "sandbox"):
        self.transport = transport
        #: the agent's greeting (version, pid, python, ipython)
        self.hello = hello
        self.log = log
        self.name = name
        #: why the link is broken (a protocol error, an unanswered interrupt), in plain words
        self.broken: str | None = None
        self._on_frame = on_frame
        self._on_end = on_end
        self._ended = False
        self._replies: dict[str, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._nonces: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def attach(cls, backend: Backend, *, timeout: float, log, on_frame: Callable[[dict], None],
                     on_end: Callable[[AgentLink], None], speaker: str = "this kernel",
                     name: str = "sandbox") -> AgentLink:
        """Open the backend's transport to its (started) agent, wait ``timeout`` seconds for
        its greeting and check its version, then start the reader. Raises SandboxStartError
        (the transport closed) when the agent does not greet or speaks another version;
        ``speaker`` names this side in that message."""
        transport = await backend.attach()
        try:
            try:
                hello = await asyncio.wait_for(transport.recv(), timeout)
            except asyncio.TimeoutError:
                raise SandboxStartError(f"the sandbox did not start within {timeout:.0f} s") from None
            except protocol.FrameError as err:
                raise SandboxStartError(f"the agent's greeting broke the protocol ({err})") from None
            if not hello or hello.get("type") != "hello":
                raise SandboxStartError(f"the agent did not start: {await backend.exit_reason()}")
            if hello.get("version") != protocol.VERSION:
                raise SandboxStartError(
                    f"the agent in the sandbox speaks protocol {hello.get('version')!r}, "
                    f"{speaker} speaks {protocol.VERSION}: use matching versions"
                )
        except BaseException:
            await _close_quietly(transport)
            raise
        return cls(transport, hello, log, on_frame, on_end, name)

    # -- state -----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Whether the reader still runs (the agent is there and the link is not broken)."""
        return not self._reader.done()

    # -- sending ---------------------------------------------------------------------
    async def send(self, frame: dict) -> None:
        """Send one frame; raises ConnectionError (or OSError) when the stream is gone."""
        await self.transport.send(frame)

    async def send_quietly(self, frame: dict) -> bool:
        """Send one frame if the stream is there; returns whether it was sent."""
        try:
            await self.transport.send(frame)
            return True
        except (ConnectionError, OSError):
            return False

    async def request(self, frame: dict, timeout: float) -> dict:
        """Send a request that gets one ``reply`` or ``pong`` (matched by a fresh ``id``) and
        return that frame; SandboxCrashed if the link ends first, TimeoutError after
        ``timeout`` seconds."""
        if self._ended:
            raise SandboxCrashed("the sandbox stopped")
        fid = f"r{next(self._ids)}"
        fut = asyncio.get_running_loop().create_future()
        self._replies[fid] = fut
        try:
            await self.transport.send({**frame, "id": fid})
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._replies.pop(fid, None)

    async def execute(self, fid: str, code: str, **options: Any) -> None:
        """Send cell ``fid`` with a fresh nonce, remembered for :meth:`real_done`."""
        nonce = secrets.token_hex(16)
        self._nonces[fid] = nonce
        while len(self._nonces) > NONCES_KEPT:
            self._nonces.popitem(last=False)
        await self.transport.send({"type": "execute", "id": fid, "nonce": nonce, "code": code, **options})

    def real_done(self, frame: dict) -> bool:
        """Whether a ``done`` carries the nonce this link sent with its cell (the agent's own
        end of that cell), not one written by other code in the sandbox."""
        return same_nonce(frame.get("nonce"), self._nonces.get(frame.get("id")))

    # -- ending ----------------------------------------------------------------------
    def abort(self, reason: str) -> None:
        """End the link from this side (e.g. the agent did not answer an interrupt):
        :attr:`broken` says why; the owner's ``on_end`` runs now (if the link had not
        ended already)."""
        if self._ended:
            return
        self.broken = reason
        self._reader.cancel()
        self._end()

    async def close(self) -> None:
        """Stop reading and close the transport (the owner is done with this agent)."""
        self._ended = True  # the owner knows: no on_end
        self._reader.cancel()
        self._fail_replies()
        await _close_quietly(self.transport)

    # -- the reader ------------------------------------------------------------------
    async def _read(self) -> None:
        """The one reader of the agent's frames. It never dies silently: whatever ends it
        ends the link, and an unexpected error is a protocol error too."""
        handled = 0
        while True:
            try:
                frame = await self.transport.recv()
                if frame is not None:
                    protocol.check_agent_frame(frame)
            except protocol.FrameError as err:
                self.log.warning("%s: protocol error from the agent: %s", self.name, err)
                self.broken = f"the sandbox broke the protocol ({err}), so it was stopped"
                break
            except (ConnectionError, OSError) as err:
                self.log.warning("%s: stream to the agent failed: %s", self.name, err)
                break
            except Exception as err:  # noqa: BLE001 - a reader that dies silently wedges every cell
                self.log.error("%s: reading from the agent failed", self.name, exc_info=True)
                self.broken = f"reading from the sandbox failed ({type(err).__name__}), so it was stopped"
                break
            if frame is None:
                break
            try:
                self._route(frame)
            except Exception:  # noqa: BLE001 - the owner's handler failed on one frame: read on
                self.log.error("%s: handling a %s frame failed", self.name, frame["type"], exc_info=True)
            handled += 1
            if handled % READER_BATCH == 0:
                await asyncio.sleep(0)
        self._end()

    def _route(self, frame: dict) -> None:
        kind = frame["type"]
        if kind == "hello":
            return  # the greeting was taken by attach(); a second one says nothing new
        if kind == "blocked":
            frame.pop("source", None)  # the agent's claim, e.g. "enforcer", is not taken
            frame["source"] = reported_source(frame["record"])
        elif kind in ("reply", "pong"):
            fut = self._replies.pop(frame.get("id"), None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(frame)
                return
        self._on_frame(frame)

    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._fail_replies()
        self._on_end(self)

    def _fail_replies(self) -> None:
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(SandboxCrashed("the sandbox stopped"))
        self._replies.clear()


def reported_source(record: dict) -> str:
    """Who in the sandbox reported a blocked record: the guard (verdict "guarded") or the
    watcher. Whatever the record says, it is never the enforcer."""
    return "guard" if record.get("verdict") == "guarded" else "watcher"


def same_nonce(sent: Any, nonce: str | None) -> bool:
    """Whether a frame's ``nonce`` (any JSON value from the sandbox) is ``nonce``."""
    if nonce is None or not isinstance(sent, str):
        return False
    return secrets.compare_digest(sent.encode("utf-8", "surrogatepass"), nonce.encode("ascii"))


async def _close_quietly(transport: Transport) -> None:
    try:
        await transport.close()
    except Exception:  # noqa: BLE001 - closing a dead stream
        pass
