"""The admin page of the sandbox service: every user's sandboxes, the ceilings (with exam mode
for a class in one click), and the audit log, in the browser.

Login is the JupyterHub way (``HubOAuth``: a hub admin opening ``/services/sandbox/admin`` is
sent through the hub's login and back with a cookie); the kernels' token API is unchanged.
Changes go through the same :class:`~sandbox_kernel.hub.manager.Manager` methods as the API,
so they are checked and audited the same way, with the admin's name as ``by``. Forms carry
tornado's XSRF token (the cookie alone cannot change anything). The page is server-rendered
HTML with no script and nothing from elsewhere; everything user-controlled (user and group
names, policy entries, audit fields) is escaped.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from urllib.parse import urlparse
from html import escape
from typing import Any

from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated
from tornado import web

from ..errors import PolicyError
from .manager import CEILING_KEYS, NotFound

#: the overrides "exam mode" sets: no egress at all, and no changes by users
EXAM_MODE = {"locked": True, "mode": "deny", "entries": [], "presets": []}
AUDIT_ROWS = 100
#: the form's result, shown once by the page it redirects to
FLASH_COOKIE = "sandbox-admin-flash"
FLASH_MAX_AGE_DAYS = 1 / 1440  # a minute

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5rem 2rem;color:#1f2328;max-width:80rem}
h1{font-size:1.4rem;margin:0 0 .2rem}h2{font-size:1.1rem;margin:1.6rem 0 .5rem}
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #d0d7de;
vertical-align:top}th{background:#f6f8fa}code{font-size:.9em}.muted{color:#656d76}.ok{color:#1a7f37}
.bad{color:#cf222e}form.inline{display:inline}button{font:inherit;padding:.2rem .7rem;cursor:pointer}
.exam{background:#cf222e;color:#fff;border:1px solid #a40e26;border-radius:4px}
.box{border:1px solid #d0d7de;border-radius:6px;padding:.8rem 1rem;margin:.5rem 0}
input,select{font:inherit;padding:.15rem .3rem}
"""


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return ""
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _conformed(sb) -> str:
    """When a ceiling change last forced the sandbox's policy, by whom and why (escaped)."""
    c = sb.conformed if isinstance(sb.conformed, dict) else None
    if not c:
        return ""
    return (f"{_when(c.get('time'))} by {escape(str(c.get('by')))}"
            f"<br><span class=muted>{escape(str(c.get('reason') or ''))}</span>")


