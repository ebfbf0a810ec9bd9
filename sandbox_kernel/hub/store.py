"""The service's durable state (one JSON file) and its audit log (JSON lines).

Both live in the service's state directory, readable by the service's user only. The state
file is replaced atomically (write, fsync, rename), so a crash leaves the old or the new
state, never half of one. The audit log is append-only; each line is one event.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

STATE_VERSION = 1


class StateFile:
    """``state.json``: ceilings (per user, per group), users' last known groups, sandboxes."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.path = self.dir / "state.json"
        self._lock = threading.Lock()

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return empty_state()
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise ValueError(f"{self.path}: not a sandbox service state file of version {STATE_VERSION}")
        state = empty_state()
        state.update(data)
        return state

    def save(self, state: dict[str, Any]) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = json.dumps({**state, "version": STATE_VERSION}, indent=1, sort_keys=True)
        with self._lock:
            tmp = self.path.with_suffix(f".tmp{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)


def empty_state() -> dict[str, Any]:
    return {"version": STATE_VERSION, "ceilings": {"users": {}, "groups": {}}, "groups": {}, "sandboxes": {}}


class AuditLog:
    """Appends one JSON object per event to ``audit.jsonl`` and logs it to the service's log."""

    def __init__(self, path: str | Path, log: logging.Logger | None = None):
        self.path = Path(path)
        self.log = log or logging.getLogger("sandbox_kernel.hub.audit")
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"time": time.time(), "event": event, **fields}
        line = json.dumps(record, sort_keys=True, default=str)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(line + "\n")
        self.log.info("audit %s", line)
        return record

    def read(self) -> list[dict[str, Any]]:
        try:
            return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        except FileNotFoundError:
            return []
