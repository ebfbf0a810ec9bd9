"""Helpers of the real-cluster suites (tests/kubernetes/test_k8s_cluster.py and
test_k8s_cluster_egress.py): the cells they run through a backend's transport, and whether
there are credentials (tested without a cluster in test_k8s_cluster_guard.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

#: first line of every probing cell: the agent's guard refuses at once what it believes the
#: policy forbids (it knows only what a kernel sends it, and these tests drive the backend
#: without one); switched off, the cell measures the network's enforcement alone
NO_GUARD = "import sandbox_agent.guard as _guard\n_guard.enabled = False\n"


def connect(host: str, port: int | str, timeout: float = 4) -> str:
    """A cell that prints ``connected`` or ``blocked <error>`` for a TCP connect (network only)."""
    return NO_GUARD + f"""
import socket
s = socket.socket(socket.AF_INET6 if ":" in {host!r} else socket.AF_INET)
s.settimeout({timeout})
try:
    s.connect(({host!r}, {int(port)}))
    print("connected")
except OSError as err:
    print("blocked", type(err).__name__)
finally:
    s.close()
"""


async def run_cell(transport, code, cell_id) -> tuple[str, dict]:
    """Run ``code`` through the agent's transport: its stdout and stderr, and its ``done`` frame."""
    await transport.send({"type": "execute", "id": cell_id, "code": code, "silent": False,
                          "store_history": True, "user_expressions": {}, "allow_stdin": False})
    out = []
    while True:
        frame = await asyncio.wait_for(transport.recv(), 60)
        assert frame is not None
        if frame["type"] == "stream":
            out.append(frame["text"])
        if frame["type"] == "done":
            return "".join(out), frame


def credentials_present(environ=os.environ) -> bool:
    """A kubeconfig file that exists (KUBECONFIG may list several), ~/.kube/config, or
    in-cluster credentials. A KUBECONFIG naming no existing file is none: the suite would
    otherwise start and fail on credentials instead of saying why it cannot run."""
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return True
    if environ.get("KUBECONFIG"):
        return any(Path(p).expanduser().is_file() for p in environ["KUBECONFIG"].split(os.pathsep) if p)
    return Path("~/.kube/config").expanduser().is_file()
