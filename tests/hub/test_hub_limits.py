"""What one user (or one client) can make the service do is bounded: sandboxes per user,
request bodies, slow connections, and the audit log (bounded records, read off the event
loop, bad lines skipped, rotated). Real JupyterHub, real service, real sandboxes."""

from __future__ import annotations

import time

import pytest

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

    # the admin page shows each user's count against the limit
    from test_hub_admin import _open_admin_page

    session, page = _open_admin_page(hub, svc, "teacher")
    assert page.status_code == 200, page.text[:300]
    rows = _table(page.text, "users")
    assert rows["alice"][2] == "3 of 3" and rows["bob"][2] == "1 of 3", rows
    assert "at most 3 sandboxes starting or running per user" in page.text


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
