"""Blocked-connection notices: merge what the guard, the watcher and the enforcer saw.

Three sources report blocked connections (DESIGN.md, "Blocked-connection notices"):
the agent's guard (``guarded``), the agent's SYN_SENT watcher (``dropped``) and the
enforcer's own log (``rejected`` / ``dropped``). :class:`NoticeBoard` merges them per
cell into one :class:`BlockedConnection` per destination, counts repeated attempts,
and renders each as the notice the user sees. The kernel owns one board per cell (and one
for what is blocked between cells).

Who reported a connection decides what the notice may offer. The enforcer's log, the DNS
proxy and the kernel itself are outside the sandbox (*verified*): their notices name the
remedy (``%sandbox allow …``) and the panel offers an Allow button. The guard and the watcher
run inside the sandbox, next to the code they watch, so anything they say may be forged:
their notices say "reported by the sandbox", offer no remedy and no button (an attacker
could otherwise word a notice that talks the user into opening a host of its choosing).

A cell shows at most ``limit`` notices of each kind (verified, reported by the sandbox);
every further destination is counted in one line, "and N more destinations".

The notice MIME type ``application/vnd.sandbox-kernel.notice+json`` is public API; only the
kernel publishes it (bundles from the sandbox never carry it to the notebook).
"""

from __future__ import annotations

import html
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from .agent.protocol import RECORD_PROTOCOLS, VERDICTS, BlockedRecord

NOTICE_MIME = "application/vnd.sandbox-kernel.notice+json"
#: sources outside the sandbox: only their notices may offer a remedy
VERIFIED_SOURCES = frozenset({"enforcer", "dns", "kernel"})
#: sources inside the sandbox (their word may be forged by the code they watch)
SANDBOX_SOURCES = frozenset({"guard", "watcher"})
#: every notice display id the kernel publishes starts with this; the sandbox may not use it
DISPLAY_ID_PREFIX = "sandbox-notice-"
#: notices of each kind one cell shows; further destinations are counted, not shown
NOTICE_LIMIT = 20
#: destinations counted beyond the limit, each once (past this, the count says "more than")
MORE_KEYS = 50_000
UNVERIFIED = ("reported by the sandbox (its guard or watcher), not confirmed by the enforcer: "
              "no action is offered")


def new_display_id() -> str:
    """An unguessable id for one notice (the sandbox never sees IOPub, so it cannot learn it)."""
    return DISPLAY_ID_PREFIX + secrets.token_hex(16)


