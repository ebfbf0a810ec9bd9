"""Controls: the sandbox's controls, between the kernel and its UI.

One object per kernel holds the policy in force and the administrator's ceiling, changes the
policy (:meth:`Controls.set_policy`: the ceiling, then an atomic apply), says the status, keeps
the recently blocked connections, and owns the timed grants (grants.py), learn mode
(learn.py) and, in hub mode, the requests for access (access.py). The ``%sandbox`` magics (magics.py), the policy panel (widgets.py) and the learn
view (learnview.py) take this object, never the kernel; they hear of changes as
:class:`ControlsObserver`\\ s. The kernel (kernel.py) builds it, binds the Session, and tells it
when a cell starts and ends and what was blocked.

Imports go one way: kernel → magics → widgets → learnview → views → controls → access, grants,
learn, policy (tests/test_layers.py).
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import time
import weakref
from typing import TYPE_CHECKING, Callable

from .access import AccessRequests
from .errors import SandboxError
from .grants import Grants, format_left
from .learn import Learner
from .policy.admin import AdminPolicy, agent_view

if TYPE_CHECKING:
    from .backends.base import Backend
    from .notices import BlockedConnection
    from .policy.model import EgressPolicy, Entry
    from .session import Session

#: how many blocked connections ``%sandbox blocked`` and a new panel can show
RECENT_BLOCKED = 200


class ControlsObserver:
    """A view of the controls (the policy panel, the learn view). Subscribed with
    :meth:`Controls.subscribe` (held weakly: a view nobody shows goes away); each method is
    called on the kernel's event loop and does nothing unless a view overrides it."""

    def policy_changed(self) -> None:
        """The policy in force changed (any path: magic, panel, expiry, the hub service)."""

    def blocked_added(self, conn: BlockedConnection) -> None:
        """A blocked connection was added to the running cell's notices."""

    def cell_ended(self) -> None:
        """The running cell ends: show what is queued now."""

    def learn_changed(self) -> None:
        """Learn mode started or stopped, or saw a new destination."""

    def access_changed(self) -> None:
        """Hub mode: a request for access was sent, or the service said something about one
        (granted, denied, a grant or a timed entry ended)."""


