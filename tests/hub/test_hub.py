"""Hub mode against a real JupyterHub + configurable-http-proxy: the sandbox service runs each
user's sandboxes, keeps users apart, enforces the ceiling server-side, audits, and survives a
restart. The tests act as kernels: ``Session`` over ``HubBackend`` with each user's token,
through the hub's proxy."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import pytest

from kerneltest import CONNECT, namespaces_of
from sandbox_kernel.policy.admin import CeilingRefused
from sandbox_kernel.policy.model import EgressPolicy


def _events(service, since: float, **match) -> list[dict]:
    return [e for e in service.audit() if e["time"] >= since and all(e.get(k) == v for k, v in match.items())]


def test_each_user_runs_cells_in_their_own_sandbox(kernels, service):
    alice, bob = kernels.open("alice"), kernels.open("bob")
    assert alice.backend.sandbox_id != bob.backend.sandbox_id
    result, out = kernels.execute(alice, "secret = 'alice-only'\nprint('hi from', __import__('os').getcwd())")
    assert result.exit_status == 0 and "hi from /home/sandbox" in out.stdout()
    result, out = kernels.execute(bob, "print(globals().get('secret'))")
    assert result.exit_status == 0 and out.stdout().strip() == "None"
    result, out = kernels.execute(alice, "print(secret)")
    assert out.stdout().strip() == "alice-only"
    # each user lists only their own sandboxes
    for user, session in (("alice", alice), ("bob", bob)):
        listed = service.api("GET", "api/sandboxes", service.hub.tokens[user]).json()["sandboxes"]
        assert {s["id"] for s in listed if s["state"] == "running"} == {session.backend.sandbox_id}
        assert {s["user"] for s in listed} == {user}
    # two network namespaces, both owned by the service process
    assert len(namespaces_of(service.proc.pid)) >= 2


def test_a_user_cannot_touch_another_users_sandbox(kernels, service, hub):
    alice = kernels.open("alice")
    sid = alice.backend.sandbox_id
    before = service.api("GET", f"api/sandboxes/{sid}", hub.tokens["alice"]).json()
    since = time.time()
    wide = {"policy": {"mode": "allowlist", "entries": ["10.231.0.0/16"]}}
    for token, expected in ((hub.tokens["bob"], 404), (None, 401), (hub.tokens["alice-no-access"], 403),
                            ("not-a-token", 403)):
        assert service.api("GET", f"api/sandboxes/{sid}", token).status_code == expected
        assert service.api("PUT", f"api/sandboxes/{sid}/policy", token, json=wide).status_code == expected
        assert service.api("POST", f"api/sandboxes/{sid}/interrupt", token).status_code == expected
        assert service.api("DELETE", f"api/sandboxes/{sid}", token).status_code == expected
        listed = service.api("GET", "api/sandboxes", token)
        assert listed.status_code == (200 if expected == 404 else expected)
        if listed.status_code == 200:
            assert sid not in {s["id"] for s in listed.json()["sandboxes"]}
    # bob cannot open alice's execution stream either (as a kernel would, with his token)
    from sandbox_kernel.errors import SandboxStartError
    from sandbox_kernel.hub.backend import HubBackend

    intruder = HubBackend(service_url=service.proxied_url, api_token=hub.tokens["bob"])
    intruder.sandbox_id = sid
    with pytest.raises(SandboxStartError, match="not-found|no sandbox|404"):
        kernels.run(intruder.attach())
    # nothing changed: alice's sandbox runs, same policy, her state intact
    after = service.api("GET", f"api/sandboxes/{sid}", hub.tokens["alice"]).json()
    assert (after["state"], after["policy"], after["started"]) == ("running", before["policy"], before["started"])
    result, out = kernels.execute(alice, "print(6 * 7)")
    assert out.stdout().strip() == "42"
    denied = _events(service, since, event="denied", by="bob", user="alice", sandbox=sid)
    assert len(denied) >= 5
    assert not _events(service, since, event="policy", sandbox=sid)


def test_beyond_the_ceiling_is_refused_and_audited(kernels, service, hub, test_host):
    host = test_host()
    alice = kernels.open("alice")
    sid = alice.backend.sandbox_id
    since = time.time()
    # default-deny: the connection is refused, reported to the kernel and audited
    result, out = kernels.execute(alice, CONNECT.format(ip=host.ip, port=host.port))
    assert "refused" in out.stdout()
    assert any(f.get("source") == "guard" for f in out.blocked()), out.frames
    # a subprocess is not guarded: the enforcer's own record comes back through the service
    result, out = kernels.execute(alice, "import subprocess, sys\n"
                                  f"subprocess.run([sys.executable, '-I', '-c', {CONNECT.format(ip=host.ip, port=host.port)!r}])")
    assert any(f.get("source") == "enforcer" for f in out.blocked()), out.frames
    assert _events(service, since, event="blocked", user="alice", sandbox=sid, source="enforcer")
    assert _events(service, since, event="blocked", user="alice", sandbox=sid, ip=host.ip)
    # within the ceiling (10.231.0.0/16): accepted, enforced
    allowed = EgressPolicy(mode="allowlist", entries=(f"{host.ip}:{host.port}/tcp",))
    kernels.run(alice.apply_policy(allowed))
    result, out = kernels.execute(alice, CONNECT.format(ip=host.ip, port=host.port))
    assert "connected" in out.stdout()
    # beyond it, through the kernel's path: refused with the administrator's reason
    # (a private range: beyond what users may allow, and inside the default cluster ranges)
    with pytest.raises(CeilingRefused, match="outside what your administrator lets users allow|"
                                             "which your administrator always blocks"):
        kernels.run(alice.backend.apply_policy(allowed.with_entries_added("10.9.0.0/16")))
    # beyond it, by a hand-made request with alice's own token: refused, nothing changed
    r = service.api("PUT", f"api/sandboxes/{sid}/policy", hub.tokens["alice"],
                    json={"policy": {"mode": "allowlist", "entries": ["169.254.169.254:80/tcp"]}})
    assert r.status_code == 403 and r.json()["error"] == "ceiling", r.text
    assert service.api("GET", f"api/sandboxes/{sid}/policy", hub.tokens["alice"]).json()["policy"] == allowed.to_dict()
    result, out = kernels.execute(alice, CONNECT.format(ip=host.ip, port=host.port))
    assert "connected" in out.stdout()
    policy_events = _events(service, since, event="policy", sandbox=sid)
    assert [e["result"] for e in policy_events] == ["accepted", "refused", "refused"]
    assert all(e["by"] == "alice" and e["user"] == "alice" and "from" in e and "to" in e for e in policy_events)
    assert policy_events[2]["to"]["entries"] == ["169.254.169.254:80/tcp"]
    assert "169.254" in policy_events[2]["reason"]


def test_an_admin_sets_exam_mode_for_a_user(kernels, service, hub, test_host):
    host = test_host()
    alice, bob = kernels.open("alice"), kernels.open("bob")
    allowed = EgressPolicy(mode="allowlist", entries=(f"{host.ip}:{host.port}/tcp",))
    for session in (alice, bob):
        kernels.run(session.apply_policy(allowed))
    forced = []
    bob.backend.on_policy_forced = lambda policy, reason: forced.append((policy, reason))
    since = time.time()
    try:
        # a user is not an admin: refused and audited
        r = service.api("PUT", "api/ceilings/users/bob", hub.tokens["alice"], json={"locked": False, "user_may_allow": ["any"]})
        assert r.status_code == 403
        assert _events(service, since, event="ceiling", by="alice", result="refused")
        # the hub admin locks bob (exam mode): his sandbox is reset to the default (deny) at once
        r = service.api("PUT", "api/ceilings/users/bob", hub.tokens["teacher"], json={"locked": True})
        assert r.status_code == 200, r.text
        assert r.json()["conformed"] == [bob.backend.sandbox_id]
        result, out = kernels.execute(bob, CONNECT.format(ip=host.ip, port=host.port))
        assert "refused" in out.stdout()
        assert forced and forced[0][0].mode == "deny" and "ceiling" in forced[0][1]
        # bob may change nothing now, not even through a hand-made request
        r = service.api("PUT", f"api/sandboxes/{bob.backend.sandbox_id}/policy", hub.tokens["bob"],
                        json={"policy": allowed.to_dict()})
        assert r.status_code == 403 and "exam mode" in r.json()["reason"]
        assert service.api("GET", "api/ceiling", hub.tokens["bob"]).json()["ceiling"]["locked"] is True
        # alice is not concerned
        result, out = kernels.execute(alice, CONNECT.format(ip=host.ip, port=host.port))
        assert "connected" in out.stdout()
        assert service.api("GET", "api/ceiling", hub.tokens["alice"]).json()["ceiling"]["locked"] is False
        # the audit log has the ceiling change and the forced policy change, by the teacher
        assert _events(service, since, event="ceiling", by="teacher", result="accepted", target={"user": "bob"})
        forced_events = _events(service, since, event="policy", user="bob", by="teacher", forced=True)
        assert forced_events and forced_events[0]["to"]["mode"] == "deny"
        assert _events(service, since, event="policy", user="bob", by="bob", result="refused")
    finally:
        service.api("DELETE", "api/ceilings/users/bob", hub.tokens["teacher"])


def test_a_group_ceiling_applies_to_its_members(kernels, service, hub):
    kernels.open("bob")  # the service learns bob's groups from the hub on his requests
    try:
        r = service.api("PUT", "api/ceilings/groups/class-b", hub.tokens["teacher"],
                        json={"user_may_allow": ["pypi.org:443"], "max_entries": 3})
        assert r.status_code == 200, r.text
        assert service.api("GET", "api/ceiling", hub.tokens["bob"]).json()["ceiling"]["user_may_allow"] == ["pypi.org:443"]
        assert service.api("GET", "api/ceiling", hub.tokens["alice"]).json()["ceiling"]["user_may_allow"] != ["pypi.org:443"]
        sid = service.api("GET", "api/sandboxes", hub.tokens["bob"]).json()["sandboxes"][-1]["id"]
        r = service.api("PUT", f"api/sandboxes/{sid}/policy", hub.tokens["bob"],
                        json={"policy": {"mode": "allowlist", "entries": ["10.231.1.2:8080/tcp"]}})
        assert r.status_code == 403
    finally:
        service.api("DELETE", "api/ceilings/groups/class-b", hub.tokens["teacher"])


def _wait_for(what: str, check, bound: float = 60.0):
    """Poll ``check()`` until it returns something true; the bound is generous (a loaded
    machine), the test asserts what happened, not how fast."""
    deadline = time.monotonic() + bound
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {bound:.0f} s"
        time.sleep(0.3)


def test_exam_mode_for_a_group_reaches_running_sandboxes(kernels, service, hub, test_host):
    """The class's sequence: alice has an allowlist; the hub admin puts her in group exam1;
    the teacher sets exam1's ceiling to exam mode. Her running sandbox is closed at once,
    though she sent no request since joining. Then bob, running too, is added to exam1: the
    service's refresh of the group's members closes his without any action of his."""
    host = test_host()
    alice, bob = kernels.open("alice"), kernels.open("bob")
    entry = f"{host.ip}:{host.port}/tcp"
    for session in (alice, bob):
        kernels.run(session.apply_policy(EgressPolicy(mode="allowlist", entries=(entry,),
                                                      presets=("github", "pypi", "conda", "huggingface"))))
        result, out = kernels.execute(session, CONNECT.format(ip=host.ip, port=host.port))
        assert "connected" in out.stdout(), out.frames
    teacher = hub.tokens["teacher"]
    exam = {"locked": True, "mode": "deny", "entries": [], "presets": []}
    try:
        assert hub.admin("POST", "/groups/exam1", json={"users": ["alice"]}).status_code == 201
        r = service.api("PUT", "api/ceilings/groups/exam1", teacher, json={"ceiling": exam})
        assert r.status_code == 200, r.text
        assert r.json()["conformed"] == [alice.backend.sandbox_id], r.json()
        assert r.json()["members"] == ["alice"] and "warning" not in r.json()
        # no request of hers in between: her next cell (on the open stream) is refused
        result, out = kernels.execute(alice, CONNECT.format(ip=host.ip, port=host.port))
        assert "refused" in out.stdout(), out.frames
        forced = [e for e in service.audit() if e.get("event") == "policy" and e.get("forced")
                  and e.get("sandbox") == alice.backend.sandbox_id]
        assert forced and forced[-1]["by"] == "teacher" and forced[-1]["to"]["mode"] == "deny"
        assert "group exam1" in forced[-1]["reason"]
        # bob is not in exam1 (yet): still connected
        result, out = kernels.execute(bob, CONNECT.format(ip=host.ip, port=host.port))
        assert "connected" in out.stdout(), out.frames

        # bob joins exam1 at the hub; the service's refresh conforms his running sandbox
        assert hub.admin("POST", "/groups/exam1/users", json={"users": ["bob"]}).status_code == 200
        bob_sid = bob.backend.sandbox_id

        def bob_conformed():
            return [e for e in service.audit() if e.get("event") == "policy" and e.get("forced")
                    and e.get("sandbox") == bob_sid]
        forced = _wait_for("bob's sandbox conformed by the group refresh", bob_conformed)
        assert forced[-1]["by"] == "service" and "bob joined group exam1" in forced[-1]["reason"]
        result, out = kernels.execute(bob, CONNECT.format(ip=host.ip, port=host.port))
        assert "refused" in out.stdout(), out.frames
        for user, sid in (("alice", alice.backend.sandbox_id), ("bob", bob_sid)):
            state = service.api("GET", f"api/sandboxes/{sid}", hub.tokens[user]).json()
            assert state["policy"]["mode"] == "deny" and state["conformed"]["reason"], state
            assert service.api("GET", "api/ceiling", hub.tokens[user]).json()["ceiling"]["locked"] is True
    finally:
        service.api("DELETE", "api/ceilings/groups/exam1", teacher)
        hub.admin("DELETE", "/groups/exam1")


def test_the_service_restarting_keeps_sandboxes_and_policies(kernels, service, hub, test_host):
    host = test_host()
    alice = kernels.open("alice")
    sid = alice.backend.sandbox_id
    allowed = EgressPolicy(mode="allowlist", entries=(f"{host.ip}:{host.port}/tcp",))
    kernels.run(alice.apply_policy(allowed))
    r = service.api("PUT", "api/ceilings/users/bob", hub.tokens["teacher"], json={"max_entries": 7})
    assert r.status_code == 200
    try:
        old_pid = service.proc.pid
        service.restart(signal.SIGKILL)  # the hardest case: no chance to clean up
        # the new service process removed what the killed one left, and restored the sandbox
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            state = service.api("GET", f"api/sandboxes/{sid}", hub.tokens["alice"]).json()
            if state.get("state") == "running":
                break
            time.sleep(0.3)
        assert state["state"] == "running" and state["policy"] == allowed.to_dict(), state
        assert not namespaces_of(old_pid)
        assert service.api("GET", "api/ceilings", hub.tokens["teacher"]).json()["users"]["bob"] == {"max_entries": 7}
        # the kernel's next cell runs in the restored sandbox, under the same policy
        result, out = kernels.execute(alice, CONNECT.format(ip=host.ip, port=host.port))
        if result.crashed:  # the stream ended while this cell was sent: the kernel says why
            assert "restarted" in result.crashed
            result, out = kernels.execute(alice, CONNECT.format(ip=host.ip, port=host.port))
        assert "connected" in out.stdout(), out.frames
        assert service.api("GET", f"api/sandboxes/{alice.backend.sandbox_id}/policy",
                           hub.tokens["alice"]).json()["policy"] == allowed.to_dict()
    finally:
        service.api("DELETE", "api/ceilings/users/bob", hub.tokens["teacher"])


def test_a_real_sandbox_kernel_in_hub_mode(service):
    """The kernel as a user server runs it: backend 'hub', the user's token, nothing else."""
    from kerneltest import KernelDriver

    kernel = KernelDriver({"SANDBOX_KERNEL_BACKEND": "hub", "SANDBOX_KERNEL_HUB_URL": service.proxied_url,
                           "JUPYTERHUB_API_TOKEN": service.hub.tokens["alice"]})
    try:
        cell = kernel.execute("import os\nvalue = 6 * 7\nprint(value, os.getuid())", timeout=120)
        assert cell.status == "ok", cell.outputs
        # after the start's progress lines when the cell had to wait for the sandbox
        printed = [line for line in cell.stream().splitlines() if not line.startswith("[sandbox] ")]
        assert printed[0] == "42 65534", cell.stream()  # then the footer
        status = kernel.execute("%sandbox status").of_type("display_data")[0]["content"]["data"]["text/plain"]
        assert "hub" in status
        # the service's ceiling counts: the metadata server stays closed, refused with the admin's reason
        refused = kernel.execute("%sandbox allow 169.254.169.254:80")
        assert refused.status == "error" and "administrator" in refused.reply["content"]["evalue"]
        # ... and through the policy panel's Apply: refused by the service, shown, audited
        from kerneltest import Panel

        panel = Panel(kernel, kernel.execute("%sandbox policy"))
        panel.set(panel.find("ToggleButtonsModel", description="Egress"), index=1)  # Allowlist
        panel.set(panel.find("TextareaModel", description="Allow"), value="169.254.169.254:443/tcp")
        panel.click(panel.find("ButtonModel", description="Apply"))
        panel.wait_for_html("not applied, nothing changed", "administrator")
        audited = [e for e in service.audit() if e.get("event") == "policy" and e.get("user") == "alice"
                   and e.get("result") == "refused" and "169.254.169.254:443/tcp" in e["to"].get("entries", [])]
        assert audited, "the panel's refused change is not in the audit log"
        assert "default-deny" in [l for l in kernel.execute("%sandbox status").of_type("display_data")[0]["content"][
            "data"]["text/plain"].splitlines() if l.startswith("policy")][0]
        assert kernel.execute("value").of_type("execute_result")[0]["content"]["data"]["text/plain"] == "42"
    finally:
        kernel.shutdown()


