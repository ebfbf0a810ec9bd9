"""The sandbox service: a JupyterHub service that runs users' sandboxes for their kernels.

Run by the hub (``c.JupyterHub.services``, managed) or next to it (external, with ``url`` and
``api_token``)::

    python -m sandbox_kernel.hub --config /etc/sandbox-kernel/hub_config.py

Every request carries the caller's JupyterHub API token (``Authorization: token …``; a
kernel uses its user server's ``JUPYTERHUB_API_TOKEN``). The service asks the hub who the
token belongs to (``HubAuth``) and requires the token to hold
``access:services!service=<this service>``; it then acts only on that user's sandboxes.
The backend's credentials (root on this machine for the local backend, the Kubernetes
service account) are held here and nowhere else; the execution stream is proxied over a
websocket, so no credential ever reaches the user's server. See docs/hub.md.

API (under the service prefix, e.g. ``/services/sandbox/``), all JSON:

=======  ===================================  ==============================================
GET      api/health                           no token needed: ``{"ok": true}``
GET      api/sandboxes                        the caller's sandboxes
POST     api/sandboxes                        ``{kernel_id, policy?, wait?}``: start (or return) a sandbox;
                                              ``"wait": false``: 202 at once, state "starting";
                                              429 ``limit``: the user has max_sandboxes_per_user
GET      api/sandboxes/ID                     one of the caller's sandboxes (``state``, ``progress`` lines)
DELETE   api/sandboxes/ID[?forget=1]          stop it (``forget``: and drop its record)
GET/PUT  api/sandboxes/ID/policy              the policy; PUT ``{policy}`` checks the ceiling
POST     api/sandboxes/ID/interrupt           interrupt the running cell
WS       api/sandboxes/ID/stream              the agent protocol, one frame per message
GET      api/ceiling                          the caller's effective ceiling
GET      api/ceilings                         admins: every per-user and per-group override
PUT      api/ceilings/users|groups/NAME       admins: set overrides (``{"locked": true}`` …)
DELETE   api/ceilings/users|groups/NAME       admins: remove them
GET      api/audit[?user=NAME&limit=N]       admins: the newest N (1000) audit records, ``skipped_lines``
GET      api/requests[?all=1]                 the caller's requests for access (admins, ``all``: everyone's)
POST     api/requests                         ``{sandbox, entries, reason?}``: ask an administrator for entries
                                              beyond the ceiling (access.py); 201 with the request
POST     api/requests/ID/grant                admins: ``{scope: "user"|"group:NAME", for: seconds|null, reason?}``
POST     api/requests/ID/deny                 admins: ``{reason}``
GET      api/grants                           admins: the grants in force
DELETE   api/grants/ID                        admins: revoke one
GET      admin (and the prefix itself)        admins, in a browser: the admin page (admin.py)
=======  ===================================  ==============================================

Another user's sandbox answers 404, exactly like a missing one (and the attempt is audited).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from urllib.parse import urlparse

from tornado import web, websocket
from traitlets import Enum, Float, Instance, Integer, List, Unicode, default
from traitlets.config import Application

from ..agent import protocol
from ..config import env_default
from ..errors import PolicyError, SandboxError, SandboxStartError
from ..policy.admin import AdminPolicy, CeilingRefused
from .access import AccessRefused
from .manager import Forbidden, Manager, NotFound, NotRunning, TooManySandboxes, jsonable

_TOKEN = re.compile(r"(?:token|bearer)\s+(\S+)\s*$", re.IGNORECASE)
WS_MAX_MESSAGE = protocol.MAX_FRAME + 1024
#: most entries a policy in a request may have before it is parsed at all (parsing tens of
#: thousands would hold the event loop; a ceiling's max_entries is far below this)
MAX_REQUEST_ENTRIES = 1000
#: the longest error message a reply carries (an error may quote the input)
MAX_MESSAGE = 500
#: a refused body up to this size is read and dropped after the 413 (so the client, and the
#: hub's proxy in between, receive the answer instead of a reset); a larger one is cut off
DRAIN_MAX = 128 * 1024 * 1024


class Caller:
    def __init__(self, name: str, admin: bool, groups: list[str]):
        self.name, self.admin, self.groups = name, admin, groups


async def identify(handler: web.RequestHandler) -> Caller:
    """Who sent this request, according to the hub. 401 without a token, 403 for a token the
    hub does not know or one without access to this service."""
    service: SandboxService = handler.settings["sandbox_service"]
    match = _TOKEN.match(handler.request.headers.get("Authorization", ""))
    if not match:
        raise web.HTTPError(401, "a JupyterHub API token is required (Authorization: token …)")
    model = await service.hub_auth.user_for_token(match.group(1), sync=False)
    if not model:
        raise web.HTTPError(403, "the hub does not recognise this token")
    if model.get("kind", "user") != "user":
        raise web.HTTPError(403, "only users have sandboxes (this token belongs to a service)")
    if service.hub_auth.access_scopes and not service.hub_auth.check_scopes(service.hub_auth.access_scopes, model):
        raise web.HTTPError(403, f"this token lacks {' or '.join(sorted(service.hub_auth.access_scopes))}")
    groups = [g for g in model.get("groups") or [] if isinstance(g, str)]
    name = model["name"]
    if service.manager.note_groups(name, groups):
        # joined (or left) a group: a group's ceiling reaches their running sandboxes now
        await service.manager.conform_users({name}, "service", f"{name}'s groups changed")
    admin = bool(model.get("admin")) or bool(set(groups) & set(service.admin_groups))
    return Caller(name, admin, groups)


class _Handler(web.RequestHandler):
    """The token API. Bodies are streamed (``_stream_request_body``) so that one whose
    declared length is over ``max_body_size`` is refused (413, audited as a summary) before
    any of it is read or parsed; the HTTP server closes a longer chunked body on its own."""

    caller: Caller
    _stream_request_body = True
    _received: bytearray | None = None

    @property
    def service(self) -> SandboxService:
        return self.settings["sandbox_service"]

    @property
    def manager(self) -> Manager:
        return self.service.manager

    async def prepare(self):
        try:
            declared = int(self.request.headers.get("Content-Length", "0"))
        except ValueError:
            declared = 0  # tornado refuses a malformed length itself
        limit = self.service.max_body_size
        try:
            self.caller = await identify(self)
        except Exception as err:  # noqa: BLE001 - answered below
            if declared <= limit:
                # answer once the (small or empty) request is read, as tornado does for a
                # request it has read: an answer from prepare() makes tornado close the
                # connection after it, and the hub's proxy, reusing it, answers 503
                self._deferred, self._draining = err, True
                setattr(self, self.request.method.lower(), self._raise_deferred)
                return
            if isinstance(err, web.HTTPError) and declared <= DRAIN_MAX:
                self._answer_now(err.status_code, {"status": err.status_code, "message": err.log_message})
                return
            raise
        if declared > limit:
            self.manager.audit.write("request", by=self.caller.name, result="refused",
                                     request=f"{self.request.method} {self.request.path}", bytes=declared,
                                     content_type=self.request.headers.get("Content-Type", ""),
                                     reason=f"body of {declared} bytes is over the limit of {limit}")
            message = f"the request body ({declared} bytes) is larger than the service accepts ({limit} bytes)"
            self.set_header("Connection", "close")
            if declared > DRAIN_MAX:  # answered, then the connection is closed mid-body
                self._error_extra = {"error": "too-large", "limit": limit}
                raise web.HTTPError(413, message)
            self._answer_now(413, {"status": 413, "message": message, "error": "too-large", "limit": limit})
            return
        self._received = bytearray()

    _draining = False

    def _answer_now(self, status: int, data: dict) -> None:
        """Answer a request refused before its body was read, then read and drop the body
        (never kept or parsed; body_timeout bounds a slow sender): closing mid-body would
        reach the client, through the hub's proxy, as a reset instead of the answer."""
        payload = json.dumps(data).encode()
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Content-Length", str(len(payload)))
        self.set_header("Connection", "close")
        self.write(payload)
        self.flush()
        declared = int(self.request.headers.get("Content-Length", "0"))
        self.request.connection.set_max_body_size(max(declared, self.service.max_body_size))
        self._draining = True
        setattr(self, self.request.method.lower(), self._end_refused)  # the method never runs

    def _end_refused(self, *args) -> None:
        self.finish()

    def _raise_deferred(self, *args) -> None:
        raise self._deferred

    def data_received(self, chunk: bytes) -> None:
        if self._draining:
            return
        if self._received is not None and len(self._received) + len(chunk) <= self.service.max_body_size:
            self._received += chunk
        else:
            self._received = None  # over the limit (the server closes the connection anyway)

    def check_xsrf_cookie(self):
        """Token authentication only: no cookies, so no cross-site request forgery."""

    def body(self) -> dict:
        if self._received is None:
            raise web.HTTPError(413, f"the request body is larger than the service accepts "
                                     f"({self.service.max_body_size} bytes)")
        try:
            data = json.loads(bytes(self._received) or b"{}")
        except ValueError:
            raise web.HTTPError(400, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise web.HTTPError(400, "the body must be a JSON object")
        return data

    def sandbox(self, sid: str):
        try:
            return self.manager.get(self.caller.name, sid)
        except NotFound:
            other = self.manager.sandboxes.get(sid)
            if other is not None:
                self.manager.audit.write("denied", by=self.caller.name, user=other.user, sandbox=sid,
                                         request=f"{self.request.method} {self.request.path}")
            raise

    def reply(self, data, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(jsonable(data)))

    def write_error(self, status_code, **kwargs):
        message = self._reason
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        extra = getattr(self, "_error_extra", {})
        if message and len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE - 40] + f"… ({len(message)} characters, cut)"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": status_code, "message": message, **extra}))

    def _handle_request_exception(self, e):
        status, extra = error_status(e)
        if status is None:
            return super()._handle_request_exception(e)
        self._error_extra = extra
        self.log_exception_quietly(status, e)
        self.send_error(status, exc_info=(type(e), web.HTTPError(status, str(e)), None))

    def log_exception_quietly(self, status, e):
        self.service.log.info("%s %s → %s: %.300s", self.request.method, self.request.path, status, e)

    def require_admin(self, what: str, event: str | None = None) -> None:
        if not self.caller.admin:
            self.manager.audit.write(event or ("ceiling" if "ceiling" in what else "denied"), by=self.caller.name,
                                     request=f"{self.request.method} {self.request.path}",
                                     result="refused", reason="not an admin")
            raise Forbidden(f"only hub admins (or members of {', '.join(self.service.admin_groups) or 'no group'}) may {what}")


