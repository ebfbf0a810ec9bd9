"""The chart's RBAC against REQUIRED_PERMISSIONS: every call the backend makes is granted,
and nothing it does not make (so a new verb in the backend fails here, not in a cluster)."""

from __future__ import annotations

import json

import pytest

from sandbox_kernel.backends.kubernetes import CLUSTER_SCOPED, ENFORCER_KINDS, REQUIRED_PERMISSIONS
from sandbox_kernel.doctor_k8s import DOCTOR_CRDS, DOCTOR_DAEMONSETS, DOCTOR_PERMISSIONS

from helm_testlib import GC_IMAGE, NAMESPACE, requires_helm

pytestmark = requires_helm

Perm = tuple[str, str, str]
ENFORCER_RESOURCES = {(g, p) for kinds in ENFORCER_KINDS.values() for g, _, p in kinds}
DEFAULT_DENY = ("networking.k8s.io", "networkpolicies")  # every user namespace gets one
#: the one doctor permission the kernels' role has, so `sandbox-kernel doctor` works in a user server
REVIEWS: Perm = ("authorization.k8s.io", "selfsubjectaccessreviews", "create")
SANDBOX_ROLE = "sk-sandbox-kernel-sandbox"


def gc_needs(enforcers: list[str]) -> set[Perm]:
    """What gc() calls for the given enforcers (see gc() in backends/kubernetes.py)."""
    kinds = {(g, p) for e in enforcers for g, _, p in ENFORCER_KINDS[e]}
    return {("", "pods", "list"), ("", "pods", "delete")} | {(g, p, v) for g, p in kinds for v in ("list", "delete")}


def kernel_needs(enforcers: list[str], required=REQUIRED_PERMISSIONS) -> set[Perm]:
    """REQUIRED_PERMISSIONS for a kernel configured with ``enforcers``."""
    kinds = {(g, p) for e in enforcers for g, _, p in ENFORCER_KINDS[e]} | {DEFAULT_DENY}
    return {perm for perm in required if (perm[0], perm[1]) not in ENFORCER_RESOURCES or (perm[0], perm[1]) in kinds}


def grants(role: dict) -> set[Perm]:
    out = set()
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], f"wildcard in {rule}"
        assert not rule.get("nonResourceURLs")
        if rule.get("resourceNames"):  # only `bind`, only on the sandbox role
            assert rule == {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"],
                            "verbs": ["bind"], "resourceNames": [SANDBOX_ROLE]}, rule
        out |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return out


def roles(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"].rsplit("-", 1)[1]: o for o in objects if o["kind"] == "ClusterRole"}


ENFORCER_CASES = [[e] for e in ENFORCER_KINDS] + [list(ENFORCER_KINDS), ["networkpolicy", "cilium"]]


@pytest.mark.parametrize("enforcers", ENFORCER_CASES, ids=["+".join(e) for e in ENFORCER_CASES])
def test_kernel_roles_grant_exactly_what_the_backend_calls(enforcers, render):
    both = roles(render({"sandbox": {"enforcers": enforcers}}))
    cluster, sandbox = grants(both["kernel"]), grants(both["sandbox"])
    needed = kernel_needs(enforcers)
    assert needed - (cluster | sandbox) == set(), "the backend calls these but the chart does not grant them"
    assert (cluster | sandbox) - needed - {REVIEWS} == set(), "the chart grants these but nothing calls them"
    assert REVIEWS in DOCTOR_PERMISSIONS and REVIEWS in cluster
    # cluster scope: only what a namespace that does not exist yet needs
    assert {(g, r) for g, r, _ in cluster} == set(CLUSTER_SCOPED) | {REVIEWS[:2]}
    assert {(g, r) for g, r, _ in sandbox} & set(CLUSTER_SCOPED) == set()
    # kinds of enforcers that are not configured are not granted (beyond the default deny)
    granted_kinds = {(g, r) for g, r, _ in sandbox} & ENFORCER_RESOURCES
    assert granted_kinds == {(g, p) for e in enforcers for g, _, p in ENFORCER_KINDS[e]} | {DEFAULT_DENY}


def test_the_sandbox_role_is_bound_only_per_namespace(render):
    """Issue 15 point 1: no ClusterRoleBinding gives pods/exec/… everywhere; the backend
    binds the sandbox role in each user namespace (its config names the role and itself)."""
    objects = render({})
    bound = [o["roleRef"]["name"] for o in objects if o["kind"] == "ClusterRoleBinding"]
    assert SANDBOX_ROLE not in bound
    (config,) = [o for o in objects if o["kind"] == "ConfigMap"]
    backend = json.loads(next(iter(config["data"].values())))["KubernetesBackend"]
    assert backend["namespace_role"] == SANDBOX_ROLE
    assert backend["role_subject"] == f"ServiceAccount:{NAMESPACE}:sk-sandbox-kernel"
    assert "namespace_role" not in json.loads(next(iter(
        [o for o in render({"rbac": {"create": False}}) if o["kind"] == "ConfigMap"][0]["data"].values())))["KubernetesBackend"]


def test_admission_policy_keeps_the_identity_in_sandbox_namespaces(render):
    objects = render({})
    (policy,) = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicy"]
    (binding,) = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicyBinding"]
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    assert policy["spec"]["failurePolicy"] == "Fail"
    (condition,) = policy["spec"]["matchConditions"]
    assert condition["expression"] == f'request.userInfo.username == "system:serviceaccount:{NAMESPACE}:sk-sandbox-kernel"'
    text = json.dumps(policy["spec"]["validations"])
    assert "'user-sandbox-'" in text and f"'{SANDBOX_ROLE}'" in text and "'restricted'" in text
    custom = render({"sandbox": {"namespaceTemplate": "nb-{slug}"}})
    assert "'nb-'" in json.dumps([o for o in custom if o["kind"] == "ValidatingAdmissionPolicy"][0]["spec"])
    assert not [o for o in render({"rbac": {"admissionPolicy": False}}) if o["kind"].startswith("ValidatingAdmission")]


@pytest.mark.parametrize("enforcers", ENFORCER_CASES, ids=["+".join(e) for e in ENFORCER_CASES])
def test_gc_role_grants_exactly_what_gc_calls(enforcers, render):
    role = roles(render({"sandbox": {"enforcers": enforcers}, "gc": {"enabled": True, "image": GC_IMAGE}}))["gc"]
    assert grants(role) == gc_needs(enforcers)
    assert grants(role) <= set(REQUIRED_PERMISSIONS)


def test_kernel_and_gc_together_cover_every_required_permission(render):
    every = list(ENFORCER_KINDS)
    objects = render({"sandbox": {"enforcers": every}, "gc": {"enabled": True, "image": GC_IMAGE}})
    covered = grants(roles(objects)["kernel"]) | grants(roles(objects)["sandbox"]) | grants(roles(objects)["gc"])
    assert set(REQUIRED_PERMISSIONS) - covered == set()


def test_a_new_backend_call_would_fail_this_suite(render):
    """The check above is not vacuous: a verb the backend starts using shows up as missing."""
    both = roles(render({}))
    for new in [("", "pods", "patch"), ("", "pods/log", "get"), ("", "secrets", "get")]:
        assert new in kernel_needs(["networkpolicy"], REQUIRED_PERMISSIONS + (new,)) - grants(both["kernel"]) - grants(both["sandbox"])


def test_bindings_tie_each_role_to_its_own_account(render):
    objects = render({"gc": {"enabled": True, "image": GC_IMAGE}})
    accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
    for binding in (o for o in objects if o["kind"] == "ClusterRoleBinding"):
        (subject,) = binding["subjects"]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                      "name": binding["metadata"]["name"]}
        assert subject == {"kind": "ServiceAccount", "name": subject["name"], "namespace": NAMESPACE}
        assert subject["name"] in accounts
        assert subject["name"].endswith("-gc") == binding["metadata"]["name"].endswith("-gc")