def test_an_interrupt_reaches_the_cell_once(kernels, service):
    # A kernel in hub mode sent the interrupt in-band through the service's relay and then
    # asked the service to interrupt too, which sent a second one: a cell that caught the
    # first KeyboardInterrupt to clean up was interrupted again in its clean-up.
    alice = kernels.open("alice")
    code = ("import signal, time\n"
            "hits = []\n"
            "signal.signal(signal.SIGINT, lambda *a: hits.append(time.time()))\n"
            "print('waiting', flush=True)\n"
            "end = time.time() + 60\n"
            "while not hits and time.time() < end:\n"
            "    time.sleep(0.02)\n"
            "time.sleep(3)  # room for a second interrupt to arrive\n"
            "print('interrupts:', len(hits))\n")

    async def run_and_interrupt():
        sink = kernels.Sink()
        task = asyncio.ensure_future(alice.execute(code, sink))
        while "waiting" not in sink.stdout():
            assert not task.done(), sink.frames
            await asyncio.sleep(0.02)
        await alice.interrupt()
        return await task, sink

    result, sink = kernels.run(run_and_interrupt(), timeout=120)
    assert result.exit_status == 0, sink.frames
    assert "interrupts: 1" in sink.stdout(), sink.stdout()


FORGE = ("import gc, os\n"
         "channel = next(o for o in gc.get_objects() if type(o).__name__ == 'StdioChannel')\n"
         "os.write(channel._out, {frame!r})\n"
         "import time\n"
         "time.sleep(60)\n")


