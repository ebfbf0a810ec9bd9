"""The local backend without root (issue 20, point 1; prototype behind c.LocalBackend.rootless).

A real Sandbox kernel, started by jupyter_client in a process running as uid 65534 (no
capabilities): it creates the sandbox's user and network namespaces itself, programs nftables
and reads NFLOG inside them, and runs cells under bubblewrap. The test drives it from that
process (the script below) and checks what it reports; every process it started is gone after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists(SYSTEM_PYTHON),
    reason="needs root (to start the unprivileged kernel as uid 65534) and a system python3",
)

DRIVE = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from kerneltest import KernelDriver

out = {}
k = KernelDriver()
try:
    def run(code):
        c = k.execute(code, timeout=90)
        return {"status": c.status, "stdout": c.stream(), "stderr": c.stream("stderr"),
                "blocked": c.sandbox.get("blocked", []),
                "ename": c.reply["content"].get("ename"), "evalue": c.reply["content"].get("evalue")}
    out["kernel_uid"] = int(open(f"/proc/{k.pid}/status").read().split("Uid:")[1].split()[0])
    out["who"] = run("import os\nprint(os.getuid(), open('/proc/self/uid_map').read().split(), "
                     "[l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapBnd'))])")
    out["blocked"] = run("import socket\nimport sandbox_agent.guard as g\ng.enabled = False\n"
                         "socket.create_connection(('10.231.250.2', 80), timeout=3)")
    out["userns"] = run("!unshare --user true")
    out["raw"] = run("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)")
    out["keyctl"] = run("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
                        "print('KEYCTL', libc.syscall(250, 0, -4, 1), ctypes.get_errno())")
    out["allow"] = run("%sandbox allow 10.231.250.2:80/tcp")
    # small stacks: RLIMIT_DATA counts each thread's stack at its full size (8 MiB by default)
    out["nproc"] = run("import resource, threading, time\nprint('NPROC', resource.getrlimit(resource.RLIMIT_NPROC))\n"
                       "threading.stack_size(256 * 1024)\nstop = threading.Event(); started = 0\n"
                       "try:\n    for _ in range(1000):\n        threading.Thread(target=stop.wait).start(); started += 1\n"
                       "except RuntimeError: pass\nstop.set(); print('THREADS', started)")
    out["data"] = run("import resource\nprint('DATA', resource.getrlimit(resource.RLIMIT_DATA))\n"
                      "small = bytearray(64 << 20)\nbig = bytearray(3 << 30)")
    out["after_data"] = run("print('ALIVE', len(small))")
    out["fsize"] = run("import resource\nprint('FSIZE', resource.getrlimit(resource.RLIMIT_FSIZE))\n"
                       "open('/home/sandbox/f', 'wb').write(bytes(7 << 20))\n"
                       "open('/home/sandbox/g', 'wb').write(bytes(9 << 20))")
    kids = [int(p) for p in os.listdir("/proc") if p.isdigit() and os.path.exists(f"/proc/{p}/status")
            and f"PPid:\t{k.pid}\n" in open(f"/proc/{p}/status").read()]
    out["children"] = kids
finally:
    k.shutdown()
out["left"] = [p for p in out.get("children", []) if os.path.exists(f"/proc/{p}")]
print("RESULT " + json.dumps(out))
"""


def _same_python() -> bool:
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    return version == str(sys.version_info[:2])


