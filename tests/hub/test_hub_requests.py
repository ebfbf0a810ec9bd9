"""Requests for access (issue #18 point 2) and the service's clock (point 3, hub part), against
a real JupyterHub: a student's kernel asks for a destination beyond her ceiling, a teacher grants
or denies it on the admin page in headless Chromium, and the kernel learns the answer between
cells; grants and timed entries end on the service's clock, across a service restart; bad input
is refused and audited."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from browsertools import CHROMIUM, browser_missing, run_browser_script, shots_dir
from kerneltest import CONNECT

SCRIPT = Path(__file__).with_name("drive_requests.mjs")
#: alice's ceiling in these tests: public destinations only, so the tests' hosts (10.231/16) are
#: beyond it (and could be granted: they are not always blocked)
PUBLIC_ONLY = {"user_may_allow": ["public"]}


def _entry(host) -> str:
    return f"{host.ip}:{host.port}/tcp"


def _access(service, since: float, **match) -> list[dict]:
    return [e for e in service.audit() if e["time"] >= since and e.get("event") == "access"
            and all(e.get(k) == v for k, v in match.items())]


@pytest.fixture
def narrow_ceilings(service, hub):
    """alice and the teacher get PUBLIC_ONLY; afterwards every override and grant is removed."""
    token = hub.tokens["teacher"]
    for user in ("alice", "teacher"):
        assert service.api("PUT", f"api/ceilings/users/{user}", token, json=PUBLIC_ONLY).status_code == 200
    yield
    for grant in service.api("GET", "api/grants", token).json()["grants"]:
        service.api("DELETE", f"api/grants/{grant['id']}", token)
    for user in ("alice", "teacher"):
        service.api("DELETE", f"api/ceilings/users/{user}", token)
    assert service.api("GET", "api/grants", token).json()["grants"] == []


def _wait(condition, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def test_a_students_request_is_granted_and_denied_in_the_browser(service, hub, test_host, narrow_ceilings,
                                                                tmp_path):
    missing = browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail("the requests browser test needs " + ", ".join(missing))
        pytest.skip("the requests browser test needs " + ", ".join(missing))
    from kerneltest import KernelDriver, Panel

    host, other = test_host(), test_host(8081)
    entry, other_entry = _entry(host), _entry(other)
    since = time.time()
    kernel = KernelDriver({"SANDBOX_KERNEL_BACKEND": "hub", "SANDBOX_KERNEL_HUB_URL": service.proxied_url,
                           "JUPYTERHUB_API_TOKEN": hub.tokens["alice"]})
    try:
        # blocked, and beyond her ceiling: the notice offers Request access (not Allow)
        cell = kernel.execute(CONNECT.format(ip=host.ip, port=host.port), timeout=120)
        assert "refused" in cell.stream(), cell.outputs
        notices = [o["content"]["data"]["application/vnd.sandbox-kernel.notice+json"] for o in cell.outputs
                   if "application/vnd.sandbox-kernel.notice+json" in o["content"].get("data", {})]
        assert notices and notices[0]["remedy"]["action"] == "forbidden", notices
        assert notices[0]["remedy"]["request"] == f"%sandbox request {entry}"
        # so does the refusal of %sandbox allow (the service's ceiling, audited there)
        refused = kernel.execute(f"%sandbox allow {entry}")
        assert refused.status == "error" and f"%sandbox request {entry}" in refused.reply["content"]["evalue"]

        # she asks, with a reason; the display waits for the answer
        asked = kernel.execute(f"%sandbox request {entry} --reason 'lab 3 reads the course server'")
        assert asked.status == "ok", asked.outputs
        rid = re.search(r"request ([0-9a-f]+) sent", asked.stream()).group(1)
        shown = [o["content"]["data"] for o in asked.of_type("display_data")]
        assert any("waiting for your administrator" in d.get("text/plain", "") for d in shown), shown
        asked2 = kernel.execute(f"%sandbox request {other_entry} --reason 'just curious'")
        rid2 = re.search(r"request ([0-9a-f]+) sent", asked2.stream()).group(1)
        # the policy panel offers Request access on the blocked row, and lists her requests
        panel = Panel(kernel, kernel.execute("%sandbox policy"))
        button = panel.models[panel.find("ButtonModel", description="Request access")]
        assert button["tooltip"] == f"%sandbox request {entry}" and not button["disabled"]
        assert "waiting for your administrator" in panel.wait_for_html("Requests for access", entry)
        for cell in (asked, asked2):  # one reader of the widgets' updates for all of them
            panel.models.update(Panel(kernel, cell).models)
        recorded = service.api("GET", "api/requests", hub.tokens["alice"]).json()["requests"]
        mine = {r["id"]: r for r in recorded}
        assert mine[rid]["state"] == "pending" and mine[rid]["entries"] == [entry]
        assert mine[rid]["reason"] == "lab 3 reads the course server" and mine[rid]["sandbox"]
        assert _access(service, since, action="request", result="accepted", user="alice")

        # the teacher grants the first (for alice, until revoked) and denies the second, in Chromium
        shot = shots_dir(tmp_path) / "hub-requests.png"
        cfg = {"hub": hub.public_url, "adminUrl": service.admin_url, "admin": "teacher", "password": hub.password,
               "executablePath": CHROMIUM, "shot": str(shot),
               "decisions": [{"request": rid, "action": "grant", "scope": "user", "for": ""},
                             {"request": rid2, "action": "deny", "reason": "not needed for lab 3"}]}
        report, err = run_browser_script(SCRIPT, cfg, timeout=180)
        assert report.get("ok"), f"{report}\n{err[-2000:]}"
        header, *rows = report["pendingRows"]
        assert header == ["asked", "user", "entries", "reason", "notebook's kernel", "decision"]
        listed = {row[2]: row for row in rows}
        assert listed[entry][1] == "alice" and listed[entry][3] == "lab 3 reads the course server"
        granted, denied = report["decided"]
        assert f"request {rid} of alice granted: {entry} for user alice, until revoked" in granted["message"]
        assert not granted["stillPending"] and entry in granted["grants"]
        assert f"request {rid2} of alice denied: not needed for lab 3" in denied["message"]
        assert shot.stat().st_size > 10_000

        # her kernel learns both within seconds, between cells: the requests' displays update
        panel.wait_for_html("granted by teacher", entry, timeout=20)
        panel.wait_for_html("denied by teacher", "not needed for lab 3", timeout=20)
        listed = panel.wait_for_html("Requests for access", "granted by teacher", "denied by teacher", timeout=20)
        assert "waiting" not in listed
        # ... and the granted entry is in force: her next connection succeeds, nothing restarted
        cell = kernel.execute(CONNECT.format(ip=host.ip, port=host.port))
        assert "connected" in cell.stream(), cell.outputs
        said = cell.stream("stderr")
        assert "teacher granted your request" in said and "not needed for lab 3" in said, said
        status = kernel.execute("%sandbox status").of_type("display_data")[0]["content"]["data"]["text/plain"]
        assert entry in status
        assert "refused" in kernel.execute(CONNECT.format(ip=other.ip, port=other.port)).stream()
        assert [e["by"] for e in _access(service, since, action="grant", request_id=rid)] == ["teacher"]
        assert [e["reason"] for e in _access(service, since, action="deny", request_id=rid2)] == [
            "not needed for lab 3"]
        policy = [e for e in service.audit() if e["time"] >= since and e.get("event") == "policy"
                  and e.get("by") == "teacher" and e.get("result") == "accepted"]
        assert policy and entry in policy[-1]["to"]["entries"]  # applied by the grant, as the teacher's

        # the grant widened her ceiling by exactly that entry: she may now time it herself; the
        # service's clock ends it, and the notebook is told
        assert kernel.execute(f"%sandbox revoke {entry}").status == "ok"
        timed = kernel.execute(f"%sandbox allow {entry} --for 3s")
        assert timed.status == "ok" and "for 3 s" in timed.stream(), timed.outputs
        assert "(expires in" in kernel.execute("%sandbox status").of_type("display_data")[0]["content"]["data"][
            "text/plain"]
        assert "connected" in kernel.execute(CONNECT.format(ip=host.ip, port=host.port)).stream()
        running = lambda: [b for b in service.api("GET", "api/sandboxes", hub.tokens["alice"]).json()["sandboxes"]  # noqa: E731
                           if b["state"] == "running"]
        assert any(entry in b["timed"] for b in running())
        _wait(lambda: not any(entry in b["policy"]["entries"] for b in running()), "the service ended the timed entry")
        cell = kernel.execute(CONNECT.format(ip=host.ip, port=host.port))
        assert "refused" in cell.stream() and f"timed access ended: {entry}" in cell.stream("stderr"), cell.outputs
    finally:
        kernel.shutdown()


def test_bad_requests_and_forged_decisions_are_refused_and_audited(kernels, service, hub, test_host,
                                                                   narrow_ceilings):
    host = test_host()
    entry = _entry(host)
    alice, teacher = kernels.open("alice"), kernels.open("teacher")
    sid = alice.backend.sandbox_id
    since = time.time()
    alice_token, teacher_token, bob_token = hub.tokens["alice"], hub.tokens["teacher"], hub.tokens["bob"]

    def requests_of(token) -> list[dict]:
        return service.api("GET", "api/requests", token).json()["requests"]

    earlier = requests_of(alice_token)  # of other tests

    def ask(token, **body):
        return service.api("POST", "api/requests", token, json=body)

    # not an entry, always blocked, within the ceiling already, nothing, too long a reason
    for body, status, says in (
            ({"sandbox": sid, "entries": ["not an entry!"]}, 400, "not an egress entry"),
            ({"sandbox": sid, "entries": ["169.254.169.254:80"]}, 403, "cannot be granted"),
            ({"sandbox": sid, "entries": ["pypi.org:443"]}, 400, "within your ceiling already"),
            ({"sandbox": sid, "entries": []}, 400, "at least one entry"),
            ({"sandbox": sid, "entries": [entry], "reason": "x" * 600}, 400, "at most 500")):
        r = ask(alice_token, **body)
        assert (r.status_code, r.json()["error"]) == (status, "access") and says in r.json()["message"], r.text
    assert len(_access(service, since, action="request", result="refused", user="alice")) == 5
    # bob asks for access on alice's sandbox: it does not exist for him (and that is audited)
    r = ask(bob_token, sandbox=sid, entries=[entry])
    assert r.status_code == 404
    assert [e for e in service.audit() if e["time"] >= since and e.get("event") == "denied" and e.get("by") == "bob"]
    assert requests_of(alice_token) == earlier  # nothing recorded by any of it

    r = ask(alice_token, sandbox=sid, entries=[entry], reason="lab 3")
    assert r.status_code == 201
    rid = r.json()["id"]
    # a student cannot decide (hers or anyone's): refused, audited
    r = service.api("POST", f"api/requests/{rid}/grant", alice_token, json={})
    assert r.status_code == 403
    assert _access(service, since, result="refused", by="alice", reason="not an admin")
    # a decision grants what was asked, nothing else; a group she is not in; no such request
    for path, body, status, says in (
            (f"api/requests/{rid}/grant", {"entries": ["0.0.0.0/0"]}, 400, "nothing else"),
            (f"api/requests/{rid}/grant", {"scope": "group:class-b"}, 400, "not in group"),
            (f"api/requests/{rid}/grant", {"for": 10 * 86400}, 400, "between 1 s and 7 days"),
            (f"api/requests/{rid}/deny", {}, 400, "says why"),
            ("api/requests/0123456789ab/grant", {}, 404, "no request")):
        r = service.api("POST", path, teacher_token, json=body)
        assert r.status_code == status and says in r.json()["message"], (path, body, r.text)
    assert len(_access(service, since, result="refused", by="teacher")) == 5
    assert [r["state"] for r in requests_of(alice_token) if r["id"] == rid] == ["pending"]
    assert service.api("GET", "api/grants", teacher_token).json()["grants"] == []

    # an administrator's own request: nobody decides their own
    r = ask(teacher_token, sandbox=teacher.backend.sandbox_id, entries=[entry], reason="mine")
    assert r.status_code == 201
    own = r.json()["id"]
    r = service.api("POST", f"api/requests/{own}/grant", teacher_token, json={})
    assert r.status_code == 403 and "their own request" in r.json()["message"]
    assert _access(service, since, result="refused", by="teacher", request_id=own)

    # decided once, not twice
    assert service.api("POST", f"api/requests/{rid}/deny", teacher_token, json={"reason": "no"}).status_code == 200
    r = service.api("POST", f"api/requests/{rid}/grant", teacher_token, json={})
    assert r.status_code == 409 and "already denied" in r.json()["message"]
    # nothing was widened by any of it
    assert entry not in service.api("GET", "api/ceiling", alice_token).json()["ceiling"]["user_may_allow"]


def test_a_timed_grant_ends_on_the_services_clock(kernels, service, hub, test_host, narrow_ceilings):
    """Granted for 8 s: applied at once; it outlives the kernel that asked (a new kernel may
    allow the entry), and the service ends it: refused again, and the kernel is told between cells."""
    host = test_host()
    entry = _entry(host)
    alice = kernels.open("alice")
    frames: list[dict] = []
    alice.backend.on_access = frames.append
    r = service.api("POST", "api/requests", hub.tokens["alice"],
                    json={"sandbox": alice.backend.sandbox_id, "entries": [entry], "reason": "eight seconds"})
    rid = r.json()["id"]
    r = service.api("POST", f"api/requests/{rid}/grant", hub.tokens["teacher"], json={"for": 8})
    assert r.status_code == 200 and r.json()["state"] == "granted", r.text
    kernels.run(_until(lambda: any(f["event"] == "granted" for f in frames)))
    granted = next(f for f in frames if f["event"] == "granted")
    assert entry in granted["policy"]["entries"] and entry in granted["ceiling"]["user_may_allow"]
    assert "for user alice, until" in granted["message"]
    _, out = kernels.execute(alice, CONNECT.format(ip=host.ip, port=host.port))
    assert "connected" in out.stdout(), out.frames

    # her kernel restarts (a new kernel, a new sandbox with the default policy): the grant is
    # the service's, so the new kernel may allow the entry until the grant's time is up
    kernels.run(alice.stop(), 30)
    again = kernels.open("alice")
    frames.clear()
    again.backend.on_access = frames.append
    policy = {"mode": "allowlist", "entries": [entry]}
    r = service.api("PUT", f"api/sandboxes/{again.backend.sandbox_id}/policy", hub.tokens["alice"],
                    json={"policy": policy})
    assert r.status_code == 200, r.text
    _, out = kernels.execute(again, CONNECT.format(ip=host.ip, port=host.port))
    assert "connected" in out.stdout(), out.frames
    kernels.run(_until(lambda: any(f["event"] == "ended" for f in frames)), timeout=20)
    ended = next(f for f in frames if f["event"] == "ended")
    assert entry not in ended["policy"]["entries"] and entry not in ended["ceiling"]["user_may_allow"]
    assert "ended: its time was up" in ended["message"] and entry in ended["message"]
    _, out = kernels.execute(again, CONNECT.format(ip=host.ip, port=host.port))
    assert "refused" in out.stdout(), out.frames
    assert service.api("GET", "api/grants", hub.tokens["teacher"]).json()["grants"] == []


def test_a_grant_for_a_group_until_revoked(kernels, service, hub, test_host):
    """bob (class-b) asks; the teacher grants it to class-b until revoked: the class's ceiling
    has the entry, bob's sandbox has it at once; revoking takes it out of both."""
    host = test_host()
    entry = _entry(host)
    teacher = hub.tokens["teacher"]
    assert service.api("PUT", "api/ceilings/users/bob", teacher, json=PUBLIC_ONLY).status_code == 200
    try:
        bob = kernels.open("bob")
        frames: list[dict] = []
        bob.backend.on_access = frames.append
        rid = service.api("POST", "api/requests", hub.tokens["bob"],
                          json={"sandbox": bob.backend.sandbox_id, "entries": [entry], "reason": "class data"}).json()["id"]
        r = service.api("POST", f"api/requests/{rid}/grant", teacher, json={"scope": "group:class-b"})
        assert r.status_code == 200, r.text
        grants = service.api("GET", "api/grants", teacher).json()["grants"]
        assert [(g["target"], g["entries"], g["expires"]) for g in grants] == [({"group": "class-b"}, [entry], None)]
        assert entry in service.api("GET", "api/ceiling", hub.tokens["bob"]).json()["ceiling"]["user_may_allow"]
        assert entry not in service.api("GET", "api/ceiling", hub.tokens["alice"]).json()["ceiling"]["user_may_allow"]
        _, out = kernels.execute(bob, CONNECT.format(ip=host.ip, port=host.port))
        assert "connected" in out.stdout(), out.frames
        r = service.api("DELETE", f"api/grants/{grants[0]['id']}", teacher)
        assert r.status_code == 200
        kernels.run(_until(lambda: any(f["event"] == "ended" for f in frames)))
        assert "was revoked by teacher" in frames[-1]["message"]
        _, out = kernels.execute(bob, CONNECT.format(ip=host.ip, port=host.port))
        assert "refused" in out.stdout(), out.frames
        revoked = [e for e in service.audit() if e.get("event") == "access" and e.get("action") == "revoke"]
        assert revoked[-1]["by"] == "teacher" and revoked[-1]["target"] == {"group": "class-b"}
    finally:
        service.api("DELETE", "api/ceilings/users/bob", teacher)
        for grant in service.api("GET", "api/grants", teacher).json()["grants"]:
            service.api("DELETE", f"api/grants/{grant['id']}", teacher)


