"""Hub mode on the Kubernetes backend: the sandbox service runs ``--backend=kubernetes`` with
a kubeconfig pointing at the fake API server (tests/fakekube), behind the real JupyterHub.
Each user's cells run in a pod in the user's namespace, users are kept apart, a policy change
becomes NetworkPolicy objects, and after a service restart the pod is adopted (same
interpreter)."""

from __future__ import annotations

import asyncio
import time

from sandbox_kernel.backends.kubernetes.objects import KERNEL_LABEL


def _egress(fake, namespace: str, pod: str) -> dict | None:
    return fake.get_object("networkpolicies", namespace, f"{pod}-egress", group="networking.k8s.io")


def _cidrs(netpol: dict) -> set[str]:
    return {peer["ipBlock"]["cidr"] for rule in netpol["spec"].get("egress") or []
            for peer in rule.get("to") or [] if "ipBlock" in peer}


def test_kubernetes_backend_per_user_pods_policy_and_adoption(k8s_kernels, k8s_service, hub):
    svc, fake, kernels = k8s_service, k8s_service.fakekube, k8s_kernels
    alice, bob = kernels.open("alice", proxied=False), kernels.open("bob", proxied=False)
    a_id, b_id = alice.backend.sandbox_id, bob.backend.sandbox_id
    assert a_id != b_id

    # a cell runs in each user's pod, in each user's namespace
    result, out = kernels.execute(alice, "secret = 'alice-only'\nimport socket; print(socket.gethostname())")
    assert result.exit_status == 0, out.frames
    result, out = kernels.execute(bob, "print(globals().get('secret'))")
    assert result.exit_status == 0 and out.stdout().strip() == "None"
    pods = {p["metadata"]["namespace"]: p for p in fake.objects("pods")}
    assert set(pods) == {"user-sandbox-alice", "user-sandbox-bob"}, sorted(pods)
    a = svc.api("GET", f"api/sandboxes/{a_id}", hub.tokens["alice"], proxied=False).json()
    assert (a["state"], a["backend"], a["details"]["namespace"]) == ("running", "kubernetes", "user-sandbox-alice")
    a_pod = a["details"]["pod"]
    assert pods["user-sandbox-alice"]["metadata"]["name"] == a_pod
    assert pods["user-sandbox-alice"]["metadata"]["labels"][KERNEL_LABEL]

    # bob cannot see, change, interrupt or stop alice's sandbox
    wide = {"policy": {"mode": "allowlist", "entries": ["10.231.0.0/16"]}}
    bob_token = hub.tokens["bob"]
    assert svc.api("GET", f"api/sandboxes/{a_id}", bob_token, proxied=False).status_code == 404
    assert svc.api("PUT", f"api/sandboxes/{a_id}/policy", bob_token, proxied=False, json=wide).status_code == 404
    assert svc.api("POST", f"api/sandboxes/{a_id}/interrupt", bob_token, proxied=False).status_code == 404
    assert svc.api("DELETE", f"api/sandboxes/{a_id}", bob_token, proxied=False).status_code == 404
    assert a_id not in {s["id"] for s in svc.api("GET", "api/sandboxes", bob_token, proxied=False).json()["sandboxes"]}
    assert _cidrs(_egress(fake, "user-sandbox-alice", a_pod)) == set() or "10.231.0.0/16" not in _cidrs(
        _egress(fake, "user-sandbox-alice", a_pod))
    assert [p["metadata"]["name"] for p in fake.objects("pods", "user-sandbox-alice")] == [a_pod]

    # alice's policy change becomes her pod's NetworkPolicy in the (fake) cluster
    applied = kernels.run(alice.backend.apply_policy(
        __import__("sandbox_kernel.policy.model", fromlist=["EgressPolicy"]).EgressPolicy.parse(wide["policy"])))
    assert f"NetworkPolicy/{a_pod}-egress" in applied["objects"], applied
    assert "10.231.0.0/16" in _cidrs(_egress(fake, "user-sandbox-alice", a_pod))
    b_pod = pods["user-sandbox-bob"]["metadata"]["name"]
    assert "10.231.0.0/16" not in _cidrs(_egress(fake, "user-sandbox-bob", b_pod))  # bob's stays closed

    # the service restarts: the pods keep running and are adopted, with the same interpreter
    created = fake.count("create", "pods")
    stream = alice.backend._transport._ws

    async def restart_while_the_kernel_runs():
        # the kernels' event loop runs meanwhile (as a real kernel's does): its reader sees the
        # stream end and re-opens it once the new service process has adopted the pod
        started = time.monotonic()
        await asyncio.to_thread(svc.restart)
        while alice.backend._transport._ws is stream:
            # a bound for a hang, not a timing (a restart under CPU load took over 30 s)
            assert time.monotonic() - started < 180, "the kernel did not re-open its stream"
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    took = kernels.run(restart_while_the_kernel_runs())
    print(f"restart + adoption + re-attach: {took:.1f} s")
    result, out = kernels.execute(alice, "print(secret)")
    assert result.exit_status == 0 and out.stdout().strip() == "alice-only", out.frames
    assert fake.count("create", "pods") == created  # adopted, not started again
    assert [p["metadata"]["name"] for p in fake.objects("pods", "user-sandbox-alice")] == [a_pod]
    assert "10.231.0.0/16" in _cidrs(_egress(fake, "user-sandbox-alice", a_pod))  # re-applied, still in force
    assert any(e.get("action") == "adopt" and e.get("sandbox") == a_id for e in svc.audit())

    # stopping removes the pods and their policy objects
    for session in list(kernels.sessions):
        kernels.run(session.stop(), 30)
    kernels.sessions.clear()
    deadline = time.monotonic() + 10
    while fake.objects("pods") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fake.objects("pods") == []
    assert not [o for o in fake.objects("networkpolicies", group="networking.k8s.io")
                if o["metadata"]["name"].endswith("-egress")]


