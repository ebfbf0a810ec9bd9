"""The exec stream to the agent in the pod, as the Session's transport."""

from __future__ import annotations

import asyncio
import collections
import json
import secrets
import socket
import threading
import time
from typing import Any, Callable

from ...agent import protocol
from ...errors import SandboxError
from ..base import LineTransport


class _ExecWriter:
    """The writer half LineTransport expects, sending to the exec stdin channel in a thread.

    A send never fails on its own account while the stream can still come back: when the
    write fails (the stream was cut, maybe before the reader thread noticed), the writer shuts
    the old socket so that the reader notices at once, then waits for the reader's verdict —
    a new stream (the frame goes again; the agent drops a duplicate by ``seq``) or the end
    for good (:class:`ConnectionError` in plain words; the Session then reports the cell as
    ended and asks the backend why). It never waits on a wall-clock guess of how fast the
    reader is: under CPU load that thread can be late by seconds."""

    #: the longest a send waits for the reader's verdict: the reader's own re-attach limit
    #: (ExecTransport.REATTACH_FOR) plus what its tries may take beyond it
    REATTACH_WAIT = 180.0

    def __init__(self, ws):
        self.ws = ws
        self._buffer = bytearray()
        self.closed = False
        self.finished = False  # set by the reader thread when the stream ended for good
        self.reattaching = threading.Event()

    def write(self, data: bytes) -> None:
        self._buffer += data

    async def drain(self) -> None:
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            try:
                await asyncio.to_thread(self._send, data)
            except ConnectionError:
                self.closed = True
                raise
            except Exception as err:  # noqa: BLE001 - websocket-client raises several types
                self.closed = True
                raise ConnectionError(f"the exec stream to the sandbox ended ({type(err).__name__})") from None

    def _send(self, data: bytes) -> None:
        deadline = time.monotonic() + self.REATTACH_WAIT
        while True:
            while self.reattaching.is_set() and not self.closed and time.monotonic() < deadline:
                time.sleep(0.02)
            if self.closed or self.finished:
                raise ConnectionError("the exec stream to the sandbox ended and could not be re-opened")
            ws = self.ws
            try:
                ws.write_stdin(data)
                return
            except Exception:  # noqa: BLE001 - websocket-client raises several types
                pass
            # cut: make sure the reader sees it now (a shut socket wakes its poll), then wait
            # until it re-attached (a new ws), gave up (finished) or we are closed
            _shut(ws)
            while (self.ws is ws and not self.finished and not self.closed
                   and time.monotonic() < deadline):
                time.sleep(0.02)
            if self.ws is ws or time.monotonic() >= deadline:
                raise ConnectionError("the exec stream to the sandbox was cut and could not be re-opened")

    def is_closing(self) -> bool:
        return self.closed or self.finished

    def close(self) -> None:
        self.closed = True


