"""Entry point of the agent (``python3 agent.pyz [serve --socket P | attach --socket P]``).

- no arguments: speak the protocol on stdin/stdout (the local backend);
- ``serve``: the pod's main process; clients attach through a unix socket;
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
    from . import channel as channels

    if mode == "attach":
        return channels.attach(socket_path)
    from .runner import Agent

    if mode == "serve":
        channel = channels.SocketChannel(socket_path)
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