def test_start_up_progress_reaches_the_kernel_and_a_failed_start_says_why(k8s_service, hub):
    """The service's backend reports "Pulling image…" and the like while a pod starts; the
    kernel's HubBackend shows them as they come (it follows the start instead of waiting
    blind), and a start that fails ends with the backend's reason, not a hang."""
    from sandbox_kernel.errors import SandboxStartError
    from sandbox_kernel.hub.backend import HubBackend
    from sandbox_kernel.policy.model import EgressPolicy

    fake = k8s_service.fakekube

    async def start(kernel_id: str) -> tuple[HubBackend, list[tuple[float, str]]]:
        backend = HubBackend(service_url=k8s_service.proxied_url, api_token=hub.tokens["alice"])  # through the hub
        lines: list[tuple[float, str]] = []
        try:
            await backend.start(kernel_id, EgressPolicy(), lambda line: lines.append((time.monotonic(), line)))
        except SandboxStartError as err:
            lines.append((time.monotonic(), f"ERROR {err}"))
        return backend, lines

    fake.behavior.step_delay = 0.3  # slow enough that lines arrive while the start is under way
    backend, lines = asyncio.run(start("k-progress"))
    texts = [t for _, t in lines]
    assert texts[0] == "Asking the sandbox service for a sandbox…"
    assert any(t.startswith("Pulling image") for t in texts), texts
    assert any(t.startswith("Scheduled on node") for t in texts), texts
    assert not any(t.startswith("ERROR") for t in texts), texts
    # they came as the start went, not all at the end
    assert lines[-1][0] - next(when for when, t in lines if t.startswith("Scheduled")) > 0.2
    asyncio.run(backend.stop())

    fake.behavior.image_pull_error = 'rpc error: pull access denied for "python:3.12-slim"'
    started = time.monotonic()
    _, lines = asyncio.run(start("k-doomed"))
    error = lines[-1][1]
    assert error.startswith("ERROR") and "pull access denied" in error, lines
    assert time.monotonic() - started < 60
    failed = [e for e in k8s_service.audit() if e.get("action") == "start" and e.get("result") == "failed"]
    assert failed and "pull access denied" in failed[-1]["reason"]


def test_the_kernel_follows_progress_lines_by_their_count():
    """The service keeps a start's newest 100 lines and counts them all: the kernel shows each
    line once, the newest even after older ones were dropped, and a new start's from its first."""
    from sandbox_kernel.hub.backend import unseen_progress
    from sandbox_kernel.hub.manager import PROGRESS_LINES

    kept = [f"line {n}" for n in range(30, 30 + PROGRESS_LINES)]  # lines 0..129 so far, 30..129 kept
    assert unseen_progress(kept, 130, 125) == (kept[-5:], 130)
    assert unseen_progress(kept, 130, 130) == ([], 130)
    assert unseen_progress(kept, 130, 10) == (kept, 130)  # more came than are kept: all that are
    assert unseen_progress(["Scheduling…"], 1, 130) == (["Scheduling…"], 1)  # a new start
    # a service that sends no count keeps every line
    assert unseen_progress(["a", "b", "c"], None, 1) == (["b", "c"], 3)


class _Gateway:
    """What answered on the service's address while the chart's service pod was replaced on
    the test cluster: a 403 in plain text, not the service's (its errors are JSON). Serves
    the stopped service's port on 127.0.0.1 until :meth:`close`; counts the requests."""

    def __init__(self, port: int):
        import http.server
        import threading

        gateway = self
        self.requests = 0

        class Deny(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                gateway.requests += 1
                body = b"resolve_deny: denied destination"
                self.send_response(403)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Deny)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_a_403_not_from_the_service_during_its_restart_does_not_end_the_reattach(k8s_kernels, k8s_service, hub):
    """While the service is down, something else answers on its address with a 403 that is
    not the service's (plain text): the kernel keeps polling and re-attaches once the service
    is back, and a cell sent while the stream is down waits for the re-attach and runs in the
    same interpreter. (The kernel took any 403 for the service refusing its token and gave up:
    the chart's service on the test cluster, 3 of 5 runs; a send on the closed stream failed
    the cell, and the session then stopped the sandbox.)"""
    svc, kernels = k8s_service, k8s_kernels
    alice = kernels.open("alice", proxied=False)
    result, out = kernels.execute(alice, "kept = 41\nprint('set')")
    assert out.stdout() == "set\n", out.frames
    stream = alice.backend._transport._ws

    async def main():
        await asyncio.to_thread(svc.stop)
        gateway = _Gateway(svc.port)
        try:
            # the kernel saw its stream end and polls: it is answered by the gateway (twice,
            # so the first 403 was not taken as final)
            started = time.monotonic()
            while gateway.requests < 2:
                assert time.monotonic() - started < 120, "the kernel did not poll the service"
                await asyncio.sleep(0.05)
            assert alice.backend._transport is not None and alice.backend._transport._ws is stream
            cell = asyncio.ensure_future(alice.execute("print(kept + 1)", sink))
            await asyncio.sleep(0.5)
            assert not cell.done(), cell  # waits for the stream, not failed
        finally:
            gateway.close()
        await asyncio.to_thread(svc.start)
        return await asyncio.wait_for(cell, 120)

    sink = kernels.Sink()
    result = kernels.run(main(), 240)
    assert result.crashed is None and result.exit_status == 0, result
    assert sink.stdout() == "42\n", sink.frames
    assert alice.backend._transport._ws is not stream
    assert any(e.get("action") == "adopt" for e in svc.audit())
