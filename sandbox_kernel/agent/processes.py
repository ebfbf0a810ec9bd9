"""The sandbox's own processes: shell commands of a cell, signals to the group, zombies.

Runs inside the sandbox, standard library only.
"""

from __future__ import annotations

import os
import subprocess

SHELL = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"


def shell_argv(cmd) -> list[str]:
    """The argv that runs ``cmd``: a string through the shell, a sequence as it is."""
    return [SHELL, "-c", cmd] if isinstance(cmd, str) else list(cmd)


def exit_status(returncode: int) -> int:
    """A shell's exit status for a child's return code (killed by signal N: 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def stop(proc: subprocess.Popen) -> None:
    """End an interrupted command: a moment to exit on its own (it got SIGINT too), then SIGKILL."""
    try:
        proc.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def signal_group(sig: int) -> None:
    """Send ``sig`` to every process of our process group.

    As PID 1 of a container (the Kubernetes backend's pod), the group is 1, and
    ``killpg(1, sig)`` is ``kill(-1, sig)``: every process in the PID namespace, including
    the exec'd ``attach`` that carries the kernel's stream, which then dies. There the
    members of group 1 are found in /proc and signalled one by one."""
    group = os.getpgrp()
    if group > 1:
        os.killpg(group, sig)
        return
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            # after "(comm)": state, ppid, pgrp, ...
            if int(stat[stat.rindex(")") + 2:].split()[2]) == group:
                os.kill(int(name), sig)
        except (OSError, ValueError, IndexError):
            continue


def reap_forgotten_children() -> None:
    """Reap exited children nobody will wait for (``os.fork()`` in a cell), so zombies do
    not use up the sandbox's process limit. Children of live ``subprocess.Popen`` objects
    are left to them: reaping those would lose their exit status."""
    try:
        with open(f"/proc/self/task/{os.getpid()}/children") as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        return
    zombies = []
    for pid in children:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    zombies.append(pid)
        except OSError:
            continue
    if not zombies:
        return
    import gc

    owned = {obj.pid for obj in gc.get_objects() if isinstance(obj, subprocess.Popen)}
    for pid in zombies:
        if pid not in owned:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

