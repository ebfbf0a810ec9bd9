"""The local backend: one Linux network namespace + nftables + bubblewrap per kernel.

How a local sandbox is built (all undone by :meth:`LocalBackend.stop`, and by
``sandbox-kernel gc`` when the kernel died without stopping it):

1. a named network namespace ``sbx-<id>`` (``ip netns add``) with only loopback up;
2. an nftables table inside that namespace whose output chain drops everything that
   is not loopback or allowed by the policy; refused TCP gets a reset and everything
   else an ICMP "administratively prohibited", so code fails fast instead of hanging;
3. when the policy allows anything outside, a userspace uplink (``slirp4netns``) gives
   the namespace a route out through the host's own sockets: no veth, no NAT rule and
   no ``ip_forward`` change on the host. Host loopback is not reachable through it;
4. the agent runs under bubblewrap inside the namespace: read-only system directories,
   a private ``/tmp``, a private writable working directory, its own user (``userns.py``),
   PID, IPC and UTS namespaces, no capabilities, an unprivileged uid, a seccomp filter
   (``seccomp.py``), and it dies with the kernel.

Root mode (the kernel runs as root) creates named namespaces and cgroups; rootless mode (the
default when the kernel is not root, ``rootless.py``) makes the same sandbox as an unprivileged
user, with rlimits instead of cgroups. The code in the sandbox never runs as root.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from traitlets import Bool, Enum, Integer, List, Unicode, default

from ..agent import protocol
from ..agent.bundle import build_pyz
from ..config import env_default
from ..errors import IsolationUnavailable, PolicyError, SandboxStartError
from ..policy.compile_nftables import LOG_PREFIX_ACCEPTED, compile_nftables
from ..policy.destinations import AddressScreen
from ..policy.resolve import resolve_policy
from . import limits, nflog, rootless, seccomp, sockowner, userns
from .base import Backend, LineTransport, Progress, SandboxInfo, Transport
from .dnsproxy import DnsProxy, upstream_from_resolv_conf
from .enforcerlog import EnforcerLogProcess

NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "sbx-"
NFT_TABLE = "sandbox_kernel"
#: the sandbox's resolver: the kernel's DNS proxy, listening on the sandbox's own loopback
SANDBOX_RESOLVER = "127.0.0.53"
#: most lookups of a refused packet's sender a second (sockowner.py); beyond, notices name no process
OWNER_LOOKUPS_PER_S = 200
SANDBOX_HOME = "/home/sandbox"
AGENT_PATH = "/opt/sandbox-agent/agent.pyz"
#: the uplink's own networks (slirp4netns: gateway .2 = the host, resolver .3, the sandbox .100;
#: IPv6 fd00::/64 likewise). The kernel needs none of them from inside the sandbox (its DNS
#: proxy forwards from the host side), so no policy may open them: they are always blocked.
UPLINK_CIDR = "10.0.2.0/24"
UPLINK_RANGES = {
    UPLINK_CIDR: "the sandbox's uplink: slirp4netns's gateway to the host and its DNS forwarder",
    "fd00::/64": "the sandbox's IPv6 uplink (slirp4netns)",
}


def _signal_name(num: int) -> str:
    try:
        name = signal.Signals(num).name
    except ValueError:
        return f"signal {num}"
    plain = {
        "SIGSEGV": "segmentation fault",
        "SIGKILL": "killed",
        "SIGABRT": "aborted",
        "SIGBUS": "bus error",
        "SIGFPE": "arithmetic error",
        "SIGTERM": "terminated",
        "SIGILL": "illegal instruction",
    }.get(name)
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


def _run(argv: list[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=input, capture_output=True, text=True, check=check, timeout=30)


class LocalBackend(Backend):
    """Sandboxes on this machine: netns + nftables + bubblewrap."""

    name = "local"
    reserved_ranges = UPLINK_RANGES

    state_dir = Unicode(
        help="Where sandbox state lives (owner records, working directories). Default: "
        "/run/sandbox-kernel; rootless: $XDG_RUNTIME_DIR/sandbox-kernel (or /tmp/sandbox-kernel-UID/"
        "sandbox-kernel). Env: SANDBOX_KERNEL_STATE_DIR."
    ).tag(config=True)

    @default("state_dir")
    def _state_dir_default(self):
        if self.rootless:
            runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/sandbox-kernel-{os.geteuid()}"
            return env_default("SANDBOX_KERNEL_STATE_DIR", os.path.join(runtime, "sandbox-kernel"))
        return env_default("SANDBOX_KERNEL_STATE_DIR", "/run/sandbox-kernel")

    rootless = Bool(
        help="Run without root: the kernel creates each sandbox's user and network namespaces as "
        "its own user, programs nftables and reads NFLOG inside them, and starts the agent under "
        "bubblewrap in a further user namespace. Default: on when the kernel does not run as root "
        "(scripts/lab.sh runs Jupyter so), off as root (root mode, with cgroups). Without cgroups "
        "the limits are rlimits: pids_limit is RLIMIT_NPROC counted in the sandbox's user namespace, "
        "memory_limit is RLIMIT_DATA per process, work_size bounds each file (RLIMIT_FSIZE), not the "
        "working directory's total; allowlists need a tun device the user may open for slirp4netns "
        "(/dev/net/tun at 0666, or tun_device), else only deny is enforced. Env: "
        "SANDBOX_KERNEL_ROOTLESS (true/false)."
    ).tag(config=True)

    tun_device = Unicode(
        help="Rootless mode, when /dev/net/tun is closed to the Jupyter user: a tun device node "
        "the administrator made for that user (mknod PATH c 10 200; chown USER PATH), which "
        "slirp4netns then uses. Env: SANDBOX_KERNEL_TUN_DEVICE."
    ).tag(config=True)

    @default("tun_device")
    def _tun_device_default(self):
        return env_default("SANDBOX_KERNEL_TUN_DEVICE", "")

    @default("rootless")
    def _rootless_default(self):
        value = env_default("SANDBOX_KERNEL_ROOTLESS", "")
        if not value:
            return os.geteuid() != 0
        return value.lower() in ("1", "true", "yes")

    python = Unicode(
        help="The Python interpreter that runs the agent inside the sandbox (its install "
        "prefix is bound read-only). Default: the interpreter running the kernel. "
        "Env: SANDBOX_KERNEL_PYTHON."
    ).tag(config=True)

    @default("python")
    def _python_default(self):
        return env_default("SANDBOX_KERNEL_PYTHON", sys.executable)

    uid = Integer(
        help="The unprivileged uid (and gid) code runs as in the sandbox. Env: SANDBOX_KERNEL_UID."
    ).tag(config=True)

    @default("uid")
    def _uid_default(self):
        return int(env_default("SANDBOX_KERNEL_UID", 65534))

    extra_ro_binds = List(
        Unicode(),
        help="Extra host paths bound read-only into the sandbox at the same path "
        "(e.g. a shared dataset directory).",
    ).tag(config=True)

    start_timeout = Integer(
        30, help="Seconds to wait for the agent to start in a new sandbox."
    ).tag(config=True)

    nflog_group = Integer(
        42, help="NFLOG group the sandbox's nftables rules log refused packets to."
    ).tag(config=True)

    memory_limit = Unicode(
        help="Memory limit of a sandbox (all its processes), e.g. '2G'; '0' for none. A cell "
        "that exceeds it is killed and reported as out of memory. Env: SANDBOX_KERNEL_MEMORY_LIMIT."
    ).tag(config=True)

    @default("memory_limit")
    def _memory_limit_default(self):
        return env_default("SANDBOX_KERNEL_MEMORY_LIMIT", "2G")

    pids_limit = Integer(
        help="Most processes and threads a sandbox may have (stops fork bombs); 0 for none. "
        "Env: SANDBOX_KERNEL_PIDS_LIMIT."
    ).tag(config=True)

    @default("pids_limit")
    def _pids_limit_default(self):
        return int(env_default("SANDBOX_KERNEL_PIDS_LIMIT", 512))

    tmp_size = Unicode(
        help="Size of the sandbox's private /tmp (memory-backed). Env: SANDBOX_KERNEL_TMP_SIZE."
    ).tag(config=True)

    @default("tmp_size")
    def _tmp_size_default(self):
        return env_default("SANDBOX_KERNEL_TMP_SIZE", "256M")

    work_size = Unicode(
        help="Size of the sandbox's working directory /home/sandbox (memory-backed, kept across "
        "sandbox restarts of one kernel); '0' for a plain directory on the host's disk, unbounded. "
        "Env: SANDBOX_KERNEL_WORK_SIZE."
    ).tag(config=True)

    @default("work_size")
    def _work_size_default(self):
        return env_default("SANDBOX_KERNEL_WORK_SIZE", "1G")

    upstream_dns = Unicode(
        help="The resolver the sandbox's DNS proxy forwards allowed names to (ip or ip:port). "
        "Default: the host's first nameserver in /etc/resolv.conf. Env: SANDBOX_KERNEL_UPSTREAM_DNS."
    ).tag(config=True)

    @default("upstream_dns")
    def _upstream_dns_default(self):
        return env_default("SANDBOX_KERNEL_UPSTREAM_DNS", upstream_from_resolv_conf() or "")

    refuse_with = Enum(
        ["reject", "drop"], default_value="reject",
        help="How refused packets are answered: 'reject' (TCP reset / ICMP admin-prohibited, "
        "code fails at once) or 'drop' (silence, as a Kubernetes NetworkPolicy does; the "
        "watcher then reports the connection after its threshold). Env: SANDBOX_KERNEL_REFUSE_WITH.",
    ).tag(config=True)

    @default("refuse_with")
    def _refuse_with_default(self):
        value = env_default("SANDBOX_KERNEL_REFUSE_WITH", "reject")
        return value if value in ("reject", "drop") else "reject"

    @property
    def always_blocked(self) -> list[str]:
        """The ceiling's ranges (set by the kernel; else the default ones) and the uplink's own."""
        return [*(self._always_blocked or _default_blocked()), *UPLINK_RANGES]

    @always_blocked.setter
    def always_blocked(self, ranges: list[str] | None) -> None:
        self._always_blocked = list(ranges) if ranges else None

    def __init__(self, **kwargs: Any):
        self._always_blocked: list[str] | None = None
        super().__init__(**kwargs)
        self._sandbox_id: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr_task: asyncio.Task | None = None
        self._stderr_tail: list[str] = []
        self._info: SandboxInfo | None = None
        self._applied: dict[str, Any] = {}
        self._uplink: subprocess.Popen | None = None
        self._nflog = None
        #: (protocol, src, sport) -> (when, process) of refused packets' senders, and the lookup budget
        self._owners: dict[tuple, tuple[float, dict | None]] = {}
        self._owner_budget: tuple[float, int] = (0.0, 0)
        self._diag: sockowner.SocketDiag | None = None
        self._nflog_sock = None
        self._refresh: asyncio.Task | None = None
        self._dns: DnsProxy | None = None
        self._policy: Any = None
        self._cgroup: limits.SandboxCgroup | None = None
        self._uplink_exit_fd: int | None = None
        #: wildcard set name -> addresses the DNS proxy opened in it
        self._learned: dict[str, set[str]] = {}
        #: rootless mode: the namespaces the kernel's own user created
        self._ns: rootless.RootlessNamespaces | None = None
        #: learn mode: log allowed connections too (sandbox_kernel/learn.py sets it, then re-applies)
        self.log_accepted = False

    # -- checks -------------------------------------------------------------------
    def check(self) -> None:
        missing = []
        if not sys.platform.startswith("linux"):
            raise IsolationUnavailable([f"the local backend needs Linux (this is {sys.platform})"])
        if os.geteuid() != 0 and not self.rootless:
            missing.append(
                "root privileges: the kernel creates network namespaces and nftables rules "
                "(c.LocalBackend.rootless is off: turn it on, run Jupyter as root, or use the kubernetes backend)"
            )
        tools = [("ip", "iproute2"), ("nft", "nftables"), ("bwrap", "bubblewrap"), ("nsenter", "util-linux"),
                 ("unshare", "util-linux"), ("slirp4netns", "slirp4netns")]
        if self.rootless:
            tools.append(("prlimit", "util-linux"))
        else:
            tools.append(("setpriv", "util-linux"))
        for tool, package in tools:
            if shutil.which(tool) is None:
                missing.append(f"the `{tool}` command: apt-get install {package}")
        if self.rootless and not missing and shutil.which("unshare"):
            probe = _run(["unshare", "--user", "--map-root-user", "--net", "true"], check=False)
            if probe.returncode != 0:
                missing.append("unprivileged user namespaces (rootless mode creates one per sandbox): "
                               f"`unshare --user --net` said: {probe.stderr.strip()} (sysctl "
                               "user.max_user_namespaces, kernel.apparmor_restrict_unprivileged_userns)")
        if not seccomp.available():
            missing.append("libseccomp, which builds the sandbox's seccomp filter: apt-get install libseccomp2")
        if not os.path.exists(self.python):
            missing.append(f"the sandbox interpreter {self.python} (c.LocalBackend.python)")
        if missing:
            raise IsolationUnavailable(missing)

    # -- lifecycle ----------------------------------------------------------------
    @property
    def netns(self) -> str | None:
        return f"{NETNS_PREFIX}{self._sandbox_id}" if self._sandbox_id else None

    def _dir(self) -> Path:
        assert self._sandbox_id
        return Path(self.state_dir) / self._sandbox_id

    async def start(self, kernel_id: str, policy: Any, progress: Progress) -> SandboxInfo:
        self.check()
        self._sandbox_id = secrets.token_hex(4)
        started = time.monotonic()
        try:
            await asyncio.to_thread(self._create, kernel_id, policy)
            self._listen_enforcer_log()
            await self._start_dns(policy)
            await self._spawn_agent()
            if isinstance(self._nflog, EnforcerLogProcess):  # while the agent starts
                await self._nflog.wait_ready()
        except BaseException as err:
            await self.stop()
            if isinstance(err, (SandboxStartError, PolicyError)):
                raise
            if isinstance(err, subprocess.CalledProcessError):
                raise SandboxStartError(
                    f"creating the local sandbox failed: `{' '.join(err.cmd)}` said: "
                    f"{(err.stderr or '').strip() or err.returncode}"
                ) from None
            raise
        self._schedule_refresh(policy)
        self._info = SandboxInfo(
            backend=self.name,
            sandbox_id=self._sandbox_id,
            details={
                "netns": self._netns_path if self._ns is not None else self.netns,
                "enforcer": "nftables",
                "workdir": str(self._dir() / "work"),
                "start_ms": round((time.monotonic() - started) * 1000, 1),
            },
        )
        return self._info

    def _create(self, kernel_id: str, policy: Any) -> None:
        """Namespace, rules, state directory (runs in a worker thread)."""
        root = self._dir()
        Path(self.state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)  # host users must not walk into sandboxes' files
        (root / "work").mkdir(parents=True)
        work_size = 0 if self.rootless else limits.parse_size(self.work_size)
        if work_size:
            # bounded: a cell filling its disk fills this, not the host's
            _run(["mount", "-t", "tmpfs", "-o", f"size={work_size},mode=0755,nosuid,nodev",
                  "sandbox-work", str(root / "work")])
        if not self.rootless:  # rootless: the kernel's user is the sandbox's uid outside
            os.chown(root / "work", self.uid, self.uid)
        # 0755: bwrap enters it (as root without capabilities) after dropping privileges
        os.chmod(root / "work", 0o755)
        (root / "agent.pyz").write_bytes(build_pyz())
        (root / "owner.json").write_text(json.dumps({
            "kernel_pid": os.getpid(),
            "kernel_pid_start": _proc_start_time(os.getpid()),
            "kernel_id": kernel_id,
            "created": time.time(),
        }))
        # the sandbox gets its own resolv.conf: the host's may point at a loopback resolver
        (root / "resolv.conf").write_text(
            f"# written by sandbox-kernel: the kernel's DNS proxy, which only answers for\n"
            f"# names the egress policy allows\nnameserver {SANDBOX_RESOLVER}\noptions timeout:2 attempts:1\n")
        self._cgroup = limits.SandboxCgroup(self._sandbox_id)
        memory, pids = limits.parse_size(self.memory_limit), self.pids_limit
        if self.rootless:  # cgroups are not delegated to an unprivileged user here
            memory = pids = 0
        if memory or pids:
            try:
                self._cgroup.create(memory, pids)
            except OSError as err:
                raise SandboxStartError(
                    f"cannot set the sandbox's resource limits ({err}); to run without them set "
                    "c.LocalBackend.memory_limit = '0' and c.LocalBackend.pids_limit = 0"
                ) from None
        else:
            self._cgroup = None
        if self.rootless:
            self._ns = rootless.RootlessNamespaces()
            self._ns.create()
        else:
            _run(["ip", "netns", "add", self.netns])
        _run([*self._in_netns(), "ip", "link", "set", "lo", "up"])
        if self._ns is not None:
            self._ns.prepare(self.nflog_group)  # the sockets served from the host side, at once
        # rules first: the uplink must never be up without the policy in force
        self._apply_rules(self._ruleset(policy))
        self._start_uplink()
        if self._ns is not None and self._uplink is None and policy is not None and policy.mode == "allowlist":
            raise SandboxStartError(
                "the sandbox's policy is an allowlist but it has no way out: rootless mode needs a tun "
                "device the Jupyter user may open for slirp4netns (/dev/net/tun at mode 0666, or "
                "c.LocalBackend.tun_device)")

    @property
    def _netns_path(self) -> str:
        return self._ns.net_path if self._ns is not None else str(NETNS_DIR / self.netns)

    def _in_netns(self) -> list[str]:
        """The argv prefix that runs a command in the sandbox's network namespace with the
        rights to change it."""
        if self._ns is not None:
            return self._ns.enter()
        return ["ip", "netns", "exec", self.netns]

    def _start_uplink(self) -> None:
        """Give the namespace a route out through slirp4netns (userspace, no host changes).

        With default-deny nothing passes the nftables output chain anyway, but the route
        makes refused connections fail fast and be logged (no route = no packet = no notice).
        slirp4netns exits when the kernel dies: it watches the read end of a pipe we hold.
        """
        slirp = ["slirp4netns", "--configure", "--mtu=65520", "--disable-host-loopback",
                 # --disable-dns: the sandbox resolves through the kernel's DNS proxy only, never
                 # through slirp4netns's forwarder at 10.0.2.3 (which would ask the host's resolver)
                 "--disable-dns", f"--cidr={UPLINK_CIDR}", "--enable-ipv6"]
        if self._ns is not None:
            command = self._ns.uplink_argv(slirp, self.tun_device)
        else:
            command = [*slirp, "--netns-type=path", self._netns_path, "tap0"]
        if command is None:
            # no uplink: a route to nowhere, so refused packets still cross the rules and are logged
            # (a veth pair with both ends inside: the dummy module may not be loaded, and an
            # unprivileged user cannot load it)
            for argv in (["ip", "link", "add", "nowhere0", "type", "veth", "peer", "name", "nowhere1"],
                         ["ip", "addr", "add", "10.0.2.100/24", "dev", "nowhere0"],
                         ["ip", "link", "set", "nowhere0", "up"],
                         ["ip", "link", "set", "nowhere1", "up"],
                         ["ip", "route", "add", "default", "dev", "nowhere0"],
                         ["ip", "-6", "route", "add", "default", "dev", "nowhere0"]):
                _run([*self._in_netns(), *argv])
            return
        ready_r, ready_w = os.pipe()
        exit_r, exit_w = os.pipe()
        try:
            tail = command.index("--netns-type=path")
            self._uplink = subprocess.Popen(
                [*command[:tail], f"--ready-fd={ready_w}", f"--exit-fd={exit_r}", *command[tail:]],
                pass_fds=(ready_w, exit_r), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
            )
        except OSError as err:
            os.close(exit_w)
            raise SandboxStartError(f"starting slirp4netns failed: {err}") from None
        finally:
            os.close(ready_w)
            os.close(exit_r)
        self._uplink_exit_fd = exit_w
        with os.fdopen(ready_r, "rb") as ready:
            ok = ready.read(1) == b"1"
        if not ok:
            err = self._uplink.stderr.read().decode(errors="replace").strip() if self._uplink.stderr else ""
            raise SandboxStartError(f"slirp4netns could not configure the sandbox network: {err}")
    def _listen_enforcer_log(self) -> None:
        """Read the packets our nftables rules refuse (NFLOG) and report them as notices."""
        try:
            if self._ns is not None:
                (sock,) = self._ns.sockets("nflog", str(self.nflog_group), count=1)
            else:
                sock = nflog.open_in_netns(self._netns_path, self.nflog_group)
        except OSError as err:
            self.log.warning("no enforcer log for sandbox %s: %s", self._sandbox_id, err)
            return
        diag = None
        try:
            if self._ns is not None:
                diag = sockowner.SocketDiag(self._ns.sockets("diag", count=1)[0])
            else:
                diag = sockowner.SocketDiag.open(self._netns_path)
        except OSError as err:  # senders are then found from /proc/net alone (slower)
            self.log.warning("no socket lookups in sandbox %s: %s", self._sandbox_id, err)
        self._nflog_sock, self._diag = sock, diag
        cgroups = sorted({str(d) for d in self._cgroup.dirs.values()}) if self._cgroup is not None else []
        try:
            self._nflog = EnforcerLogProcess(sock, diag.sock if diag else None, self._netns_path,
                                             cgroups, asyncio.get_running_loop(), self._deliver_packet,
                                             self._read_log_here, self.log)
        except OSError as err:
            self.log.warning("no enforcer log reader process for sandbox %s: %s", self._sandbox_id, err)
            self._read_log_here()

    def _read_log_here(self) -> None:
        """Read the enforcer's log in the kernel (a thread): the reader process could not run."""
        if self._nflog_sock is None:
            return
        self._nflog = nflog.LogReader(self._nflog_sock, asyncio.get_running_loop(), self._with_senders,
                                      lambda item: self._deliver_packet(*item), self.log)

    def _with_senders(self, packets: list[nflog.LoggedPacket]) -> list[tuple]:
        """Each packet of one NFLOG read with the process that sent it (in the reader's thread)."""
        pids = None
        items = []
        for packet in packets:
            if pids is None:  # once per read: the packets of one read come from the same moment
                pids = sockowner.sandbox_pids(
                    sorted({str(d) for d in self._cgroup.dirs.values()}) if self._cgroup is not None else (),
                    self._netns_path if self.netns else None)
            items.append((packet, self._sender(packet, pids)))
        return items

    def _deliver_packet(self, packet: nflog.LoggedPacket, process: dict | None) -> None:
        """A refused packet, and who sent it, as a blocked-connection record (on the loop)."""
        if packet.prefix.startswith(LOG_PREFIX_ACCEPTED.rstrip()):  # learn mode: let through
            record = enforcer_record(packet, "allowed")
            if record is not None and self.learn_sink is not None:
                record["process"] = process if isinstance(process, dict) else None
                self.learn_sink(record)
            return
        record = enforcer_record(packet, "dropped" if self.refuse_with == "drop" else "rejected")
        if record is not None:
            record["process"] = process if isinstance(process, dict) else None
            self._report_blocked(record)

    def _report_blocked(self, record: dict) -> None:
        if self.blocked_sink is not None:
            self.blocked_sink(record)

    def _sender(self, packet: nflog.LoggedPacket, pids: list[int]) -> dict | None:
        """The sandbox process that sent a refused packet (sockowner.py), looked up at once: the
        process may close the socket soon. Retransmissions of one attempt reuse the first answer,
        and at most OWNER_LOOKUPS_PER_S lookups run a second (a flood of refusals stays cheap)."""
        now = time.monotonic()
        key = (packet.protocol, packet.src, packet.sport)
        cached = self._owners.get(key)
        if cached is not None and now - cached[0] < 10 and cached[1] is not None:
            return cached[1]
        window, count = self._owner_budget
        if now - window >= 1:
            window, count = now, 0
        if count >= OWNER_LOOKUPS_PER_S:
            return None
        self._owner_budget = (window, count + 1)
        found = sockowner.owner(pids, packet.protocol, packet.src, packet.sport, packet.dst, packet.dport,
                                diag=self._diag)
        if len(self._owners) > 1000:
            self._owners.clear()
        self._owners[key] = (now, found)
        return found

    async def _start_dns(self, policy: Any) -> None:
        """The sandbox's resolver (see dnsproxy.py); without an upstream, nothing resolves."""
        self._policy = policy
        if not self.upstream_dns:
            self.log.warning("no upstream DNS resolver (c.LocalBackend.upstream_dns): names will not resolve")
        self._dns = await DnsProxy.start(
            self._netns_path, sockets=await self._dns_sockets(), policy=lambda: self._policy,
            upstream=self.upstream_dns or "127.0.0.1:9", add_addresses=self._add_addresses,
            report=lambda record: self.blocked_sink and self.blocked_sink(record), log=self.log,
            observe=lambda record: self.learn_sink and self.learn_sink(record), screen=self._screen())

    async def _dns_sockets(self) -> Any:
        """Rootless: the DNS proxy's sockets, made inside the namespaces (else None: the proxy
        makes them itself)."""
        if self._ns is None:
            return None
        return tuple(await asyncio.to_thread(self._ns.sockets, "dns", count=2))

    def _add_addresses(self, elements: list[tuple[str, str]]) -> None:
        """Open addresses a wildcard's names resolved to (runs in a worker thread)."""
        by_set: dict[str, list[str]] = {}
        for set_name, address in elements:
            by_set.setdefault(set_name, []).append(address)
        script = _add_elements_script(by_set)
        result = _run([*self._in_netns(), "nft", "-f", "-"], input=script, check=False)
        if result.returncode != 0:
            raise PolicyError(f"nftables refused {script.strip()!r}: {result.stderr.strip()}")
        for name, addrs in by_set.items():
            self._learned.setdefault(name, set()).update(addrs)

    def drain_blocked(self) -> None:
        if self._nflog is not None:
            self._nflog.drain()

    def _close_enforcer_log(self) -> None:
        reader, self._nflog = self._nflog, None
        if reader is not None:
            reader.close()
        diag, self._diag = self._diag, None
        if diag is not None:
            diag.sock.close()
        sock, self._nflog_sock = self._nflog_sock, None
        if sock is not None:
            sock.close()

    def _screen(self) -> AddressScreen:
        """The ceiling's address screen (set by the kernel), else the default ceiling's."""
        if self.address_screen is not None:
            return self.address_screen
        from ..policy.admin import AdminPolicy

        return AdminPolicy().address_screen()

    def _ruleset(self, policy: Any) -> tuple[str, dict]:
        """Resolve the policy's domains (allowlist mode) and compile the nftables script."""
        resolved: dict[str, list[str]] = {}
        screened: list[tuple[str, str, str]] = []
        expires_at = None
        screen = self._screen()
        if policy is not None and policy.mode == "allowlist" and policy.domains():
            resolution = resolve_policy(policy, resolver=self.upstream_dns or None)
            resolved, screened = screen.split(resolution.addresses)
            expires_at = resolution.expires_at
            if resolution.errors:
                self.log.warning("could not resolve %s", ", ".join(sorted(resolution.errors)))
            for name, address, why in screened:
                self.log.warning("not opening %s for %s: %s", address, name, why)
        ruleset = compile_nftables(
            policy, table=NFT_TABLE, resolved=resolved, resolver=SANDBOX_RESOLVER,
            always_blocked=self.always_blocked or _default_blocked(), nflog_group=self.nflog_group,
            refuse_with=self.refuse_with, log_accepted=self.log_accepted, screen=screen,
        )
        return ruleset, {"resolved": resolved, "expires_at": expires_at, "resolver": SANDBOX_RESOLVER,
                         "screened": [{"host": n, "ip": a, "why": w} for n, a, w in screened]}

    def _apply_rules(self, compiled: tuple[str, dict]) -> None:
        """Replace the whole table in one ``nft -f`` transaction: all or nothing."""
        ruleset, details = compiled
        # a wildcard's addresses learned from DNS answers stay open while the wildcard is in
        # the policy (every packet is judged by the new ruleset: without them a re-apply
        # would cut its open connections); a revoked wildcard's set is gone, and so are they
        self._learned = {name: addrs for name, addrs in self._learned.items()
                         if f"\tset {name} {{" in ruleset}
        ruleset += _add_elements_script(self._learned)
        started = time.monotonic()
        result = _run([*self._in_netns(), "nft", "-f", "-"], input=ruleset, check=False)
        if result.returncode != 0:
            raise PolicyError(f"nftables refused the ruleset; the previous one stays in force: "
                              f"{result.stderr.strip()}")
        self._applied = {"enforcer": "nftables", "applied_at": time.time(),
                         "apply_ms": round((time.monotonic() - started) * 1000, 1), **details}


    def _schedule_refresh(self, policy: Any) -> None:
        """Re-resolve the policy's domains when their DNS answers expire, and re-apply."""
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        expires_at = self._applied.get("expires_at")
        if not expires_at or expires_at == float("inf"):
            return

        async def refresh() -> None:
            await asyncio.sleep(max(5.0, expires_at - time.time()))
            try:
                await self.apply_policy(policy)
            except PolicyError as err:
                self.log.warning("refreshing the resolved addresses failed, keeping the old ones: %s", err)

        self._refresh = asyncio.ensure_future(refresh())

    def _bwrap_argv(self, fds: list[int]) -> list[str]:
        """The command that starts the agent. ``fds[0]`` is the sandbox's user namespace
        (:func:`userns.create`); the seccomp filter's descriptor is appended. The caller
        passes them to the command and closes them."""
        root = self._dir()
        prefixes = _python_prefixes(self.python)
        seccomp_fd = seccomp.filter_fd()
        fds.append(seccomp_fd)
        if self._ns is not None:
            # rootless: bwrap starts as root of the kernel's own namespaces and puts the code
            # in a further user namespace (uid 65534 there, the kernel's user outside), with
            # no capabilities and no way to create another one
            argv = self._ns.enter()
            rlimits = limits.rootless_rlimits(limits.parse_size(self.memory_limit), self.pids_limit,
                                              limits.parse_size(self.work_size))
            if rlimits:
                # no cgroup: rlimits (limits.rootless_rlimits); RLIMIT_NPROC is recorded by
                # bwrap's new user namespace as its own ceiling, so it counts the sandbox only
                argv += ["prlimit", *rlimits]
            argv += ["bwrap", "--unshare-user", "--uid", str(self.uid),
                     "--gid", str(self.uid), "--disable-userns"]
        else:
            argv = [
                # the network namespace first: joining it needs root of the host's user namespace
                "nsenter", f"--net={NETNS_DIR / self.netns}",
                "nsenter", f"--user=/proc/self/fd/{fds[0]}",
                "bwrap",
            ]
        argv += [
            "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--hostname", "sandbox",
            "--ro-bind", "/usr", "/usr",
        ]
        for link in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            target = os.path.join("/", link)
            if os.path.islink(target):
                argv += ["--symlink", os.readlink(target), target]
            elif os.path.isdir(target):
                argv += ["--ro-bind", target, target]
        argv += ["--ro-bind", "/etc", "/etc",
                 "--ro-bind", str(root / "resolv.conf"), "/etc/resolv.conf",
                 # before the interpreter's binds, which may live under /tmp (a venv in a CI clone)
                 "--proc", "/proc", "--dev", "/dev",
                 "--perms", "1777", "--size", str(limits.parse_size(self.tmp_size) or 1 << 40),
                 "--tmpfs", "/tmp"]
        made: set[str] = {"/tmp"}
        for path in [*prefixes, *self.extra_ro_binds]:
            if path.startswith("/usr/") or not os.path.exists(path):
                continue
            # parents are created world-readable so the unprivileged uid can walk to the bind
            parts = Path(path).parts[1:-1]
            for i in range(1, len(parts) + 1):
                parent = "/" + "/".join(parts[:i])
                if parent not in made:
                    argv += ["--perms", "0755", "--dir", parent]
                    made.add(parent)
            argv += ["--ro-bind", path, path]
        argv += [
            "--perms", "0755", "--dir", "/home",
            "--bind", str(root / "work"), SANDBOX_HOME,
            "--perms", "0755", "--dir", "/opt/sandbox-agent",
            "--ro-bind", str(root / "agent.pyz"), AGENT_PATH,
            # the root directory itself (bwrap's tmpfs) read-only: in rootless mode the code's
            # uid owns it (it maps to the user that built it)
            "--remount-ro", "/",
            "--chdir", SANDBOX_HOME,
            "--clearenv",
            "--setenv", "HOME", SANDBOX_HOME,
            "--setenv", "USER", "sandbox",
            "--setenv", "PATH", f"{os.path.dirname(self.python)}:/usr/local/bin:/usr/bin:/bin",
            "--setenv", "LANG", "C.UTF-8",
            "--setenv", "PYTHONUNBUFFERED", "1",
            "--setenv", "TERM", "xterm-256color",
        ]
        if self._ns is not None:
            argv += ["--cap-drop", "ALL", "--seccomp", str(seccomp_fd)]
        else:
            argv += [
                "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                "--cap-add", "CAP_SETPCAP",
                # loaded just before bwrap runs setpriv: its own set-up is not filtered, everything
                # after is (no new user namespaces, keyring, io_uring, bpf, ptrace, mount, modules…)
                "--seccomp", str(seccomp_fd),
                # bwrap needs root to build the mounts; the code runs as an unprivileged uid
                "setpriv", f"--reuid={self.uid}", f"--regid={self.uid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all",
            ]
        argv += [self.python, "-s", AGENT_PATH]
        return argv

    async def _spawn_agent(self) -> None:
        procs_files = self._cgroup.procs_files() if self._cgroup else []

        def join_cgroup() -> None:  # in the child, before exec: no process escapes the limits
            for path in procs_files:
                with open(path, "w") as f:
                    f.write(str(os.getpid()))

        fds: list[int] = []
        try:
            if self._ns is None:  # rootless: bwrap makes the user namespace itself
                fds.append(await asyncio.to_thread(userns.create, self.uid))
            self._proc = await asyncio.create_subprocess_exec(
                *self._bwrap_argv(fds),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=protocol.MAX_FRAME + 1,
                start_new_session=True,
                pass_fds=fds,
                preexec_fn=join_cgroup if procs_files else None,
            )
        finally:
            for fd in fds:
                os.close(fd)
        self._stderr_tail = []
        self._stderr_task = asyncio.create_task(self._read_stderr(self._proc))

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        """Keep the last lines the sandbox machinery wrote (bwrap errors, agent crashes)."""
        assert proc.stderr
        while True:
            line = await proc.stderr.readline()
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            self.log.debug("sandbox %s: %s", self._sandbox_id, text)
            self._stderr_tail = (self._stderr_tail + [text])[-20:]

    async def attach(self) -> Transport:
        if self._proc is None or self._proc.returncode is not None:
            raise SandboxStartError("the local sandbox is not running")
        assert self._proc.stdout and self._proc.stdin
        return LineTransport(self._proc.stdout, self._proc.stdin)

    async def apply_policy(self, policy: Any) -> dict[str, Any]:
        if not self._sandbox_id:
            raise PolicyError("no sandbox is running")
        if self._ns is not None and self._uplink is None and policy is not None and policy.mode == "allowlist":
            raise PolicyError(
                "this sandbox has no way out: rootless mode needs a tun device the Jupyter user may open "
                "for slirp4netns (chmod 0666 /dev/net/tun, the usual default, or a node of its own: "
                "c.LocalBackend.tun_device); until then only default-deny can be enforced")
        compiled = await asyncio.to_thread(self._ruleset, policy)
        await asyncio.to_thread(self._apply_rules, compiled)
        self._policy = policy  # the DNS proxy answers by the policy in force
        self._schedule_refresh(policy)
        return self.applied

    async def interrupt(self) -> None:
        """The in-band interrupt frame is enough locally: nothing more to do."""

    async def exit_reason(self) -> str:
        proc = self._proc
        if proc is None:
            return "the sandbox is not running"
        try:
            code = await asyncio.wait_for(proc.wait(), 2)
        except asyncio.TimeoutError:
            return "the sandbox stopped responding"
        if self._stderr_task:
            try:
                await asyncio.wait_for(self._stderr_task, 1)
            except asyncio.TimeoutError:
                pass
        self.last_exit_status = code
        reason = describe_exit(code)
        if code in (137, -9) and self._cgroup is not None and self._cgroup.oom_killed():
            limit = limits.format_size(limits.parse_size(self.memory_limit))
            reason = (f"the sandbox ran out of memory (its limit is {limit}, "
                      "c.LocalBackend.memory_limit) and was killed")
        if self._stderr_tail and code not in (0, None):
            # what the sandbox machinery (bwrap, the interpreter) said last, e.g. a missing path
            reason += f" ({self._stderr_tail[-1]})"
        return reason

    async def stop(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        self._close_enforcer_log()
        if self._dns is not None:
            self._dns.close()
            self._dns = None
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except asyncio.TimeoutError:
                self.log.warning("sandbox %s did not exit after SIGKILL", self._sandbox_id)
        if self._stderr_task:
            self._stderr_task.cancel()
            self._stderr_task = None
        await asyncio.to_thread(self._stop_uplink)
        if self._ns is not None:
            await asyncio.to_thread(self._ns.close)
            self._ns = None
        if self._sandbox_id:
            await asyncio.to_thread(remove_sandbox, self._sandbox_id, self.state_dir)
        self._cgroup = None
        self._sandbox_id = None
        self._learned = {}
        self._info = None

    def _stop_uplink(self) -> None:
        if self._uplink_exit_fd is not None:
            os.close(self._uplink_exit_fd)  # slirp4netns exits when this pipe closes
            self._uplink_exit_fd = None
        uplink, self._uplink = self._uplink, None
        if uplink is not None:
            try:
                uplink.wait(timeout=2)
            except subprocess.TimeoutExpired:
                uplink.kill()
                uplink.wait()
            if uplink.stderr:
                uplink.stderr.close()

    def info(self) -> SandboxInfo | None:
        return self._info


def _add_elements_script(by_set: dict[str, Any]) -> str:
    return "".join(f"add element inet {NFT_TABLE} {name} {{ {', '.join(sorted(set(addrs)))} }}\n"
                   for name, addrs in sorted(by_set.items()) if addrs)


def _default_blocked() -> list[str]:
    from ..policy.enforcers import default_always_blocked

    return [str(net) for net in default_always_blocked()]


def enforcer_record(packet: nflog.LoggedPacket, verdict: str = "rejected") -> dict | None:
    """A logged packet as a blocked-connection record, or None for link-local noise
    (neighbour discovery, multicast) that no code asked for."""
    if packet.protocol == "icmpv6" or packet.dst.startswith(("ff", "224.", "239.")):
        return None
    return {
        "host": None, "ip": packet.dst, "port": packet.dport, "protocol": packet.protocol,
        "verdict": verdict, "process": None, "first_seen": packet.at, "last_seen": packet.at,
        "count": 1,
        # a TCP attempt is one source port (retransmitted SYNs repeat it); UDP counts datagrams
        "attempt": f"{packet.protocol}:{packet.sport}" if packet.protocol == "tcp" else None,
    }


# -- cleanup, shared by stop() and gc ------------------------------------------------

def _proc_start_time(pid: int) -> str | None:
    """The process's start time (a pid's identity), or None if it is gone — or a zombie: a
    kernel that died but was not reaped (its parent died too, and PID 1 of a container
    may not reap) owns nothing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


#: interpreter -> its prefixes, once known (each sandbox start would pay a Python start)
_PREFIXES: dict[str, tuple[str, ...]] = {}


def _python_prefixes(python: str) -> tuple[str, ...]:
    """Directories the sandbox interpreter needs: its prefix (and base prefix for a venv)."""
    if python in _PREFIXES:
        return _PREFIXES[python]
    result = _run([python, "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"], check=False)
    paths = [p for p in result.stdout.split() if p] if result.returncode == 0 else []
    if not paths:
        paths = [sysconfig.get_config_var("prefix") or "/usr"]
    out: list[str] = []
    for p in paths:
        real = os.path.realpath(p)
        if real not in out and real != "/usr":
            out.append(real)
    if result.returncode == 0:
        _PREFIXES[python] = tuple(out)
    return tuple(out)


def remove_sandbox(sandbox_id: str, state_dir: str) -> list[str]:
    """Kill every process in the sandbox's namespace, delete the namespace and its state.

    Idempotent. Returns what was removed (for ``sandbox-kernel gc``).
    """
    removed = []
    netns = f"{NETNS_PREFIX}{sandbox_id}"
    if (NETNS_DIR / netns).exists():
        pids = _run(["ip", "netns", "pids", netns], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        result = _run(["ip", "netns", "delete", netns], check=False)
        if result.returncode == 0:
            removed.append(f"network namespace {netns}")
            if pids:
                removed.append(f"{len(pids)} process(es) in {netns}")
    root = Path(state_dir) / sandbox_id
    if root.exists():
        if os.path.ismount(root / "work"):
            _run(["umount", "-l", str(root / "work")], check=False)
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
    return _proc_start_time(pid) is not None and _proc_start_time(pid) == owner.get("kernel_pid_start")


def _netns_in_use(sandbox_id: str) -> bool:
    """Processes run in the namespace, or it was made in the last minute (a kernel configured
    with another state directory may be creating it: no process is in it yet)."""
    netns = f"{NETNS_PREFIX}{sandbox_id}"
    try:
        if time.time() - (NETNS_DIR / netns).lstat().st_mtime < 60:
            return True
    except OSError:
        return False
    return bool(_run(["ip", "netns", "pids", netns], check=False).stdout.split())


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
    state = Path(state_dir or env_default("SANDBOX_KERNEL_STATE_DIR", "/run/sandbox-kernel"))
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
