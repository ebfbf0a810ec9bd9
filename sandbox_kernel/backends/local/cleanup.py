"""Removing local sandboxes: one (:func:`remove_sandbox`, the backend's ``stop``) and every one
whose kernel is gone (:func:`gc`: ``sandbox-kernel gc`` and each local kernel's start)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

from ...config import env_default
from . import limits
from .layout import DEFAULT_STATE_DIR, NETNS_DIR, NETNS_PREFIX, netns_name, proc_start_time, run


def remove_sandbox(sandbox_id: str, state_dir: str) -> list[str]:
    """Kill every process in the sandbox's namespace, delete the namespace and its state.

    Idempotent. Returns what was removed (for ``sandbox-kernel gc``).
    """
    removed = []
    netns = netns_name(sandbox_id)
    if (NETNS_DIR / netns).exists():
        pids = run(["ip", "netns", "pids", netns], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        result = run(["ip", "netns", "delete", netns], check=False)
        if result.returncode == 0:
            removed.append(f"network namespace {netns}")
            if pids:
                removed.append(f"{len(pids)} process(es) in {netns}")
    root = Path(state_dir) / sandbox_id
    if root.exists():
        if os.path.ismount(root / "work"):
            run(["umount", "-l", str(root / "work")], check=False)
        shutil.rmtree(root, ignore_errors=True)
        removed.append(f"state directory {root}")
    for directory in limits.leftover_cgroups().get(sandbox_id, []):
        if limits.remove_cgroup(directory):
            removed.append(f"cgroup {directory}")
    return removed


def _owner_alive(owner_file: Path) -> bool:
    try:
        owner = json.loads(owner_file.read_text())
        pid = int(owner["kernel_pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return proc_start_time(pid) is not None and proc_start_time(pid) == owner.get("kernel_pid_start")


def _netns_in_use(sandbox_id: str) -> bool:
    """Processes run in the namespace, or it was made in the last minute (a kernel configured
    with another state directory may be creating it: no process is in it yet)."""
    netns = netns_name(sandbox_id)
    try:
        if time.time() - (NETNS_DIR / netns).lstat().st_mtime < 60:
            return True
    except OSError:
        return False
    return bool(run(["ip", "netns", "pids", netns], check=False).stdout.split())


def _cgroups_in_use(directories: list[Path]) -> bool:
    """A sandbox's cgroup holds processes or was made in the last minute (being set up)."""
    for directory in directories:
        try:
            if time.time() - directory.stat().st_mtime < 60 or (directory / "cgroup.procs").read_text().split():
                return True
        except OSError:
            continue
    return False


def gc(state_dir: str | None = None) -> list[str]:
    """Remove local sandboxes whose kernel process is gone. Called by ``sandbox-kernel gc``
    and by every local kernel when it starts."""
    state = Path(state_dir or env_default("SANDBOX_KERNEL_STATE_DIR", DEFAULT_STATE_DIR))
    ids: set[str] = set()
    privileged = os.geteuid() == 0  # rootless kernels own nothing but their state directory
    if NETNS_DIR.exists() and privileged:
        ids |= {p.name[len(NETNS_PREFIX):] for p in NETNS_DIR.iterdir() if p.name.startswith(NETNS_PREFIX)}
    if state.exists():
        ids |= {p.name for p in state.iterdir() if p.is_dir()}
    cgroups = limits.leftover_cgroups() if privileged else {}
    ids |= set(cgroups)
    removed: list[str] = []
    for sandbox_id in sorted(ids):
        owner = state / sandbox_id / "owner.json"
        if owner.exists() and _owner_alive(owner):
            continue
        if not owner.exists() and (state / sandbox_id).exists():
            # a sandbox being created right now has its directory before its owner record
            try:
                if time.time() - (state / sandbox_id).stat().st_mtime < 60:
                    continue
            except OSError:
                continue
        if not (state / sandbox_id).exists() and (_netns_in_use(sandbox_id) or _cgroups_in_use(cgroups.get(sandbox_id, []))):
            # no record here, but processes run in it: a kernel configured with another state
            # directory owns it (its own gc, or its agent's idle exit, ends it), not us
            continue
        removed += remove_sandbox(sandbox_id, str(state))
    return removed
