"""Where a local sandbox lives on the host: its names, its state directory, its fixed paths.

Each sandbox has an id (8 hex digits) naming its network namespace (``sbx-<id>``, root mode)
and its directory ``<state_dir>/<id>/``:

- ``owner.json``: the kernel that owns it (pid and that pid's start time), read by
  :func:`~sandbox_kernel.backends.local.cleanup.gc` to tell a live owner from a dead one;
- ``work/``: the sandbox's home (``/home/sandbox``), a bounded tmpfs in root mode;
- ``agent.pyz``: the agent (bound read-only at :data:`AGENT_PATH`);
- ``resolv.conf``: points the sandbox at the kernel's DNS proxy (:data:`SANDBOX_RESOLVER`).

Written by :func:`write_state` (called by the backend in a worker thread); removed by
:func:`~sandbox_kernel.backends.local.cleanup.remove_sandbox`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "sbx-"
NFT_TABLE = "sandbox_kernel"
#: the sandbox's resolver: the kernel's DNS proxy, listening on the sandbox's own loopback
SANDBOX_RESOLVER = "127.0.0.53"
SANDBOX_HOME = "/home/sandbox"
AGENT_PATH = "/opt/sandbox-agent/agent.pyz"
#: where sandboxes live when neither the configuration nor the environment says (root mode)
DEFAULT_STATE_DIR = "/run/sandbox-kernel"


def run(argv: list[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """One host command (``ip``, ``nft``, ``mount``…), its output captured, 30 s at most."""
    return subprocess.run(argv, input=input, capture_output=True, text=True, check=check, timeout=30)


def netns_name(sandbox_id: str) -> str:
    """The named network namespace of a root-mode sandbox."""
    return f"{NETNS_PREFIX}{sandbox_id}"


def proc_start_time(pid: int) -> str | None:
    """The process's start time (a pid's identity), or None if it is gone — or a zombie: a
    kernel that died but was not reaped (its parent died too, and PID 1 of a container
    may not reap) owns nothing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def write_state(root: Path, *, kernel_id: str, agent: bytes, work_size: int, work_uid: int | None) -> None:
    """Make the sandbox's directory ``root``: ``work/`` (a tmpfs of ``work_size`` bytes when not
    0; owned by ``work_uid`` when given), the agent, the owner record and the resolver file."""
    (root / "work").mkdir(parents=True)
    if work_size:
        # bounded: a cell filling its disk fills this, not the host's
        run(["mount", "-t", "tmpfs", "-o", f"size={work_size},mode=0755,nosuid,nodev",
             "sandbox-work", str(root / "work")])
    if work_uid is not None:  # None in rootless mode: the kernel's user is the sandbox's uid outside
        os.chown(root / "work", work_uid, work_uid)
    # 0755: bwrap enters it (as root without capabilities) after dropping privileges
    os.chmod(root / "work", 0o755)
    (root / "agent.pyz").write_bytes(agent)
    (root / "owner.json").write_text(json.dumps({
        "kernel_pid": os.getpid(),
        "kernel_pid_start": proc_start_time(os.getpid()),
        "kernel_id": kernel_id,
        "created": time.time(),
    }))
    # the sandbox gets its own resolv.conf: the host's may point at a loopback resolver
    (root / "resolv.conf").write_text(
        f"# written by sandbox-kernel: the kernel's DNS proxy, which only answers for\n"
        f"# names the egress policy allows\nnameserver {SANDBOX_RESOLVER}\noptions timeout:2 attempts:1\n")
