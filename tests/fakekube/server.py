"""A fake Kubernetes API server that speaks real HTTP and the exec WebSocket protocol.

The unmodified official ``kubernetes`` client talks to it exactly as to a cluster:

    fake = FakeKube().start()
    api = kubernetes.client.CoreV1Api(fake.api_client())

It runs tornado on 127.0.0.1 (random port, plain HTTP, bearer token) in a background
thread with its own event loop. What it does, and what it does not, is listed in
docs/kubernetes.md ("The fake API server").
"""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

import tornado.httpserver
import tornado.netutil
import tornado.web
import tornado.websocket
import yaml

from . import resources as R
from .kubelet import Kubelet, LocalRunner, PodBehavior, kill, now

EXEC_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")


@dataclass
class RecordedRequest:
    """One request as the fake saw it (RBAC terms: verb, API group, resource)."""

    method: str
    path: str
    verb: str
    group: str
    resource: str  # with subresource: "pods/exec"
    namespace: str | None
    name: str | None
    query: dict[str, list[str]] = field(default_factory=dict)
    content_type: str | None = None
    time: float = 0.0


@dataclass
class Rule:
    """A canned failure: requests matching verb/group/resource(/namespace) get ``code``."""

    verb: str
    resource: str
    group: str = ""
    namespace: str | None = None
    code: int = 403
    reason: str = "Forbidden"
    message: str | None = None
    times: int | None = None  # None: forever

    def matches(self, req: RecordedRequest) -> bool:
        return (self.verb in ("*", req.verb) and self.resource in ("*", req.resource)
                and self.group == req.group and self.namespace in (None, req.namespace))


class ApiError(Exception):
    """Turned into a ``kind: Status`` response body."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return body


@dataclass
class _Watcher:
    rtype: R.ResourceType
    namespace: str | None
    labels: Any
    fields: Any
    queue: asyncio.Queue


@dataclass
class _Route:
    group: str
    version: str
    plural: str
    namespace: str | None
    name: str | None
    subresource: str | None


def parse_route(path: str) -> _Route | None:
    """``/api/v1/namespaces/ns/pods/p/exec`` → its parts; None for an unknown shape."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = None
    if rest[:1] == ["namespaces"] and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    if not rest or len(rest) > 3:
        return None
    return _Route(group, version, rest[0], namespace, rest[1] if len(rest) > 1 else None,
                  rest[2] if len(rest) > 2 else None)


def _verb(method: str, route: _Route, query: dict) -> str:
    watch = query.get("watch", ["false"])[-1] in ("true", "1")
    if method == "GET":
        return "watch" if watch else ("get" if route.name else "list")
    if method == "DELETE":
        return "delete" if route.name else "deletecollection"
    return {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, method.lower())


