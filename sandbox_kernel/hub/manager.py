"""What the sandbox service does, without HTTP: sandboxes per user, ceilings, state, audit.

The :class:`Manager` is the only owner of backends in hub mode. It is called by the service's
handlers (service.py) after they have identified the caller with the hub; it never decides
who the caller is, only what the caller (a user name, maybe an admin) may do:

* a sandbox belongs to the user who created it; handlers look sandboxes up with
  :meth:`Manager.get` (owner checked) and never hand out another user's;
* every policy change goes through :meth:`Manager.apply_policy`, which checks the change
  against the owner's effective ceiling (the service's ``AdminPolicy`` with the admins'
  per-group and per-user overrides) before the backend enforces it: a refused change
  changes nothing and is audited;
* :meth:`Manager.set_ceiling` (admins only, checked by the handler) changes a user's or a
  group's ceiling and brings running sandboxes under it at once (exam mode resets them to
  the ceiling's default policy); a group's members are asked of the hub then
  (``group_source``, see groups.py) and on the service's schedule (:meth:`refresh_groups`),
  and whenever a user's groups change their running sandboxes are conformed too;
* everything durable (ceilings, users' groups, sandboxes and their policies) is in
  ``state.json`` and every change and refusal in ``audit.jsonl`` (store.py).
"""

from __future__ import annotations

import asyncio
import collections
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from traitlets import TraitError

from ..agent.protocol import ENFORCER_FRAME, POLICY_FRAME, BlockedRecord
from ..agentlink import AgentLink
from ..backends.base import Backend
from ..errors import PolicyError, SandboxError, SandboxStartError
from ..policy.admin import AdminPolicy, CeilingRefused, agent_view
from ..policy.model import EgressPolicy, parse_entry
from .access import MAX_GRANT_SECONDS, AccessDesk, policy_has
from .store import AuditLog, StateFile

#: AdminPolicy settings an admin may override per user or per group
CEILING_KEYS = ("mode", "entries", "presets", "locked", "user_may_allow", "max_entries")
#: AdminPolicy settings that only the service's configuration sets
BASE_ONLY_KEYS = ("always_blocked", "cluster_ranges")
#: frames a sandbox that nobody is attached to keeps for the next attach
BACKLOG = 2000
PROGRESS_LINES = 100

RUNNING = ("starting", "running")


class NotFound(SandboxError):
    """No such sandbox for this user (also what another user's sandbox looks like)."""

    ename = "NotFound"


class Forbidden(SandboxError):
    ename = "Forbidden"


class NotRunning(SandboxError):
    ename = "NotRunning"


class TooManySandboxes(SandboxError):
    """The user already has the most sandboxes (starting or running) one user may have."""

    ename = "TooManySandboxes"

    def __init__(self, message: str, limit: int, active: list[str]):
        super().__init__(message)
        self.limit, self.active = limit, active


@dataclass
class Sandbox:
    """One kernel's sandbox, owned by one hub user."""

    id: str
    user: str
    kernel_id: str
    backend_name: str
    policy: EgressPolicy
    state: str = "starting"  # starting | running | exited | stopped | failed
    created: float = field(default_factory=time.time)
    exit_reason: str | None = None
    exit_status: int | None = None
    details: dict = field(default_factory=dict)
    restarts: int = 0
    #: when the running agent was started: a kernel re-attaching after a dropped stream
    #: compares it to know whether its interpreter survived
    started: float | None = None
    #: when it stopped, failed or exited (records are dropped ``keep_stopped`` seconds later)
    ended: float | None = None
    #: the last time a ceiling change forced its policy: {"time", "by", "reason"}
    conformed: dict | None = None
    #: connections blocked so far (the admin page counts them without reading the audit log)
    blocked: int = 0
    #: entries the user allowed for a time (``%sandbox allow … --for``): entry -> wall-clock end;
    #: the service's clock removes them (access.AccessDesk.expire_due)
    timed: dict = field(default_factory=dict)
    # -- runtime only
    #: since when no kernel is attached (monotonic; None while one is)
    detached_since: float | None = None
    #: the backend's progress lines of the current (or last) start, for the kernel to show
    progress: collections.deque = field(default_factory=lambda: collections.deque(maxlen=PROGRESS_LINES))
    #: lines of this start so far, including those the deque no longer holds (the kernel
    #: follows by this count, so a long start's newest lines still reach it)
    progress_count: int = 0
    backend: Backend | None = None
    #: the link to the running agent (its greeting is what a subscriber gets first)
    link: AgentLink | None = None
    subscriber: Any = None
    backlog: collections.deque = field(default_factory=lambda: collections.deque(maxlen=BACKLOG))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def to_state(self) -> dict:
        return {"id": self.id, "user": self.user, "kernel_id": self.kernel_id, "backend": self.backend_name,
                "policy": self.policy.to_dict(), "state": self.state, "created": self.created,
                "exit_reason": self.exit_reason, "exit_status": self.exit_status,
                "details": jsonable(self.details), "restarts": self.restarts, "started": self.started,
                "ended": self.ended, "conformed": self.conformed, "blocked": self.blocked, "timed": self.timed}

    @classmethod
    def from_state(cls, data: dict) -> Sandbox:
        return cls(id=data["id"], user=data["user"], kernel_id=data["kernel_id"], backend_name=data["backend"],
                   policy=EgressPolicy.parse(data["policy"]), state=data.get("state", "stopped"),
                   created=data.get("created", time.time()), exit_reason=data.get("exit_reason"),
                   exit_status=data.get("exit_status"), details=data.get("details") or {},
                   restarts=data.get("restarts", 0), started=data.get("started"), ended=data.get("ended"),
                   conformed=data.get("conformed"), blocked=data.get("blocked") or 0,
                   timed={str(k): float(v) for k, v in (data.get("timed") or {}).items()})

    def public(self) -> dict:
        """What the owner sees (``GET api/sandboxes[/id]``)."""
        applied = self.backend.applied if self.backend is not None else None
        return {**self.to_state(), "policy_label": self.policy.describe(),
                "applied": jsonable(applied or {}), "attached": self.subscriber is not None,
                "progress": list(self.progress), "progress_count": self.progress_count}


