"""User servers spawned by the hub: the path a student takes. The hub starts alice's and bob's
single-user Jupyter servers (local processes, SimpleLocalProcessSpawner), each server starts a
`sandbox` kernel through its REST API, and cells go over the server's kernel websocket — all
through the hub's proxy with the user's own token, as JupyterLab does. The kernels get nothing
but their server's hub token and the service's URL; the service does the rest."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
import requests
from tornado import httpclient, websocket


class UserServer:
    """One user's server, reached through the hub's proxy with a token of that user's."""

    def __init__(self, hub, user: str):
        self.hub, self.user = hub, user
        self.token = hub.new_token(user, [f"access:servers!user={user}"])
        self.base = f"{hub.public_url}/user/{user}/"

    def start(self, timeout: float = 90) -> None:
        r = self.hub.admin("POST", f"/users/{self.user}/server")
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
        r = self.hub.admin("DELETE", f"/users/{self.user}/server")
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
        result = {"stdout": "", "stderr": "", "reply": None, "idle": False, "errors": []}
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
                elif kind == "error":
                    result["errors"].append(content)
                elif kind == "execute_reply":
                    result["reply"] = msg
                elif kind == "status" and content["execution_state"] == "idle":
                    result["idle"] = True
        finally:
            ws.close()
        return result


@pytest.fixture
def servers(hub, service):
    started: list[UserServer] = []

    def make(user: str) -> UserServer:
        server = UserServer(hub, user)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.stop()


def _kernel_pid(kernel_id: str) -> int | None:
    """The kernel process of a jupyter_server kernel, found by its connection file's name."""
    import os

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


def test_spawned_user_servers_run_sandbox_kernels_through_the_service(servers, service, hub):
    alice, bob = servers("alice"), servers("bob")
    a_kernel, b_kernel = alice.start_kernel(), bob.start_kernel()

    # each user's cells run in that user's own sandbox, as nobody
    out = alice.execute(a_kernel, "import os\nsecret = 'alice-only'\nprint('uid', os.getuid())")
    assert out["reply"]["content"]["status"] == "ok", out
    assert out["stdout"].startswith("uid 65534")
    assert out["reply"]["metadata"]["sandbox"]["exit_status"] == 0
    out = bob.execute(b_kernel, "print(globals().get('secret'))")
    assert out["stdout"].splitlines()[0] == "None", out
    mine = service.api("GET", "api/sandboxes", hub.tokens["alice"]).json()["sandboxes"]
    theirs = service.api("GET", "api/sandboxes", hub.tokens["bob"]).json()["sandboxes"]
    running = lambda boxes: [b for b in boxes if b["state"] == "running"]  # noqa: E731
    assert len(running(mine)) == 1 and len(running(theirs)) == 1
    assert running(mine)[0]["id"] != running(theirs)[0]["id"]

    # the kernel holds its server's token and the service's URL, and no other credential
    pid = _kernel_pid(a_kernel)
    assert pid is not None, "alice's kernel process was not found"
    env = _environ(pid)
    assert env["SANDBOX_KERNEL_BACKEND"] == "hub" and env.get("JUPYTERHUB_API_TOKEN")
    assert env["JUPYTERHUB_USER"] == "alice"
    assert not {"KUBECONFIG", "KUBERNETES_SERVICE_HOST"} & set(env)
    for credential in (hub.service_token, hub.admin_token, hub.k8s_service_token, hub.tokens["bob"]):
        assert credential not in env.values()

    # beyond the ceiling: refused with the administrator's reason, audited, nothing changed
    out = alice.execute(a_kernel, "%sandbox allow 169.254.169.254:80")
    assert out["reply"]["content"]["status"] == "error"
    assert "administrator" in out["reply"]["content"]["evalue"]
    refused = [e for e in service.audit() if e.get("event") == "policy" and e.get("user") == "alice"
               and e.get("result") == "refused"]
    assert refused and "169.254.169.254" in json.dumps(refused[-1]["to"])
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
    sid = running(mine)[0]["id"]
    assert service.api("GET", f"api/sandboxes/{sid}", hub.tokens["bob"]).status_code == 404

    # the hub stops alice's server: its kernel shuts down, and with it her sandbox
    alice.stop()
    deadline = time.monotonic() + 30
    while True:
        state = service.api("GET", f"api/sandboxes/{sid}", hub.tokens["alice"])
        if state.status_code == 404 or state.json()["state"] not in ("running", "starting"):
            break
        assert time.monotonic() < deadline, f"alice's sandbox outlived her server: {state.json()}"
        time.sleep(0.3)
    assert _kernel_pid(a_kernel) is None
    # bob's kernel is untouched
    assert bob.execute(b_kernel, "print('still', 6 * 7)")["stdout"].splitlines()[0] == "still 42"
