"""The local backend: one Linux network namespace + nftables + bubblewrap per kernel.

How a local sandbox is built (all undone by ``LocalBackend.stop``, and by
``sandbox-kernel gc`` when the kernel died without stopping it):

1. a named network namespace ``sbx-<id>`` (``ip netns add``) with only loopback up, and its
   state directory (``layout.py``);
2. an nftables table inside that namespace whose output chain drops everything that
   is not loopback or allowed by the policy; refused TCP gets a reset and everything
   else an ICMP "administratively prohibited", so code fails fast instead of hanging; each
   refused packet is logged and reported with the process that sent it (``enforcer.py``,
   ``enforcerlog.py``, ``nflog.py``, ``sockowner.py``);
3. when the policy allows anything outside, a userspace uplink (``slirp4netns``) gives
   the namespace a route out through the host's own sockets: no veth, no NAT rule and
   no ``ip_forward`` change on the host. Host loopback is not reachable through it
   (``uplink.py``);
4. the sandbox resolves names through the kernel's DNS proxy, which answers only names the
   policy allows (``dnsproxy.py``);
5. the agent runs under bubblewrap inside the namespace (``bwrap.py``): read-only system
   directories, a private ``/tmp``, a private writable working directory, its own user
   (``userns.py``), PID, IPC and UTS namespaces, no capabilities, an unprivileged uid, a
   seccomp filter (``seccomp.py``), limits (``limits.py``), and it dies with the kernel.
   How it ended is put in plain words by ``exits.py``; ``cleanup.py`` removes sandboxes.

Root mode (the kernel runs as root) creates named namespaces and cgroups; rootless mode (the
default when the kernel is not root, ``rootless.py``) makes the same sandbox as an unprivileged
user, with rlimits instead of cgroups. The code in the sandbox never runs as root.

The names below are imported on first use: the enforcer log's reader process
(``python -m sandbox_kernel.backends.local.enforcerlog``) starts with this package and must
start fast, without the backend's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

#: public name -> the module of this package that defines it
_EXPORTS = {
    "LocalBackend": "backend",
    "gc": "cleanup",
    "remove_sandbox": "cleanup",
    "describe_exit": "exits",
    "enforcer_record": "enforcer",
    "NETNS_DIR": "layout",
    "NETNS_PREFIX": "layout",
    "NFT_TABLE": "layout",
    "SANDBOX_RESOLVER": "layout",
    "SANDBOX_HOME": "layout",
    "AGENT_PATH": "layout",
    "UPLINK_CIDR": "uplink",
    "UPLINK_RANGES": "uplink",
}

__all__ = ["AGENT_PATH", "NETNS_DIR", "NETNS_PREFIX", "NFT_TABLE", "SANDBOX_HOME", "SANDBOX_RESOLVER",
           "UPLINK_CIDR", "UPLINK_RANGES", "LocalBackend", "describe_exit", "enforcer_record", "gc",
           "remove_sandbox"]

if TYPE_CHECKING:
    from .backend import LocalBackend
    from .cleanup import gc, remove_sandbox
    from .enforcer import enforcer_record
    from .exits import describe_exit
    from .layout import AGENT_PATH, NETNS_DIR, NETNS_PREFIX, NFT_TABLE, SANDBOX_HOME, SANDBOX_RESOLVER
    from .uplink import UPLINK_CIDR, UPLINK_RANGES


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
