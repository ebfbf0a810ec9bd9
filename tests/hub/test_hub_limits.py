"""What one user (or one client) can make the service do is bounded: sandboxes per user,
request bodies, slow connections, and the audit log (bounded records, read off the event
loop, bad lines skipped, rotated). Real JupyterHub, real service, real sandboxes."""

from __future__ import annotations

import json
import re
import socket
import time
from urllib.parse import urlparse

import pytest
import requests

from sandbox_kernel.errors import SandboxStartError


def test_a_user_may_have_at_most_max_sandboxes_per_user(spare_service, kernels_for, hub):
    """alice's script floods ``POST api/sandboxes`` (wait false, as the kernel sends it): only
    up to the limit start, the rest are refused with the reason (429) and audited; her own
    kernel is then refused with the same reason; bob is not concerned; stopping one frees a
    place. The admin page counts them."""
    svc = spare_service(env={"SANDBOX_HUB_MAX_SANDBOXES_PER_USER": "3"})
    kernels = kernels_for(svc)
    alice, token = kernels.open("alice"), hub.tokens["alice"]
    answers = [svc.api("POST", "api/sandboxes", token, json={"kernel_id": f"flood{i}", "wait": False})
               for i in range(12)]
    assert [a.status_code for a in answers] == [202, 202] + [429] * 10, [a.text for a in answers]
    refusal = answers[-1].json()
    assert refusal["error"] == "limit" and refusal["limit"] == 3
    assert "already has 3 sandboxes starting or running, the most one user may have (3)" in refusal["message"]
    started = [a.json()["id"] for a in answers[:2]]
    assert sorted(refusal["active"]) == sorted([alice.backend.sandbox_id, *started])
    # no record was made for a refused start
    listed = svc.api("GET", "api/sandboxes", token).json()["sandboxes"]
    assert sorted(s["id"] for s in listed) == sorted([alice.backend.sandbox_id, *started])

    # a kernel of hers now: refused with the reason, through the kernel's own path
    with pytest.raises(SandboxStartError, match="the most one user may have"):
        kernels.open("alice")
    refused = [e for e in svc.audit() if e.get("event") == "sandbox" and e.get("action") == "start"
               and e.get("result") == "refused"]
    assert len(refused) == 11 and {e["user"] for e in refused} == {"alice"}
    assert all("the most one user may have (3)" in e["reason"] for e in refused)

    # bob is not concerned
    bob = kernels.open("bob")
    result, out = kernels.execute(bob, "print('bob runs')")
    assert out.stdout().strip() == "bob runs"

    # stopping one frees a place (for a new kernel, and for a stopped one starting again)
    assert svc.api("DELETE", f"api/sandboxes/{started[0]}", token).status_code == 200
    again = svc.api("POST", "api/sandboxes", token, json={"kernel_id": "flood5", "wait": False})
    assert again.status_code == 202, again.text
    assert svc.api("POST", "api/sandboxes", token, json={"kernel_id": "flood0", "wait": False}).status_code == 429
    # (every start finished before the service stops: a start cut short by SIGTERM can leave its namespace)
    for sid in (started[1], again.json()["id"]):
        _wait_for_state(svc, token, sid, "running")

    # the admin page shows each user's count against the limit
    from test_hub_admin import _open_admin_page

    session, page = _open_admin_page(hub, svc, "teacher")
    assert page.status_code == 200, page.text[:300]
    rows = _table(page.text, "users")
    assert rows["alice"][2] == "3 of 3" and rows["bob"][2] == "1 of 3", rows
    assert "at most 3 sandboxes starting or running per user" in page.text


def _wait_for_state(svc, token: str, sid: str, state: str, bound: float = 120.0) -> None:
    deadline = time.monotonic() + bound
    while (now := svc.api("GET", f"api/sandboxes/{sid}", token).json().get("state")) != state:
        assert time.monotonic() < deadline, f"sandbox {sid} is {now}, not {state}"
        time.sleep(0.3)


