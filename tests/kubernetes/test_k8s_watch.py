"""The start watch survives what real API servers do to watches (issue 15, point 10).

A clean close (API server restart, load balancer timeout) used to end the watch silently,
so the start waited its whole timeout though the pod was Ready; an ERROR event (410 Gone
after compaction) raised ``KeyError: 'raw_object'``. The fake API server produces each of
these on demand: it holds new watches (as a restarting server would), ends the open ones
cleanly or with an ERROR event, and forgets its history (compaction).
"""

from __future__ import annotations

import asyncio

import pytest

from fakekube.server import ApiError
from sandbox_kernel.backends import kubernetes as kb
from sandbox_kernel.errors import SandboxStartError
from sandbox_kernel.policy.model import EgressPolicy


def make_backend(fakekube):
    # the pod stays Pending until the test makes it Ready
    fakekube.behavior.unschedulable = "0/1 nodes are available: 1 Insufficient cpu."
    backend = kb.KubernetesBackend(client_configuration=fakekube.configuration(), user="alice",
                                   start_timeout=30.0, schedule_timeout=60.0,
                                   gc_on_start=False)  # its LIST after Ready is not the watch's
    backend.always_blocked = ["169.254.0.0/16"]
    return backend


def ready(pod):
    pod["status"] = {"phase": "Running", "conditions": [
        {"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}]}


async def started_watching(fakekube, backend):
    """Start the sandbox in a task; return it once both watches (pod, events) are open."""
    task = asyncio.ensure_future(backend.start("c0ffee0123", EgressPolicy(), lambda line: None))
    for _ in range(300):
        if await asyncio.to_thread(fakekube.open_watches) == 2:
            return task
        assert not task.done(), task.exception()
        await asyncio.sleep(0.05)
    raise AssertionError("the backend never opened its watches")


def _watch_requests(fakekube, resource):
    return [r for r in fakekube.requests if r.verb == "watch" and r.resource == resource]


def test_clean_close_rewatches_from_the_last_resource_version(fakekube):
    backend = make_backend(fakekube)

    async def main():
        task = await started_watching(fakekube, backend)
        first = _watch_requests(fakekube, "pods")[-1]
        await asyncio.to_thread(fakekube.hold_watches)  # the API server restarts
        assert await asyncio.to_thread(fakekube.end_watches) == 2
        await asyncio.to_thread(fakekube.update_pod, backend.namespace, backend.pod, ready)  # meanwhile Ready
        await asyncio.to_thread(fakekube.release_watches)
        info = await asyncio.wait_for(task, 20)  # not the 30 s start timeout
        await backend.stop()
        return first, info

    first, info = asyncio.run(asyncio.wait_for(main(), 60))
    assert info.details["pod"]
    again = _watch_requests(fakekube, "pods")[-1]
    assert again is not first
    assert int(again.query["resourceVersion"][-1]) >= int(first.query["resourceVersion"][-1])
    assert fakekube.count("list", "pods") == 0  # the history had it: no list needed


@pytest.mark.parametrize("code", [410, 500])
def test_error_event_relists_or_rewatches(fakekube, code):
    backend = make_backend(fakekube)

    async def main():
        task = await started_watching(fakekube, backend)
        await asyncio.to_thread(fakekube.hold_watches)
        error = ApiError(code, "Expired" if code == 410 else "InternalError",
                         "too old resource version: 1000 (1200)" if code == 410 else "etcd leader changed")
        assert await asyncio.to_thread(fakekube.end_watches, error) == 2
        await asyncio.to_thread(fakekube.compact)
        await asyncio.to_thread(fakekube.update_pod, backend.namespace, backend.pod, ready)
        await asyncio.to_thread(fakekube.release_watches)
        info = await asyncio.wait_for(task, 20)
        await backend.stop()
        return info

    assert asyncio.run(asyncio.wait_for(main(), 60)).details["pod"]
    if code == 410:
        assert fakekube.count("list", "pods") >= 1  # listed again after the 410 (which may show it Ready)
    else:
        assert len(_watch_requests(fakekube, "pods")) >= 2  # watched again after the 500


RESTARTING = {
    429: ("TooManyRequests", "storage is (re)initializing"),
    # what the test cluster's kube-apiserver answered, just restarted, before its RBAC caches were filled
    403: ("Forbidden", 'pods is forbidden: User "system:serviceaccount:skci-chart:skci-sandbox-kernel" cannot watch '
                       'resource "pods" in API group "" in the namespace "user-sandbox-alice": RBAC: [clusterrole.'
                       'rbac.authorization.k8s.io "skci-sandbox-kernel-sandbox" not found]'),
}


@pytest.mark.parametrize("code", sorted(RESTARTING))
def test_watches_refused_while_the_restarted_server_fills_its_caches_are_retried(fakekube, code):
    """A restarted kube-apiserver serves before its caches are filled: watches get 429
    "storage is (re)initializing", and 403 while its RBAC authorizer has not seen the roles
    yet (test_k8s_restart.py met the 403 on the real cluster, at a moment it cannot choose):
    a watch the identity was allowed to open before is retried, not reported."""
    backend = make_backend(fakekube)
    reason, message = RESTARTING[code]

    async def main():
        task = await started_watching(fakekube, backend)
        await asyncio.to_thread(fakekube.hold_watches)
        for resource in ("pods", "events"):
            await asyncio.to_thread(fakekube.fail, "watch", resource, code, reason, message, times=2)
        assert await asyncio.to_thread(fakekube.end_watches) == 2
        await asyncio.to_thread(fakekube.update_pod, backend.namespace, backend.pod, ready)
        await asyncio.to_thread(fakekube.release_watches)
        info = await asyncio.wait_for(task, 20)
        await backend.stop()
        return info

    assert asyncio.run(asyncio.wait_for(main(), 60)).details["pod"]
    assert len(_watch_requests(fakekube, "pods")) >= 4  # the first, two refused, the one that saw Ready


def test_a_refusal_that_lasts_is_reported_as_rbac(fakekube, monkeypatch):
    """A 403 that outlasts the retry window is the identity's lost right: the typed error."""
    monkeypatch.setattr(kb._Watch, "UNREACHABLE_FOR", 1.0)
    backend = make_backend(fakekube)

    async def main():
        task = await started_watching(fakekube, backend)
        await asyncio.to_thread(fakekube.hold_watches)
        for resource in ("pods", "events"):
            await asyncio.to_thread(fakekube.fail, "watch", resource, 403, *RESTARTING[403], times=None)
        assert await asyncio.to_thread(fakekube.end_watches) == 2
        await asyncio.to_thread(fakekube.release_watches)
        with pytest.raises(kb.KubernetesForbidden, match="watch (pods|events)"):
            await asyncio.wait_for(task, 20)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_first_watch_refused_is_reported_at_once(fakekube):
    """Never allowed: no retry (the identity lacks the right)."""
    fakekube.forbid("watch", "pods")
    backend = make_backend(fakekube)
    with pytest.raises(kb.KubernetesForbidden, match="watch pods"):
        asyncio.run(asyncio.wait_for(backend.start("c0ffee0123", EgressPolicy(), lambda line: None), 10))


def test_pod_deleted_while_the_watch_was_gone_is_reported(fakekube):
    backend = make_backend(fakekube)

    async def main():
        task = await started_watching(fakekube, backend)
        await asyncio.to_thread(fakekube.hold_watches)
        await asyncio.to_thread(fakekube.end_watches, ApiError(410, "Expired", "too old resource version"))
        await asyncio.to_thread(fakekube.delete_pod_now, backend.namespace, backend.pod)
        await asyncio.to_thread(fakekube.compact)
        await asyncio.to_thread(fakekube.release_watches)
        with pytest.raises(SandboxStartError, match="was deleted while starting"):
            await asyncio.wait_for(task, 20)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_forbidden_error_event_is_a_typed_error(fakekube):
    backend = make_backend(fakekube)

    async def main():
        task = await started_watching(fakekube, backend)
        await asyncio.to_thread(fakekube.end_watches, ApiError(403, "Forbidden", 'pods is forbidden: User "x" cannot watch resource "pods" in API group "" in the namespace "user-sandbox-alice"'))
        with pytest.raises(kb.KubernetesForbidden, match="watch (pods|events)"):
            await asyncio.wait_for(task, 20)

    asyncio.run(asyncio.wait_for(main(), 60))
