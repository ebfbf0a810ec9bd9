"""KubernetesBackend against the fake API server, with the real agent running locally:
only what the real cluster (tests/kubernetes/test_k8s_real.py) cannot show on demand.

The fake runs the pod's main command (``agent.pyz serve``) as a local process with the
agent ConfigMap materialised, and every exec (``agent.pyz attach``) as another; see
tests/fakekube/kubelet.py. No cluster, no traffic beyond 127.0.0.1. What stays here, and
why, is listed in docs/kubernetes.md ("Which tests run where"): a node-pressure eviction,
an exec refused by RBAC while pods are allowed, the Cilium and GKE FQDN kinds (no such
enforcer on the local cluster), every enforcer's calls against REQUIRED_PERMISSIONS,
pod ages beyond gc's max age without waiting for them, and properties of this process
(nothing blocks the event loop) that need no cluster.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from sandbox_kernel.backends import kubernetes as kb
from sandbox_kernel.policy.model import EgressPolicy

BLOCKED = ["169.254.0.0/16", "10.0.0.0/8"]


def make_backend(fakekube, **kw):
    kw.setdefault("user", "alice")
    kw.setdefault("start_timeout", 20.0)
    backend = kb.KubernetesBackend(client_configuration=fakekube.configuration(), **kw)
    backend.always_blocked = BLOCKED
    return backend


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def execute(transport, code, cell_id=1):
    await transport.send({"type": "execute", "id": cell_id, "code": code, "silent": False,
                          "store_history": True, "user_expressions": {}, "allow_stdin": False})
    out, done = [], None
    while done is None:
        frame = await asyncio.wait_for(transport.recv(), 15)
        assert frame is not None, "stream ended during a cell"
        if frame["type"] == "stream":
            out.append(frame["text"])
        elif frame["type"] == "done":
            done = frame
    return "".join(out), done


async def hello(transport):
    frame = await asyncio.wait_for(transport.recv(), 15)
    assert frame["type"] == "hello"
    return frame


def test_a_node_pressure_eviction_is_reported(fakekube):
    """Fault: the kubelet evicts the pod for node memory pressure (status reason Evicted and
    the kubelet's message), which a test cannot cause on demand on a shared node. A pod
    deleted from outside is covered on the real cluster (test_k8s_real.py)."""
    async def main():
        backend = make_backend(fakekube)
        await backend.start("k1", EgressPolicy(), lambda line: None)
        transport = await backend.attach()
        await hello(transport)
        fakekube.evict(backend.namespace, backend.pod)
        assert await asyncio.wait_for(transport.recv(), 10) is None
        evicted = await backend.exit_reason()
        await backend.stop()
        return evicted

    assert run(main()) == "the sandbox pod was evicted: The node was low on resource: memory."


def test_exec_forbidden(fakekube):
    fakekube.forbid("create", "pods/exec")

    async def main():
        backend = make_backend(fakekube)
        await backend.start("k1", EgressPolicy(), lambda line: None)
        try:
            await backend.attach()
        finally:
            await backend.stop()

    with pytest.raises(kb.KubernetesForbidden) as err:
        run(main())
    assert "create pods/exec" in str(err.value)


def test_event_loop_never_blocks(fakekube):
    # Nothing that waits on the network may run on the event loop: every REST request and
    # every write to the exec stream must come from another thread. (Measuring the loop's
    # longest gap said the same only on an idle machine: under load a gap of 2.5 s was the
    # scheduler's, not the backend's.) The opening frame of each exec stream was written on
    # the loop (ExecTransport's constructor) and failed this.
    calls: list[tuple[str, bool]] = []

    async def main():
        loop_thread = threading.get_ident()
        backend = make_backend(fakekube)
        rest = backend.api_client().rest_client
        plain_request = rest.request

        def request(method, url, *args, **kwargs):
            calls.append((f"{method} {url.split('?')[0]}", threading.get_ident() == loop_thread))
            return plain_request(method, url, *args, **kwargs)

        rest.request = request
        plain_open = backend._open_exec

        def open_exec(command):
            calls.append(("open exec", threading.get_ident() == loop_thread))
            ws = plain_open(command)
            plain_write = ws.write_stdin

            def write_stdin(data):
                calls.append(("exec stdin", threading.get_ident() == loop_thread))
                return plain_write(data)

            ws.write_stdin = write_stdin
            return ws

        backend._open_exec = open_exec
        await backend.start("k1", EgressPolicy(), lambda line: None)
        await backend.apply_policy(EgressPolicy(mode="allowlist", entries=("203.0.113.0/24:443",)))
        transport = await backend.attach()
        await hello(transport)
        await execute(transport, "1+1")
        await backend.stop()

    run(main())
    kinds = {name.split()[0] for name, _ in calls}
    assert {"POST", "GET", "open", "exec"} <= kinds, calls  # the test saw every kind of call
    on_loop = [name for name, blocked in calls if blocked]
    assert on_loop == [], f"blocking calls on the event loop: {on_loop}"


def test_apply_policy_updates_and_prunes(fakekube):
    async def main():
        backend = make_backend(fakekube, enforcers=["networkpolicy", "cilium"])
        await backend.start("k1", EgressPolicy(), lambda line: None)
        applied = await backend.apply_policy(EgressPolicy(mode="allowlist", entries=("203.0.113.0/24:443",)))
        ns = backend.namespace
        nps = {o["metadata"]["name"]: o for o in fakekube.objects("networkpolicies", ns)}
        cnps = fakekube.objects("ciliumnetworkpolicies", ns, group="cilium.io")
        await backend.stop()
        after = (fakekube.objects("networkpolicies", ns), fakekube.objects("ciliumnetworkpolicies", ns, group="cilium.io"))
        return backend, applied, nps, cnps, after

    backend, applied, nps, cnps, (nps_after, cnps_after) = run(main())
    egress = [o for name, o in nps.items() if name != "sandbox-default-deny"]
    assert len(egress) == 1 and "203.0.113.0/24" in str(egress[0]["spec"]["egress"])
    assert len(cnps) == 1
    assert applied["objects"] and applied["enforcer"] == "networkpolicy,cilium"
    assert [o["metadata"]["name"] for o in nps_after] == ["sandbox-default-deny"] and cnps_after == []


def test_gc_removes_orphans_by_label_and_age(fakekube):
    async def main():
        live = make_backend(fakekube)
        await live.start("live", EgressPolicy(), lambda line: None)
        orphan = make_backend(fakekube, user="bob")
        await orphan.start("orphan", EgressPolicy(), lambda line: None)
        await asyncio.gather(live._gc_task, orphan._gc_task)  # their own start sweeps are done
        fakekube.evict(orphan.namespace, orphan.pod)  # ended: always an orphan
        removed = await asyncio.to_thread(kb.gc, 3600, fakekube.api_client())
        kept = [p["metadata"]["name"] for p in fakekube.objects("pods")]
        removed_old = await asyncio.to_thread(kb.gc, 0, fakekube.api_client(), None, time.time() + 10)
        return live, orphan, removed, kept, removed_old

    live, orphan, removed, kept, removed_old = run(main())
    assert f"pods {orphan.namespace}/{orphan.pod}" in removed
    assert f"networkpolicies {orphan.namespace}/{orphan.pod}-egress" in removed
    assert kept == [live.pod]
    assert f"pods {live.namespace}/{live.pod}" in removed_old
    assert fakekube.objects("pods") == []
    # namespaces and their default-deny policies stay
    assert {o["metadata"]["name"] for o in fakekube.objects("networkpolicies")} == {"sandbox-default-deny"}


def test_every_call_is_in_required_permissions(fakekube):
    async def main():
        backend = make_backend(fakekube, enforcers=["networkpolicy", "gke-fqdn", "cilium"])
        await backend.start("k1", EgressPolicy(), lambda line: None)
        transport = await backend.attach()
        await hello(transport)
        await backend.apply_policy(EgressPolicy(mode="allowlist", entries=("203.0.113.7",)))
        await backend.exit_reason()
        await backend.stop()
        await asyncio.to_thread(kb.gc, 0, fakekube.api_client(), ["networkpolicy", "gke-fqdn", "cilium"])

    run(main())
    used = fakekube.permissions_used()
    assert used - set(kb.REQUIRED_PERMISSIONS) == set()
    assert ("", "pods/exec", "create") in used and ("", "pods", "watch") in used


def test_config_is_lazy_and_missing_credentials_are_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    backend = kb.KubernetesBackend(user="alice")  # constructing loads nothing
    assert backend._config is None
    with pytest.raises(kb.KubernetesUnavailable) as err:
        backend.check()
    assert "no Kubernetes credentials" in str(err.value)


def test_traits_read_environment(monkeypatch):
    monkeypatch.setenv("SANDBOX_KERNEL_K8S_IMAGE", "registry.example/sandbox:1")
    monkeypatch.setenv("SANDBOX_KERNEL_K8S_ENFORCERS", "cilium, networkpolicy")
    monkeypatch.setenv("SANDBOX_KERNEL_K8S_TOLERATIONS", '[{"key": "spot", "operator": "Exists"}]')
    monkeypatch.setenv("JUPYTERHUB_USER", "carol")
    b = kb.KubernetesBackend()
    assert (b.image, b.enforcers, b.tolerations, b.user) == (
        "registry.example/sandbox:1", ["cilium", "networkpolicy"], [{"key": "spot", "operator": "Exists"}], "carol")
    for name, trait in b.traits(config=True).items():
        assert "Env: " in trait.help, name


class _LateReader:
    """The transport's log, slowed where the reader thread reports a cut stream: the reader
    then notices the cut seconds after a send did (as under CPU load on a busy node)."""

    def __init__(self, log, delay: float):
        self._log, self.delay, self.cuts = log, delay, 0

    def info(self, msg, *args):
        if msg.startswith("exec stream cut"):
            self.cuts += 1
            time.sleep(self.delay)
        self._log.info(msg, *args)

    def __getattr__(self, name):
        return getattr(self._log, name)


def test_a_send_right_after_the_exec_socket_is_shut_waits_for_the_reattach(fakekube):
    """The cell sent at once after the exec socket was shut, before the reader thread saw the
    cut (it is held 2 s): the send waits for the re-attach and the cell runs in the same
    interpreter. (The writer gave the reader 1 s, then raised the socket's own error, e.g.
    "socket is already closed": seen once on the real cluster.)"""
    import socket

    async def main():
        backend = make_backend(fakekube)
        await backend.start("k1", EgressPolicy(), lambda line: None)
        try:
            transport = await backend.attach()
            await hello(transport)
            out, _ = await execute(transport, "kept = 'state'\nprint(1)", "c1")
            assert out == "1\n"
            transport.log = late = _LateReader(transport.log, 2.0)
            transport.ws.sock.sock.shutdown(socket.SHUT_RDWR)
            out, done = await execute(transport, "print(kept)", "c2")
            assert (out, done["status"]) == ("state\n", "ok")
            assert late.cuts == 1 and transport.reattached == 1
            await transport.close()
        finally:
            await backend.stop()

    run(main())


def test_an_exec_stream_cut_by_a_tcp_reset_is_reattached(fakekube):
    """The API server's side resets the exec connection (seen on the real cluster after the
    kernel's socket was shut: the reader's read fails with ECONNRESET first). The reader
    re-attaches and the next cell runs in the same interpreter. (The reader's read of the exit
    status after the cut polled the dead socket once more, raised "Connection to remote host
    was lost." and ended the reader without a re-attach; the cell then failed.)"""
    async def main():
        backend = make_backend(fakekube)
        await backend.start("k1", EgressPolicy(), lambda line: None)
        try:
            transport = await backend.attach()
            await hello(transport)
            await execute(transport, "kept = 'state'", "c1")
            assert fakekube.drop_exec_streams(reset=True) == 1
            out, done = await execute(transport, "print(kept)", "c2")
            assert (out, done["status"]) == ("state\n", "ok")
            assert transport.reattached == 1
            await transport.close()
        finally:
            await backend.stop()

    run(main())


def test_a_send_after_the_reattach_gave_up_fails_in_plain_words(fakekube):
    """The stream is cut and cannot be re-opened (exec now refused): the send says so in plain
    words, as a ConnectionError (the Session reports the cell as ended), never the socket's
    own error."""
    import socket

    async def main():
        backend = make_backend(fakekube)
        await backend.start("k1", EgressPolicy(), lambda line: None)
        try:
            transport = await backend.attach()
            await hello(transport)
            await execute(transport, "print(1)", "c1")
            transport.MAX_REATTACH, transport.REATTACH_FOR = 1, 0.0
            transport.log = _LateReader(transport.log, 2.0)
            fakekube.forbid("create", "pods/exec")
            transport.ws.sock.sock.shutdown(socket.SHUT_RDWR)
            with pytest.raises(ConnectionError) as err:
                await execute(transport, "print(2)", "c2")
            assert transport.reattached == 0
            await transport.close()
            return str(err.value)
        finally:
            await backend.stop()

    assert run(main()) == "the exec stream to the sandbox was cut and could not be re-opened"


def test_describe_pod_end():
    base = {"metadata": {}, "status": {}}
    assert kb.describe_pod_end(None) == ("the sandbox pod was deleted", None)
    oom = {"metadata": {}, "status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}
    assert kb.describe_pod_end(oom) == ("the agent in the sandbox pod was killed (out of memory)", 137)
    assert "still running" in kb.describe_pod_end(base)[0]


def test_pod_alive_decides_reattach():
    running = {"metadata": {}, "status": {"phase": "Running", "containerStatuses": [{"state": {"running": {}}}]}}
    assert kb.pod_alive(running)
    assert not kb.pod_alive(None)
    assert not kb.pod_alive({**running, "metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}})
    assert not kb.pod_alive({"metadata": {}, "status": {"phase": "Failed", "reason": "Evicted"}})
    assert not kb.pod_alive({"metadata": {}, "status": {"phase": "Running", "containerStatuses": [
        {"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}})


def test_istio_is_no_longer_an_enforcer(fakekube):
    """Issue 15 point 7: the istio enforcer could not work as built; a configuration that
    still names it fails the start with the reason instead of applying objects that enforce
    nothing."""
    from sandbox_kernel.errors import SandboxError
    from sandbox_kernel.policy.enforcers import ENFORCERS

    assert "istio" not in ENFORCERS and "istio" not in kb.ENFORCER_KINDS
    backend = make_backend(fakekube, enforcers=["networkpolicy", "istio"])
    with pytest.raises(SandboxError, match="istio enforcer was removed"):
        backend.check()


def test_triggered_scale_up_restarts_the_schedule_timeout():
    """Issue 15 point 12: Autopilot and gVisor pools scale up for minutes; the scheduling
    timeout counts from the last TriggeredScaleUp, not from the first FailedScheduling."""
    now = [0.0]
    lines = []
    tracker = kb.StartTracker("python:3.12-slim", lines.append, clock=lambda: now[0])
    tracker.event({"reason": "FailedScheduling", "message": "0/3 nodes are available"})
    now[0] = 100.0
    tracker.event({"reason": "TriggeredScaleUp", "message": "pod triggered scale-up: [{pool 1->2}]"})
    now[0] = 200.0
    tracker.tick(120.0)  # 200 s since the first refusal, 100 s since the scale-up: still waiting
    now[0] = 221.0
    with pytest.raises(kb.Unschedulable):
        tracker.tick(120.0)
    assert lines == ["Waiting for a node: 0/3 nodes are available", "Waiting for the cluster to add a node…"]
