"""Policy compile time for 500 entries, per enforcer (median of repeated runs).

    python bench/bench_policy.py [--entries 500] [--repeat 21]

Not a timed test: prints numbers for the issue note. Nothing touches the network.
"""

from __future__ import annotations

import argparse
import statistics
import time

from sandbox_kernel.policy.admin import AdminPolicy
from sandbox_kernel.policy.enforcers import ENFORCERS, render
from sandbox_kernel.policy.model import EgressPolicy


def make_policy(count: int) -> tuple[EgressPolicy, dict[str, list[str]]]:
    """A realistic mix: domains with ports, wildcards, IPv4 and IPv6 CIDRs."""
    entries, resolved = [], {}
    for i in range(count):
        kind = i % 4
        if kind == 0:
            name = f"host{i}.example{i % 7}.com"
            entries.append(f"{name}:443/tcp")
            resolved[name] = [f"203.0.{i % 250}.{i % 200 + 1}", f"2001:db8:{i:x}::1"]
        elif kind == 1:
            entries.append(f"*.svc{i}.example.org:443,8000-8100")
        elif kind == 2:
            entries.append(f"198.{i % 250}.{(i * 7) % 250}.0/24:5432/tcp")
        else:
            entries.append(f"[2001:db8:{i:x}::/48]:443")
    return EgressPolicy(mode="allowlist", entries=tuple(entries), presets=("pypi", "github")), resolved


def rows(count: int = 500, repeat: int = 11) -> list[dict]:
    """Compile time per enforcer for ``count`` entries, for bench/run_all.py."""
    blocked = AdminPolicy(cluster_ranges=["10.0.0.0/8"]).blocked_networks()
    policy, resolved = make_policy(count)
    out = []
    for enforcer in ENFORCERS:
        samples = []
        for _ in range(repeat):
            start = time.perf_counter()
            render(policy, enforcer, pod_selector={"app": "x"}, resolved=resolved, resolver="10.0.0.2", always_blocked=blocked)
            samples.append((time.perf_counter() - start) * 1000)
        out.append({"metric": f"compile {count} entries: {enforcer} (ms)", "ours": statistics.median(samples),
                    "baseline": None, "target": "—"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    blocked = AdminPolicy(cluster_ranges=["10.0.0.0/8"]).blocked_networks()
    policy, resolved = make_policy(args.entries)

    def timed(func) -> float:
        samples = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            func()
            samples.append((time.perf_counter() - start) * 1000)
        return statistics.median(samples)

    texts = [str(e) for e in policy.entries]
    print(f"{args.entries} entries, median of {args.repeat} runs")
    print(f"  parse                {timed(lambda: EgressPolicy.parse(texts)):8.2f} ms")
    for enforcer in ENFORCERS:
        ms = timed(lambda: render(policy, enforcer, pod_selector={"app": "x"}, resolved=resolved, resolver="10.0.0.2", always_blocked=blocked))
        print(f"  {enforcer:<20} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
