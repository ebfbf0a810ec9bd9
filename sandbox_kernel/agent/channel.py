"""Where the agent's frames go: stdio pipes, or a unix socket clients attach to.

Standard library only (runs inside the sandbox).
"""

from __future__ import annotations

import _signal  # the C functions: signal.pthread_sigmask's Python wrapper can itself be interrupted
import collections
import os
import signal
import socket
import threading
from typing import Callable

from . import protocol


class whole_frames:  # noqa: N801 - used like a function: ``with whole_frames():``
    """Hold SIGINT back while a frame is written: an interrupt raised inside a write would
    leave half a frame on the stream and corrupt the next (the interrupt is delivered as
    soon as the frame is out; the running cell still gets its KeyboardInterrupt). A SIGINT
    that arrived just before is handled where Python next checks for signals: the writers
    finish the frame before passing that KeyboardInterrupt on."""

    __slots__ = ("unblock",)

    def __enter__(self) -> None:
        __tracebackhide__ = True  # noqa: F841 - a KeyboardInterrupt may surface here: not the user's code
        self.unblock = False
        self.unblock = _SIGINT not in _signal.pthread_sigmask(signal.SIG_BLOCK, _SIGINT_SET)

    def __exit__(self, *exc) -> None:
        __tracebackhide__ = True  # noqa: F841
        if self.unblock:
            _signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGINT_SET)


_SIGINT = int(signal.SIGINT)
_SIGINT_SET = {_SIGINT}


