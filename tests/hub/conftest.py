"""Fixtures for hub mode: a real JupyterHub (with configurable-http-proxy) on loopback, the
sandbox service registered with it as an external service, three users, and kernels' sessions
talking to the service with their users' tokens.

Everything listens on 127.0.0.1 on free ports; every process started here is stopped, and
every sandbox namespace the service created is gone afterwards (checked).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from fakekube.fixtures import fakekube  # noqa: F401 - the fake API server for the Kubernetes service
from kerneltest import namespaces_of

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "sandbox"
#: a second sandbox service, backend kubernetes (against the fake API server), started per test
K8S_SERVICE = "sandbox-k8s"
#: a third, started per test with settings of its own (e.g. a short abandoned_after)
SPARE_SERVICE = "sandbox-spare"
SERVICES = (SERVICE, K8S_SERVICE, SPARE_SERVICE)
USERS = ("alice", "bob", "teacher")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def admin_origin(port: int) -> str:
    """Where a test service's admin page is served: its own port under the name localhost, a
    different host from the hub's 127.0.0.1 (so no cookie is shared with users' pages)."""
    return f"http://localhost:{port}"


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen | None, sig=signal.SIGTERM, timeout: float = 15) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _chp(tmp: Path) -> str:
    """configurable-http-proxy: on PATH, in the repository's node_modules, or installed with npm
    into the test run's own directory."""
    for candidate in (shutil.which("configurable-http-proxy"),
                      ROOT / "node_modules" / ".bin" / "configurable-http-proxy"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    if shutil.which("npm") is None:
        pytest.skip("configurable-http-proxy is not installed and npm is missing")
    prefix = tmp / "chp"
    result = subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--silent",
                             "configurable-http-proxy@4"], capture_output=True, text=True, timeout=180)
    binary = prefix / "node_modules" / ".bin" / "configurable-http-proxy"
    if result.returncode != 0 or not binary.exists():
        pytest.skip(f"could not install configurable-http-proxy with npm: {result.stderr[-500:]}")
    return str(binary)


