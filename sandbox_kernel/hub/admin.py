"""The admin page of the sandbox service: users' requests for access (grant or deny), the
grants in force, every user's sandboxes, the ceilings (with exam mode for a class in one
click), and the audit log, in the browser.

Login is the JupyterHub way (``HubOAuth``: a hub admin opening ``/services/sandbox/admin`` is
sent through the hub's login and back with a cookie); the kernels' token API is unchanged.
Changes go through the same :class:`~sandbox_kernel.hub.manager.Manager` methods as the API,
so they are checked and audited the same way, with the admin's name as ``by``. Forms carry
tornado's XSRF token (the cookie alone cannot change anything). The page is server-rendered
HTML with no script and nothing from elsewhere, from tornado templates (``templates/``) with
autoescape on: everything user-controlled (user and group names, policy entries, reasons,
audit fields) is HTML-escaped by the template engine, not by hand.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from tornado import web

from ..errors import PolicyError
from .access import AccessRefused
from .manager import CEILING_KEYS, NotFound

#: the overrides "exam mode" sets: no egress at all, and no changes by users
EXAM_MODE = {"locked": True, "mode": "deny", "entries": [], "presets": []}
AUDIT_ROWS = 100
#: the form's result, shown once by the page it redirects to
FLASH_COOKIE = "sandbox-admin-flash"
FLASH_MAX_AGE_DAYS = 1 / 1440  # a minute

#: the page's templates (tornado, autoescaped: every ``{{ }}`` is HTML-escaped)
TEMPLATES = Path(__file__).with_name("templates")
#: how long a grant lasts, as the page offers it: (seconds or "" for until revoked, label)
DURATIONS = (("", "until revoked"), ("600", "for 10 minutes"), ("3600", "for 1 hour"),
             ("14400", "for 4 hours"), ("86400", "for 1 day"), ("604800", "for 1 week"))
DECIDED_ROWS = 20


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return ""
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _summary(event: dict) -> str:
    """One line for an audit record (plain text: the template escapes it)."""
    kind = event.get("event")
    if kind == "policy":
        to = event.get("to") or {}
        entries = ", ".join(str(e) for e in to.get("entries") or []) if isinstance(to, dict) else ""
        text = f"policy → {to.get('mode', '?') if isinstance(to, dict) else '?'} {entries}"
    elif kind == "ceiling":
        text = f"ceiling of {json.dumps(event.get('target'))} → {json.dumps(event.get('to'))}"
    elif kind == "blocked":
        text = f"blocked {event.get('host') or event.get('ip')}:{event.get('port')} ({event.get('source')})"
    elif kind == "sandbox":
        text = f"sandbox {event.get('action')}"
    elif kind == "denied":
        text = f"denied {event.get('request')}"
    elif kind == "access":
        entries = event.get("entries")
        entries = ", ".join(str(e) for e in entries) if isinstance(entries, list) else str(entries or "")
        text = f"access {event.get('action')} {event.get('request_id') or event.get('grant') or ''} {entries}".rstrip()
    else:
        text = str(kind)
    reason = event.get("reason")
    return text + (f" — {reason}" if reason else "")


class _AdminHandler(HubOAuthenticated, web.RequestHandler):
    """Cookie (HubOAuth) authentication; only admins get past :meth:`admin_caller`."""

    def initialize(self, hub_auth=None):
        if hub_auth is not None:
            self.hub_auth = hub_auth

    @property
    def service(self):
        return self.settings["sandbox_service"]

    @property
    def manager(self):
        return self.service.manager

    def set_default_headers(self):
        # also on error pages: nothing loads, nothing runs, no framing, nothing cached; a window
        # that opened this page keeps no handle on it, other origins cannot embed it
        self.set_header("Content-Security-Policy",
                        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'")
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("Cache-Control", "no-store")
        self.set_header("Cross-Origin-Opener-Policy", "same-origin")
        self.set_header("Cross-Origin-Resource-Policy", "same-origin")

    #: what a request must be, by its Fetch Metadata (sent by every current browser; a page's
    #: script cannot forge it): the page and the login only as a top-level navigation
    navigation_only = True

    def prepare(self):
        """The page exists only on ``admin_origin``: on any other origin (the hub's, shared with
        users' servers) it answers with a link and nothing else, before any login, so no
        cookie of the service is ever set there and no script there can read or drive it. On
        its origin it refuses what only a script does: fetch/XHR or a frame (``Sec-Fetch-Mode``
        / ``Sec-Fetch-Dest``), and a form post from another origin (``Sec-Fetch-Site``)."""
        origin = self.service.admin_origin
        if not origin:
            raise web.HTTPError(403, "the admin page is off: on the hub's own address it would share its origin with "
                                     "users' servers, whose pages could read and drive it. The hub's administrator "
                                     "gives it an origin of its own: c.SandboxService.admin_origin (docs/hub.md)")
        if self.request.host.lower() != urlparse(origin).netloc.lower():
            self._elsewhere = origin + self.service.url_prefix + "admin"
            raise web.HTTPError(403, "the admin page is not served on this origin, which users' servers share")
        headers = self.request.headers
        mode, dest, site = (headers.get(f"Sec-Fetch-{h}") for h in ("Mode", "Dest", "Site"))
        if mode is not None and self.navigation_only and (mode != "navigate" or dest not in ("document", None)):
            raise web.HTTPError(403, f"the admin page is only opened as a page (this request: {mode}, {dest})")
        if site is not None and self.request.method == "POST" and site != "same-origin":
            raise web.HTTPError(403, f"a change must come from the admin page itself (this one is {site})")

    def admin_caller(self) -> str:
        user = self.current_user
        groups = [g for g in user.get("groups") or [] if isinstance(g, str)]
        if not (user.get("admin") or set(groups) & set(self.service.admin_groups)):
            self.manager.audit.write("denied", by=user.get("name"), request=f"{self.request.method} {self.request.path}",
                                     reason="not an admin")
            raise web.HTTPError(403, "only hub admins (or members of the admin groups) may open this page")
        return user["name"]

    def get_template_path(self):
        return str(TEMPLATES)

    def write_error(self, status_code, **kwargs):
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = exc.log_message if isinstance(exc, web.HTTPError) and exc.log_message else self._reason
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(self.render_string("admin_error.html", status_code=status_code, reason=self._reason,
                                       message=message, elsewhere=getattr(self, "_elsewhere", None)))

    def flash(self, message: str) -> None:
        """Show ``message`` once on the page the form redirects to (a cookie signed with the
        service's secret: a link or a page elsewhere cannot put words there)."""
        self.set_signed_cookie(FLASH_COOKIE, message, expires_days=None, path=self.service.url_prefix + "admin",
                               httponly=True, samesite="Strict", secure=self.request.protocol == "https")
        self.redirect(f"{self.service.url_prefix}admin")


class AdminPageHandler(_AdminHandler):
    @web.authenticated
    async def get(self):
        me = self.admin_caller()
        user_filter = (self.get_query_argument("user", "") or "")[:200]
        # the newest records only, read in a thread: the log may be large, the loop serves kernels
        audit = await asyncio.to_thread(self.manager.audit.tail, AUDIT_ROWS, user_filter or None)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(self.render_page(me, user_filter, self.change_message(), audit))

    def change_message(self) -> str:
        """What the last form did (its flash cookie, signed with the service's secret: a link or
        a page elsewhere cannot put words here), shown once."""
        raw = self.get_signed_cookie(FLASH_COOKIE, max_age_days=FLASH_MAX_AGE_DAYS)
        if raw is None:
            return ""
        self.clear_cookie(FLASH_COOKIE, path=self.service.url_prefix + "admin")
        return raw.decode("utf-8", "replace")

    def render_page(self, me: str, user_filter: str, message: str, audit: tuple[list[dict], int]) -> bytes:
        m = self.manager
        user = self.current_user
        why = "hub admin" if user.get("admin") else "member of " + ", ".join(
            sorted(set(user.get("groups") or []) & set(self.service.admin_groups)))
        overrides = [(kind, name, json.dumps(layer, default=str),
                      all(layer.get(k) == v for k, v in EXAM_MODE.items()))
                     for kind in ("groups", "users") for name, layer in sorted(m.ceilings[kind].items())]
        limit = m.max_per_user
        names = sorted({sb.user for sb in m.sandboxes.values()} | set(m.user_groups))
        decided = sorted((r for r in m.access.requests.values() if r.state != "pending"),
                         key=lambda r: r.decided_at or r.time, reverse=True)[:DECIDED_ROWS]
        events, skipped = audit
        return self.render_string(
            "admin.html", me=me, why=why, backend=m.backend_name, message=message, prefix=self.service.url_prefix,
            pending=m.access.pending(), grants=m.access.active_grants(), decided=decided,
            user_groups=m.user_groups, durations=DURATIONS,
            base=json.dumps({key: getattr(m.base, key) for key in CEILING_KEYS}, default=str),
            overrides=overrides, known_groups=sorted({g for gs in m.user_groups.values() for g in gs}),
            boxes=sorted(m.sandboxes.values(), key=lambda sb: (sb.user, sb.created)),
            entries_of=lambda sb: ", ".join(str(e) for e in sb.policy.entries)
            + ("; presets " + ", ".join(sb.policy.presets) if sb.policy.presets else ""),
            limit=limit, users=[(n, m.user_groups.get(n, []), len(m.active(n)), len(m.list(n))) for n in names],
            user_filter=user_filter, audit_rows=AUDIT_ROWS, skipped=skipped, events=events[::-1],
            when=_when, summary=_summary)


class AdminCeilingHandler(_AdminHandler):
    """The page's forms: ``action=exam|clear`` for ``kind=groups|users`` and ``name``."""

    @web.authenticated
    async def post(self):
        me = self.admin_caller()  # XSRF was checked before this (tornado, xsrf_cookies)
        kind, name, action = (self.get_body_argument(k, "").strip() for k in ("kind", "name", "action"))
        if kind not in ("groups", "users") or not name or action not in ("exam", "clear"):
            raise web.HTTPError(400, "say kind (groups or users), name, and action (exam or clear)")
        try:
            result = await self.manager.set_ceiling(me, kind, name, dict(EXAM_MODE) if action == "exam" else None)
        except (PolicyError, NotFound) as err:
            raise web.HTTPError(400, str(err)) from None
        what = "exam mode" if action == "exam" else "the base ceiling"
        conformed = result["conformed"]
        message = (f"{kind[:-1]} {name}: {what} now; {len(conformed)} running sandbox(es) brought under it"
                   + (f": {', '.join(conformed)}" if conformed else ""))
        if result.get("members") is not None:
            message += f"; members: {', '.join(result['members']) or 'none'}"
        if result.get("warning"):
            message += f" (warning: {result['warning']})"
        self.flash(message)


class AdminRequestHandler(_AdminHandler):
    """The requests list's forms: ``request``, ``action=grant|deny``, ``scope`` (``user`` or
    ``group:NAME``), ``for`` (seconds, empty: until revoked), ``reason``. The same
    ``AccessDesk.decide`` as ``POST api/requests/ID/grant|deny``: checked and audited alike."""

    @web.authenticated
    async def post(self):
        me = self.admin_caller()  # XSRF was checked before this (tornado, xsrf_cookies)
        rid, action, scope, seconds, reason = (self.get_body_argument(k, "").strip()
                                               for k in ("request", "action", "scope", "for", "reason"))
        try:
            req = await self.manager.access.decide(me, rid, action, scope=scope or "user", seconds=seconds or None,
                                                   answer=reason)
        except AccessRefused as err:
            self.flash(f"request {rid}: not done: {err}")
            return
        if req.state == "granted":
            grant = self.manager.access.grants.get(req.grant or "")
            self.flash(f"request {req.id} of {req.user} granted: {grant.describe() if grant else ', '.join(req.entries)}")
        else:
            self.flash(f"request {req.id} of {req.user} denied: {req.answer}")


class AdminGrantHandler(_AdminHandler):
    """The grants list's Revoke buttons: ``grant``, ``action=revoke``."""

    @web.authenticated
    async def post(self):
        me = self.admin_caller()
        gid, action = (self.get_body_argument(k, "").strip() for k in ("grant", "action"))
        if action != "revoke":
            raise web.HTTPError(400, "say grant and action (revoke)")
        try:
            grant = await self.manager.access.revoke(me, gid)
        except AccessRefused as err:
            self.flash(f"grant {gid}: not done: {err}")
            return
        self.flash(f"grant {grant.id} revoked: {grant.describe()}")


class OAuthCallbackHandler(HubOAuthCallbackHandler):
    """The hub's login comes back here, on the admin origin only (the same checks as the
    page: a login completed on the shared origin would leave a cookie there)."""

    def initialize(self, hub_auth=None):
        if hub_auth is not None:
            self.hub_auth = hub_auth

    service = _AdminHandler.service
    set_default_headers = _AdminHandler.set_default_headers
    get_template_path = _AdminHandler.get_template_path
    navigation_only = True
    prepare = _AdminHandler.prepare
    write_error = _AdminHandler.write_error


def admin_routes(prefix: str, hub_auth) -> list[tuple]:
    return [
        (prefix + "admin", AdminPageHandler, {"hub_auth": hub_auth}),
        (prefix + "admin/ceilings", AdminCeilingHandler, {"hub_auth": hub_auth}),
        (prefix + "admin/requests", AdminRequestHandler, {"hub_auth": hub_auth}),
        (prefix + "admin/grants", AdminGrantHandler, {"hub_auth": hub_auth}),
        (prefix + "oauth_callback", OAuthCallbackHandler, {"hub_auth": hub_auth}),
        (prefix, web.RedirectHandler, {"url": prefix + "admin"}),  # there: the origin is checked
    ]
