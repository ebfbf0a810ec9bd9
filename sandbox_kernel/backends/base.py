"""The interface every backend implements.

A backend owns the sandboxes of one kernel: it starts them, enforces their egress
policy, opens a :class:`Transport` to the agent inside, and removes everything on
stop. The :class:`~sandbox_kernel.session.Session` is the only caller.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

from traitlets.config import LoggingConfigurable

from ..agent import protocol

#: progress callback: ``progress("Pulling image python:3.12-slim…")``
Progress = Callable[[str], None]


@dataclass
class SandboxInfo:
    """What a backend reports about one running sandbox (shown by ``%sandbox status``)."""

    backend: str
    sandbox_id: str
    #: backend-specific details (netns name, namespace/pod name, enforcer…)
    details: dict[str, Any] = field(default_factory=dict)


class Transport(abc.ABC):
    """A byte stream to one agent, carrying protocol frames.

    Created by :meth:`Backend.attach`; read by the session's reader task.
    """

    @abc.abstractmethod
    async def send(self, frame: dict) -> None:
        """Send one frame to the agent. Raises ``ConnectionError`` when the stream is gone."""

    @abc.abstractmethod
    async def recv(self) -> dict | None:
        """Return the next frame from the agent, or ``None`` at end of stream.

        Raises :class:`~sandbox_kernel.agent.protocol.FrameError` for a malformed frame.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the stream (the agent keeps running where the backend allows re-attach)."""


class LineTransport(Transport):
    """A transport over an asyncio reader/writer pair (pipes, sockets)."""

    def __init__(self, reader: asyncio.StreamReader, writer: Any):
        self._reader = reader
        self._writer = writer
        self._send_lock = asyncio.Lock()

    async def send(self, frame: dict) -> None:
        data = protocol.encode(frame)
        async with self._send_lock:
            if self._writer.is_closing():
                raise ConnectionError("the stream to the sandbox is closed")
            self._writer.write(data)
            await self._writer.drain()

    async def recv(self) -> dict | None:
        try:
            line = await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as err:
            if err.partial:
                raise protocol.FrameError(
                    f"stream ended inside a frame ({len(err.partial)} bytes)"
                ) from None
            return None
        except asyncio.LimitOverrunError as err:
            await self._skip_line(err.consumed)
            raise protocol.FrameError(
                f"frame longer than {protocol.MAX_FRAME} bytes, skipped"
            ) from None
        return protocol.decode(line, protocol.AGENT_TYPES)

    async def _skip_line(self, consumed: int) -> None:
        """Drop the rest of an oversized line so the next frame can be read."""
        await self._reader.readexactly(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as err:
                await self._reader.readexactly(err.consumed)
            except asyncio.IncompleteReadError:
                return

    async def close(self) -> None:
        if not self._writer.is_closing():
            self._writer.close()


class Backend(LoggingConfigurable):
    """Starts and stops sandboxes for one kernel.

    One instance per kernel, created by the Session with the kernel as config parent,
    so ``c.LocalBackend.…`` / ``c.KubernetesBackend.…`` settings apply.
    """

    #: the name used in configuration and in ``%sandbox status``
    name = "base"

    #: set by :meth:`exit_reason`: the agent's exit status when known (128+N for signal N)
    last_exit_status: int | None = None

    #: set by the Session (or the hub service's Manager): called with a
    #: :class:`~sandbox_kernel.agent.protocol.BlockedRecord` whenever the enforcer itself
    #: reports one (local: NFLOG and the DNS proxy)
    blocked_sink: Callable[[protocol.BlockedRecord], None] | None = None
    #: learn mode (sandbox_kernel/learn.py): where a backend that can see them reports the
    #: destinations its enforcer ALLOWED (verdict "allowed") and the names its resolver answered
    #: (protocol "dns", with "addresses"); None when nobody is learning
    learn_sink: Callable[[protocol.BlockedRecord], None] | None = None

    #: networks no policy may open (CIDR strings), set by the kernel or the hub service from
    #: the administrator's ceiling before :meth:`start`; the enforcer blocks them whatever
    #: the policy says. ``None``: the backend's own default.
    always_blocked: list[str] | None = None

    #: which resolved addresses a domain entry may open
    #: (:class:`~sandbox_kernel.policy.destinations.AddressScreen`), set with
    #: :attr:`always_blocked` from the same ceiling. ``None``: the default ceiling's.
    address_screen: Any = None

    #: networks the backend's own plumbing uses (CIDR -> what it is), which no policy may open;
    #: the kernel adds them to its ceiling so an entry inside them is refused with the reason
    reserved_ranges: dict[str, str] = {}

    #: True when something behind the backend (the hub service) judges every policy change
    #: against the ceiling itself, so the kernel only advises and never refuses on its own
    enforces_ceiling: bool = False

    #: True when an administrator can be asked for entries beyond the ceiling
    #: (``%sandbox request``: the hub service's requests for access); notices, refusals and the
    #: panel then offer "Request access"
    takes_requests: bool = False

    #: what :meth:`apply_policy` last put in force (see :attr:`applied`)
    _applied: dict[str, Any] = {}

    @property
    def applied(self) -> dict[str, Any]:
        """What is in force now (enforcer, when, resolved addresses…); ``{}`` before the
        first apply. Read by the kernel for the agent's guard, by ``%sandbox status`` and
        the policy panel, and by the hub service."""
        return dict(self._applied)

    def check(self) -> None:
        """Raise :class:`~sandbox_kernel.errors.IsolationUnavailable` if this machine or
        cluster cannot provide the isolation. Called by the Session before the first start
        and by ``sandbox-kernel doctor``. Must not change anything."""
        raise NotImplementedError

    async def start(self, kernel_id: str, policy: Any, progress: Progress) -> SandboxInfo:
        """Create the sandbox (network isolation, policy, agent process) and return its info.

        Called by Session.start() when the kernel starts and again after a crash.
        ``policy`` is the policy to enforce before any code runs. Reports long waits through
        ``progress``. On failure, leaves nothing behind and raises SandboxStartError.
        """
        raise NotImplementedError

    async def attach(self) -> Transport:
        """Open a transport to the running agent. Called by Session after start() and to
        re-attach after a dropped stream."""
        raise NotImplementedError

    async def apply_policy(self, policy: Any) -> dict[str, Any]:
        """Enforce ``policy`` atomically: on any error the previous policy stays in force.

        Called by Session.apply_policy(). Returns details of what was applied (enforcer,
        timestamps, resolved addresses)."""
        raise NotImplementedError

    async def interrupt(self) -> None:
        """Interrupt the running cell out of band, if the backend can. The Session calls
        it only when the in-band ``interrupt`` frame could not be sent: the agent acts on
        every interrupt it gets, so sending both interrupted a cell twice."""
        raise NotImplementedError

    async def exit_reason(self) -> str:
        """After the transport ended: describe in plain words why the agent is gone
        ("killed by signal SIGSEGV (segmentation fault)"). Called by Session."""
        raise NotImplementedError

    async def stop(self) -> None:
        """Remove the sandbox and everything created for it. Idempotent. Called on kernel
        shutdown, on restart and before replacing a crashed sandbox."""
        raise NotImplementedError

    def drain_blocked(self) -> None:
        """Report every enforcer record already received (called by the Session when a cell
        ends, so a refusal logged just before the cell finished still belongs to it)."""

    def info(self) -> SandboxInfo | None:
        """The running sandbox, or None."""
        return None

    async def adopt(self, kernel_id: str, namespace: str, pod: str, *, policy: Any = None) -> SandboxInfo | None:
        """Take over a sandbox that a previous process started and that still runs (called by
        the hub service when it restarts), re-applying ``policy``. Returns its info, or None
        when it is gone or this backend cannot adopt (the caller then starts a fresh one)."""
        return None
