"""The Kubernetes backend: one namespace per user, one pod per kernel, cells over exec.

Selected with ``c.SandboxKernel.backend_name = "kubernetes"``. One
:class:`KubernetesBackend` per kernel, created by the kernel; the Session is its only
caller. What it does on :meth:`~KubernetesBackend.start`:

1. ``GET`` the user's namespace. If its ``sandbox-kernel.io/setup`` annotation matches
   the hash of what this configuration wants there, skip to 3.
2. Server-side apply (field manager ``sandbox-kernel``): Namespace, ServiceAccount,
   ResourceQuota, LimitRange, default-deny NetworkPolicy, agent ConfigMap; then the
   namespace again with the setup annotation (last, so a half-done setup is redone).
3. Apply the kernel's egress policy objects (compiled by :mod:`sandbox_kernel.policy`).
4. Create the pod, then WATCH the pod and its events from the create's
   resourceVersion (no polling) until Ready, reporting progress lines.

:meth:`~KubernetesBackend.attach` execs ``agent.pyz attach`` in the pod over the
WebSocket exec API; the agent itself is the pod's main process, so a dropped stream
is re-attached without losing state.

Every Kubernetes call is blocking in the official client, so each runs in a thread
(``asyncio.to_thread``). Cluster credentials are loaded lazily on first use, never at
import. :data:`REQUIRED_PERMISSIONS` lists every API call this module makes; the Helm
chart's RBAC and the tests check against it.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import getpass
import hashlib
import ipaddress
import json
import os
import re
import secrets
import socket
import threading
import time
from typing import Any, Callable

from traitlets import Any as AnyTrait
from traitlets import Bool, Dict, Float, List, Unicode, default

from ..agent import protocol
from ..config import env_bool, env_default, parse_duration
from ..errors import PolicyError, SandboxError, SandboxStartError
from ..policy.resolve import DEFAULT_TTL
from . import objects
from .base import Backend, LineTransport, Progress, SandboxInfo, Transport
from .slug import slugify, user_namespace

#: the oldest official client this backend works with (pyproject.toml declares it; CI runs
#: the fake-API-server suite with exactly this version): server-side apply passes
#: ``_content_type`` to the typed patch methods, which clients before 37 refuse
MIN_CLIENT_VERSION = (37, 0, 0)

FIELD_MANAGER = "sandbox-kernel"
SETUP_ANNOTATION = "sandbox-kernel.io/setup"

#: enforcers whose objects live in the cluster, and the kinds they produce
ENFORCER_KINDS: dict[str, list[tuple[str, str, str]]] = {
    # enforcer: [(apiGroup, version, plural)]
    "networkpolicy": [("networking.k8s.io", "v1", "networkpolicies")],
    "gke-fqdn": [("networking.k8s.io", "v1", "networkpolicies"),
                 ("networking.gke.io", "v1alpha1", "fqdnnetworkpolicies")],
    "cilium": [("cilium.io", "v2", "ciliumnetworkpolicies")],
}


def _perms(group: str, resource: str, *verbs: str) -> list[tuple[str, str, str]]:
    return [(group, resource, verb) for verb in verbs]


#: every (apiGroup, resource, verb) this backend may use; server-side apply needs
#: ``patch`` and, when it creates the object, ``create``
REQUIRED_PERMISSIONS: tuple[tuple[str, str, str], ...] = tuple(
    _perms("", "namespaces", "get", "create", "patch")
    + _perms("", "serviceaccounts", "create", "patch")
    + _perms("", "resourcequotas", "create", "patch")
    + _perms("", "limitranges", "create", "patch")
    + _perms("", "configmaps", "create", "patch")
    + _perms("", "pods", "create", "get", "list", "watch", "delete")
    + _perms("", "pods/exec", "create", "get")  # websocket exec: create (>=1.31) or get (older)
    + _perms("", "events", "watch")
    # with c.KubernetesBackend.namespace_role: one RoleBinding per user namespace, to that
    # ClusterRole only (the chart limits ``bind`` to it by resourceNames)
    + _perms("rbac.authorization.k8s.io", "rolebindings", "create", "patch")
    + _perms("rbac.authorization.k8s.io", "clusterroles", "bind")
    + [(group, plural, verb)
       for group, plural in sorted({(g, p) for kinds in ENFORCER_KINDS.values() for g, _, p in kinds})
       for verb in ("create", "patch", "list", "delete", "deletecollection")]
)


#: the permissions that act at cluster scope (a user namespace does not exist before its
#: first start); with a namespace_role everything else is granted per user namespace
CLUSTER_SCOPED: frozenset[tuple[str, str]] = frozenset({
    ("", "namespaces"), ("rbac.authorization.k8s.io", "rolebindings"), ("rbac.authorization.k8s.io", "clusterroles")})
_RBAC_PERMS = {("rbac.authorization.k8s.io", "rolebindings"), ("rbac.authorization.k8s.io", "clusterroles")}


def required_permissions(enforcers: list[str] | tuple[str, ...], namespace_role: bool = False) -> list[tuple[str, str, str]]:
    """The subset of :data:`REQUIRED_PERMISSIONS` a configuration with these enforcers uses
    (policy kinds of other enforcers left out; the RoleBinding permissions only with a
    ``namespace_role``). ``sandbox-kernel doctor`` checks these."""
    kinds = {(g, p) for e in enforcers for g, _, p in ENFORCER_KINDS.get(e, [])}
    every_kind = {(g, p) for ks in ENFORCER_KINDS.values() for g, _, p in ks}
    return [perm for perm in REQUIRED_PERMISSIONS
            if ((perm[0], perm[1]) not in every_kind or (perm[0], perm[1]) in kinds)
            and (namespace_role or (perm[0], perm[1]) not in _RBAC_PERMS)]


# --- errors a user can hit ---------------------------------------------------------

class KubernetesUnavailable(SandboxStartError):
    """No credentials, or the API server cannot be reached."""

    ename = "KubernetesUnavailable"


class KubernetesForbidden(SandboxStartError):
    """RBAC refused one call; names the verb and the resource."""

    ename = "KubernetesForbidden"

    def __init__(self, verb: str, resource: str, namespace: str | None, detail: str = ""):
        self.verb, self.resource, self.namespace = verb, resource, namespace
        where = f' in namespace "{namespace}"' if namespace else ""
        super().__init__(
            f"Kubernetes refused to let the kernel {verb} {resource}{where} (RBAC: forbidden). "
            f"Ask your administrator to grant the kernel's service account '{verb}' on '{resource}' "
            f"(the Helm chart's RBAC does; see docs/kubernetes.md).{_detail(detail)}"
        )


class KubernetesRefused(SandboxStartError):
    """A 403 that is not RBAC: Pod Security admission, an admission webhook or policy
    (GKE Autopilot's), a namespace being deleted. Quotes the server's reason."""

    ename = "KubernetesRefused"

    #: what refused, from the server's message: (cause, pattern, what the user should do)
    CAUSES: tuple[tuple[str, str, str], ...] = (
        ("namespace-terminating", r"because it is being terminated|NamespaceTerminating",
         "the namespace is being deleted; start the kernel again once it is gone"),
        ("pod-security", r"violates PodSecurity",
         "Pod Security admission refused the sandbox pod; the image or c.KubernetesBackend settings "
         "(runtime class, security context) must fit the namespace's level, or the namespace's "
         "pod-security labels were changed"),
        ("admission-webhook", r'admission webhook "[^"]*" denied',
         "an admission webhook of the cluster refused it (on GKE Autopilot: Autopilot's own rules); "
         "ask your administrator"),
        ("admission-policy", r"ValidatingAdmissionPolicy",
         "a ValidatingAdmissionPolicy of the cluster refused it; ask your administrator"),
    )

    def __init__(self, verb: str, resource: str, namespace: str | None, cause: str, advice: str, detail: str):
        self.verb, self.resource, self.namespace, self.cause = verb, resource, namespace, cause
        where = f' in namespace "{namespace}"' if namespace else ""
        super().__init__(f"Kubernetes refused to {verb} {resource}{where}: {advice}.{_detail(detail)}")


class QuotaExceeded(SandboxStartError):
    """The user's ResourceQuota has no room for another sandbox."""

    ename = "QuotaExceeded"

    def __init__(self, namespace: str, detail: str):
        super().__init__(
            f"Your sandbox quota in namespace {namespace} is used up, so no new sandbox was started. "
            f"Shut down another notebook's kernel, or ask your administrator for a larger quota.{_detail(detail)}"
        )


class ImagePullFailed(SandboxStartError):
    """The node could not pull the sandbox image."""

    ename = "ImagePullFailed"

    def __init__(self, image: str, detail: str):
        self.image = image
        super().__init__(
            f"The sandbox image {image} could not be pulled. Check the image name and that the "
            f"cluster may pull it (c.KubernetesBackend.image / SANDBOX_KERNEL_K8S_IMAGE).{_detail(detail)}"
        )


class Unschedulable(SandboxStartError):
    """No node can run the sandbox pod."""

    ename = "Unschedulable"

    def __init__(self, detail: str, waited: float):
        super().__init__(
            f"No node could run the sandbox after {waited:.0f} s: the cluster is full or no node matches "
            f"the requested resources, node selector or tolerations. Try again later or ask your "
            f"administrator.{_detail(detail)}"
        )


def _detail(text: str) -> str:
    return f"\nKubernetes said: {text}" if text else ""


# --- configuration helpers -----------------------------------------------------------

def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def check_client_version(version: str | None = None) -> str:
    """The installed ``kubernetes`` client's version; KubernetesUnavailable when it is older
    than :data:`MIN_CLIENT_VERSION` (called by check() and the doctor, before any call
    could fail halfway with a TypeError deep in the client)."""
    if version is None:
        try:
            import kubernetes
        except ImportError:
            raise KubernetesUnavailable("the kubernetes backend needs the official client: "
                                        "pip install 'sandbox-kernel[kubernetes]'") from None
        version = kubernetes.__version__
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    wanted = ".".join(map(str, MIN_CLIENT_VERSION))
    if parts < MIN_CLIENT_VERSION:
        raise KubernetesUnavailable(
            f"the kubernetes Python client {version} is too old: the kubernetes backend needs {wanted} "
            f"or later (pip install 'kubernetes>={wanted}', or 'sandbox-kernel[kubernetes]')")
    return version


def _yes(value: str, name: str) -> bool:
    """A yes/no setting given as text (the chart writes "true"/"false")."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise SandboxError(f"c.KubernetesBackend.{name} = {value!r} is not true or false")


def _default_user() -> str:
    for name in ("SANDBOX_KERNEL_USER", "JUPYTERHUB_USER"):
        if os.environ.get(name):
            return os.environ[name]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "user"


class KubernetesBackend(Backend):
    """Sandboxes as pods: see the module docstring for the sequence of API calls."""

    name = "kubernetes"

    image = Unicode(help="The sandbox image; any image with python3 works (the agent comes in a "
                         "ConfigMap). Env: SANDBOX_KERNEL_K8S_IMAGE.").tag(config=True)
    image_pull_policy = Unicode(help="imagePullPolicy of the sandbox container. "
                                     "Env: SANDBOX_KERNEL_K8S_IMAGE_PULL_POLICY.").tag(config=True)
    namespace_template = Unicode(help="The user's namespace; must keep a fixed prefix before {slug}. "
                                      "Env: SANDBOX_KERNEL_K8S_NAMESPACE_TEMPLATE.").tag(config=True)
    user = Unicode(help="Whose sandbox this is (names the namespace). "
                        "Env: SANDBOX_KERNEL_USER, else JUPYTERHUB_USER, else the login name.").tag(config=True)
    requests = Dict(help='Container resource requests, e.g. {"cpu": "250m", "memory": "512Mi"}. '
                         "Env: SANDBOX_KERNEL_K8S_REQUESTS (JSON).").tag(config=True)
    limits = Dict(help='Container resource limits, e.g. {"cpu": "1", "memory": "2Gi"}. '
                       "Env: SANDBOX_KERNEL_K8S_LIMITS (JSON).").tag(config=True)
    quota = Dict(help="ResourceQuota spec.hard of each user namespace (all of a user's sandboxes). "
                      "Env: SANDBOX_KERNEL_K8S_QUOTA (JSON).").tag(config=True)
    runtime_class = Unicode(None, allow_none=True,
                            help="runtimeClassName of sandbox pods, e.g. 'gvisor' (GKE Sandbox). "
                                 "Env: SANDBOX_KERNEL_K8S_RUNTIME_CLASS.").tag(config=True)
    node_selector = Dict(help="nodeSelector of sandbox pods. Env: SANDBOX_KERNEL_K8S_NODE_SELECTOR (JSON)."
                         ).tag(config=True)
    tolerations = List(Dict(), help="Tolerations of sandbox pods (e.g. Spot nodes). "
                                    "Env: SANDBOX_KERNEL_K8S_TOLERATIONS (JSON list).").tag(config=True)
    enforcers = List(Unicode(), help="Which objects enforce egress: any of networkpolicy, gke-fqdn, cilium "
                                     "(Istio is not an enforcer: docs/policy.md). Env: SANDBOX_KERNEL_K8S_ENFORCERS (comma-separated)."
                     ).tag(config=True)
    node_local_dns = Unicode(help="'true' (default) allows DNS, on port 53 only, to NodeLocal DNSCache "
                                  "(169.254.20.10 and its k8s-app=node-local-dns pods): always on in GKE "
                                  "Autopilot, on by default in GKE Standard from 1.33; without it lookups "
                                  "fail there. 'false' to leave it out. "
                                  "Env: SANDBOX_KERNEL_K8S_NODE_LOCAL_DNS.").tag(config=True)
    gke_cloud_dns = Unicode(help="'true' (default) allows DNS to Cloud DNS for GKE on the metadata address, "
                                 "169.254.169.254, port 53 only (UDP and TCP; every other port of that "
                                 "address stays blocked). 'false' to leave it out. "
                                 "Env: SANDBOX_KERNEL_K8S_GKE_CLOUD_DNS.").tag(config=True)
    resolver = Unicode(help="The DNS server (ip or ip:port) the kernel asks, with TTLs, for the addresses "
                            "of a policy's domains; NetworkPolicy ipBlocks are re-applied before those "
                            "answers expire. Default: the first nameserver of /etc/resolv.conf (in a pod, "
                            "the cluster DNS the sandbox uses too); empty: the system resolver with a "
                            f"{DEFAULT_TTL:.0f} s TTL. Env: SANDBOX_KERNEL_K8S_RESOLVER.").tag(config=True)
    start_timeout = Float(help="Seconds to wait for a sandbox pod to be ready. "
                               "Env: SANDBOX_KERNEL_K8S_START_TIMEOUT.").tag(config=True)
    schedule_timeout = Float(help="Seconds a pod may stay unschedulable (e.g. waiting for the autoscaler) "
                                  "before the start fails. Env: SANDBOX_KERNEL_K8S_SCHEDULE_TIMEOUT."
                             ).tag(config=True)
    idle_timeout = Float(help="Delete the pod after this many seconds with no cell running (0: never); "
                              "the next cell starts a fresh one. Env: SANDBOX_KERNEL_K8S_IDLE_TIMEOUT."
                         ).tag(config=True)
    namespace_role = Unicode(help="A ClusterRole holding the kernel identity's namespaced permissions "
                                  "(pods, exec, policies…), bound by a RoleBinding the backend creates in "
                                  "each user namespace, so the identity has them nowhere else (the Helm "
                                  "chart sets it). Empty: the identity is expected to hold them cluster-wide. "
                                  "Env: SANDBOX_KERNEL_K8S_NAMESPACE_ROLE.").tag(config=True)
    role_subject = Unicode(help="Who the namespace_role RoleBinding binds: 'ServiceAccount:<namespace>:<name>' "
                                "(the kernels' or the hub service's account), or 'User:<name>'. "
                                "Env: SANDBOX_KERNEL_K8S_ROLE_SUBJECT.").tag(config=True)
    orphan_timeout = Float(help="The agent in a sandbox pod exits, ending the pod, after this many seconds "
                                "with no kernel attached (0: never). It runs in the pod, so it also ends "
                                "the pods of kernels that died without stopping them; a dropped stream "
                                "re-attaches within seconds. Env: SANDBOX_KERNEL_K8S_ORPHAN_TIMEOUT."
                           ).tag(config=True)
    gc_on_start = Bool(help="On each start, remove the user's ended sandbox pods and egress objects whose "
                            "kernel has no pod left (one LIST per kind in the user's namespace, after the "
                            "pod is ready). Env: SANDBOX_KERNEL_K8S_GC_ON_START (true/false)."
                       ).tag(config=True)
    context = Unicode(None, allow_none=True, help="kubeconfig context to use outside a cluster. "
                                                  "Env: SANDBOX_KERNEL_K8S_CONTEXT.").tag(config=True)

    #: set by tests or embedding code: a ready ``kubernetes.client.Configuration``
    #: (otherwise in-cluster config or kubeconfig is loaded on first use)
    client_configuration = AnyTrait(None, allow_none=True)

    @default("image")
    def _image_default(self): return env_default("SANDBOX_KERNEL_K8S_IMAGE", "python:3.12-slim")
    @default("image_pull_policy")
    def _ipp_default(self): return env_default("SANDBOX_KERNEL_K8S_IMAGE_PULL_POLICY", "IfNotPresent")
    @default("namespace_template")
    def _nt_default(self): return env_default("SANDBOX_KERNEL_K8S_NAMESPACE_TEMPLATE", "user-sandbox-{slug}")
    @default("user")
    def _user_default(self): return _default_user()
    @default("requests")
    def _requests_default(self): return env_default("SANDBOX_KERNEL_K8S_REQUESTS", {"cpu": "250m", "memory": "512Mi"}, json.loads)
    @default("limits")
    def _limits_default(self): return env_default("SANDBOX_KERNEL_K8S_LIMITS", {"cpu": "1", "memory": "2Gi"}, json.loads)
    @default("quota")
    def _quota_default(self):
        return env_default("SANDBOX_KERNEL_K8S_QUOTA", {"pods": "4", "limits.cpu": "4", "limits.memory": "8Gi"}, json.loads)
    @default("runtime_class")
    def _rc_default(self): return env_default("SANDBOX_KERNEL_K8S_RUNTIME_CLASS", None)
    @default("node_selector")
    def _ns_default(self): return env_default("SANDBOX_KERNEL_K8S_NODE_SELECTOR", {}, json.loads)
    @default("tolerations")
    def _tol_default(self): return env_default("SANDBOX_KERNEL_K8S_TOLERATIONS", [], json.loads)
    @default("enforcers")
    def _enf_default(self): return env_default("SANDBOX_KERNEL_K8S_ENFORCERS", ["networkpolicy"], _csv)
    @default("node_local_dns")
    def _nld_default(self): return env_default("SANDBOX_KERNEL_K8S_NODE_LOCAL_DNS", "true")
    @default("gke_cloud_dns")
    def _gcd_default(self): return env_default("SANDBOX_KERNEL_K8S_GKE_CLOUD_DNS", "true")
    @default("resolver")
    def _resolver_default(self):
        from .dnsproxy import upstream_from_resolv_conf

        return env_default("SANDBOX_KERNEL_K8S_RESOLVER", upstream_from_resolv_conf() or "")
    @default("start_timeout")
    def _st_default(self): return env_default("SANDBOX_KERNEL_K8S_START_TIMEOUT", 300.0, float)
    @default("schedule_timeout")
    def _sch_default(self): return env_default("SANDBOX_KERNEL_K8S_SCHEDULE_TIMEOUT", 120.0, float)
    @default("idle_timeout")
    def _idle_default(self): return env_default("SANDBOX_KERNEL_K8S_IDLE_TIMEOUT", 0.0, float)
    @default("namespace_role")
    def _nsrole_default(self): return env_default("SANDBOX_KERNEL_K8S_NAMESPACE_ROLE", "")
    @default("role_subject")
    def _subject_default(self): return env_default("SANDBOX_KERNEL_K8S_ROLE_SUBJECT", "")
    @default("orphan_timeout")
    def _orphan_default(self): return env_default("SANDBOX_KERNEL_K8S_ORPHAN_TIMEOUT", 600.0, float)
    @default("gc_on_start")
    def _gcs_default(self): return env_bool("SANDBOX_KERNEL_K8S_GC_ON_START", True)
    @default("context")
    def _ctx_default(self): return env_default("SANDBOX_KERNEL_K8S_CONTEXT", None)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._api_client = None
        self._config = None
        self._config_lock = threading.Lock()
        self.always_blocked: list[str] | None = None  # set by the kernel from the AdminPolicy
        self.namespace: str | None = None
        self.pod: str | None = None
        self.kernel_id: str | None = None
        self._info: SandboxInfo | None = None
        self._policy_objects: list[dict] = []
        self._applied: dict[str, Any] = {}
        self._transport: ExecTransport | None = None
        self._idle_task: asyncio.Task | None = None
        self._idle_stopped = False
        self._refresh: asyncio.Task | None = None
        self._gc_task: asyncio.Future | None = None
        #: the addresses of the previous answers, kept in force until they expire
        self._resolved_before: tuple[dict[str, list[str]], float] = ({}, 0.0)

    # --- API access (lazy) -------------------------------------------------------

    def configuration(self):
        """The client Configuration: given, in-cluster, or kubeconfig — loaded once, on first use."""
        with self._config_lock:
            if self._config is None:
                if self.client_configuration is not None:
                    self._config = self.client_configuration
                else:
                    self._config = _load_configuration(self.context)
            return self._config

    def api_client(self):
        """The shared ``ApiClient`` for REST calls (exec uses its own, see :meth:`attach`)."""
        from kubernetes import client

        if self._api_client is None:
            self._api_client = client.ApiClient(self.configuration())
        return self._api_client

    def _core(self):
        from kubernetes import client

        return client.CoreV1Api(self.api_client())

    # --- Backend interface ---------------------------------------------------------

    def check(self) -> None:
        """Check the client library's version, load credentials (no API call). Raises
        KubernetesUnavailable when the client is too old or there are no credentials."""
        check_client_version()
        self.configuration()
        _yes(self.node_local_dns, "node_local_dns")
        if self.namespace_role:
            self.subject()
        _yes(self.gke_cloud_dns, "gke_cloud_dns")
        for enforcer in self.enforcers:
            if enforcer == "istio":
                raise SandboxError("the istio enforcer was removed: as built it could not enforce anything "
                                   "(docs/policy.md, 'Istio — removed'); use networkpolicy, with gke-fqdn or "
                                   "cilium for names (c.KubernetesBackend.enforcers)")
            if enforcer not in ENFORCER_KINDS:
                raise SandboxError(f"unknown Kubernetes enforcer {enforcer!r}: choose from "
                                   f"{', '.join(ENFORCER_KINDS)} (c.KubernetesBackend.enforcers)")

    async def start(self, kernel_id: str, policy: Any, progress: Progress) -> SandboxInfo:
        """Ensure the namespace, apply the policy, create the pod and watch it until Ready.

        Called by Session.start(). On failure deletes what it created for this kernel and
        raises a SandboxStartError subclass naming the cause.
        """
        if self.pod:
            # started again without stop() (the Session restarts after a stream ended between
            # cells): remove the previous pod, or it would run on as an orphan until gc
            await self.stop()
        self.kernel_id = kernel_id
        self._idle_stopped = False
        await asyncio.to_thread(self.check)
        try:
            self.namespace = user_namespace(self.user, self.namespace_template)
        except SandboxError as err:
            raise SandboxStartError(str(err)) from None
        self.pod = f"sandbox-{slugify(kernel_id, 40)}-{secrets.token_hex(3)}"
        try:
            loop = asyncio.get_running_loop()
            # progress() belongs to the event loop; the setup runs in a worker thread
            await asyncio.to_thread(self._ensure_namespace, lambda line: loop.call_soon_threadsafe(progress, line))
            await self._apply_policy_objects(policy)
            self._schedule_refresh(policy)
            pod = await asyncio.to_thread(self._create_pod)
            progress("Scheduling…")
            await self._wait_ready(pod["metadata"]["resourceVersion"], progress)
        except BaseException:
            try:
                await self.stop()
            except SandboxError as cleanup:
                # the cause of the failed start is what the user must see, not a refusal
                # met while cleaning up after it (an identity that may not start a sandbox
                # may not delete its objects either)
                self.log.warning("cleaning up after the failed start of %s failed: %s", self.pod, cleanup)
            raise
        self._info = SandboxInfo(self.name, self.pod, {
            "namespace": self.namespace, "pod": self.pod, "image": self.image,
            "enforcers": list(self.enforcers), "runtime_class": self.runtime_class})
        if self.gc_on_start:
            self._gc_task = asyncio.ensure_future(asyncio.to_thread(self._collect_namespace))
        return self._info

    def _collect_namespace(self) -> list[str]:
        """The user's ended pods and orphaned egress objects, removed (worker thread; the
        quota counts no ended pod, but their objects would stay forever). Never a live pod:
        another notebook of the same user may own it."""
        try:
            return gc(0, api_client=self.api_client(), enforcers=list(self.enforcers),
                      namespace=self.namespace, ended_only=True)
        except SandboxError as err:
            self.log.info("cleaning up namespace %s failed: %s", self.namespace, err)
            return []

    async def adopt(self, kernel_id: str, namespace: str, pod: str, *, policy: Any = None) -> SandboxInfo | None:
        """Take over the pod ``namespace/pod`` that another process (a previous sandbox
        service) started for ``kernel_id``: afterwards this backend is as after start().

        Reads the pod; when it is this kernel's (its kernel label matches), alive and not
        being deleted, sets the fields start() sets, re-applies ``policy``'s objects (the
        previous owner's may be stale or gone) and returns the SandboxInfo; then call
        attach(). A dead or deleting pod of this kernel is removed with its policy objects
        and None returned (start() a new one); a pod of another kernel, or none, is left
        alone and None returned."""
        if self.pod:
            await self.stop()
        await asyncio.to_thread(self.check)
        self.kernel_id, self.namespace, self.pod = kernel_id, namespace, pod
        self._idle_stopped = False
        try:
            found = await asyncio.to_thread(self._read_pod)
        except SandboxError:
            found = None
        labels = (found or {}).get("metadata", {}).get("labels") or {}
        if found is None or labels.get(objects.KERNEL_LABEL) != objects.label_value(kernel_id):
            self.kernel_id = self.namespace = self.pod = None
            return None
        if not pod_alive(found):
            await self.stop()  # whatever is left of it
            return None
        spec = (found.get("spec") or {})
        containers = spec.get("containers") or [{}]
        await self._apply_policy_objects(policy)
        self._schedule_refresh(policy)
        self._info = SandboxInfo(self.name, pod, {
            "namespace": namespace, "pod": pod, "image": containers[0].get("image") or self.image,
            "enforcers": list(self.enforcers), "runtime_class": spec.get("runtimeClassName") or self.runtime_class,
            "adopted": True})
        return self._info

    async def attach(self) -> Transport:
        """Exec ``agent.pyz attach`` in the pod; its stdin/stdout carry the frames.

        Called by Session after start() and to re-attach after a dropped stream."""
        if not self.pod:
            raise SandboxStartError("the Kubernetes sandbox is not running")
        ws = await asyncio.to_thread(self._open_exec, list(objects.ATTACH_COMMAND))
        pod = self.pod

        def alive() -> bool:  # called in the transport's reader thread after a drop
            return self.pod == pod and pod_alive(self._read_pod())

        self._transport = ExecTransport(ws, asyncio.get_running_loop(), self.log,
                                        reopen=lambda: self._open_exec(list(objects.ATTACH_COMMAND)), alive=alive)
        if self.idle_timeout > 0 and (self._idle_task is None or self._idle_task.done()):
            self._idle_task = asyncio.ensure_future(self._idle_watch())
        return self._transport

    async def apply_policy(self, policy: Any) -> dict[str, Any]:
        """Apply the compiled policy objects; on failure re-apply the previous ones.

        Called by Session.apply_policy()."""
        if not self.pod:
            raise PolicyError("no sandbox is running")
        self._resolved_before = ({}, 0.0)  # a new policy: the old one's addresses go now
        applied = await self._apply_policy_objects(policy)
        self._schedule_refresh(policy)
        return applied

    async def interrupt(self) -> None:
        """The in-band interrupt frame reaches the agent over the exec stream: nothing more."""

    async def exit_reason(self) -> str:
        """Why the stream ended, from the pod's status (one GET). Called by Session."""
        if self._idle_stopped:
            if self._idle_task is not None and self._idle_task is not asyncio.current_task():
                await asyncio.shield(self._idle_task)
            return (f"the sandbox pod was removed after {self.idle_timeout:.0f} s without a running cell "
                    "(c.KubernetesBackend.idle_timeout); the next cell starts a new one")
        if not self.pod:
            return "the sandbox is not running"
        try:
            pod = await asyncio.to_thread(self._read_pod)
        except SandboxError as err:
            return f"the sandbox pod could not be read: {err}"
        reason, self.last_exit_status = describe_pod_end(pod)
        return reason

    async def stop(self) -> None:
        """Delete the pod and the kernel's policy objects. Idempotent. Called by Session."""
        if self._idle_task is not None and self._idle_task is not asyncio.current_task():
            self._idle_task.cancel()
            self._idle_task = None
        if self._refresh is not None and self._refresh is not asyncio.current_task():
            self._refresh.cancel()
        self._refresh = None
        self._resolved_before = ({}, 0.0)
        if self.pod and self.namespace:
            # the pod first: its agent dies and any open exec stream ends by itself
            await asyncio.to_thread(self._delete_kernel_objects)
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.close()
        self.pod = None
        self._info = None
        self._policy_objects = []

    def info(self) -> SandboxInfo | None:
        return self._info


    # --- namespace setup -------------------------------------------------------------

    def namespace_objects(self) -> list[Any]:
        """Everything the user namespace needs, as typed objects (pure; see objects.py)."""
        from ..agent.bundle import build_pyz, pyz_digest

        ns = self.namespace
        binding = [objects.make_role_binding(ns, self.namespace_role, self.subject())] if self.namespace_role else []
        return [
            objects.make_namespace(ns, self.user),
            *binding,
            objects.make_service_account(ns),
            objects.make_resource_quota(ns, self.quota),
            objects.make_limit_range(ns, self.requests, self.limits),
            objects.make_default_deny_policy(ns),
            objects.make_agent_configmap(objects.agent_configmap_name(pyz_digest()), ns, build_pyz(), pyz_digest()),
        ]

    def _ensure_namespace(self, progress: Progress) -> None:
        """One GET when the namespace is already set up; otherwise apply everything."""
        wanted = [objects.to_dict(o) for o in self.namespace_objects()]
        setup = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]
        current = None
        try:
            current = self._call("get", "namespaces", None, self._core().read_namespace, self.namespace)
        except _NotFound:
            pass
        if current is not None and (current.metadata.annotations or {}).get(SETUP_ANNOTATION) == setup:
            return
        progress(f"Preparing namespace {self.namespace}…")
        bound_at = None
        for body in wanted:
            if bound_at is None:
                self.apply_object(body)
            else:
                self._apply_while_binding_propagates(body, bound_at)
            if body["kind"] == "RoleBinding":
                bound_at = time.monotonic()
        marked = json.loads(json.dumps(wanted[0]))
        marked["metadata"]["annotations"][SETUP_ANNOTATION] = setup
        self.apply_object(marked)

    #: how long a new RoleBinding may take to reach the API server's authorizer cache
    BINDING_PROPAGATION = 10.0

    def _apply_while_binding_propagates(self, body: dict, bound_at: float) -> dict:
        """apply_object, retrying a 403 for :data:`BINDING_PROPAGATION` s after the namespace's
        RoleBinding was created (RBAC reaches the authorizer through a watch: not at once)."""
        while True:
            try:
                return self.apply_object(body)
            except KubernetesForbidden:
                if time.monotonic() - bound_at > self.BINDING_PROPAGATION:
                    raise
                time.sleep(0.2)

    def subject(self) -> dict[str, str]:
        """``role_subject`` as a RoleBinding subject; SandboxError when it is malformed."""
        parts = self.role_subject.split(":")
        if len(parts) == 3 and parts[0] == "ServiceAccount" and all(parts[1:]):
            return {"kind": "ServiceAccount", "namespace": parts[1], "name": parts[2]}
        if len(parts) == 2 and parts[0] in ("User", "Group") and parts[1]:
            return {"kind": parts[0], "name": parts[1]}
        raise SandboxError(f"c.KubernetesBackend.role_subject = {self.role_subject!r}: with namespace_role set it must "
                           "be 'ServiceAccount:<namespace>:<name>', 'User:<name>' or 'Group:<name>'")

    def apply_object(self, body: dict) -> dict:
        """Server-side apply one object (typed API for core/networking kinds, custom objects
        for CRDs) with field manager ``sandbox-kernel``. The seam the policy objects go through."""
        from kubernetes import client

        api_version, kind = body["apiVersion"], body["kind"]
        name = body["metadata"]["name"]
        ns = body["metadata"].get("namespace")
        kw = {"field_manager": FIELD_MANAGER, "force": True, "_content_type": "application/apply-patch+yaml"}
        api = self.api_client()
        typed = {
            ("v1", "Namespace"): ("namespaces", lambda: client.CoreV1Api(api).patch_namespace(name, body, **kw)),
            ("v1", "ServiceAccount"): ("serviceaccounts", lambda: client.CoreV1Api(api).patch_namespaced_service_account(name, ns, body, **kw)),
            ("v1", "ResourceQuota"): ("resourcequotas", lambda: client.CoreV1Api(api).patch_namespaced_resource_quota(name, ns, body, **kw)),
            ("v1", "LimitRange"): ("limitranges", lambda: client.CoreV1Api(api).patch_namespaced_limit_range(name, ns, body, **kw)),
            ("v1", "ConfigMap"): ("configmaps", lambda: client.CoreV1Api(api).patch_namespaced_config_map(name, ns, body, **kw)),
            ("networking.k8s.io/v1", "NetworkPolicy"): ("networkpolicies", lambda: client.NetworkingV1Api(api).patch_namespaced_network_policy(name, ns, body, **kw)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("rolebindings", lambda: client.RbacAuthorizationV1Api(api).patch_namespaced_role_binding(name, ns, body, **kw)),
        }
        if (api_version, kind) in typed:
            resource, call = typed[(api_version, kind)]
            group = api_version.rpartition("/")[0]
            result = self._call("patch", resource, ns, call, group=group)
            return api.sanitize_for_serialization(result)
        group, _, version = api_version.partition("/")
        plural = _plural(group, kind)
        return self._call("patch", plural, ns, lambda: client.CustomObjectsApi(api).patch_namespaced_custom_object(
            group, version, ns, plural, name, body, **kw), group=group)

    # --- policy ----------------------------------------------------------------------

    def pod_selector(self) -> dict[str, str]:
        return {objects.KERNEL_LABEL: objects.label_value(self.kernel_id or "")}

    def screen(self):
        """The ceiling's :class:`~sandbox_kernel.policy.destinations.AddressScreen` (set by the
        kernel or the hub service), else the default ceiling's."""
        if self.address_screen is not None:
            return self.address_screen
        from ..policy.admin import AdminPolicy

        return AdminPolicy().address_screen()

    def policy_objects(self, policy: Any, resolved: dict | None = None) -> list[dict]:
        """Compile ``policy`` with every configured cluster enforcer (pure; no API calls)."""
        from ..policy.enforcers import render

        out: list[dict] = []
        seen: set[tuple[str, str]] = set()
        for enforcer in self.enforcers:
            rendered = render(policy, enforcer, namespace=self.namespace, pod_selector=self.pod_selector(),
                              name=f"{self.pod}-egress", resolved=resolved, always_blocked=self.always_blocked,
                              node_local_dns=_yes(self.node_local_dns, "node_local_dns"),
                              gke_cloud_dns=_yes(self.gke_cloud_dns, "gke_cloud_dns"), screen=self.screen())
            for obj in rendered:
                obj.setdefault("metadata", {}).setdefault("labels", {}).update(
                    {objects.MANAGED_BY_LABEL: objects.MANAGED_BY, **self.pod_selector()})
                key = (obj["kind"], obj["metadata"]["name"])
                if key not in seen:
                    seen.add(key)
                    out.append(obj)
        return out

    async def _apply_policy_objects(self, policy: Any) -> dict[str, Any]:
        """Resolve (with TTLs), screen, compile and apply; :attr:`applied` says what and until when."""
        resolved = None
        answered: dict[str, list[str]] = {}
        screened: list[tuple[str, str, str]] = []
        expires_at = resolved_at = None
        if policy is not None and getattr(policy, "mode", None) == "allowlist" and policy.domains() \
                and "networkpolicy" in self.enforcers:
            from ..policy.resolve import resolve_policy

            resolved_at = time.time()
            resolution = await asyncio.to_thread(resolve_policy, policy, self.resolver or None)
            resolved, screened = self.screen().split(resolution.addresses)
            answered = {name: list(addresses) for name, addresses in resolved.items()}
            expires_at = resolution.expires_at
            if resolution.errors:
                self.log.warning("could not resolve %s", ", ".join(sorted(resolution.errors)))
            for name, address, why in screened:
                self.log.warning("not opening %s for %s: %s", address, name, why)
            before, before_expiry = self._resolved_before
            if before_expiry > resolved_at:
                # answers given out before this refresh may still be cached in the sandbox
                # until they expire: keep their addresses in force for one more round
                for name in resolved:
                    resolved[name] = sorted(set(resolved[name]) | set(before.get(name, ())),
                                            key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))
        try:
            new = self.policy_objects(policy, resolved)
        except PolicyError:
            raise
        previous = self._policy_objects
        started = time.monotonic()
        try:
            await asyncio.to_thread(lambda: [self.apply_object(o) for o in new])
        except SandboxError as err:
            if previous:
                try:
                    await asyncio.to_thread(lambda: [self.apply_object(o) for o in previous])
                except SandboxError:
                    pass
            raise PolicyError(f"the egress policy could not be applied; the previous one stays in force: {err}") from None
        stale = {(o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in previous} - {
            (o["apiVersion"], o["kind"], o["metadata"]["name"]) for o in new}
        if stale:
            await asyncio.to_thread(self._delete_named, stale)
        self._policy_objects = new
        self._applied = {"enforcer": ",".join(self.enforcers), "applied_at": time.time(),
                         "apply_ms": round((time.monotonic() - started) * 1000, 1),
                         "objects": [f"{o['kind']}/{o['metadata']['name']}" for o in new],
                         "resolved": resolved or {}, "answered": answered,
                         "resolved_at": resolved_at, "expires_at": expires_at,
                         "screened": [{"host": n, "ip": a, "why": w} for n, a, w in screened]}
        return self.applied

    #: re-resolve this long before the answers expire (fraction of the TTL, bounds in s),
    #: so the new ipBlocks are in force before a sandbox's cached answer runs out
    REFRESH_EARLY = (0.2, 1.0, 30.0)

    def _schedule_refresh(self, policy: Any) -> None:
        """Re-resolve the policy's domains before their answers expire and re-apply
        (as the local backend does). Called after every successful apply."""
        if self._refresh is not None and self._refresh is not asyncio.current_task():
            self._refresh.cancel()
        self._refresh = None
        expires_at, resolved_at = self._applied.get("expires_at"), self._applied.get("resolved_at")
        if not expires_at or expires_at == float("inf") or not resolved_at:
            return
        share, low, high = self.REFRESH_EARLY
        early = min(max((expires_at - resolved_at) * share, low), high)

        async def refresh() -> None:
            await asyncio.sleep(max(0.5, expires_at - early - time.time()))
            # the last answers (not what is in force: that still holds the round before)
            self._resolved_before = (self._applied.get("answered") or {}, expires_at)
            try:
                await self._apply_policy_objects(policy)
            except (PolicyError, SandboxError) as err:
                self.log.warning("refreshing the resolved addresses failed, keeping the old ones: %s", err)
                self._applied = {**self._applied, "expires_at": time.time() + 30.0, "resolved_at": time.time()}
            self._refresh = None
            self._schedule_refresh(policy)

        self._refresh = asyncio.ensure_future(refresh())

    # --- the pod ---------------------------------------------------------------------

    def make_pod(self):
        from ..agent.bundle import pyz_digest

        return objects.make_pod(
            self.pod, self.namespace, kernel_id=self.kernel_id, user=self.user, image=self.image,
            agent_configmap=objects.agent_configmap_name(pyz_digest()), requests=self.requests,
            limits=self.limits, image_pull_policy=self.image_pull_policy, runtime_class=self.runtime_class,
            node_selector=self.node_selector, tolerations=self.tolerations,
            annotations={"sandbox-kernel.io/idle-timeout": str(int(self.idle_timeout))} if self.idle_timeout else None,
            orphan_exit=self.orphan_timeout,
        )

    def _create_pod(self) -> dict:
        body = objects.to_dict(self.make_pod())
        pod = self._call("create", "pods", self.namespace, self._core().create_namespaced_pod, self.namespace, body)
        return self.api_client().sanitize_for_serialization(pod)

    def _read_pod(self) -> dict | None:
        try:
            pod = self._call("get", "pods", self.namespace, self._core().read_namespaced_pod, self.pod, self.namespace)
        except _NotFound:
            return None
        return self.api_client().sanitize_for_serialization(pod)

    async def _wait_ready(self, resource_version: str, progress: Progress) -> None:
        """Watch the pod and its events (from the create's resourceVersion) until Ready."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        core = self._core()
        timeout = max(1, int(self.start_timeout) + 1)
        watches = [
            _Watch(queue, loop, "pod", "pods", self.namespace, core.list_namespaced_pod, self.namespace,
                   field_selector=f"metadata.name={self.pod}", resource_version=resource_version,
                   timeout_seconds=timeout),
            _Watch(queue, loop, "event", "events", self.namespace, core.list_namespaced_event, self.namespace,
                   field_selector=f"involvedObject.name={self.pod}", resource_version=resource_version,
                   timeout_seconds=timeout),
        ]
        for w in watches:
            w.start()
        tracker = StartTracker(self.image, progress)
        deadline = loop.time() + self.start_timeout
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise SandboxStartError(
                        f"the sandbox pod {self.namespace}/{self.pod} was not ready within "
                        f"{self.start_timeout:.0f} s (c.KubernetesBackend.start_timeout); last state: {tracker.last}")
                try:
                    source, kind, obj = await asyncio.wait_for(queue.get(), min(remaining, 1.0))
                except asyncio.TimeoutError:
                    tracker.tick(self.schedule_timeout)
                    continue
                if source == "error":
                    raise obj
                if source == "event":
                    tracker.event(obj)
                elif kind == "DELETED":
                    raise SandboxStartError(f"the sandbox pod {self.namespace}/{self.pod} was deleted while starting")
                elif tracker.pod(obj):
                    return
                tracker.tick(self.schedule_timeout)
        finally:
            for w in watches:
                w.stop()

    def _open_exec(self, command: list[str]):
        """Open the exec WebSocket (own ApiClient: ``stream()`` swaps the client's call_api)."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException
        from kubernetes.stream import stream

        api_client = client.ApiClient(self.configuration())
        api = client.CoreV1Api(api_client)
        try:
            return stream(api.connect_get_namespaced_pod_exec, self.pod, self.namespace, command=command,
                          container=objects.CONTAINER, stdin=True, stdout=True, stderr=True, tty=False,
                          _preload_content=False, binary=True)
        except ApiException as err:
            m = re.search(r"Handshake status (\d+)", str(err.reason))
            code = int(m.group(1)) if m else 0
            if code == 403:
                raise KubernetesForbidden("create", "pods/exec", self.namespace, str(err.reason)) from None
            if code == 0:
                raise KubernetesUnavailable(f"cannot open an exec stream to the Kubernetes API server "
                                            f"({self.configuration().host}): {err.reason}") from None
            raise SandboxStartError(f"the exec stream to pod {self.namespace}/{self.pod} failed: {err.reason}") from None
        finally:
            api_client.close()  # the WebSocket does not use it once open

    async def _idle_watch(self) -> None:
        """Stop the pod after ``idle_timeout`` s with no cell running (stream closed → Session sees it)."""
        while True:
            transport = self._transport
            if transport is None:
                return
            idle = transport.idle_for()
            if idle is not None and idle >= self.idle_timeout:
                self.log.info("sandbox %s idle for %.0f s: removing it", self.pod, idle)
                self._idle_stopped = True
                await self.stop()
                return
            await asyncio.sleep(max(0.05, min(self.idle_timeout - (idle or 0), 5.0)))

    # --- cleanup ---------------------------------------------------------------------

    def _kinds(self) -> list[tuple[str, str, str]]:
        return sorted({k for e in self.enforcers for k in ENFORCER_KINDS.get(e, [])})

    def _delete_kernel_objects(self) -> None:
        from kubernetes import client

        try:
            self._call("delete", "pods", self.namespace, self._core().delete_namespaced_pod, self.pod,
                       self.namespace, grace_period_seconds=1)
        except _NotFound:
            pass
        selector = f"{objects.KERNEL_LABEL}={objects.label_value(self.kernel_id or '')}"
        api = self.api_client()
        for group, version, plural in self._kinds():
            if (group, plural) == ("networking.k8s.io", "networkpolicies"):
                call = lambda: client.NetworkingV1Api(api).delete_collection_namespaced_network_policy(
                    self.namespace, label_selector=selector)
            else:
                call = lambda g=group, v=version, p=plural: client.CustomObjectsApi(api).delete_collection_namespaced_custom_object(
                    g, v, self.namespace, p, label_selector=selector)
            try:
                self._call("deletecollection", plural, self.namespace, call, group=group)
            except _NotFound:
                pass

    def _delete_named(self, keys: set[tuple[str, str, str]]) -> None:
        from kubernetes import client

        api = self.api_client()
        for api_version, kind, name in keys:
            group, _, version = api_version.rpartition("/")
            if kind == "NetworkPolicy":
                call = lambda n=name: client.NetworkingV1Api(api).delete_namespaced_network_policy(n, self.namespace)
            else:
                plural = _plural(group, kind)
                call = lambda g=group, v=version, p=plural, n=name: client.CustomObjectsApi(api).delete_namespaced_custom_object(
                    g, v, self.namespace, p, n)
            try:
                self._call("delete", _plural(group, kind), self.namespace, call, group=group)
            except _NotFound:
                pass

    # --- error mapping ----------------------------------------------------------------

    def _call(self, verb: str, resource: str, namespace: str | None, fn, *args, group: str = "", **kwargs):
        """Run one API call; turn ApiException into a typed error naming verb and resource."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as err:
            raise _api_error(err, verb, resource if not group else f"{resource}.{group}", namespace) from None
        except HTTPError as err:
            raise KubernetesUnavailable(
                f"cannot reach the Kubernetes API server at {self.configuration().host}: {err}") from None


class _NotFound(SandboxError):
    ename = "NotFound"


def _status_message(err) -> tuple[str, str]:
    try:
        body = json.loads(err.body or "{}")
        return body.get("message", ""), body.get("reason", "")
    except (TypeError, ValueError):
        return str(err.body or err.reason or ""), ""


def _api_error(err, verb: str, resource: str, namespace: str | None) -> SandboxError:
    """An ApiException as the error a user should see (pure; the tests call it too)."""
    message, reason = _status_message(err)
    if err.status == 404:
        return _NotFound(message or f"{resource} not found")
    if err.status == 403 and ("exceeded quota" in message or "failed quota" in message):
        return QuotaExceeded(namespace or "?", message)
    if err.status == 403:
        # the RBAC authorizer's own phrasing; anything else is admission, not permissions
        if re.search(r'cannot [a-z]+ resource "', message):
            return KubernetesForbidden(verb, resource, namespace, message)
        for cause, pattern, advice in KubernetesRefused.CAUSES:
            if re.search(pattern, message) or re.search(pattern, err.body or ""):
                return KubernetesRefused(verb, resource, namespace, cause, advice, message)
        return KubernetesRefused(verb, resource, namespace, "forbidden",
                                 "the API server answered 403 Forbidden, not for a missing permission of the kernel's "
                                 "account but for the reason it gives below; show it to your administrator", message)
    if err.status == 401:
        return KubernetesUnavailable(f"the Kubernetes API server rejected the kernel's credentials (401): {message}")
    if err.status == 422:
        return SandboxStartError(f"Kubernetes rejected the {resource} object as invalid (a bug in "
                                 f"sandbox-kernel or its configuration): {message}")
    return SandboxStartError(f"Kubernetes could not {verb} {resource}: {err.status} {reason} {message}".strip())


def _plural(group: str, kind: str) -> str:
    for kinds in ENFORCER_KINDS.values():
        for g, _, plural in kinds:
            if g == group and plural.rstrip("s") in (kind.lower(), kind.lower().rstrip("y") + "ie"):
                return plural
    return kind.lower() + "s"


def _load_configuration(context: str | None):
    """In-cluster config when running in a pod, else kubeconfig. Raises KubernetesUnavailable."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not context:
            config.load_incluster_config(client_configuration=cfg)
        else:
            # KUBECONFIG read now: the client reads it once, when kubernetes.config is imported
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, context=context,
                                    client_configuration=cfg)
    except Exception as err:  # noqa: BLE001 - the client raises several unrelated types here
        raise KubernetesUnavailable(
            "no Kubernetes credentials: run the kernel in a pod with a service account, or provide a "
            f"kubeconfig (KUBECONFIG, ~/.kube/config; context: c.KubernetesBackend.context). ({err})"
        ) from None
    return cfg


# --- start progress -------------------------------------------------------------------

class StartTracker:
    """Turns pod states and events into progress lines and typed failures (pure logic).

    Fed by KubernetesBackend._wait_ready(); ``pod()`` returns True once the pod is Ready.
    """

    def __init__(self, image: str, progress: Progress, clock: Callable[[], float] = time.monotonic):
        self.image = image
        self.progress = progress
        self.clock = clock
        self.last = "created"
        self._said: set[str] = set()
        self._unschedulable_since: float | None = None
        self._unschedulable_msg = ""

    def say(self, line: str) -> None:
        if line not in self._said:
            self._said.add(line)
            self.progress(line)

    def event(self, ev: dict) -> None:
        reason, message = ev.get("reason", ""), ev.get("message", "")
        if reason == "Scheduled":
            self._unschedulable_since = None
            node = message.rpartition(" to ")[2]
            self.say(f"Scheduled on node {node}" if node else "Scheduled")
        elif reason == "FailedScheduling":
            self._unschedulable_msg = message
            if self._unschedulable_since is None:
                self._unschedulable_since = self.clock()
            self.say(f"Waiting for a node: {message}")
        elif reason == "TriggeredScaleUp":
            # a node is on its way (GKE Autopilot and gVisor pools take minutes): the
            # schedule timeout counts again from now, not from the first FailedScheduling
            if self._unschedulable_since is not None:
                self._unschedulable_since = self.clock()
            self.say("Waiting for the cluster to add a node…")
        elif reason == "Pulling":
            self.say(f"Pulling image {self.image}…")
        elif reason == "Pulled":
            m = re.search(r" in ([0-9.]+m?s)", message)
            self.say(f"Pulled image {self.image}" + (f" in {m.group(1)}" if m else ""))
        elif reason == "Started":
            self.say("Started")
        elif reason in ("Failed", "BackOff") and ("pull" in message.lower() or "ErrImagePull" in message):
            if "Failed to pull image" in message:
                self._pull_error = message
        self.last = f"{reason}: {message}"

    def pod(self, pod: dict) -> bool:
        status = pod.get("status") or {}
        for cond in status.get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" \
                    and cond.get("reason") == "Unschedulable" and self._unschedulable_since is None:
                self._unschedulable_since = self.clock()
                self._unschedulable_msg = cond.get("message", "")
                self.say(f"Waiting for a node: {self._unschedulable_msg}")
        for cs in status.get("containerStatuses") or []:
            state = cs.get("state") or {}
            waiting = state.get("waiting") or {}
            if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
                raise ImagePullFailed(self.image, getattr(self, "_pull_error", "") or waiting.get("message", ""))
            if waiting.get("reason") in ("CreateContainerConfigError", "CreateContainerError", "RunContainerError"):
                raise SandboxStartError(f"the sandbox container could not be created: {waiting.get('message', '')}")
            if "terminated" in state:
                term = state["terminated"]
                raise SandboxStartError(
                    f"the sandbox container exited during start (exit code {term.get('exitCode')}, "
                    f"{term.get('reason', '')}){_hint(term.get('exitCode'))}")
        if status.get("phase") in ("Failed", "Succeeded"):
            raise SandboxStartError(f"the sandbox pod ended during start: {status.get('reason', '')} "
                                    f"{status.get('message', '')}".strip())
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if ready:
            self.say("Ready")
        self.last = f"phase {status.get('phase')}"
        return ready

    def tick(self, schedule_timeout: float) -> None:
        if self._unschedulable_since is not None:
            waited = self.clock() - self._unschedulable_since
            if waited >= schedule_timeout:
                raise Unschedulable(self._unschedulable_msg, waited)


def _hint(exit_code) -> str:
    if exit_code == 127:
        return ": the image has no python3 on its PATH (c.KubernetesBackend.image)"
    return ""


def pod_alive(pod: dict | None) -> bool:
    """True when the pod's agent still runs: Running, not being deleted, container not ended (pure)."""
    if pod is None or pod["metadata"].get("deletionTimestamp"):
        return False
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return not any("terminated" in (cs.get("state") or {}) for cs in status.get("containerStatuses") or [])


def describe_pod_end(pod: dict | None) -> tuple[str, int | None]:
    """Why a pod's agent is gone, in plain words, and its exit status when known (pure)."""
    if pod is None:
        return "the sandbox pod was deleted", None
    if pod["metadata"].get("deletionTimestamp"):
        return "the sandbox pod is being deleted", None
    status = pod.get("status") or {}
    if status.get("reason") == "Evicted":
        return f"the sandbox pod was evicted: {status.get('message', '')}".strip(), None
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if term:
            code = term.get("exitCode")
            what = "was killed (out of memory)" if term.get("reason") == "OOMKilled" else f"exited with status {code}"
            return f"the agent in the sandbox pod {what}", code
    return "the exec stream to the sandbox pod closed (the pod is still running)", None


# --- watching in threads ------------------------------------------------------------------

class _Watch:
    """List-and-watch of one resource in a daemon thread, feeding ``(source, type,
    object-dict)`` into an asyncio queue. ``stop()`` ends it at once (its response is closed).

    Real API servers end watches in three ways this must survive (the client library's
    ``Watch`` does not: it raises ``KeyError: 'raw_object'`` on an ERROR event without
    deserialisation, and a clean close ends its stream silently):

    * a clean close (API server restart, load balancer idle timeout, ``timeoutSeconds``):
      watch again from the last resourceVersion seen, so nothing in between is lost;
    * an ERROR event or a 410 Gone (the resourceVersion was compacted away): list again,
      emit what the list shows (a pod that is gone as ``DELETED``), and watch from the
      list's resourceVersion;
    * the connection failing (the API server is down for a moment), a 5xx, or a 429 (a
      restarted server refuses watches until its cache is filled): retry with backoff
      for :attr:`UNREACHABLE_FOR` s, then report KubernetesUnavailable.

    Any other error event or status is reported as the typed error :func:`_api_error`
    makes. Counters ``rewatches`` and ``relists`` let tests check which path ran.
    """

    UNREACHABLE_FOR = 30.0

    def __init__(self, queue, loop, source, resource, namespace, func, *args,
                 field_selector: str, resource_version: str, timeout_seconds: int):
        self.queue, self.loop, self.source = queue, loop, source
        self.resource, self.namespace = resource, namespace
        self.func, self.args = func, args
        self.field_selector, self.resource_version, self.timeout_seconds = field_selector, resource_version, timeout_seconds
        self.rewatches = self.relists = 0
        self.allowed_once = False  # a watch was opened (the identity may watch)
        self._stopped = threading.Event()
        self._resp = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"sandbox-watch-{source}")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stopped.set()
        # shut the socket (not close the response: that waits for the reader thread's
        # lock): the reader's recv returns at once and the thread ends, freeing the connection
        resp = self._resp
        conn = getattr(resp, "connection", None) or getattr(resp, "_connection", None)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    def _error(self, err: SandboxError) -> None:
        if not self._stopped.is_set():
            self._put(("error", None, err))

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        failing_since: float | None = None
        while not self._stopped.is_set():
            refused = None  # a 403 being retried
            try:
                outcome = self._watch_once()
                failing_since = None
            except ApiException as err:
                refused = err if err.status == 403 else None
                if err.status == 410:
                    outcome = "gone"
                elif _retryable(err.status) or self._refused_after_allowed(err):
                    outcome = f"failed: {err.status} {err.reason}"
                else:
                    self._error(_api_error(err, "watch", self.resource, self.namespace))
                    return
            except _WatchError as err:
                self._error(err.error)
                return
            except Exception as err:  # noqa: BLE001 - a dropped or refused connection surfaces as many types
                if self._stopped.is_set():
                    return
                outcome = f"failed: {err}"
            if self._stopped.is_set():
                return
            if outcome == "gone":
                try:
                    self._relist()
                except ApiException as err:
                    if not (_retryable(err.status) or self._refused_after_allowed(err)):
                        self._error(_api_error(err, "list", self.resource, self.namespace))
                        return
                    refused = err if err.status == 403 else None
                    outcome = f"failed: {err.status} {err.reason}"
                except Exception as err:  # noqa: BLE001 - as above
                    outcome = f"failed: {err}"
            if outcome.startswith("failed"):
                now = time.monotonic()
                failing_since = failing_since if failing_since is not None else now
                if now - failing_since > self.UNREACHABLE_FOR:
                    if refused is not None:  # still refused: the identity lost the right
                        self._error(_api_error(refused, "watch", self.resource, self.namespace))
                    else:
                        self._error(KubernetesUnavailable(f"watching {self.resource} failed for "
                                                          f"{self.UNREACHABLE_FOR:.0f} s: {outcome[8:]}"))
                    return
                self._stopped.wait(min(0.2 * 2 ** min(int(now - failing_since), 4), 2.0))
            else:
                self.rewatches += 1

    def _refused_after_allowed(self, err) -> bool:
        """A 403 for a watch this identity was allowed to open a moment ago: a restarting
        API server serves before its RBAC caches are filled and refuses meanwhile (seen on
        the test cluster: 'clusterrole … not found' for every role), so it is retried like
        an unreachable server; one that lasts :attr:`UNREACHABLE_FOR` s is reported."""
        return err.status == 403 and self.allowed_once

    def _watch_once(self) -> str:
        """One watch request from :attr:`resource_version`; returns "closed" (clean end) or
        "gone" (list again). Raises ApiException or _WatchError for the caller to sort out."""
        from kubernetes.client.exceptions import ApiException

        resp = self.func(*self.args, field_selector=self.field_selector, resource_version=self.resource_version,
                         timeout_seconds=self.timeout_seconds, allow_watch_bookmarks=True, watch=True,
                         _preload_content=False)
        self._resp = resp
        try:
            _check_status(resp)
            self.allowed_once = True
            for event in _json_lines(resp):
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return "gone"
                    err = ApiException(status=obj.get("code") or 500, reason=obj.get("reason", ""))
                    err.body = json.dumps(obj)
                    if _retryable(err.status):
                        raise err
                    raise _WatchError(_api_error(err, "watch", self.resource, self.namespace))
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if version:
                    self.resource_version = version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._put((self.source, kind, obj))
                if self._stopped.is_set():
                    break
            return "closed"
        finally:
            self._resp = None
            try:
                resp.close()
                resp.release_conn()
            except Exception:  # noqa: BLE001 - already closed
                pass

    def _relist(self) -> None:
        """List what the watch selects; emit it (none for a pod: DELETED) and move to its version."""
        resp = self.func(*self.args, field_selector=self.field_selector, _preload_content=False)
        _check_status(resp)
        listed = json.loads(resp.data)
        self.relists += 1
        items = listed.get("items") or []
        for item in items:
            self._put((self.source, "MODIFIED", item))
        if not items and self.source == "pod":
            self._put((self.source, "DELETED", {}))
        self.resource_version = (listed.get("metadata") or {}).get("resourceVersion") or self.resource_version


