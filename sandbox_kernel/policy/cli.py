"""``sandbox-kernel policy check|render``: validate a policy file, show what would be applied.

The top-level CLI (``sandbox_kernel/cli.py``) calls :func:`add_subcommands` on its
subparsers and then ``args.handler(args)`` (``args.func`` is the same), which returns the exit status. :func:`run`
does the same on its own, for tests and ``python -m``-style use.

Exit status: 0 on success, 2 when the policy (or an option) is invalid; the typed
error's message goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

import yaml

from ..errors import PolicyError
from .enforcers import ENFORCERS, render
from .model import load_policy_file

EXIT_INVALID = 2
#: placeholder selector for rendering outside a cluster (the backend passes the real one)
EXAMPLE_SELECTOR = {"sandbox-kernel/kernel-id": "example"}


def add_subcommands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``policy`` (with ``check`` and ``render``) on the top-level subparsers."""
    parser = subparsers.add_parser("policy", help="check or render an egress policy file")
    _fill(parser)
    return parser


def run(argv: Sequence[str], stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run ``policy`` with ``argv`` (e.g. ``["check", "p.yaml"]``); return the exit status."""
    parser = argparse.ArgumentParser(prog="sandbox-kernel policy")
    _fill(parser)
    args = parser.parse_args(list(argv))
    return args.func(args, stdout=stdout, stderr=stderr)


def _fill(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="policy_command", required=True)
    check = sub.add_parser("check", help="validate a policy file (YAML or JSON)")
    check.add_argument("file")
    check.set_defaults(func=_check, handler=_check)  # top-level cli.py calls args.handler(args)

    show = sub.add_parser("render", help="print what an enforcer would apply")
    show.add_argument("file")
    show.add_argument("--enforcer", choices=ENFORCERS, required=True)
    show.add_argument("--namespace", default="sandbox")
    show.add_argument("--name", default="sandbox-egress", help="name of the emitted objects")
    show.add_argument(
        "--selector", action="append", default=[], metavar="KEY=VALUE",
        help="label of the sandbox pod (repeatable); default sandbox-kernel/kernel-id=example",
    )
    show.add_argument("--resolved", metavar="JSON", help='file mapping each domain to its addresses: {"pypi.org": ["151.101.0.223"]}')
    show.add_argument("--resolve", action="store_true", help="resolve the domains now (through --resolver, or the system)")
    show.add_argument("--resolver", help="DNS server the sandbox uses (nftables DNS rule; --resolve asks it)")
    show.add_argument("--node-local-dns", action="store_true", help="allow DNS to NodeLocal DNSCache 169.254.20.10")
    show.add_argument("--gke-cloud-dns", action="store_true", help="allow DNS to GKE Cloud DNS on 169.254.169.254:53")
    show.set_defaults(func=_render, handler=_render)


def _check(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        policy = load_policy_file(args.file)
    except PolicyError as err:
        print(f"error: {err}", file=stderr)
        return EXIT_INVALID
    total = len(policy.expanded_entries())
    print(f"ok: {args.file}: policy {policy.name!r}, {policy.describe()}, {total} destinations after presets", file=stdout)
    return 0


def _render(args: argparse.Namespace, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        policy = load_policy_file(args.file)
        selector = _selector(args.selector)
        resolved = _resolved(args, policy, stderr)
        output = render(
            policy, args.enforcer, namespace=args.namespace, pod_selector=selector, name=args.name,
            resolved=resolved, resolver=args.resolver, node_local_dns=args.node_local_dns,
            gke_cloud_dns=args.gke_cloud_dns,
        )
    except PolicyError as err:
        print(f"error: {err}", file=stderr)
        return EXIT_INVALID
    if isinstance(output, str):
        stdout.write(output)
    else:
        stdout.write(yaml.dump_all(output, Dumper=_Dumper, sort_keys=False, explicit_start=True))
    return 0


class _Dumper(yaml.SafeDumper):
    """Safe dumper without &anchors/*aliases: manifests a person reads and kubectl applies."""

    def ignore_aliases(self, data):
        return True


def _selector(items: list[str]) -> dict[str, str]:
    if not items:
        return dict(EXAMPLE_SELECTOR)
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PolicyError(f"--selector {item!r} must be KEY=VALUE")
        out[key] = value
    return out


def _resolved(args: argparse.Namespace, policy, stderr: TextIO) -> dict[str, list[str]] | None:
    if args.resolved:
        try:
            with open(args.resolved, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as err:
            raise PolicyError(f"--resolved {args.resolved}: {err}") from None
        if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
            raise PolicyError(f"--resolved {args.resolved}: expected an object of domain -> list of addresses")
        return data
    if args.resolve:
        from .resolve import resolve_policy

        resolution = resolve_policy(policy, resolver=args.resolver)
        for domain, why in sorted(resolution.errors.items()):
            print(f"warning: {domain}: {why}", file=stderr)
        return resolution.addresses
    if policy.domains() and args.enforcer in ("nftables", "networkpolicy"):
        print(
            f"note: {len(policy.domains())} domain(s) not resolved (use --resolve or --resolved); "
            "the output opens no address for them",
            file=stderr,
        )
    return None
