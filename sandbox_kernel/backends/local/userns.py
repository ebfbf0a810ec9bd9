"""A user namespace of its own for each local sandbox (root mode).

Called by the local backend (``backends/local/backend.py``) before it starts a sandbox's agent; the
agent's process chain joins the namespace (``nsenter --user``) before bubblewrap runs.

Why: everything the kernel keys by user — above all the per-user keyring, which outlives the
processes that filled it — is per user namespace as well as per uid. Sandboxes that ran as uid
65534 of the host's namespace shared one keyring (a key added in one was read in another); each
sandbox now has a namespace of its own, so nothing keyed by uid is shared, and nothing of it
outlives the sandbox.

The namespace maps exactly two ids onto the same host ids: root, which bubblewrap needs to
build the sandbox's mounts (so it can still bind an interpreter that lives under ``/root``),
and the sandbox uid the code runs as. Nothing else of the host is mapped. Its limit on new user
namespaces is set to 0, which (with the seccomp filter) stops code in the sandbox from
creating any: the same guarantee bubblewrap's ``--disable-userns`` gives, which needs
bubblewrap's own ``--unshare-user`` and so is not available when bubblewrap runs as root.
"""

from __future__ import annotations

import os
import subprocess

from ...errors import SandboxStartError

#: holds the new namespace until its maps are written and it has been opened
_HELPER = "echo ready; read go"
#: run as the namespace's root (entering it gives the capabilities the helper lost at exec)
_CLOSE = "echo 0 > /proc/sys/user/max_user_namespaces"


def create(uid: int) -> int:
    """Create a user namespace mapping root and ``uid`` to themselves, with no nested user
    namespaces allowed; return an open descriptor of it (the caller closes it). Blocking."""
    try:
        helper = subprocess.Popen(["unshare", "--user", "sh", "-c", _HELPER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as err:
        raise SandboxStartError(f"cannot create the sandbox's user namespace: {err}") from None
    fd = -1
    try:
        assert helper.stdin and helper.stdout and helper.stderr
        if helper.stdout.readline() != b"ready\n":
            raise SandboxStartError(f"cannot create the sandbox's user namespace: "
                                    f"{helper.stderr.read().decode(errors='replace').strip()}")
        ids = "0 0 1\n" if uid == 0 else f"0 0 1\n{uid} {uid} 1\n"
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{helper.pid}/{name}", "w") as f:
                f.write(ids)
        fd = os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        closed = subprocess.run(["nsenter", f"--user=/proc/self/fd/{fd}", "sh", "-c", _CLOSE],
                                pass_fds=(fd,), capture_output=True, text=True, timeout=10)
        if closed.returncode != 0:
            raise SandboxStartError(f"cannot close the sandbox's user namespace to nested ones: "
                                    f"{closed.stderr.strip()}")
        helper.stdin.write(b"go\n")
        helper.stdin.close()
        helper.wait(timeout=10)
        return fd
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        for stream in (helper.stdin, helper.stdout, helper.stderr):
            if stream is not None and not stream.closed:
                stream.close()
