"""JupyterLab with the Sandbox kernel in a real browser (headless Chromium, playwright-core).

A person's path through issue 6: open a notebook, run a cell that is blocked, see the
notice, open ``%sandbox policy``, click Allow for the blocked destination, run the cell
again and see it succeed. The browser part is ``drive_lab.mjs``; this test starts
JupyterLab on loopback and a test host, runs the script and checks what it reports.

Screenshots go to a temporary directory, or to ``$SANDBOX_KERNEL_SCREENSHOTS`` when set
(``SANDBOX_KERNEL_SCREENSHOTS=docs/screenshots`` refreshes the README's pictures).
Needs /usr/bin/chromium, node and ``npm ci`` at the repository root (``scripts/setup.sh test``
installs them); skipped without them, except under CI where a missing piece fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from browsertools import report_context, run_browser_script, script_config, shots_dir, write_notebook

SCRIPT = Path(__file__).with_name("drive_lab.mjs")

pytestmark = [pytest.mark.browser, pytest.mark.timeout(420)]


def test_blocked_cell_notice_allow_in_panel_then_cell_succeeds(lab, test_host, tmp_path):
    host = test_host(8080)
    write_notebook(
        lab["root"] / "egress.ipynb",
        "import socket\n"
        f"with socket.create_connection(({host.ip!r}, {host.port}), timeout=5) as s:\n"
        "    print(s.recv(100).decode())",
        "%sandbox policy",
    )
    shots = shots_dir(tmp_path)
    config = script_config(tmp_path, url=lab["url"], token=lab["token"], notebook="egress.ipynb",
                           host=host.ip, port=host.port, shots=str(shots))
    report, err = run_browser_script(SCRIPT, config)
    print(json.dumps({k: report.get(k) for k in ("seconds", "timings", "consoleErrors", "screenshots")}, indent=1))
    context = report_context(report, err, lab["log"])
    assert report["ok"], "the browser did not get through:" + context

    assert report["kernelName"] == "Sandbox", context
    # the notice: what was blocked and what the user may do about it
    assert "⛔ egress blocked" in report["notice"], context
    assert f"{host.ip}:8080" in report["notice"], context
    assert f"you may allow it: %sandbox allow {host.ip}:8080/tcp" in report["notice"], context
    assert "hello from test host" not in report["cell1Blocked"], context
    # the panel: the Allow button was enabled and made the policy an allowlist with the host
    assert report["allowDisabled"] is False, context
    assert "egress now: allowlist" in report["panelStatus"], context
    assert "enforced" in report["panelStatus"], context
    assert f"{host.ip}:8080/tcp" in report["panelEntries"], context
    assert "allowlist" in report["panelTitle"], context
    # the same cell now reaches the host, without a notice
    assert "hello from test host" in report["cell1Allowed"], context
    assert report["noticeAfter"] == 0, context
    assert host.seen() >= 1
    # nothing but loopback was contacted by the browser
    assert report["offLoopback"] == [], context
    for name in ("notice", "panel", "allowed"):
        png = Path(report["screenshots"][name])
        assert png.parent == shots and png.stat().st_size > 10_000, context
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
