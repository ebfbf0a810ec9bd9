"""How a local sandbox's process ended, in plain words (pure; the backend's ``exit_reason``)."""

from __future__ import annotations

import signal

_PLAIN = {
    "SIGSEGV": "segmentation fault",
    "SIGKILL": "killed",
    "SIGABRT": "aborted",
    "SIGBUS": "bus error",
    "SIGFPE": "arithmetic error",
    "SIGTERM": "terminated",
    "SIGILL": "illegal instruction",
}


def _signal_name(num: int) -> str:
    try:
        name = signal.Signals(num).name
    except ValueError:
        return f"signal {num}"
    plain = _PLAIN.get(name)
    return f"signal {name} ({plain})" if plain else f"signal {name}"


def describe_exit(returncode: int | None) -> str:
    """Plain words for how the sandbox's process ended (bubblewrap reports 128+N for signal N)."""
    if returncode is None:
        return "the sandbox stopped responding"
    if returncode < 0:
        return f"the sandbox process was killed by {_signal_name(-returncode)}"
    if returncode > 128:
        sig = returncode - 128
        if sig == signal.SIGKILL:
            return ("the sandbox process was killed by signal SIGKILL (killed; "
                    "out of memory, or killed from outside)")
        return f"the sandbox process was killed by {_signal_name(sig)}"
    return f"the sandbox process exited with status {returncode}"


def exit_reason(code: int | None, *, oom_killed: bool, memory_limit: str, stderr_tail: list[str]) -> str:
    """What the kernel tells the user when the sandbox's process exited with ``code``:
    :func:`describe_exit`, or out of memory when its cgroup says so (``oom_killed``, the
    limit ``memory_limit`` given as text), with the last line the sandbox machinery
    (bwrap, the interpreter) wrote when the exit was not clean."""
    reason = describe_exit(code)
    if code in (137, -9) and oom_killed:
        reason = (f"the sandbox ran out of memory (its limit is {memory_limit}, "
                  "c.LocalBackend.memory_limit) and was killed")
    if stderr_tail and code not in (0, None):
        # what the sandbox machinery (bwrap, the interpreter) said last, e.g. a missing path
        reason += f" ({stderr_tail[-1]})"
    return reason