def _table(html: str, table_id: str) -> dict[str, list[str]]:
    """The rows of an admin-page table by their first cell (text only)."""
    import re
    from html import unescape

    body = html.split(f"<table id={table_id}>", 1)[1].split("</table>", 1)[0]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)[1:]:
        cells = [unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        if cells:
            rows[cells[0]] = cells
    return rows


BIG = 90 * 1024 * 1024


def _raw_request(host: str, port: int, head: str, body_part: bytes = b"") -> socket.socket:
    """A request sent by hand: the head, then only ``body_part`` of its body (the rest never
    comes, so the request stays in flight)."""
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(head.encode() + body_part)
    return sock


def _read_reply(sock: socket.socket, bound: float = 60.0) -> bytes:
    """What the server sends until it closes the connection (b"" if it closed at once); a
    reply that does not come within the generous ``bound`` fails the test."""
    sock.settimeout(bound)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length:\s*(\d+)", head)
                if length and len(rest) >= int(length.group(1)):
                    break
    except socket.timeout:
        pytest.fail(f"no reply and no close within {bound:.0f} s (got {data[:200]!r})")
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return data


def test_a_huge_request_is_refused_before_its_body_is_read(kernels, service, hub):
    """alice PUTs her policy with one 90 MB entry: the service refuses it from its headers
    (413, why) while the body is still in flight, other clients are answered meanwhile, the
    audit log gets a short summary, and neither it nor the service's log grows by the body."""
    alice = kernels.open("alice")
    sid, token = alice.backend.sandbox_id, hub.tokens["alice"]
    audit = service.state_dir / "audit.jsonl"
    audit_before, log_before = audit.stat().st_size, service.log.stat().st_size
    path = f"/services/{service.name}/api/sandboxes/{sid}/policy"
    start = b'{"policy": {"mode": "allowlist", "entries": ["'
    public = urlparse(hub.public_url)
    for host, port in ((public.hostname, public.port), ("127.0.0.1", service.port)):  # proxied, direct
        head = (f"PUT {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: token {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {BIG}\r\n\r\n")
        sock = _raw_request(host, port, head, start + b"a" * 65536)
        # while that request is in flight (its body will never be complete), others are served
        assert service.api("GET", "api/health", None).json() == {"ok": True}
        assert service.api("GET", "api/sandboxes", hub.tokens["bob"]).status_code == 200
        # ... and it is answered without its body: refused, saying why
        reply = _read_reply(sock)
        status = reply.split(b"\r\n", 1)[0]
        assert status.startswith(b"HTTP/1.1 413"), reply[:500]
        data = json.loads(reply.partition(b"\r\n\r\n")[2].split(b"\r\n")[0] or b"{}")
        assert data["error"] == "too-large" and data["limit"] == 1024 * 1024, data
        assert f"({BIG} bytes) is larger than the service accepts" in data["message"]

    # the whole 90 MB, as a script would send it: refused (or cut off) without being parsed
    body = start + b"a" * BIG + b'"]}}'
    try:
        r = requests.put(f"{service.proxied_url}api/sandboxes/{sid}/policy", data=body, timeout=120,
                         headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
        assert r.status_code == 413, r.text[:300]
    except requests.ConnectionError:
        pass  # the service closed the connection while the body was still being sent
    del body
    # a body under the limit with one huge invalid entry: 400, the reply and the record short
    entry = "b" * 900_000
    r = service.api("PUT", f"api/sandboxes/{sid}/policy", token, json={"policy": {"mode": "allowlist", "entries": [entry]}})
    assert r.status_code == 400 and len(r.content) < 2000, r.content[:300]
    # and one with too many entries is refused before they are parsed
    r = service.api("PUT", f"api/sandboxes/{sid}/policy", token,
                    json={"policy": {"mode": "allowlist", "entries": ["a.example"] * 50_000}})
    assert r.status_code == 400 and "at most 1000 entries" in r.json()["message"]

    records = [e for e in service.audit() if e.get("event") == "request" and e.get("by") == "alice"]
    assert len(records) >= 3 and all(e["result"] == "refused" and e["bytes"] > 1024 * 1024 for e in records)
    assert records[-1]["request"] == f"PUT {path}"
    invalid = [e for e in service.audit() if e.get("event") == "policy" and e.get("sandbox") == sid
               and e.get("result") == "refused"][-1]
    assert "characters, cut" in json.dumps(invalid)
    # the audit log and the service's log grew by summaries, not by the bodies
    assert audit.stat().st_size - audit_before < 64 * 1024
    assert service.log.stat().st_size - log_before < 256 * 1024
    # alice's sandbox is as it was
    assert service.api("GET", f"api/sandboxes/{sid}/policy", token).json()["policy"]["mode"] == "deny"


def test_the_audit_log_survives_a_cut_line_and_is_rotated(spare_service, hub):
    """A line cut short (a full disk) and a garbage line do not break reading the log (they
    are skipped and counted); the log is rotated at its size limit, and reading takes the
    newest records across the rotated files."""
    svc = spare_service(env={"SANDBOX_HUB_AUDIT_MAX_BYTES": "20000", "SANDBOX_HUB_AUDIT_BACKUPS": "2"})
    teacher, alice = hub.tokens["teacher"], hub.tokens["alice"]
    audit = svc.state_dir / "audit.jsonl"
    # a refused request is audited (alice is not an admin)
    assert svc.api("GET", "api/ceilings", alice, proxied=False).status_code == 403
    with open(audit, "a") as f:
        f.write('{"time": 1, "event": "policy", "user": "al')  # cut short, no newline
    assert svc.api("GET", "api/ceilings", alice, proxied=False).status_code == 403
    with open(audit, "a") as f:
        f.write("not json at all\n[1, 2]\n")
    r = svc.api("GET", "api/audit", teacher, proxied=False)
    assert r.status_code == 200, r.text
    assert r.json()["skipped_lines"] == 3
    denied = [e for e in r.json()["events"] if e.get("by") == "alice"]
    assert len(denied) == 2, r.json()  # the record after the cut line is whole
    from test_hub_admin import _open_admin_page

    session, page = _open_admin_page(hub, svc, "teacher")
    assert page.status_code == 200 and "3 unreadable line(s) skipped" in page.text, page.text[-2000:]

    # rotation: ~300 records of ~250 bytes through a 20000-byte file, two backups kept
    for i in range(300):
        assert svc.api("PUT", f"api/ceilings/users/u{i}", alice, proxied=False, json={"max_entries": 5}).status_code == 403
    files = sorted(p.name for p in svc.state_dir.glob("audit.jsonl*"))
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"], files
    assert all((svc.state_dir / f).stat().st_size <= 20000 for f in files)
    newest = svc.api("GET", "api/audit?limit=150&user=alice", teacher, proxied=False).json()
    targets = [e["request"].rsplit("/", 1)[1] for e in newest["events"] if e.get("event") == "ceiling"]
    assert targets == [f"u{i}" for i in range(150, 300)]  # the newest, oldest first, across files


def test_slow_clients_are_cut_off(spare_service, hub):
    """A client that never finishes its headers, or its body, or sits idle after a request,
    does not keep its connection: the service closes it after its timeouts."""
    svc = spare_service(env={"SANDBOX_HUB_IDLE_TIMEOUT": "2", "SANDBOX_HUB_BODY_TIMEOUT": "2"})
    prefix = f"/services/{svc.name}/"
    slow_head = _raw_request("127.0.0.1", svc.port, f"GET {prefix}api/health HTTP/1.1\r\nHost: x\r\n")
    slow_body = _raw_request("127.0.0.1", svc.port,
                             f"PUT {prefix}api/ceilings/users/x HTTP/1.1\r\nHost: x\r\n"
                             f"Authorization: token {hub.tokens['teacher']}\r\nContent-Length: 100\r\n\r\n", b'{"ma')
    idle = _raw_request("127.0.0.1", svc.port, f"GET {prefix}api/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _read_reply(slow_head) == b""
    assert _read_reply(slow_body) == b""
    first = _read_reply(idle)  # the answer, then (kept alive, idle) the close
    assert first.startswith(b"HTTP/1.1 200") and b'{"ok": true}' in first
    assert b"Keep-Alive: timeout=2" in first  # said in advance: a proxy stops reusing it before
    assert svc.api("GET", "api/ceilings", hub.tokens["teacher"], proxied=False).json()["users"] == {}
