"""Entries that expire: ``%sandbox allow ENTRY… --for 10m``.

A timed grant is an ordinary entry of the policy in force plus an expiry time kept here,
in the kernel process (the sandbox cannot see or change it). When the time comes the
kernel applies the policy without the expired entries, through the same atomic path as
every other change, and tells the notebook: in the cell that is running, or at the start
of the next one. An entry allowed again without ``--for`` becomes permanent; one revoked
by hand drops its grant.

In hub mode the sandbox service keeps the clock (``Sandbox.timed``, hub/access.py): the
kernel sends the duration with the change (:meth:`Grants.commit`), the service removes the
entries when their time comes — also across kernel and service restarts — and tells the
kernel (a ``hub_access`` frame), which then only shows what the service says
(:meth:`Grants.follow_service`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .errors import SandboxError
from .policy.model import Entry, parse_entry

if TYPE_CHECKING:
    from .controls import Controls

#: the longest a timed grant may run (a week): beyond that, allow the entry for good
MAX_SECONDS = 7 * 86400


def format_left(seconds: float) -> str:
    """``1 h 05 min``, ``4 min 10 s``, ``12 s``."""
    seconds = max(0, int(round(seconds)))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


@dataclass
class Grant:
    entry: Entry
    seconds: float  # as asked for
    expires: float  # time.monotonic()
    expires_wall: float  # time.time(), for display


class Grants:
    """The kernel's timed entries and the one timer that ends them (owned by the controls)."""

    def __init__(self, controls: Controls, clock: Callable[[], float] = time.monotonic):
        self.controls = controls
        self.clock = clock
        self._grants: dict[Entry, Grant] = {}
        self._timer: asyncio.TimerHandle | None = None
        #: lines for the notebook that no cell has shown yet
        self.pending: list[str] = []
        #: hub mode: the service ends the entries; this only mirrors its clock
        self.service_clock = bool(getattr(controls.backend, "enforces_ceiling", False))

    # -- what the magics and status read ---------------------------------------------
    def left(self, entry: Entry) -> float | None:
        grant = self._grants.get(entry)
        return None if grant is None else max(0.0, grant.expires - self.clock())

    def describe(self, entry: Entry) -> str:
        left = self.left(entry)
        return str(entry) if left is None else f"{entry} (expires in {format_left(left)})"

    def __len__(self) -> int:
        return len(self._grants)

    # -- changes ------------------------------------------------------------------
    def add(self, entries: list[Entry], seconds: float) -> None:
        """Start (or restart) the clock of ``entries``; call after they were applied."""
        now, wall = self.clock(), time.time()
        for entry in entries:
            self._grants[entry] = Grant(entry, seconds, now + seconds, wall + seconds)
        self._schedule()

    async def commit(self, entries: list[Entry], seconds: float | None) -> None:
        """After ``%sandbox allow`` applied ``entries``: start their clock (``seconds``) or,
        with None, make them permanent. In hub mode the service is told and keeps the clock."""
        if not self.service_clock:
            if seconds is None:
                self.make_permanent(entries)
            else:
                self.add(entries, seconds)
            return
        clocks = {str(e): seconds for e in entries if seconds is not None or self.left(e) is not None}
        if clocks:
            timed = await self.controls.backend.set_timed(clocks)
            self.follow_service(self.controls.policy, timed)

    def follow_service(self, policy, timed: dict) -> None:
        """Hub mode: the service's clocks (entry -> wall-clock end) replace the kernel's."""
        now, wall = self.clock(), time.time()
        grants: dict[Entry, Grant] = {}
        for text, end in timed.items():
            try:
                entry = parse_entry(text)
            except SandboxError:
                continue
            if entry in policy.entries and isinstance(end, (int, float)):
                old = self._grants.get(entry)
                grants[entry] = Grant(entry, old.seconds if old else max(0.0, end - wall), now + (end - wall), end)
        self._grants = grants

    def make_permanent(self, entries: list[Entry]) -> None:
        for entry in entries:
            self._grants.pop(entry, None)
        self._schedule()

    def policy_changed(self, policy) -> None:
        """Forget grants whose entry is no longer in force (revoked, mode changed by hand)."""
        present = set(policy.entries)
        for entry in [e for e in self._grants if e not in present]:
            del self._grants[entry]
        self._schedule()

    # -- expiry -------------------------------------------------------------------
    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._grants or self.service_clock:
            return
        first = min(g.expires for g in self._grants.values())
        loop = asyncio.get_event_loop()
        self._timer = loop.call_later(max(0.0, first - self.clock()),
                                      lambda: asyncio.ensure_future(self.expire_due()))

    async def expire_due(self) -> list[Entry]:
        """Remove every grant whose time has come from the policy in force; tell the notebook."""
        now = self.clock()
        due = [g for g in self._grants.values() if g.expires <= now]
        if not due:
            self._schedule()
            return []
        policy = self.controls.policy
        gone = [g.entry for g in due if g.entry in policy.entries]
        for grant in due:
            del self._grants[grant.entry]
        if gone:
            try:
                text = await self.controls.apply(policy.with_entries_removed(*gone), who="expiry")
            except SandboxError as err:
                # the old policy stays in force (atomic apply): try again shortly, and say so
                for entry in gone:
                    self._grants[entry] = Grant(entry, 0, self.clock() + 5, time.time() + 5)
                self.tell(f"[sandbox] could not end the timed access to {', '.join(map(str, gone))}: "
                          f"{err}; trying again in 5 s")
                self._schedule()
                return []
            self.tell(f"[sandbox] timed access ended: {', '.join(map(str, gone))} "
                      f"({'; '.join(f'allowed for {format_left(g.seconds)}' for g in due if g.entry in gone)}) · "
                      + text.split(" · ")[0])
        self._schedule()
        return gone

    def tell(self, line: str) -> None:
        """Show ``line`` in the running cell, or keep it for the next one."""
        if not self.controls.say(line):
            self.pending.append(line)

    def take_pending(self) -> list[str]:
        lines, self.pending = self.pending, []
        return lines

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
