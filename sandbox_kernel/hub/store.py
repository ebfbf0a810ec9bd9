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
    """``state.json``: ceilings (per user, per group), users' last known groups, sandboxes,
    requests for access and grants."""

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
    return {"version": STATE_VERSION, "ceilings": {"users": {}, "groups": {}}, "groups": {}, "sandboxes": {},
            "requests": {}, "grants": {}}


#: the longest string an audit record keeps of any field (the rest is summarised)
AUDIT_STRING_MAX = 300
#: the most items of a list an audit record keeps
AUDIT_LIST_MAX = 50
#: the longest audit line; a record still longer keeps only its short top-level fields
AUDIT_LINE_MAX = 8192


def bounded(value: Any, depth: int = 0) -> Any:
    """``value`` with long strings cut (their length said), long lists shortened and deep
    nesting replaced by a summary: what a refused request put in a field reaches the audit
    log (and the service's log) as a bounded summary, never verbatim."""
    if isinstance(value, str):
        if len(value) <= AUDIT_STRING_MAX:
            return value
        return f"{value[:AUDIT_STRING_MAX - 60]}… ({len(value)} characters, cut)"
    if depth >= 4 and isinstance(value, (dict, list, tuple)):
        return f"({type(value).__name__} nested too deep, left out)"
    if isinstance(value, dict):
        items = list(value.items())
        out = {str(k)[:AUDIT_STRING_MAX]: bounded(v, depth + 1) for k, v in items[:AUDIT_LIST_MAX]}
        if len(items) > AUDIT_LIST_MAX:
            out["…"] = f"{len(items) - AUDIT_LIST_MAX} more keys left out"
        return out
    if isinstance(value, (list, tuple)):
        out = [bounded(v, depth + 1) for v in value[:AUDIT_LIST_MAX]]
        if len(value) > AUDIT_LIST_MAX:
            out.append(f"… {len(value) - AUDIT_LIST_MAX} more items left out")
        return out
    return value


class AuditLog:
    """Appends one JSON object per event to ``audit.jsonl`` (bounded, see :func:`bounded`) and
    logs it to the service's log; rotates the file at ``max_bytes`` keeping ``backups`` older
    files (``audit.jsonl.1`` the newest of them). Reading (:meth:`tail`) takes the newest
    records from the end of the files, skips lines that are not JSON objects and counts them;
    it blocks, so the service runs it in a thread."""

    def __init__(self, path: str | Path, log: logging.Logger | None = None,
                 max_bytes: int = 10 * 1024 * 1024, backups: int = 5):
        self.path = Path(path)
        self.log = log or logging.getLogger("sandbox_kernel.hub.audit")
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = bounded({"time": time.time(), "event": event, **fields})
        line = json.dumps(record, sort_keys=True, default=str)
        if len(line) > AUDIT_LINE_MAX:
            short = {k: v for k, v in record.items() if isinstance(v, (int, float, bool, type(None)))
                     or (isinstance(v, str) and len(v) <= 200)}
            line = json.dumps({**short, "cut": f"{len(line)} characters of fields left out"}, sort_keys=True)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = (line + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size and self.max_bytes > 0 and size + len(data) > self.max_bytes:
                    os.close(fd)
                    fd = -1
                    self._rotate()
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
                    size = 0
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # a line cut short (a full disk, a crash): end it first
                os.write(fd, data)
            finally:
                if fd >= 0:
                    os.close(fd)
        self.log.info("audit %s", line)
        return record

    def _rotate(self) -> None:
        """audit.jsonl → .1 → .2 … (the oldest beyond ``backups`` is removed)."""
        if self.backups <= 0:
            self.path.unlink(missing_ok=True)
            return
        oldest = self.path.with_name(f"{self.path.name}.{self.backups}")
        oldest.unlink(missing_ok=True)
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def files(self) -> list[Path]:
        """The log's files, newest first."""
        rotated = [self.path.with_name(f"{self.path.name}.{i}") for i in range(1, max(self.backups, 0) + 1)]
        return [f for f in (self.path, *rotated) if f.exists()]

    def tail(self, limit: int = 1000, user: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """The newest ``limit`` records (of ``user``: as owner or as ``by``), oldest first, and
        how many unreadable lines were skipped on the way. Reads the files backwards in
        blocks, so its cost follows ``limit``, not the size of the log. Blocking."""
        found: list[dict[str, Any]] = []
        skipped = 0
        needle = json.dumps(user) if user else None
        for path in self.files():
            for line in _lines_backwards(path):
                if needle is not None and needle.encode() not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    skipped += 1
                    continue
                if user and user not in (record.get("user"), record.get("by")):
                    continue
                found.append(record)
                if len(found) >= limit:
                    return found[::-1], skipped
        return found[::-1], skipped

    def read(self) -> list[dict[str, Any]]:
        """Every record of the current file, oldest first (tests, small logs); bad lines skipped."""
        return self.tail(limit=10**9)[0]


def _lines_backwards(path: Path, block: int = 64 * 1024):
    """The non-empty lines of a file, last first, read in blocks from its end."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        f.seek(0, os.SEEK_END)
        pos = f.tell()
        rest = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step) + rest
            lines = chunk.split(b"\n")
            rest = lines[0]
            for line in reversed(lines[1:]):
                if line.strip():
                    yield line
        if rest.strip():
            yield rest
