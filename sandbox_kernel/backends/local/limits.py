"""Resource limits of a local sandbox: memory and process count (cgroups), disk (tmpfs).

A cgroup per sandbox holds every process of the sandbox: the memory limit turns a
runaway allocation into an OOM kill that the kernel reports as "out of memory", and the
pids limit stops a fork bomb. Works with cgroup v2 (unified) and with v1 (``memory`` and
``pids`` hierarchies). Where cgroups cannot be written, ``SandboxCgroup.create`` says so
and the backend refuses to start unless limits are switched off explicitly.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "sandbox-kernel"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"512M"``, ``"2G"``, ``"1.5GiB"``, ``1048576`` → bytes (0 means no limit)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size (use e.g. 512M, 2G, or 0 for no limit)")
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * 1024 ** " kmgt".index(unit or " "))


def format_size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}".replace(".0 ", " ")
        size /= 1024
    return f"{size} B"


def unified() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


class SandboxCgroup:
    """The cgroup(s) of one sandbox. Created by the local backend before the agent starts."""

    def __init__(self, sandbox_id: str):
        self.sandbox_id = sandbox_id
        if unified():
            self.dirs = {"memory": CGROUP_ROOT / PARENT / sandbox_id}
            self.dirs["pids"] = self.dirs["memory"]
        else:
            self.dirs = {c: CGROUP_ROOT / c / PARENT / sandbox_id for c in ("memory", "pids")}

    def create(self, memory: int, pids: int) -> None:
        """Make the cgroups and set the limits (0 = no limit). Raises OSError if it can't."""
        if unified():
            parent = CGROUP_ROOT / PARENT
            parent.mkdir(exist_ok=True)
            # delegate the controllers to our subtree (memory, pids)
            wanted = {"memory", "pids"} & set((CGROUP_ROOT / "cgroup.controllers").read_text().split())
            try:
                (CGROUP_ROOT / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
                (parent / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
            except OSError:
                pass
        for directory in set(self.dirs.values()):
            directory.mkdir(parents=True, exist_ok=True)
        if unified():
            if memory:
                (self.dirs["memory"] / "memory.max").write_text(str(memory))
                swap = self.dirs["memory"] / "memory.swap.max"
                if swap.exists():
                    swap.write_text("0")
            if pids:
                (self.dirs["pids"] / "pids.max").write_text(str(pids))
        else:
            if memory:
                (self.dirs["memory"] / "memory.limit_in_bytes").write_text(str(memory))
                swap = self.dirs["memory"] / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    try:
                        swap.write_text(str(memory))
                    except OSError:
                        pass
            if pids:
                (self.dirs["pids"] / "pids.max").write_text(str(pids))

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a new process writes its pid to (in the child, before exec)."""
        return [str(d / "cgroup.procs") for d in dict.fromkeys(self.dirs.values())]

    def oom_killed(self) -> bool:
        """Whether the kernel OOM-killed a process of this sandbox."""
        memory = self.dirs["memory"]
        try:
            if unified():
                events = (memory / "memory.events").read_text()
                return _field(events, "oom_kill") > 0
            control = (memory / "memory.oom_control").read_text()
            if "oom_kill " in control:
                return _field(control, "oom_kill") > 0
            return int((memory / "memory.failcnt").read_text()) > 0
        except (OSError, ValueError):
            return False

    def pids_exhausted(self) -> bool:
        try:
            events = (self.dirs["pids"] / "pids.events").read_text()
            return _field(events, "max") > 0
        except (OSError, ValueError):
            return False

    def remove(self) -> None:
        """Kill what is left and remove the cgroups (idempotent)."""
        for directory in dict.fromkeys(self.dirs.values()):
            remove_cgroup(directory)


def remove_cgroup(directory: Path) -> bool:
    if not directory.exists():
        return False
    procs = directory / "cgroup.procs"
    for _ in range(50):
        try:
            pids = [int(p) for p in procs.read_text().split()]
        except OSError:
            pids = []
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        try:
            directory.rmdir()
            return True
        except OSError:
            time.sleep(0.02)
    return False


def leftover_cgroups() -> dict[str, list[Path]]:
    """sandbox id → its cgroup directories (for gc)."""
    found: dict[str, list[Path]] = {}
    parents = [CGROUP_ROOT / PARENT] if unified() else [CGROUP_ROOT / c / PARENT for c in ("memory", "pids")]
    for parent in parents:
        if parent.exists():
            for child in parent.iterdir():
                if child.is_dir():
                    found.setdefault(child.name, []).append(child)
    return found


def _field(text: str, name: str) -> int:
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == name:
            return int(value)
    return 0


def rootless_rlimits(memory: int, pids: int, work: int) -> list[str]:
    """``prlimit`` options for a sandbox without cgroups (rootless mode); 0 = no limit.

    - ``pids`` → ``RLIMIT_NPROC``: the sandbox's own user namespace records it as its ceiling,
      so it counts the sandbox's processes and threads only (not the user's others);
    - ``memory`` → ``RLIMIT_DATA``: the private writable memory each process may map (heap,
      anonymous mappings, thread stacks at their full size), per process rather than per sandbox.
      Unlike ``RLIMIT_AS`` it leaves address space reserved without access (allocators' and
      runtimes' reservations) alone, and an allocation beyond it fails (``MemoryError``) instead
      of killing the process;
    - ``work`` → ``RLIMIT_FSIZE``: the largest file a process may write (the working directory is
      a plain directory: its total is not bounded).
    """
    options = []
    if pids:
        options.append(f"--nproc={pids}")
    if memory:
        options.append(f"--data={memory}")
    if work:
        options.append(f"--fsize={work}")
    return options


def rootless_summary(memory: int, pids: int, tmp: int, work: int) -> list[str]:
    """What bounds a rootless sandbox, and what it lacks without cgroups (for ``doctor``)."""
    def size(n: int) -> str:
        return format_size(n) if n else "no limit"

    return [
        f"processes: {pids or 'no limit'} per sandbox (RLIMIT_NPROC, counted in its user namespace)",
        f"memory: {size(memory)} per process (RLIMIT_DATA; an allocation beyond fails with MemoryError), "
        "not per sandbox",
        f"/tmp: {size(tmp)} (tmpfs)",
        f"working directory: a plain directory on this disk, each file at most {size(work)} (RLIMIT_FSIZE); "
        "its total is not bounded",
        "missing without root: a memory limit for the whole sandbox and its out-of-memory report, a "
        "size-bounded working directory, CPU accounting (cgroups are not delegated to this user; "
        "root mode has them)",
    ]