def _retryable(status: int | None) -> bool:
    """A watch or list answer to retry: no answer (0), a 5xx, or 429 — which a restarting
    API server sends ("storage is (re)initializing", Retry-After) until its watch cache is
    filled again, after its port already accepts connections."""
    return not status or status >= 500 or status == 429


class _WatchError(Exception):
    """A typed error found inside a watch stream (an ERROR event the watch cannot recover from)."""

    def __init__(self, error: SandboxError):
        super().__init__(str(error))
        self.error = error


def _check_status(resp) -> None:
    """Raise ApiException for a non-2xx raw response (newer clients do not, unpreloaded)."""
    from kubernetes.client.exceptions import ApiException

    status = getattr(resp, "status", 200)
    if isinstance(status, int) and not 200 <= status <= 299:
        err = ApiException(status=status, reason=getattr(resp, "reason", ""))
        err.body = resp.data
        raise err


def _json_lines(resp):
    """The JSON objects of a watch response, one per line, as they arrive."""
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=False):
        buffer += chunk if isinstance(chunk, bytes) else chunk.encode()
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield json.loads(line)
    if buffer.strip():
        yield json.loads(buffer)


# --- the exec stream as a transport ----------------------------------------------------------

class _ExecWriter:
    """The writer half LineTransport expects, sending to the exec stdin channel in a thread.

    While the transport re-attaches after a dropped stream, a send waits for the new
    stream (up to ``REATTACH_WAIT`` s) instead of failing."""

    REATTACH_WAIT = 65.0  # ExecTransport.REATTACH_FOR, and a little

    def __init__(self, ws):
        self.ws = ws
        self._buffer = bytearray()
        self.closed = False
        self.finished = False  # set by the reader thread when the stream ended for good
        self.reattaching = threading.Event()

    def write(self, data: bytes) -> None:
        self._buffer += data

    async def drain(self) -> None:
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            try:
                await asyncio.to_thread(self._send, data)
            except Exception as err:  # noqa: BLE001 - websocket-client raises several types
                self.closed = True
                raise ConnectionError(f"the exec stream to the sandbox is closed: {err}") from None

    def _send(self, data: bytes) -> None:
        deadline = time.monotonic() + self.REATTACH_WAIT
        while True:
            while self.reattaching.is_set() and not self.closed and time.monotonic() < deadline:
                time.sleep(0.02)
            ws = self.ws
            try:
                ws.write_stdin(data)
                return
            except Exception:  # noqa: BLE001 - websocket-client raises several types
                # the reader thread may not have seen the drop yet: give it a second to re-attach
                noticed = time.monotonic() + 1.0
                while self.ws is ws and not self.reattaching.is_set() and time.monotonic() < noticed:
                    time.sleep(0.02)
                if self.closed or time.monotonic() > deadline or (self.ws is ws and not self.reattaching.is_set()):
                    raise

    def is_closing(self) -> bool:
        return self.closed or self.finished

    def close(self) -> None:
        self.closed = True


