"""The controls between the kernel and its UI (controls.py), with real views and no kernel:
the policy panel and the learn view act on the controls and hear every change from them."""

from __future__ import annotations

import asyncio

import pytest

from controlstest import StubBackend, make_controls
from sandbox_kernel.magics import SandboxMagics
from sandbox_kernel.notices import NoticeBoard
from sandbox_kernel.policy.admin import CeilingRefused
from sandbox_kernel.policy.model import EgressPolicy, parse_entry
from sandbox_kernel.widgets import panel_for

PUBLIC = {"ip": "93.184.216.34", "port": 443, "protocol": "tcp", "verdict": "rejected"}


def blocked(controls, record=PUBLIC, source="enforcer"):
    conn, new = NoticeBoard(controls.policy, controls.admin).add(record, source)
    assert new
    return conn


async def settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_change_by_a_magic_refreshes_every_open_panel():
    controls, session = make_controls()
    panels = [panel_for(controls), panel_for(controls)]
    other, _ = make_controls()
    elsewhere = panel_for(other)
    out = asyncio.run(SandboxMagics(controls).run("%sandbox allow pypi.org:443"))
    assert out.text.startswith("egress now: allowlist (1 entry): pypi.org:443 · enforced by stub in")
    assert session.applied == [controls.policy]
    for panel in panels:
        assert "allowlist (1 entry)" in panel.title.value
        assert panel.entries.value == "pypi.org:443"
    assert "default-deny" in elsewhere.title.value  # another kernel's controls: not told


def test_a_refused_change_changes_nothing_and_says_so_in_the_panel():
    controls, session = make_controls(user_may_allow=[])
    panel = panel_for(controls)
    panel.mode.value = "Allowlist"
    panel.entries.value = "pypi.org:443"
    asyncio.run(panel.do_apply())
    assert controls.policy == EgressPolicy() and session.applied == []
    assert panel.status.value.startswith("<span class='sk-error'")
    assert "not applied, nothing changed" in panel.status.value
    with pytest.raises(CeilingRefused):
        asyncio.run(controls.set_policy(controls.policy.with_entries_added(parse_entry("pypi.org:443"))
                                        .with_mode("allowlist")))


def test_blocked_rows_come_with_the_cell_end_and_allow_does_what_the_remedy_says():
    controls, session = make_controls()
    panel = panel_for(controls)
    conn = blocked(controls)
    assert conn.remedy["action"] == "allow"

    async def run():
        controls.remember_blocked(conn)
        controls.show_blocked(conn)
        assert panel.blocked_box.children == ()  # batched: shown with the next redraw
        controls.cell_ended()
        assert len(panel.blocked_box.children) == 1
        button = panel.blocked_box.children[0].children[0]
        assert button.tooltip == conn.remedy["command"] and not button.disabled
        button.click()
        await settle()

    asyncio.run(run())
    assert parse_entry(conn.remedy["entry"]) in controls.policy.entries
    assert controls.policy.mode == "allowlist" and session.applied[-1] == controls.policy
    assert "sk-enforced" in panel.status.value and "egress now: allowlist" in panel.status.value
    assert panel.blocked_box.children[0].children[0].description == "Allowed"
    # a new panel starts with the kernel's recent blocked connections
    assert len(panel_for(controls).blocked_box.children) == 1


def test_a_policy_the_hub_service_forces_is_shown_in_the_panels():
    class HubBackend(StubBackend):
        enforces_ceiling = True
        on_policy_forced = None

        def fetch_ceiling(self):
            return {"user_may_allow": ["public"], "locked": True}

    controls, session = make_controls()
    controls.backend = HubBackend()
    controls.adopt_service_ceiling()
    assert controls.admin.locked
    panel = panel_for(controls)
    assert panel.mode.disabled
    forced = EgressPolicy(mode="allowlist", entries=(parse_entry("pypi.org:443"),))
    controls.backend.on_policy_forced(forced, "the administrator changed it")
    assert controls.policy == forced and session.policy == forced
    assert "allowlist (1 entry)" in panel.title.value


def test_the_learn_view_follows_learn_mode_from_a_magic():
    controls, _ = make_controls()
    view = panel_for(controls).learn
    magics = SandboxMagics(controls)
    asyncio.run(magics.run("%sandbox learn"))
    assert "on" in view.state.value and view.toggle.description == "Stop learning"
    out = asyncio.run(magics.run("%sandbox learn stop"))
    assert view.toggle.description == "Learn"
    assert out.displays[1]["text/plain"].startswith("Learn mode: not learning")


def test_status_rows_come_from_the_controls():
    controls, _ = make_controls()
    controls.remember_blocked(blocked(controls))
    rows = dict(controls.status())
    assert rows["backend"] == "stub" and rows["policy"] == "default-deny"
    assert rows["sandbox"].startswith("not running") and rows["recent blocked"] == "1"
    assert rows["enforcer"] == "—" and rows["applied"] == "—"
    text = asyncio.run(SandboxMagics(controls).run("%sandbox status")).text
    assert "recent blocked  1" in text
