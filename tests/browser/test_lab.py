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

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("drive_lab.mjs")
CHROMIUM = "/usr/bin/chromium"

pytestmark = [pytest.mark.browser, pytest.mark.timeout(420)]


def _missing() -> list[str]:
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium)")
    if not shutil.which("node"):
        missing.append("node (apt-get install nodejs)")
    if not (ROOT / "node_modules" / "playwright-core" / "package.json").exists():
        missing.append("playwright-core (npm ci at the repository root)")
    try:
        import jupyterlab  # noqa: F401
    except ImportError:
        missing.append("jupyterlab (pip install jupyterlab)")
    return missing


@pytest.fixture
def browser_prerequisites():
    missing = _missing()
    if missing:
        message = "browser test needs " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (a directory only this test made)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
    return pids


def _kill_tree(proc: subprocess.Popen | None, marker: str | None = None) -> None:
    """Stop ``proc`` (leader of its own session) and whatever still names ``marker``."""
    if proc is not None and proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    if marker:
        for pid in _pids_using(marker):
            if pid != os.getpid():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _notebook(host_ip: str, port: int) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "sandbox", "display_name": "Sandbox", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import socket\n"
            f"with socket.create_connection(({host_ip!r}, {port}), timeout=5) as s:\n"
            "    print(s.recv(100).decode())"),
        nbformat.v4.new_code_cell("%sandbox policy"),
    ]
    return nb


@pytest.fixture
def lab(browser_prerequisites, tmp_path, kernelspec_path):
    """JupyterLab on 127.0.0.1 with the Sandbox kernelspec; its own config, settings and
    workspace directories; the notification settings stop it asking to fetch news."""
    root = tmp_path / "root"
    home = tmp_path / "jupyter"
    settings = home / "lab-settings"
    for d in (root, home / "config", home / "runtime", home / "data", home / "workspaces",
              settings / "@jupyterlab" / "apputils-extension"):
        d.mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    # no build check (seconds of CPU at the first page load, for a build that is prebuilt)
    (home / "config" / "labconfig").mkdir()
    (home / "config" / "labconfig" / "page_config.json").write_text(
        json.dumps({"buildCheck": False, "buildAvailable": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {
        **os.environ,
        "JUPYTER_PATH": os.environ["JUPYTER_PATH"],  # the session fixture's kernelspec first
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
        "SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "10.231.0.0/16",
    }
    log = (tmp_path / "lab.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser", "--ip=127.0.0.1",
         f"--port={port}", "--port-retries=0", f"--ServerApp.token={token}",
         f"--ServerApp.root_dir={root}", "--MultiKernelManager.default_kernel_name=sandbox",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly", "--ServerApp.shutdown_no_activity_timeout=600"],
        env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy from the env
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with direct.open(f"{url}api/status?token={token}", timeout=2) as resp:
                    json.load(resp)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError("JupyterLab did not start:\n" + (tmp_path / "lab.log").read_text()[-4000:])
                time.sleep(0.2)
        yield {"url": url, "token": token, "root": root, "log": tmp_path / "lab.log"}
    finally:
        # the server shuts its kernels (and their sandboxes) down on SIGTERM
        _kill_tree(proc, marker=str(home))
        log.close()
        # lab.log (and a failure screenshot) stay in pytest's tmp_path, which pytest prunes
        for d in (root, home):
            shutil.rmtree(d, ignore_errors=True)


def test_blocked_cell_notice_allow_in_panel_then_cell_succeeds(lab, test_host, tmp_path):
    host = test_host(8080)
    nbformat.write(_notebook(host.ip, host.port), lab["root"] / "egress.ipynb")
    shots = Path(os.environ.get("SANDBOX_KERNEL_SCREENSHOTS") or tmp_path / "screenshots")
    if not shots.is_absolute():
        shots = ROOT / shots
    shots.mkdir(parents=True, exist_ok=True)
    profile = tmp_path / "chromium-profile"
    config = {
        "url": lab["url"], "token": lab["token"], "notebook": "egress.ipynb",
        "host": host.ip, "port": host.port, "shots": str(shots), "failureDir": str(tmp_path),
        "userDataDir": str(profile), "executablePath": CHROMIUM,
        "timeoutMs": int(os.environ.get("SANDBOX_KERNEL_BROWSER_TIMEOUT_MS", "45000")),
    }
    node = subprocess.Popen(["node", str(SCRIPT), json.dumps(config)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, err = node.communicate(timeout=300)
    finally:
        _kill_tree(node, marker=str(profile))
        shutil.rmtree(profile, ignore_errors=True)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"drive_lab.mjs printed no report (exit {node.returncode}):\n{out}\n{err[-4000:]}"
    report = json.loads(lines[-1])
    print(json.dumps({k: report.get(k) for k in ("seconds", "timings", "consoleErrors", "screenshots")}, indent=1))
    context = (f"\nreport: {json.dumps(report, indent=1, ensure_ascii=False)}\nstderr: {err[-2000:]}"
               f"\nlab log:\n{lab['log'].read_text()[-3000:]}")
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