@dataclass
class BlockedConnection:
    """One destination the policy stopped during a cell (the notice's JSON)."""

    host: str | None
    ip: str | None
    port: int | None
    protocol: str
    verdict: str
    process: dict | None
    policy: dict
    remedy: dict
    count: int = 1
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    sources: set = field(default_factory=set)
    attempts: set = field(default_factory=set)
    display_id: str = ""
    #: the JSON last shown in the notebook (the kernel re-publishes when it changed)
    published: dict | None = None

    def key(self) -> tuple:
        return (self.ip or self.host, self.port, self.protocol)

    @property
    def verified(self) -> bool:
        """Seen by a source outside the sandbox (enforcer, DNS proxy, kernel)."""
        return bool(self.sources & VERIFIED_SOURCES)

    def to_json(self) -> dict:
        return {
            "host": self.host, "ip": self.ip, "port": self.port, "protocol": self.protocol,
            "verdict": self.verdict, "process": self.process, "policy": self.policy,
            "count": self.count, "first_seen": self.first_seen, "last_seen": self.last_seen,
            "remedy": self.remedy, "reported_by": "kernel" if self.verified else "sandbox",
            "sources": sorted(self.sources),
        }

    # -- rendering --------------------------------------------------------------------
    def destination(self) -> str:
        where = self.host or (f"[{self.ip}]" if self.ip and ":" in self.ip else self.ip) or "?"
        return f"{where}:{self.port}" if self.port else where

    def headline(self) -> str:
        if self.protocol == "dns":
            details = "DNS answer not opened" if self.ip else "DNS lookup refused"
        else:
            details = ", ".join(x for x in (self.ip if self.host else None, self.protocol) if x)
        text = f"⛔ egress blocked: {self.destination()}" if self.verified else \
            f"⚠ reported by the sandbox: egress blocked: {self.destination()}"
        if details:
            text += f" ({details})"
        if self.process and self.process.get("name"):
            pid = self.process.get("pid")
            text += f" from {self.process['name']}" + (f" (pid {pid})" if pid else "")
        if self.count > 1:
            text += f" ×{self.count}"
        return text

    def advice(self) -> str:
        label = self.policy.get("label") or self.policy.get("mode", "")
        if self.remedy.get("action") == "allow":
            return f"policy: {label} · you may allow it: {self.remedy['command']}"
        if self.remedy.get("action") == "unverified":
            return f"policy: {label} · {UNVERIFIED}"
        text = f"policy: {label} · {forbidden_text(self.remedy.get('reason', ''))}"
        if self.remedy.get("request"):
            text += f" · Request access: {self.remedy['request']} --reason '…'"
        return text

    def text(self) -> str:
        return f"{self.headline()}\n   {self.advice()}"

    def html(self) -> str:
        verdict = {"rejected": "refused", "dropped": "dropped", "guarded": "stopped by the guard"}.get(
            self.verdict, self.verdict)
        head = html.escape(self.headline())
        if self.remedy.get("action") == "allow":
            tail = (f"policy: {html.escape(self.policy.get('label', ''))} · you may allow it: "
                    f"<code>{html.escape(self.remedy['command'])}</code>")
        elif self.remedy.get("action") == "unverified":
            tail = f"policy: {html.escape(self.policy.get('label', ''))} · <i>{html.escape(UNVERIFIED)}</i>"
        else:
            detail = forbidden_text(self.remedy.get("reason", ""))[len(FORBIDDEN):].lstrip(": ")
            tail = (f"policy: {html.escape(self.policy.get('label', ''))} · <b>{FORBIDDEN}</b>"
                    + (f": {html.escape(detail)}" if detail else ""))
            if self.remedy.get("request"):
                tail += (f" · <b>Request access</b>: <code>{html.escape(self.remedy['request'])} "
                         "--reason '…'</code>")
        # a notice the sandbox reported looks different: grey and dashed, never the red bar
        kind, colours = (("sandbox-kernel-notice", "border-left:4px solid #c62828;background:#fff3f3") if self.verified
                         else ("sandbox-kernel-notice sandbox-kernel-notice-unverified",
                               "border-left:4px dashed #888;background:#f4f4f4"))
        return (
            f'<div class="{kind}" style="{colours};'
            'color:#222;padding:4px 8px;margin:2px 0;font-family:var(--jp-code-font-family,monospace);'
            f'font-size:12px" title="{html.escape(verdict)}">{head}<br>'
            f'<span style="color:#555">{tail}</span></div>'
        )

    def bundle(self) -> dict:
        return {"text/plain": self.text(), "text/html": self.html(), NOTICE_MIME: self.to_json()}


