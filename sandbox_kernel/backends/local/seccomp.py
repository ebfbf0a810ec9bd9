"""The local sandbox's seccomp filter, built with libseccomp (through ctypes).

Called by the local backend (``backends/local/backend.py``) when it starts a sandbox: bubblewrap
loads the program with ``--seccomp FD`` just before it runs the agent, so bubblewrap's own
set-up (namespaces, mounts) is not filtered and everything the sandbox runs is.

The filter allows every system call except the kernel interfaces a notebook does not need
and that carry most of the kernel's attack surface from an unprivileged process; each of
those fails with EPERM (code sees an ordinary "Operation not permitted"):

* new user namespaces: ``unshare`` and ``clone`` with ``CLONE_NEWUSER`` (``clone3`` passes its
  flags in memory a filter cannot read, so it fails with ENOSYS and the C library falls back
  to ``clone``, which is filtered);
* the kernel keyring (``keyctl``, ``add_key``, ``request_key``), io_uring, ``bpf``,
  ``perf_event_open``, ``userfaultfd``;
* ``ptrace`` and ``process_vm_readv/writev`` (seccomp cannot tell a child from any other
  process, so debuggers and ``strace`` do not work in the sandbox);
* kexec and module loading; ``mount``, ``umount2``, ``pivot_root`` and the new mount API.

Only the machine's native architecture is allowed: a system call made through another ABI
(``int 0x80`` on x86-64) kills the process. libseccomp generates the BPF program; we only
list the rules.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from functools import lru_cache

from ...errors import SandboxStartError

CLONE_NEWUSER = 0x10000000

#: system calls that fail with EPERM whatever their arguments
DENIED = (
    "keyctl", "add_key", "request_key",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "bpf", "perf_event_open", "userfaultfd",
    "ptrace", "process_vm_readv", "process_vm_writev",
    "kexec_load", "kexec_file_load",
    "init_module", "finit_module", "delete_module",
    "mount", "umount2", "pivot_root",
    "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
)
#: system calls that fail with EPERM when their flags (first argument) ask for a user namespace
DENIED_WITH_NEWUSER = ("unshare", "clone")
#: system calls that fail with ENOSYS (the caller falls back to a filtered one)
UNAVAILABLE = ("clone3",)

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_MASKED_EQ = 7


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def available() -> bool:
    """Whether libseccomp can be loaded (checked by the local backend's ``check``)."""
    try:
        _library()
    except SandboxStartError:
        return False
    return True


def _library() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        raise SandboxStartError(
            "the sandbox's seccomp filter needs libseccomp (apt-get install libseccomp2)") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


@lru_cache(maxsize=1)
def filter_program() -> bytes:
    """The BPF program (``struct sock_filter`` array) bubblewrap loads with ``--seccomp``."""
    lib = _library()
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        raise SandboxStartError("libseccomp could not start a filter")
    try:
        def add(name: str, action: int, *conditions: _ArgCmp) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:  # not a system call on this architecture: nothing to deny
                return
            array = (_ArgCmp * len(conditions))(*conditions) if conditions else None
            rc = lib.seccomp_rule_add_array(ctx, action, nr, len(conditions), array)
            if rc != 0:
                raise SandboxStartError(f"libseccomp refused the rule for {name}: {os.strerror(-rc)}")

        for name in DENIED:
            add(name, _act_errno(errno.EPERM))
        newuser = _ArgCmp(0, _SCMP_CMP_MASKED_EQ, CLONE_NEWUSER, CLONE_NEWUSER)
        for name in DENIED_WITH_NEWUSER:
            add(name, _act_errno(errno.EPERM), newuser)
        for name in UNAVAILABLE:
            add(name, _act_errno(errno.ENOSYS))
        read_fd, write_fd = os.pipe()
        try:
            # a filter is a few hundred bytes: it fits in the pipe's buffer
            rc = lib.seccomp_export_bpf(ctx, write_fd)
            os.close(write_fd)
            write_fd = -1
            if rc != 0:
                raise SandboxStartError(f"libseccomp could not export the filter: {os.strerror(-rc)}")
            chunks = []
            while chunk := os.read(read_fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(read_fd)
            if write_fd >= 0:
                os.close(write_fd)
    finally:
        lib.seccomp_release(ctx)


def filter_fd() -> int:
    """A new file descriptor, positioned at the start, holding :func:`filter_program`; the
    caller passes it to bubblewrap and closes it."""
    fd = os.memfd_create("sandbox-seccomp", 0)
    os.write(fd, filter_program())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd
