"""The agent as PID 1 of its PID namespace, as in a Kubernetes sandbox pod.

There an interrupt used ``killpg(getpgrp())``, i.e. ``killpg(1)`` = ``kill(-1)``: SIGINT to
every process in the pod, so the exec'd ``attach`` carrying the kernel's stream died with the
cell ("the exec stream to the sandbox pod closed"). Found on the real cluster
(tests/kubernetes/test_k8s_real.py); reproduced here with a PID namespace of our own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from sandbox_kernel.agent.bundle import build_pyz

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("nsenter"),
                                reason="needs root with unshare and nsenter (util-linux) for a PID namespace")


def test_interrupt_reaches_the_cell_and_spares_the_attached_stream(tmp_path):
    pyz = tmp_path / "agent.pyz"
    pyz.write_bytes(build_pyz())
    sock = tmp_path / "agent.sock"
    # --kill-child: killing unshare (below, after the test) must end the agent too; with --fork
    # alone the agent, PID 1 of its namespace, outlived the test
    agent = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, str(pyz),
                              "serve", "--socket", str(sock)], stdin=subprocess.DEVNULL)
    attach = None
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert agent.poll() is None and time.monotonic() < deadline, "the agent did not start"
            time.sleep(0.05)
        # the agent's host pid: the child of unshare, PID 1 inside
        with open(f"/proc/{agent.pid}/task/{agent.pid}/children") as f:
            inner = int(f.read().split()[0])
        with open(f"/proc/{inner}/status") as f:
            nspid = next(line for line in f if line.startswith("NSpid:")).split()[1:]
        assert nspid[-1] == "1", nspid
        # like `kubectl exec`: attach runs in the agent's PID namespace, in a session of its own
        attach = subprocess.Popen(["nsenter", "--target", str(inner), "--pid", "--mount", "--", sys.executable,
                                   str(pyz), "attach", "--socket", str(sock)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, start_new_session=True)

        def send(frame):
            attach.stdin.write((json.dumps(frame) + "\n").encode())
            attach.stdin.flush()

        def recv():
            line = attach.stdout.readline()
            assert line, f"the attached stream ended (attach exit status {attach.poll()})"
            return json.loads(line)

        assert recv()["type"] == "hello"
        send({"type": "execute", "id": 1, "code": "import time\nprint('busy', flush=True)\nwhile True: pass",
              "silent": False, "store_history": True, "user_expressions": {}, "allow_stdin": False})
        frames = [recv()]
        while frames[-1].get("type") != "stream":
            frames.append(recv())
        send({"type": "interrupt"})
        while frames[-1].get("type") != "done":
            frames.append(recv())
        errors = [f for f in frames if f.get("type") == "error"]
        assert errors and errors[0]["ename"] == "KeyboardInterrupt", frames
        # the stream survived: the same connection runs the next cell
        send({"type": "execute", "id": 2, "code": "print(6 * 7)", "silent": False, "store_history": True,
              "user_expressions": {}, "allow_stdin": False})
        out = []
        while True:
            frame = recv()
            if frame.get("type") == "stream":
                out.append(frame["text"])
            if frame.get("type") == "done":
                break
        assert "".join(out) == "42\n"
        assert attach.poll() is None
    finally:
        for proc in (attach, agent):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
