"""Where the agent's frames go: stdio pipes, or a unix socket clients attach to.

Standard library only (runs inside the sandbox).
"""

from __future__ import annotations

import collections
import os
import socket
import threading
from typing import Callable

from . import protocol


class Channel:
    """Serialises frame writes from many threads onto one byte stream."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def send(self, frame: dict) -> None:
        try:
            data = protocol.encode(frame)
        except protocol.FrameError as err:
            data = protocol.encode(
                {"type": "stream", "id": frame.get("id"), "name": "stderr",
                 "text": f"[sandbox] output dropped: {err}\n"}
            )
        with self._lock:
            self._write(data)

    def _write(self, data: bytes) -> None:
        raise NotImplementedError

    def serve(self, on_frame: Callable[[dict], None], on_hello: Callable[[], dict]) -> None:
        """Read frames forever in the calling thread, passing each to ``on_frame``."""
        raise NotImplementedError


class StdioChannel(Channel):
    """Frames on two inherited file descriptors; end of input means the kernel is gone."""

    def __init__(self, fd_in: int, fd_out: int):
        super().__init__()
        self._in = os.fdopen(fd_in, "rb", buffering=1 << 16)
        self._out = fd_out

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self._out, view)
            except BrokenPipeError:
                os._exit(0)  # the kernel is gone: nothing left to serve
            view = view[n:]

    def serve(self, on_frame, on_hello) -> None:
        self.send(on_hello())
        _read_frames(self._in, on_frame, self)


class SocketChannel(Channel):
    """A unix socket that one client at a time attaches to (the Kubernetes exec path).

    While no client is attached, frames are kept in a bounded buffer and replayed on
    the next attach, so a dropped exec stream loses no output of a running cell.
    """

    BUFFER_LIMIT = 8 * 1024 * 1024

    def __init__(self, path: str):
        super().__init__()
        self._path = path
        self._conn: socket.socket | None = None
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_bytes = 0
        self._dropped = 0

    def _write(self, data: bytes) -> None:
        if self._conn is not None:
            try:
                self._conn.sendall(data)
                return
            except OSError:
                self._conn = None
        self._pending.append(data)
        self._pending_bytes += len(data)
        while self._pending_bytes > self.BUFFER_LIMIT and len(self._pending) > 1:
            self._pending_bytes -= len(self._pending.popleft())
            self._dropped += 1

    def serve(self, on_frame, on_hello) -> None:
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self._path)
        os.chmod(self._path, 0o600)
        server.listen(1)
        while True:
            conn, _ = server.accept()
            with self._lock:
                if self._conn is not None:
                    try:
                        self._conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                self._conn = conn
                conn.sendall(protocol.encode(on_hello()))
                if self._dropped:
                    note = {"type": "stream", "id": None, "name": "stderr",
                            "text": f"[sandbox] {self._dropped} output frames were dropped while detached\n"}
                    conn.sendall(protocol.encode(note))
                    self._dropped = 0
                while self._pending:
                    conn.sendall(self._pending.popleft())
                self._pending_bytes = 0
            _read_frames(conn.makefile("rb", buffering=1 << 16), on_frame, self)
            with self._lock:
                if self._conn is conn:
                    self._conn = None
            conn.close()


def _read_frames(stream, on_frame, channel: Channel) -> None:
    while True:
        line = stream.readline(protocol.MAX_FRAME + 1)
        if not line:
            return
        if not line.endswith(b"\n"):
            channel.send({"type": "stream", "id": None, "name": "stderr",
                          "text": "[sandbox] protocol error: oversized or truncated frame ignored\n"})
            if len(line) > protocol.MAX_FRAME:
                _skip_line(stream)
                continue
            return
        try:
            frame = protocol.decode(line, protocol.KERNEL_TYPES)
        except protocol.FrameError as err:
            channel.send({"type": "stream", "id": None, "name": "stderr",
                          "text": f"[sandbox] protocol error, frame ignored: {err}\n"})
            continue
        on_frame(frame)


def _skip_line(stream) -> None:
    while True:
        chunk = stream.readline(1 << 20)
        if not chunk or chunk.endswith(b"\n"):
            return


def attach(path: str) -> int:
    """Copy stdin to the agent's socket and the socket to stdout (``agent.pyz attach``)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)

    def pump_in() -> None:
        while True:
            data = os.read(0, 1 << 16)
            if not data:
                break
            conn.sendall(data)
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=pump_in, daemon=True).start()
    while True:
        data = conn.recv(1 << 16)
        if not data:
            return 0
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]
