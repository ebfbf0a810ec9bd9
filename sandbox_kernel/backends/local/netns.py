"""Run a function inside a network namespace (to create sockets that live there).

``setns`` changes the namespace of the calling thread only, so the function runs in a
short-lived thread of its own; a socket created there stays in that namespace when the
thread ends, and the kernel's event loop can serve it from the host side.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Callable, TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(netns_path: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a thread that has entered the namespace at ``netns_path``."""
    box: dict = {}

    def run() -> None:
        try:
            _setns(netns_path)
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = err

    thread = threading.Thread(target=run, name="netns-call")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]