def check_policy_size(policy) -> None:
    """Refuse a policy with more entries than any ceiling allows before parsing it."""
    if isinstance(policy, dict) and isinstance(policy.get("entries"), list) \
            and len(policy["entries"]) > MAX_REQUEST_ENTRIES:
        raise PolicyError(f"a policy has at most {MAX_REQUEST_ENTRIES} entries; this one has {len(policy['entries'])}")


def error_status(e: BaseException) -> tuple[int | None, dict]:
    if isinstance(e, NotFound):
        return 404, {"error": "not-found"}
    if isinstance(e, CeilingRefused):
        return 403, {"error": "ceiling", "reason": e.reason, "entry": str(e.entry) if e.entry else None,
                     "requestable": e.requestable}
    if isinstance(e, AccessRefused):
        return e.status, {"error": "access"}
    if isinstance(e, Forbidden):
        return 403, {"error": "forbidden"}
    if isinstance(e, NotRunning):
        return 409, {"error": "not-running"}
    if isinstance(e, TooManySandboxes):
        return 429, {"error": "limit", "limit": e.limit, "active": e.active}
    if isinstance(e, PolicyError):
        return 400, {"error": "policy", "ename": e.ename}
    if isinstance(e, SandboxStartError):
        return 503, {"error": "start", "ename": e.ename}
    if isinstance(e, SandboxError):
        return 500, {"error": "sandbox", "ename": e.ename}
    return None, {}


