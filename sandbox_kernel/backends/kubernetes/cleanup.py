"""Removing what the Kubernetes backend leaves behind: ended pods and orphaned egress objects."""

from __future__ import annotations

import datetime
import time
from typing import TYPE_CHECKING

from . import objects
from .errors import _NotFound

if TYPE_CHECKING:
    from .backend import KubernetesBackend


#: in a one-namespace sweep (``ended_only``), egress objects younger than this are kept:
#: another start of the same user applies its objects before it creates its pod
YOUNG_OBJECT = 600.0


def sweep(backend: KubernetesBackend, max_age: float, *, now: float | None = None, namespace: str | None = None,
          ended_only: bool = False) -> list[str]:
    """Remove orphans by label and age, through ``backend``'s API access and with its
    enforcers' kinds; return what was removed ("pods ns/name", …). See :func:`gc
    <sandbox_kernel.backends.kubernetes.backend.gc>` for what counts as an orphan."""
    from kubernetes import client

    api = backend.api_client()
    core = client.CoreV1Api(api)
    selector = f"{objects.MANAGED_BY_LABEL}={objects.MANAGED_BY},{objects.KERNEL_LABEL}"
    now = time.time() if now is None else now
    removed: list[str] = []
    if namespace is None:
        pods = backend._call("list", "pods", None, core.list_pod_for_all_namespaces, label_selector=selector).items
    else:
        pods = backend._call("list", "pods", namespace, core.list_namespaced_pod, namespace, label_selector=selector).items
    live_kernels: set[tuple[str, str]] = set()
    for pod in pods:
        meta = pod.metadata
        created = meta.creation_timestamp
        age = now - created.timestamp() if isinstance(created, datetime.datetime) else 0
        ended = pod.status is not None and pod.status.phase in ("Succeeded", "Failed")
        if ended or (age > max_age and not ended_only):
            try:
                backend._call("delete", "pods", meta.namespace, core.delete_namespaced_pod, meta.name,
                              meta.namespace, grace_period_seconds=1)
                removed.append(f"pods {meta.namespace}/{meta.name}")
            except _NotFound:
                pass
        else:
            live_kernels.add((meta.namespace, meta.labels.get(objects.KERNEL_LABEL, "")))
    for group, version, plural in backend._kinds():
        if (group, plural) == ("networking.k8s.io", "networkpolicies"):
            networking = client.NetworkingV1Api(api)
            if namespace is None:
                items = backend._call("list", plural, None, networking.list_network_policy_for_all_namespaces,
                                      label_selector=selector, group=group).items
            else:
                items = backend._call("list", plural, namespace, networking.list_namespaced_network_policy,
                                      namespace, label_selector=selector, group=group).items
            found = [(i.metadata.namespace, i.metadata.name, (i.metadata.labels or {}).get(objects.KERNEL_LABEL),
                      i.metadata.creation_timestamp) for i in items]
        else:
            custom = client.CustomObjectsApi(api)
            if namespace is None:
                items = backend._call("list", plural, None, custom.list_cluster_custom_object,
                                      group, version, plural, label_selector=selector, group=group)["items"]
            else:
                items = backend._call("list", plural, namespace, custom.list_namespaced_custom_object,
                                      group, version, namespace, plural, label_selector=selector, group=group)["items"]
            found = [(i["metadata"]["namespace"], i["metadata"]["name"], i["metadata"].get("labels", {}).get(objects.KERNEL_LABEL),
                      i["metadata"].get("creationTimestamp")) for i in items]
        for ns, name, kernel, created in found:
            if (ns, kernel) in live_kernels:
                continue
            if ended_only and now - _timestamp(created, now) < YOUNG_OBJECT:
                continue
            if (group, plural) == ("networking.k8s.io", "networkpolicies"):
                call = lambda n=name, s=ns: client.NetworkingV1Api(api).delete_namespaced_network_policy(n, s)
            else:
                call = lambda n=name, s=ns: client.CustomObjectsApi(api).delete_namespaced_custom_object(group, version, s, plural, n)
            try:
                backend._call("delete", plural, ns, call, group=group)
                removed.append(f"{plural} {ns}/{name}")
            except _NotFound:
                pass
    return removed




def _timestamp(value, default: float) -> float:
    """A creationTimestamp (datetime or RFC 3339 text) as epoch seconds; ``default`` if absent."""
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return default
    return default
