"""Nothing is left behind: not on shutdown, not after the kernel is SIGKILLed (gc)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kerneltest import KernelDriver, namespaces_of, sandbox_namespaces


def _processes_of(namespaces: set[str]) -> set[int]:
    """Every process of these sandboxes: those inside the namespaces, their slirp4netns and
    the kernel's enforcer log reader (enforcerlog.py)."""
    pids = set()
    for ns in namespaces:
        pids |= {int(p) for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                                text=True).stdout.split()}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if ("slirp4netns" in cmdline or "sandbox_kernel.backends.local.enforcerlog" in cmdline) and any(
                    f"/run/netns/{ns}" in cmdline for ns in namespaces):
                pids.add(int(proc.name))
    return pids


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists()
            and "Z" not in Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[-1].split()[:1]}


def _wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _busy_sandbox(driver: KernelDriver) -> tuple[set[str], set[int], Path]:
    """Give the kernel's sandbox a background process; return its namespace (a set of one),
    its processes and its state directory."""
    driver.execute("!sleep 1000 &\nx = 1")
    created = driver.namespaces()
    assert len(created) == 1
    state = Path("/run/sandbox-kernel") / next(iter(created))[len("sbx-"):]
    return created, _processes_of(created), state


def test_shutdown_removes_namespace_processes_and_state():
    driver = KernelDriver()
    created, procs, state = _busy_sandbox(driver)
    assert len(procs) >= 5  # bubblewrap, the agent, the background sleep, slirp4netns, the log reader
    assert state.exists()
    driver.shutdown()
    assert _wait_for(lambda: not (sandbox_namespaces() & created))
    assert not state.exists()
    assert _wait_for(lambda: not _alive(procs)), _alive(procs)


def test_sigkilled_kernel_leaves_nothing_after_gc():
    driver = KernelDriver()
    created, procs, state = _busy_sandbox(driver)
    os.kill(driver.pid, signal.SIGKILL)
    driver.km.provisioner.process.wait()
    # bubblewrap and slirp4netns die with the kernel; the namespace needs gc
    assert _wait_for(lambda: not _alive(procs)), _alive(procs)
    subprocess.run(["sandbox-kernel", "gc"], capture_output=True, text=True, check=True)
    # every kernel that starts runs the same gc, so on a shared machine another one may have
    # removed the namespace before this one (its output then says nothing of it): what counts
    # is that nothing of the sandbox is left
    assert not (sandbox_namespaces() & created)
    assert not state.exists()
    driver.kc.stop_channels()
    driver.km.cleanup_resources()


def test_gc_keeps_sandboxes_of_live_kernels(kernel):
    kernel.execute("1")
    mine = kernel.namespaces()  # only this kernel's: others come and go meanwhile
    assert mine
    subprocess.run(["sandbox-kernel", "gc"], capture_output=True, text=True, check=True)
    assert mine <= sandbox_namespaces()
    assert kernel.execute("1 + 1").status == "ok"


PARENT = r"""
import sys, time
from jupyter_client.manager import start_new_kernel
km, kc = start_new_kernel(kernel_name="sandbox", startup_timeout=120)
reply = kc.execute_interactive("x = 1", timeout=120)
assert reply["content"]["status"] == "ok", reply
print("KERNEL", km.provisioner.process.pid, flush=True)
time.sleep(600)
"""


def test_a_kernel_whose_parent_died_stops_its_sandbox_first():
    """The process that started the kernel dies without shutting it down (a Jupyter server
    killed, a notebook runner crashed): the kernel notices, stops its sandbox, and exits —
    nothing is left for gc."""
    import sys

    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("KERNEL "):  # the cell's own output comes first
            line = parent.stdout.readline()
            assert line, "the parent process ended before its kernel ran a cell"
        kernel_pid = int(line.split()[1])
        created = namespaces_of(kernel_pid)  # its own: other kernels may start meanwhile
        assert len(created) == 1, created
        procs = _processes_of(created)
    finally:
        parent.kill()
        parent.wait()
    assert _wait_for(lambda: not _alive({kernel_pid}), 30), "the orphaned kernel kept running"
    assert not (sandbox_namespaces() & created), "the orphaned kernel left its sandbox behind"
    assert not _alive(procs)