class ExecTransport(LineTransport):
    """Frames over a pod exec: stdin channel out, stdout channel in (stderr goes to the log).

    A reader thread pulls channel data from the WebSocket and feeds an asyncio
    StreamReader with whole lines only; the channel-3 status is kept as :attr:`status`
    when the exec ends. When the stream is cut without a status (a load balancer, an API
    server restart, a network blip) and ``alive()`` says the pod still runs, the thread
    re-attaches with ``reopen()`` (at least :attr:`MAX_REATTACH` tries, and for up to
    :attr:`REATTACH_FOR` s while the API server cannot answer or refuses: a restarting one
    is down for seconds, then refuses until its RBAC caches are filled): the agent is the
    pod's main process and keeps the interpreter. Frames are numbered both ways (see
    agent/protocol.py): the new stream opens with ``resume {since}`` and the frames the
    agent has not acknowledged are sent again, the agent replays what it wrote after
    ``since``, and each side drops duplicates by ``seq`` — so nothing that was in flight
    in the old stream is lost and no cell runs twice. The agent's greeting on the new
    stream is dropped, so the Session sees one uninterrupted stream.
    :attr:`reattached` counts the re-attaches.
    Also tracks whether a cell is running, for the idle timeout.
    """

    MAX_REATTACH = 5
    REATTACH_FOR = 60.0
    #: kernel frames kept for resending until the agent acknowledges them
    MAX_UNACKED = 4096

    def __init__(self, ws, loop: asyncio.AbstractEventLoop, log,
                 reopen: Callable[[], Any] | None = None, alive: Callable[[], bool] | None = None):
        self.ws = ws
        self.loop = loop
        self.log = log
        self.status: dict | None = None
        self.reattached = 0
        self._reopen, self._alive = reopen, alive
        self._busy: set = set()
        self._last = time.monotonic()
        self._hello_seen = False
        self._out_seq = 0  # seq of the last frame sent
        self._unacked: collections.deque[tuple[int, bytes]] = collections.deque()
        self._in_seq = 0  # highest seq of an agent frame received
        reader = asyncio.StreamReader(limit=protocol.MAX_FRAME + 1)
        super().__init__(reader, _ExecWriter(ws))
        self._client = secrets.token_hex(8)  # names this transport's numbering to the agent
        # Before any other frame: a new client, which gets what no client was sent yet. The
        # reader thread writes it (a websocket write blocks when the stream is slow, and
        # nothing may block the event loop); sends wait for it as they wait for a re-attach.
        self._writer.reattaching.set()
        self._thread = threading.Thread(target=self._pump, daemon=True, name="sandbox-exec-reader")
        self._thread.start()

    def _feed(self, data: bytes) -> None:
        self.loop.call_soon_threadsafe(self._reader.feed_data, data)

    def _greet(self) -> bool:
        """Write the opening ``resume`` frame (reader thread); False when the stream is dead."""
        try:
            self.ws.write_stdin(protocol.encode({"type": "resume", "client": self._client, "since": None}))
            return True
        except Exception as err:  # noqa: BLE001 - websocket-client raises several types
            self.log.info("the exec stream failed at once: %s", err)
            return False
        finally:
            self._writer.reattaching.clear()

    def _pump(self) -> None:
        partial = b""
        try:
            if not self._greet():
                return
            while True:
                ws = self.ws
                try:
                    while ws.is_open() and not self._writer.closed:
                        ws.update(timeout=0.5)
                        out = ws.read_channel(1)
                        if out:
                            data = partial + out
                            cut = data.rfind(b"\n") + 1
                            if cut:
                                self._feed(data[:cut])
                            partial = data[cut:]
                        err = ws.read_channel(2)
                        if err:
                            self.log.info("sandbox agent stderr: %s", err.decode("utf-8", "replace").rstrip())
                except Exception as err:  # noqa: BLE001 - "Connection to remote host was lost." and others
                    self.log.info("exec stream cut: %s", err)
                status = ws.read_channel(3)
                if status:
                    try:
                        self.status = json.loads(status)
                    except ValueError:
                        self.status = {"message": status.decode("utf-8", "replace")}
                if self.status is not None or self._writer.closed or not self._reattach():
                    break
                if partial:
                    self.log.warning("dropped %d bytes of a frame cut by the stream drop", len(partial))
                partial = b""
        except Exception as err:  # noqa: BLE001 - a dropped socket may surface as many types
            self.log.info("exec stream ended: %s", err)
        finally:
            self._writer.finished = True
            if partial:
                self._feed(partial)  # recv() reports the frame cut short
            try:
                self.loop.call_soon_threadsafe(self._reader.feed_eof)
            except RuntimeError:
                pass

    def _reattach(self) -> bool:
        """After a drop without exit status: open a new exec if the pod still runs (reader thread)."""
        if self._reopen is None or self._alive is None:
            return False
        writer = self._writer
        writer.reattaching.set()
        deadline = time.monotonic() + self.REATTACH_FOR
        attempt = -1
        try:
            while True:
                attempt += 1
                if attempt >= self.MAX_REATTACH and time.monotonic() > deadline:
                    return False
                if writer.closed:
                    return False
                try:
                    if not self._alive():
                        return False
                    ws = self._reopen()
                    # first on the new stream: where to resume, then what the agent may not have got
                    try:
                        ws.write_stdin(protocol.encode({"type": "resume", "client": self._client, "since": self._in_seq})
                                       + b"".join(data for _, data in list(self._unacked)))
                    except Exception as err:  # noqa: BLE001 - websocket-client raises several types
                        raise SandboxError(f"the new exec stream failed at once: {err}") from None
                except SandboxError as err:
                    self.log.warning("re-attaching to the sandbox failed (try %d): %s", attempt + 1, err)
                    time.sleep(min(0.2 * 2 ** attempt, 2.0))
                    continue
                self.ws = writer.ws = ws
                self.reattached += 1
                self.log.warning("the exec stream to the sandbox dropped; re-attached (%d)", self.reattached)
                return True
        finally:
            writer.reattaching.clear()

    async def send(self, frame: dict) -> None:
        if frame.get("type") == "execute":
            self._busy.add(frame.get("id"))
        self._last = time.monotonic()
        self._out_seq += 1
        frame = {**frame, "seq": self._out_seq}
        self._unacked.append((self._out_seq, protocol.encode(frame)))
        if len(self._unacked) > self.MAX_UNACKED:
            self._unacked.popleft()
        await super().send(frame)

    async def recv(self) -> dict | None:
        while True:
            frame = await super().recv()
            self._last = time.monotonic()
            if frame is not None:
                seq, ack = frame.get("seq"), frame.get("ack")
                if isinstance(seq, int):
                    if seq <= self._in_seq:
                        continue  # replayed after a re-attach: already passed on
                    self._in_seq = seq
                if isinstance(ack, int):
                    while self._unacked and self._unacked[0][0] <= ack:
                        self._unacked.popleft()
            if frame is not None and frame.get("type") == "hello":
                if self._hello_seen:
                    continue  # the agent greets every attach; the Session was greeted once
                self._hello_seen = True
            if frame is not None and frame.get("type") == "done":
                self._busy.discard(frame.get("id"))
            return frame

    def idle_for(self) -> float | None:
        """Seconds since the last frame, or None while a cell runs."""
        return None if self._busy else time.monotonic() - self._last

    async def close(self) -> None:
        self._writer.close()
        await asyncio.to_thread(self._close_ws)

    def _close_ws(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - already gone
            pass
        self._thread.join(2)


# --- garbage collection ---------------------------------------------------------------------

#: in a one-namespace sweep (``ended_only``), egress objects younger than this are kept:
#: another start of the same user applies its objects before it creates its pod
YOUNG_OBJECT = 600.0


def gc(max_age: float, api_client=None, enforcers: list[str] | None = None, now: float | None = None,
       config=None, namespace: str | None = None, ended_only: bool = False) -> list[str]:
    """Remove orphans by label and age; return what was removed ("pods ns/name", …).

    Called by ``sandbox-kernel gc`` (a CronJob in the Helm chart) for every namespace, and
    by the Kubernetes backend after each start for its user's ``namespace`` with
    ``ended_only`` (on by default: c.KubernetesBackend.gc_on_start). Removes sandbox pods
    (label ``app.kubernetes.io/managed-by=sandbox-kernel``) that ended (Succeeded/Failed)
    or, unless ``ended_only``, are older than ``max_age`` seconds; then per-kernel policy
    objects whose kernel has no pod left (with ``ended_only``, only those older than
    :data:`YOUNG_OBJECT`). Namespaces are kept (they are cheap and make the next start fast).
    """
    from kubernetes import client

    # settings from the kernels' config files (``config``), enforcers given on the command
    # line win over the configured ones (c.KubernetesBackend.enforcers, SANDBOX_KERNEL_K8S_ENFORCERS)
    extra = {"enforcers": enforcers} if enforcers else {}
    backend = KubernetesBackend(config=config, **extra) if config is not None else KubernetesBackend(**extra)
    if api_client is not None:
        backend._api_client = api_client
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


def gc_command(max_age: str | float = "24h", enforcers: list[str] | None = None, api_client=None,
               out: Callable[[str], None] = print, config=None) -> int:
    """``sandbox-kernel gc --backend kubernetes [--max-age 1h]`` (the Helm chart's CronJob).

    Prints one ``removed …`` line per object; returns 0, or 1 with the reason when the
    cluster cannot be reached or RBAC refuses a call."""
    try:
        seconds = parse_duration(max_age)
    except ValueError as err:
        out(f"sandbox-kernel gc: {err}")
        return 2
    try:
        removed = gc(seconds, api_client=api_client, enforcers=enforcers, config=config)
    except SandboxError as err:
        out(f"sandbox-kernel gc: {err}")
        return 1
    for line in removed:
        out(f"removed {line}")
    if not removed:
        out(f"nothing to clean up (no ended sandbox pod, none older than {seconds:.0f} s, no orphaned policy object)")
    return 0
