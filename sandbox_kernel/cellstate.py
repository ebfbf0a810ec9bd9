"""What the kernel keeps about the cell that runs now: its output budget, its notices, the
error held for the footer. One :class:`CellState` per ``execute_request``, dropped when the
cell ends; the kernel (kernel.py) is its only writer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from .notices import BlockedConnection, NoticeBoard


@dataclass(eq=False)
class CellState:
    """The running cell's output state."""

    board: NoticeBoard
    silent: bool = False
    allow_stdin: bool = False
    #: the shell request this cell answers (the parent of output sent from timers)
    parent: dict = field(default_factory=dict)
    #: an error held until the cell ends, so that the footer can be its last line
    error: dict | None = None
    #: the execute_result's text/plain (kept in the input history for ``output=True``)
    result_text: str | None = None

    # -- output within c.SandboxKernel.output_limit ------------------------------------
    out_bytes: int = 0
    #: bytes not shown past the limit
    dropped: int = 0
    #: the "output limit reached" line was shown
    truncated: bool = False
    #: the screening notes already said in this cell (each once)
    screen_notes: set = field(default_factory=set)

    # -- notices --------------------------------------------------------------------
    #: bytes of notice updates sent (against c.SandboxKernel.notice_bytes_limit)
    notice_bytes: int = 0
    #: the timer of the next notice update
    flush: asyncio.TimerHandle | None = None
    #: the sandbox cleared its output: show the notices again
    cleared: bool = False
    #: reported by the sandbox, waiting for the next update (display id -> connection)
    unshown: dict[str, BlockedConnection] = field(default_factory=dict)
    #: counts went up since they were shown (display id -> connection)
    dirty: dict[str, BlockedConnection] = field(default_factory=dict)
    #: the "and N more" line has been shown once (later: updated)
    more_shown: bool = False

    # -- what the reply's metadata["sandbox"] says ---------------------------------------
    #: false end-of-cell frames the sandbox wrote during this cell
    forged_done: int = 0
    #: an earlier cell's real end arrived during this one
    late_end: bool = False

    def take_error(self) -> dict | None:
        error, self.error = self.error, None
        return error

    def take_unshown(self) -> list[BlockedConnection]:
        conns, self.unshown = list(self.unshown.values()), {}
        return conns

    def take_dirty(self) -> list[BlockedConnection]:
        conns, self.dirty = list(self.dirty.values()), {}
        return conns

    def cancel_flush(self) -> None:
        if self.flush is not None:
            self.flush.cancel()
            self.flush = None
