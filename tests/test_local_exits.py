"""How the local sandbox's process ended, in words (backends/local/exits.py, pure)."""

from __future__ import annotations

from sandbox_kernel.backends.local.exits import describe_exit, exit_reason


def test_describe_exit():
    assert describe_exit(None) == "the sandbox stopped responding"
    assert describe_exit(0) == "the sandbox process exited with status 0"
    assert describe_exit(3) == "the sandbox process exited with status 3"
    # negative: killed by the signal; bubblewrap reports 128+N
    assert describe_exit(-11) == "the sandbox process was killed by signal SIGSEGV (segmentation fault)"
    assert describe_exit(128 + 15) == "the sandbox process was killed by signal SIGTERM (terminated)"
    assert describe_exit(137) == ("the sandbox process was killed by signal SIGKILL (killed; "
                                  "out of memory, or killed from outside)")
    assert describe_exit(128 + 10) == "the sandbox process was killed by signal SIGUSR1"
    assert describe_exit(-200) == "the sandbox process was killed by signal 200"


def test_exit_reason_names_the_memory_limit_only_when_the_cgroup_says_so():
    oom = exit_reason(137, oom_killed=True, memory_limit="2G", stderr_tail=[])
    assert oom == "the sandbox ran out of memory (its limit is 2G, c.LocalBackend.memory_limit) and was killed"
    assert exit_reason(137, oom_killed=False, memory_limit="2G", stderr_tail=[]) == describe_exit(137)
    assert exit_reason(1, oom_killed=True, memory_limit="2G", stderr_tail=[]) == describe_exit(1)


def test_exit_reason_quotes_the_last_line_of_a_failed_start():
    tail = ["bwrap: setting up uid map: Permission denied", "bwrap: Can't find source path /nix: No such file"]
    assert exit_reason(1, oom_killed=False, memory_limit="", stderr_tail=tail) == (
        "the sandbox process exited with status 1 (bwrap: Can't find source path /nix: No such file)")
    # a clean exit, or none seen, quotes nothing
    assert exit_reason(0, oom_killed=False, memory_limit="", stderr_tail=tail) == describe_exit(0)
    assert exit_reason(None, oom_killed=False, memory_limit="", stderr_tail=tail) == describe_exit(None)