class Hub:
    """A running JupyterHub: its URLs, the admin service's token, users' tokens."""

    def __init__(self, tmp: Path):
        pytest.importorskip("jupyterhub")
        self.dir = tmp
        self.public_port, self.hub_port, self.proxy_api_port = _free_port(), _free_port(), _free_port()
        self.service_port = _free_port()
        self.k8s_service_port = _free_port()
        self.k8s_service_token = uuid.uuid4().hex
        self.spare_service_port = _free_port()
        self.spare_service_token = uuid.uuid4().hex
        self.public_url = f"http://127.0.0.1:{self.public_port}"
        self.api_url = f"http://127.0.0.1:{self.hub_port}/hub/api"
        self.service_token = uuid.uuid4().hex
        self.admin_token = uuid.uuid4().hex
        self.password = uuid.uuid4().hex  # the dummy authenticator's, for browser logins
        self.proxy_token = uuid.uuid4().hex  # configurable-http-proxy's REST API
        self.tokens: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None
        self.log = tmp / "hub.log"

    def config(self, chp: str) -> str:
        return f"""
c = get_config()  # noqa
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {self.public_port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {self.hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{self.proxy_api_port}"
c.ConfigurableHTTPProxy.command = [{chp!r}]
c.ConfigurableHTTPProxy.auth_token = {self.proxy_token!r}
c.JupyterHub.db_url = "sqlite:///{self.dir / 'hub.sqlite'}"
c.JupyterHub.cookie_secret = bytes.fromhex({os.urandom(32).hex()!r})
c.JupyterHub.pid_file = {str(self.dir / 'hub.pid')!r}
c.JupyterHub.authenticator_class = "dummy"
c.DummyAuthenticator.password = {self.password!r}
c.Authenticator.allowed_users = {{"alice", "bob"}}
c.Authenticator.admin_users = {{"teacher"}}
c.JupyterHub.load_groups = {{"class-b": {{"users": ["bob"]}}}}
c.JupyterHub.services = [
    # each service's admin page has an origin of its own, http://localhost:<its port>, where
    # no user server is served (the hub's is http://127.0.0.1:<public port>): its login
    # comes back there
    {{"name": {SERVICE!r}, "url": "http://127.0.0.1:{self.service_port}", "api_token": {self.service_token!r},
      "oauth_redirect_uri": "{admin_origin(self.service_port)}/services/{SERVICE}/oauth_callback"}},
    {{"name": {K8S_SERVICE!r}, "url": "http://127.0.0.1:{self.k8s_service_port}",
      # started per test (k8s_service): the hub must not wait for it at start-up
      "api_token": {self.k8s_service_token!r}, "timeout": 1,
      "oauth_redirect_uri": "{admin_origin(self.k8s_service_port)}/services/{K8S_SERVICE}/oauth_callback"}},
    {{"name": {SPARE_SERVICE!r}, "url": "http://127.0.0.1:{self.spare_service_port}",
      "api_token": {self.spare_service_token!r}, "timeout": 1,
      "oauth_redirect_uri": "{admin_origin(self.spare_service_port)}/services/{SPARE_SERVICE}/oauth_callback"}},
    {{"name": "test-admin", "api_token": {self.admin_token!r}}},
]
c.JupyterHub.load_roles = [
    # users may use the sandbox service; a user server's token gets that scope too
    {{"name": "user", "scopes": ["self", *{[f"access:services!service={n}" for n in SERVICES]!r}]}},
    {{"name": "test-admin", "scopes": ["admin:users", "admin:servers", "tokens", "admin:groups"],
      "services": ["test-admin"]}},
    # the sandbox services ask the hub who is in a group that has a ceiling (docs/hub.md)
    {{"name": "sandbox-service", "scopes": ["read:groups", "list:groups"], "services": {list(SERVICES)!r}}},
]
# user servers, as a small class on one machine would run them: local processes of the hub's
# user, each with its own home; their Sandbox kernels use the service (backend "hub") and hold
# nothing but the server's own hub token
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = {str(self.dir / 'home' / '{username}')!r}
c.Spawner.cmd = [{sys.executable!r}, "-m", "jupyterhub.singleuser"]
c.Spawner.args = ["--allow-root", "--ServerApp.shutdown_no_activity_timeout=0"]
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 60
c.Spawner.http_timeout = 60
c.Spawner.env_keep = ["PATH", "LANG", "LC_ALL", "VIRTUAL_ENV"]
c.Spawner.environment = {{
    "SANDBOX_KERNEL_BACKEND": "hub",
    "SANDBOX_KERNEL_HUB_URL": "{self.public_url}/services/{SERVICE}/",
    "JUPYTER_PATH": {os.environ.get("JUPYTER_PATH", "")!r},
}}
c.Spawner.server_token_scopes = ["users:activity!user", "access:servers!server",
                                *{[f"access:services!service={n}" for n in SERVICES]!r}]
"""

    def start(self, chp: str) -> None:
        cfg = self.dir / "jupyterhub_config.py"
        cfg.write_text(self.config(chp))
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(cfg)], cwd=self.dir,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_http(self.api_url + "/", self.proc, self.log)
        _wait_http(self.public_url + "/hub/api/", self.proc, self.log)  # through the proxy
        deadline = time.monotonic() + 30
        while requests.get(f"{self.public_url}/services/{SERVICE}/api/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the hub did not route to the sandbox service"
            time.sleep(0.2)
        for user in USERS:
            self.tokens[user] = self.new_token(user, [f"access:services!service={n}" for n in SERVICES])
        # a valid token of alice's that has no access to the service
        self.tokens["alice-no-access"] = self.new_token("alice", ["read:users:name!user"])

    def admin(self, method: str, path: str, **kwargs) -> requests.Response:
        return requests.request(method, self.api_url + path, timeout=10,
                                headers={"Authorization": f"token {self.admin_token}"}, **kwargs)

    def new_token(self, user: str, scopes: list[str]) -> str:
        r = self.admin("POST", f"/users/{user}/tokens", json={"scopes": scopes, "note": "sandbox tests"})
        assert r.status_code == 201, r.text
        return r.json()["token"]

    def stop(self) -> None:
        _stop(self.proc)
        if self.proc is not None:
            # the proxy is the hub's child, in the hub's process group: make sure it is gone
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        pid_file = self.dir / "jupyterhub-proxy.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass


class Service:
    """The sandbox service, run by the tests (registered with the hub as external)."""

    def __init__(self, hub: Hub, tmp: Path, name: str = SERVICE, port: int | None = None,
                 token: str | None = None, env: dict | None = None, args: tuple[str, ...] = ()):
        self.hub = hub
        self.name = name
        self.port = port or hub.service_port
        self.token = token or hub.service_token
        self.env = {"SANDBOX_KERNEL_BACKEND": "local", **(env or {})}
        self.args = list(args)
        self.state_dir = tmp / f"{name}-state" if name != SERVICE else tmp / "service-state"
        self.log = tmp / f"{name}.log" if name != SERVICE else tmp / "service.log"
        self.url = f"http://127.0.0.1:{self.port}/services/{name}/"
        self.admin_url = f"{admin_origin(self.port)}/services/{name}/admin"
        self.proxied_url = f"{hub.public_url}/services/{name}/"
        self.proc: subprocess.Popen | None = None
        self.pids: list[int] = []

    def start(self) -> None:
        env = {**os.environ,
               "JUPYTERHUB_API_TOKEN": self.token, "JUPYTERHUB_API_URL": self.hub.api_url,
               "JUPYTERHUB_SERVICE_NAME": self.name, "JUPYTERHUB_SERVICE_PREFIX": f"/services/{self.name}/",
               "JUPYTERHUB_SERVICE_URL": f"http://127.0.0.1:{self.port}",
               "SANDBOX_HUB_STATE_DIR": str(self.state_dir),
               # users may open the tests' hosts (10.231.0.0/16) and public addresses, nothing else
               "SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "10.231.0.0/16 public",
               "SANDBOX_HUB_ADMIN_GROUPS": "staff",
               # the admin page on its own origin; the hub's pages (its login) are elsewhere
               "SANDBOX_HUB_ADMIN_ORIGIN": admin_origin(self.port), "JUPYTERHUB_HOST": self.hub.public_url,
               # a group's new members are conformed within this (a class's exam mode)
               "SANDBOX_HUB_GROUP_REFRESH_INTERVAL": "2", **self.env}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "sandbox_kernel.hub", "--log-level=DEBUG", *self.args],
                                         env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.pids.append(self.proc.pid)
        _wait_http(self.url + "api/health", self.proc, self.log)

    def stop(self, sig=signal.SIGTERM) -> None:
        _stop(self.proc, sig)

    def restart(self, sig=signal.SIGTERM) -> None:
        self.stop(sig)
        self.start()

    def audit(self) -> list[dict]:
        path = self.state_dir / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def api(self, method: str, path: str, token: str | None, proxied: bool = True, **kwargs) -> requests.Response:
        headers = {"Authorization": f"token {token}"} if token else {}
        base = self.proxied_url if proxied else self.url
        return requests.request(method, base + path, headers=headers, timeout=120, **kwargs)

    def leftovers(self) -> set[str]:
        return set().union(*(namespaces_of(pid) for pid in self.pids)) if self.pids else set()

    def stop_and_check_leftovers(self) -> None:
        """Stop the service; fail if it left sandbox namespaces behind (removing them anyway:
        a killed service leaves its sandboxes to gc)."""
        self.stop()
        left = self.leftovers()
        if left:
            from sandbox_kernel.backends.local import NETNS_PREFIX, remove_sandbox

            for ns in left:
                remove_sandbox(ns[len(NETNS_PREFIX):], "/run/sandbox-kernel")
        assert not left, f"the sandbox service left namespaces behind: {left}"


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """The hub, with the sandbox service started first: the hub adds an external service's
    proxy route once the service answers."""
    if os.geteuid() != 0:
        pytest.skip("the local backend needs root")
    tmp = tmp_path_factory.mktemp("hub")
    os.chmod(tmp, 0o700)
    chp = _chp(tmp)
    h = Hub(tmp)
    h.service = Service(h, tmp)
    try:
        h.service.start()
        h.start(chp)
        yield h
    finally:
        h.stop()
        h.service.stop_and_check_leftovers()