@pytest.mark.parametrize("frame", [
    b"not json at all\n",  # the service's transport cannot decode it
    b'{"type": "stream", "name": "stdout", "text": 42}\n',  # decodes, does not check
], ids=["text", "field-type"])
def test_a_protocol_error_from_the_sandbox_ends_it_and_the_next_cell_runs_fresh(kernels, service, frame):
    # The service's reader dropped a bad frame and read on: the cell went on as if nothing had
    # happened. As in the kernel, a sandbox that breaks the protocol is stopped and reported.
    alice = kernels.open("alice")
    sid = alice.backend.sandbox_id
    assert kernels.execute(alice, "survivor = 1")[0].exit_status == 0
    since = time.time()
    result, _ = kernels.execute(alice, FORGE.format(frame=frame), timeout=40)
    assert result.status == "error" and result.crashed, result
    assert result.crashed.startswith("the sandbox broke the protocol ("), result.crashed
    # the service stopped it and says why (in its record, which the kernel quoted, and its audit)
    (exited,) = _events(service, since, sandbox=sid, action="exited")
    assert exited["reason"] == result.crashed
    # the next cell: a fresh sandbox
    result, out = kernels.execute(alice, "print('survivor' in globals())")
    assert result.exit_status == 0 and out.stdout().strip() == "False", out.frames


