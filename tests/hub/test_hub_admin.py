"""The service's admin page: a hub admin logs in through the hub (real JupyterHub, headless
Chromium) and sets exam mode for a class with a form; a student gets 403; nobody gets the
hub's login. The form is XSRF-protected, and user-controlled text on the page is escaped."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import requests
from browsertools import CHROMIUM, browser_missing, run_browser_script

SCRIPT = Path(__file__).with_name("drive_admin.mjs")


@pytest.fixture
def overrides_removed(service, hub):
    """Whatever ceiling overrides a test sets are removed afterwards, pass or fail; and no
    user server was started by logging in (the logins go straight to the admin page)."""
    yield
    for user in ("teacher", "alice"):
        servers = hub.admin("GET", f"/users/{user}").json().get("servers") or {}
        assert not servers, f"logging in started {user}'s server"
    token = hub.tokens["teacher"]
    for kind, names in service.api("GET", "api/ceilings", token).json().items():
        for name in list(names):
            service.api("DELETE", f"api/ceilings/{kind}/{requests.utils.quote(name, safe='')}", token)
    assert service.api("GET", "api/ceilings", token).json() == {"users": {}, "groups": {}}


def test_a_teacher_sets_exam_mode_for_a_class_in_the_browser(kernels, service, hub, tmp_path, test_host,
                                                              overrides_removed):
    missing = browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail("the admin page test needs " + ", ".join(missing))
        pytest.skip("the admin page test needs " + ", ".join(missing))
    alice, bob = kernels.open("alice"), kernels.open("bob")
    # alice's sandbox blocks a connection (default deny): the page counts it
    host = test_host()
    result, out = kernels.execute(alice, f"import socket\ntry:\n    socket.create_connection(({host.ip!r}, "
                                  f"{host.port}), timeout=3)\nexcept OSError as e:\n    print('refused')")
    assert "refused" in out.stdout() and out.blocked(), out.frames
    # bob has an allowlist (within the ceiling): exam mode for his class must close it
    bob_policy = {"mode": "allowlist", "entries": [f"{host.ip}:{host.port}/tcp"]}
    assert service.api("PUT", f"api/sandboxes/{bob.backend.sandbox_id}/policy", hub.tokens["bob"],
                       json={"policy": bob_policy}).status_code == 200
    # a hostile-looking entry: the page must show it as text
    hostile = "<script>alert(1)</script>.example"
    assert service.api("PUT", f"api/sandboxes/{bob.backend.sandbox_id}/policy", hub.tokens["bob"],
                       json={"policy": {"mode": "allowlist", "entries": [hostile]}}).status_code in (400, 403)

    shots = os.environ.get("SANDBOX_KERNEL_SCREENSHOTS")
    shot = str(Path(shots) / "hub-admin.png") if shots else str(tmp_path / "hub-admin.png")
    cfg = {"hub": hub.public_url, "adminUrl": service.admin_url, "admin": "teacher",
           "student": "alice", "password": hub.password, "group": "class-b", "shot": shot,
           "executablePath": CHROMIUM}
    report, err = run_browser_script(SCRIPT, cfg, timeout=180)
    assert report["ok"], f"{report}\n{err[-2000:]}"
    assert report["offLoopback"] == []

    # the teacher saw the page (through the hub's OAuth) with bob's sandbox and the audit log
    assert report["adminStatus"] == 200 and report["adminUrl"] == service.admin_url
    header, *rows = report["sandboxRows"]
    assert header == ["user", "sandbox", "state", "backend", "policy", "started", "blocked", "kernel attached",
                      "conformed"]
    shown = {row[1]: dict(zip(header, row)) for row in rows}
    for user, session in (("alice", alice), ("bob", bob)):
        row = shown[session.backend.sandbox_id]
        assert (row["user"], row["state"], row["backend"], row["kernel attached"]) == (user, "running", "local", "yes")
    assert int(shown[alice.backend.sandbox_id]["blocked"]) >= 1
    assert shown[bob.backend.sandbox_id]["blocked"] == "0"
    assert "refused" in report["auditText"]
    assert hostile in report["auditText"]  # shown as text (as markup it would not read like this)
    assert "group class-b: exam mode now" in report["message"]
    # the page says which running sandboxes exam mode closed: bob's, by the teacher
    assert f"1 running sandbox(es) brought under it: {bob.backend.sandbox_id}" in report["message"]
    assert "members: bob" in report["message"]
    after = {row[1]: dict(zip(header, row)) for row in report["sandboxRowsAfter"][1:]}
    assert "by teacher" in after[bob.backend.sandbox_id]["conformed"]
    assert "group class-b" in after[bob.backend.sandbox_id]["conformed"]
    assert after[alice.backend.sandbox_id]["conformed"] == ""
    assert "class-b" in report["overridesText"] and "exam mode" in report["overridesText"]
    assert Path(shot).stat().st_size > 10_000

    # ... and it took effect: bob is in exam mode (locked, no egress), audited as the teacher's
    ceiling = service.api("GET", "api/ceiling", hub.tokens["bob"]).json()["ceiling"]
    assert ceiling["locked"] is True and ceiling["mode"] == "deny"
    changes = [e for e in service.audit() if e.get("event") == "ceiling" and e.get("target") == {"group": "class-b"}]
    assert changes[-1]["by"] == "teacher" and changes[-1]["result"] == "accepted"
    refused = service.api("PUT", f"api/sandboxes/{bob.backend.sandbox_id}/policy", hub.tokens["bob"],
                          json={"policy": {"mode": "allowlist", "entries": ["pypi.org:443"]}})
    assert refused.status_code == 403 and refused.json()["error"] == "ceiling"

    # a student: 403 (and audited); nobody: the hub's login page
    assert report["studentStatus"] == 403 and "admin" in report["studentText"]
    assert any(e.get("event") == "denied" and e.get("by") == "alice" and "/admin" in e.get("request", "")
               for e in service.audit())
    assert "/hub/login" in report["anonymousUrl"]


def _open_admin_page(hub, service, user: str) -> tuple[requests.Session, requests.Response]:
    """Log in to the hub as ``user`` (a cookie session, as a browser) and open the admin page
    through the hub's OAuth, answering its consent form as "Authorize" does."""
    session = requests.Session()
    login_url = f"{hub.public_url}/hub/login?next=" + requests.utils.quote("/hub/home", safe="")
    form = session.get(login_url, timeout=30)
    login_xsrf = re.search(r'name="_xsrf" value="([^"]+)"', form.text).group(1)
    login = session.post(login_url, timeout=30, allow_redirects=True,
                         data={"username": user, "password": hub.password, "_xsrf": login_xsrf})
    assert login.status_code == 200
    page = session.get(service.admin_url, timeout=30)  # the OAuth round trip, up to consent
    if "/hub/api/oauth2/authorize" in page.url:
        form = dict(re.findall(r'<input type="hidden" name="(_xsrf)" value="([^"]*)"', page.text))
        scopes = re.findall(r'<input type="hidden" name="scopes" value="([^"]*)"', page.text)
        page = session.post(page.url, data={**form, "scopes": scopes}, timeout=30)
    return session, page


