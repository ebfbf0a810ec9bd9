"""Requests for access and the grants that answer them (hub mode, issue #18 point 2).

A user whose notebook needs a destination beyond their ceiling asks for it
(``%sandbox request ENTRY… --reason TEXT`` → ``POST api/requests``); an administrator grants it
(for that user or one of their groups, for a time or until revoked) or denies it with a reason,
on the admin page or through the API. A grant widens the ceiling of the users it names by
exactly the granted entries (they are added to ``user_may_allow``; nothing always blocked,
no exam mode is lifted), and the granted entries are applied at once to the sandbox the request
came from. The user's kernel learns every decision through the sandbox's stream (the
:data:`ACCESS_FRAME`), within moments and without a new cell.

The :class:`AccessDesk` keeps requests and grants in the service's ``state.json`` (so a
grant's expiry, kept as wall-clock time, survives service and kernel restarts) and audits every
step and every refusal as ``"event": "access"``. The Manager owns the sandboxes; the desk asks
it to change a sandbox's policy (:meth:`Manager.impose`).

Timed entries a user allows themselves (``%sandbox allow ENTRY --for 10m``) are kept on the
sandbox (``Sandbox.timed``); :meth:`AccessDesk.expire_due` ends both kinds on the service's
clock.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..agent.protocol import ACCESS_FRAME
from ..errors import PolicyError, SandboxError
from ..policy.model import Entry, parse_entry

if TYPE_CHECKING:
    from .manager import Manager, Sandbox

#: most entries one request may name
MAX_REQUEST_ENTRIES = 20
#: the longest reason (the user's or the administrator's)
MAX_REASON = 500
#: most pending requests one user may have (a script cannot fill the admin page)
MAX_PENDING_PER_USER = 10
#: decided requests kept for the users' and the page's history (the newest)
KEEP_DECIDED = 200
#: the longest a grant (or a user's own timed entry) may run: a week; longer is "until revoked"
MAX_GRANT_SECONDS = 7 * 86400


class AccessRefused(SandboxError):
    """A request or a decision that is not accepted (bad input, not permitted); nothing changed.
    ``status`` is the HTTP status the service answers with."""

    ename = "AccessRefused"

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class AccessRequest:
    id: str
    user: str
    entries: list[str]
    reason: str
    sandbox: str | None
    kernel_id: str | None
    time: float
    state: str = "pending"  # pending | granted | denied
    decided_by: str | None = None
    decided_at: float | None = None
    #: the administrator's reason (a denial must have one)
    answer: str = ""
    grant: str | None = None

    def public(self) -> dict:
        return asdict(self)


@dataclass
class Grant:
    id: str
    #: {"user": NAME} or {"group": NAME}
    target: dict
    entries: list[str]
    by: str
    time: float
    #: wall-clock end (time.time()); None: until revoked
    expires: float | None = None
    request: str | None = None

    def covers(self, user: str, groups: list[str]) -> bool:
        return self.target.get("user") == user or self.target.get("group") in groups

    def describe(self) -> str:
        who = f"user {self.target['user']}" if "user" in self.target else f"group {self.target.get('group')}"
        until = "until revoked" if self.expires is None else f"until {time.strftime('%H:%M:%S', time.localtime(self.expires))}"
        return f"{', '.join(self.entries)} for {who}, {until}"

    def public(self) -> dict:
        return {**asdict(self), "description": self.describe()}


def parse_seconds(value: Any) -> float | None:
    """A grant's duration: None (until revoked) or seconds in (0, MAX_GRANT_SECONDS]."""
    if value in (None, "", "revoked", "until-revoked"):
        return None
    if isinstance(value, bool):
        raise AccessRefused("'for' is a number of seconds, or empty for until revoked")
    if isinstance(value, str):
        from ..config import parse_duration

        try:
            value = parse_duration(value)
        except ValueError as err:
            raise AccessRefused(f"'for': {err}") from None
    if not isinstance(value, (int, float)) or not 0 < value <= MAX_GRANT_SECONDS:
        raise AccessRefused(f"'for' must be between 1 s and {MAX_GRANT_SECONDS // 86400} days, or empty for "
                            "until revoked")
    return float(value)


def policy_has(policy, text: str) -> bool:
    """Whether ``policy`` has the entry written ``text`` (False for text that is not an entry)."""
    try:
        return parse_entry(text) in policy.entries
    except PolicyError:
        return False


