"""The admin page cannot be read or driven by a script on a student's page.

Without hub subdomains every user server is served on the hub's origin, under /user/<name>/,
and a student controls everything her server sends. The service therefore serves its admin
page only on an origin of its own (``c.SandboxService.admin_origin``; here
``http://localhost:<service port>``, a different host from the hub's ``127.0.0.1``), answers
on the hub's origin with a link and nothing else, and refuses what only a script does there.

The test stands in for alice's server with a page added to the hub's proxy at /user/alice/
(what the hub does when her server starts; she can make it serve anything), opens it in a
teacher's browser (headless Chromium) after the teacher used the admin page, and checks that
none of its attempts read the page or changed a ceiling."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from browsertools import CHROMIUM, browser_missing, run_browser_script

PAGE = Path(__file__).with_name("attack_admin.html").read_bytes()
SCRIPT = Path(__file__).with_name("drive_admin_origin.mjs")
VICTIM = "attacked-by-a-student"


class _StudentPage(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args):
        pass


@pytest.fixture
def student_page(hub):
    """alice's "server": a page for any path, routed by the hub's proxy at /user/alice/."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StudentPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    api = f"http://127.0.0.1:{hub.proxy_api_port}/api/routes/user/alice"
    headers = {"Authorization": f"token {hub.proxy_token}"}
    r = requests.post(api, headers=headers, timeout=10,
                      json={"target": f"http://127.0.0.1:{server.server_address[1]}"})
    assert r.status_code == 201, r.text
    try:
        yield "/user/alice/attack.html"
    finally:
        requests.delete(api, headers=headers, timeout=10)
        server.shutdown()
        server.server_close()


def test_a_script_on_a_students_page_cannot_read_or_drive_the_admin_page(service, hub, student_page):
    missing = browser_missing()
    if missing:
        pytest.fail("the admin origin test needs " + ", ".join(missing))
    before = service.api("GET", "api/ceilings", hub.tokens["teacher"]).json()
    audited = len(service.audit())
    public_port = hub.public_port
    cfg = {"hub": hub.public_url, "sharedAdminUrl": f"{service.proxied_url}admin", "adminUrl": service.admin_url,
           "prefix": f"/services/{service.name}/", "admin": "teacher", "password": hub.password, "victim": VICTIM,
           "attackUrls": [f"http://127.0.0.1:{public_port}{student_page}",      # the hub's origin
                          f"http://localhost:{public_port}{student_page}"],     # the admin page's host
           "executablePath": CHROMIUM}
    report, err = run_browser_script(SCRIPT, cfg, timeout=300)
    assert report["ok"], f"{report}\n{err[-2000:]}"

    # on the hub's origin the page is not there: a link to its own origin, no data, no form
    shared = report["shared"]
    assert shared["status"] == 403 and not shared["hasSandboxes"], shared
    assert service.admin_url in shared["text"] and "_xsrf" not in shared["text"]
    # on its own origin the teacher uses it as before
    assert report["admin"]["status"] == 200 and report["admin"]["hasSandboxes"], report["admin"]
    assert report["adminAgain"] == {"status": 200, "hasSandboxes": True}

    hub_origin, admin_host = report["attacks"]
    for attack in (hub_origin, admin_host):
        # reading the page on the attack page's own origin: refused, nothing in it
        read = attack["sameOriginRead"]
        assert read.get("status") == 403 and read["xsrf"] is None and not read["sandboxes"], attack
        assert attack["sameOriginPost"].get("status") == 403, attack
        # the page on its origin: not readable (CORS), not through a window (COOP, cross-origin)
        assert "error" in attack["adminRead"] and "TypeError" in attack["adminRead"]["error"], attack
        assert not any(s == "read the page" or s.startswith("token") for s in attack["adminWindow"]["seen"]), attack
        assert "windowTokenPost" not in attack
        # no cookie of the service is readable there (none set on the hub's host; HttpOnly on the admin host)
        assert "_xsrf" not in attack["cookies"].get("cookies", ""), attack
    assert hub_origin["origin"] == hub.public_url and admin_host["origin"] == f"http://localhost:{public_port}"

    # the blind posts and the form submissions, even with the leaked token, were refused
    for attack in (hub_origin, admin_host):
        assert attack["adminFormPost"] == {"status": 403, "url": service.admin_url + "/ceilings", "method": "POST"}
    # from the admin page's host (another port: the same site, the teacher's cookies go along),
    # with a valid token, only the request's Fetch Metadata gives it away
    assert "a change must come from the admin page itself (this one is same-site)" in admin_host["adminFormPostText"]
    after = service.api("GET", "api/ceilings", hub.tokens["teacher"]).json()
    assert after == before and VICTIM not in json.dumps(after)
    assert not [e for e in service.audit()[audited:] if e.get("event") == "ceiling"]


def test_the_admin_page_is_off_without_an_origin_of_its_own(spare_service, hub):
    """A service with no admin_origin (and no subdomain of its own) serves no admin page at
    all, and says why; its token API works as ever."""
    svc = spare_service(env={"SANDBOX_HUB_ADMIN_ORIGIN": ""})
    for url in (f"{svc.proxied_url}admin", svc.admin_url, f"{svc.proxied_url}oauth_callback?code=x&state=y"):
        r = requests.get(url, timeout=30, allow_redirects=False)
        assert r.status_code == 403 and "the admin page is off" in r.text and "admin_origin" in r.text, (url, r.text[:300])
        assert "Set-Cookie" not in r.headers
    assert svc.api("GET", "api/ceiling", hub.tokens["alice"]).status_code == 200