class HealthHandler(web.RequestHandler):
    def get(self):
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"ok": True}))


class SandboxesHandler(_Handler):
    def get(self):
        self.reply({"sandboxes": [sb.public() for sb in self.manager.list(self.caller.name)]})

    async def post(self):
        body = self.body()
        check_policy_size(body.get("policy"))
        wait = body.get("wait", True) is not False
        sb = await self.manager.create(self.caller.name, body.get("kernel_id"), body.get("policy"), wait=wait)
        self.reply(sb.public(), 201 if sb.state == "running" else 202)


class SandboxHandler(_Handler):
    def get(self, sid):
        self.reply(self.sandbox(sid).public())

    async def delete(self, sid):
        sb = self.sandbox(sid)
        if self.get_query_argument("forget", "") in ("1", "true"):
            await self.manager.forget(sb, self.caller.name)
        else:
            await self.manager.stop(sb, self.caller.name)
        self.reply({"stopped": sid})


class PolicyHandler(_Handler):
    def get(self, sid):
        sb = self.sandbox(sid)
        self.reply({"policy": sb.policy.to_dict(), "label": sb.policy.describe()})

    async def put(self, sid):
        sb = self.sandbox(sid)
        body = self.body()
        if "policy" not in body:
            raise web.HTTPError(400, "the body must have a 'policy'")
        check_policy_size(body["policy"])
        details = await self.manager.apply_policy(sb, self.caller.name, body["policy"], body.get("timed"))
        self.reply({"policy": sb.policy.to_dict(), "label": sb.policy.describe(), "applied": details,
                    "timed": sb.timed})


