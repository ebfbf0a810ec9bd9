"""The Kubernetes backend through the fake API server (tests/fakekube), issue 5.

Metrics: API requests to start a sandbox when the user's namespace is already set up
(target ≤ 6, zero polling) and when it is not; the exec round trip of a ``1+1`` frame
through the fake server's exec WebSocket vs the local backend's pipes, in the same run.
The fake is on loopback: a real API server adds its network and kubelet hops.

    python bench/bench_kubernetes.py [--repeat 50]
    python bench/bench_kubernetes.py --cluster [--starts 10]    # the real test cluster (root)

``--cluster`` measures on the one-node cluster of scripts/cluster.sh instead (it must be up;
the chart is installed and every call is made with a token of the chart's kernel
ServiceAccount, see tests/kubernetes/realcluster.py): API requests per start counted in the
client, start → first ``1+1`` result (median and p95 of ``--starts``, image present), the exec
round trip, and ``apply_policy`` (allow a test host) → first connection that succeeds through
kube-router's enforcement (the agent's guard off, so only the network decides).

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

from benchlib import netns_host  # noqa: E402
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


# --- the real cluster ------------------------------------------------------------------------

def _counting(api_client) -> list[str]:
    """Count every REST request ``api_client`` sends (watches included)."""
    seen: list[str] = []
    request = api_client.rest_client.request

    def counted(method, url, *args, **kwargs):
        seen.append(f"{method} {url.split('?')[0].split('/api', 1)[-1]}")
        return request(method, url, *args, **kwargs)

    api_client.rest_client.request = counted
    return seen


async def _cell(transport, n: int, code: str) -> str:
    await transport.send({**_frame(n), "code": code})
    out = []
    while True:
        frame = await asyncio.wait_for(transport.recv(), 60)
        if frame is None:
            raise RuntimeError("the sandbox stream ended")
        if frame["type"] == "stream":
            out.append(frame["text"])
        if frame["type"] == "done":
            return "".join(out)


def measure_cluster(starts: int = 10, repeat: int = 50) -> dict:
    import tempfile
    import uuid

    sys.path.append(str(ROOT / "tests" / "kubernetes"))
    import realcluster as rc

    admin = os.environ.get("SANDBOX_KERNEL_CLUSTER_KUBECONFIG") or str(rc.CACHE / "admin.kubeconfig")
    rc.install_chart(admin)
    user = f"bench-{uuid.uuid4().hex[:6]}"
    kubeconfig = ip = None  # set below, before main() runs

    def make():
        backend = kb.KubernetesBackend(client_configuration=_config(kubeconfig), user=user, image=rc.SANDBOX_IMAGE, image_pull_policy="Never",
                                       requests={"cpu": "50m", "memory": "128Mi"}, start_timeout=180)
        backend.always_blocked = ["169.254.0.0/16"]
        return backend

    async def main():
        result: dict = {"requests": {}, "start_ms": [], "times": [], "enforce_ms": None}
        for n in range(starts + 1):  # the first start sets the namespace up
            backend = make()
            seen = _counting(backend.api_client())
            started = time.perf_counter()
            await backend.start(f"bench-{n}-{uuid.uuid4().hex[:4]}", EgressPolicy(), lambda line: None)
            calls = list(seen)
            transport = await backend.attach()
            hello = await asyncio.wait_for(transport.recv(), 60)
            assert hello and hello["type"] == "hello", hello
            await _cell(transport, 0, "1+1")
            elapsed = (time.perf_counter() - started) * 1000
            if n == 0:
                result["requests"]["new"] = calls
            else:
                result["requests"].setdefault("existing", calls)
                result["start_ms"].append(elapsed)
            if n == starts:
                times = []
                for i in range(repeat + 5):
                    t0 = time.perf_counter()
                    await _cell(transport, i + 1, "1+1")
                    if i >= 5:
                        times.append((time.perf_counter() - t0) * 1000)
                result["times"] = times
                await _cell(transport, 900, "import sandbox_agent.guard as g\ng.enabled = False")
                probe = (f"import socket\ntry:\n    socket.create_connection(({ip!r}, 8080), timeout=0.5).recv(5)"
                         "\n    print('OK')\nexcept OSError:\n    print('NO')")
                assert (await _cell(transport, 901, probe)).strip() == "NO"
                t0 = time.perf_counter()
                await backend.apply_policy(EgressPolicy(mode="allowlist", entries=(f"{ip}:8080/tcp",)))
                for k in range(600):
                    if (await _cell(transport, 1000 + k, probe)).strip() == "OK":
                        result["enforce_ms"] = (time.perf_counter() - t0) * 1000
                        break
            await transport.close()
            await backend.stop()
        return result

    with tempfile.TemporaryDirectory(prefix="skbench-") as tmp, netns_host(serve_port=8080) as host:
        kubeconfig = str(rc.service_account_kubeconfig(admin, rc.CHART_NAMESPACE, rc.KERNEL_SA, Path(tmp) / "kc"))
        ip = host.ip
        try:
            result = asyncio.run(main())
        finally:
            for ns in [f"user-sandbox-{user}"] + _namespaces_of(admin, user):
                rc.delete_namespace(admin, ns)
    result["local_times"] = _local(repeat)
    return result


def _config(kubeconfig: str):
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return configuration


def _namespaces_of(admin: str, user: str) -> list[str]:
    from kubernetes import client

    import realcluster as rc

    items = client.CoreV1Api(rc.admin_client(admin)).list_namespace(
        label_selector=f"sandbox-kernel.io/user={user}").items
    return [n.metadata.name for n in items]


def main_cluster(starts: int, repeat: int) -> int:
    m = measure_cluster(starts, repeat)
    start = sorted(m["start_ms"])
    p95 = statistics.quantiles(start, n=20)[-1] if len(start) >= 2 else start[0]
    exec_ms = statistics.median(m["times"])
    local = f"{statistics.median(m['local_times']):.2f} ms, local backend" if m["local_times"] else "—"
    print("| metric (real one-node cluster, kube-router) | ours | baseline | target |")
    print("|---|---:|---:|---|")
    print(f"| API requests to start, namespace exists | {len(m['requests']['existing'])} | — | ≤ 6 |")
    print(f"| API requests to start, new namespace | {len(m['requests']['new'])} | — | report |")
    print(f"| start → first 1+1 result, image present (median / p95 of {len(start)}) | "
          f"{statistics.median(start) / 1000:.2f} s / {p95 / 1000:.2f} s | — | report |")
    print(f"| exec round trip of 1+1 (median, {len(m['times'])} cells) | {exec_ms:.2f} ms | {local} | report |")
    enforce = f"{m['enforce_ms'] / 1000:.2f} s" if m["enforce_ms"] is not None else "not enforced in 600 tries"
    print(f"| apply_policy (allow HOST:PORT/tcp) → connection succeeds | {enforce} | — | report |")
    print(f"\nstart with the namespace set up: {', '.join(m['requests']['existing'])}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=50, help="cells per round-trip measurement")
    parser.add_argument("--cluster", action="store_true", help="measure on the real test cluster")
    parser.add_argument("--starts", type=int, default=10, help="--cluster: sandbox starts to time")
    args = parser.parse_args(argv)
    if args.cluster:
        return main_cluster(args.starts, args.repeat)
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
