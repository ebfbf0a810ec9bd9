"""The one-node Kubernetes cluster of ``scripts/cluster.sh``, for tests marked ``cluster``.

``SANDBOX_KERNEL_TEST_CLUSTER`` decides:

- unset or ``0``: tests marked ``cluster`` are skipped (the reason says how to turn them on);
- ``auto``: the cluster is started (``scripts/cluster.sh up``) when this machine can (root,
  Linux, Go); otherwise the tests are skipped with a reason naming what is missing;
- ``1``: the same, but a machine that cannot start the cluster fails the tests;
- under ``CI=true`` a cluster that was asked for and cannot start is always a failure.

The cluster is started once, after collection and only when a selected test is marked
``cluster`` (outside any test's timeout: a cold first build takes long), and taken down
at the end of the session if this session started it, unless
``SANDBOX_KERNEL_TEST_CLUSTER_KEEP=1``. Tests reach it through the ``local_cluster`` fixture.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "cluster.sh"
CACHE = Path(os.environ.get("SANDBOX_KERNEL_CLUSTER_CACHE", "/var/cache/sandbox-kernel/cluster"))
MODES = {"", "0", "auto", "1"}


@dataclass(frozen=True)
class LocalCluster:
    """What tests need to know about the running cluster (names match scripts/cluster.sh)."""

    kubeconfig: Path          # cluster admin (system:masters): for fixtures, not as the tests' identity
    bin: Path                 # kubectl and the components
    node_name: str = "sandbox-kernel-node"
    node_ip: str = "10.245.0.1"
    pod_cidr: str = "10.244.0.0/16"
    dns_ip: str = "10.96.0.10"
    probe_image: str = "sandbox-kernel.local/probe:1"  # busybox: wget, nslookup, nc, httpd

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120,
                input: str | None = None) -> subprocess.CompletedProcess:
        """Run kubectl as cluster admin; a failure raises with kubectl's own message."""
        proc = subprocess.run([str(self.bin / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
                              capture_output=True, text=True, timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc


class _State:
    cluster: LocalCluster | None = None
    problem: str | None = None     # why there is no cluster (skip or failure reason)
    fail: bool = False             # the problem is a failure, not a skip
    started_here: bool = False


def _mode() -> str:
    mode = os.environ.get("SANDBOX_KERNEL_TEST_CLUSTER", "").strip().lower()
    if mode not in MODES:
        raise pytest.UsageError(f"SANDBOX_KERNEL_TEST_CLUSTER={mode!r}: expected one of 0, auto, 1")
    return mode


def _missing() -> list[str]:
    """What this machine lacks to build and start the cluster."""
    missing = []
    if not sys.platform.startswith("linux"):
        missing.append("Linux")
    if os.geteuid() != 0:
        missing.append("root (the kubelet and pod networking need it)")
    if not shutil.which("go"):
        missing.append("Go (go in PATH) to build the cluster's components")
    if not shutil.which("apt-get") and not shutil.which("containerd"):
        missing.append("containerd (or apt-get to install it)")
    return missing


def _running() -> bool:
    return subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0


def start(config: pytest.Config) -> None:
    """Start the cluster if the selected tests need it and the mode allows (called once)."""
    mode = _mode()
    required = mode == "1" or (mode == "auto" and os.environ.get("CI") == "true")
    if mode in ("", "0"):
        _State.problem = ("cluster tests are off: set SANDBOX_KERNEL_TEST_CLUSTER=auto to start the local "
                          "cluster (scripts/cluster.sh) when this machine can, or =1 to require it")
        return
    missing = _missing()
    if missing:
        _State.problem = "cannot start the local cluster: needs " + ", ".join(missing)
        _State.fail = required
        return
    was_running = _running()
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and not was_running:
        reporter.write_line("starting the local cluster: scripts/cluster.sh up (a first build takes long; "
                            f"logs in {CACHE}/logs)")
    proc = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        _State.problem = f"scripts/cluster.sh up failed (exit {proc.returncode}):\n{tail}"
        _State.fail = True  # the machine can build it, so a cluster that breaks is a bug, not a skip
        return
    _State.started_here = not was_running
    _State.cluster = LocalCluster(kubeconfig=CACHE / "admin.kubeconfig", bin=CACHE / "bin")


def stop() -> None:
    if _State.started_here and os.environ.get("SANDBOX_KERNEL_TEST_CLUSTER_KEEP") != "1":
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True)
    _State.started_here = False


def pytest_collection_finish(session: pytest.Session) -> None:
    if any(item.get_closest_marker("cluster") for item in session.items) and not session.config.option.collectonly:
        start(session.config)


def pytest_sessionfinish(session: pytest.Session) -> None:
    stop()


@pytest.fixture(scope="session")
def local_cluster() -> LocalCluster:
    """The running local cluster; skips (or fails, see the module doc) when there is none."""
    if _State.cluster is None:
        problem = _State.problem or "no cluster: the test is not marked `cluster`"
        if _State.fail:
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    return _State.cluster
