"""Time from "apply" to the rules being in force on the local backend (issue: egress policy).

Starts one local sandbox and applies policies alternately (an allowlist of 20 CIDR/port
entries, then default-deny), timing LocalBackend.apply_policy: compile, ``nft -f`` in the
sandbox's namespace, done. Needs root. No traffic is sent anywhere.

    python bench/bench_apply.py [--repeat 50]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from sandbox_kernel.backends.local import LocalBackend
from sandbox_kernel.policy.model import EgressPolicy

TARGET_MS = 100.0


async def measure(repeat: int) -> dict:
    backend = LocalBackend()
    deny = EgressPolicy()
    allow = EgressPolicy(mode="allowlist", entries=tuple(
        EgressPolicy.parse([f"10.231.{i}.0/24:8080/tcp" for i in range(20)]).entries))
    await backend.start("bench", deny, lambda line: None)
    try:
        samples = []
        for i in range(repeat):
            policy = allow if i % 2 == 0 else deny
            started = time.perf_counter()
            await backend.apply_policy(policy)
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        await backend.stop()
    return {"apply_to_enforced_ms": statistics.median(samples), "p95_ms": sorted(samples)[int(len(samples) * 0.95) - 1]}


def rows(repeat: int = 50) -> list[dict]:
    result = asyncio.run(measure(repeat))
    return [{"metric": "policy apply → enforced (median ms)", "ours": result["apply_to_enforced_ms"],
             "baseline": None, "target": f"≤ {TARGET_MS:.0f} ms"}]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args(argv)
    result = asyncio.run(measure(args.repeat))
    print(f"apply → enforced: median {result['apply_to_enforced_ms']:.1f} ms, p95 {result['p95_ms']:.1f} ms "
          f"(target ≤ {TARGET_MS:.0f} ms median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