class FakeKube:
    """The fake cluster: object store, watch fan-out, RBAC/quota rules, kubelet, exec.

    Thread-safe for tests: every public method may be called from the test thread while
    the server runs. ``runner`` runs pod commands (default :class:`LocalRunner`).
    """

    def __init__(self, runner: Any = None, token: str = "fake-token",
                 user: str = "system:serviceaccount:sandbox:hub"):
        self.runner = runner if runner is not None else LocalRunner()
        if isinstance(self.runner, LocalRunner):
            self.runner.lookup_configmap = lambda ns, name: self.get_object("configmaps", ns, name)
        self.token = token
        self.user = user
        self.behavior = PodBehavior()
        self.exec_protocols = EXEC_PROTOCOLS
        self.requests: list[RecordedRequest] = []
        self.rules: list[Rule] = []
        self._lock = threading.RLock()
        self._store: dict[tuple[str, str], dict[tuple[str | None, str], dict]] = {}
        self._rv = 1000
        self._history: list[tuple[int, str, R.ResourceType, dict]] = []
        self._watchers: list[_Watcher] = []
        self._procs: set[asyncio.subprocess.Process] = set()
        self._kubelets: dict[str, Kubelet] = {}
        self._exec_handlers: set[ExecHandler] = set()
        self._tasks: set[asyncio.Future] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None
        self.port = 0

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> FakeKube:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), name="fakekube", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake API server did not start")
        return self

    def _serve(self, ready: threading.Event) -> None:
        async def main():
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            self._watch_gate = asyncio.Event()
            self._watch_gate.set()
            app = tornado.web.Application([
                (r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/(exec|attach)", ExecHandler, {"fake": self}),
                (r"/.*", ApiHandler, {"fake": self}),
            ])
            server = tornado.httpserver.HTTPServer(app)
            sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
            self.port = sockets[0].getsockname()[1]
            server.add_sockets(sockets)
            ready.set()
            await self._stopped.wait()
            server.stop()
            for watcher in list(self._watchers):
                watcher.queue.put_nowait(None)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*(kill(p, 0.3) for p in list(self._procs)), return_exceptions=True)
            await asyncio.sleep(0.05)
            await server.close_all_connections()

        asyncio.run(main())

    def stop(self) -> None:
        """Stop serving, kill every process the fake started, remove its temp dirs."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)
        if hasattr(self.runner, "close"):
            self.runner.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def configuration(self):
        """A ``kubernetes.client.Configuration`` pointing at this fake (bearer token)."""
        from kubernetes import client

        config = client.Configuration(host=self.url)
        # "BearerToken" is the auth setting's name from client 34, "authorization" before
        config.api_key = {"BearerToken": self.token, "authorization": self.token}
        config.api_key_prefix = {"BearerToken": "Bearer", "authorization": "Bearer"}
        return config

    def api_client(self):
        from kubernetes import client

        return client.ApiClient(self.configuration())

    # --- test controls ---------------------------------------------------------

    def forbid(self, verb: str, resource: str, group: str = "", namespace: str | None = None) -> None:
        """Answer ``verb`` on ``resource`` with 403 Forbidden as RBAC would."""
        self.rules.append(Rule(verb, resource, group, namespace))

    def fail(self, verb: str, resource: str, code: int, reason: str, message: str,
             group: str = "", namespace: str | None = None, times: int | None = 1) -> None:
        """Answer the next ``times`` matching requests with this error."""
        self.rules.append(Rule(verb, resource, group, namespace, code, reason, message, times))

    def exceed_quota(self, namespace: str | None = None, quota: str = "sandbox-quota") -> None:
        """Refuse pod creation with the quota-exceeded 403 a real server sends."""
        self.rules.append(Rule("create", "pods", "", namespace, 403, "Forbidden",
                               f"exceeded quota: {quota}, requested: limits.memory=2Gi, "
                               "used: limits.memory=4Gi, limited: limits.memory=4Gi"))

    # what real API servers do to watches, on demand (restarts, compaction, LB timeouts)

    def hold_watches(self) -> None:
        """New watch requests wait (as during an API server restart) until release_watches()."""
        self._call(lambda: self._watch_gate.clear())

    def release_watches(self) -> None:
        self._call(lambda: self._watch_gate.set())

    def end_watches(self, error: ApiError | None = None) -> int:
        """End every open watch: cleanly, or after an ERROR event carrying ``error`` (410
        Expired as after compaction, 500 …). Returns how many were open."""
        def do():
            for watcher in list(self._watchers):
                if error is not None:
                    watcher.queue.put_nowait({"type": "ERROR", "object": error.status()})
                watcher.queue.put_nowait(None)
            return len(self._watchers)
        return self._call(do)

    def compact(self) -> None:
        """Forget the event history, as etcd compaction does: a watch from an older
        resourceVersion then gets 410 Expired and the client must list again."""
        with self._lock:
            self._history.clear()

    def open_watches(self, resource: str | None = None) -> int:
        with self._lock:
            return sum(1 for w in self._watchers if resource is None or w.rtype.plural == resource)

    def clear_requests(self) -> None:
        self.requests.clear()

    def count(self, verb: str | None = None, resource: str | None = None) -> int:
        return sum(1 for r in self.requests if verb in (None, r.verb) and resource in (None, r.resource))

    def permissions_used(self) -> set[tuple[str, str, str]]:
        """Every (apiGroup, resource, verb) seen, for checking against RBAC lists."""
        return {(r.group, r.resource, r.verb) for r in self.requests if r.resource}

    @staticmethod
    def _group_of(plural: str, group: str | None) -> str:
        if group is not None:
            return group
        groups = {r.group for r in R.RESOURCE_TYPES if r.plural == plural}
        if len(groups) != 1:
            raise KeyError(f"unknown or ambiguous resource {plural!r}")
        return groups.pop()

    def get_object(self, plural: str, namespace: str | None, name: str, group: str | None = None) -> dict | None:
        group = self._group_of(plural, group)
        with self._lock:
            obj = self._store.get((group, plural), {}).get((namespace, name))
            return copy.deepcopy(obj) if obj else None

    def objects(self, plural: str, namespace: str | None = None, group: str | None = None) -> list[dict]:
        """Stored objects of one resource (the API group is found from the plural)."""
        group = self._group_of(plural, group)
        with self._lock:
            return [copy.deepcopy(o) for (ns, _), o in self._store.get((group, plural), {}).items()
                    if namespace in (None, ns)]

    def put_object(self, obj: dict) -> dict:
        """Store ``obj`` directly (no HTTP, no RBAC), e.g. to seed a namespace or a CRD."""
        rtype = next(r for r in R.RESOURCE_TYPES if r.kind == obj["kind"] and r.api_version == obj["apiVersion"])
        return self._call(lambda: self._create(rtype, obj.get("metadata", {}).get("namespace"), obj))

    def write_kubeconfig(self, path) -> str:
        """A kubeconfig for this server (bearer token) at ``path``, for code that loads its
        own configuration (the CLI, a sandbox service process); returns the path."""
        with open(path, "w") as f:
            yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
                "users": [{"name": "tester", "user": {"token": self.token}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester"}}],
            }, f)
        return str(path)

    # --- cluster furniture (what `sandbox-kernel doctor` looks at) -----------------

    def ensure_namespace(self, name: str) -> None:
        if self.get_object("namespaces", None, name) is None:
            self.put_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def add_daemonset(self, name: str, namespace: str = "kube-system", image: str | None = None) -> dict:
        """A minimal valid DaemonSet (e.g. ``anetd``, ``cilium``, ``calico-node`` in kube-system)."""
        self.ensure_namespace(namespace)
        labels = {"k8s-app": name}
        return self.put_object({
            "apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"matchLabels": labels}, "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": name, "image": image or f"registry.example/{name}:1"}]}}}})

    def add_runtime_class(self, name: str = "gvisor", handler: str = "runsc") -> dict:
        return self.put_object({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                                "metadata": {"name": name}, "handler": handler})

    def add_crd(self, name: str, versions: tuple[str, ...] | None = None) -> dict:
        """A CustomResourceDefinition ``<plural>.<group>``; versions default to the kind's in the fake."""
        plural, _, group = name.partition(".")
        known = [r for r in R.RESOURCE_TYPES if r.plural == plural and r.group == group]
        kind = known[0].kind if known else plural.rstrip("s").capitalize()
        versions = versions or tuple(r.version for r in known) or ("v1",)
        return self.put_object({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": name},
            "spec": {"group": group, "scope": "Namespaced",
                     "names": {"plural": plural, "kind": kind, "singular": plural[:-1], "listKind": kind + "List"},
                     "versions": [{"name": v, "served": True, "storage": i == 0,
                                   "schema": {"openAPIV3Schema": {"type": "object",
                                                                  "x-kubernetes-preserve-unknown-fields": True}}}
                                  for i, v in enumerate(versions)]}})

    def drop_exec_streams(self, reset: bool = False) -> int:
        """Cut every open exec WebSocket at the TCP level, as a load balancer or a node
        restart of the API server would (no close frame, no status); with ``reset``, by a TCP
        reset (the client's next read fails with ECONNRESET). Returns how many."""
        def do():
            handlers = list(self._exec_handlers)
            for handler in handlers:
                handler.drop(reset)
            return len(handlers)
        return self._call(do)

    def evict(self, namespace: str, name: str) -> None:
        """Evict a pod as the kubelet would under node pressure: processes die, phase Failed."""
        def do():
            self._kill_pod_processes(namespace, name)

            def evicted(pod):
                pod["status"].update(phase="Failed", reason="Evicted",
                                     message="The node was low on resource: memory.")
            self.update_pod(namespace, name, evicted)
            self.record_event(namespace, name, "Evicted", "The node was low on resource: memory.",
                              "Warning", "kubelet")
        self._call(do)

    def delete_pod_now(self, namespace: str, name: str) -> None:
        """Delete a pod behind the backend's back (kubectl delete, node loss)."""
        self._call(lambda: self._delete(R.BY_URL[("", "v1", "pods")], namespace, name))

    def processes(self) -> list[asyncio.subprocess.Process]:
        return [p for p in self._procs if p.returncode is None]

    def _call(self, fn):
        """Run ``fn`` on the server loop (from a test thread) and return its result."""
        async def run():
            return fn()
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    # --- used by the kubelet ---------------------------------------------------

    def track(self, proc: asyncio.subprocess.Process) -> None:
        self._procs.add(proc)

    def update_pod(self, namespace: str, name: str, mutate) -> dict | None:
        with self._lock:
            pods = self._store.get(("", "pods"), {})
            pod = pods.get((namespace, name))
            if pod is None:
                return None
            new = copy.deepcopy(pod)
            mutate(new)
            if new == pod:
                return new
            self._bump(new)
            pods[(namespace, name)] = new
            self._emit("MODIFIED", R.BY_URL[("", "v1", "pods")], new)
            return copy.deepcopy(new)

    def record_event(self, namespace: str, pod_name: str, reason: str, message: str,
                     kind: str = "Normal", component: str = "kubelet") -> None:
        pod = self.get_object("pods", namespace, pod_name) or {"metadata": {}}
        stamp = now()
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{pod_name}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "involvedObject": {"kind": "Pod", "namespace": namespace, "name": pod_name, "apiVersion": "v1",
                               "uid": pod["metadata"].get("uid"),
                               "resourceVersion": pod["metadata"].get("resourceVersion")},
            "reason": reason, "message": message, "type": kind, "count": 1,
            "source": {"component": component}, "firstTimestamp": stamp, "lastTimestamp": stamp,
            "reportingComponent": component, "reportingInstance": "",
        }
        self._create(R.BY_URL[("", "v1", "events")], namespace, event, validate=False)

    # --- the store -------------------------------------------------------------

    def _bump(self, obj: dict) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    def _emit(self, kind: str, rtype: R.ResourceType, obj: dict) -> None:
        snapshot = copy.deepcopy(obj)
        self._history.append((self._rv, kind, rtype, snapshot))
        for w in self._watchers:
            if self._watch_matches(w, rtype, snapshot):
                self._loop.call_soon_threadsafe(w.queue.put_nowait, {"type": kind, "object": snapshot})

    @staticmethod
    def _watch_matches(w: _Watcher, rtype: R.ResourceType, obj: dict) -> bool:
        meta = obj["metadata"]
        return (w.rtype == rtype and w.namespace in (None, meta.get("namespace"))
                and w.labels(meta.get("labels")) and w.fields(obj))

    def _bucket(self, rtype: R.ResourceType) -> dict:
        return self._store.setdefault(rtype.key, {})

    def _create(self, rtype: R.ResourceType, namespace: str | None, obj: dict, validate: bool = True) -> dict:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        if rtype.namespaced:
            if meta.get("namespace") not in (None, namespace):
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not match "
                               "the namespace sent on the request")
            meta["namespace"] = namespace
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name") or ""
        if validate:
            self._validate(rtype, obj)
        with self._lock:
            if rtype.namespaced and (None, namespace) not in self._bucket(R.BY_URL[("", "v1", "namespaces")]):
                raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                               {"name": namespace, "kind": "namespaces"})
            bucket = self._bucket(rtype)
            if (namespace if rtype.namespaced else None, name) in bucket:
                raise ApiError(409, "AlreadyExists", f'{rtype.plural} "{name}" already exists',
                               {"name": name, "kind": rtype.plural})
            if rtype.plural == "pods":
                self._admit_pod(namespace, obj)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
            if rtype.plural == "namespaces":
                meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = name
                obj["spec"] = {"finalizers": ["kubernetes"]}
                obj["status"] = {"phase": "Active"}
            if rtype.plural == "pods":
                obj["status"] = {"phase": "Pending", "qosClass": "Burstable"}
            self._bump(obj)
            bucket[(namespace if rtype.namespaced else None, name)] = obj
            self._emit("ADDED", rtype, obj)
        if rtype.plural == "pods":
            kubelet = Kubelet(self, namespace, name, copy.copy(self.behavior), self.runner)
            self._kubelets[obj["metadata"]["uid"]] = kubelet
            self._spawn(kubelet.run())
        return copy.deepcopy(obj)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _validate(self, rtype: R.ResourceType, obj: dict) -> None:
        try:
            R.validate(rtype, obj)
        except R.Invalid as err:
            name = (obj.get("metadata") or {}).get("name", "")
            raise ApiError(422, "Invalid", f'{rtype.kind} "{name}" is invalid: {err.field}: {err.message}',
                           {"name": name, "kind": rtype.kind,
                            "causes": [{"reason": err.reason, "message": err.message, "field": err.field}]})

    def _admit_pod(self, namespace: str, pod: dict) -> None:
        """Admission checks a real server makes: service account exists, quota."""
        name = pod["metadata"]["name"]
        sa = pod["spec"].get("serviceAccountName") or "default"
        if sa != "default" and (namespace, sa) not in self._bucket(R.BY_URL[("", "v1", "serviceaccounts")]):
            raise ApiError(403, "Forbidden", f'pods "{name}" is forbidden: error looking up service account '
                           f'{namespace}/{sa}: serviceaccount "{sa}" not found', {"name": name, "kind": "pods"})
        pods = [p for (ns, _), p in self._bucket(R.BY_URL[("", "v1", "pods")]).items()
                if ns == namespace and p["status"].get("phase") not in ("Succeeded", "Failed")]
        for (ns, qname), quota in self._bucket(R.BY_URL[("", "v1", "resourcequotas")]).items():
            if ns != namespace:
                continue
            hard = quota.get("spec", {}).get("hard", {})
            if "pods" in hard and len(pods) + 1 > R.parse_quantity(hard["pods"]):
                raise ApiError(403, "Forbidden", f'pods "{name}" is forbidden: exceeded quota: {qname}, '
                               f"requested: pods=1, used: pods={len(pods)}, limited: pods={hard['pods']}",
                               {"name": name, "kind": "pods"})
            for key in ("requests.cpu", "requests.memory", "limits.cpu", "limits.memory"):
                if key not in hard:
                    continue
                section, resource = key.split(".")
                missing = [c["name"] for c in pod["spec"]["containers"]
                           if resource not in (c.get("resources") or {}).get(section, {})]
                if missing:
                    raise ApiError(403, "Forbidden", f'pods "{name}" is forbidden: failed quota: {qname}: '
                                   f"must specify {key} for: {','.join(missing)}", {"name": name, "kind": "pods"})

                def total(p):
                    return sum(R.parse_quantity(c["resources"][section][resource])
                               for c in p["spec"]["containers"] if resource in (c.get("resources") or {}).get(section, {}))
                used = sum(total(p) for p in pods)
                if used + total(pod) > R.parse_quantity(hard[key]):
                    raise ApiError(403, "Forbidden", f'pods "{name}" is forbidden: exceeded quota: {qname}, '
                                   f"requested: {key}={_fmt(total(pod))}, used: {key}={_fmt(used)}, "
                                   f"limited: {key}={hard[key]}", {"name": name, "kind": "pods"})

    def _apply(self, rtype: R.ResourceType, namespace: str | None, name: str, patch: dict,
               manager: str, apply: bool) -> tuple[int, dict]:
        with self._lock:
            bucket = self._bucket(rtype)
            key = (namespace if rtype.namespaced else None, name)
            current = bucket.get(key)
            if current is None:
                if not apply:
                    raise ApiError(404, "NotFound", f'{rtype.plural} "{name}" not found',
                                   {"name": name, "kind": rtype.plural})
                patch = copy.deepcopy(patch)
                patch.setdefault("metadata", {})["managedFields"] = [_managed(manager, rtype)]
                if patch["metadata"].get("name") not in (None, name):
                    raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
                patch["metadata"]["name"] = name
                return 201, self._create(rtype, namespace, patch)
            body = copy.deepcopy(patch)
            body.get("metadata", {}).pop("resourceVersion", None)
            body.pop("status", None)  # status is a subresource
            merged = R.merge(current, body)
            if apply:
                fields = [m for m in merged["metadata"].get("managedFields", []) if m.get("manager") != manager]
                merged["metadata"]["managedFields"] = fields + [_managed(manager, rtype)]
            if _without_managed(merged) == _without_managed(current):
                return 200, copy.deepcopy(current)  # a no-op apply does not bump resourceVersion
            self._validate(rtype, merged)
            merged["metadata"]["generation"] = current["metadata"].get("generation", 1) + (
                merged.get("spec") != current.get("spec"))
            self._bump(merged)
            bucket[key] = merged
            self._emit("MODIFIED", rtype, merged)
            return 200, copy.deepcopy(merged)

    def _delete(self, rtype: R.ResourceType, namespace: str | None, name: str) -> dict:
        with self._lock:
            bucket = self._bucket(rtype)
            key = (namespace if rtype.namespaced else None, name)
            obj = bucket.get(key)
            if obj is None:
                raise ApiError(404, "NotFound", f'{rtype.plural} "{name}" not found',
                               {"name": name, "kind": rtype.plural})
            obj = copy.deepcopy(obj)
            obj["metadata"]["deletionTimestamp"] = now()
            if rtype.plural == "pods":
                obj["metadata"]["deletionGracePeriodSeconds"] = 30
                self._kill_pod_processes(namespace, name)
                self._bump(obj)
                self._emit("MODIFIED", rtype, obj)
                self.runner.release(obj) if hasattr(self.runner, "release") else None
            if rtype.plural == "namespaces":
                for (group, plural), objs in list(self._store.items()):
                    inner = next(r for r in R.RESOURCE_TYPES if r.key == (group, plural))
                    for (ns, n) in [k for k in objs if k[0] == name]:
                        self._delete(inner, ns, n)
            del bucket[key]
            self._bump(obj)
            self._emit("DELETED", rtype, obj)
            return obj

    def _kill_pod_processes(self, namespace: str, name: str) -> None:
        pod = self._bucket(R.BY_URL[("", "v1", "pods")]).get((namespace, name))
        if pod is None:
            return
        kubelet = self._kubelets.pop(pod["metadata"]["uid"], None)
        for proc in list(self._procs):
            if getattr(proc, "_fakekube_pod", None) == pod["metadata"]["uid"] or (
                    kubelet is not None and proc is kubelet.main):
                self._spawn(kill(proc, 0.3))

    def list_objects(self, rtype: R.ResourceType, namespace: str | None, labels, fields) -> list[dict]:
        with self._lock:
            return [copy.deepcopy(o) for (ns, _), o in sorted(self._bucket(rtype).items(), key=lambda kv: str(kv[0]))
                    if namespace in (None, ns) and labels(o["metadata"].get("labels")) and fields(o)]

    def check_rules(self, req: RecordedRequest) -> None:
        for rule in list(self.rules):
            if not rule.matches(req):
                continue
            if rule.times is not None:
                rule.times -= 1
                if rule.times <= 0:
                    self.rules.remove(rule)
            if rule.code == 403 and rule.message is None:
                raise ApiError(403, "Forbidden", forbidden_message(self.user, req),
                               {"name": req.name, "kind": req.resource.split("/")[0]} if req.name
                               else {"kind": req.resource.split("/")[0]})
            message = rule.message
            if rule.reason == "Forbidden" and req.verb == "create":
                message = f'{req.resource} "{req.name or "pod"}" is forbidden: {message}'
            raise ApiError(rule.code, rule.reason, message, {"kind": req.resource})

    def allowed(self, verb: str, group: str, resource: str, namespace: str | None) -> bool:
        probe = RecordedRequest("", "", verb, group, resource, namespace, None)
        return not any(r.code == 403 and r.message is None and r.matches(probe) for r in self.rules)