def test_grants_and_timed_entries_end_after_a_service_restart(spare_service, kernels_for, hub, test_host):
    """Both clocks are in state.json: a service that was down when they ran out ends them when
    it is back (and sandboxes it restarts come back without them)."""
    svc = spare_service()
    kernels = kernels_for(svc)
    teacher, alice_token = hub.tokens["teacher"], hub.tokens["alice"]
    assert svc.api("PUT", "api/ceilings/users/alice", teacher, json=PUBLIC_ONLY).status_code == 200
    host, other = test_host(), test_host(8081)
    alice = kernels.open("alice")
    sid = alice.backend.sandbox_id
    rid = svc.api("POST", "api/requests", alice_token,
                  json={"sandbox": sid, "entries": [_entry(host)]}).json()["id"]
    assert svc.api("POST", f"api/requests/{rid}/grant", teacher, json={"for": 4}).status_code == 200
    # and a timed entry of her own (as %sandbox allow --for sends it), within the widened ceiling
    policy = {"mode": "allowlist", "entries": [_entry(host), f"{other.ip}:{other.port}/tcp"]}
    assert svc.api("PUT", "api/ceilings/users/alice", teacher,
                   json={"user_may_allow": ["public", f"{other.ip}/32"]}).status_code == 200
    r = svc.api("PUT", f"api/sandboxes/{sid}/policy", alice_token,
                json={"policy": policy, "timed": {f"{other.ip}:{other.port}/tcp": 4}})
    assert r.status_code == 200 and list(r.json()["timed"]) == [f"{other.ip}:{other.port}/tcp"], r.text
    svc.stop()
    time.sleep(5)  # both ran out while the service was down
    svc.start()
    since = time.time() - 30
    state = _wait(lambda: (s := svc.api("GET", f"api/sandboxes/{sid}", alice_token).json())["state"] == "running"
                  and not s["timed"] and _entry(host) not in s["policy"]["entries"] and s, "expiry after restart")
    assert state["policy"]["entries"] == []
    assert svc.api("GET", "api/grants", teacher).json()["grants"] == []
    ended = [e for e in svc.audit() if e["time"] >= since and e.get("event") == "access" and e.get("action") == "end"]
    assert ended and ended[-1]["by"] == "service" and ended[-1]["reason"] == "ended: its time was up"
    svc.api("DELETE", "api/ceilings/users/alice", teacher)


