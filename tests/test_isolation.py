"""What code in the sandbox can and cannot do to the machine around it."""

import ast
import os
from pathlib import Path

import pytest

# each kernel test runs against a root kernel and a rootless one (uid 65534; conftest.py)
pytestmark = pytest.mark.both_modes


def _result(cell):
    return ast.literal_eval(cell.of_type("execute_result")[0]["content"]["data"]["text/plain"])


def test_runs_unprivileged_without_capabilities(kernel):
    cell = kernel.execute(
        "import os\nstatus = open('/proc/self/status').read()\n"
        "caps = [l.split()[1] for l in status.splitlines() if l.startswith(('CapEff', 'CapPrm', 'CapBnd'))]\n"
        "os.getuid(), os.getgid(), caps, 'NoNewPrivs:\\t1' in status"
    )
    assert _result(cell) == (65534, 65534, ["0000000000000000"] * 3, True)


def test_own_pid_namespace(kernel):
    cell = kernel.execute("import os\nsorted(int(p) for p in os.listdir('/proc') if p.isdigit())[:2]")
    assert _result(cell) == [1, 2]


@pytest.mark.parametrize("path", ["/usr/sandbox-test", "/etc/sandbox-test", "/sandbox-test"])
def test_root_filesystem_is_read_only(kernel, path):
    cell = kernel.execute(f"open({path!r}, 'w')")
    assert cell.status == "error"
    assert cell.reply["content"]["ename"] in ("OSError", "PermissionError")
    assert not Path(path).exists()


def test_writable_tmp_and_workdir_are_private(kernel):
    cell = kernel.execute("open('/tmp/t', 'w').write('x'); open('/home/sandbox/w', 'w').write('y')")
    assert cell.status == "ok"
    assert not Path("/tmp/t").exists() or Path("/tmp/t").read_text() != "x"


def test_kernel_connection_file_and_credentials_are_invisible(kernel):
    connection_file = kernel.km.connection_file
    assert os.path.exists(connection_file)
    cell = kernel.execute(
        f"import os\n[os.path.exists(p) for p in ({connection_file!r}, '/root/.kube', '/run/netns', "
        "'/run/sandbox-kernel', '/root/.ssh')]"
    )
    assert _result(cell) == [False] * 5


def test_cannot_change_the_firewall(kernel):
    cell = kernel.execute("!nft flush ruleset")
    assert cell.status == "error"
    cell = kernel.execute("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)")
    assert cell.reply["content"]["ename"] == "PermissionError"


# -- each sandbox has a user namespace of its own (issue 20, point 2) ---------------------

KEYS = r"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
KEY_SPEC_USER_KEYRING, KEYCTL_SEARCH = -4, 10
action, desc = sys.argv[1], sys.argv[2].encode()
if action == "add":
    rc = libc.syscall(248, b"user", desc, b"secret", 6, KEY_SPEC_USER_KEYRING)
else:
    rc = libc.syscall(250, KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, b"user", desc, 0)
print("FOUND" if rc > 0 else f"NONE {ctypes.get_errno()}")
"""


def _agent_pid(kernel) -> int:
    from kerneltest import agent_pid

    return agent_pid(kernel.pid)


def _keys_as_sandbox_user(pid: int, *args: str) -> str:
    """Run the keyring probe as the sandbox's uid in the sandbox's user namespace, without
    its seccomp filter (which refuses keyctl anyway): this tests the namespaces themselves."""
    import subprocess

    if os.readlink(f"/proc/{pid}/ns/user") == os.readlink("/proc/self/ns/user"):
        enter = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    else:
        enter = ["nsenter", f"--target={pid}", "--user", "--setuid=65534", "--setgid=65534"]
    result = subprocess.run([*enter, "/usr/bin/python3", "-c", KEYS, *args], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_sandboxes_share_no_user_namespace_and_no_keyring(fresh_kernel, kernel_mode):
    import uuid

    a, b = fresh_kernel(), fresh_kernel()
    ns = [kernel.execute("import os\nos.readlink('/proc/self/ns/user'), open('/proc/self/uid_map').read().split()")
          for kernel in (a, b)]
    (ns_a, map_a), (ns_b, map_b) = (_result(cell) for cell in ns)
    assert ns_a != ns_b and os.readlink("/proc/self/ns/user") not in (ns_a, ns_b)
    if kernel_mode == "root":
        assert map_a == map_b == ["0", "0", "1", "65534", "65534", "1"]  # root (for bwrap) and the sandbox uid only
    else:  # the sandbox uid only, over root of the kernel's own namespace (the kernel's uid outside)
        assert map_a == map_b == ["65534", "0", "1"]
    pid_a, pid_b = _agent_pid(a), _agent_pid(b)
    desc = f"sandbox-kernel-test-{uuid.uuid4().hex[:8]}"
    assert _keys_as_sandbox_user(pid_a, "add", desc) == "FOUND"
    assert _keys_as_sandbox_user(pid_a, "search", desc) == "FOUND"  # the probe does find keys
    assert _keys_as_sandbox_user(pid_b, "search", desc).startswith("NONE")
    # nor does uid 65534 of the host: the key lives in sandbox A's namespace only
    assert _keys_as_sandbox_user(os.getpid(), "search", desc).startswith("NONE")
