"""What the Kubernetes backend may do: every (apiGroup, resource, verb) it uses.

:data:`REQUIRED_PERMISSIONS` lists every API call of the backend; the Helm chart's RBAC and the
tests check against it, and ``sandbox-kernel doctor`` asks the API server for
:func:`required_permissions` of the configured enforcers.
"""

from __future__ import annotations

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