class InterruptHandler(_Handler):
    async def post(self, sid):
        await self.manager.interrupt(self.sandbox(sid))
        self.reply({"interrupted": sid})


class CeilingHandler(_Handler):
    def get(self):
        self.reply({"user": self.caller.name, "admin": self.caller.admin,
                    "ceiling": self.manager.ceiling_view(self.caller.name)})


class CeilingsHandler(_Handler):
    def get(self):
        self.require_admin("read the ceilings")
        self.reply(self.manager.ceilings)


class CeilingOverrideHandler(_Handler):
    async def put(self, kind, name):
        self.require_admin(f"change the ceiling of {kind[:-1]} {name}")
        body = self.body()
        result = await self.manager.set_ceiling(self.caller.name, kind, name, body.get("ceiling", body))
        self.reply(result)

    async def delete(self, kind, name):
        self.require_admin(f"change the ceiling of {kind[:-1]} {name}")
        self.reply(await self.manager.set_ceiling(self.caller.name, kind, name, None))


class AuditHandler(_Handler):
    async def get(self):
        self.require_admin("read the audit log")
        user = self.get_query_argument("user", None) or None
        try:
            limit = int(self.get_query_argument("limit", "1000"))
        except ValueError:
            raise web.HTTPError(400, "limit must be a number") from None
        if not 1 <= limit <= 100_000:
            raise web.HTTPError(400, "limit must be between 1 and 100000")
        # read in a thread: the log may be large, the event loop serves everyone's kernels
        events, skipped = await asyncio.to_thread(self.manager.audit.tail, limit, user)
        self.reply({"events": events, "skipped_lines": skipped})


class RequestsHandler(_Handler):
    """A user's requests for access (access.py)."""

    def get(self):
        desk = self.manager.access
        if self.get_query_argument("all", "") in ("1", "true"):
            self.require_admin("read everyone's requests for access", event="access")
            self.reply({"requests": [r.public() for r in desk.requests.values()],
                        "grants": [g.public() for g in desk.active_grants()]})
            return
        groups = self.manager.user_groups.get(self.caller.name, [])
        self.reply({"requests": [r.public() for r in desk.of_user(self.caller.name)],
                    "grants": [g.public() for g in desk.active_grants() if g.covers(self.caller.name, groups)]})

    async def post(self):
        body = self.body()
        sid = body.get("sandbox")
        if not isinstance(sid, str) or not sid:
            raise web.HTTPError(400, "say which of your sandboxes needs the access: {\"sandbox\": ID, …}")
        sb = self.sandbox(sid)  # another user's: 404, audited
        req = await self.manager.access.request(self.caller.name, sb, body.get("entries"), body.get("reason"))
        self.reply(req.public(), 201)


class DecisionHandler(_Handler):
    async def post(self, rid, action):
        self.require_admin(f"{action} requests for access", event="access")
        body = self.body()
        req = await self.manager.access.decide(self.caller.name, rid, action, scope=body.get("scope", "user"),
                                               seconds=body.get("for"), answer=body.get("reason"),
                                               entries=body.get("entries"))
        self.reply(req.public())


class GrantsHandler(_Handler):
    def get(self):
        self.require_admin("read the grants", event="access")
        self.reply({"grants": [g.public() for g in self.manager.access.active_grants()]})


class GrantHandler(_Handler):
    async def delete(self, gid):
        self.require_admin("revoke grants", event="access")
        self.reply((await self.manager.access.revoke(self.caller.name, gid)).public())