class NoticeBoard:
    """The notices of one cell: merge, de-duplicate, count, cap.

    ``add`` returns the connection and whether it is new (publish ``display_data``) or
    changed (publish ``update_display_data``), or None when nothing visible changed. Past
    ``limit`` connections of a kind (verified / reported by the sandbox), a destination is
    only counted (:attr:`more`, :attr:`more_changed`): one line says how many.
    """

    def __init__(self, policy: Any, admin: Any, limit: int = NOTICE_LIMIT, requests: bool = False):
        self._policy = policy_view(policy)
        self._admin = admin
        self._limit = limit
        #: an administrator can be asked (hub mode): a verified notice of something beyond the
        #: ceiling that could be granted offers ``%sandbox request``
        self._requests = requests
        self._by_key: dict[tuple, BlockedConnection] = {}
        self._shown = {True: 0, False: 0}  # connections shown, by verified
        self._more_keys: set = set()
        #: destinations blocked beyond the limit (counted once each, up to MORE_KEYS)
        self.more = 0
        #: True when :attr:`more` grew since the kernel last showed it
        self.more_changed = False
        #: display id of the "and N more" line
        self.more_display_id = new_display_id()

    def __len__(self) -> int:
        return len(self._by_key)

    def total(self) -> int:
        """Destinations blocked in this cell, shown or counted."""
        return len(self._by_key) + self.more

    def records(self) -> list[dict]:
        return [c.to_json() for c in self._by_key.values()]

    def connections(self) -> list[BlockedConnection]:
        return list(self._by_key.values())

    def more_bundle(self) -> dict:
        n = f"more than {self.more:,}" if self.more >= MORE_KEYS else f"{self.more:,}"
        text = (f"⛔ and {n} more destination{'s' if self.more != 1 else ''} blocked in this cell, "
                f"not shown one by one (at most {self._limit} notices of each kind per cell)")
        return {"text/plain": text,
                "text/html": ('<div class="sandbox-kernel-notice-more" style="border-left:4px solid #c62828;'
                              'background:#fff3f3;color:#222;padding:4px 8px;margin:2px 0;font-size:12px">'
                              f"{html.escape(text)}</div>")}

    def add(self, record: BlockedRecord, source: str) -> tuple[BlockedConnection, bool] | None:
        """Merge one report (from ``source``: guard, watcher, enforcer, dns, kernel); a record
        from the sandbox may be anything, and one that does not check is left out."""
        clean = _clean(record)
        if clean is None:
            return None
        verified = source in VERIFIED_SOURCES
        key = (clean["ip"] or clean["host"], clean["port"], clean["protocol"])
        now = clean["last_seen"]
        existing = self._by_key.get(key)
        if existing is None and clean["host"] and clean["ip"]:
            # a guard lookup refusal is keyed by host; a later report may carry the address
            existing = self._by_key.pop((clean["host"], clean["port"], clean["protocol"]), None)
            if existing is not None:
                existing.ip = clean["ip"]
                self._by_key[key] = existing
        if existing is None:
            if self._shown[verified] >= self._limit:
                if key not in self._more_keys and len(self._more_keys) < MORE_KEYS:
                    self._more_keys.add(key)
                    self.more += 1
                    self.more_changed = True
                return None
            self._shown[verified] += 1
            conn = BlockedConnection(
                host=clean["host"], ip=clean["ip"], port=clean["port"], protocol=clean["protocol"],
                verdict=clean["verdict"], process=clean["process"], policy=self._policy,
                remedy=self._remedy(clean, verified),
                first_seen=clean["first_seen"], last_seen=now,
                sources={source}, display_id=new_display_id(),
            )
            if clean["attempt"] is not None:
                conn.attempts.add(clean["attempt"])
            self._by_key[key] = conn
            return conn, True
        changed = False
        if verified and not existing.verified:
            # the enforcer (or the DNS proxy) confirms what the sandbox reported: now it counts;
            # a name only the sandbox gave goes (it may not label what the kernel shows)
            existing.remedy, changed = self._remedy(clean, True), True
            existing.host = clean["host"] if clean["host"] else (None if existing.ip else existing.host)
        if clean["verdict"] == "guarded" and existing.verdict != "guarded":
            existing.verdict, changed = "guarded", True  # the guard stopped the code's own call
        if clean["host"] and not existing.host and (verified or not existing.verified):
            # the sandbox may not put a name of its choosing on a notice the enforcer made
            existing.host, changed = clean["host"], True
        if clean["process"] and not existing.process:
            existing.process, changed = clean["process"], True
        existing.last_seen = max(existing.last_seen, now)
        # the enforcer and the watcher can see the same attempt: count it once
        same_attempt = (clean["attempt"] is not None and clean["attempt"] in existing.attempts) or (
            source == "watcher" and "enforcer" in existing.sources)
        if not same_attempt:
            existing.count = min(existing.count + max(1, clean["count"]), 1_000_000_000)
            changed = True
        if clean["attempt"] is not None and len(existing.attempts) < 1024:
            existing.attempts.add(clean["attempt"])
        existing.sources.add(source)
        return (existing, False) if changed else None

    def _remedy(self, clean: dict, verified: bool) -> dict:
        """What the user may do. Only a verified report may name a command; saying that the
        administrator forbids a destination offers nothing, so any report may say it."""
        if self._admin is None:
            return {"action": "forbidden", "reason": "no administrator policy is configured"}
        decision = self._admin.decide_connection(clean["ip"] or clean["host"], clean["port"],
                                                 clean["protocol"], clean["host"])
        if decision.allowed and decision.entry is not None:
            if not verified:
                return {"action": "unverified", "reason": UNVERIFIED}
            return {"action": "allow", "command": f"%sandbox allow {decision.entry}", "entry": str(decision.entry)}
        remedy = {"action": "forbidden", "reason": decision.reason}
        if self._requests and verified and decision.requestable and decision.entry is not None:
            remedy.update(request=f"%sandbox request {decision.entry}", entry=str(decision.entry))
        return remedy