def forbidden_message(user: str, req: RecordedRequest) -> str:
    what = f'{req.resource.split("/")[0]} "{req.name}"' if req.name else req.resource.split("/")[0]
    where = f'in the namespace "{req.namespace}"' if req.namespace else "at the cluster scope"
    return (f'{what} is forbidden: User "{user}" cannot {req.verb} resource "{req.resource}" '
            f'in API group "{req.group}" {where}')


def _fmt(value: float) -> str:
    return f"{value:g}"


def _managed(manager: str, rtype: R.ResourceType) -> dict:
    return {"manager": manager, "operation": "Apply", "apiVersion": rtype.api_version,
            "time": now(), "fieldsType": "FieldsV1", "fieldsV1": {}}


def _without_managed(obj: dict) -> dict:
    out = copy.deepcopy(obj)
    out["metadata"].pop("managedFields", None)
    return out


class _Base:
    fake: FakeKube

    def _authorize_and_record(self, handler, route: _Route, verb: str, query: dict) -> RecordedRequest:
        resource = route.plural + (f"/{route.subresource}" if route.subresource else "")
        req = RecordedRequest(handler.request.method, handler.request.path, verb, route.group, resource,
                              route.namespace if route.plural != "namespaces" else None,
                              route.name, query, handler.request.headers.get("Content-Type"), time.time())
        self.fake.requests.append(req)
        if handler.request.headers.get("Authorization") != f"Bearer {self.fake.token}":
            raise ApiError(401, "Unauthorized", "Unauthorized")
        self.fake.check_rules(req)
        return req