def _summary(event: dict) -> str:
    """One line for an audit record (already escaped)."""
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
    else:
        text = str(kind)
    reason = event.get("reason")
    return escape(text + (f" — {reason}" if reason else ""))


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

    def write_error(self, status_code, **kwargs):
        exc = kwargs.get("exc_info", (None, None, None))[1]
        message = exc.log_message if isinstance(exc, web.HTTPError) and exc.log_message else self._reason
        elsewhere = getattr(self, "_elsewhere", None)
        link = (f"<p>The admin page is at <a href='{escape(elsewhere)}'>{escape(elsewhere)}</a>.</p>"
                if elsewhere else "")
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(f"<!doctype html><title>{status_code}</title><style>{STYLE}</style>"
                    f"<h1>{status_code} {escape(self._reason)}</h1><p>{escape(message)}</p>{link}")


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

    def render_page(self, me: str, user_filter: str, message: str, audit: tuple[list[dict], int]) -> str:
        m, prefix = self.manager, self.service.url_prefix
        xsrf = self.xsrf_form_html()
        user = self.current_user
        why = "hub admin" if user.get("admin") else "member of " + ", ".join(
            sorted(set(user.get("groups") or []) & set(self.service.admin_groups)))
        out = [f"<!doctype html><html lang=en><meta charset=utf-8><title>Sandbox service — admin</title>"
               f"<style>{STYLE}</style><h1>Sandbox service</h1>"
               f"<p class=muted>Signed in as <b>{escape(me)}</b> ({escape(why)}). Backend "
               f"<code>{escape(m.backend_name)}</code>.</p>"]
        if message:
            out.append(f"<p class=box id=message>{escape(message)}</p>")

        # ceilings
        base = {key: getattr(m.base, key) for key in CEILING_KEYS}
        out.append("<h2>Ceilings</h2><div class=box><b>Base</b> (the service's configuration): "
                   f"<code>{escape(json.dumps(base, default=str))}</code></div>")
        out.append("<table id=overrides><tr><th>override of</th><th>settings</th><th></th></tr>")
        overrides = [(kind, name, layer) for kind in ("groups", "users")
                     for name, layer in sorted(m.ceilings[kind].items())]
        for kind, name, layer in overrides:
            label = "exam mode" if all(layer.get(k) == v for k, v in EXAM_MODE.items()) else ""
            out.append(
                f"<tr><td>{kind[:-1]} <b>{escape(name)}</b> <span class=bad>{label}</span></td>"
                f"<td><code>{escape(json.dumps(layer, default=str))}</code></td>"
                f"<td><form class=inline method=post action='{escape(prefix)}admin/ceilings'>{xsrf}"
                f"<input type=hidden name=kind value='{kind}'><input type=hidden name=name value='{escape(name)}'>"
                f"<button name=action value=clear>Clear</button></form></td></tr>")
        if not overrides:
            out.append("<tr><td colspan=3 class=muted>none: every user has the base ceiling</td></tr>")
        out.append("</table>")
        groups = sorted({g for gs in m.user_groups.values() for g in gs})
        options = "".join(f"<option value='{escape(g)}'>" for g in groups)
        out.append(
            f"<form id=set-ceiling class=box method=post action='{escape(prefix)}admin/ceilings'>{xsrf}"
            "<select name=kind><option value=groups>group</option><option value=users>user</option></select> "
            f"<input name=name required placeholder='group or user name' list=known-groups>"
            f"<datalist id=known-groups>{options}</datalist> "
            "<button class=exam name=action value=exam>Exam mode: no egress, locked</button> "
            "<button name=action value=clear>Clear override</button></form>")

        # sandboxes
        out.append("<h2>Sandboxes</h2><table id=sandboxes><tr><th>user</th><th>sandbox</th><th>state</th>"
                   "<th>backend</th><th>policy</th><th>started</th><th>blocked</th><th>kernel attached</th>"
                   "<th>conformed</th></tr>")
        boxes = sorted(m.sandboxes.values(), key=lambda sb: (sb.user, sb.created))
        for sb in boxes:
            entries = ", ".join(str(e) for e in sb.policy.entries) + \
                ("; presets " + ", ".join(sb.policy.presets) if sb.policy.presets else "")
            state_class = "ok" if sb.state == "running" else "muted"
            out.append(
                f"<tr><td>{escape(sb.user)}</td><td><code>{escape(sb.id)}</code></td>"
                f"<td class={state_class}>{escape(sb.state)}</td><td>{escape(sb.backend_name)}</td>"
                f"<td>{escape(sb.policy.describe())}<br><span class=muted>{escape(entries)}</span></td>"
                f"<td>{_when(sb.started)}</td><td class=blocked>{sb.blocked}</td>"
                f"<td>{'yes' if sb.subscriber is not None else 'no'}</td><td class=conformed>{_conformed(sb)}</td></tr>")
        if not boxes:
            out.append("<tr><td colspan=9 class=muted>no sandboxes</td></tr>")
        out.append("</table>")

        # users: what each has running against the per-user limit, and the groups the hub says
        limit = m.max_per_user
        out.append(f"<h2>Users</h2><p class=muted>at most {limit if limit > 0 else 'any number of'} "
                   "sandboxes starting or running per user</p><table id=users><tr><th>user</th><th>groups</th>"
                   "<th>starting or running</th><th>records</th></tr>")
        names = sorted({sb.user for sb in m.sandboxes.values()} | set(m.user_groups))
        for name in names:
            active = len(m.active(name))
            full = limit > 0 and active >= limit
            out.append(f"<tr><td>{escape(name)}</td><td>{escape(', '.join(m.user_groups.get(name, [])))}</td>"
                       f"<td class='{'bad' if full else ''} active'>{active}{f' of {limit}' if limit > 0 else ''}</td>"
                       f"<td>{len(m.list(name))}</td></tr>")
        if not names:
            out.append("<tr><td colspan=4 class=muted>nobody yet</td></tr>")
        out.append("</table>")

        # audit log
        events, skipped = audit
        events = events[::-1]
        out.append(f"<h2>Audit log</h2><form method=get action='{escape(prefix)}admin'>"
                   f"<input name=user value='{escape(user_filter)}' placeholder='user'> "
                   f"<button>Filter</button></form>"
                   f"<p class=muted>the newest {AUDIT_ROWS} records; more: <code>GET api/audit?limit=N</code>"
                   + (f"; <span class=bad id=skipped>{skipped} unreadable line(s) skipped</span>" if skipped else "")
                   + "</p>"
                   "<table id=audit><tr><th>time</th><th>user</th><th>by</th><th>result</th><th>what</th></tr>")
        for event in events:
            result = str(event.get("result") or "")
            css = "bad" if result in ("refused", "failed") or event.get("event") in ("blocked", "denied") else ""
            out.append(f"<tr><td>{_when(event.get('time'))}</td><td>{escape(str(event.get('user') or ''))}</td>"
                       f"<td>{escape(str(event.get('by') or ''))}</td><td class={css}>{escape(result)}</td>"
                       f"<td>{_summary(event)}</td></tr>")
        out.append("</table></html>")
        return "".join(out)


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
        self.set_signed_cookie(FLASH_COOKIE, message, expires_days=None, path=self.service.url_prefix + "admin",
                               httponly=True, samesite="Strict",
                               secure=self.request.protocol == "https")
        self.redirect(f"{self.service.url_prefix}admin")


class OAuthCallbackHandler(HubOAuthCallbackHandler):
    """The hub's login comes back here, on the admin origin only (the same checks as the
    page: a login completed on the shared origin would leave a cookie there)."""

    def initialize(self, hub_auth=None):
        if hub_auth is not None:
            self.hub_auth = hub_auth

    service = _AdminHandler.service
    set_default_headers = _AdminHandler.set_default_headers
    navigation_only = True
    prepare = _AdminHandler.prepare
    write_error = _AdminHandler.write_error


def admin_routes(prefix: str, hub_auth) -> list[tuple]:
    return [
        (prefix + "admin", AdminPageHandler, {"hub_auth": hub_auth}),
        (prefix + "admin/ceilings", AdminCeilingHandler, {"hub_auth": hub_auth}),
        (prefix + "oauth_callback", OAuthCallbackHandler, {"hub_auth": hub_auth}),
        (prefix, web.RedirectHandler, {"url": prefix + "admin"}),  # there: the origin is checked
    ]