def test_a_users_own_request_with_new_groups_conforms_their_sandboxes(spare_service, kernels_for, hub, test_host):
    """With no refresh schedule, the hub's identity on a user's own request is how the service
    learns that they joined a group with a ceiling: their running sandbox is conformed then,
    before the request is answered."""
    svc = spare_service(env={"SANDBOX_HUB_GROUP_REFRESH_INTERVAL": "0"})
    kernels = kernels_for(svc)
    host = test_host()
    bob = kernels.open("bob")
    kernels.run(bob.apply_policy(EgressPolicy(mode="allowlist", entries=(f"{host.ip}:{host.port}/tcp",))))
    exam = {"locked": True, "mode": "deny", "entries": [], "presets": []}
    try:
        r = svc.api("PUT", "api/ceilings/groups/exam2", hub.tokens["teacher"], json={"ceiling": exam})
        assert r.status_code == 200 and r.json()["conformed"] == [], r.text  # no such group at the hub yet
        assert hub.admin("POST", "/groups/exam2", json={"users": ["bob"]}).status_code == 201
        result, out = kernels.execute(bob, CONNECT.format(ip=host.ip, port=host.port))
        assert "connected" in out.stdout(), out.frames  # nobody told the service yet
        # a request of bob's with a token the service has not seen (no cached identity)
        token = hub.new_token("bob", [f"access:services!service={svc.name}"])
        ceiling = svc.api("GET", "api/ceiling", token).json()["ceiling"]
        assert ceiling["locked"] is True
        forced = [e for e in svc.audit() if e.get("event") == "policy" and e.get("forced")
                  and e.get("sandbox") == bob.backend.sandbox_id]
        assert forced and forced[-1]["by"] == "service" and "bob's groups changed" in forced[-1]["reason"]
        result, out = kernels.execute(bob, CONNECT.format(ip=host.ip, port=host.port))
        assert "refused" in out.stdout(), out.frames
    finally:
        hub.admin("DELETE", "/groups/exam2")