def test_gc_takes_a_zombie_kernel_for_dead(tmp_path):
    """A kernel that died but was never reaped (its parent died too; PID 1 in a container may
    not reap) is a zombie: its pid and start time are still in /proc, yet it owns nothing.
    (gc itself is not called here: it looks at every sandbox on the machine.)"""
    import json
    import sys

    from sandbox_kernel.backends.local.cleanup import _owner_alive
    from sandbox_kernel.backends.local.layout import proc_start_time as _proc_start_time

    def owner_file(name: str, pid: int, start: str) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps({"kernel_pid": pid, "kernel_pid_start": start}))
        return path

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    try:
        assert _wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z")
        assert _proc_start_time(child.pid) is None
        assert not _owner_alive(owner_file("zombie.json", child.pid, start))
        mine = _proc_start_time(os.getpid())
        assert mine is not None and _owner_alive(owner_file("alive.json", os.getpid(), mine))
    finally:
        child.wait()


@pytest.fixture
def configured_state(tmp_path) -> tuple[dict, Path]:
    """A Jupyter config directory whose sandbox_kernel_config.py (and nothing else) sets
    ``c.LocalBackend.state_dir``: the environment that points a kernel or a command at it,
    and that state directory."""
    config = tmp_path / "config"
    config.mkdir()
    state = tmp_path / "state"
    (config / "sandbox_kernel_config.py").write_text(f"c.LocalBackend.state_dir = {str(state)!r}\n")
    assert "SANDBOX_KERNEL_STATE_DIR" not in os.environ  # the config file alone sets it
    return {"JUPYTER_CONFIG_DIR": str(config)}, state


def _recorded_namespaces(state: Path) -> set[str]:
    """The network namespaces of the sandboxes with an owner record in ``state``."""
    return {f"sbx-{p.parent.name}" for p in state.glob("*/owner.json")}


def _kernel_keeping_state(fresh_kernel, configured_state) -> tuple[KernelDriver, set[str]]:
    """A kernel of the configured state directory whose sandbox holds ``kept = 41``, and the
    sandbox's network namespace (a set of one, recorded in that directory and present)."""
    env, state = configured_state
    driver = fresh_kernel(env)
    assert driver.execute("kept = 41").reply["content"]["status"] == "ok"
    netns = _recorded_namespaces(state)
    assert len(netns) == 1 and netns <= sandbox_namespaces()
    return driver, netns


def test_start_up_gc_reads_the_configured_state_dir(configured_state, fresh_kernel):
    # With the state directory set in a config file (not the environment), a starting
    # kernel's gc looked for owner records in the default directory, found none for the
    # first kernel's namespace and deleted it under the running sandbox.
    first, netns = _kernel_keeping_state(fresh_kernel, configured_state)
    second = fresh_kernel(configured_state[0])
    assert second.execute("print('second')").stream().startswith("second\n")
    assert netns <= sandbox_namespaces()
    assert first.execute("print(kept + 1)").stream().startswith("42\n")


def test_gc_command_reads_the_kernels_config_file(configured_state, fresh_kernel):
    # `sandbox-kernel gc` parsed only argv and the environment: with the state directory set
    # in sandbox_kernel_config.py it looked for owner records in the default directory and
    # removed a running kernel's namespace as an orphan.
    driver, netns = _kernel_keeping_state(fresh_kernel, configured_state)
    env, state = configured_state
    for command in (["sandbox-kernel", "gc"], ["sandbox-kernel", "doctor"]):
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        if command[1] == "doctor":  # doctor reports the configured directory, not the default
            assert f"state directory:     {state}" in result.stdout
        else:
            assert not any(ns.removeprefix("sbx-") in result.stdout for ns in netns), result.stdout
    assert netns <= sandbox_namespaces()
    assert driver.execute("print(kept + 1)").stream().startswith("42\n")


def test_gc_with_another_state_dir_leaves_a_running_sandbox_alone(configured_state, fresh_kernel, tmp_path):
    # Two kernels configured with different state directories on one machine: the gc of
    # the one (at its start, or `sandbox-kernel gc`) found the other's namespace with no
    # owner record in its own directory and deleted it under the running sandbox.
    driver, netns = _kernel_keeping_state(fresh_kernel, configured_state)
    other = tmp_path / "other-state"
    result = subprocess.run(["sandbox-kernel", "gc"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SANDBOX_KERNEL_STATE_DIR": str(other)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert not any(ns in result.stdout for ns in netns), result.stdout
    assert netns <= sandbox_namespaces()
    assert driver.execute("print(kept + 1)").stream().startswith("42\n")
