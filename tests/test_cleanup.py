"""Nothing is left behind: not on shutdown, not after the kernel is SIGKILLed (gc)."""

import os
import signal
import subprocess
import time
from pathlib import Path

from kerneltest import KernelDriver, sandbox_namespaces


def _sandbox_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "agent.pyz" in line or "slirp4netns" in line]


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_shutdown_removes_namespace_processes_and_state():
    before_ns = sandbox_namespaces()
    before_procs = set(_sandbox_processes())
    driver = KernelDriver()
    driver.execute("!sleep 1000 &\nx = 1")
    created = sandbox_namespaces() - before_ns
    assert len(created) == 1
    state = Path("/run/sandbox-kernel") / next(iter(created))[len("sbx-"):]
    assert state.exists()
    driver.shutdown()
    assert _wait_for(lambda: not (sandbox_namespaces() & created))
    assert not state.exists()
    assert _wait_for(lambda: set(_sandbox_processes()) <= before_procs), _sandbox_processes()


def test_sigkilled_kernel_leaves_nothing_after_gc():
    before_ns = sandbox_namespaces()
    before_procs = set(_sandbox_processes())
    driver = KernelDriver()
    driver.execute("!sleep 1000 &\nx = 1")
    created = sandbox_namespaces() - before_ns
    assert len(created) == 1
    os.kill(driver.km.provisioner.process.pid, signal.SIGKILL)
    driver.km.provisioner.process.wait()
    # bubblewrap and slirp4netns die with the kernel; the namespace needs gc
    assert _wait_for(lambda: set(_sandbox_processes()) <= before_procs), _sandbox_processes()
    result = subprocess.run(["sandbox-kernel", "gc"], capture_output=True, text=True, check=True)
    assert "removed network namespace" in result.stdout
    assert not (sandbox_namespaces() & created)
    driver.kc.stop_channels()
    driver.km.cleanup_resources()


def test_gc_keeps_sandboxes_of_live_kernels(kernel):
    kernel.execute("1")
    mine = sandbox_namespaces()
    assert mine
    subprocess.run(["sandbox-kernel", "gc"], capture_output=True, text=True, check=True)
    assert mine <= sandbox_namespaces()
    assert kernel.execute("1 + 1").status == "ok"
