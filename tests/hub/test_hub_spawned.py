"""User servers spawned by the hub: the path a student takes. The hub starts alice's and bob's
single-user Jupyter servers (local processes, SimpleLocalProcessSpawner), each server starts a
`sandbox` kernel through its REST API, and cells go over the server's kernel websocket — all
through the hub's proxy with the user's own token, as JupyterLab does. The kernels get nothing
but their server's hub token and the service's URL; the service does the rest."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import time
import uuid

import pytest
import requests
from tornado import httpclient, websocket

from kerneltest import sandbox_namespaces


class UserServer:
    """One user's server, reached through the hub's proxy with a token of that user's."""

    def __init__(self, hub, user: str):
        self.hub, self.user = hub, user
        self.token = hub.new_token(user, [f"access:servers!user={user}"])
        self.base = f"{hub.public_url}/user/{user}/"
        #: the user's sandboxes at the service that were running before this server started
        self.running_before: set[str] = set()

    def _server_request(self, method: str) -> requests.Response:
        """Ask the hub to start or stop the server. The hub answers when it is done, or with 202
        after its slow_spawn_timeout/slow_stop_timeout (10 s): longer than Hub.admin waits."""
        return requests.request(method, f"{self.hub.api_url}/users/{self.user}/server", timeout=60,
                                headers={"Authorization": f"token {self.hub.admin_token}"})

    def start(self, timeout: float = 90) -> None:
        r = self._server_request("POST")
        assert r.status_code in (201, 202), r.text
        deadline = time.monotonic() + timeout
        while True:
            info = self.hub.admin("GET", f"/users/{self.user}").json()
            server = (info.get("servers") or {}).get("")
            if server and server.get("ready"):
                return
            assert time.monotonic() < deadline, f"{self.user}'s server did not start: {info}"
            time.sleep(0.3)

    def stop(self, timeout: float = 60) -> None:
        r = self._server_request("DELETE")
        assert r.status_code in (202, 204, 400), r.text  # 400: not running
        deadline = time.monotonic() + timeout
        while (self.hub.admin("GET", f"/users/{self.user}").json().get("servers") or {}).get(""):
            assert time.monotonic() < deadline, f"{self.user}'s server did not stop"
            time.sleep(0.3)

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        return requests.request(method, self.base + path, timeout=120,
                                headers={"Authorization": f"token {self.token}"}, **kwargs)

    def start_kernel(self) -> str:
        r = self.api("POST", "api/kernels", json={"name": "sandbox"})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def execute(self, kernel_id: str, code: str, timeout: float = 180) -> dict:
        return asyncio.run(self._execute(kernel_id, code, timeout))

    async def _execute(self, kernel_id: str, code: str, timeout: float) -> dict:
        url = "ws" + self.base[4:] + f"api/kernels/{kernel_id}/channels"
        ws = await websocket.websocket_connect(httpclient.HTTPRequest(
            url, headers={"Authorization": f"token {self.token}"}, connect_timeout=30, request_timeout=30))
        msg_id = uuid.uuid4().hex
        ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": self.user,
                       "session": uuid.uuid4().hex, "date": "", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        result = {"stdout": "", "stderr": "", "display": "", "reply": None, "idle": False, "errors": []}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while result["reply"] is None or not result["idle"]:
                raw = await asyncio.wait_for(ws.read_message(), max(0.1, deadline - loop.time()))
                assert raw is not None, "the kernel websocket closed"
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["header"]["msg_type"], msg["content"]
                if kind == "stream":
                    result[content["name"]] += content["text"]
                elif kind in ("display_data", "execute_result"):
                    result["display"] += content["data"].get("text/plain", "")
                elif kind == "error":
                    result["errors"].append(content)
                elif kind == "execute_reply":
                    result["reply"] = msg
                elif kind == "status" and content["execution_state"] == "idle":
                    result["idle"] = True
        finally:
            ws.close()
        return result

    def sandbox_of(self, kernel_id: str) -> tuple[str, str]:
        """The service's sandbox id and netns of a kernel, as ``%sandbox status`` reports them."""
        out = self.execute(kernel_id, "%sandbox status")
        assert out["reply"]["content"]["status"] == "ok", out
        found = re.search(r"^sandbox\s+([0-9a-f]+) \(netns (sbx-[0-9a-f]+)\)", out["display"], re.M)
        assert found, out
        return found.group(1), found.group(2)


