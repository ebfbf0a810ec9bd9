"""``sandbox-kernel install | doctor | gc | policy``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .config import load_config

KERNEL_NAME = "sandbox"


def _kernelspec_source() -> Path:
    """The kernelspec shipped with the package (wheel shared-data) or in a source checkout."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "kernelspec", Path(sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME]
    for candidate in candidates:
        if (candidate / "kernel.json").exists():
            return candidate
    raise FileNotFoundError("the Sandbox kernelspec is missing from this installation")


def install(user: bool = False, sys_prefix: bool = False, prefix: str | None = None,
            python: str | None = None) -> str:
    """Install the ``sandbox`` kernelspec, pointing at this interpreter (like ``ipykernel install``)."""
    from jupyter_client.kernelspec import KernelSpecManager

    if sys_prefix:
        prefix = sys.prefix
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / KERNEL_NAME
        shutil.copytree(_kernelspec_source(), target)
        spec = json.loads((target / "kernel.json").read_text())
        spec["argv"][0] = python or sys.executable
        (target / "kernel.json").write_text(json.dumps(spec, indent=2) + "\n")
        return KernelSpecManager().install_kernel_spec(str(target), KERNEL_NAME, user=user, prefix=prefix)


def doctor(config=None) -> int:
    """Check that this machine can run local sandboxes; print what is missing and how to fix it."""
    from .backends.local import LocalBackend
    from .errors import IsolationUnavailable

    backend = LocalBackend(config=load_config() if config is None else config)
    try:
        backend.check()
    except IsolationUnavailable as err:
        print("local backend: NOT ready; missing:")
        for item in err.missing:
            print(f"  - {item}")
        return 1
    print("local backend: ready")
    print(f"  mode:                {'rootless (no privilege)' if backend.rootless else 'root'}")
    print(f"  sandbox interpreter: {backend.python}")
    print(f"  state directory:     {backend.state_dir}")
    print(f"  sandbox uid:         {backend.uid}")
    uplink = shutil.which("slirp4netns")
    if uplink and backend.rootless:
        from .backends.local.rootless import tun_usable

        if not tun_usable() and not tun_usable(backend.tun_device):
            uplink = None
            print("  uplink (allowlist):  unavailable: /dev/net/tun is not readable and writable by this user "
                  "(chmod 0666 /dev/net/tun, the usual default, or give it a node of its own: "
                  "c.LocalBackend.tun_device); only default-deny can be enforced")
    if uplink or not backend.rootless:
        print(f"  uplink (allowlist):  {uplink or 'slirp4netns missing: apt-get install slirp4netns (needed for allowlisted egress)'}")
    if backend.rootless:
        from .backends.local import limits

        summary = limits.rootless_summary(limits.parse_size(backend.memory_limit), backend.pids_limit,
                                          limits.parse_size(backend.tmp_size), limits.parse_size(backend.work_size))
        print(f"  resource limits:     {summary[0]}")
        for line in summary[1:]:
            print(f"                       {line}")
    return 0


def run_gc(config=None) -> int:
    """Remove local sandboxes whose kernel is gone, looking in the state directory the
    kernels use (``c.LocalBackend.state_dir`` in a config file, else the environment)."""
    from .backends.local import LocalBackend, gc

    backend = LocalBackend(config=load_config() if config is None else config)
    removed = gc(backend.state_dir)
    for line in removed:
        print(f"removed {line}")
    if not removed:
        print("nothing to clean up")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandbox-kernel", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_install = sub.add_parser("install", help="install the Sandbox kernelspec")
    where = p_install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument("--sys-prefix", action="store_true", help="install into sys.prefix (a venv or conda env)")
    where.add_argument("--prefix", help="install into this prefix")
    p_install.add_argument("--python", help="interpreter the kernel runs with (default: this one)")

    backend_help = "local or kubernetes (default: SANDBOX_KERNEL_BACKEND, else local)"
    sub.add_parser("doctor", help="check that this machine (or the cluster) can run sandboxes").add_argument(
        "--backend", choices=("local", "kubernetes"), help=backend_help)
    p_gc = sub.add_parser("gc", help="remove sandboxes left behind by kernels that died")
    p_gc.add_argument("--backend", choices=("local", "kubernetes"), help=backend_help)
    p_gc.add_argument("--max-age", help="kubernetes: also remove sandbox pods older than this "
                                        "(seconds, or 30m, 1h, 2d; default 24h)")
    p_gc.add_argument("--enforcers", help="kubernetes: policy kinds to clean, comma-separated "
                                          "(default: SANDBOX_KERNEL_K8S_ENFORCERS, else networkpolicy)")
    p_demo = sub.add_parser("demo-host", help="start, stop or check the demo destination the notebooks use; "
                                              "hold/release PID: keep it up while process PID runs (scripts/lab.sh)")
    p_demo.add_argument("action", choices=("start", "stop", "status", "hold", "release"))
    p_demo.add_argument("pid", nargs="?", help="hold/release: the process that uses the demo host")

    try:
        from .policy import cli as policy_cli
    except ImportError:
        policy_cli = None
    if policy_cli is not None and hasattr(policy_cli, "add_subcommands"):
        policy_cli.add_subcommands(sub)

    args = parser.parse_args(argv)
    if args.command == "install":
        path = install(user=args.user, sys_prefix=args.sys_prefix, prefix=args.prefix, python=args.python)
        print(f"Installed kernelspec {KERNEL_NAME} in {path}")
        return 0
    if args.command in ("doctor", "gc"):
        # the same configuration the kernel reads: sandbox_kernel_config.py, then the environment
        config = load_config()
        configured = config.SandboxKernel.get("backend_name") if "SandboxKernel" in config else None
        backend = args.backend or configured or os.environ.get("SANDBOX_KERNEL_BACKEND") or "local"
        if backend == "kubernetes":
            if args.command == "doctor":
                from .backends.kubernetes import KubernetesBackend
                from .backends.kubernetes.doctor import main as doctor_k8s

                return doctor_k8s(KubernetesBackend(config=config))
            from .backends.kubernetes import gc_command

            enforcers = [e.strip() for e in (args.enforcers or "").split(",") if e.strip()] or None
            return gc_command(args.max_age or "24h", enforcers=enforcers, config=config)
        if backend != "local":
            parser.error(f"{args.command} needs --backend local or kubernetes (configured backend: {backend!r})")
        if args.command == "doctor":
            return doctor(config)
        if args.max_age or args.enforcers:
            parser.error("--max-age and --enforcers apply to the kubernetes backend only")
        return run_gc(config)
    if args.command == "demo-host":
        from .demohost import main as demo_host

        return demo_host([args.action, *([args.pid] if args.pid is not None else [])])
    handler = getattr(args, "handler", None)
    if handler is not None:
        return int(handler(args) or 0)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