def _reason(value: Any, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise AccessRefused(f"{what} must be text")
    value = " ".join(value.split())
    if len(value) > MAX_REASON:
        raise AccessRefused(f"{what} is at most {MAX_REASON} characters (this one has {len(value)})")
    return value


class AccessDesk:
    """Requests and grants of one sandbox service (kept in the Manager's state file)."""

    def __init__(self, manager: Manager, state: dict):
        self.m = manager
        self.requests: dict[str, AccessRequest] = {}
        self.grants: dict[str, Grant] = {}
        for rid, data in (state.get("requests") or {}).items():
            try:
                self.requests[rid] = AccessRequest(**data)
            except TypeError as err:
                manager.log.error("state.json: request %s is unreadable and dropped: %s", rid, err)
        for gid, data in (state.get("grants") or {}).items():
            try:
                self.grants[gid] = Grant(**data)
            except TypeError as err:
                manager.log.error("state.json: grant %s is unreadable and dropped: %s", gid, err)

    def to_state(self) -> dict:
        return {"requests": {rid: r.public() for rid, r in self.requests.items()},
                "grants": {gid: asdict(g) for gid, g in self.grants.items()}}

    # -- reading ---------------------------------------------------------------------
    def granted_entries(self, user: str, groups: list[str]) -> list[str]:
        """Entries the grants in force add to ``user``'s ceiling (expired ones excluded even
        before the clock has removed them)."""
        now = time.time()
        out: list[str] = []
        for grant in self.grants.values():
            if grant.covers(user, groups) and (grant.expires is None or grant.expires > now):
                out += [e for e in grant.entries if e not in out]
        return out

    def pending(self) -> list[AccessRequest]:
        return sorted((r for r in self.requests.values() if r.state == "pending"), key=lambda r: r.time)

    def of_user(self, user: str) -> list[AccessRequest]:
        return sorted((r for r in self.requests.values() if r.user == user), key=lambda r: r.time)

    def active_grants(self) -> list[Grant]:
        return sorted(self.grants.values(), key=lambda g: g.time)

    # -- a user asks --------------------------------------------------------------------
    def _refuse(self, message: str, status: int = 400, **fields) -> AccessRefused:
        self.m.audit.write("access", result="refused", reason=message, **fields)
        return AccessRefused(message, status)

    async def request(self, user: str, sb: Sandbox, entries: Any, reason: Any) -> AccessRequest:
        """Record ``user``'s request for ``entries`` from their sandbox ``sb`` (owner checked by
        the caller). Refused (audited, nothing recorded): no or too many entries, an entry that
        is not an egress entry, one the user may already allow, one no grant can open (always
        blocked, the sandbox's own network), a locked ceiling, too many pending requests."""
        common = {"action": "request", "by": user, "user": user, "sandbox": sb.id, "kernel_id": sb.kernel_id,
                  "entries": entries}
        if not isinstance(entries, list) or not entries:
            raise self._refuse("name at least one entry: {\"entries\": [\"host:port\", …]}", **common)
        if len(entries) > MAX_REQUEST_ENTRIES:
            raise self._refuse(f"a request names at most {MAX_REQUEST_ENTRIES} entries (this one {len(entries)})",
                               **common)
        try:
            why = _reason(reason, "the reason")
        except AccessRefused as err:
            raise self._refuse(str(err), **common) from None
        parsed: list[Entry] = []
        for text in entries:
            try:
                entry = parse_entry(text)
            except PolicyError as err:
                raise self._refuse(f"not an egress entry: {err}", **common) from None
            if entry not in parsed:
                parsed.append(entry)
        ceiling = self.m.ceiling_for(user)
        for entry in parsed:
            decision = ceiling.decide(entry)
            if decision.allowed:
                raise self._refuse(f"{entry} is within your ceiling already: %sandbox allow {entry}", **common)
            if not decision.requestable:
                raise self._refuse(f"{entry} cannot be granted: "
                                   f"{decision.reason.removeprefix('not permitted by your administrator: ')}",
                                   status=403, **common)
        mine = [r for r in self.pending() if r.user == user]
        if len(mine) >= MAX_PENDING_PER_USER:
            raise self._refuse(f"you have {len(mine)} requests waiting for an administrator, the most one user "
                               "may have; wait for an answer", status=429, **common)
        texts = [str(e) for e in parsed]
        same = next((r for r in mine if r.entries == texts and r.sandbox == sb.id), None)
        if same is not None:  # asked twice: one request (the newer reason kept)
            same.reason = why or same.reason
            self.m.save()
            self.m.audit.write("access", action="request", result="accepted", by=user, user=user, request_id=same.id,
                               sandbox=sb.id, entries=texts, reason=same.reason, again=True)
            return same
        req = AccessRequest(id=secrets.token_hex(6), user=user, entries=texts, reason=why, sandbox=sb.id,
                            kernel_id=sb.kernel_id, time=time.time())
        self.requests[req.id] = req
        self._trim()
        self.m.save()
        self.m.audit.write("access", action="request", result="accepted", by=user, user=user, request_id=req.id,
                           sandbox=sb.id, kernel_id=sb.kernel_id, entries=texts, reason=why)
        return req

    def _trim(self) -> None:
        decided = sorted((r for r in self.requests.values() if r.state != "pending"), key=lambda r: r.time)
        for old in decided[:-KEEP_DECIDED] if len(decided) > KEEP_DECIDED else []:
            del self.requests[old.id]

    # -- an administrator decides --------------------------------------------------------
    async def decide(self, by: str, rid: str, action: str, *, scope: Any = "user", seconds: Any = None,
                     answer: Any = None, entries: Any = None) -> AccessRequest:
        """Grant or deny request ``rid`` (the caller is an admin: checked by the handler).

        ``scope``: ``user`` or ``group:NAME`` (one of the requester's groups); ``seconds``: how
        long the grant lasts (None: until revoked); ``answer``: the reason (a denial needs one);
        ``entries``, if given, must be the request's own (a decision cannot grant more or other
        than was asked). Refused and audited: an unknown or decided request, one's own request,
        a group the requester is not in, other entries, a bad duration or reason."""
        common = {"action": action, "by": by, "request_id": rid}
        req = self.requests.get(rid) if isinstance(rid, str) else None
        if req is None:
            raise self._refuse(f"no request {str(rid)[:40]!r}", status=404, **common)
        common["user"] = req.user
        if action not in ("grant", "deny"):
            raise self._refuse("the decision is grant or deny", **common)
        if req.user == by:
            raise self._refuse("nobody may decide their own request; another administrator must", status=403,
                               **common)
        if req.state != "pending":
            raise self._refuse(f"request {rid} was already {req.state} by {req.decided_by}", status=409, **common)
        if entries is not None and (not isinstance(entries, list) or [str(e) for e in entries] != req.entries):
            raise self._refuse(f"a decision grants what was asked ({', '.join(req.entries)}), nothing else",
                               **common, entries=entries)
        try:
            text = _reason(answer, "the reason")
            if action == "deny":
                if not text:
                    raise AccessRefused("a denial says why (the user reads it)")
                return await self._deny(req, by, text)
            duration = parse_seconds(seconds)
        except AccessRefused as err:
            raise self._refuse(str(err), **common) from None
        target = self._target(req, scope, common)
        return await self._grant(req, by, target, duration, text)

    def _target(self, req: AccessRequest, scope: Any, common: dict) -> dict:
        if scope in (None, "", "user"):
            return {"user": req.user}
        if isinstance(scope, str) and scope.startswith("group:"):
            group = scope[len("group:"):]
            if group in self.m.user_groups.get(req.user, []):
                return {"group": group}
            raise self._refuse(f"{req.user} is not in group {group!r} (their groups: "
                               f"{', '.join(self.m.user_groups.get(req.user, [])) or 'none'})", **common)
        raise self._refuse("the scope is 'user' or 'group:NAME'", **common)

    async def _deny(self, req: AccessRequest, by: str, answer: str) -> AccessRequest:
        req.state, req.decided_by, req.decided_at, req.answer = "denied", by, time.time(), answer
        self.m.save()
        self.m.audit.write("access", action="deny", result="accepted", by=by, user=req.user, request_id=req.id,
                           entries=req.entries, reason=answer)
        message = f"your request for {', '.join(req.entries)} was denied by {by}: {answer}"
        for sb in self._sandboxes(req.user):
            self._tell(sb, "denied", message, request=req)
        return req

    async def _grant(self, req: AccessRequest, by: str, target: dict, seconds: float | None,
                     answer: str) -> AccessRequest:
        now = time.time()
        grant = Grant(id=secrets.token_hex(6), target=target, entries=list(req.entries), by=by, time=now,
                      expires=now + seconds if seconds else None, request=req.id)
        self.grants[grant.id] = grant
        req.state, req.decided_by, req.decided_at, req.answer, req.grant = "granted", by, now, answer, grant.id
        self.m.save()
        self.m.audit.write("access", action="grant", result="accepted", by=by, user=req.user, request_id=req.id,
                           grant=grant.id, target=target, entries=req.entries, expires=grant.expires,
                           reason=answer or None)
        message = f"{by} granted your request: {grant.describe()}" + (f" ({answer})" if answer else "")
        origin = self.m.sandboxes.get(req.sandbox or "")
        for sb in self._sandboxes(req.user):
            if sb is origin:
                # the entries are applied to the sandbox the request came from, at once
                new = sb.policy.with_entries_added(*req.entries)
                if new.mode != "allowlist":
                    new = new.with_mode("allowlist")
                applied = new == sb.policy or await self.m.impose(sb, new, by, f"request {req.id} granted",
                                                                   check=True)
                self._tell(sb, "granted", message + ("; allowed now" if applied else
                                                     "; allow them with %sandbox allow"), request=req)
            else:
                self._tell(sb, "granted", message, request=req)
        if "group" in target:  # the group's other members may now allow the entries too
            members = {u for u, gs in self.m.user_groups.items() if target["group"] in gs} - {req.user}
            for user in sorted(members):
                for sb in self._sandboxes(user):
                    self._tell(sb, "widened", f"{by} granted group {target['group']}: {grant.describe()}; "
                                              f"you may allow them: %sandbox allow {' '.join(grant.entries)}")
        return req

    async def revoke(self, by: str, gid: str) -> Grant:
        grant = self.grants.get(gid) if isinstance(gid, str) else None
        if grant is None:
            raise self._refuse(f"no grant {str(gid)[:40]!r}", status=404, action="revoke", by=by, grant=gid)
        await self._end(grant, by, f"was revoked by {by}", action="revoke")
        return grant

    # -- the clock ------------------------------------------------------------------------
    async def expire_due(self, now: float | None = None) -> list[str]:
        """End every grant and every user's timed entry whose time has come (the service's
        clock, every second); returns what ended, for the log."""
        now = time.time() if now is None else now
        done = []
        for grant in [g for g in self.grants.values() if g.expires is not None and g.expires <= now]:
            await self._end(grant, "service", "ended: its time was up")
            done.append(f"grant {grant.id} ({grant.describe()}) ended")
        for sb in list(self.m.sandboxes.values()):
            due = [e for e, end in sb.timed.items() if end <= now]
            if not due:
                continue
            for entry in due:
                del sb.timed[entry]
            gone = [e for e in due if policy_has(sb.policy, e)]
            if gone:
                await self.m.impose(sb, sb.policy.with_entries_removed(*gone), "service",
                                    f"timed access to {', '.join(gone)} ended")
                self._tell(sb, "ended", f"timed access ended: {', '.join(gone)}")
            self.m.save()
            done.append(f"timed entries {', '.join(due)} of sandbox {sb.id} ended")
        return done

    async def _end(self, grant: Grant, by: str, why: str, action: str = "end") -> None:
        """Remove a grant; entries it alone permitted leave the policies of the users it
        covered (the rest of each policy stays)."""
        self.grants.pop(grant.id, None)
        self.m.save()
        self.m.audit.write("access", action=action, result="accepted", by=by, grant=grant.id, target=grant.target,
                           entries=grant.entries, reason=why, **({"user": grant.target["user"]}
                                                                 if "user" in grant.target else {}))
        users = ({grant.target["user"]} if "user" in grant.target else
                 {u for u, gs in self.m.user_groups.items() if grant.target.get("group") in gs})
        for user in sorted(users):
            ceiling = self.m.ceiling_for(user)
            given = set(ceiling.default_policy().entries)
            for sb in self._sandboxes(user):
                gone = [e for e in sb.policy.entries if str(e) in grant.entries and e not in given
                        and not ceiling.decide(e).allowed]
                if gone:
                    await self.m.impose(sb, sb.policy.with_entries_removed(*gone), by,
                                        f"access to {', '.join(map(str, gone))} {why}")
                self._tell(sb, "ended", f"the access granted to you ({grant.describe()}) {why}"
                           + (f"; removed: {', '.join(map(str, gone))}" if gone else ""))

    # -- telling kernels ------------------------------------------------------------------
    def _sandboxes(self, user: str) -> list[Sandbox]:
        return self.m.active(user)  # starting or running

    def _tell(self, sb: Sandbox, event: str, message: str, request: AccessRequest | None = None) -> None:
        """The kernel of ``sb`` learns what happened (now, or when it attaches again): the
        event, a sentence for the notebook, the request, the policy in force and the ceiling."""
        self.m.deliver(sb, {"type": ACCESS_FRAME, "event": event, "message": message,
                            "request": request.public() if request is not None else None,
                            "policy": sb.policy.to_dict(), "ceiling": self.m.ceiling_view(sb.user),
                            "timed": dict(sb.timed)})


__all__ = ["AccessDesk", "AccessRequest", "Grant", "AccessRefused", "ACCESS_FRAME", "parse_seconds", "policy_has"]