def test_existing_service_account_and_no_rbac(render):
    objects = render({"serviceAccount": {"create": False, "name": "hub-users"}})
    assert not [o for o in objects if o["kind"] == "ServiceAccount"]
    bindings = [o for o in objects if o["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    assert sorted(b["metadata"]["name"].rsplit("-", 1)[1] for b in bindings) == ["doctor", "doctor", "kernel"]
    assert {b["subjects"][0]["name"] for b in bindings} == {"hub-users"}
    assert not [o for o in render({"rbac": {"create": False}}) if "Role" in o["kind"]]


def doctor_objects(objects: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objects if o["metadata"]["name"].endswith("-doctor")}


@pytest.mark.parametrize("hub", [False, True])
def test_doctor_reads_are_granted_by_name_only(hub, render):
    """`sandbox-kernel doctor` as the kernel identity: exactly its reads (DOCTOR_PERMISSIONS
    beyond the reviews), each limited to the names it reads; in kube-system nothing but
    `get` on those DaemonSets; bound to the identity the kernels (or the hub service) use."""
    from helm_testlib import HUB

    objects = render({"hub": HUB} if hub else {})
    doctor = doctor_objects(objects)
    assert set(doctor) == {"Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    assert doctor["Role"]["metadata"]["namespace"] == doctor["RoleBinding"]["metadata"]["namespace"] == "kube-system"
    (rule,) = doctor["Role"]["rules"]
    assert rule == {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get"],
                    "resourceNames": list(DOCTOR_DAEMONSETS)}
    crds, runtime = doctor["ClusterRole"]["rules"]
    assert crds == {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"],
                    "verbs": ["get"], "resourceNames": list(DOCTOR_CRDS)}
    assert runtime == {"apiGroups": ["node.k8s.io"], "resources": ["runtimeclasses"], "verbs": ["get"],
                       "resourceNames": ["gvisor"]}
    granted = {(g, r, v) for o in (doctor["Role"], doctor["ClusterRole"]) for rule in o["rules"]
               for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted == set(DOCTOR_PERMISSIONS) - {REVIEWS}
    kernel_binding = next(o for o in objects if o["kind"] == "ClusterRoleBinding" and o["metadata"]["name"].endswith("-kernel"))
    for kind, role in (("RoleBinding", "Role"), ("ClusterRoleBinding", "ClusterRole")):
        assert doctor[kind]["subjects"] == kernel_binding["subjects"]
        assert doctor[kind]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role,
                                           "name": doctor[role]["metadata"]["name"]}
    custom = doctor_objects(render({"gvisor": {"runtimeClassName": "kata-gvisor"}}))["ClusterRole"]
    assert custom["rules"][1]["resourceNames"] == ["kata-gvisor"]
    assert doctor_objects(render({"rbac": {"doctor": False}})) == {}


@pytest.mark.parametrize("template", ["rbac.yaml", "gc.yaml", "doctor-rbac.yaml"])
def test_every_rule_is_commented_with_why(template, render_files):
    files = render_files({"sandbox": {"enforcers": list(ENFORCER_KINDS)}, "gc": {"enabled": True, "image": GC_IMAGE}})
    lines = files[f"sandbox-kernel/templates/{template}"].splitlines()
    rules = [i for i, line in enumerate(lines) if line.strip().startswith("- apiGroups:")]
    assert len(rules) >= 2
    for i in rules:
        assert lines[i - 1].strip().startswith("#"), f"{template}: a rule without a comment saying why: {lines[i:i + 3]}"