FORBIDDEN = "not permitted by your administrator"


def forbidden_text(reason: str) -> str:
    """``not permitted by your administrator: <why>`` without saying it twice."""
    reason = reason.strip()
    if reason.startswith(FORBIDDEN):
        return reason
    return f"{FORBIDDEN}: {reason}" if reason else FORBIDDEN


def policy_view(policy: Any) -> dict:
    """``{mode, name, label}`` of a policy, for notices and metadata."""
    if policy is None:
        return {"mode": "deny", "name": "default", "label": "default-deny"}
    return {"mode": getattr(policy, "mode", "deny"), "name": getattr(policy, "name", "default"),
            "label": policy.describe() if hasattr(policy, "describe") else "default-deny"}


def _clean(record: Any) -> dict | None:
    """Validate a report (it may come from the untrusted sandbox): the fields of a
    :class:`BlockedRecord`, typed, or None."""
    if not isinstance(record, dict):
        return None
    ip = record.get("ip")
    host = record.get("host")
    ip = ip if isinstance(ip, str) and 0 < len(ip) <= 64 else None
    host = host.lower() if isinstance(host, str) and 0 < len(host) <= 253 else None
    if ip is None and host is None:
        return None
    port = record.get("port")
    port = port if isinstance(port, int) and not isinstance(port, bool) and 0 <= port <= 65535 else None
    protocol = record.get("protocol") if record.get("protocol") in RECORD_PROTOCOLS else "other"
    verdict = record.get("verdict") if record.get("verdict") in VERDICTS else "dropped"
    process = record.get("process")
    if isinstance(process, dict):
        name, pid = process.get("name"), process.get("pid")
        process = {"name": str(name)[:64] if name else None,
                   "pid": pid if isinstance(pid, int) and not isinstance(pid, bool) else None}
    else:
        process = None
    now = time.time()
    first = record.get("first_seen")
    last = record.get("last_seen")
    count = record.get("count")
    attempt = record.get("attempt")
    return {
        "ip": ip, "host": host, "port": port, "protocol": protocol, "verdict": verdict, "process": process,
        "first_seen": float(first) if isinstance(first, (int, float)) else now,
        "last_seen": float(last) if isinstance(last, (int, float)) else now,
        "count": count if isinstance(count, int) and 0 < count < 1_000_000 else 1,
        "attempt": attempt if isinstance(attempt, (int, str)) else None,
    }