class StreamHandler(_Handler, websocket.WebSocketHandler):
    """The execution stream: agent frames out (one per text message), kernel frames in."""

    async def get(self, sid):
        self.sb = self.sandbox(sid)
        if self.sb.state != "running":
            raise NotRunning(f"sandbox {sid} is {self.sb.state}")
        await websocket.WebSocketHandler.get(self, sid)

    def open(self, sid):
        try:
            self.manager.subscribe(self.sb, self)
        except NotRunning as err:
            self.close(4409, str(err)[:120])

    # subscriber interface (called by the Manager)
    def send(self, frame: dict) -> None:
        self.write_message(json.dumps(frame, separators=(",", ":"), default=str))

    def close(self, code=None, reason=None):  # also the subscriber's close(reason)
        if isinstance(code, str):
            code, reason = 4000, code[:120]
        websocket.WebSocketHandler.close(self, code, reason)

    async def on_message(self, message):
        data = message.encode() if isinstance(message, str) else message
        try:
            frame = protocol.decode(data, protocol.KERNEL_TYPES)
        except protocol.FrameError as err:
            self.service.log.warning("sandbox %s: bad frame from %s: %s", self.sb.id, self.caller.name, err)
            return
        try:
            await self.manager.to_agent(self.sb, frame)
        except (NotRunning, ConnectionError, OSError) as err:
            self.close(4000, f"the sandbox is gone: {err}"[:120])

    def on_close(self):
        sb = getattr(self, "sb", None)
        if sb is not None:
            self.manager.unsubscribe(sb, self)

    def check_origin(self, origin):
        return True  # token-authenticated, no cookies: a browser page cannot borrow a session

    _stream_request_body = False  # an upgrade has no body


def keep_alive_hint(seconds: float) -> type[web.OutputTransform]:
    """An output transform adding ``Keep-Alive: timeout=N`` (the idle timeout) to every answer:
    a keep-alive client (the hub's proxy, Node's agent) stops reusing a connection before the
    service closes it, instead of sending a request into the close (a 503 from the proxy)."""

    class KeepAliveHint(web.OutputTransform):
        def transform_first_chunk(self, status_code, headers, chunk, finishing):
            if seconds > 0:
                headers.setdefault("Keep-Alive", f"timeout={int(seconds)}")
            return status_code, headers, chunk

    return KeepAliveHint