@pytest.fixture(scope="session")
def service(hub):
    return hub.service


class Sink:
    """Collects a cell's events (what SandboxKernel.on_event would publish)."""

    def __init__(self):
        self.frames: list[dict] = []

    def on_event(self, frame: dict) -> None:
        self.frames.append(frame)

    async def on_input_request(self, prompt, password):
        return None

    def stdout(self) -> str:
        return "".join(f.get("text", "") for f in self.frames if f.get("type") == "stream" and f.get("name") == "stdout")

    def blocked(self) -> list[dict]:
        return [f for f in self.frames if f.get("type") == "blocked"]


class Kernels:
    """Acts as Sandbox kernels in hub mode: a Session over a HubBackend per kernel, each with
    its user's token, all on one event loop; everything is stopped at the end."""

    #: for tests that run a cell themselves (``from conftest import`` is ambiguous in a whole-suite run)
    Sink = Sink

    def __init__(self, service: Service):
        self.service = service
        self.loop = asyncio.new_event_loop()
        self.sessions = []
        self.log = logging.getLogger("hubtest")

    def run(self, coro, timeout: float = 60):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def open(self, user: str, token: str | None = None, proxied: bool = True, timeout: float = 60):
        from sandbox_kernel.hub.backend import HubBackend
        from sandbox_kernel.policy.model import EgressPolicy
        from sandbox_kernel.session import Session

        async def make():
            backend = HubBackend(service_url=self.service.proxied_url if proxied else self.service.url,
                                 api_token=token or self.service.hub.tokens[user])
            session = Session(backend, f"k-{user}-{uuid.uuid4().hex[:8]}", EgressPolicy(), self.log)
            self.sessions.append(session)
            await session.ready()
            return session

        return self.run(make(), timeout)

    def execute(self, session, code: str, timeout: float = 60):
        sink = Sink()
        result = self.run(session.execute(code, sink), timeout)
        return result, sink

    def close(self):
        for session in self.sessions:
            try:
                self.run(session.stop(), 30)
            except Exception as err:  # noqa: BLE001 - keep stopping the others
                self.log.warning("stopping a session: %s", err)
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


