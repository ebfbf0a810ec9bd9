"""Orphaned sandbox pods end by themselves and are collected (issue 15, point 4).

A kernel that dies uncleanly never stops its pod. Before, the agent served forever
(no deadline), gc was off by default and waited 24 h, so four orphans filled the user's
pod quota and ``safe-to-evict: "false"`` pinned their nodes. Now the agent exits after
``orphan_timeout`` seconds with no client attached — it runs in the pod, so this does not
depend on the kernel process — and each start sweeps the user's namespace for ended pods
and their egress objects.

The agent's side runs here against a local agent; the whole path on a real pod (the
kernel gone, the pod Succeeded by itself, the next start sweeping it) is
test_k8s_real.py::test_an_orphaned_pod_ends_by_itself_and_the_next_start_collects_it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from sandbox_kernel.backends import kubernetes as kb
from sandbox_kernel.backends.objects import SERVE_COMMAND, make_pod, to_dict

NS = "user-sandbox-alice"


def _agent(tmp_path, *args):
    path = str(tmp_path / "agent.sock")
    proc = subprocess.Popen([sys.executable, "-m", "sandbox_kernel.agent", "serve", "--socket", path, *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for _ in range(200):
        if os.path.exists(path):
            return proc, path
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the agent did not listen")


def test_agent_exits_after_the_orphan_timeout_only_while_nobody_is_attached(tmp_path):
    proc, path = _agent(tmp_path, "--orphan-exit", "1")
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
        assert b'"hello"' in conn.recv(65536)
        # attached for well over the timeout: the agent stays
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the agent exited while a client was attached"
            time.sleep(0.1)
        conn.close()  # the kernel is gone: nobody attaches again
        assert proc.wait(timeout=30) == 0
        assert "no client attached for 1 s (its kernel is gone): exiting" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_agent_that_nobody_ever_attaches_to_exits_and_zero_means_never(tmp_path):
    proc, _ = _agent(tmp_path, "--orphan-exit", "0.5")
    assert proc.wait(timeout=30) == 0
    (tmp_path / "agent.sock").unlink(missing_ok=True)
    proc, _ = _agent(tmp_path)  # no flag: serves until killed (the local backend's agents never use serve)
    try:
        time.sleep(1.5)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_pod_command_carries_the_orphan_timeout(monkeypatch):
    monkeypatch.delenv("SANDBOX_KERNEL_K8S_ORPHAN_TIMEOUT", raising=False)
    backend = kb.KubernetesBackend(user="alice")
    assert backend.orphan_timeout == 600 and backend.gc_on_start is True
    backend.namespace, backend.pod, backend.kernel_id = NS, "sandbox-k-1", "k-1"
    command = to_dict(backend.make_pod())["spec"]["containers"][0]["command"]
    assert command == [*SERVE_COMMAND, "--orphan-exit", "600"]
    pod = to_dict(make_pod("p", NS, kernel_id="k", user="alice", image="python:3.12-slim", agent_configmap="a",
                           requests={}, limits={}))
    assert pod["spec"]["containers"][0]["command"] == list(SERVE_COMMAND)  # 0: never
