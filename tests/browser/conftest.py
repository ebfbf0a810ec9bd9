"""Fixtures of the browser tests: JupyterLab with the Sandbox kernel, on loopback."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from browsertools import browser_missing, kill_tree


@pytest.fixture
def browser_prerequisites():
    missing = browser_missing(jupyterlab=True)
    if missing:
        message = "browser test needs " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        kill_tree(proc, marker=str(home))
        log.close()
        # lab.log (and a failure screenshot) stay in pytest's tmp_path, which pytest prunes
        for d in (root, home):
            shutil.rmtree(d, ignore_errors=True)
