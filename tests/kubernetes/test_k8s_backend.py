"""KubernetesBackend against the fake API server, with the real agent running locally.

The fake runs the pod's main command (``agent.pyz serve``) as a local process with the
agent ConfigMap materialised, and every exec (``agent.pyz attach``) as another; see
tests/fakekube/kubelet.py. No cluster, no traffic beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from sandbox_kernel.backends import kubernetes as kb
from sandbox_kernel.backends.kubernetes.objects import KERNEL_LABEL
from sandbox_kernel.errors import SandboxStartError
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


def test_start_progress_requests_cell_and_stop(fakekube):
    async def main():
        backend = make_backend(fakekube)
        lines = []
        info = await backend.start("0b9c1e4e2f4d4c8e", EgressPolicy(), lines.append)
        assert lines == ["Preparing namespace user-sandbox-alice…", "Scheduling…", "Scheduled on node fake-node-1",
                         "Pulling image python:3.12-slim…", "Pulled image python:3.12-slim in 1.25s",
                         "Started", "Ready"]
        assert info.details["namespace"] == "user-sandbox-alice"
        first_start = [(r.verb, r.resource) for r in fakekube.requests if r.verb != "list"]  # not the sweep
        transport = await backend.attach()
        await hello(transport)
        out, done = await execute(transport, "print(6 * 7)")
        assert out == "42\n" and done["exit_status"] == 0
        out, done = await execute(transport, "raise SystemExit(3)", 2)
        assert done["exit_status"] == 3
        await backend.stop()
        return first_start

    first_start = run(main())
    # namespace did not exist: GET, 6 applies, the setup mark, policy, pod, 2 watches
    assert len(first_start) == 12, first_start
    assert fakekube.objects("pods", "user-sandbox-alice") == []
    assert [o["metadata"]["name"] for o in fakekube.objects("networkpolicies", "user-sandbox-alice")] == \
        ["sandbox-default-deny"]  # the kernel's egress policy went with its pod
    assert fakekube.objects("namespaces", None)  # the namespace stays
    time.sleep(0.3)
    assert fakekube.processes() == []


def test_start_in_existing_namespace_is_five_requests_and_no_polling(fakekube):
    async def main():
        first = make_backend(fakekube)
        await first.start("k-one", EgressPolicy(), lambda line: None)
        await first._gc_task
        fakekube.clear_requests()
        lines = []
        second = make_backend(fakekube)
        await second.start("k-two", EgressPolicy(), lines.append)
        await second._gc_task  # after Ready: the user's namespace swept, one LIST per kind
        return lines

    lines = run(main())
    sweep = [(r.verb, r.resource) for r in fakekube.requests if r.verb == "list"]
    assert sweep == [("list", "pods"), ("list", "networkpolicies")]
    calls = [(r.verb, r.resource) for r in fakekube.requests if r.verb != "list"]
    assert calls[:3] == [("get", "namespaces"), ("patch", "networkpolicies"), ("create", "pods")]
    assert sorted(calls[3:]) == [("watch", "events"), ("watch", "pods")]  # two watches, in parallel
    assert len(calls) == 5
    assert not [c for c in calls if c[0] in ("get", "list") and c[1] == "pods"]  # zero polling
    assert "Preparing namespace user-sandbox-alice…" not in lines


def test_watch_resumes_from_create_resource_version(fakekube):
    async def main():
        await make_backend(fakekube).start("k1", EgressPolicy(), lambda line: None)

    run(main())
    create = next(r for r in fakekube.requests if r.verb == "create" and r.resource == "pods")
    watches = [r for r in fakekube.requests if r.verb == "watch"]
    assert {w.resource for w in watches} == {"pods", "events"}
    assert all(w.query.get("resourceVersion") for w in watches)
    assert watches[0].query["fieldSelector"][0].startswith(("metadata.name=sandbox-k1-", "involvedObject.name=sandbox-k1-"))
    assert create.time <= min(w.time for w in watches)


def test_reattach_keeps_state(fakekube):
    async def main():
        backend = make_backend(fakekube)
        await backend.start("k1", EgressPolicy(), lambda line: None)
        t1 = await backend.attach()
        await hello(t1)
        await execute(t1, "secret = 'kept'")
        await t1.close()
        t2 = await backend.attach()
        await hello(t2)
        out, _ = await execute(t2, "print(secret)", 2)
        await backend.stop()
        return out

    assert run(main()) == "kept\n"
    assert fakekube.count("create", "pods/exec") == 2


def test_deleted_and_evicted_pods_are_reported(fakekube):
    async def main():
        backend = make_backend(fakekube)
        await backend.start("k1", EgressPolicy(), lambda line: None)
        transport = await backend.attach()
        await hello(transport)
        fakekube.evict(backend.namespace, backend.pod)
        assert await asyncio.wait_for(transport.recv(), 10) is None
        evicted = await backend.exit_reason()
        await backend.stop()
        await backend.start("k1", EgressPolicy(), lambda line: None)  # replaced
        transport = await backend.attach()
        await hello(transport)
        fakekube.delete_pod_now(backend.namespace, backend.pod)
        assert await asyncio.wait_for(transport.recv(), 10) is None
        deleted = await backend.exit_reason()
        await backend.stop()
        return evicted, deleted

    evicted, deleted = run(main())
    assert evicted == "the sandbox pod was evicted: The node was low on resource: memory."
    assert deleted in ("the sandbox pod was deleted", "the sandbox pod is being deleted")


def test_rbac_forbidden_names_verb_and_resource(fakekube):
    fakekube.forbid("create", "pods")
    backend = make_backend(fakekube)
    with pytest.raises(kb.KubernetesForbidden) as err:
        run(backend.start("k1", EgressPolicy(), lambda line: None))
    text = str(err.value)
    assert "create pods" in text and 'namespace "user-sandbox-alice"' in text
    assert 'cannot create resource "pods"' in text  # the server's own words follow
    assert (err.value.verb, err.value.resource) == ("create", "pods")
    assert isinstance(err.value, SandboxStartError)
    fakekube.rules.clear()
    fakekube.forbid("patch", "configmaps")
    with pytest.raises(kb.KubernetesForbidden) as err:
        run(make_backend(fakekube, user="bob").start("k2", EgressPolicy(), lambda line: None))
    assert "patch configmaps" in str(err.value)


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


def test_quota_exceeded(fakekube):
    async def main():
        b1 = make_backend(fakekube, quota={"pods": "1"})
        await b1.start("k1", EgressPolicy(), lambda line: None)
        try:
            await make_backend(fakekube, quota={"pods": "1"}).start("k2", EgressPolicy(), lambda line: None)
        finally:
            await b1.stop()

    with pytest.raises(kb.QuotaExceeded) as err:
        run(main())
    assert "quota in namespace user-sandbox-alice is used up" in str(err.value)
    assert "exceeded quota: sandbox-quota" in str(err.value)
    fakekube.exceed_quota()
    with pytest.raises(kb.QuotaExceeded):
        run(make_backend(fakekube).start("k3", EgressPolicy(), lambda line: None))
    assert [p["metadata"]["labels"][KERNEL_LABEL] for p in fakekube.objects("pods")] == []


def test_image_pull_failure(fakekube):
    fakekube.behavior.image_pull_error = "rpc error: code = NotFound desc = manifest unknown"
    lines = []
    with pytest.raises(kb.ImagePullFailed) as err:
        run(make_backend(fakekube, image="example.invalid/nope:1").start("k1", EgressPolicy(), lines.append))
    assert "example.invalid/nope:1 could not be pulled" in str(err.value)
    assert "manifest unknown" in str(err.value)
    assert "Pulling image example.invalid/nope:1…" in lines
    assert fakekube.objects("pods") == []  # nothing left behind


def test_unschedulable(fakekube):
    fakekube.behavior.unschedulable = "0/3 nodes are available: 3 Insufficient memory."
    lines = []
    with pytest.raises(kb.Unschedulable) as err:
        run(make_backend(fakekube, schedule_timeout=0.3).start("k1", EgressPolicy(), lines.append))
    assert "Insufficient memory" in str(err.value)
    assert "Waiting for a node: 0/3 nodes are available: 3 Insufficient memory." in lines
    assert fakekube.objects("pods") == []


def test_start_timeout(fakekube):
    fakekube.behavior.run_main = False  # the readiness probe never passes
    with pytest.raises(SandboxStartError) as err:
        run(make_backend(fakekube, start_timeout=0.5).start("k1", EgressPolicy(), lambda line: None))
    assert "not ready within" in str(err.value)


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


def test_idle_timeout_removes_the_pod(fakekube):
    async def main():
        backend = make_backend(fakekube, idle_timeout=0.4)
        await backend.start("k1", EgressPolicy(), lambda line: None)
        transport = await backend.attach()
        await hello(transport)
        await execute(transport, "import time; time.sleep(0.6)")  # a running cell is not idle
        assert backend.pod is not None
        assert await asyncio.wait_for(transport.recv(), 5) is None
        return await backend.exit_reason()

    reason = run(main())
    assert "idle_timeout" in reason
    assert fakekube.objects("pods") == []


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


def test_describe_pod_end():
    base = {"metadata": {}, "status": {}}
    assert kb.describe_pod_end(None) == ("the sandbox pod was deleted", None)
    oom = {"metadata": {}, "status": {"containerStatuses": [{"state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}}
    assert kb.describe_pod_end(oom) == ("the agent in the sandbox pod was killed (out of memory)", 137)
    assert "still running" in kb.describe_pod_end(base)[0]


def test_dropped_stream_reattaches_by_itself_mid_cell(fakekube):
    """The API server side cuts the exec WebSocket (no close frame, no status) while a cell
    runs: the transport re-attaches, the interpreter keeps its state, and the output the
    agent buffered while detached arrives, followed by the cell's done."""
    async def main():
        backend = make_backend(fakekube)
        await backend.start("k1", EgressPolicy(), lambda line: None)
        transport = await backend.attach()
        await hello(transport)
        await execute(transport, "secret = 'kept'")
        await transport.send({"type": "execute", "id": 2, "code": "import time\nprint('before', flush=True)\n"
                              "time.sleep(0.6)\nprint('after')", "silent": False, "store_history": True,
                              "user_expressions": {}, "allow_stdin": False})
        frames = [await asyncio.wait_for(transport.recv(), 10)]
        assert fakekube.drop_exec_streams() == 1
        while frames[-1]["type"] != "done":
            frame = await asyncio.wait_for(transport.recv(), 15)
            assert frame is not None, "the transport ended instead of re-attaching"
            frames.append(frame)
        out, done = await execute(transport, "print(secret)", 3)
        assert fakekube.drop_exec_streams() == 1  # between cells too
        out2, _ = await execute(transport, "print(secret * 2)", 4)
        reattached = transport.reattached
        await backend.stop()
        return frames, out, done, out2, reattached

    frames, out, done, out2, reattached = run(main())
    text = "".join(f.get("text", "") for f in frames if f["type"] == "stream")
    assert text == "before\nafter\n" and frames[-1]["exit_status"] == 0
    assert not [f for f in frames if f["type"] == "hello"]  # the second greeting is not passed on
    assert (out, done["exit_status"], out2) == ("kept\n", 0, "keptkept\n")
    assert reattached == 2
    assert fakekube.count("create", "pods/exec") == 3


def test_interrupt_frame_reaches_the_running_cell(fakekube):
    async def main():
        backend = make_backend(fakekube)
        await backend.start("k1", EgressPolicy(), lambda line: None)
        transport = await backend.attach()
        await hello(transport)
        took = []
        for n, code in enumerate(("while True: pass", "import time; time.sleep(100)"), 1):
            await transport.send({"type": "execute", "id": n, "code": code, "silent": False, "store_history": True,
                                  "user_expressions": {}, "allow_stdin": False})
            await asyncio.sleep(0.3)
            sent = time.monotonic()
            await transport.send({"type": "interrupt"})
            frames = []
            while not frames or frames[-1]["type"] != "done":
                frames.append(await asyncio.wait_for(transport.recv(), 5))
            took.append((time.monotonic() - sent, [f.get("ename") for f in frames if f["type"] == "error"]))
        out, _ = await execute(transport, "print('still here')", 3)
        await backend.stop()
        return took, out

    took, out = run(main())
    for seconds, enames in took:
        assert enames == ["KeyboardInterrupt"] and seconds < 1.0, took
    assert out == "still here\n"


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
