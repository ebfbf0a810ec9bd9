"""``sandbox-kernel doctor --backend kubernetes``: is this cluster ready for sandboxes?

Prints a table (check, status, detail) and returns 0 when the cluster is ready, 1 when
not; every failing row says what to do. Statuses: ``ok``; ``FAIL`` (not ready);
``warn`` (works, but weaker than it could be, or inferred rather than seen); ``info``.

What it looks at, and the API calls (all read-only except SelfSubjectAccessReviews,
which only ask the API server a question):

- credentials: in-cluster service account or kubeconfig (no call), then ``GET /version``;
- every permission the backend uses with the configured enforcers
  (:func:`~sandbox_kernel.backends.kubernetes.required_permissions`), one
  SelfSubjectAccessReview each, asked for all namespaces (user namespaces are created on
  demand, so a grant must hold in every one of them); with a ``namespace_role`` (as the
  Helm chart configures kernels) only the cluster-scoped ones (``bind`` asked for that role
  by name), and the namespaced ones in the user's namespace when it exists;
- NetworkPolicy enforcement: the DaemonSets in kube-system, looking for the agents of
  the dataplanes that enforce NetworkPolicy (GKE Dataplane V2 ``anetd``, Cilium, Calico,
  …), a ``get`` of each name in :data:`DOCTOR_DAEMONSETS` (by name, so that the Helm
  chart can grant exactly these and nothing else in kube-system); if none,
  ``get`` of the Calico / Cilium CRDs (operator installs run outside kube-system);
- DNS: from the same DaemonSet list, whether NodeLocal DNSCache (``node-local-dns``) or
  GKE (``anetd``, ``gke-metadata-server``) runs, against the ``node_local_dns`` and
  ``gke_cloud_dns`` settings (a resolver the policy leaves out means no lookup works);
- gVisor: ``get runtimeclasses/<runtime_class or gvisor>``;
- FQDN policy CRDs: ``get customresourcedefinitions/<name>`` for GKE FQDN and Cilium;
- the configured image (syntax only: a pull can only be tried by a pod).

The doctor's own reads beyond :data:`REQUIRED_PERMISSIONS` are :data:`DOCTOR_PERMISSIONS`,
on the names in :data:`DOCTOR_DAEMONSETS` and :data:`DOCTOR_CRDS` and the RuntimeClass.
It asks the API server (SelfSubjectAccessReview) before each of them and makes only the
reads it is allowed; a row it could not check says so ("could not check"), why, and what
to grant. With the Helm chart's RBAC (``rbac.doctor``, on by default) the kernel identity
may make every one of them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Callable

from .backends import kubernetes as kb
from .backends.slug import user_namespace
from .errors import SandboxError

#: what ``doctor`` reads beyond REQUIRED_PERMISSIONS (apiGroup, resource, verb); each read
#: only by name: DaemonSets in kube-system named in DOCTOR_DAEMONSETS, CRDs named in
#: DOCTOR_CRDS, the configured RuntimeClass (or ``gvisor``). The Helm chart grants exactly
#: these (``rbac.doctor``).
DOCTOR_PERMISSIONS: tuple[tuple[str, str, str], ...] = (
    ("authorization.k8s.io", "selfsubjectaccessreviews", "create"),  # "may I?" for each call
    ("apps", "daemonsets", "get"),  # in kube-system, by name: which dataplane and DNS cache run
    ("apiextensions.k8s.io", "customresourcedefinitions", "get"),  # by name: FQDN / Calico / Cilium
    ("node.k8s.io", "runtimeclasses", "get"),  # by name: gVisor
)

OK, FAIL, WARN, INFO = "ok", "FAIL", "warn", "info"

_CLUSTER_SCOPED = {"namespaces", "selfsubjectaccessreviews"}

#: DaemonSets in kube-system whose presence means NetworkPolicy is enforced
ENFORCING_DAEMONSETS: dict[str, str] = {
    "anetd": "GKE Dataplane V2",
    "cilium": "Cilium",
    "calico-node": "Calico",
    "kube-router": "kube-router",
    "antrea-agent": "Antrea",
    "weave-net": "Weave Net",
    "kindnet": "kindnet (enforces NetworkPolicy from kind v0.24)",
    "kube-network-policies": "kube-network-policies",
}

#: kindnet enforces NetworkPolicy from kind v0.24.0, whose kindnetd image is tagged
#: v20240813-…; older kindnetd stores NetworkPolicies and enforces none
KINDNET_POLICY_SINCE = 20240813

#: CRDs that show an enforcing dataplane installed outside kube-system (operator installs)
ENFORCER_CRDS: dict[str, str] = {
    "felixconfigurations.crd.projectcalico.org": "Calico (operator install)",
    "ciliumnetworkpolicies.cilium.io": "Cilium",
}

#: FQDN / L7 policy CRDs: (crd name, served version the backend uses, enforcer, what to do)
FQDN_CRDS: tuple[tuple[str, str, str, str], ...] = (
    ("fqdnnetworkpolicies.networking.gke.io", "v1alpha1", "gke-fqdn",
     "enable FQDN network policies on the GKE cluster (Dataplane V2 required): "
     "gcloud container clusters update CLUSTER --enable-fqdn-network-policy"),
    ("ciliumnetworkpolicies.cilium.io", "v2", "cilium", "install Cilium as the cluster's CNI"),
)

#: DaemonSets (kube-system) that tell DNS: NodeLocal DNSCache; GKE's own agents
DNS_DAEMONSETS: tuple[str, ...] = ("node-local-dns", "gke-metadata-server", "fluentbit-gke")

#: every DaemonSet the doctor reads by name in kube-system (the chart grants ``get`` on these)
DOCTOR_DAEMONSETS: tuple[str, ...] = tuple(ENFORCING_DAEMONSETS) + DNS_DAEMONSETS

#: every CRD the doctor reads by name (the chart grants ``get`` on these)
DOCTOR_CRDS: tuple[str, ...] = tuple(dict.fromkeys([*ENFORCER_CRDS, *(c[0] for c in FQDN_CRDS)]))

_IMAGE_RE = re.compile(
    r"^(?:[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?/)?"      # registry host (optional)
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"                 # first path component
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"           # more path components
    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$")


@dataclass
class Check:
    """One row of the table."""

    name: str
    status: str
    detail: str = ""


class _Doctor:
    def __init__(self, backend: kb.KubernetesBackend):
        self.backend = backend
        self.rows: list[Check] = []
        self.daemonsets: list[str] | None = None  # names seen in kube-system, once read
        self.unread: list[str] = []  # DOCTOR_DAEMONSETS it was not allowed to read
        self.git_version = ""
        self._reviews: dict[tuple, tuple[bool | None, str]] = {}
        self._no_reviews = ""  # why SelfSubjectAccessReviews cannot be made, once seen

    def add(self, name: str, status: str, detail: str = "") -> Check:
        row = Check(name, status, detail)
        self.rows.append(row)
        return row

    # --- the checks ---------------------------------------------------------------

    def run(self) -> list[Check]:
        if not self.credentials() or not self.server():
            return self.rows
        self.permissions()
        self.network_policy()
        self.dns()
        self.runtime_class()
        self.fqdn_crds()
        self.image()
        self.namespace()
        return self.rows

    def credentials(self) -> bool:
        b = self.backend
        try:
            version = kb.check_client_version()
        except SandboxError as err:
            self.add("kubernetes client", FAIL, str(err))
            return False
        self.add("kubernetes client", OK, f"{version} (needs {'.'.join(map(str, kb.MIN_CLIENT_VERSION))} or later)")
        try:
            cfg = b.configuration()
        except SandboxError as err:
            self.add("credentials", FAIL, str(err))
            return False
        if b.client_configuration is not None:
            source = "given client configuration"
        elif os.environ.get("KUBERNETES_SERVICE_HOST") and not b.context:
            source = "in-cluster service account"
        else:
            path = os.environ.get("KUBECONFIG") or "~/.kube/config"
            source = f"kubeconfig {path}" + (f', context "{b.context}"' if b.context else ", current context")
        self.add("credentials", OK, f"{source} → {cfg.host}")
        return True

    def server(self) -> bool:
        from kubernetes import client

        try:
            # raw JSON: the client's strict VersionInfo model rejects servers that omit a field
            response = self.backend._call("get", "version", None,
                                          client.VersionApi(self.backend.api_client()).get_code,
                                          _preload_content=False)
            version = json.loads(response.data)
        except SandboxError as err:
            self.add("API server", FAIL, f"{err} — check the address, the network path to it "
                                         "(GKE: authorized networks / private endpoint) and the credentials")
            return False
        except ValueError as err:
            self.add("API server", FAIL, f"{self.backend.configuration().host}/version is not a Kubernetes "
                                         f"API server's answer ({err}): check the server address")
            return False
        git_version = version.get("gitVersion", "?")
        self.git_version = git_version
        minor = int(re.sub(r"\D.*", "", str(version.get("minor", "0"))) or 0)
        if str(version.get("major")) == "1" and minor < 25:
            self.add("API server", FAIL, f"reachable, {git_version}: Kubernetes 1.25 or later is needed "
                                         "(Pod Security admission); upgrade the cluster")
        else:
            self.add("API server", OK, f"reachable, {git_version}")
        return True

    def permissions(self) -> None:
        scoped = bool(self.backend.namespace_role)
        perms = kb.required_permissions(self.backend.enforcers, namespace_role=scoped)
        namespaced = [p for p in perms if (p[0], p[1]) not in kb.CLUSTER_SCOPED]
        if scoped:
            perms = [p for p in perms if (p[0], p[1]) in kb.CLUSTER_SCOPED]
        for group, resource, verb in perms:
            # `bind` is granted on the one role the backend binds (RBAC resourceNames)
            only = self.backend.namespace_role if (group, resource) == ("rbac.authorization.k8s.io", "clusterroles") else None
            name = f"RBAC {verb} {resource}{'.' + group if group else ''}"
            allowed, reason = self._can(verb, group, resource, None, only)
            if allowed is None:
                self.add(name, FAIL, f"could not ask the API server: {reason}")
                if "selfsubjectaccessreviews" in reason:
                    return  # every further question would fail the same way
            elif allowed:
                self.add(name, OK, f"allowed for ClusterRole {only!r}" if only
                         else "allowed" if resource in _CLUSTER_SCOPED else "allowed in all namespaces")
            else:
                self.add(name, FAIL, f"not allowed{': ' + reason if reason else ''} — grant the kernel's "
                                     f"service account '{verb}' on '{resource}' (apiGroup \"{group}\")"
                                     + (f" named {only!r}" if only else "") + " cluster-wide, e.g. with the "
                                     "Helm chart's ClusterRole (REQUIRED_PERMISSIONS in sandbox_kernel/backends/kubernetes.py)")
        if scoped:
            self.user_namespace_permissions(namespaced)

    def user_namespace_permissions(self, namespaced: list[tuple[str, str, str]]) -> None:
        """With a namespace_role the namespaced rights exist only in user namespaces, through
        the RoleBinding the backend creates: checked in this user's namespace when it exists."""
        from kubernetes import client

        b = self.backend
        name = "RBAC in user namespaces"
        how = (f"{len(namespaced)} namespaced permissions come from ClusterRole {b.namespace_role!r}, bound by the "
               f"RoleBinding '{kb.objects.ROLE_BINDING}' the backend creates in each user namespace "
               f"(for {b.role_subject}); nowhere else")
        try:
            ns = user_namespace(b.user, b.namespace_template)
            b._call("get", "namespaces", None, client.CoreV1Api(b.api_client()).read_namespace, ns)
        except kb._NotFound:
            self.add(name, INFO, f"{how}. Not checked: user {b.user!r}'s namespace {ns} does not exist yet (its "
                                 "first start creates it and the RoleBinding); run the doctor as a user who "
                                 "has started a sandbox to check them")
            return
        except SandboxError as err:
            self.add(name, INFO, f"{how}. Not checked: {_short(err)}")
            return
        refused = []
        for group, resource, verb in namespaced:
            allowed, reason = self._can(verb, group, resource, ns)
            if not allowed:
                refused.append(f"{verb} {resource}{'.' + group if group else ''}" + (f" ({reason})" if reason else ""))
        if refused:
            self.add(name, FAIL, f"in {ns} not allowed: {', '.join(refused)} — ClusterRole {b.namespace_role!r} "
                                 "must grant them (the Helm chart's <release>-sandbox role does); "
                                 f"{how}")
        else:
            self.add(name, OK, f"all {len(namespaced)} allowed in {ns}; {how}")

    def _can(self, verb: str, group: str, resource: str, namespace: str | None,
             name: str | None = None) -> tuple[bool | None, str]:
        """SelfSubjectAccessReview (cached): (allowed, the authorizer's reason); (None, why)
        when the question itself could not be asked."""
        from kubernetes import client

        key = (verb, group, resource, namespace, name)
        if key in self._reviews:
            return self._reviews[key]
        if self._no_reviews:
            return None, self._no_reviews
        plural, _, sub = resource.partition("/")
        attrs = client.V1ResourceAttributes(verb=verb, group=group, resource=plural, name=name,
                                            subresource=sub or None, namespace=namespace)
        body = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attrs))
        api = client.AuthorizationV1Api(self.backend.api_client())
        try:
            review = self.backend._call("create", "selfsubjectaccessreviews", None,
                                        api.create_self_subject_access_review, body, group="authorization.k8s.io")
        except SandboxError as err:
            if isinstance(err, kb.KubernetesForbidden):
                self._no_reviews = str(err)  # every further question would be refused the same way
            return None, str(err)
        status = review.status
        self._reviews[key] = answer = (bool(status and status.allowed), (status.reason or "") if status else "")
        return answer

    def _read(self, verb: str, group: str, resource: str, namespace: str | None, name: str, call):
        """A read the doctor makes only when the API server says it may: (object or None
        when absent, why it was not read or ""). A failed review does not stop the read."""
        allowed, reason = self._can(verb, group, resource, namespace, name)
        where = f" in {namespace}" if namespace else ""
        if allowed is False:
            return None, (f"this identity may not {verb} {resource}{'.' + group if group else ''} {name!r}{where}"
                          + (f" ({reason})" if reason else ""))
        try:
            return self.backend._call(verb, resource, namespace, call, group=group), ""
        except kb._NotFound:
            return None, ""
        except SandboxError as err:
            return None, _short(err)

    def _read_daemonsets(self) -> tuple[list[Any], str]:
        """The DOCTOR_DAEMONSETS that exist in kube-system, each read by name; sets
        :attr:`daemonsets` and :attr:`unread`. Returns (objects, why some were not read)."""
        from kubernetes import client

        apps = client.AppsV1Api(self.backend.api_client())
        found, unread, why = [], [], ""
        for ds in DOCTOR_DAEMONSETS:
            obj, error = self._read("get", "apps", "daemonsets", "kube-system", ds,
                                    lambda n=ds: apps.read_namespaced_daemon_set(n, "kube-system"))
            if error:
                unread.append(ds)
                why = why or error
            elif obj is not None:
                found.append(obj)
        self.unread = unread
        self.daemonsets = None if len(unread) == len(DOCTOR_DAEMONSETS) else [d.metadata.name for d in found]
        return found, why

    def _absent(self, daemonset: str) -> bool:
        """Seen not to exist (not merely unreadable)."""
        return self.daemonsets is not None and daemonset not in self.daemonsets and daemonset not in self.unread

    def network_policy(self) -> None:
        name = "NetworkPolicy enforcement"
        why = ("without it the default-deny and egress NetworkPolicies are stored but NOT enforced, "
               "so sandboxes can reach anything")
        grant = ("grant get on daemonsets.apps in kube-system named " + ", ".join(DOCTOR_DAEMONSETS)
                 + " (DOCTOR_DAEMONSETS; the Helm chart does with rbac.doctor=true, the default), "
                 "or run the doctor as a cluster admin")
        daemonsets, error = self._read_daemonsets()
        if self.daemonsets is None:
            self.add(name, FAIL, f"could not check: {error} — {grant}")
            return
        found = [f"{ENFORCING_DAEMONSETS[d.metadata.name]} (DaemonSet kube-system/{d.metadata.name})"
                 for d in daemonsets if d.metadata.name in ENFORCING_DAEMONSETS and d.metadata.name != "kindnet"]
        kindnet = next((d for d in daemonsets if d.metadata.name == "kindnet"), None)
        if kindnet is not None and not found:
            images = [c.image or "" for c in (kindnet.spec.template.spec.containers or [])]
            dates = [int(m.group(1)) for m in (re.search(r":v(\d{8})\b", i) for i in images) if m]
            if dates and max(dates) >= KINDNET_POLICY_SINCE:
                self.add(name, OK, f"kindnet {', '.join(images)} (enforces NetworkPolicy from kind v0.24)")
            elif dates:
                self.add(name, FAIL, f"kindnet {', '.join(images)} is older than kind v0.24 and does not enforce "
                                     f"NetworkPolicy: {why}. Recreate the cluster with kind 0.24 or later, or "
                                     "install Calico or Cilium")
            else:
                self.add(name, WARN, f"kindnet with image {', '.join(images) or '?'}: its version is unknown; "
                                     "kindnet enforces NetworkPolicy only from kind v0.24 (kindnetd v20240813)")
            return
        if found:
            self.add(name, OK, ", ".join(found))
            return
        crds = [label for crd, label in ENFORCER_CRDS.items() if self._crd(crd)[0]]
        if crds:
            self.add(name, WARN, f"no enforcing DaemonSet in kube-system, but the CRDs of {', '.join(crds)} exist; "
                                 "check that its agent runs on every node")
            return
        unread = [d for d in self.unread if d in ENFORCING_DAEMONSETS]
        if unread:
            self.add(name, FAIL, f"no NetworkPolicy enforcer among the DaemonSets it could read, and it could not "
                                 f"check {', '.join(unread)}: {error} — {grant}")
            return
        self.add(name, FAIL, f"no NetworkPolicy enforcer found (looked for DaemonSets "
                             f"{', '.join(ENFORCING_DAEMONSETS)} in kube-system and the Calico/Cilium CRDs): {why}. "
                             "On GKE create the cluster with Dataplane V2 (--enable-dataplane-v2) or enable "
                             "network policy enforcement (--enable-network-policy); elsewhere install a CNI "
                             "that enforces NetworkPolicy (Cilium, Calico)")

    def dns(self) -> None:
        """Which resolvers the sandbox policy allows against what the cluster runs."""
        b = self.backend
        try:
            node_local, cloud_dns = kb._yes(b.node_local_dns, "node_local_dns"), kb._yes(b.gke_cloud_dns, "gke_cloud_dns")
        except SandboxError as err:
            self.add("DNS", FAIL, str(err))
            return
        allowed = ["kube-dns pods (kube-system, k8s-app=kube-dns)"]
        if node_local:
            allowed.append("NodeLocal DNSCache 169.254.20.10 and k8s-app=node-local-dns pods")
        if cloud_dns:
            allowed.append("Cloud DNS for GKE 169.254.169.254")
        said = f"allowed on port 53 (UDP, TCP) only: {', '.join(allowed)}"
        if self.daemonsets is None:
            self.add("DNS", WARN, f"{said}; could not see which resolvers run (get daemonsets in kube-system "
                                  f"named {', '.join(DNS_DAEMONSETS)}: see the NetworkPolicy enforcement row)")
            return
        has_node_local = "node-local-dns" in self.daemonsets
        gke = bool({"anetd", "gke-metadata-server", "fluentbit-gke"} & set(self.daemonsets))
        if has_node_local and not node_local:
            self.add("DNS", FAIL, "NodeLocal DNSCache runs here (DaemonSet kube-system/node-local-dns) but "
                                  "c.KubernetesBackend.node_local_dns is false: every lookup in an allowlist "
                                  "sandbox fails. Set it to true (Helm: sandbox.nodeLocalDNS)")
        elif gke and not cloud_dns:
            self.add("DNS", WARN, f"{said}; this is GKE, where Cloud DNS for GKE answers on 169.254.169.254:53 "
                                  "(Autopilot may use it): if lookups fail, set c.KubernetesBackend.gke_cloud_dns "
                                  "to true (Helm: sandbox.gkeCloudDNS)")
        else:
            seen = "NodeLocal DNSCache runs" if has_node_local else "no NodeLocal DNSCache DaemonSet"
            self.add("DNS", OK, f"{said} ({seen}{', GKE' if gke else ''})")

    def _crd(self, crd: str) -> tuple[Any, str]:
        """(the CRD or None, error text when it could not be read)."""
        from kubernetes import client

        api = client.ApiextensionsV1Api(self.backend.api_client())
        return self._read("get", "apiextensions.k8s.io", "customresourcedefinitions", None, crd,
                          lambda: api.read_custom_resource_definition(crd))

    def runtime_class(self) -> None:
        from kubernetes import client

        wanted = self.backend.runtime_class
        rc_name = wanted or "gvisor"
        name = f"RuntimeClass {rc_name}"
        api = client.NodeV1Api(self.backend.api_client())
        rc, error = self._read("get", "node.k8s.io", "runtimeclasses", None, rc_name,
                               lambda: api.read_runtime_class(rc_name))
        if error:
            self.add(name, FAIL if wanted else INFO,
                     f"could not check: {error} — grant get on runtimeclasses.node.k8s.io named {rc_name!r} "
                     "(DOCTOR_PERMISSIONS; the Helm chart does with rbac.doctor=true)")
            return
        if wanted and rc is None:
            self.add(name, FAIL, f"c.KubernetesBackend.runtime_class is {wanted!r} but no such RuntimeClass exists, "
                                 "so every sandbox pod would be rejected — on GKE add a node pool with GKE Sandbox "
                                 "(--sandbox type=gvisor), or unset runtime_class")
        elif wanted:
            self.add(name, OK, f"present (handler {rc.handler}); sandbox pods use it")
        elif rc is not None:
            self.add(name, WARN, f"present (handler {rc.handler}) but not used: set "
                                 "c.KubernetesBackend.runtime_class = 'gvisor' (SANDBOX_KERNEL_K8S_RUNTIME_CLASS) "
                                 "so sandboxes do not share the node's kernel")
        else:
            self.add(name, WARN, "not configured and not present: sandboxes share the node's kernel (runc). "
                                 "For a kernel boundary, add a GKE Sandbox node pool and set runtime_class")

    def gke_fqdn_requirements(self) -> None:
        """What GKE FQDN network policies need, checked where the API shows it."""
        name = "gke-fqdn requirements"
        needs = ("GKE 1.26.4-gke.500 / 1.27.1-gke.400 or later, GKE Dataplane V2, GKE Enterprise enabled on "
                 "the project (FQDN network policy is a GKE Enterprise feature), kube-dns or Cloud DNS (not "
                 "a custom CoreDNS), no Cloud Service Mesh; GKE programs at most 50 addresses per "
                 "FQDNNetworkPolicy, so the backend writes one object per name")
        if self._absent("anetd"):
            self.add(name, FAIL, f"no GKE Dataplane V2 (DaemonSet kube-system/anetd): FQDNNetworkPolicies would be "
                                 f"stored but never enforced. Needs: {needs}")
            return
        m = re.search(r"v1\.(\d+)\.(\d+)-gke\.(\d+)", self.git_version)
        if m:
            minor, patch, gke = map(int, m.groups())
            if (minor, patch, gke) < (26, 4, 500) or (minor == 27 and (patch, gke) < (1, 400)):
                self.add(name, FAIL, f"{self.git_version} is older than FQDN network policies need. Needs: {needs}")
                return
        seen = "could not see the dataplane" if "anetd" in self.unread or self.daemonsets is None else "Dataplane V2 runs"
        self.add(name, INFO if seen == "Dataplane V2 runs" else WARN,
                 f"{seen}; GKE Enterprise cannot be checked from the cluster. Needs: {needs}")

    def fqdn_crds(self) -> None:
        enforcers = set(self.backend.enforcers)
        if "gke-fqdn" in enforcers:
            self.gke_fqdn_requirements()
        for crd, version, enforcer, todo in FQDN_CRDS:
            name = f"CRD {crd}"
            obj, error = self._crd(crd)
            used = enforcer in enforcers
            if error:
                self.add(name, FAIL if used else INFO,
                         f"could not check: {error} — grant get on customresourcedefinitions named {crd!r} "
                         "(DOCTOR_CRDS; the Helm chart does with rbac.doctor=true)")
            elif obj is None:
                self.add(name, FAIL if used else INFO,
                         f"missing, and the '{enforcer}' enforcer needs it: {todo}" if used
                         else f"not installed (only needed for the '{enforcer}' enforcer)")
            else:
                served = [v.name for v in obj.spec.versions or [] if v.served]
                if used and version not in served:
                    self.add(name, FAIL, f"installed, but serves {', '.join(served) or 'no version'}, not "
                                         f"{version} which the backend writes: upgrade it")
                elif used:
                    self.add(name, OK, f"installed ({version}); used by the '{enforcer}' enforcer")
                else:
                    self.add(name, INFO, f"installed; add '{enforcer}' to c.KubernetesBackend.enforcers "
                                         "(SANDBOX_KERNEL_K8S_ENFORCERS) to use it")

    def image(self) -> None:
        image = self.backend.image
        if not _IMAGE_RE.match(image):
            self.add("image", FAIL, f"{image!r} is not a valid image reference: fix c.KubernetesBackend.image "
                                    "(SANDBOX_KERNEL_K8S_IMAGE)")
            return
        stock = re.match(r"^(docker\.io/(library/)?)?python:", image) is not None
        note = ("stock Python image: works, but IPython features degrade (build images/sandbox for them)"
                if stock else "any image with python3 works")
        self.add("image", OK, f"{image} (pull policy {self.backend.image_pull_policy}); {note}. "
                              "Whether nodes can pull it shows only when a pod starts")

    def namespace(self) -> None:
        from .backends.slug import user_namespace

        try:
            ns = user_namespace(self.backend.user, self.backend.namespace_template)
        except SandboxError as err:
            self.add("namespace template", FAIL, str(err))
            return
        self.add("namespace template", OK, f"{self.backend.namespace_template} (user {self.backend.user!r} → {ns})")


