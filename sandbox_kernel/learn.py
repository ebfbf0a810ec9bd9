"""Learn mode: find out which destinations a notebook needs (``%sandbox learn``).

While learning, cells run under the policy in force and every destination they tried is
recorded: the name the program asked for when known, the address, port, protocol, the
cell (execution count), how often, and the verdict (allowed or blocked). ``%sandbox learn
stop`` turns the record into the smallest allowlist that would have let those cells reach
what they tried (:func:`propose`), each entry decided against the administrator's ceiling,
and offers to apply it (through :meth:`Controls.set_policy`, like ``%sandbox allow``)
or to insert its ``%sandbox`` lines as a new cell, so the notebook carries its policy.

Where the record comes from, most trusted first:

- ``enforcer``: the local backend's nftables rules log refused packets and, while
  learning, the first packet of each allowed connection (``LOG_PREFIX_ACCEPTED``);
- ``resolver``: the local backend's DNS proxy sees every lookup, answered or refused;
- ``guard`` / ``watcher``: the agent in the sandbox reports refused connections and
  lookups (the guard's witness packet lets the enforcer log the same attempt). This is the
  sandbox's word: it can only mislead its own proposal, never widen anything (the
  proposal is applied by the user, within the ceiling), and the proposal marks entries
  that rest on it alone.

On the Kubernetes backend there is no enforcer log and no DNS proxy: the agent's refusals
are learned, and while learning the guard is asked (``report_allowed``) for the connections it
lets through, which covers Python code only; allowed subprocess connections are not seen. In
hub mode the service forwards its enforcer's refusals, not what it let through, and sends the
agent its policy itself: only refusals are learned.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .errors import SandboxError
from .policy.model import Entry, InvalidEntry, merge_port_ranges, parse_entry
from .policy.presets import PRESETS

if TYPE_CHECKING:
    from .controls import Controls
    from .policy.admin import AdminPolicy

#: the proposal as JSON, next to text/plain and text/html in ``%sandbox learn stop``'s output
LEARN_MIME = "application/vnd.sandbox-kernel.learn+json"
#: sources the kernel itself runs (outside the sandbox)
KERNEL_SOURCES = ("enforcer", "resolver")
#: at most this many destinations are recorded (a scan must not eat the kernel's memory)
MAX_DESTINATIONS = 2000


class LearnError(SandboxError):
    """A learn-mode command that cannot be done now (e.g. ``apply`` before ``stop``)."""

    ename = "LearnError"


@dataclass
class Tried:
    """One destination the cells tried while learning."""

    host: str | None
    ip: str | None
    port: int | None
    protocol: str  # tcp | udp | dns | icmp | ...
    verdicts: set = field(default_factory=set)  # allowed | blocked
    cells: set = field(default_factory=set)  # execution counts; 0 = between cells
    counts: dict = field(default_factory=dict)  # source -> reports it made
    first_seen: float = field(default_factory=time.time)
    #: attempt ids (``tcp:<source port>``, ``dns:<id>:<type>``): the guard's report and the
    #: enforcer's log of its witness packet name the same attempt, a retransmission repeats it
    attempts: set = field(default_factory=set)
    unnamed: dict = field(default_factory=dict)  # source -> attempts reported without an id

    @property
    def count(self) -> int:
        # without ids: the watcher sees the same dropped connections as the enforcer's log
        u = self.unnamed
        return (len(self.attempts) + u.get("guard", 0) + max(u.get("enforcer", 0), u.get("watcher", 0))
                + u.get("resolver", 0))

    @property
    def trusted(self) -> bool:
        return any(s in KERNEL_SOURCES for s in self.counts)

    def destination(self) -> str:
        where = self.host or (f"[{self.ip}]" if self.ip and ":" in self.ip else self.ip) or "?"
        if self.protocol == "dns":
            return f"{where} (lookup)"
        return f"{where}:{self.port}/{self.protocol}" if self.port else f"{where}/{self.protocol}"

    def to_json(self) -> dict:
        return {"host": self.host, "ip": self.ip, "port": self.port, "protocol": self.protocol,
                "verdict": "blocked" if "blocked" in self.verdicts else "allowed",
                "verdicts": sorted(self.verdicts), "cells": sorted(self.cells), "count": self.count,
                "sources": sorted(self.counts)}


@dataclass(eq=False)  # identity: two items may name the same text
class Proposed:
    """One line of the proposal: an entry or a preset, decided against the ceiling."""

    kind: str  # entry | preset | invalid (a name no entry can express)
    text: str  # "10.0.0.5:8080/tcp" or "pypi"
    covers: list[str]
    allowed: bool = False
    reason: str = ""
    note: str = ""
    #: rests only on what the sandbox itself reported (guard / watcher)
    sandbox_reported: bool = False
    #: a preset's place-takers: the entries it replaced (used when the preset is refused)
    parts: list = field(default_factory=list)
    #: beyond the ceiling, but an administrator could grant it (hub mode: ``%sandbox request``)
    requestable: bool = False

    def verdict(self) -> str:
        if self.kind == "invalid":
            return "cannot be allowed"
        return "you may allow" if self.allowed else "beyond your administrator's limits"

    def to_json(self) -> dict:
        return {"kind": self.kind, "text": self.text, "covers": self.covers, "allowed": self.allowed,
                "verdict": self.verdict(), "reason": self.reason, "note": self.note,
                "sandbox_reported": self.sandbox_reported, "requestable": self.requestable}


@dataclass
class Proposal:
    """The smallest allowlist for what was tried, and the lines that apply it."""

    items: list[Proposed]
    tried: list[Tried]
    #: whether this kernel can ask an administrator (hub mode's sandbox service)
    requests: bool = False

    def allowed(self) -> list[Proposed]:
        return [p for p in self.items if p.allowed]

    def lines(self) -> list[str]:
        """The ``%sandbox`` lines of a cell that sets this policy up (what Insert puts in)."""
        out = [f"%sandbox preset {p.text}" for p in self.allowed() if p.kind == "preset"]
        entries = [p.text for p in self.allowed() if p.kind == "entry"]
        if entries:
            out.append("%sandbox allow " + " ".join(entries))
        beyond = [p.text if p.kind == "entry" else f"preset {p.text}" for p in self.items
                  if not p.allowed and p.kind != "invalid"]
        if beyond:
            out.append("# beyond your administrator's limits (ask them): " + ", ".join(beyond))
        if self.request_line():
            out.append(f"# to ask: {self.request_line()}")
        return out

    def request_line(self) -> str:
        """The ``%sandbox request`` line for what is beyond the ceiling but grantable ("" if none,
        or when no administrator can be asked from this kernel)."""
        entries = [p.text for p in self.items if p.kind == "entry" and not p.allowed and p.requestable]
        return f"%sandbox request {' '.join(entries)} --reason \"learned from this notebook\"" \
            if entries and self.requests else ""

    def text(self) -> str:
        if not self.items:
            return "learned nothing: the cells tried no destination outside the sandbox"
        width = max(len(p.text) + (7 if p.kind == "preset" else 0) for p in self.items)
        rows = []
        for p in self.items:
            name = f"preset {p.text}" if p.kind == "preset" else p.text
            extra = f" · {p.note}" if p.note else ""
            if p.sandbox_reported:
                extra += " · reported by the sandbox only"
            rows.append(f"  {name:<{width}}  {p.verdict()}  ({', '.join(p.covers)}){extra}")
        return (f"smallest allowlist for what the cells tried ({_count(len(self.tried), 'destination')}):\n"
                + "\n".join(rows) + "\napply: %sandbox learn apply · as a cell: %sandbox learn insert"
                + (f"\nask your administrator for the rest: {self.request_line()}" if self.request_line() else ""))

    def html(self) -> str:
        body = "".join(
            f"<tr><td><code>{html.escape(('preset ' if p.kind == 'preset' else '') + p.text)}</code></td>"
            f"<td>{'✅' if p.allowed else '⛔'} {html.escape(p.verdict())}</td>"
            f"<td>{html.escape(', '.join(p.covers))}</td>"
            f"<td>{html.escape(p.note + (' · reported by the sandbox only' if p.sandbox_reported else ''))}</td></tr>"
            for p in self.items)
        return ("<table class='sandbox-kernel-learn'><tr><th>allow</th><th>verdict</th><th>tried</th>"
                f"<th>note</th></tr>{body}</table>")

    def to_json(self) -> dict:
        return {"items": [p.to_json() for p in self.items], "tried": [t.to_json() for t in self.tried],
                "lines": self.lines(), "request": self.request_line()}


class Learner:
    """The kernel's learn mode: the record, and the last proposal. Owned by the controls."""

    def __init__(self, controls: Controls):
        self.controls = controls
        self.active = False
        self.started_at: float | None = None
        self._tried: dict[tuple, Tried] = {}
        self._names: dict[str, str] = {}  # address -> name it was looked up as
        self.proposal: Proposal | None = None
        #: what this backend can show about allowed connections (said in status and docs)
        self.sees_allowed = hasattr(controls.backend, "log_accepted")

    # -- recording ----------------------------------------------------------------------
    def observe(self, record, source: str) -> None:
        """A blocked connection or lookup (called by the kernel for every one it gets)."""
        if not self.active or not isinstance(record, dict):
            return
        if source == "enforcer" and record.get("protocol") == "dns":
            source = "resolver"
        self._add(record, "blocked", source)

    def observe_allowed(self, record) -> None:
        """What the backend's enforcer let through, or its resolver answered (learn_sink)."""
        if not self.active or not isinstance(record, dict):
            return
        if record.get("protocol") == "dns":
            for address in record.get("addresses") or []:
                if isinstance(address, str) and isinstance(record.get("host"), str) and len(self._names) < 10 * MAX_DESTINATIONS:
                    self._names.setdefault(address, _safe_name(record["host"]))
            self._add(record, "allowed", "resolver")
        else:
            self._add(record, "allowed", "enforcer")

    def observe_reported(self, record) -> None:
        """A connection the agent's guard let through (the sandbox's word; asked for only
        where the enforcer cannot see allowed connections, see :meth:`agent_view`)."""
        if self.active and isinstance(record, dict):
            self._add(record, "allowed", "guard")

    def agent_view(self, view: dict) -> dict:
        """The guard's policy view, told to report allowed connections while learning on a
        backend whose enforcer cannot see them (called by the kernel for every view it sends)."""
        if self.active and not self.sees_allowed:
            return {**view, "report_allowed": True}
        return view

    def _add(self, record: dict, verdict: str, source: str) -> None:
        host = record.get("host") if isinstance(record.get("host"), str) else None
        ip = record.get("ip") if isinstance(record.get("ip"), str) else None
        port = record.get("port") if isinstance(record.get("port"), int) and not isinstance(record.get("port"), bool) else None
        protocol = record.get("protocol") if isinstance(record.get("protocol"), str) else "other"
        if host is not None:
            host = _safe_name(host)
        if host is None and ip is None:
            return
        # by address when there is one: the guard may name it, the enforcer's log never does
        key = (ip or host, port, protocol) if protocol != "dns" else (host, None, "dns")
        tried = self._tried.get(key)
        if tried is None:
            if len(self._tried) >= MAX_DESTINATIONS:
                return
            tried = self._tried[key] = Tried(host, ip, port, protocol)
            new = True
        else:
            new = False
            tried.ip, tried.host = tried.ip or ip, tried.host or host
        tried.verdicts.add(verdict)
        tried.cells.add(self.controls.cell or 0)
        count = record.get("count") if isinstance(record.get("count"), int) else 1
        count = max(1, min(count, 1_000_000))
        tried.counts[source] = tried.counts.get(source, 0) + count
        attempt = record.get("attempt")
        if isinstance(attempt, str) and len(attempt) <= 64 and len(tried.attempts) < 10_000:
            tried.attempts.add(attempt)
        else:
            tried.unnamed[source] = tried.unnamed.get(source, 0) + count
        if new:
            self.controls.learn_changed()

    def tried(self) -> list[Tried]:
        for tried in self._tried.values():  # a name learned after the connection still names it
            if tried.host is None and tried.ip in self._names:
                tried.host = self._names[tried.ip]
        return sorted(self._tried.values(), key=lambda t: t.first_seen)

    # -- the commands -----------------------------------------------------------------
    async def start(self) -> str:
        if self.active:  # keep the record: starting over is learn stop, then learn
            return f"already {self.status()} (stop with %sandbox learn stop)"
        self._tried.clear()
        self._names.clear()
        self.proposal = None
        self.active = True
        self.started_at = time.time()
        backend = self.controls.backend
        backend.learn_sink = self.observe_allowed
        if self.sees_allowed:
            backend.log_accepted = True
        try:
            await self._reapply()
        except BaseException:  # the old rules stay in force (atomic apply): not learning
            self.active, backend.learn_sink = False, None
            if self.sees_allowed:
                backend.log_accepted = False
            raise
        self.controls.learn_changed()
        seen = ("allowed and blocked connections (nftables log) and every lookup (DNS proxy)"
                if self.sees_allowed else
                "blocked connections, and allowed ones as the sandbox's guard reports them (Python only)")
        return (f"learning: cells run under the policy in force ({self.controls.policy.describe()}); "
                f"recording {seen}. Stop with %sandbox learn stop")

    async def stop(self) -> Proposal:
        if not self.active:
            raise LearnError("%sandbox learn stop: not learning (start with %sandbox learn)")
        self.active = False
        backend = self.controls.backend
        backend.learn_sink = None
        if self.sees_allowed:
            backend.log_accepted = False
        try:
            await self._reapply()
        except SandboxError as err:  # the rules still log accepted packets; nothing records them
            self.controls.log.warning("could not turn learn mode's reporting off: %s", err)
        self.proposal = propose(self.tried(), self.controls.admin, requests=self.controls.access.available)
        self.controls.learn_changed()
        return self.proposal

    async def _reapply(self) -> None:
        """Put the same policy in force again, compiled with or without the accepted log
        (where only the guard can tell: its view changes, not the enforcer)."""
        await self.controls.reapply(enforcer=self.sees_allowed)

    def status(self) -> str:
        if self.active:
            return (f"learning since {time.strftime('%H:%M:%S', time.localtime(self.started_at))}: "
                    f"{_count(len(self._tried), 'destination')} so far")
        if self.proposal is not None:
            return (f"not learning; last proposal: {_count(len(self.proposal.items), 'entry', 'entries')} "
                    f"({len(self.proposal.allowed())} you may allow)")
        return "not learning (start with %sandbox learn)"

    def status_text(self) -> str:
        """``%sandbox learn status``: the state, and each destination tried so far."""
        lines = [self.status()]
        if self.active:
            for t in self.tried():
                verdict = "blocked" if "blocked" in t.verdicts else "allowed"
                lines.append(f"  {t.destination()}  {verdict} ×{t.count} in cell "
                             f"{', '.join(map(str, sorted(t.cells)))} (seen by {', '.join(sorted(t.counts))})")
        return "\n".join(lines)

    def _need_proposal(self, verb: str) -> Proposal:
        if self.proposal is None:
            raise LearnError(f"%sandbox learn {verb}: nothing learned yet: run %sandbox learn, "
                             "the cells, then %sandbox learn stop")
        return self.proposal

    async def apply(self) -> str:
        """Allow what the proposal says you may (the same path as ``%sandbox allow``)."""
        proposal = self._need_proposal("apply")
        allowed = proposal.allowed()
        if not allowed:
            raise LearnError("%sandbox learn apply: nothing in the proposal is within your administrator's limits")
        new = self.controls.policy
        presets = [p.text for p in allowed if p.kind == "preset"]
        if presets:
            new = new.with_presets_added(*presets)
        entries = [parse_entry(p.text) for p in allowed if p.kind == "entry"]
        if entries:
            new = new.with_entries_added(*entries)
        if new.mode != "allowlist":
            new = new.with_mode("allowlist")
        text = await self.controls.apply(new)
        self.controls.grants.make_permanent(entries)
        beyond = [p.text for p in proposal.items if not p.allowed]
        if beyond:
            text += f" · not applied, beyond your administrator's limits: {', '.join(beyond)}"
        return text

    def insert_payload(self) -> dict:
        """The execute-reply payload that puts the proposal's lines into a new cell."""
        lines = self._need_proposal("insert").lines()
        if not lines:
            raise LearnError("%sandbox learn insert: the proposal has no line to insert (nothing the cells tried "
                             "can be written as an entry)")
        return {"source": "set_next_input", "text": "\n".join(lines) + "\n", "replace": False}