class Channel:
    """Serialises frame writes from many threads onto one byte stream."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def send(self, frame: dict) -> None:
        __tracebackhide__ = True  # noqa: F841 - a KeyboardInterrupt may surface here: not the user's code
        try:
            data = protocol.encode(frame)
        except protocol.FrameError as err:
            data = protocol.encode(
                {"type": "stream", "id": frame.get("id"), "name": "stderr",
                 "text": f"[sandbox] output dropped: {err}\n"}
            )
        with whole_frames(), self._lock:
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
        __tracebackhide__ = True  # noqa: F841 - a KeyboardInterrupt may surface here: not the user's code
        view = memoryview(data)
        interrupted: BaseException | None = None
        while view:
            try:
                while view:
                    n = os.write(self._out, view)
                    view = view[n:]
            except KeyboardInterrupt as err:  # raised at the loop's check: view is consistent
                interrupted = err  # finish the frame, then let the cell have it
            except BrokenPipeError:
                os._exit(0)  # the kernel is gone: nothing left to serve
        if interrupted is not None:
            raise interrupted

    def serve(self, on_frame, on_hello) -> None:
        self.send(on_hello())
        _read_frames(self._in, on_frame, self)


class SocketChannel(Channel):
    """A unix socket that one client at a time attaches to (the Kubernetes exec path).

    Frames are numbered both ways so that a dropped exec stream loses nothing, not even
    what was in flight in the old stream's buffers (the attach process, the kubelet):

    - every frame the agent writes gets ``seq`` (1, 2, …) and is kept in a bounded ring
      (:data:`BUFFER_LIMIT` bytes), delivered or not; ``done``, ``reply`` and ``pong``
      carry ``ack``, the highest kernel ``seq`` processed, so the kernel can forget what
      it no longer needs to resend;
    - after the greeting, a client sends ``resume {client, since}`` first: ``client``
      names the client's numbering (a new transport, e.g. after a sandbox service restart,
      starts its own at 1); ``since`` is the last agent ``seq`` it received, and it gets
      every kept frame after that again (it drops what it already has by ``seq``);
      ``since: null`` (a new client), silence for :data:`RESUME_WAIT` seconds or another
      first frame get what was never written to any client;
    - a kernel frame with a ``seq`` at or below the highest seen from the same client is
      a resent duplicate and is ignored, so resending never runs a cell twice.
    """

    BUFFER_LIMIT = 8 * 1024 * 1024
    RESUME_WAIT = 2.0
    _ACKED = frozenset({"done", "reply", "pong"})

    def __init__(self, path: str, orphan_exit: float = 0.0, log_fd: int = 2):
        super().__init__()
        self._log_fd = log_fd
        self._path = path
        #: seconds with no client attached after which the agent exits (0: never). It counts
        #: from the start and from each detach, whatever the kernel process is doing: a kernel
        #: that died uncleanly never stops its pod, so the pod must end by itself.
        self.orphan_exit = orphan_exit
        self._conn: socket.socket | None = None
        self._ring: collections.deque[tuple[int, bytes]] = collections.deque()
        self._ring_bytes = 0
        self._seq = 0  # of the last frame written
        self._written = 0  # seq of the last frame written to some client
        self._forgotten = 0  # seq of the newest frame pushed out of the ring
        self._holding = False  # a client attached and may still ask to resume
        self.in_seq = 0  # highest seq of a kernel frame processed
        self._client: object = None  # whose numbering in_seq counts

    def send(self, frame: dict) -> None:
        __tracebackhide__ = True  # noqa: F841 - a KeyboardInterrupt may surface here: not the user's code
        with whole_frames(), self._lock:
            self._seq += 1
            frame = {**frame, "seq": self._seq}
            if frame.get("type") in self._ACKED:
                frame["ack"] = self.in_seq
            try:
                data = protocol.encode(frame)
            except protocol.FrameError as err:
                data = protocol.encode({"type": "stream", "id": frame.get("id"), "name": "stderr", "seq": self._seq,
                                        "text": f"[sandbox] output dropped: {err}\n"})
            self._ring.append((self._seq, data))
            self._ring_bytes += len(data)
            while self._ring_bytes > self.BUFFER_LIMIT and len(self._ring) > 1:
                self._forgotten, old = self._ring.popleft()
                self._ring_bytes -= len(old)
            if self._conn is not None and not self._holding:
                self._deliver(self._seq, data)

    def _write(self, data: bytes) -> None:  # frames without a seq (the greeting, notes)
        if self._conn is not None:
            try:
                self._conn.sendall(data)
            except OSError:
                self._conn = None

    def _deliver(self, seq: int, data: bytes) -> None:
        __tracebackhide__ = True  # noqa: F841 - a KeyboardInterrupt may surface here: not the user's code
        try:
            self._conn.sendall(data)
            self._written = max(self._written, seq)
        except OSError:
            self._conn = None

    def resume(self, conn: socket.socket, since: int | None) -> None:
        """Replay kept frames after ``since`` (None: after the last one ever written)."""
        with self._lock:
            if self._conn is not conn or not self._holding:
                return
            self._holding = False
            after = self._written if since is None else since
            if self._forgotten > after:
                lost = self._forgotten - after
                self._write(protocol.encode({"type": "stream", "id": None, "name": "stderr",
                                             "text": f"[sandbox] {lost} output frames were dropped while detached\n"}))
            for seq, data in list(self._ring):
                if seq > after and self._conn is conn:
                    self._deliver(seq, data)

    def serve(self, on_frame, on_hello) -> None:
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self._path)
        os.chmod(self._path, 0o600)
        server.listen(1)
        server.settimeout(self.orphan_exit if self.orphan_exit > 0 else None)
        while True:
            try:
                conn, _ = server.accept()
            except socket.timeout:
                os.write(self._log_fd, f"sandbox agent: no client attached for {self.orphan_exit:g} s "
                            "(its kernel is gone): exiting\n".encode())
                os._exit(0)
            conn.settimeout(None)
            with self._lock:
                if self._conn is not None:
                    try:
                        self._conn.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                self._conn, self._holding = conn, True
                self._write(protocol.encode(on_hello()))
            timer = threading.Timer(self.RESUME_WAIT, self.resume, (conn, None))
            timer.daemon = True
            timer.start()

            def first(frame: dict, conn=conn, timer=timer) -> None:
                timer.cancel()
                if frame.get("type") == "resume":
                    client, since = frame.get("client"), frame.get("since")
                    if client is None or client != self._client:
                        self._client, self.in_seq = client, 0
                    ok = isinstance(since, int) and not isinstance(since, bool) and client is not None
                    self.resume(conn, since if ok else None)
                    return
                self.resume(conn, None)
                on_frame(frame)

            _read_frames(conn.makefile("rb", buffering=1 << 16), on_frame, self, first)
            timer.cancel()
            with self._lock:
                if self._conn is conn:
                    self._conn = None
            conn.close()


def _read_frames(stream, on_frame, channel: Channel, first: Callable[[dict], None] | None = None) -> None:
    """Pass each valid frame to ``on_frame`` (the first to ``first`` when given); resent
    duplicates (a ``seq`` not above the channel's ``in_seq``) and ``resume`` frames after the
    first are dropped."""
    while True:
        try:
            line = stream.readline(protocol.MAX_FRAME + 1)
        except OSError:  # the client reset the connection (a cut exec stream): wait for the next
            return
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
        seq = frame.get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool) and hasattr(channel, "in_seq"):
            if seq <= channel.in_seq:
                continue
            channel.in_seq = seq
        if first is not None:
            first, handler = None, first
            handler(frame)
        elif frame["type"] != "resume":
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