def _short(err: BaseException) -> str:
    return str(err).split("\n")[0]


def run_checks(backend: kb.KubernetesBackend | None = None) -> list[Check]:
    """All checks against the configured cluster (the backend's traits and credentials)."""
    return _Doctor(backend or kb.KubernetesBackend()).run()


def ready(rows: list[Check]) -> bool:
    return bool(rows) and not any(r.status == FAIL for r in rows)


def format_table(rows: list[Check], width: int | None = None) -> str:
    name_w = max([len("CHECK")] + [len(r.name) for r in rows])
    lines = [f"{'CHECK':<{name_w}}  STATUS  DETAIL"]
    for r in rows:
        lines.append(f"{r.name:<{name_w}}  {r.status:<6}  {r.detail}".rstrip())
    return "\n".join(lines)


def configured_backend() -> kb.KubernetesBackend:
    """A backend configured as the kernel's is: ``sandbox_kernel_config.py`` from the Jupyter
    config path (``c.KubernetesBackend.…``), then the environment variables."""
    from .config import load_config

    return kb.KubernetesBackend(config=load_config())


def main(backend: kb.KubernetesBackend | None = None, out: Callable[[str], None] = print) -> int:
    """Print the table; 0 when ready, 1 when not."""
    backend = backend or configured_backend()
    rows = run_checks(backend)
    out(f"Kubernetes backend: is this cluster ready for sandboxes? (enforcers: {', '.join(backend.enforcers)})")
    out(format_table(rows))
    failed = [r for r in rows if r.status == FAIL]
    if failed:
        out(f"not ready: {len(failed)} check{'s' if len(failed) != 1 else ''} failed (see FAIL rows)")
        return 1
    out("ready")
    return 0