async def _until(condition, step: float = 0.05):
    import asyncio

    while not condition():
        await asyncio.sleep(step)


def test_the_decision_form_needs_its_xsrf_token_and_refuses_ones_own_request(kernels, service, hub, test_host,
                                                                            narrow_ceilings):
    """The page's decision form: a cookie alone decides nothing (403, still pending); with the
    page's token, the teacher's own request is not his to decide (the page says so, audited)."""
    from test_hub_admin import _open_admin_page

    entry = _entry(test_host())
    teacher = kernels.open("teacher")
    rid = service.api("POST", "api/requests", hub.tokens["teacher"],
                      json={"sandbox": teacher.backend.sandbox_id, "entries": [entry], "reason": "mine"}).json()["id"]
    session, page = _open_admin_page(hub, service, "teacher")
    assert page.status_code == 200 and f'id="request-{rid}"' in page.text, page.text[:500]
    assert "your own request: another administrator decides" in page.text
    form = {"request": rid, "action": "grant", "scope": "user", "for": ""}
    for token in (None, "forged"):
        r = session.post(service.admin_url + "/requests", timeout=30, allow_redirects=False,
                         data={**form, **({"_xsrf": token} if token else {})})
        assert r.status_code == 403, r.text[:300]
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text).group(1)
    r = session.post(service.admin_url + "/requests", timeout=30, data={**form, "_xsrf": xsrf})
    assert r.status_code == 200 and "not done: nobody may decide their own request" in r.text
    mine = [q for q in service.api("GET", "api/requests", hub.tokens["teacher"]).json()["requests"] if q["id"] == rid]
    assert mine[0]["state"] == "pending"
    refused = [e for e in service.audit() if e.get("event") == "access" and e.get("request_id") == rid
               and e.get("result") == "refused"]
    assert refused and refused[-1]["by"] == "teacher"
