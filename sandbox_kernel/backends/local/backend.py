"""``LocalBackend``: the sandboxes of one kernel on this machine (the package docstring says
how one is built). This module holds the configuration and the lifecycle; the parts are the
package's other modules: layout (state directory), enforcer (nftables and its log), uplink,
bwrap (the agent's command), dnsproxy, exits, cleanup."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from traitlets import Bool, Enum, Integer, List, Unicode, default

from ...agent import protocol
from ...agent.bundle import build_pyz
from ...agent.protocol import BlockedRecord
from ...config import env_default
from ...errors import IsolationUnavailable, PolicyError, SandboxStartError
from ...policy.compile_nftables import LOG_PREFIX_ACCEPTED
from ...policy.destinations import AddressScreen
from ...policy.resolve import upstream_from_resolv_conf
from ..base import Backend, LineTransport, Progress, SandboxInfo, Transport
from . import limits, rootless, seccomp, userns
from .bwrap import BwrapSpec, bwrap_argv, host_root_links, python_prefixes
from .cleanup import remove_sandbox
from .dnsproxy import DnsProxy
from .enforcer import EnforcerLog, NftTable, compile_ruleset, default_blocked, enforcer_record
from .exits import exit_reason
from .layout import DEFAULT_STATE_DIR, NETNS_DIR, netns_name, run, write_state
from .nflog import LoggedPacket
from .uplink import SLIRP_ARGV, UPLINK_RANGES, Uplink, route_to_nowhere


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
        return env_default("SANDBOX_KERNEL_STATE_DIR", DEFAULT_STATE_DIR)

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
        return [*(self._always_blocked or default_blocked()), *UPLINK_RANGES]

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
        self._uplink: Uplink | None = None
        self._table: NftTable | None = None
        self._enforcer_log: EnforcerLog | None = None
        self._refresh: asyncio.Task | None = None
        self._dns: DnsProxy | None = None
        self._policy: Any = None
        self._cgroup: limits.SandboxCgroup | None = None
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
            probe = run(["unshare", "--user", "--map-root-user", "--net", "true"], check=False)
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
        return netns_name(self._sandbox_id) if self._sandbox_id else None

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
            if self._enforcer_log is not None:  # while the agent starts
                await self._enforcer_log.wait_ready()
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
        Path(self.state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)  # host users must not walk into sandboxes' files
        write_state(self._dir(), kernel_id=kernel_id, agent=build_pyz(),
                    work_size=0 if self.rootless else limits.parse_size(self.work_size),
                    work_uid=None if self.rootless else self.uid)
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
            run(["ip", "netns", "add", self.netns])
        run([*self._in_netns(), "ip", "link", "set", "lo", "up"])
        if self._ns is not None:
            self._ns.prepare(self.nflog_group)  # the sockets served from the host side, at once
        self._table = NftTable(self._in_netns())
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
        """Give the namespace its way out (uplink.py); none without a usable tun device."""
        if self._ns is not None:
            command = self._ns.uplink_argv(SLIRP_ARGV, self.tun_device)
        else:
            command = [*SLIRP_ARGV, "--netns-type=path", self._netns_path, "tap0"]
        if command is None:
            route_to_nowhere(lambda argv: run([*self._in_netns(), *argv]))
            return
        self._uplink = Uplink(command)

    def _listen_enforcer_log(self) -> None:
        """Read the packets our nftables rules refuse (NFLOG) and report them as notices."""
        self._enforcer_log = EnforcerLog(
            sandbox_id=self._sandbox_id or "", netns_path=self._netns_path, nflog_group=self.nflog_group,
            ns=self._ns, cgroup_dirs=sorted({str(d) for d in self._cgroup.dirs.values()}) if self._cgroup is not None else [],
            deliver=self._deliver_packet, log=self.log)
        self._enforcer_log.open()

    def _deliver_packet(self, packet: LoggedPacket, process: dict | None) -> None:
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

    def _report_blocked(self, record: BlockedRecord) -> None:
        if self.blocked_sink is not None:
            self.blocked_sink(record)

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
        table = self._table
        if table is None:
            raise PolicyError("no sandbox is running")
        table.add_addresses(elements)

    def drain_blocked(self) -> None:
        if self._enforcer_log is not None:
            self._enforcer_log.drain()

    def _close_enforcer_log(self) -> None:
        log, self._enforcer_log = self._enforcer_log, None
        if log is not None:
            log.close()

    def _screen(self) -> AddressScreen:
        """The ceiling's address screen (set by the kernel), else the default ceiling's."""
        if self.address_screen is not None:
            return self.address_screen
        from ...policy.admin import AdminPolicy

        return AdminPolicy().address_screen()

    def _ruleset(self, policy: Any) -> tuple[str, dict]:
        """Resolve the policy's domains (allowlist mode) and compile the nftables script."""
        return compile_ruleset(policy, screen=self._screen(), always_blocked=self.always_blocked or default_blocked(),
                               upstream_dns=self.upstream_dns, nflog_group=self.nflog_group,
                               refuse_with=self.refuse_with, log_accepted=self.log_accepted, log=self.log)

    def _apply_rules(self, compiled: tuple[str, dict]) -> None:
        """Replace the whole table in one ``nft -f`` transaction: all or nothing."""
        if self._table is None:
            raise PolicyError("no sandbox is running")
        self._applied = self._table.apply(compiled)

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

    def _agent_argv(self, fds: list[int]) -> list[str]:
        """The command that starts the agent (bwrap.py). ``fds[0]`` is the sandbox's user
        namespace in root mode (:func:`userns.create`); the seccomp filter's descriptor is
        appended. The caller passes them to the command and closes them."""
        prefixes = python_prefixes(self.python)
        seccomp_fd = seccomp.filter_fd()
        fds.append(seccomp_fd)
        ns = self._ns
        spec = BwrapSpec(
            root=str(self._dir()), python=self.python,
            binds=tuple(path for path in [*prefixes, *self.extra_ro_binds] if os.path.exists(path)),
            root_links=host_root_links(), tmp_size=limits.parse_size(self.tmp_size) or 1 << 40,
            uid=self.uid, seccomp_fd=seccomp_fd,
            userns_fd=fds[0] if ns is None else None,
            netns_path=str(NETNS_DIR / self.netns) if ns is None and self.netns else None,
            rootless_enter=tuple(ns.enter()) if ns is not None else None,
            rlimits=tuple(limits.rootless_rlimits(limits.parse_size(self.memory_limit), self.pids_limit,
                                                  limits.parse_size(self.work_size))) if ns is not None else (),
        )
        return bwrap_argv(spec)

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
                *self._agent_argv(fds),
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
        oom = code in (137, -9) and self._cgroup is not None and self._cgroup.oom_killed()
        limit = limits.format_size(limits.parse_size(self.memory_limit)) if oom else ""
        return exit_reason(code, oom_killed=oom, memory_limit=limit, stderr_tail=self._stderr_tail)

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
        self._table = None
        self._info = None

    def _stop_uplink(self) -> None:
        uplink, self._uplink = self._uplink, None
        if uplink is not None:
            uplink.close()

    def info(self) -> SandboxInfo | None:
        return self._info

