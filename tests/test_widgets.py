"""The policy panel, driven with real comm messages through jupyter_client."""

import time

import pytest

from kerneltest import Panel


def wait_for_policy(kernel, text, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = kernel.execute("%sandbox status").of_type("display_data")[0]["content"]["data"]["text/plain"]
        line = [l for l in status.splitlines() if l.startswith("policy")][0]
        if text in line:
            return line
        time.sleep(0.1)
    raise AssertionError(f"policy never became {text!r}: {line}")


def reaches(kernel, host):
    cell = kernel.execute(f"import socket\nprint('REPLY', socket.create_connection(({host.ip!r}, 8080), timeout=3).recv(5))")
    return "REPLY" in cell.stream()


@pytest.fixture
def kernel(fresh_kernel):
    return fresh_kernel({"SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "10.231.0.0/16"})


def test_panel_apply_then_revert_changes_what_is_enforced(kernel, test_host):
    host = test_host(8080)
    assert not reaches(kernel, host)
    panel = Panel(kernel, kernel.execute("%sandbox policy"))
    panel.set(panel.find("ToggleButtonsModel", description="Egress"), index=1)  # Allowlist
    panel.set(panel.find("TextareaModel", description="Allow"), value=f"{host.ip}:8080/tcp")
    panel.click(panel.find("ButtonModel", description="Apply"))
    wait_for_policy(kernel, "allowlist (1 entry)")
    assert reaches(kernel, host)
    panel.click(panel.find("ButtonModel", description="Revert"))
    wait_for_policy(kernel, "default-deny")
    assert not reaches(kernel, host)


def test_invalid_entry_is_marked_before_apply_and_changes_nothing(kernel):
    panel = Panel(kernel, kernel.execute("%sandbox policy"))
    textarea = panel.find("TextareaModel", description="Allow")
    kc = kernel.kc
    panel.set(textarea, value="pypi.org:443\nexample.com:99999")
    # the validation HTML widget is updated with the error, before any Apply
    marked = False
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not marked:
        try:
            msg = kc.get_iopub_msg(timeout=0.5)
        except Exception:  # noqa: BLE001
            continue
        if msg["msg_type"] == "comm_msg":
            value = msg["content"]["data"].get("state", {}).get("value", "")
            marked = "sk-invalid" in str(value) and "99999" in str(value)
    panel.click(panel.find("ButtonModel", description="Apply"))
    time.sleep(0.5)
    assert "default-deny" in wait_for_policy(kernel, "default-deny")


def test_ceiling_holds_against_hand_crafted_comm_messages(kernel):
    panel = Panel(kernel, kernel.execute("%sandbox policy"))
    panel.set(panel.find("ToggleButtonsModel", description="Egress"), index=1)
    panel.set(panel.find("TextareaModel", description="Allow"), value="169.254.169.254:80\n203.0.113.0/24:443")
    panel.click(panel.find("ButtonModel", description="Apply"))
    time.sleep(1.0)
    wait_for_policy(kernel, "default-deny")


def test_exam_mode_panel_is_read_only_and_refuses_crafted_changes(fresh_kernel):
    kernel = fresh_kernel({"SANDBOX_KERNEL_POLICY_LOCKED": "true"})
    cell = kernel.execute("%sandbox policy")
    panel = Panel(kernel, cell)
    apply = panel.find("ButtonModel", description="Apply")
    assert panel.models[apply]["disabled"] is True
    assert any("exam mode" in str(s.get("value", "")) for s in panel.models.values())
    # the UI is disabled, but a crafted message must not get further
    panel.set(panel.find("ToggleButtonsModel", description="Egress"), index=1, disabled=False)
    panel.click(apply)
    time.sleep(1.0)
    wait_for_policy(kernel, "default-deny")


def test_notice_remedy_and_allow_button_are_the_same(kernel, test_host):
    host = test_host(8080)
    cell = kernel.execute(f"import socket\ntry:\n    socket.create_connection(({host.ip!r}, 8080), timeout=3)\nexcept OSError: pass")
    remedy = cell.sandbox["blocked"][0]["remedy"]
    assert remedy["command"] == f"%sandbox allow {host.ip}:8080/tcp"
    panel = Panel(kernel, kernel.execute("%sandbox policy"))
    allow = panel.find("ButtonModel", description="Allow", tooltip=remedy["command"])
    panel.click(allow)
    wait_for_policy(kernel, "allowlist (1 entry)")
    assert reaches(kernel, host)
    # a second panel and the magic see the same policy
    second = Panel(kernel, kernel.execute("%sandbox policy"))
    assert second.models[second.find("TextareaModel", description="Allow")]["value"] == f"{host.ip}:8080/tcp"


def test_forbidden_destination_has_a_disabled_allow_button(kernel):
    kernel.execute("import socket\ntry:\n    socket.create_connection(('169.254.169.254', 80), timeout=3)\nexcept OSError: pass")
    panel = Panel(kernel, kernel.execute("%sandbox policy"))
    buttons = [s for s in panel.models.values() if s.get("_model_name") == "ButtonModel" and s.get("description") == "Allow"]
    assert buttons and all(b["disabled"] for b in buttons)
    assert "always blocked" in buttons[0]["tooltip"]


def test_a_flood_of_blocked_reports_redraws_the_panel_a_few_times(kernel):
    """500 destinations in one cell: the panel gets its rows in batches (and at most
    MAX_BLOCKED_ROWS of them), not a redraw and three new widgets per destination."""
    Panel(kernel, kernel.execute("%sandbox policy"))
    cell = kernel.execute(
        "import gc\nagent = next(o for o in gc.get_objects() if type(o).__name__ == 'Agent')\n"
        "for i in range(500):\n    agent.send({'type': 'blocked', 'id': agent.cell_id, 'record': "
        "{'ip': f'10.231.{i // 250}.{i % 250 + 1}', 'port': 443, 'protocol': 'tcp', 'verdict': 'dropped'}})")
    comms = [o for o in cell.outputs if o["msg_type"].startswith("comm_")]
    assert 0 < len(comms) < 200, len(comms)
    rows = [o for o in comms if o["msg_type"] == "comm_open" and o["content"]["data"]["state"].get("_model_name") == "HBoxModel"]
    assert len(rows) <= 20