def _shut(ws) -> None:
    """Shut a failed exec WebSocket's socket (both ways), so that a reader polling it wakes."""
    try:
        raw = getattr(getattr(ws, "sock", None), "sock", None)
        if raw is not None:
            raw.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class ExecTransport(LineTransport):
    """Frames over a pod exec: stdin channel out, stdout channel in (stderr goes to the log).

    A reader thread pulls channel data from the WebSocket and feeds an asyncio
    StreamReader with whole lines only; the channel-3 status is kept as :attr:`status`
    when the exec ends. When the stream is cut without a status (a load balancer, an API
    server restart, a network blip) and ``alive()`` says the pod still runs, the thread
    re-attaches with ``reopen()`` (at least :attr:`MAX_REATTACH` tries, and for up to
    :attr:`REATTACH_FOR` s while the API server cannot answer or refuses: a restarting one
    is down for seconds, then refuses until its RBAC caches are filled): the agent is the
    pod's main process and keeps the interpreter. Frames are numbered both ways (see
    agent/protocol.py): the new stream opens with ``resume {since}`` and the frames the
    agent has not acknowledged are sent again, the agent replays what it wrote after
    ``since``, and each side drops duplicates by ``seq`` — so nothing that was in flight
    in the old stream is lost and no cell runs twice. The agent's greeting on the new
    stream is dropped, so the Session sees one uninterrupted stream.
    :attr:`reattached` counts the re-attaches.
    Also tracks whether a cell is running, for the idle timeout.
    """

    MAX_REATTACH = 5
    REATTACH_FOR = 60.0
    #: kernel frames kept for resending until the agent acknowledges them
    MAX_UNACKED = 4096

    def __init__(self, ws, loop: asyncio.AbstractEventLoop, log,
                 reopen: Callable[[], Any] | None = None, alive: Callable[[], bool] | None = None):
        self.ws = ws
        self.loop = loop
        self.log = log
        self.status: dict | None = None
        self.reattached = 0
        self._reopen, self._alive = reopen, alive
        self._busy: set = set()
        self._last = time.monotonic()
        self._hello_seen = False
        self._out_seq = 0  # seq of the last frame sent
        self._unacked: collections.deque[tuple[int, bytes]] = collections.deque()
        self._in_seq = 0  # highest seq of an agent frame received
        reader = asyncio.StreamReader(limit=protocol.MAX_FRAME + 1)
        super().__init__(reader, _ExecWriter(ws))
        self._client = secrets.token_hex(8)  # names this transport's numbering to the agent
        # Before any other frame: a new client, which gets what no client was sent yet. The
        # reader thread writes it (a websocket write blocks when the stream is slow, and
        # nothing may block the event loop); sends wait for it as they wait for a re-attach.
        self._writer.reattaching.set()
        self._thread = threading.Thread(target=self._pump, daemon=True, name="sandbox-exec-reader")
        self._thread.start()

    def _feed(self, data: bytes) -> None:
        self.loop.call_soon_threadsafe(self._reader.feed_data, data)

    def _greet(self) -> bool:
        """Write the opening ``resume`` frame (reader thread); False when the stream is dead."""
        try:
            self.ws.write_stdin(protocol.encode({"type": "resume", "client": self._client, "since": None}))
            return True
        except Exception as err:  # noqa: BLE001 - websocket-client raises several types
            self.log.info("the exec stream failed at once: %s", err)
            return False
        finally:
            self._writer.reattaching.clear()

    def _pump(self) -> None:
        partial = b""
        try:
            if not self._greet():
                return
            while True:
                ws = self.ws
                try:
                    while ws.is_open() and not self._writer.closed:
                        ws.update(timeout=0.5)
                        out = ws.read_channel(1)
                        if out:
                            data = partial + out
                            cut = data.rfind(b"\n") + 1
                            if cut:
                                self._feed(data[:cut])
                            partial = data[cut:]
                        err = ws.read_channel(2)
                        if err:
                            self.log.info("sandbox agent stderr: %s", err.decode("utf-8", "replace").rstrip())
                except Exception as err:  # noqa: BLE001 - "Connection to remote host was lost." and others
                    self.log.info("exec stream cut: %s", err)
                try:
                    status = ws.read_channel(3)
                except Exception as err:  # noqa: BLE001 - the dead socket again: no status came
                    # (a cut seen first as ECONNRESET leaves websocket-client's socket marked
                    # open, and this read polls it once more: "Connection to remote host was
                    # lost." here ended the reader without a re-attach)
                    self.log.info("exec stream: no exit status (%s)", err)
                    status = None
                if status:
                    try:
                        self.status = json.loads(status)
                    except ValueError:
                        self.status = {"message": status.decode("utf-8", "replace")}
                if self.status is not None or self._writer.closed or not self._reattach():
                    break
                if partial:
                    self.log.warning("dropped %d bytes of a frame cut by the stream drop", len(partial))
                partial = b""
        except Exception as err:  # noqa: BLE001 - a dropped socket may surface as many types
            self.log.info("exec stream ended: %s", err)
        finally:
            self._writer.finished = True
            if partial:
                self._feed(partial)  # recv() reports the frame cut short
            try:
                self.loop.call_soon_threadsafe(self._reader.feed_eof)
            except RuntimeError:
                pass

    def _reattach(self) -> bool:
        """After a drop without exit status: open a new exec if the pod still runs (reader thread)."""
        if self._reopen is None or self._alive is None:
            return False
        writer = self._writer
        writer.reattaching.set()
        deadline = time.monotonic() + self.REATTACH_FOR
        attempt = -1
        try:
            while True:
                attempt += 1
                if attempt >= self.MAX_REATTACH and time.monotonic() > deadline:
                    return False
                if writer.closed:
                    return False
                try:
                    if not self._alive():
                        return False
                    ws = self._reopen()
                    # first on the new stream: where to resume, then what the agent may not have got
                    try:
                        ws.write_stdin(protocol.encode({"type": "resume", "client": self._client, "since": self._in_seq})
                                       + b"".join(data for _, data in list(self._unacked)))
                    except Exception as err:  # noqa: BLE001 - websocket-client raises several types
                        raise SandboxError(f"the new exec stream failed at once: {err}") from None
                except SandboxError as err:
                    self.log.warning("re-attaching to the sandbox failed (try %d): %s", attempt + 1, err)
                    time.sleep(min(0.2 * 2 ** attempt, 2.0))
                    continue
                self.ws = writer.ws = ws
                self.reattached += 1
                self.log.warning("the exec stream to the sandbox dropped; re-attached (%d)", self.reattached)
                return True
        finally:
            writer.reattaching.clear()

    async def send(self, frame: dict) -> None:
        if frame.get("type") == "execute":
            self._busy.add(frame.get("id"))
        self._last = time.monotonic()
        self._out_seq += 1
        frame = {**frame, "seq": self._out_seq}
        self._unacked.append((self._out_seq, protocol.encode(frame)))
        if len(self._unacked) > self.MAX_UNACKED:
            self._unacked.popleft()
        await super().send(frame)

    async def recv(self) -> dict | None:
        while True:
            frame = await super().recv()
            self._last = time.monotonic()
            if frame is not None:
                seq, ack = frame.get("seq"), frame.get("ack")
                if isinstance(seq, int):
                    if seq <= self._in_seq:
                        continue  # replayed after a re-attach: already passed on
                    self._in_seq = seq
                if isinstance(ack, int):
                    while self._unacked and self._unacked[0][0] <= ack:
                        self._unacked.popleft()
            if frame is not None and frame.get("type") == "hello":
                if self._hello_seen:
                    continue  # the agent greets every attach; the Session was greeted once
                self._hello_seen = True
            if frame is not None and frame.get("type") == "done":
                self._busy.discard(frame.get("id"))
            return frame

    def idle_for(self) -> float | None:
        """Seconds since the last frame, or None while a cell runs."""
        return None if self._busy else time.monotonic() - self._last

    async def close(self) -> None:
        self._writer.close()
        await asyncio.to_thread(self._close_ws)

    def _close_ws(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - already gone
            pass
        self._thread.join(2)
