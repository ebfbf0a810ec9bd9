"""The command that starts the agent under bubblewrap: a pure builder and what it is built from.

:func:`bwrap_argv` turns a :class:`BwrapSpec` into the argv and reads nothing: what it needs
from the host (which of ``/bin``, ``/lib``… are symlinks, which paths exist, the interpreter's
prefixes) is looked up beforehand by :func:`host_root_links` and :func:`python_prefixes`
(the backend gathers them, ``LocalBackend._agent_argv``). The sandbox it describes:
read-only system directories, a private ``/tmp``, a private writable working directory
(:data:`~sandbox_kernel.backends.local.layout.SANDBOX_HOME`), its own user, PID, IPC and UTS
namespaces, no capabilities, an unprivileged uid, the seccomp filter, and it dies with the kernel.
"""

from __future__ import annotations

import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from .layout import AGENT_PATH, SANDBOX_HOME, run

#: the host's top-level directories the sandbox sees as the host has them (a usrmerged
#: system has them as symlinks into /usr)
ROOT_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


@dataclass(frozen=True)
class BwrapSpec:
    """Everything the agent's command depends on."""

    #: the sandbox's state directory (``work/``, ``agent.pyz``, ``resolv.conf``)
    root: str
    #: the interpreter that runs the agent
    python: str
    #: host paths bound read-only at the same path, in order (paths that exist; the builder
    #: leaves out ``/usr/…`` ones: /usr is bound whole)
    binds: tuple[str, ...]
    #: the host's ``/bin``, ``/lib``…: (path, symlink target), or (path, None) for a directory
    root_links: tuple[tuple[str, str | None], ...]
    #: bytes of the private /tmp
    tmp_size: int
    #: the uid (and gid) the code runs as
    uid: int
    #: the seccomp filter (a descriptor passed to the command)
    seccomp_fd: int
    #: root mode: the sandbox's user namespace (a descriptor passed to the command, userns.py)
    #: and its network namespace (a path)
    userns_fd: int | None = None
    netns_path: str | None = None
    #: rootless mode: the argv prefix that enters the kernel's own namespaces, and the
    #: rlimits that stand in for cgroups (``prlimit`` options)
    rootless_enter: tuple[str, ...] | None = None
    rlimits: tuple[str, ...] = ()


def bwrap_argv(spec: BwrapSpec) -> list[str]:
    """The command that starts the agent (pure). The caller passes ``spec``'s descriptors to it."""
    root = Path(spec.root)
    if spec.rootless_enter is not None:
        # rootless: bwrap starts as root of the kernel's own namespaces and puts the code
        # in a further user namespace (uid 65534 there, the kernel's user outside), with
        # no capabilities and no way to create another one
        argv = list(spec.rootless_enter)
        if spec.rlimits:
            # no cgroup: rlimits (limits.rootless_rlimits); RLIMIT_NPROC is recorded by
            # bwrap's new user namespace as its own ceiling, so it counts the sandbox only
            argv += ["prlimit", *spec.rlimits]
        argv += ["bwrap", "--unshare-user", "--uid", str(spec.uid),
                 "--gid", str(spec.uid), "--disable-userns"]
    else:
        if spec.netns_path is None or spec.userns_fd is None:
            raise ValueError("root mode needs the sandbox's network namespace and user namespace")
        argv = [
            # the network namespace first: joining it needs root of the host's user namespace
            "nsenter", f"--net={spec.netns_path}",
            "nsenter", f"--user=/proc/self/fd/{spec.userns_fd}",
            "bwrap",
        ]
    argv += [
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session", "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]
    for target, link in spec.root_links:
        if link is not None:
            argv += ["--symlink", link, target]
        else:
            argv += ["--ro-bind", target, target]
    argv += ["--ro-bind", "/etc", "/etc",
             "--ro-bind", str(root / "resolv.conf"), "/etc/resolv.conf",
             # before the interpreter's binds, which may live under /tmp (a venv in a CI clone)
             "--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", str(spec.tmp_size),
             "--tmpfs", "/tmp"]
    made: set[str] = {"/tmp"}
    for path in spec.binds:
        if path.startswith("/usr/"):
            continue
        # parents are created world-readable so the unprivileged uid can walk to the bind
        parts = Path(path).parts[1:-1]
        for i in range(1, len(parts) + 1):
            parent = "/" + "/".join(parts[:i])
            if parent not in made:
                argv += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        argv += ["--ro-bind", path, path]
    argv += [
        "--perms", "0755", "--dir", "/home",
        "--bind", str(root / "work"), SANDBOX_HOME,
        "--perms", "0755", "--dir", "/opt/sandbox-agent",
        "--ro-bind", str(root / "agent.pyz"), AGENT_PATH,
        # the root directory itself (bwrap's tmpfs) read-only: in rootless mode the code's
        # uid owns it (it maps to the user that built it)
        "--remount-ro", "/",
        "--chdir", SANDBOX_HOME,
        "--clearenv",
        "--setenv", "HOME", SANDBOX_HOME,
        "--setenv", "USER", "sandbox",
        "--setenv", "PATH", f"{os.path.dirname(spec.python)}:/usr/local/bin:/usr/bin:/bin",
        "--setenv", "LANG", "C.UTF-8",
        "--setenv", "PYTHONUNBUFFERED", "1",
        "--setenv", "TERM", "xterm-256color",
    ]
    if spec.rootless_enter is not None:
        argv += ["--cap-drop", "ALL", "--seccomp", str(spec.seccomp_fd)]
    else:
        argv += [
            "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
            "--cap-add", "CAP_SETPCAP",
            # loaded just before bwrap runs setpriv: its own set-up is not filtered, everything
            # after is (no new user namespaces, keyring, io_uring, bpf, ptrace, mount, modules…)
            "--seccomp", str(spec.seccomp_fd),
            # bwrap needs root to build the mounts; the code runs as an unprivileged uid
            "setpriv", f"--reuid={spec.uid}", f"--regid={spec.uid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all",
        ]
    argv += [spec.python, "-s", AGENT_PATH]
    return argv


def host_root_links() -> tuple[tuple[str, str | None], ...]:
    """The host's :data:`ROOT_LINKS` as :attr:`BwrapSpec.root_links` (absent ones left out)."""
    found: list[tuple[str, str | None]] = []
    for link in ROOT_LINKS:
        target = os.path.join("/", link)
        if os.path.islink(target):
            found.append((target, os.readlink(target)))
        elif os.path.isdir(target):
            found.append((target, None))
    return tuple(found)


#: interpreter -> its prefixes, once known (each sandbox start would pay a Python start)
_PREFIXES: dict[str, tuple[str, ...]] = {}


def python_prefixes(python: str) -> tuple[str, ...]:
    """Directories the sandbox interpreter needs: its prefix (and base prefix for a venv)."""
    if python in _PREFIXES:
        return _PREFIXES[python]
    result = run([python, "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"], check=False)
    paths = [p for p in result.stdout.split() if p] if result.returncode == 0 else []
    if not paths:
        paths = [sysconfig.get_config_var("prefix") or "/usr"]
    out: list[str] = []
    for p in paths:
        real = os.path.realpath(p)
        if real not in out and real != "/usr":
            out.append(real)
    if result.returncode == 0:
        _PREFIXES[python] = tuple(out)
    return tuple(out)
