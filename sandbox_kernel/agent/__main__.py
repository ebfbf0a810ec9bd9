"""Entry point of the agent (``python3 agent.pyz [serve --socket P [--orphan-exit S] | attach --socket P]``).

- no arguments: speak the protocol on stdin/stdout (the local backend);
- ``serve``: the pod's main process; clients attach through a unix socket; with
  ``--orphan-exit S`` it exits after S seconds with no client attached (its kernel died
  without stopping it), so the pod ends and frees the user's quota and its node;
- ``attach``: a thin client for ``kubectl exec``-style streams.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    mode = argv[0] if argv else "stdio"
    socket_path = "/tmp/.sandbox-agent.sock"
    if "--socket" in argv:
        socket_path = argv[argv.index("--socket") + 1]
    orphan_exit = 0.0
    if "--orphan-exit" in argv:
        try:
            orphan_exit = float(argv[argv.index("--orphan-exit") + 1])
        except (IndexError, ValueError):
            print("agent.pyz: --orphan-exit needs a number of seconds", file=sys.stderr)
            return 2
    from . import channel as channels

    if mode == "attach":
        return channels.attach(socket_path)
    from .runner import Agent

    if mode == "serve":
        # the pod's log: fd 2 as it is now (the agent then captures fds 1 and 2 for cells)
        channel = channels.SocketChannel(socket_path, orphan_exit=orphan_exit, log_fd=os.dup(2))
    elif mode == "stdio":
        # the protocol keeps the original stdin/stdout; cells get fresh pipes on fds 0-2
        fd_in, fd_out = os.dup(0), os.dup(1)
        channel = channels.StdioChannel(fd_in, fd_out)
    else:
        print(f"usage: agent.pyz [serve|attach] [--socket PATH] (got {mode!r})", file=sys.stderr)
        return 2
    Agent(channel).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