class Manager:
    """Sandboxes, ceilings, durable state and the audit log of one sandbox service."""

    def __init__(self, state_dir: str, base: AdminPolicy, make_backend: Callable[[str, str], Backend],
                 backend_name: str, log, start_timeout: float = 120.0,
                 group_source: Callable[[str], Awaitable[list[str]]] | None = None,
                 max_per_user: int = 0):
        self.base = base
        #: most sandboxes (starting or running) one user may have; 0: no limit
        self.max_per_user = max_per_user
        #: ``async (group) -> member names``, the hub's answer (HubGroups.members); None: only
        #: what users' own requests say
        self.group_source = group_source
        #: the hub's latest answer per group (runtime): a user's own (cached, maybe older)
        #: identity cannot take a group away before the hub's list does
        self.group_members: dict[str, set[str]] = {}
        self.make_backend = make_backend
        self.backend_name = backend_name
        self.log = log
        self.start_timeout = start_timeout
        self.store = StateFile(state_dir)
        self.audit = AuditLog(self.store.dir / "audit.jsonl", log)
        state = self.store.load()
        self.ceilings: dict[str, dict[str, dict]] = state["ceilings"]
        self.user_groups: dict[str, list[str]] = state["groups"]
        self.sandboxes: dict[str, Sandbox] = {}
        for sid, data in state["sandboxes"].items():
            try:
                self.sandboxes[sid] = Sandbox.from_state(data)
            except (KeyError, PolicyError) as err:
                log.error("state.json: sandbox %s is unreadable and dropped: %s", sid, err)
        #: users' requests for access and the grants that answer them (access.py)
        self.access = AccessDesk(self, state)
        self.closing = False
        self._tasks: set[asyncio.Task] = set()

    def save(self) -> None:
        self.store.save({"ceilings": self.ceilings, "groups": self.user_groups,
                         "sandboxes": {sid: sb.to_state() for sid, sb in self.sandboxes.items()},
                         **self.access.to_state()})

    # -- ceilings -------------------------------------------------------------------
    def note_groups(self, user: str, groups: list[str]) -> bool:
        """Remember the user's hub groups (as the hub said on their last request), plus the
        groups the hub's group list last named them in. Returns whether they changed (the
        caller then conforms the user's sandboxes: :meth:`conform_users`)."""
        groups = sorted(set(groups) | {g for g, members in self.group_members.items() if user in members})
        if self.user_groups.get(user) != groups:
            self.user_groups[user] = groups
            self.save()
            return True
        return False

    async def set_group_members(self, group: str, members: list[str], by: str = "service",
                                conform: bool = True) -> list[str]:
        """The hub's list of ``group``'s members: every user is in the group exactly when
        listed. Running sandboxes of users who joined (or left) are conformed at once
        (unless ``conform`` is false: the caller does it); returns their ids."""
        members_set = set(members)
        self.group_members[group] = members_set
        changed = []
        for user in sorted(members_set | set(self.user_groups)):
            groups = set(self.user_groups.get(user, []))
            new = groups | {group} if user in members_set else groups - {group}
            if new != groups:
                self.user_groups[user] = sorted(new)
                changed.append((user, "joined" if user in members_set else "left"))
        if changed:
            self.save()
            self.log.info("group %s: %s", group, ", ".join(f"{u} {how}" for u, how in changed))
        conformed = []
        for user, how in changed if conform else ():
            conformed += await self.conform_users({user}, by, f"{user} {how} group {group}")
        return conformed

    async def refresh_groups(self) -> list[str]:
        """Ask the hub for the members of every group that has a ceiling (the service's
        schedule); returns the ids of sandboxes conformed. A group the hub will not list is
        logged and left as it was."""
        if self.group_source is None:
            return []
        conformed = []
        for group in sorted(self.ceilings["groups"]):
            try:
                members = await self.group_source(group)
            except SandboxError as err:
                self.log.warning("group %s: %s", group, err)
                continue
            conformed += await self.set_group_members(group, members)
        return conformed

    async def conform_users(self, users: set[str], by: str, why: str) -> list[str]:
        """Bring every running (or starting) sandbox of ``users`` under its owner's ceiling,
        all at once; returns the ids of those whose policy changed."""
        boxes = [sb for sb in list(self.sandboxes.values()) if sb.user in users and sb.state in RUNNING]
        done = await asyncio.gather(*(self._conform(sb, by, why) for sb in boxes))
        return [sb.id for sb, changed in zip(boxes, done) if changed]

    def ceiling_for(self, user: str) -> AdminPolicy:
        """The user's effective ceiling: the service's AdminPolicy, then each of the user's
        groups' overrides (group names in sorted order), then the user's own; ``locked`` by
        any of them locks. Grants in force for the user or their groups (access.py) add
        exactly their entries to ``user_may_allow``."""
        values = {key: getattr(self.base, key) for key in (*CEILING_KEYS, *BASE_ONLY_KEYS)}
        locked = values["locked"]
        groups = self.user_groups.get(user, [])
        layers = [self.ceilings["groups"].get(g) for g in groups]
        layers.append(self.ceilings["users"].get(user))
        for layer in layers:
            if layer:
                values.update(layer)
                locked = locked or bool(layer.get("locked"))
        values["locked"] = locked
        granted = self.access.granted_entries(user, groups)
        if granted:
            values["user_may_allow"] = [*values["user_may_allow"], *granted]
        return AdminPolicy(parent=None, **values)

    def ceiling_view(self, user: str) -> dict:
        ceiling = self.ceiling_for(user)
        return {key: getattr(ceiling, key) for key in (*CEILING_KEYS, *BASE_ONLY_KEYS)}

    async def set_ceiling(self, by: str, kind: str, name: str, overrides: dict | None) -> dict:
        """Set (or with ``None`` remove) the overrides of a user's or a group's ceiling.

        The caller must be an admin (checked by the handler). Raises PolicyError for an
        invalid ceiling (nothing changed). Running sandboxes of the users concerned are
        brought under the new ceiling at once; for a group, the hub is asked who its members
        are first (``group_source``), so members who sent no request yet are concerned too
        (when the hub cannot say, ``warning`` says why and the members known so far count)."""
        if kind not in ("users", "groups"):
            raise NotFound(f"no such ceiling kind {kind!r}")
        if overrides is not None:
            if not isinstance(overrides, dict):
                raise PolicyError("a ceiling is a JSON object of AdminPolicy settings")
            unknown = sorted(set(overrides) - set(CEILING_KEYS))
            if unknown:
                raise PolicyError(f"unknown or not overridable setting(s) {', '.join(unknown)}; "
                                  f"a ceiling may set {', '.join(CEILING_KEYS)}")
            try:
                AdminPolicy(parent=None, **overrides).default_policy()
            except (TraitError, PolicyError, ValueError) as err:
                self.audit.write("ceiling", by=by, target={kind[:-1]: name}, to=overrides,
                                 result="refused", reason=str(err))
                raise PolicyError(f"invalid ceiling: {err}") from None
        old = self.ceilings[kind].get(name)
        if overrides is None:
            self.ceilings[kind].pop(name, None)
        else:
            self.ceilings[kind][name] = dict(overrides)
        self.save()
        self.audit.write("ceiling", by=by, target={kind[:-1]: name}, **{"from": old}, to=overrides,
                         result="accepted")
        result: dict[str, Any] = {"ceiling": overrides}
        if kind == "groups" and self.group_source is not None:
            try:
                members = await self.group_source(name)
            except SandboxError as err:
                result["warning"] = str(err)
                self.log.warning("group %s: %s", name, err)
            else:
                await self.set_group_members(name, members, by, conform=False)  # all conformed below
        users = {name} if kind == "users" else {u for u, gs in self.user_groups.items() if name in gs}
        what = f"the ceiling of {kind[:-1]} {name} changed"
        result["conformed"] = await self.conform_users(users, by, what)
        if kind == "groups":
            result["members"] = sorted(users)
        return result

    async def _conform(self, sb: Sandbox, by: str, why: str = "ceiling changed") -> bool:
        """Bring ``sb``'s policy under its owner's ceiling: the ceiling's default policy
        replaces one the ceiling no longer permits. Returns whether it changed."""
        async with sb.lock:
            ceiling = self.ceiling_for(sb.user)
            target = ceiling.default_policy()
            try:
                ceiling.check_change(target, sb.policy)
                return False
            except CeilingRefused as err:
                reason = err.reason
            old = sb.policy
            if sb.state == "running" and sb.backend is not None:
                try:
                    await sb.backend.apply_policy(target)
                except SandboxError as err:
                    # cannot enforce the narrower policy: stop the sandbox rather than leave it wider
                    self.log.error("could not bring sandbox %s under the new ceiling (%s): stopping it", sb.id, err)
                    await self._halt(sb, "stopped")
                    reason += f"; enforcing it failed ({err}), so the sandbox was stopped"
            sb.policy = target
            sb.timed = {e: t for e, t in sb.timed.items() if policy_has(target, e)}
            sb.conformed = {"time": time.time(), "by": by, "reason": f"{why}: {reason}"}
            self.save()
            self.audit.write("policy", user=sb.user, by=by, sandbox=sb.id, kernel_id=sb.kernel_id,
                             **{"from": old.to_dict()}, to=target.to_dict(), result="accepted",
                             forced=True, reason=f"{why}: {reason}")
            self._tell_agent(sb)
            self._deliver(sb, {"type": POLICY_FRAME, "policy": target.to_dict(),
                               "reason": f"your administrator changed your ceiling: {reason}"})
            return True

    # -- sandboxes --------------------------------------------------------------------
    def get(self, user: str, sid: str) -> Sandbox:
        """The user's sandbox ``sid``; another user's sandbox is NotFound, like a missing one."""
        sb = self.sandboxes.get(sid)
        if sb is None or sb.user != user:
            raise NotFound(f"no sandbox {sid!r}")
        return sb

    def list(self, user: str) -> list[Sandbox]:
        return [sb for sb in self.sandboxes.values() if sb.user == user]

    def active(self, user: str) -> list[Sandbox]:
        """The user's sandboxes that are starting or running (what the per-user limit counts)."""
        return [sb for sb in self.list(user) if sb.state in RUNNING]

    def _check_limit(self, user: str, kernel_id: str, restarting: Sandbox | None) -> None:
        """Raise TooManySandboxes (audited) when starting one more would exceed max_per_user."""
        if self.max_per_user <= 0:
            return
        active = [sb for sb in self.active(user) if sb is not restarting]
        if len(active) < self.max_per_user:
            return
        reason = (f"{user} already has {len(active)} sandboxes starting or running, the most one user may "
                  f"have ({self.max_per_user}); shut down a kernel you no longer need and try again")
        self.audit.write("sandbox", user=user, by=user, sandbox=restarting.id if restarting else None,
                         kernel_id=kernel_id, action="start", result="refused", reason=reason,
                         active=[sb.id for sb in active])
        raise TooManySandboxes(reason, self.max_per_user, [sb.id for sb in active])

    async def create(self, user: str, kernel_id: str, requested: Any = None, wait: bool = True) -> Sandbox:
        """Start (or return the running) sandbox of the user's kernel ``kernel_id``.

        ``wait=False`` returns at once, the sandbox "starting": the caller follows its
        ``progress`` lines and ``state`` with GET (a failed start ends "failed" with
        ``exit_reason``).

        A kernel that starts its sandbox again (after a crash, a dropped stream or a service
        restart) gets its previous policy back. A new kernel gets the requested policy when
        the ceiling permits it (from the ceiling's default policy), else the default policy;
        either way it is audited."""
        if not isinstance(kernel_id, str) or not kernel_id or len(kernel_id) > 128:
            raise PolicyError("kernel_id must be a non-empty string of at most 128 characters")
        existing = next((sb for sb in self.list(user) if sb.kernel_id == kernel_id), None)
        if existing is None or existing.state not in RUNNING:
            self._check_limit(user, kernel_id, existing)
        if existing is None:
            ceiling = self.ceiling_for(user)
            policy = ceiling.default_policy()
            if requested is not None:
                wanted = EgressPolicy.parse(requested)
                try:
                    ceiling.check_change(policy, wanted)
                    if wanted != policy:
                        self.audit.write("policy", user=user, by=user, sandbox=None, kernel_id=kernel_id,
                                         **{"from": policy.to_dict()}, to=wanted.to_dict(),
                                         result="accepted", at="start")
                    policy = wanted
                except CeilingRefused as err:
                    self.audit.write("policy", user=user, by=user, sandbox=None, kernel_id=kernel_id,
                                     **{"from": policy.to_dict()}, to=wanted.to_dict(), result="refused",
                                     reason=err.reason, at="start")
            existing = Sandbox(id=secrets.token_hex(6), user=user, kernel_id=kernel_id,
                               backend_name=self.backend_name, policy=policy)
            self.sandboxes[existing.id] = existing
        if not wait:
            if not self._live(existing):
                if existing.state != "starting":  # else a start is under way: keep its lines
                    existing.state, existing.exit_reason = "starting", None
                    existing.progress.clear()
                    existing.progress_count = 0
                asyncio.ensure_future(self._start_in_background(existing))
            return existing
        async with existing.lock:
            if self._live(existing):
                return existing
            await self._start(existing)
        return existing

    @staticmethod
    def _live(sb: Sandbox) -> bool:
        return sb.state == "running" and sb.link is not None and sb.link.alive

    async def _start_in_background(self, sb: Sandbox) -> None:
        async with sb.lock:
            if self._live(sb):
                return
            try:
                await self._start(sb)
            except Exception as err:  # noqa: BLE001 - recorded on the sandbox ("failed", exit_reason)
                self.log.warning("sandbox %s did not start: %s", sb.id, err)
                if sb.state == "starting":
                    sb.state, sb.exit_reason, sb.ended = "failed", str(err) or type(err).__name__, time.time()

    async def _start(self, sb: Sandbox, adopt: bool = False) -> None:
        """Start the backend and the reader (caller holds sb.lock)."""
        if sb.backend is not None:
            await self._halt(sb, sb.state)
        ceiling = self.ceiling_for(sb.user)
        try:
            ceiling.check_change(ceiling.default_policy(), sb.policy)
        except CeilingRefused:
            sb.policy = ceiling.default_policy()  # a ceiling changed while it was stopped
        backend = self.make_backend(sb.user, sb.backend_name)
        backend.always_blocked = [str(n) for n in ceiling.blocked_networks()]
        backend.address_screen = ceiling.address_screen()
        backend.blocked_sink = lambda record: self._blocked(sb, record, "enforcer")
        sb.backend, sb.state, sb.exit_reason, sb.exit_status = backend, "starting", None, None
        sb.backlog.clear()
        sb.progress.clear()
        sb.progress_count = 0
        self.save()

        def progress(line: str) -> None:
            sb.progress.append(str(line))
            sb.progress_count += 1
            self.log.info("sandbox %s: %s", sb.id, line)

        try:
            info = await adopt_kubernetes(backend, sb) if adopt else None
            if info is None:
                info = await backend.start(sb.kernel_id, sb.policy, progress)
            link = await AgentLink.attach(
                backend, timeout=self.start_timeout, log=self.log, speaker="the sandbox service",
                name=f"sandbox {sb.id}", on_frame=lambda frame: self._from_agent(sb, backend, frame),
                on_end=lambda link: self._later(self._agent_ended(sb, backend, link)))
        except BaseException as err:
            try:
                await backend.stop()
            finally:
                sb.backend = None
                sb.state, sb.exit_reason, sb.ended = "failed", str(err) or type(err).__name__, time.time()
                self.save()
                self.audit.write("sandbox", user=sb.user, sandbox=sb.id, kernel_id=sb.kernel_id,
                                 action="start", result="failed", reason=sb.exit_reason)
            if isinstance(err, asyncio.TimeoutError):
                raise SandboxStartError(f"the sandbox did not start within {self.start_timeout:.0f} s") from None
            raise
        sb.link, sb.state = link, "running"
        sb.ended = None
        if sb.subscriber is None:  # the kernel attaches next; one that never does is abandoned
            sb.detached_since = time.monotonic()
        if not adopt:
            sb.started = time.time()
        sb.details = jsonable(info.details)
        self._tell_agent(sb)
        self.save()
        self.audit.write("sandbox", user=sb.user, sandbox=sb.id, kernel_id=sb.kernel_id,
                         action="adopt" if adopt else "start", result="accepted",
                         policy=sb.policy.to_dict(), backend=sb.backend_name)

    def _from_agent(self, sb: Sandbox, backend: Backend, frame: dict) -> None:
        """Each checked frame of a sandbox's agent (its link's reader): audit what is
        blocked, pass everything on to the kernel."""
        kind = frame["type"]
        if kind == "blocked":
            self._audit_blocked(sb, frame["record"], frame["source"])
        elif kind == "done":
            backend.drain_blocked()  # enforcer records logged before the cell ended go first
        self._deliver(sb, frame)

    async def _agent_ended(self, sb: Sandbox, backend: Backend, link: AgentLink) -> None:
        """The agent exited, or broke the protocol (then it is stopped here, as the kernel
        stops a sandbox that does so): record why, tell the kernel, release the sandbox."""
        if self.closing or sb.backend is not backend or sb.state != "running":
            return
        sb.exit_reason = link.broken or await backend.exit_reason()
        sb.exit_status = None if link.broken else backend.last_exit_status
        sb.state, sb.ended = "exited", time.time()
        self.save()
        self.audit.write("sandbox", user=sb.user, sandbox=sb.id, kernel_id=sb.kernel_id, action="exited",
                         reason=sb.exit_reason)
        self._close_subscriber(sb, "the sandbox ended")
        # nothing runs in it any more: release its namespace and uplink (or pod) now, not when
        # its kernel starts it again, which a killed kernel never does (the record says why it ended)
        async with sb.lock:
            if sb.backend is backend and sb.state == "exited":
                await self._halt(sb, "exited")

    def _later(self, coro) -> None:
        """Run ``coro`` as a task the manager keeps until it is done."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _blocked(self, sb: Sandbox, record: BlockedRecord, source: str) -> None:
        self._audit_blocked(sb, record, source)
        self._deliver(sb, {"type": ENFORCER_FRAME, "record": record})

    def _audit_blocked(self, sb: Sandbox, record: BlockedRecord, source: str) -> None:
        fields = {k: record.get(k) for k in ("host", "ip", "port", "protocol", "verdict", "process")}
        sb.blocked += 1
        self.audit.write("blocked", user=sb.user, sandbox=sb.id, kernel_id=sb.kernel_id, source=source,
                         policy=sb.policy.describe(), **fields)

    def deliver(self, sb: Sandbox, frame: dict) -> None:
        """Send ``frame`` to the kernel attached to ``sb``, or keep it for the next attach."""
        self._deliver(sb, frame)

    async def impose(self, sb: Sandbox, new: EgressPolicy, by: str, why: str, check: bool = False) -> bool:
        """Make ``new`` the policy of ``sb`` on the service's own initiative (a grant applied,
        a grant or a timed entry ended); with ``check``, only if the owner's ceiling permits
        it. Audited; returns whether the policy changed (False: refused or not enforceable,
        the old one stays)."""
        async with sb.lock:
            old = sb.policy
            if new == old:
                return False
            common = {"user": sb.user, "by": by, "sandbox": sb.id, "kernel_id": sb.kernel_id,
                      "from": old.to_dict(), "to": new.to_dict(), "reason": why}
            if check:
                try:
                    self.ceiling_for(sb.user).check_change(old, new, who="user")
                except CeilingRefused as err:
                    self.audit.write("policy", **{**common, "reason": f"{why}: {err.reason}"}, result="refused")
                    return False
            if sb.state == "running" and sb.backend is not None:
                try:
                    await sb.backend.apply_policy(new)
                except SandboxError as err:
                    self.audit.write("policy", **common, result="failed", error=str(err))
                    return False
            sb.policy = new
            sb.timed = {e: t for e, t in sb.timed.items() if policy_has(new, e)}
            self.save()
            self.audit.write("policy", **common, result="accepted", forced=True)
            self._tell_agent(sb)
            return True

    def _deliver(self, sb: Sandbox, frame: dict) -> None:
        if sb.subscriber is not None:
            try:
                sb.subscriber.send(frame)
                return
            except Exception as err:  # noqa: BLE001 - a closed websocket: keep the frame
                self.log.info("sandbox %s: subscriber gone (%s)", sb.id, err)
                # its on_close finds another subscriber (None) and does nothing: start the clock here
                sb.subscriber, sb.detached_since = None, time.monotonic()
        sb.backlog.append(frame)

    def _close_subscriber(self, sb: Sandbox, reason: str) -> None:
        sub, sb.subscriber = sb.subscriber, None
        if sub is not None:
            sb.detached_since = time.monotonic()
            sub.close(reason)

    def _tell_agent(self, sb: Sandbox) -> None:
        """The agent's guard learns the policy from the service, never from the kernel."""
        if sb.link is None or sb.state != "running":
            return
        view = agent_view(sb.policy, self.ceiling_for(sb.user), sb.backend.applied)
        self._later(sb.link.send_quietly({"type": "policy", "policy": view}))

    # -- the stream ---------------------------------------------------------------------
    def subscribe(self, sb: Sandbox, subscriber: Any) -> None:
        """Attach an execution stream (the service's websocket): it gets the agent's hello,
        then what the sandbox said while nobody was attached, then everything live. A new
        stream replaces the previous one."""
        if sb.state != "running" or sb.link is None:
            raise NotRunning(f"sandbox {sb.id} is {sb.state}" + (f": {sb.exit_reason}" if sb.exit_reason else ""))
        self._close_subscriber(sb, "replaced by a newer connection")
        subscriber.send(sb.link.hello)
        while sb.backlog:
            subscriber.send(sb.backlog.popleft())
        sb.subscriber, sb.detached_since = subscriber, None

    def unsubscribe(self, sb: Sandbox, subscriber: Any) -> None:
        if sb.subscriber is subscriber:
            sb.subscriber, sb.detached_since = None, time.monotonic()

    async def to_agent(self, sb: Sandbox, frame: dict) -> None:
        """A frame from the kernel. ``policy`` frames are dropped: the service tells the
        agent the policy itself."""
        if frame["type"] == "policy":
            return
        if sb.link is None or sb.state != "running":
            raise NotRunning(f"sandbox {sb.id} is {sb.state}")
        await sb.link.send(frame)

    # -- policy ---------------------------------------------------------------------------
    async def apply_policy(self, sb: Sandbox, by: str, requested: Any, timed: Any = None) -> dict:
        """Check against the owner's ceiling, enforce, record, audit. Raises CeilingRefused
        (nothing changed) or PolicyError (invalid, or the enforcer failed: nothing changed).

        ``timed`` (``{entry: seconds or None}``): entries of the new policy that end after so
        many seconds (``%sandbox allow … --for``; the service's clock removes them), or, with
        None, no longer end."""
        try:
            new = EgressPolicy.parse(requested)
            clocks = _timed(timed, new)
        except PolicyError as err:
            self.audit.write("policy", user=sb.user, by=by, sandbox=sb.id, kernel_id=sb.kernel_id,
                             **{"from": sb.policy.to_dict()}, to=jsonable(requested), result="refused",
                             reason=f"invalid policy: {err}")
            raise
        async with sb.lock:
            old = sb.policy
            common = {"user": sb.user, "by": by, "sandbox": sb.id, "kernel_id": sb.kernel_id,
                      "from": old.to_dict(), "to": new.to_dict()}
            try:
                self.ceiling_for(sb.user).check_change(old, new, who="user")
            except CeilingRefused as err:
                self.audit.write("policy", **common, result="refused", reason=err.reason)
                raise
            details: dict = {}
            if new == old and sb.backend is not None:
                details = dict(sb.backend.applied or {})  # only clocks change: nothing to enforce again
            elif sb.state == "running" and sb.backend is not None:
                try:
                    details = await sb.backend.apply_policy(new)
                except SandboxError as err:
                    self.audit.write("policy", **common, result="failed", reason=str(err))
                    raise
            sb.policy = new
            now = time.time()
            sb.timed = {e: t for e, t in sb.timed.items() if policy_has(new, e)}
            for entry, seconds in clocks.items():
                if seconds is None:
                    sb.timed.pop(entry, None)
                else:
                    sb.timed[entry] = now + seconds
            self.save()
            self.audit.write("policy", **common, result="accepted",
                             **({"timed": {e: s for e, s in clocks.items()}} if clocks else {}))
            self._tell_agent(sb)
            return jsonable(details)

    async def interrupt(self, sb: Sandbox) -> None:
        if sb.link is not None and sb.state == "running":
            await sb.link.send_quietly({"type": "interrupt"})
            await sb.backend.interrupt()

    async def stop(self, sb: Sandbox, by: str) -> None:
        """Remove the sandbox (its record stays, stopped, with its policy)."""
        async with sb.lock:
            await self._halt(sb, "stopped")
            self.save()
            self.audit.write("sandbox", user=sb.user, by=by, sandbox=sb.id, kernel_id=sb.kernel_id, action="stop")

    async def forget(self, sb: Sandbox, by: str) -> None:
        """Stop and drop the record (the kernel shut down for good)."""
        await self.stop(sb, by)
        self.sandboxes.pop(sb.id, None)
        self.save()

    async def _halt(self, sb: Sandbox, state: str) -> None:
        backend, sb.backend = sb.backend, None
        sb.state = state
        if state not in RUNNING:
            sb.ended = time.time()
        self._close_subscriber(sb, f"the sandbox was {state}")
        link, sb.link = sb.link, None
        if backend is not None:
            await backend.stop()
        if link is not None:
            await link.close()

    # -- collection -------------------------------------------------------------------------
    async def collect(self, abandoned_after: float, keep_stopped: float) -> list[str]:
        """Stop running sandboxes no kernel has been attached to for ``abandoned_after``
        seconds (the kernel was killed, or its server died with it), and drop records of
        sandboxes that ended more than ``keep_stopped`` seconds ago. 0 disables either.
        A kernel that is connected, even idle for hours, is never collected; one that
        re-attaches (a dropped stream, a service restart) restarts the clock."""
        done: list[str] = []
        if abandoned_after > 0:
            for sb in list(self.sandboxes.values()):
                if not self._abandoned(sb, abandoned_after):
                    continue
                async with sb.lock:
                    if not self._abandoned(sb, abandoned_after):
                        continue
                    idle = time.monotonic() - sb.detached_since
                    await self._halt(sb, "stopped")
                    self.save()
                reason = f"abandoned: no kernel connected for {idle:.0f} s"
                self.log.warning("sandbox %s of %s stopped: %s", sb.id, sb.user, reason)
                self.audit.write("sandbox", user=sb.user, by="service", sandbox=sb.id, kernel_id=sb.kernel_id,
                                 action="stop", reason=reason)
                done.append(f"stopped {sb.id} ({sb.user}): {reason}")
        if keep_stopped > 0:
            cutoff = time.time() - keep_stopped
            old = [sb for sb in self.sandboxes.values()
                   if sb.state not in RUNNING and sb.backend is None and (sb.ended or sb.created) < cutoff]
            for sb in old:
                self.sandboxes.pop(sb.id, None)
                done.append(f"forgot {sb.id} ({sb.user}), {sb.state} since {sb.ended or sb.created:.0f}")
            if old:
                self.save()
        return done

    @staticmethod
    def _abandoned(sb: Sandbox, after: float) -> bool:
        return (sb.state == "running" and sb.subscriber is None and sb.detached_since is not None
                and time.monotonic() - sb.detached_since >= after)

    # -- service lifecycle ------------------------------------------------------------------
    async def restore(self) -> None:
        """After a service (re)start: bring back every sandbox that was running.

        Kubernetes pods outlive the service: they are adopted (re-attached). Local sandboxes
        are children of the service and died with it: each is started again, with the same
        id and policy (the interpreter's variables and its /tmp are lost)."""
        todo = [sb for sb in self.sandboxes.values() if sb.state in RUNNING]
        if not todo:
            return

        async def one(sb: Sandbox) -> None:
            async with sb.lock:
                if sb.state not in RUNNING:
                    return
                adopt = sb.backend_name == "kubernetes" and bool(sb.details.get("pod"))
                sb.restarts += 0 if adopt else 1
                try:
                    await self._start(sb, adopt=adopt)
                except Exception as err:  # noqa: BLE001 - one sandbox must not stop the others
                    self.log.error("sandbox %s could not be restored: %s", sb.id, err)

        await asyncio.gather(*(one(sb) for sb in todo))

    async def shutdown(self) -> None:
        """Service shutdown: local sandboxes are removed (they cannot outlive the service),
        Kubernetes pods keep running; the state file still says "running" for both, so the
        next service process restores them."""
        self.closing = True
        for sb in list(self.sandboxes.values()):
            if sb.backend is None:
                continue
            state = sb.state
            if sb.backend_name == "kubernetes":
                sb.backend = None  # leave the pod alone; just close our stream
                if sb.link is not None:
                    await sb.link.send_quietly({"type": "ping", "id": "bye"})
                    await sb.link.close()
                self._close_subscriber(sb, "the sandbox service is restarting")
            else:
                await self._halt(sb, state)
            sb.state = state
        self.save()