# -- the proposal ----------------------------------------------------------------------

def propose(tried: list[Tried], admin: AdminPolicy, *, requests: bool = False) -> Proposal:
    """The smallest allowlist that lets every destination in ``tried`` through.

    One entry per destination (a name when the program asked for one, else the address),
    with exactly the ports and protocol it used; a name only looked up (the lookup was
    refused, so no connection followed) gets the name with any port. Entries that a preset
    lists are replaced by the preset when it covers two or more of them.
    """
    groups: dict[str, dict] = {}
    for t in tried:
        target = t.host or t.ip
        if target is None:
            continue
        group = groups.setdefault(target, {"is_name": t.host is not None, "ports": {}, "lookup": False,
                                           "covers": [], "trusted": False, "any": False})
        group["covers"].append(f"{t.destination()} ×{t.count} in cell {', '.join(map(str, sorted(t.cells)))} "
                               f"[{'blocked' if 'blocked' in t.verdicts else 'allowed'}]")
        group["trusted"] |= t.trusted
        if t.protocol == "dns":
            group["lookup"] = True
        elif t.protocol in ("tcp", "udp") and t.port:
            group["ports"].setdefault(t.protocol, []).append((t.port, t.port))
        else:
            group["any"] = True
    items: list[Proposed] = []
    for target, group in groups.items():
        host = target if group["is_name"] else (f"[{target}]" if ":" in target else target)
        texts, note = [], ""
        if group["ports"] and not group["any"]:
            for protocol, ports in sorted(group["ports"].items()):
                spec = ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in merge_port_ranges(ports))
                texts.append(f"{host}:{spec}/{protocol}")
        else:
            texts.append(target)
            if group["lookup"] and not group["ports"]:
                note = "any port: the lookup was refused, so the program never said which port"
        for text in texts:
            try:
                entry = parse_entry(text)
            except InvalidEntry as err:  # shown, never put into a %sandbox line
                items.append(Proposed("invalid", text, group["covers"], False, str(err), "cannot be written as an entry"))
                continue
            items.append(Proposed("entry", str(entry), group["covers"], note=note,
                                  sandbox_reported=not group["trusted"]))
    decided: list[Proposed] = []
    for item in _use_presets(items):
        _decide(item, admin)
        if item.kind == "preset" and not item.allowed:
            # a preset beyond the ceiling: its entries one by one (some may be allowed)
            for part in item.parts:
                _decide(part, admin)
            decided += item.parts
        else:
            decided.append(item)
    return Proposal(decided, tried, requests)


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _safe_name(host: str) -> str:
    """A name as the sandbox reported it, made safe to show on one line: lowercase, no
    trailing dot, control characters and whitespace escaped, at most 253 characters."""
    host = host.lower().rstrip(".")[:253]
    if host.isprintable() and not any(ch.isspace() for ch in host):
        return host
    return "".join(ch if ch.isprintable() and not ch.isspace() else f"\\x{ord(ch):02x}" for ch in host)