def _running(service, user: str) -> set[str]:
    boxes = service.api("GET", "api/sandboxes", service.hub.tokens[user]).json()["sandboxes"]
    return {b["id"] for b in boxes if b["state"] in ("running", "starting")}


@pytest.fixture
def servers(hub, service):
    """Starts users' servers; afterwards stops them and checks that no sandbox their kernels
    started is still running at the service (one that is gets stopped here, and fails the test)."""
    started: list[UserServer] = []

    def make(*users: str) -> list[UserServer]:
        """Start the users' servers, all at once (the hub's POST waits for each spawn)."""
        new = [UserServer(hub, user) for user in users]
        for server in new:
            server.running_before = _running(service, server.user)
            started.append(server)
        with concurrent.futures.ThreadPoolExecutor(len(new)) as pool:
            for future in [pool.submit(server.start) for server in new]:
                future.result()
        return new

    yield make
    problems = []
    for server in started:
        try:
            server.stop()
        except Exception as err:  # noqa: BLE001 - stop the others, then fail
            problems.append(f"stopping {server.user}'s server: {err}")
        deadline = time.monotonic() + 15
        while (left := _running(service, server.user) - server.running_before) and time.monotonic() < deadline:
            time.sleep(0.3)
        for sid in left:
            service.api("DELETE", f"api/sandboxes/{sid}", hub.tokens[server.user])
            problems.append(f"{server.user}'s sandbox {sid} outlived the server")
    assert not problems, problems