@pytest.fixture(scope="session")
def hub_kit():
    """The classes behind these fixtures, for a module that runs a hub of its own
    (tests/hub/test_hub_k8s_cluster.py: the service in a pod of the real cluster)."""
    from types import SimpleNamespace

    return SimpleNamespace(Hub=Hub, Kernels=Kernels, Sink=Sink, chp=_chp, free_port=_free_port, SERVICE=SERVICE)


@pytest.fixture
def kernels(service):
    k = Kernels(service)
    yield k
    k.close()


@pytest.fixture
def k8s_service(hub, fakekube, tmp_path):
    """A second sandbox service, ``--backend=kubernetes``, whose kubeconfig points at the fake
    API server (loopback, bearer token); its pods run the real agent as local processes of the
    fake's kubelet (in the test process, so they outlive a service restart). Stopped after the
    test; the fake then kills whatever pods are left."""
    kubeconfig = fakekube.write_kubeconfig(tmp_path / "kubeconfig")
    svc = Service(hub, tmp_path, name=K8S_SERVICE, port=hub.k8s_service_port, token=hub.k8s_service_token,
                  env={"SANDBOX_KERNEL_BACKEND": "", "KUBECONFIG": kubeconfig, "KUBERNETES_SERVICE_HOST": "",
                       "SANDBOX_KERNEL_K8S_START_TIMEOUT": "60"},
                  args=("--backend=kubernetes",))
    svc.fakekube = fakekube
    try:
        svc.start()
        yield svc
    finally:
        svc.stop()


@pytest.fixture
def k8s_kernels(k8s_service):
    k = Kernels(k8s_service)
    yield k
    k.close()


@pytest.fixture
def spare_service(hub, tmp_path):
    """A third sandbox service behind the same hub, local backend, started per test with the
    settings a test passes: ``spare_service(env={...})``; stopped (and checked to leave no
    namespace behind) after the test."""
    started: list[Service] = []

    def start(env: dict | None = None, args: tuple[str, ...] = ()) -> Service:
        svc = Service(hub, tmp_path, name=SPARE_SERVICE, port=hub.spare_service_port,
                      token=hub.spare_service_token, env=env, args=args)
        started.append(svc)
        svc.start()
        return svc

    yield start
    for svc in started:
        svc.stop_and_check_leftovers()


@pytest.fixture
def kernels_for():
    """Kernels acting against a service the test started itself: ``kernels_for(svc)``."""
    made: list[Kernels] = []

    def make(svc: Service) -> Kernels:
        made.append(Kernels(svc))
        return made[-1]

    yield make
    for k in made:
        k.close()
