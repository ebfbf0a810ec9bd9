"""The Kubernetes backend through the fake API server (tests/fakekube), issue 5.

Metrics: API requests to start a sandbox when the user's namespace is already set up
(target ≤ 6, zero polling) and when it is not; the exec round trip of a ``1+1`` frame
through the fake server's exec WebSocket vs the local backend's pipes, in the same run.
The fake is on loopback: a real API server adds its network and kubelet hops.

    python bench/bench_kubernetes.py [--repeat 50]

The local-backend baseline needs root (network namespaces); without it that row has no
baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "tests"))  # fakekube

from fakekube import FakeKube  # noqa: E402
import logging  # noqa: E402

logging.getLogger("tornado.access").setLevel(logging.ERROR)  # the fake's 404s are expected

from sandbox_kernel.backends import kubernetes as kb  # noqa: E402
from sandbox_kernel.policy.model import EgressPolicy  # noqa: E402


def _frame(n: int) -> dict:
    return {"type": "execute", "id": n, "code": "1+1", "silent": False, "store_history": True,
            "user_expressions": {}, "allow_stdin": False}


async def _round_trips(transport, repeat: int) -> list[float]:
    hello = await asyncio.wait_for(transport.recv(), 30)
    assert hello and hello["type"] == "hello", hello
    times = []
    for n in range(repeat + 5):
        started = time.perf_counter()
        await transport.send(_frame(n))
        while True:
            frame = await asyncio.wait_for(transport.recv(), 30)
            if frame is None:
                raise RuntimeError("the sandbox stream ended")
            if frame["type"] == "done":
                break
        if n >= 5:  # warm-up
            times.append((time.perf_counter() - started) * 1000)
    return times


def _kubernetes(repeat: int) -> dict:
    fake = FakeKube().start()
    try:
        async def main():
            make = lambda: kb.KubernetesBackend(client_configuration=fake.configuration(), user="bench",  # noqa: E731
                                                start_timeout=60)
            first = make()
            fake.clear_requests()
            await first.start("bench-new", EgressPolicy(), lambda line: None)
            new_ns = list(fake.requests)
            second = make()
            fake.clear_requests()
            await second.start("bench-existing", EgressPolicy(), lambda line: None)
            existing = list(fake.requests)
            await first.stop()
            transport = await second.attach()
            times = await _round_trips(transport, repeat)
            await second.stop()
            return new_ns, existing, times

        new_ns, existing, times = asyncio.run(main())
    finally:
        fake.stop()
    polling = [r for r in existing if r.resource == "pods" and r.verb in ("get", "list")]
    return {"existing": len(existing), "new": len(new_ns), "polling": len(polling),
            "existing_calls": [f"{r.verb} {r.resource}" for r in existing], "times": times}


def _local(repeat: int) -> list[float] | None:
    if os.geteuid() != 0:
        return None
    from sandbox_kernel.backends.local import LocalBackend

    async def main():
        backend = LocalBackend()
        backend.check()
        await backend.start("bench-local", EgressPolicy(), lambda line: None)
        try:
            transport = await backend.attach()
            return await _round_trips(transport, repeat)
        finally:
            await backend.stop()

    try:
        return asyncio.run(main())
    except Exception as err:  # noqa: BLE001 - a machine without the local backend's tools
        print(f"local backend baseline unavailable: {err}", file=sys.stderr)
        return None


def measure(repeat: int = 50) -> dict:
    k8s = _kubernetes(repeat)
    local = _local(repeat)
    return {**k8s, "local_times": local}


def rows(repeat: int = 50) -> list[dict]:
    m = measure(repeat)
    exec_ms = statistics.median(m["times"])
    local_ms = statistics.median(m["local_times"]) if m["local_times"] else None
    return [
        {"metric": "k8s: API requests to start a sandbox, namespace exists", "ours": float(m["existing"]),
         "baseline": None, "target": "≤ 6"},
        {"metric": "k8s: polling requests while the pod starts", "ours": float(m["polling"]),
         "baseline": None, "target": "0 (watch)"},
        {"metric": "k8s: API requests to start a sandbox, new namespace", "ours": float(m["new"]),
         "baseline": None, "target": "report"},
        {"metric": "k8s: exec round trip of 1+1, fake API server (ms, median; baseline: local backend)",
         "ours": exec_ms, "baseline": local_ms, "target": "report (loopback fake)"},
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=50, help="cells per round-trip measurement")
    args = parser.parse_args(argv)
    m = measure(args.repeat)
    exec_ms = statistics.median(m["times"])
    p90 = statistics.quantiles(m["times"], n=10)[-1]
    print("| metric | ours | baseline | target |")
    print("|---|---:|---:|---|")
    print(f"| API requests to start, namespace exists | {m['existing']} | — | ≤ 6 |")
    print(f"| polling requests while the pod starts | {m['polling']} | — | 0 |")
    print(f"| API requests to start, new namespace | {m['new']} | — | report |")
    if m["local_times"]:
        local = statistics.median(m["local_times"])
        local_p90 = statistics.quantiles(m["local_times"], n=10)[-1]
        base = f"{local:.2f} ms (p90 {local_p90:.2f}), local backend"
    else:
        base = "— (local backend needs root)"
    print(f"| exec round trip of 1+1 (median, {args.repeat} cells) | {exec_ms:.2f} ms (p90 {p90:.2f}) | {base} | report |")
    print(f"\nstart with the namespace set up: {', '.join(m['existing_calls'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
