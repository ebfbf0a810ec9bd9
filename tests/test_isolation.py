"""What code in the sandbox can and cannot do to the machine around it."""

import ast
import os
from pathlib import Path

import pytest


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