def _kernel_pid(kernel_id: str) -> int | None:
    """The kernel process of a jupyter_server kernel, found by its connection file's name."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(b"sandbox_kernel" in a for a in argv) and any(f"kernel-{kernel_id}".encode() in a for a in argv):
            return int(entry)
    return None


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("PPid:"))


def test_spawned_user_servers_run_sandbox_kernels_through_the_service(servers, service, hub):
    alice, bob = servers("alice", "bob")
    a_kernel, b_kernel = alice.start_kernel(), bob.start_kernel()

    # each user's cells run in that user's own sandbox, as nobody
    out = alice.execute(a_kernel, "import os\nsecret = 'alice-only'\nprint('uid', os.getuid())")
    assert out["reply"]["content"]["status"] == "ok", out
    # after the start's progress lines ("[sandbox] …") when the cell waited for the sandbox
    assert [l for l in out["stdout"].splitlines() if not l.startswith("[sandbox] ")][0] == "uid 65534", out["stdout"]
    assert out["reply"]["metadata"]["sandbox"]["exit_status"] == 0
    out = bob.execute(b_kernel, "print(globals().get('secret'))")
    assert out["stdout"].splitlines()[0] == "None", out
    # the service lists, for each user, exactly the one sandbox that user's kernel reports
    sid, netns = alice.sandbox_of(a_kernel)
    b_sid, b_netns = bob.sandbox_of(b_kernel)
    assert sid != b_sid and netns != b_netns
    assert _running(service, "alice") == {sid} and _running(service, "bob") == {b_sid}
    mine = service.api("GET", f"api/sandboxes/{sid}", hub.tokens["alice"]).json()
    assert mine["user"] == "alice" and mine["details"]["netns"] == netns and mine["attached"]
    assert {netns, b_netns} <= sandbox_namespaces()

    # the kernel holds its server's token and the service's URL, and no other credential;
    # neither does the server it runs in
    pid = _kernel_pid(a_kernel)
    assert pid is not None, "alice's kernel process was not found"
    server_pid = _parent(pid)
    with open(f"/proc/{server_pid}/cmdline", "rb") as f:
        assert b"jupyterhub.singleuser" in f.read()
    env, server_env = _environ(pid), _environ(server_pid)
    assert env["SANDBOX_KERNEL_BACKEND"] == "hub" and env["SANDBOX_KERNEL_HUB_URL"] == service.proxied_url
    assert env["JUPYTERHUB_USER"] == "alice"
    assert env["JUPYTERHUB_API_TOKEN"] and env["JUPYTERHUB_API_TOKEN"] == server_env["JUPYTERHUB_API_TOKEN"]
    others = {hub.service_token, hub.admin_token, hub.k8s_service_token, hub.spare_service_token,
              *hub.tokens.values()}
    for environ in (env, server_env):
        assert not {"KUBECONFIG", "KUBERNETES_SERVICE_HOST", "CONFIGPROXY_AUTH_TOKEN", "JPY_COOKIE_SECRET",
                    "SANDBOX_HUB_STATE_DIR"} & set(environ)
        leaked = [name for name, value in environ.items() if any(token in value for token in others)]
        assert not leaked, f"other credentials in the user server's environment: {leaked}"

    # beyond the ceiling: refused with the administrator's reason, audited, nothing changed
    out = alice.execute(a_kernel, "%sandbox allow 169.254.169.254:80")
    assert out["reply"]["content"]["status"] == "error"
    assert "administrator" in out["reply"]["content"]["evalue"]
    refused = [e for e in service.audit() if e.get("event") == "policy" and e.get("user") == "alice"
               and e.get("result") == "refused"]
    assert refused and "169.254.169.254" in json.dumps(refused[-1]["to"])
    assert refused[-1]["sandbox"] == sid and "always blocks" in refused[-1]["reason"]
    out = alice.execute(a_kernel, "%sandbox allow 10.99.0.0/16")  # private, not the tests' 10.231/16
    assert out["reply"]["content"]["status"] == "error"
    evalue = out["reply"]["content"]["evalue"]  # beyond what users may allow, and a default cluster range
    assert ("outside what your administrator lets users allow" in evalue
            or "which your administrator always blocks" in evalue), out
    refused = [e for e in service.audit() if e.get("event") == "policy" and e.get("sandbox") == sid
               and e.get("result") == "refused"]
    assert refused[-1]["to"]["entries"] == ["10.99.0.0/16"] and "10.99.0.0" in refused[-1]["reason"]
    state = service.api("GET", f"api/sandboxes/{sid}", hub.tokens["alice"]).json()
    assert state["policy"]["entries"] == [] and state["policy"]["mode"] == "deny"
    # within it: accepted and audited
    out = alice.execute(a_kernel, "%sandbox allow 10.231.0.0/16")
    assert out["reply"]["content"]["status"] == "ok", out
    accepted = [e for e in service.audit() if e.get("event") == "policy" and e.get("user") == "alice"
                and e.get("result") == "accepted"]
    assert accepted and "10.231.0.0/16" in accepted[-1]["to"]["entries"]
    assert alice.execute(a_kernel, "print(secret)")["stdout"].splitlines()[0] == "alice-only"

    # bob's token reaches neither alice's server nor her sandbox
    r = requests.get(alice.base + "api/kernels", headers={"Authorization": f"token {bob.token}"}, timeout=30)
    assert r.status_code == 403
    assert service.api("GET", f"api/sandboxes/{sid}", hub.tokens["bob"]).status_code == 404

    # the hub stops alice's server: her kernel stops her sandbox itself (with the server's
    # token: "by" alice, not the service's collection of abandoned sandboxes). The spawner's
    # SIGINT ends jupyter_server without shutting its kernels down: the orphaned kernel notices
    # (ParentWatch), stops its sandbox and exits
    alice.stop()
    stopped = lambda: [e for e in service.audit() if e.get("event") == "sandbox"  # noqa: E731
                       and e.get("action") == "stop" and e.get("sandbox") == sid]
    deadline = time.monotonic() + 30
    while not stopped():  # audited once the backend removed it
        state = service.api("GET", f"api/sandboxes/{sid}", hub.tokens["alice"]).json()
        assert time.monotonic() < deadline, f"alice's sandbox outlived her server: {state}"
        time.sleep(0.3)
    assert stopped()[0]["by"] == "alice", stopped()
    assert service.api("GET", f"api/sandboxes/{sid}", hub.tokens["alice"]).json()["state"] == "stopped"
    assert netns not in sandbox_namespaces()
    assert _kernel_pid(a_kernel) is None
    # bob's kernel is untouched
    assert bob.execute(b_kernel, "print('still', 6 * 7)")["stdout"].splitlines()[0] == "still 42"
    assert _running(service, "bob") == {b_sid} and b_netns in sandbox_namespaces()