class Controls:
    """The policy in force, the ceiling, the status, the blocked history, and who to tell."""

    def __init__(self, admin: AdminPolicy, policy: EgressPolicy, backend: Backend, *, log,
                 say: Callable[[str], bool] | None = None):
        #: the administrator's ceiling (in hub mode: the sandbox service's, see adopt_service_ceiling)
        self.admin = admin
        #: the policy in force; changed only by set_policy (and by the hub service)
        self.policy = policy
        self.backend = backend
        self.log = log
        #: writes a line in the running cell; False when no cell runs (kernel.show_in_running_cell)
        self.say = say or (lambda line: False)
        #: the Session (bound by the kernel once built: it needs agent_view from here)
        self.session: Session | None = None
        #: when the policy in force was applied (time.time(); None: at the sandbox's start)
        self.applied_at: float | None = None
        #: execution count of the running cell; None while no cell runs
        self.cell: int | None = None
        #: blocked connections, newest last (``%sandbox blocked``, a new panel's rows)
        self.recent_blocked: collections.deque[BlockedConnection] = collections.deque(maxlen=RECENT_BLOCKED)
        self._lock = asyncio.Lock()
        self._observers: weakref.WeakSet[ControlsObserver] = weakref.WeakSet()
        self.grants = Grants(self)
        self.learner = Learner(self)
        #: hub mode: requests for access to the administrator (``%sandbox request``, access.py)
        self.access = AccessRequests(self)

    def bind(self, session: Session) -> None:
        self.session = session

    # -- observers ----------------------------------------------------------------------
    def subscribe(self, observer: ControlsObserver) -> None:
        self._observers.add(observer)

    def _each(self) -> list[ControlsObserver]:
        return list(self._observers)

    def learn_changed(self) -> None:
        """Called by the learner."""
        for observer in self._each():
            observer.learn_changed()

    def access_changed(self) -> None:
        """Called by the requests for access (access.py)."""
        for observer in self._each():
            observer.access_changed()

    # -- what the kernel tells ------------------------------------------------------------
    def remember_blocked(self, conn: BlockedConnection) -> None:
        """Keep a new blocked connection for ``%sandbox blocked`` and new panels."""
        self.recent_blocked.append(conn)

    def show_blocked(self, conn: BlockedConnection) -> None:
        """Add a blocked connection of the running cell to every view (batched there)."""
        for observer in self._each():
            observer.blocked_added(conn)

    def cell_ended(self) -> None:
        for observer in self._each():
            observer.cell_ended()

    def agent_view(self, policy) -> dict:
        """What the agent's guard needs to know about ``policy`` (plain JSON)."""
        return self.learner.agent_view(agent_view(policy, self.admin, self.backend.applied))

    def adopt_service_ceiling(self) -> None:
        """Hub mode: the service's ceiling for this user is the one that counts (it enforces
        it server side); the kernel shows it and follows policies the service forces."""
        try:
            self.admin = AdminPolicy(parent=None, **self.backend.fetch_ceiling())
            self.policy = self.admin.default_policy()
            self.session.policy = self.policy
        except SandboxError as err:
            self.log.warning("could not read the ceiling from the sandbox service: %s", err)
        self.backend.on_policy_forced = self._forced
        self.backend.on_access = self.access.on_frame

    def _forced(self, policy, reason) -> None:
        self.policy = policy
        self.session.policy = policy
        self._policy_changed()

    # -- the policy: one source of truth, changed only here -----------------------------
    async def set_policy(self, new: EgressPolicy, who: str = "user") -> dict:
        """Check ``new`` against the administrator's ceiling, enforce it, make it current.

        Called by the ``%sandbox`` magics, the panels, learn mode and timed grants (and
        tests). Atomic: on any error (ceiling refused, bad rules, enforcer failure) the old
        policy stays in force and is still :attr:`policy`; the error propagates, typed.
        """
        async with self._lock:
            old = self.policy
            if not self.backend.enforces_ceiling:
                self.admin.check_change(old, new, who=who)
            # else (hub mode) the sandbox service decides, and audits the refusal with its reason
            await self.session.ready()
            details = await self.session.apply_policy(new)
            self.policy = new
            self.applied_at = details.get("applied_at")
            self.grants.policy_changed(new)
        self._policy_changed()
        return details

    def _policy_changed(self) -> None:
        for observer in self._each():
            observer.policy_changed()

    def policy_changed(self) -> None:
        """Tell the views the policy changed (the hub service changed it: access.py)."""
        self._policy_changed()

    async def apply(self, new: EgressPolicy, who: str = "user") -> str:
        """:meth:`set_policy`, then what is in force and how long enforcing it took."""
        started = time.monotonic()
        details = await self.set_policy(new, who=who)
        return in_force(self.policy, details, time.monotonic() - started)

    async def allow(self, entries: list[Entry], seconds: float | None = None) -> str:
        """Allow ``entries`` (a default-deny policy becomes an allowlist): for good, or for
        ``seconds``. The path of ``%sandbox allow`` and of the panel's Allow buttons."""
        before = self.policy
        # an entry already allowed for good stays so: a time limit does not shorten it
        permanent = [e for e in entries if e in before.entries and self.grants.left(e) is None]
        new = before.with_entries_added(*entries)
        if new.mode != "allowlist":
            new = new.with_mode("allowlist")
        text = await self.apply(new)
        if seconds is None:
            await self.grants.commit(entries, None)
            return text
        timed = [e for e in entries if e not in permanent]
        await self.grants.commit(timed, seconds)  # in hub mode: on the sandbox service's clock
        if timed:
            text += f" · {', '.join(map(str, timed))} for {format_left(seconds)}"
        if permanent:
            text += f" · already allowed without a time limit: {', '.join(map(str, permanent))}"
        return text

    async def reapply(self, *, enforcer: bool) -> None:
        """Put the same policy in force again (learn mode changes how it is compiled or what
        the guard reports): in the enforcer, or only in the agent's view of it."""
        if self.session.info is None:
            return  # the sandbox starts with the backend's setting
        if not enforcer:
            await self.session.tell_policy()
            return
        async with self._lock:
            await self.session.apply_policy(self.policy)

    async def restart(self) -> None:
        """A fresh sandbox under the same policy."""
        await self.session.restart()

    # -- reading ----------------------------------------------------------------------------
    def enforcement(self) -> tuple[str | None, float | None]:
        """Which enforcer holds the policy in force, and since when (None: at start)."""
        applied = self.backend.applied
        return applied.get("enforcer"), self.applied_at or applied.get("applied_at")

    def status(self) -> list[tuple[str, str]]:
        """``%sandbox status``: (name, value) rows."""
        info = self.session.info if self.session is not None else None
        enforcer, when = self.enforcement()
        return [
            ("backend", self.backend.name),
            ("sandbox", describe_sandbox(info) if info else "not running (starts with the next cell)"),
            ("policy", self.policy.describe()),
            ("entries", ", ".join(self.grants.describe(e) for e in self.policy.entries) or "none"),
            ("presets", ", ".join(self.policy.presets) or "none"),
            ("enforcer", enforcer if enforcer is not None else "—"),
            ("applied", clock(when)),
            ("changes", "locked by your administrator (exam mode)" if self.admin.locked
             else "allowed within your administrator's limits"),
            ("recent blocked", str(len(self.recent_blocked))),
            ("learn mode", self.learner.status()),
        ]


def in_force(policy, details: dict, seconds: float) -> str:
    """``egress now: allowlist (1 entry): pypi.org:443 · enforced by nftables in 9 ms``."""
    entries = [*(f"preset {p}" for p in policy.presets), *(str(e) for e in policy.entries)]
    text = f"egress now: {policy.describe()}"
    if policy.mode == "allowlist" and entries:
        text += ": " + ", ".join(entries)
    return text + f" · enforced by {details.get('enforcer', 'the backend')} in {seconds * 1000:.0f} ms"


def describe_sandbox(info) -> str:
    details = ", ".join(f"{k} {v}" for k, v in info.details.items() if k in ("netns", "namespace", "pod"))
    return f"{info.sandbox_id}" + (f" ({details})" if details else "")


def clock(ts: float | None) -> str:
    """``14:03:27`` (local time), or ``—``."""
    if not ts:
        return "—"
    return datetime.datetime.fromtimestamp(ts).strftime("%H:%M:%S")


__all__ = ["Controls", "ControlsObserver", "clock", "describe_sandbox", "in_force"]