def _covered_by(entry: Entry, preset: str) -> bool:
    for text in PRESETS[preset]:
        p = parse_entry(text)
        if entry.kind != "domain" or p.kind != "domain" or p.value != entry.value:
            continue
        if p.protocol is not None and entry.protocol not in (None, p.protocol):
            continue
        if p.ports and entry.ports and not all(any(a <= lo and hi <= b for a, b in p.ports) for lo, hi in entry.ports):
            continue
        return True
    return False


def _use_presets(items: list[Proposed]) -> list[Proposed]:
    for name in sorted(PRESETS):
        covered = [i for i in items if i.kind == "entry" and _entry_of(i) is not None and _covered_by(_entry_of(i), name)]
        if len(covered) >= 2:
            preset = Proposed("preset", name, [c for item in covered for c in item.covers],
                              sandbox_reported=all(i.sandbox_reported for i in covered), parts=covered)
            first = items.index(covered[0])
            items = [i for i in items if i not in covered]
            items.insert(min(first, len(items)), preset)
    return items


def _entry_of(item: Proposed) -> Entry | None:
    try:
        return parse_entry(item.text)
    except InvalidEntry:
        return None


def _decide(item: Proposed, admin: AdminPolicy) -> None:
    if item.reason:  # could not be written as an entry
        return
    entries = [parse_entry(e) for e in PRESETS[item.text]] if item.kind == "preset" else [parse_entry(item.text)]
    admin_given = set(admin.default_policy().expanded_entries())
    for entry in entries:
        if entry in admin_given:
            continue
        decision = admin.decide(entry)
        if not decision.allowed:
            item.allowed, item.reason = False, decision.reason
            item.requestable = item.kind == "entry" and decision.requestable
            return
    item.allowed, item.reason = True, "within your administrator's limits"


__all__ = ["LEARN_MIME", "Learner", "LearnError", "Proposal", "Proposed", "Tried", "propose"]