class ApiHandler(_Base, tornado.web.RequestHandler):
    """Every REST call except exec: CRUD, list, watch, apply, SelfSubjectAccessReview."""

    def initialize(self, fake: FakeKube) -> None:
        self.fake = fake
        self._closed = asyncio.Event()

    def on_connection_close(self) -> None:
        self._closed.set()

    async def get(self): await self._handle()
    async def post(self): await self._handle()
    async def put(self): await self._handle()
    async def patch(self): await self._handle()
    async def delete(self): await self._handle()

    def _send(self, code: int, body: dict) -> None:
        self.set_status(code)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(body))

    async def _handle(self) -> None:
        path = self.request.path
        if path.rstrip("/") == "/version":
            return self._send(200, {"major": "1", "minor": "37", "emulationMajor": "1", "emulationMinor": "37",
                                    "minCompatibilityMajor": "1", "minCompatibilityMinor": "36",
                                    "gitVersion": "v1.37.0-fakekube", "gitCommit": "0" * 40,
                                    "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                                    "goVersion": "go1.25.0", "compiler": "gc", "platform": "linux/amd64"})
        route = parse_route(path)
        query = parse_qs(urlparse(self.request.uri).query)
        try:
            if route is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            verb = _verb(self.request.method, route, query)
            req = self._authorize_and_record(self, route, verb, query)
            if (route.group, route.plural) == ("authorization.k8s.io", "selfsubjectaccessreviews"):
                return self._send(201, self._access_review())
            rtype = R.BY_URL.get((route.group, route.version, route.plural))
            if rtype is None or route.subresource not in (None, "status"):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            if rtype.plural == "namespaces" and route.namespace is None and route.name is None \
                    and verb not in ("list", "watch", "create"):
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")
            await self._dispatch(req, rtype, route, query)
        except ApiError as err:
            self._send(err.code, err.status())

    def _body(self) -> dict:
        try:
            body = yaml.safe_load(self.request.body or b"{}")  # JSON is YAML
        except yaml.YAMLError as err:
            raise ApiError(400, "BadRequest", f"error decoding request body: {err}")
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the request body is not an object")
        return body

    async def _dispatch(self, req: RecordedRequest, rtype: R.ResourceType, route: _Route, query: dict):
        fake = self.fake
        ns = route.namespace if rtype.namespaced else None
        try:
            labels = R.label_selector(query.get("labelSelector", [""])[-1])
            fields = R.field_selector(query.get("fieldSelector", [""])[-1])
        except ValueError as err:
            raise ApiError(400, "BadRequest", str(err))
        if req.verb == "get":
            obj = fake.get_object(rtype.plural, ns, route.name, rtype.group)
            if obj is None:
                raise ApiError(404, "NotFound", f'{rtype.plural} "{route.name}" not found',
                               {"name": route.name, "kind": rtype.plural})
            return self._send(200, obj)
        if req.verb == "list":
            items = fake.list_objects(rtype, ns, labels, fields)
            return self._send(200, {"kind": rtype.kind + "List", "apiVersion": rtype.api_version,
                                    "metadata": {"resourceVersion": str(fake._rv)}, "items": items})
        if req.verb == "watch":
            return await self._watch(rtype, ns, labels, fields, query)
        if req.verb == "create":
            body = self._body()
            obj = fake._create(rtype, ns, body)
            return self._send(201, obj)
        if req.verb in ("patch", "update"):
            body = self._body()
            ctype = (self.request.headers.get("Content-Type") or "").split(";")[0]
            apply = req.verb == "patch" and ctype.startswith("application/apply-patch")
            manager = query.get("fieldManager", [""])[-1]
            if apply and not manager:
                raise ApiError(400, "BadRequest", "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: "
                               "Required value: is required for apply patch")
            if req.verb == "patch" and ctype == "application/json-patch+json":
                raise ApiError(415, "UnsupportedMediaType", "the fake supports apply, merge and "
                               "strategic-merge patches only")
            if req.verb == "update":
                current = fake.get_object(rtype.plural, ns, route.name, rtype.group)
                sent = (body.get("metadata") or {}).get("resourceVersion")
                if current and sent and sent != current["metadata"]["resourceVersion"]:
                    raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {rtype.plural} '
                                   f'"{route.name}": the object has been modified; please apply your '
                                   "changes to the latest version and try again")
            code, obj = fake._apply(rtype, ns, route.name, body, manager, apply)
            return self._send(code, obj)
        if req.verb == "delete":
            return self._send(200, fake._delete(rtype, ns, route.name))
        if req.verb == "deletecollection":
            gone = [fake._delete(rtype, o["metadata"].get("namespace"), o["metadata"]["name"])
                    for o in fake.list_objects(rtype, ns, labels, fields)]
            return self._send(200, {"kind": rtype.kind + "List", "apiVersion": rtype.api_version,
                                    "metadata": {"resourceVersion": str(fake._rv)}, "items": gone})
        raise ApiError(405, "MethodNotAllowed", "the server does not allow this method")

    def _access_review(self) -> dict:
        body = self._body()
        attrs = (body.get("spec") or {}).get("resourceAttributes") or {}
        resource = attrs.get("resource", "") + (f"/{attrs['subresource']}" if attrs.get("subresource") else "")
        allowed = self.fake.allowed(attrs.get("verb", ""), attrs.get("group", ""), resource,
                                    attrs.get("namespace") or None)
        body["status"] = {"allowed": allowed}
        if not allowed:
            body["status"]["reason"] = "forbidden by the fake's RBAC rules"
        body.setdefault("metadata", {})["creationTimestamp"] = None
        return body

    async def _watch(self, rtype, ns, labels, fields, query) -> None:
        fake = self.fake
        since = query.get("resourceVersion", [""])[-1]
        timeout = float(query.get("timeoutSeconds", ["1800"])[-1])
        queue: asyncio.Queue = asyncio.Queue()
        watcher = _Watcher(rtype, ns, labels, fields, queue)
        await fake._watch_gate.wait()
        with fake._lock:
            if since in ("", "0"):
                initial = [{"type": "ADDED", "object": o} for o in fake.list_objects(rtype, ns, labels, fields)]
            else:
                try:
                    rv = int(since)
                except ValueError:
                    raise ApiError(400, "BadRequest", f'invalid resource version "{since}"')
                oldest = fake._history[0][0] if fake._history else fake._rv
                if rv < oldest - 1:
                    initial = [{"type": "ERROR", "object": ApiError(
                        410, "Expired", f"too old resource version: {rv} ({oldest})").status()}]
                else:
                    initial = [{"type": k, "object": o} for (r, k, t, o) in fake._history
                               if r > rv and fake._watch_matches(watcher, t, o)]
            fake._watchers.append(watcher)
        self.set_status(200)
        self.set_header("Content-Type", "application/json")
        self.set_header("Transfer-Encoding", "chunked")
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            for event in initial:
                self.write(json.dumps(event) + "\n")
            await self.flush()
            if initial and initial[0]["type"] == "ERROR":
                return
            closed = asyncio.ensure_future(self._closed.wait())
            while True:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, closed}, timeout=remaining,
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break
                event = get.result()
                if event is None:
                    break
                self.write(json.dumps(event) + "\n")
                await self.flush()
            closed.cancel()
        except tornado.iostream.StreamClosedError:
            pass
        finally:
            with fake._lock:
                if watcher in fake._watchers:
                    fake._watchers.remove(watcher)
        if not self._finished:
            try:
                self.finish()
            except tornado.iostream.StreamClosedError:
                pass


