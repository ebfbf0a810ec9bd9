"""A cell's output: ``sys.stdout``/``sys.stderr`` and what is written to file descriptors 1 and 2.

Runs inside the sandbox, standard library only. Nothing here knows the protocol's frames:
each piece is handed the function that sends a chunk of text (``send(name, text)``).

Threads: a flusher thread sends buffered ``print`` output at least every
:data:`FLUSH_INTERVAL` seconds; a capture thread forwards what anything writes to fds 1
and 2 (subprocesses, C code).
"""

from __future__ import annotations

import codecs
import errno
import fcntl
import io
import os
import select
import signal
import threading
import time
from typing import Callable

from . import protocol

FLUSH_INTERVAL = 0.02

#: ``send(name, text)``: sends one chunk of a stream ("stdout" or "stderr")
SendText = Callable[[str, str], None]


def quiet_thread() -> None:
    """Keep SIGINT for the main thread, where the running cell is (call it first in a thread)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


class Flusher(threading.Thread):
    """Sends the buffered output of its streams shortly after it was written."""

    def __init__(self):
        super().__init__(name="sandbox-flusher", daemon=True)
        self.streams: list[OutStream] = []
        self._event = threading.Event()

    def poke(self) -> None:
        if not self._event.is_set():
            self._event.set()

    def run(self) -> None:
        quiet_thread()
        while True:
            self._event.wait()
            time.sleep(FLUSH_INTERVAL)
            self._event.clear()
            for stream in self.streams:
                stream.flush()


class OutStream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` for cells: buffered, flushed by size or by its flusher."""

    def __init__(self, name: str, fd: int, send: SendText, flusher: Flusher):
        super().__init__()
        self.name = name
        self._fd = fd
        self._send = send
        self._flusher = flusher
        self._buf: list[str] = []
        self._size = 0
        self._lock = threading.Lock()
        flusher.streams.append(self)

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
        self._flusher.poke()
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
            self._send(self.name, text[start : start + protocol.STREAM_CHUNK])


class FdCapture(threading.Thread):
    """Forwards whatever is written to fds 1 and 2 (subprocesses, C code) as stream text.

    Creating it points fds 1 and 2 at fresh pipes; the thread reads them."""

    def __init__(self, send: SendText):
        super().__init__(name="sandbox-fd-capture", daemon=True)
        self._send = send
        self.lock = threading.Lock()
        self._fds: dict[int, tuple[str, codecs.IncrementalDecoder]] = {}
        for target, name in ((1, "stdout"), (2, "stderr")):
            r, w = os.pipe()
            os.dup2(w, target)
            os.close(w)
            fcntl.fcntl(r, fcntl.F_SETFL, fcntl.fcntl(r, fcntl.F_GETFL) | os.O_NONBLOCK)
            self._fds[r] = (name, codecs.getincrementaldecoder("utf-8")("replace"))

    def run(self) -> None:
        quiet_thread()
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
            self._send(name, text)
        return True