class SandboxService(Application):
    """The sandbox service (a JupyterHub service)."""

    name = "sandbox-kernel-hub"
    description = __doc__

    ip = Unicode(help="Address to listen on. Default: the host of $JUPYTERHUB_SERVICE_URL, else 127.0.0.1.").tag(config=True)
    port = Integer(help="Port to listen on. Default: the port of $JUPYTERHUB_SERVICE_URL, else 10101.").tag(config=True)
    prefix = Unicode(help="URL prefix. Default: $JUPYTERHUB_SERVICE_PREFIX, else /services/sandbox/.").tag(config=True)
    state_dir = Unicode(help="Where state.json and audit.jsonl live (readable by the service only). "
                        "Env: SANDBOX_HUB_STATE_DIR.").tag(config=True)
    backend_name = Enum(["local", "kubernetes"], help="Which backend runs the sandboxes. "
                        "Env: SANDBOX_KERNEL_BACKEND.").tag(config=True)
    admin_groups = List(Unicode(), help="Hub groups whose members may set ceilings, besides hub admins. "
                        "Env: SANDBOX_HUB_ADMIN_GROUPS (comma separated).").tag(config=True)
    start_timeout = Float(300.0, help="Seconds a sandbox may take to start.").tag(config=True)
    max_sandboxes_per_user = Integer(help="Most sandboxes one user may have starting or running at once "
                                     "(each is a namespace or pod and an agent); one more is refused with "
                                     "429 and audited; 0: no limit. Env: SANDBOX_HUB_MAX_SANDBOXES_PER_USER. "
                                     "Default 4.").tag(config=True)
    abandoned_after = Float(help="Stop a sandbox no kernel has been connected to for this many seconds "
                            "(its kernel was killed, or its server died with it); 0: never. "
                            "Env: SANDBOX_HUB_ABANDONED_AFTER. Default 600.").tag(config=True)
    keep_stopped = Float(help="Forget stopped, failed and exited sandboxes this many seconds after they "
                         "ended; 0: keep them. Env: SANDBOX_HUB_KEEP_STOPPED. Default 86400 (a day).").tag(config=True)
    auth_cache_max_age = Integer(30, help="Seconds the hub's answer about a token is cached.").tag(config=True)
    group_refresh_interval = Float(help="Seconds between asking the hub who is in each group that has a "
                                   "ceiling (members who joined or left have their running sandboxes "
                                   "conformed); 0: only when a group's ceiling is set and on users' own "
                                   "requests. Needs the scope read:groups. Env: SANDBOX_HUB_GROUP_REFRESH_INTERVAL. "
                                   "Default 30.").tag(config=True)
    max_body_size = Integer(1024 * 1024, help="Largest request body in bytes; a larger one is refused "
                            "before it is read (413, audited as a summary). Env: SANDBOX_HUB_MAX_BODY_SIZE.").tag(config=True)
    idle_timeout = Float(help="Seconds a connection may take to send a request's headers, and may stay open "
                         "idle between requests; then it is closed. Env: SANDBOX_HUB_IDLE_TIMEOUT. "
                         "Default 60.").tag(config=True)
    body_timeout = Float(help="Seconds a client may take to send a request's body; then the connection is "
                         "closed. Env: SANDBOX_HUB_BODY_TIMEOUT. Default 60.").tag(config=True)
    audit_max_bytes = Integer(help="audit.jsonl is rotated (to audit.jsonl.1, .2, …) when it would grow past "
                              "this many bytes; 0: never. Env: SANDBOX_HUB_AUDIT_MAX_BYTES. "
                              "Default 10 MiB.").tag(config=True)
    audit_backups = Integer(help="Rotated audit files kept (the oldest beyond is removed). "
                            "Env: SANDBOX_HUB_AUDIT_BACKUPS. Default 5.").tag(config=True)
    admin_origin = Unicode(help="The origin (scheme://host[:port]) the admin page is served at, e.g. "
                           "https://sandbox.hub.example.org: one where no user server is served, since a script on "
                           "a page of the same origin (/user/NAME/…) could read and drive the page. Requests for the "
                           "page on any other origin get a link to it and nothing else; empty: the page is off. "
                           "Default: the service's own public URL when the hub gives it its own subdomain "
                           "($JUPYTERHUB_PUBLIC_URL with c.JupyterHub.subdomain_host), else empty. "
                           "Env: SANDBOX_HUB_ADMIN_ORIGIN.").tag(config=True)
    config_file = Unicode("", help="A Python config file (c.SandboxService…, c.AdminPolicy…, "
                          "c.LocalBackend…, c.KubernetesBackend…).").tag(config=True)

    aliases = {"config": "SandboxService.config_file", "port": "SandboxService.port", "ip": "SandboxService.ip",
               "state-dir": "SandboxService.state_dir", "backend": "SandboxService.backend_name",
               "log-level": "Application.log_level"}

    manager = Instance(Manager, allow_none=True)
    hub_auth = Instance("jupyterhub.services.auth.HubAuth", allow_none=True)

    @default("ip")
    def _ip_default(self):
        url = os.environ.get("JUPYTERHUB_SERVICE_URL")
        return urlparse(url).hostname if url else "127.0.0.1"

    @default("port")
    def _port_default(self):
        url = os.environ.get("JUPYTERHUB_SERVICE_URL")
        return (urlparse(url).port or 80) if url else 10101

    @default("prefix")
    def _prefix_default(self):
        return env_default("JUPYTERHUB_SERVICE_PREFIX", "/services/sandbox/")

    @default("state_dir")
    def _state_dir_default(self):
        return env_default("SANDBOX_HUB_STATE_DIR", "/var/lib/sandbox-kernel-hub")

    @default("backend_name")
    def _backend_default(self):
        return env_default("SANDBOX_KERNEL_BACKEND", "local")

    @default("abandoned_after")
    def _abandoned_after_default(self):
        return float(env_default("SANDBOX_HUB_ABANDONED_AFTER", 600))

    @default("keep_stopped")
    def _keep_stopped_default(self):
        return float(env_default("SANDBOX_HUB_KEEP_STOPPED", 86400))

    @default("admin_origin")
    def _admin_origin_default(self):
        explicit = os.environ.get("SANDBOX_HUB_ADMIN_ORIGIN")
        if explicit is not None:
            return explicit.rstrip("/")
        own, hub = urlparse(os.environ.get("JUPYTERHUB_PUBLIC_URL", "")), urlparse(
            os.environ.get("JUPYTERHUB_PUBLIC_HUB_URL", ""))
        if own.hostname and hub.hostname and own.hostname != hub.hostname:
            return f"{own.scheme}://{own.netloc}"  # a subdomain of its own: no user server there
        return ""

    @default("idle_timeout")
    def _idle_timeout_default(self):
        return float(env_default("SANDBOX_HUB_IDLE_TIMEOUT", 60))

    @default("body_timeout")
    def _body_timeout_default(self):
        return float(env_default("SANDBOX_HUB_BODY_TIMEOUT", 60))

    @default("audit_max_bytes")
    def _audit_max_bytes_default(self):
        return int(env_default("SANDBOX_HUB_AUDIT_MAX_BYTES", 10 * 1024 * 1024))

    @default("audit_backups")
    def _audit_backups_default(self):
        return int(env_default("SANDBOX_HUB_AUDIT_BACKUPS", 5))

    @default("max_body_size")
    def _max_body_size_default(self):
        return int(env_default("SANDBOX_HUB_MAX_BODY_SIZE", 1024 * 1024))

    @default("max_sandboxes_per_user")
    def _max_sandboxes_per_user_default(self):
        return int(env_default("SANDBOX_HUB_MAX_SANDBOXES_PER_USER", 4))

    @default("group_refresh_interval")
    def _group_refresh_interval_default(self):
        return float(env_default("SANDBOX_HUB_GROUP_REFRESH_INTERVAL", 30))

    @default("admin_groups")
    def _admin_groups_default(self):
        return [g.strip() for g in os.environ.get("SANDBOX_HUB_ADMIN_GROUPS", "").split(",") if g.strip()]

    def initialize(self, argv=None):
        super().initialize(argv)
        if self.config_file:
            self.load_config_file(self.config_file)
        self.log.setLevel(self.log_level)

    def make_backend(self, user: str, backend_name: str):
        if backend_name == "kubernetes":
            from ..backends.kubernetes import KubernetesBackend

            return KubernetesBackend(parent=self, user=user)
        from ..backends.local import LocalBackend

        return LocalBackend(parent=self)

    @property
    def service_name(self) -> str:
        """The service's name at the hub: $JUPYTERHUB_SERVICE_NAME, else the prefix's last part."""
        return env_default("JUPYTERHUB_SERVICE_NAME", self.url_prefix.strip("/").rsplit("/", 1)[-1] or "sandbox")

    @property
    def url_prefix(self) -> str:
        """The prefix as routes use it: ``/services/sandbox/``."""
        return "/" + self.prefix.strip("/") + "/" if self.prefix.strip("/") else "/"

    def make_app(self) -> web.Application:
        from .admin import admin_routes

        p = self.url_prefix
        sid = r"([0-9a-f]{1,32})"
        routes = [
            (p + "api/health", HealthHandler),
            (p + "api/sandboxes", SandboxesHandler),
            (p + f"api/sandboxes/{sid}", SandboxHandler),
            (p + f"api/sandboxes/{sid}/policy", PolicyHandler),
            (p + f"api/sandboxes/{sid}/interrupt", InterruptHandler),
            (p + f"api/sandboxes/{sid}/stream", StreamHandler),
            (p + "api/ceiling", CeilingHandler),
            (p + "api/ceilings", CeilingsHandler),
            (p + r"api/ceilings/(users|groups)/([^/]+)", CeilingOverrideHandler),
            (p + "api/audit", AuditHandler),
            (p + "api/requests", RequestsHandler),
            (p + r"api/requests/([0-9a-f]{1,32})/(grant|deny)", DecisionHandler),
            (p + "api/grants", GrantsHandler),
            (p + r"api/grants/([0-9a-f]{1,32})", GrantHandler),
            *admin_routes(p, self.hub_auth),  # the admin page (browser login; see admin.py)
        ]
        # xsrf_cookies: the admin page's forms; the token API opts out (no cookies, see _Handler)
        return web.Application(routes, transforms=[keep_alive_hint(self.idle_timeout)],
                               sandbox_service=self, websocket_max_message_size=WS_MAX_MESSAGE,
                               websocket_ping_interval=30, xsrf_cookies=True,
                               # the page has no script: no page's script needs to read the token
                               xsrf_cookie_kwargs={"httponly": True},
                               cookie_secret=os.urandom(32))

    async def run(self) -> None:
        from jupyterhub.services.auth import HubOAuth

        # HubOAuth: tokens for the API (as HubAuth), and the hub's login for the admin page
        # the admin page's login comes back to the admin origin (the hub's entry for the service
        # names the same oauth_redirect_uri); the hub's own pages are at JUPYTERHUB_HOST
        callback = (self.admin_origin + self.url_prefix if self.admin_origin else self.url_prefix) + "oauth_callback"
        self.hub_auth = HubOAuth(parent=self, cache_max_age=self.auth_cache_max_age,
                                 oauth_client_id=env_default("JUPYTERHUB_CLIENT_ID", f"service-{self.service_name}"),
                                 oauth_redirect_uri=env_default("JUPYTERHUB_OAUTH_CALLBACK_URL", callback))
        base = AdminPolicy(parent=self)
        base.blocked_networks()  # a bad base ceiling stops the service here, naming the setting
        from .groups import HubGroups

        groups = HubGroups(self.hub_auth.api_url, self.hub_auth.api_token)
        self.manager = Manager(self.state_dir, base, self.make_backend, self.backend_name, self.log,
                               start_timeout=self.start_timeout, group_source=groups.members,
                               max_per_user=self.max_sandboxes_per_user)
        self.manager.audit.max_bytes, self.manager.audit.backups = self.audit_max_bytes, self.audit_backups
        if self.backend_name == "local":
            from ..backends.local import LocalBackend, gc

            # sandboxes of a previous service process (it was their owner) are removed here
            removed = await asyncio.to_thread(gc, LocalBackend(parent=self).state_dir)
            if removed:
                self.log.info("removed leftovers of a previous run: %s", "; ".join(removed))
        # bounded bodies and headers; slow or idle clients are cut off (a connection upgraded to
        # a websocket is the stream's own: pinged, not timed out here)
        server = self.make_app().listen(self.port, self.ip, xheaders=True, max_body_size=self.max_body_size,
                                        max_header_size=64 * 1024, idle_connection_timeout=self.idle_timeout,
                                        body_timeout=self.body_timeout)
        self.log.info("sandbox service on http://%s:%s%s (backend %s, state in %s)", self.ip, self.port,
                      self.prefix, self.backend_name, self.state_dir)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        restoring = asyncio.ensure_future(self.manager.restore())
        collecting = asyncio.ensure_future(self._collect_forever())
        refreshing = asyncio.ensure_future(self._refresh_groups_forever(restoring))
        expiring = asyncio.ensure_future(self._expire_forever(restoring))
        await stop.wait()
        self.log.info("shutting down")
        server.stop()
        restoring.cancel()
        collecting.cancel()
        refreshing.cancel()
        expiring.cancel()
        await self.manager.shutdown()

    async def _collect_forever(self) -> None:
        """Manager.collect() every quarter of ``abandoned_after`` (1 s to 60 s)."""
        if self.abandoned_after <= 0 and self.keep_stopped <= 0:
            return
        interval = min(max(self.abandoned_after / 4, 1.0), 60.0) if self.abandoned_after > 0 else 60.0
        while True:
            await asyncio.sleep(interval)
            try:
                for line in await self.manager.collect(self.abandoned_after, self.keep_stopped):
                    self.log.info("collect: %s", line)
            except Exception:  # noqa: BLE001 - try again next time
                self.log.exception("collecting abandoned sandboxes failed")

    async def _expire_forever(self, restoring: asyncio.Future) -> None:
        """The clock of grants and timed entries (access.AccessDesk.expire_due), every second
        once the sandboxes are restored: what ended while the service was down ends first."""
        try:
            await asyncio.shield(restoring)
        except Exception:  # noqa: BLE001 - restore logs its own failures
            pass
        while True:
            try:
                for line in await self.manager.access.expire_due():
                    self.log.info("expiry: %s", line)
            except Exception:  # noqa: BLE001 - try again next second
                self.log.exception("ending expired grants failed")
            await asyncio.sleep(1.0)

    async def _refresh_groups_forever(self, restoring: asyncio.Future) -> None:
        """Manager.refresh_groups() once the sandboxes are restored, then every
        ``group_refresh_interval`` seconds."""
        try:
            await asyncio.shield(restoring)
        except Exception:  # noqa: BLE001 - restore logs its own failures
            pass
        while True:
            try:
                conformed = await self.manager.refresh_groups()
                if conformed:
                    self.log.info("group refresh: conformed %s", ", ".join(conformed))
            except Exception:  # noqa: BLE001 - try again next time
                self.log.exception("refreshing group members failed")
            if self.group_refresh_interval <= 0:
                return
            await asyncio.sleep(self.group_refresh_interval)

    def start(self):
        asyncio.run(self.run())


def main(argv=None) -> None:
    app = SandboxService.instance()
    app.initialize(argv)
    app.start()


__all__ = ["SandboxService", "main", "identify"]