@pytest.fixture
def unprivileged_home():
    """A home for uid 65534 with the kernelspec of the rootless kernel; removed after."""
    home = Path(tempfile.mkdtemp(prefix="skt-rootless-"))
    try:
        spec = home / "share" / "jupyter" / "kernels" / "sandbox"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [SYSTEM_PYTHON, "-m", "sandbox_kernel", "-f", "{connection_file}"],
            "display_name": "Sandbox (rootless)", "language": "python", "interrupt_mode": "message",
            "env": {"SANDBOX_KERNEL_ROOTLESS": "true", "SANDBOX_KERNEL_PYTHON": SYSTEM_PYTHON,
                    "SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "any",
                    # no cgroups: these become RLIMIT_DATA and RLIMIT_FSIZE
                    "SANDBOX_KERNEL_MEMORY_LIMIT": "2G", "SANDBOX_KERNEL_WORK_SIZE": "8M",
                    # the test run's cluster ranges (conftest: the defaults minus the test hosts)
                    "SANDBOX_KERNEL_POLICY_CLUSTER_RANGES": os.environ.get("SANDBOX_KERNEL_POLICY_CLUSTER_RANGES", "")},
        }))
        for path in [home, *home.rglob("*")]:
            os.chown(path, 65534, 65534)
        home.chmod(0o700)
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _drive(home: Path, script: str, *args: str) -> dict:
    """Run ``script`` as uid 65534 (no capabilities) with the rootless kernelspec; its result."""
    site = sysconfig.get_paths()["purelib"]
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
           "JUPYTER_PATH": str(home / "share" / "jupyter"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "XDG_RUNTIME_DIR": str(home / "xdg"),
           "PYTHONPATH": f"{ROOT}:{site}"}
    (home / "xdg").mkdir(mode=0o700, exist_ok=True)
    os.chown(home / "xdg", 65534, 65534)
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
         "--bounding-set=-all", SYSTEM_PYTHON, "-c", script, str(ROOT / "tests"), *args],
        env=env, capture_output=True, text=True, timeout=300, cwd=str(home))
    lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, (result.stdout[-2000:], result.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT "):])


def test_a_kernel_without_root_runs_cells_enforces_deny_and_reports(unprivileged_home):
    if not _same_python():
        pytest.skip(f"{SYSTEM_PYTHON} is not Python {sys.version_info[:2]}: it cannot load this venv's packages")
    out = _drive(unprivileged_home, DRIVE)
    assert out["kernel_uid"] == 65534
    # the code: uid 65534 in a user namespace of its own (the kernel's user outside), no capabilities
    assert out["who"]["status"] == "ok", out["who"]
    assert "65534 ['65534', '0', '1'] ['0000000000000000', '0000000000000000']" in out["who"]["stdout"]
    # deny is enforced by nftables in the kernel's own namespaces, and NFLOG reports it
    assert out["blocked"]["status"] == "error"
    assert [(b["ip"], b["port"], b["verdict"]) for b in out["blocked"]["blocked"]] == [("10.231.250.2", 80, "rejected")]
    # no nested user namespace, and the seccomp filter is in force
    assert out["userns"]["status"] == "error"
    assert "KEYCTL -1 1" in out["keyctl"]["stdout"]
    # the code holds no capability over the network namespace the kernel's user owns
    assert out["raw"]["ename"] == "PermissionError", out["raw"]
    # where /dev/net/tun is closed to other users (0600 here) there is no uplink, and an
    # allowlist is refused, saying why
    if os.stat("/dev/net/tun").st_mode & 0o006 != 0o006:
        assert out["allow"]["status"] == "error"
        assert "/dev/net/tun" in out["allow"]["evalue"], out["allow"]
    # no cgroup without root: the process count is an rlimit counted in the sandbox's namespace
    assert "NPROC (512, 512)" in out["nproc"]["stdout"], out["nproc"]
    started = int(out["nproc"]["stdout"].split("THREADS ")[1].split()[0])
    assert 400 < started < 512, started
    # memory: RLIMIT_DATA per process; an allocation beyond it fails, the sandbox lives on
    assert f"DATA ({2 << 30}, {2 << 30})" in out["data"]["stdout"], out["data"]
    assert out["data"]["ename"] == "MemoryError", out["data"]
    assert "ALIVE 67108864" in out["after_data"]["stdout"], out["after_data"]
    # the working directory is a plain directory: each file is bounded (RLIMIT_FSIZE), not the total
    assert f"FSIZE ({8 << 20}, {8 << 20})" in out["fsize"]["stdout"], out["fsize"]
    assert out["fsize"]["ename"] == "OSError" and "File too large" in out["fsize"]["evalue"], out["fsize"]
    # the kernel's helpers (namespace holder, agent chain) ended with it
    assert len(out["children"]) >= 2, out["children"]
    assert out["left"] == []
    state = unprivileged_home / "xdg" / "sandbox-kernel"
    assert not state.exists() or not any(state.iterdir())


DRIVE_ALLOW = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from kerneltest import KernelDriver

ip = sys.argv[2]
out = {}
k = KernelDriver()
try:
    def run(code):
        c = k.execute(code, timeout=90)
        return {"status": c.status, "stdout": c.stream(), "evalue": c.reply["content"].get("evalue"),
                "blocked": c.sandbox.get("blocked", [])}
    out["allow"] = run(f"%sandbox allow {ip}:8080/tcp")
    out["reach"] = run(f"import socket\nprint('REPLY', socket.create_connection(({ip!r}, 8080), timeout=5).recv(100))")
    out["other_port"] = run(f"import socket\nsocket.create_connection(({ip!r}, 8081), timeout=5)")
    out["deny"] = run("%sandbox mode deny")
    out["after_deny"] = run(f"import socket\nsocket.create_connection(({ip!r}, 8080), timeout=5)")
finally:
    k.shutdown()
print("RESULT " + json.dumps(out))
"""


def test_an_allowlist_without_root_through_a_tun_node_of_the_users_own(unprivileged_home, test_host):
    """Where /dev/net/tun is closed to users (0600 here), the administrator can give the Jupyter
    user a tun node of its own (c.LocalBackend.tun_device): slirp4netns then attaches, and an
    allowlist reaches exactly what it allows."""
    if not _same_python():
        pytest.skip(f"{SYSTEM_PYTHON} is not Python {sys.version_info[:2]}: it cannot load this venv's packages")
    host = test_host(8080)
    node = unprivileged_home / "tun"
    subprocess.run(["mknod", str(node), "c", "10", "200"], check=True)
    os.chown(node, 65534, 65534)
    node.chmod(0o600)
    spec = unprivileged_home / "share" / "jupyter" / "kernels" / "sandbox" / "kernel.json"
    kernel_json = json.loads(spec.read_text())
    kernel_json["env"]["SANDBOX_KERNEL_TUN_DEVICE"] = str(node)
    spec.write_text(json.dumps(kernel_json))
    out = _drive(unprivileged_home, DRIVE_ALLOW, host.ip)
    assert out["allow"]["status"] == "ok", out["allow"]
    assert "REPLY b'hello from test host\\n'" in out["reach"]["stdout"], out["reach"]
    assert out["other_port"]["status"] == "error"
    assert [(b["ip"], b["port"]) for b in out["other_port"]["blocked"]] == [(host.ip, 8081)]
    assert out["after_deny"]["status"] == "error"
    assert host.seen() == 1
