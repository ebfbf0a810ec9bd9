"""The input history of one kernel: what ``history_request`` answers (console up-arrow, %history).

Kept in the kernel process, not in the sandbox, so a sandbox restart or crash loses none of
it; not written to disk, because cells may hold secrets and the kernel may serve a user whose
files it should not leave traces in. One kernel process is one history *session* (numbered
:data:`SESSION`); line numbers are the cells' execution counts, as in ipykernel.

Called by :meth:`SandboxKernel.do_history` (reads) and after each stored cell (writes).
"""

from __future__ import annotations

import collections
import fnmatch
import re
from dataclasses import dataclass

#: this kernel's one session; ipykernel's session 0 ("the current one") means it too
SESSION = 1
#: a cell's output kept for ``output=True`` requests: its result's text/plain, up to this size
OUTPUT_LIMIT = 64 * 1024


@dataclass(frozen=True)
class HistoryEntry:
    line: int
    source: str
    output: str | None

    def row(self, output: bool) -> tuple:
        """The wire form: ``(session, line, input)`` or ``(session, line, (input, output))``."""
        return (SESSION, self.line, (self.source, self.output) if output else self.source)


class CellHistory:
    """The cells this kernel ran with ``store_history``, oldest first (at most ``limit``)."""

    def __init__(self, limit: int = 10_000):
        self._entries: collections.deque[HistoryEntry] = collections.deque(maxlen=limit)

    def __len__(self) -> int:
        return len(self._entries)

    def record(self, line: int, source: str, output: str | None = None) -> None:
        if output is not None and len(output) > OUTPUT_LIMIT:
            output = None
        self._entries.append(HistoryEntry(line, source, output))

    def tail(self, n: int | None, output: bool = False) -> list[tuple]:
        """The last ``n`` cells (all of them when ``n`` is None), the latest included."""
        entries = list(self._entries)
        if n is not None:
            entries = entries[-n:] if n > 0 else []
        return [e.row(output) for e in entries]

    def range(self, session: int | None, start: int | None, stop: int | None, output: bool = False) -> list[tuple]:
        """Lines ``start <= line < stop`` of ``session`` (0, None or negative: this one)."""
        if session not in (None, 0, SESSION):
            return []  # an earlier session (negative: relative to this one): this kernel has one
        start = start or 0
        return [e.row(output) for e in self._entries
                if e.line >= start and (stop is None or e.line < stop)]

    def search(self, pattern: str | None, n: int | None = None, unique: bool = False,
               output: bool = False) -> list[tuple]:
        """Cells matching the glob ``pattern`` (``*`` and ``?``, case-sensitive, whole input),
        oldest first; the last ``n`` of them; with ``unique``, each input once (its latest run)."""
        match = re.compile(fnmatch.translate(pattern if pattern else "*"), re.S).match
        found = [e for e in self._entries if match(e.source)]
        if unique:
            latest = {e.source: e for e in found}
            found = sorted(latest.values(), key=lambda e: e.line)
        if n is not None:
            found = found[-n:] if n > 0 else []
        return [e.row(output) for e in found]