class ExecHandler(_Base, tornado.websocket.WebSocketHandler):
    """``pods/{name}/exec`` over WebSocket with the v4/v5 channel protocols.

    Every binary message is one channel byte then data: 0 stdin, 1 stdout, 2 stderr,
    3 error (a ``Status`` JSON when the command ends), 4 resize, and with v5 255 close
    (``[255, channel]``: the client closed its stdin). The process is killed when the
    client goes away.
    """

    def initialize(self, fake: FakeKube) -> None:
        self.fake = fake
        self.proc: asyncio.subprocess.Process | None = None
        self._pumps: list[asyncio.Future] = []
        self.protocol: str | None = None

    async def prepare(self):
        ns, name, sub = self.path_args
        query = parse_qs(urlparse(self.request.uri).query)
        route = _Route("", "v1", "pods", ns, name, sub)
        try:
            self._authorize_and_record(self, route, "create", query)
            pod = self.fake.get_object("pods", ns, name)
            if pod is None:
                raise ApiError(404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"})
            if pod["status"].get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
                raise ApiError(400, "BadRequest", "unable to upgrade connection: container not found "
                               f'("{pod["spec"]["containers"][0]["name"]}")')
            self.command = query.get("command", [])
            if sub == "exec" and not self.command:
                raise ApiError(400, "BadRequest", "you must specify at least 1 command")
            self.want = {k: query.get(k, ["false"])[-1] in ("true", "1") for k in ("stdin", "stdout", "stderr")}
            self.pod = pod
        except ApiError as err:
            self.set_status(err.code)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(err.status()))

    def select_subprotocol(self, subprotocols):
        for proto in self.fake.exec_protocols:
            if proto in subprotocols:
                self.protocol = proto
                return proto
        return None

    async def open(self, *args):
        self.set_nodelay(True)  # as the kubelet's streams: no Nagle delay on small frames
        runner = self.fake.runner
        try:
            proc = await runner.spawn(self.pod, self.command, role="exec")
        except OSError as err:
            await self._finish_with({"metadata": {}, "status": "Failure", "reason": "InternalError",
                                     "message": f'failed to exec in container: exec: "{self.command[0]}": {err}'})
            return
        proc._fakekube_pod = self.pod["metadata"]["uid"]
        self.proc = proc
        self.fake.track(proc)
        self.fake._exec_handlers.add(self)
        if not self.want["stdin"]:
            proc.stdin.close()
        self._pumps = [asyncio.ensure_future(self._pump(proc.stdout, 1)),
                       asyncio.ensure_future(self._pump(proc.stderr, 2))]
        asyncio.ensure_future(self._wait())

    async def _pump(self, stream, channel: int) -> None:
        while True:
            chunk = await stream.read(64 * 1024)
            if not chunk:
                return
            if self.want["stdout" if channel == 1 else "stderr"]:
                try:
                    await self.write_message(bytes([channel]) + chunk, binary=True)
                except tornado.websocket.WebSocketClosedError:
                    return

    async def _wait(self) -> None:
        await asyncio.gather(*self._pumps, return_exceptions=True)
        code = await self.proc.wait()
        if code == 0:
            status = {"metadata": {}, "status": "Success"}
        else:
            exit_code = 128 - code if code < 0 else code
            status = {"metadata": {}, "status": "Failure", "reason": "NonZeroExitCode",
                      "message": f"command terminated with non-zero exit code: error executing command "
                                 f"{json.dumps(self.command)}, exit code {exit_code}",
                      "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]}}
        await self._finish_with(status)

    async def _finish_with(self, status: dict) -> None:
        try:
            await self.write_message(bytes([3]) + json.dumps(status).encode(), binary=True)
            self.close(1000)
        except tornado.websocket.WebSocketClosedError:
            pass

    def on_message(self, message):
        data = message.encode() if isinstance(message, str) else message
        if not data or self.proc is None:
            return
        channel, payload = data[0], data[1:]
        if channel == 0 and self.want["stdin"] and not self.proc.stdin.is_closing():
            self.proc.stdin.write(payload)
        elif channel == 255 and self.protocol == "v5.channel.k8s.io" and payload[:1] == b"\x00":
            if not self.proc.stdin.is_closing():
                self.proc.stdin.close()
        # channel 4 (resize) is accepted and ignored: no TTYs here

    def drop(self, reset: bool = False) -> None:
        """Close the TCP connection without a close frame or status (see FakeKube.drop_exec_streams)."""
        stream = self.ws_connection.stream if self.ws_connection is not None else None
        if stream is not None:
            if reset and stream.socket is not None:
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            stream.close()

    def on_close(self) -> None:
        self.fake._exec_handlers.discard(self)
        proc = self.proc
        if proc is not None and proc.returncode is None:
            if not proc.stdin.is_closing():
                proc.stdin.close()
            self.fake._spawn(self._reap(proc))

    async def _reap(self, proc) -> None:
        try:
            await asyncio.wait_for(proc.wait(), 0.5)
        except asyncio.TimeoutError:
            await kill(proc, 0.3)


# tornado's iostream for StreamClosedError
import tornado.iostream  # noqa: E402