async def adopt_kubernetes(backend: Backend, sb: Sandbox):
    """Re-attach a KubernetesBackend to the pod a previous service process started, if it
    still runs (returns its SandboxInfo), else None (the caller starts a fresh one): see
    :meth:`KubernetesBackend.adopt`, which also re-applies the sandbox's policy objects."""
    namespace, pod = sb.details.get("namespace"), sb.details.get("pod")
    if not namespace or not pod:
        return None
    return await backend.adopt(sb.kernel_id, namespace, pod, policy=sb.policy)



def _timed(timed: Any, policy: EgressPolicy) -> dict[str, float | None]:
    """``{entry: seconds or None}`` checked: entries of ``policy``, seconds within a week."""
    if timed is None:
        return {}
    if not isinstance(timed, dict) or len(timed) > 1000:
        raise PolicyError("'timed' is an object {entry: seconds or null}")
    out: dict[str, float | None] = {}
    for text, seconds in timed.items():
        entry = parse_entry(text)
        if entry not in policy.entries:
            raise PolicyError(f"timed entry {entry} is not in the policy")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                    or not 0 < seconds <= MAX_GRANT_SECONDS):
            raise PolicyError(f"timed entry {entry}: seconds between 1 and {MAX_GRANT_SECONDS}, or null")
        out[str(entry)] = None if seconds is None else float(seconds)
    return out


def jsonable(value: Any) -> Any:
    """Plain strict JSON: tuples to lists, non-finite floats to None, anything else to str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