def test_the_admin_form_needs_its_xsrf_token_and_escapes_what_users_control(service, hub, overrides_removed):
    """A logged-in admin's cookie alone changes nothing (cross-site request forgery), and names
    that look like markup are shown as text."""
    session, page = _open_admin_page(hub, service, "teacher")
    assert page.status_code == 200 and "Sandbox service" in page.text, page.text[:500]
    assert page.headers["Content-Security-Policy"].startswith("default-src 'none'")
    # the service's XSRF cookie lives under its own prefix, next to the hub's, not over it
    xsrf = {c.domain.split(".")[0]: c for c in session.cookies if c.name == "_xsrf"}
    assert sorted((host, c.path) for host, c in xsrf.items()) == [("127", "/hub/"),
                                                                  ("localhost", f"/services/{service.name}/")]
    assert xsrf["localhost"].has_nonstandard_attr("HttpOnly")  # no script needs it, none can read it

    before = service.api("GET", "api/ceilings", hub.tokens["teacher"]).json()
    audited = len(service.audit())
    for token in (None, "forged"):  # no token, or one the service never issued
        forged = session.post(service.admin_url + "/ceilings", timeout=30, allow_redirects=False,
                              data={"kind": "groups", "name": "class-b", "action": "exam",
                                    **({"_xsrf": token} if token else {})})
        assert forged.status_code == 403, forged.text[:300]
    assert service.api("GET", "api/ceilings", hub.tokens["teacher"]).json() == before
    assert not [e for e in service.audit()[audited:] if e.get("event") == "ceiling"]

    # with the form's token it works; a name that looks like markup comes back escaped
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page.text).group(1)
    name = "<b>x</b>"
    done = session.post(service.admin_url + "/ceilings", timeout=30, allow_redirects=True,
                        data={"kind": "users", "name": name, "action": "exam", "_xsrf": xsrf})
    assert done.status_code == 200
    assert "&lt;b&gt;x&lt;/b&gt;" in done.text and "<b>x</b>" not in done.text
    assert service.api("GET", "api/ceilings", hub.tokens["teacher"]).json()["users"] == {
        name: {"locked": True, "mode": "deny", "entries": [], "presets": []}}

    # the override's Clear button: back to the base ceiling, audited as the teacher's
    cleared = session.post(service.admin_url + "/ceilings", timeout=30, allow_redirects=True,
                           data={"kind": "users", "name": name, "action": "clear", "_xsrf": xsrf})
    assert cleared.status_code == 200 and "the base ceiling now" in cleared.text
    # that message was the form's own (a signed cookie, shown once); a link cannot write one
    again = session.get(service.admin_url + "?message=Session+expired&changed=groups/x", timeout=30)
    assert again.status_code == 200 and 'id=message' not in again.text and "expired" not in again.text
    assert service.api("GET", "api/ceilings", hub.tokens["teacher"]).json() == before
    changes = [e for e in service.audit()[audited:] if e.get("event") == "ceiling"]
    assert [(e["by"], e["target"], e["result"], e["to"]) for e in changes] == [
        ("teacher", {"user": name}, "accepted", {"locked": True, "mode": "deny", "entries": [], "presets": []}),
        ("teacher", {"user": name}, "accepted", None)]


def test_members_of_an_admin_group_get_the_page_too(service, hub):
    """c.SandboxService.admin_groups (the tests' service: "staff"): a member who is not a hub
    admin gets the page; the group's membership comes from the hub's OAuth identity."""
    assert hub.admin("POST", "/users/ta").status_code == 201
    try:
        assert hub.admin("POST", "/groups/staff", json={"users": ["ta"]}).status_code == 201
        session, page = _open_admin_page(hub, service, "ta")
        assert page.status_code == 200 and "Signed in as <b>ta</b> (member of staff)" in page.text, page.text[:500]
    finally:
        hub.admin("DELETE", "/groups/staff")
        hub.admin("DELETE", "/users/ta")
