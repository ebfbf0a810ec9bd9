"""``KubernetesBackend``: the sandboxes of one kernel as pods (the package docstring gives the
sequence of API calls). This module holds the configuration, the start (namespace set-up, the
pod and its watch), the egress policy objects and stop; the parts are the package's other
modules: api (access and server-side apply), errors, permissions, start (tracking), watch,
transport (the exec stream), cleanup (gc), objects, slug, doctor."""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import ipaddress
import json
import os
import re
import secrets
import time
from typing import Any, Callable

from traitlets import Any as AnyTrait
from traitlets import Bool, Dict, Float, List, Unicode, default

from ...config import env_bool, env_default, parse_duration
from ...errors import PolicyError, SandboxError, SandboxStartError
from ...policy.resolve import DEFAULT_TTL
from ..base import Backend, Progress, SandboxInfo, Transport
from . import objects
from .api import ApiAccess, _plural, check_client_version
from .cleanup import sweep
from .errors import KubernetesForbidden, KubernetesUnavailable, _NotFound
from .permissions import ENFORCER_KINDS
from .slug import slugify, user_namespace
from .start import StartTracker, describe_pod_end, pod_alive
from .transport import ExecTransport
from .watch import _Watch

SETUP_ANNOTATION = "sandbox-kernel.io/setup"


def _csv(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


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


class KubernetesBackend(ApiAccess, Backend):
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
        from ...policy.resolve import upstream_from_resolv_conf

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
        self._reset_api()
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
        from ...agent.bundle import build_pyz, pyz_digest

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

    # --- policy ----------------------------------------------------------------------

    def pod_selector(self) -> dict[str, str]:
        return {objects.KERNEL_LABEL: objects.label_value(self.kernel_id or "")}

    def screen(self):
        """The ceiling's :class:`~sandbox_kernel.policy.destinations.AddressScreen` (set by the
        kernel or the hub service), else the default ceiling's."""
        if self.address_screen is not None:
            return self.address_screen
        from ...policy.admin import AdminPolicy

        return AdminPolicy().address_screen()

    def policy_objects(self, policy: Any, resolved: dict | None = None) -> list[dict]:
        """Compile ``policy`` with every configured cluster enforcer (pure; no API calls)."""
        from ...policy.enforcers import render

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
            from ...policy.resolve import resolve_policy

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
        from ...agent.bundle import pyz_digest

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


# --- garbage collection (cleanup.py sweeps) -----------------------------------------------

def gc(max_age: float, api_client=None, enforcers: list[str] | None = None, now: float | None = None,
       config=None, namespace: str | None = None, ended_only: bool = False) -> list[str]:
    """Remove orphans by label and age; return what was removed ("pods ns/name", …).

    Called by ``sandbox-kernel gc`` (a CronJob in the Helm chart) for every namespace, and
    by the Kubernetes backend after each start for its user's ``namespace`` with
    ``ended_only`` (on by default: c.KubernetesBackend.gc_on_start). Removes sandbox pods
    (label ``app.kubernetes.io/managed-by=sandbox-kernel``) that ended (Succeeded/Failed)
    or, unless ``ended_only``, are older than ``max_age`` seconds; then per-kernel policy
    objects whose kernel has no pod left (with ``ended_only``, only those older than
    :data:`~.cleanup.YOUNG_OBJECT`). Namespaces are kept (they are cheap and make the next start fast).
    """
    extra = {"enforcers": enforcers} if enforcers else {}
    # settings from the kernels' config files (``config``), enforcers given on the command
    # line win over the configured ones (c.KubernetesBackend.enforcers, SANDBOX_KERNEL_K8S_ENFORCERS)
    backend = KubernetesBackend(config=config, **extra) if config is not None else KubernetesBackend(**extra)
    if api_client is not None:
        backend._api_client = api_client
    return sweep(backend, max_age, now=now, namespace=namespace, ended_only=ended_only)


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
