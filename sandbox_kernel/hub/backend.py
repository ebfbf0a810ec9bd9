"""``HubBackend``: the kernel's backend in hub mode.

The kernel runs in the user's own server, which holds no backend credentials. Everything a
backend does is asked of the sandbox service (service.py) with the user server's
``JUPYTERHUB_API_TOKEN``; the service decides, enforces the administrator's ceiling and
audits. The execution stream is the service's websocket, one agent frame per message.

Configuration (kernel side)::

    c.SandboxKernel.backend_name = "hub"
    c.HubBackend.service_url = "http://proxy-public/services/sandbox/"   # or env SANDBOX_KERNEL_HUB_URL

and the user server's token must hold ``access:services!service=sandbox`` (docs/hub.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from typing import Any, Callable

from tornado import httpclient, websocket
from traitlets import Float, Unicode, default

from ..agent import protocol
from ..agent.protocol import ACCESS_FRAME, ENFORCER_FRAME, POLICY_FRAME
from ..errors import IsolationUnavailable, PolicyError, SandboxError, SandboxStartError
from ..policy.admin import CeilingRefused
from ..policy.model import EgressPolicy, parse_entry
from ..backends.base import Backend, Progress, SandboxInfo, Transport

_FROM_SERVICE = protocol.AGENT_TYPES | protocol.SERVICE_TYPES


class ServiceError(SandboxError):
    """The sandbox service refused or failed a request."""

    ename = "SandboxServiceError"

    def __init__(self, message: str, status: int = 0, data: dict | None = None):
        super().__init__(message)
        self.status = status
        self.data = data or {}


class HubBackend(Backend):
    """Sandboxes run by the hub's sandbox service, on behalf of this server's user."""

    name = "hub"

    service_url = Unicode(
        help="Base URL of the sandbox service, e.g. http://proxy-public/services/sandbox/ "
        "(through the hub's proxy) or the service's own address. Env: SANDBOX_KERNEL_HUB_URL."
    ).tag(config=True)

    @default("service_url")
    def _service_url_default(self):
        return os.environ.get("SANDBOX_KERNEL_HUB_URL", "")

    api_token = Unicode(
        help="The token sent to the service. Default: the user server's $JUPYTERHUB_API_TOKEN."
    ).tag(config=True)

    @default("api_token")
    def _api_token_default(self):
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    request_timeout = Float(
        330.0, help="Seconds to wait for the service to answer (starting a sandbox may take minutes)."
    ).tag(config=True)

    reattach_timeout = Float(
        15.0, help="Seconds to keep trying to re-open a dropped stream to a sandbox that still runs."
    ).tag(config=True)

    #: the service checks every policy change against the ceiling (and audits refusals): the
    #: kernel does not refuse on its own, so that a refusal through the magic or the panel is
    #: in the audit log like one by hand-made HTTP
    enforces_ceiling = True
    #: an administrator can be asked for more (``%sandbox request``, hub/access.py)
    takes_requests = True

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.always_blocked: list[str] = []  # set by the kernel; the service enforces its own
        self.sandbox_id: str | None = None
        self.started: float | None = None
        self.policy: EgressPolicy | None = None
        self._info: SandboxInfo | None = None
        self._applied: dict = {}
        self._last: dict = {}
        self._transport: HubTransport | None = None
        #: called with (policy, reason) when the service changes the policy by itself
        #: (an administrator's ceiling change); the kernel makes it its policy in force
        self.on_policy_forced: Callable[[EgressPolicy, str], None] | None = None
        #: called with each ACCESS_FRAME (a request decided, a grant or a timed entry ended):
        #: the kernel's AccessRequests.on_frame
        self.on_access: Callable[[dict], None] | None = None

    # -- plumbing --------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return self.service_url.rstrip("/") + "/" + path.lstrip("/")

    def _headers(self) -> dict:
        return {"Authorization": f"token {self.api_token}", "Content-Type": "application/json"}

    async def call(self, method: str, path: str, body: Any = None) -> dict:
        """One request to the service; raises a typed error for a refusal."""
        request = httpclient.HTTPRequest(
            self._url(path), method=method, headers=self._headers(),
            body=json.dumps(body) if body is not None else (b"{}" if method in ("POST", "PUT") else None),
            request_timeout=self.request_timeout, connect_timeout=15)
        try:
            response = await httpclient.AsyncHTTPClient().fetch(request, raise_error=False)
        except OSError as err:  # refused, reset, unreachable: raise_error=False passes these on
            raise ServiceError(f"the sandbox service at {self.service_url} cannot be reached: {err}") from None
        if response.code == 599:
            raise ServiceError(f"the sandbox service at {self.service_url} cannot be reached: {response.error}")
        try:
            data = json.loads(response.body or b"{}")
        except ValueError:
            data = {"message": (response.body or b"")[:200].decode(errors="replace")}
        if response.code >= 400:
            raise _error(response.code, data if isinstance(data, dict) else {})
        return data

    def fetch_ceiling(self) -> dict:
        """The user's effective ceiling, as AdminPolicy settings (blocking: for the kernel's
        start-up, so notices and the panel advise by the service's ceiling)."""
        request = urllib.request.Request(self._url("api/ceiling"), headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - configured URL
                return json.loads(response.read())["ceiling"]
        except urllib.error.HTTPError as err:
            raise _error(err.code, _json(err.read())) from None
        except (OSError, ValueError, KeyError) as err:
            raise ServiceError(f"the sandbox service at {self.service_url} cannot be reached: {err}") from None

    # -- Backend interface -------------------------------------------------------------
    def check(self) -> None:
        missing = []
        if not self.service_url:
            missing.append("the sandbox service's URL: c.HubBackend.service_url or SANDBOX_KERNEL_HUB_URL")
        if not self.api_token:
            missing.append("a JupyterHub API token: $JUPYTERHUB_API_TOKEN (set by JupyterHub in user servers)")
        if missing:
            raise IsolationUnavailable(missing)

    async def start(self, kernel_id: str, policy: Any, progress: Progress) -> SandboxInfo:
        self.check()
        progress("Asking the sandbox service for a sandbox…")
        try:
            data = await self.call("POST", "api/sandboxes", {
                "kernel_id": kernel_id, "policy": policy.to_dict() if policy is not None else None,
                "wait": False})
            data = await self._follow_start(data, progress)
        except ServiceError as err:
            raise SandboxStartError(str(err)) from None
        self._took(data)
        if policy is not None and self.policy != policy:
            self._forced(self.policy, "the sandbox service started this sandbox with the policy your "
                                      "administrator's ceiling permits")
        self._info = SandboxInfo(self.name, data["id"], {
            "service": self.service_url, "backend": data.get("backend"), "state": data.get("state"),
            **(data.get("details") or {})})
        return self._info

    async def _follow_start(self, data: dict, progress: Progress) -> dict:
        """Poll a starting sandbox, passing the service's progress lines on, until it runs;
        a failed start raises SandboxStartError with the service's reason."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        shown = 0  # lines of this start shown so far
        while True:
            lines, shown = unseen_progress(data.get("progress") or [], data.get("progress_count"), shown)
            for line in lines:
                progress(line)
            if data.get("state") != "starting":
                break
            if loop.time() > deadline:
                raise SandboxStartError(f"the sandbox did not start within {self.request_timeout:.0f} s")
            await asyncio.sleep(0.25)
            data = await self.call("GET", f"api/sandboxes/{data['id']}")
        if data.get("state") != "running":
            raise SandboxStartError("the sandbox service could not start a sandbox: "
                                    f"{data.get('exit_reason') or data.get('state')}")
        return data

    def _took(self, data: dict) -> None:
        self._last = data
        self.sandbox_id = data["id"]
        self.started = data.get("started")
        self.policy = EgressPolicy.parse(data["policy"])
        self._applied = data.get("applied") or {}

    async def attach(self) -> Transport:
        if not self.sandbox_id:
            raise SandboxStartError("no sandbox: start() first")
        ws = await self._open_stream()
        self._transport = HubTransport(ws, self)
        return self._transport

    async def _open_stream(self):
        url = self._url(f"api/sandboxes/{self.sandbox_id}/stream")
        url = "ws" + url[4:] if url.startswith("http") else url
        request = httpclient.HTTPRequest(url, headers=self._headers(), connect_timeout=15, request_timeout=30)
        try:
            return await websocket.websocket_connect(request, max_message_size=protocol.MAX_FRAME + 1024,
                                                     ping_interval=30)
        except httpclient.HTTPClientError as err:
            data = _json(err.response.body) if err.response is not None else {}
            raise SandboxStartError(f"the sandbox service refused the stream: {data.get('message') or err}") from None
        except OSError as err:
            raise SandboxStartError(f"the sandbox service at {self.service_url} cannot be reached: {err}") from None

    async def apply_policy(self, policy: Any) -> dict[str, Any]:
        if not self.sandbox_id:
            raise PolicyError("no sandbox is running")
        data = await self.call("PUT", f"api/sandboxes/{self.sandbox_id}/policy", {"policy": policy.to_dict()})
        self.policy = EgressPolicy.parse(data["policy"])
        self._applied = data.get("applied") or {}
        return dict(self._applied)

    async def set_timed(self, timed: dict[str, float | None]) -> dict:
        """Entries of the policy in force that end after so many seconds (None: no longer end);
        the service keeps the clock, so the expiry survives a kernel or service restart.
        Returns the sandbox's ``timed`` map (entry -> wall-clock end)."""
        if not self.sandbox_id or self.policy is None:
            raise PolicyError("no sandbox is running")
        data = await self.call("PUT", f"api/sandboxes/{self.sandbox_id}/policy",
                               {"policy": self.policy.to_dict(), "timed": timed})
        return data.get("timed") or {}

    async def request_access(self, entries: list[str], reason: str) -> dict:
        """Ask the administrator for ``entries`` (beyond the ceiling) for this kernel's sandbox;
        the service's answer is the recorded request (a refusal raises ServiceError)."""
        if not self.sandbox_id:
            raise PolicyError("no sandbox is running")
        return await self.call("POST", "api/requests", {"sandbox": self.sandbox_id, "entries": entries,
                                                        "reason": reason})

    async def interrupt(self) -> None:
        if self.sandbox_id:
            try:
                await self.call("POST", f"api/sandboxes/{self.sandbox_id}/interrupt")
            except ServiceError as err:
                self.log.warning("interrupt: %s", err)

    async def status(self) -> dict:
        return await self.call("GET", f"api/sandboxes/{self.sandbox_id}")

    async def exit_reason(self) -> str:
        if not self.sandbox_id:
            return "the sandbox is not running"
        try:
            data = await self.status()
        except SandboxError as err:
            return f"the stream to the sandbox service ended and the service does not answer ({err})"
        self.last_exit_status = data.get("exit_status")
        if data.get("started") != self.started and data.get("state") in ("starting", "running"):
            return ("the sandbox service restarted and started this kernel's sandbox again with the same "
                    f"policy ({data.get('policy_label')}); variables of the previous sandbox are lost")
        if data.get("state") == "exited":
            return data.get("exit_reason") or "the sandbox ended"
        if data.get("state") in ("stopped", "failed"):
            return f"the sandbox was {data['state']}" + (f": {data['exit_reason']}" if data.get("exit_reason") else "")
        return "the stream to the sandbox service ended"

    async def stop(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.close()
        sid, self.sandbox_id = self.sandbox_id, None
        self._info = None
        if sid:
            try:
                await self.call("DELETE", f"api/sandboxes/{sid}")
            except ServiceError as err:
                if err.status != 404:
                    self.log.warning("stopping sandbox %s: %s", sid, err)

    def info(self) -> SandboxInfo | None:
        return self._info


    def _access(self, frame: dict) -> None:
        policy = frame.get("policy")
        if policy is not None:
            try:
                self.policy = EgressPolicy.parse(policy)
            except PolicyError:
                frame["policy"] = None
        if self.on_access is not None:
            self.on_access(frame)

    def _forced(self, policy: EgressPolicy, reason: str) -> None:
        self.policy = policy
        self.log.warning("policy changed by the sandbox service: %s", reason)
        if self.on_policy_forced is not None:
            self.on_policy_forced(policy, reason)

    async def reopen(self, transport: HubTransport):
        """After a dropped stream: a new websocket if the same agent still runs, else None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reattach_timeout
        while self.sandbox_id and transport is self._transport and loop.time() < deadline:
            try:
                data = await self.status()
            except ServiceError as err:
                if err.status in (401, 403, 404):
                    return None
                await asyncio.sleep(0.5)
                continue
            if data.get("state") == "starting":
                await asyncio.sleep(0.5)
                continue
            if data.get("state") != "running" or data.get("started") != self.started:
                return None
            try:
                ws = await self._open_stream()
            except SandboxStartError:
                await asyncio.sleep(0.5)
                continue
            hello = await ws.read_message()  # the service replays the agent's greeting: drop it
            if hello is None:
                continue
            return ws
        return None


class HubTransport(Transport):
    """The service's websocket: one agent frame per text message. Frames only the service
    makes (an enforcer's blocked record, a policy an administrator imposed) are handled
    here; the agent cannot send them (its frames are decoded against the agent's types)."""

    def __init__(self, ws, backend: HubBackend):
        self._ws = ws
        self._backend = backend
        self._closed = False
        self._send_lock = asyncio.Lock()

    async def send(self, frame: dict) -> None:
        data = protocol.encode(frame)[:-1].decode("utf-8", "surrogatepass")
        async with self._send_lock:
            if self._closed or self._ws is None:
                raise ConnectionError("the stream to the sandbox service is closed")
            try:
                await self._ws.write_message(data)
            except websocket.WebSocketClosedError:
                raise ConnectionError("the stream to the sandbox service is closed") from None

    async def recv(self) -> dict | None:
        while True:
            message = await self._ws.read_message() if self._ws is not None else None
            if message is None:
                if self._closed:
                    return None
                ws = await self._backend.reopen(self)
                if ws is None:
                    return None
                self._ws = ws
                continue
            data = message.encode("utf-8", "surrogatepass") if isinstance(message, str) else message
            frame = protocol.decode(data, _FROM_SERVICE)
            if frame["type"] == ENFORCER_FRAME:
                sink = self._backend.blocked_sink
                if sink is not None and isinstance(frame.get("record"), dict):
                    sink(frame["record"])
                continue
            if frame["type"] == POLICY_FRAME:
                try:
                    policy = EgressPolicy.parse(frame.get("policy"))
                except PolicyError:
                    continue
                self._backend._forced(policy, str(frame.get("reason") or "changed by your administrator"))
                continue
            if frame["type"] == ACCESS_FRAME:
                try:
                    self._backend._access(frame)
                except Exception:  # noqa: BLE001 - the stream goes on whatever the kernel makes of it
                    self._backend.log.exception("handling the service's access frame failed")
                continue
            return frame

    async def close(self) -> None:
        self._closed = True
        if self._ws is not None:
            self._ws.close()


def unseen_progress(lines: list, count: Any, shown: int) -> tuple[list[str], int]:
    """The start-up lines a kernel has not shown yet, and how many it will have shown.

    ``lines`` are the newest the service keeps of the ``count`` lines of the current start so
    far (a service without ``progress_count`` sends None: all of them are kept); ``shown`` is how
    many the kernel showed. A count below ``shown`` means a new start began: all its lines are new.
    Called by HubBackend._follow_start for each answer while a sandbox starts."""
    if not isinstance(count, int) or count < len(lines):
        count = len(lines)
    if count < shown:
        shown = 0
    return [str(line) for line in lines[max(0, len(lines) - (count - shown)):]], count


def _json(body) -> dict:
    try:
        data = json.loads(body or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _error(status: int, data: dict) -> SandboxError:
    message = str(data.get("message") or f"HTTP {status}")
    if data.get("error") == "ceiling":
        entry = None
        if data.get("entry"):
            try:
                entry = parse_entry(data["entry"])
            except PolicyError:
                entry = None
        # the service says whether an administrator could grant it: the refusal offers the request
        err = CeilingRefused(str(data.get("reason") or message), entry, requestable=bool(data.get("requestable")),
                             request_hint=True)
        err.status = status
        return err
    if data.get("error") == "policy":
        err = PolicyError(message)
        err.status = status
        return err
    if status in (401, 403) and data.get("error") is None:
        message = f"the sandbox service refused this server's token: {message}"
    return ServiceError(message, status, data)
