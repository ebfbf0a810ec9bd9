"""The chart's RBAC on a REAL cluster: what the kernel identity must not do is refused
(issue 15, point 1). SelfSubjectAccessReviews for the authorizer's answer, real requests
for what admission (the chart's ValidatingAdmissionPolicy) adds.

Marked ``cluster``: runs on the local cluster of scripts/cluster.sh through the
``local_cluster`` fixture (tests/localcluster.py), like every real-cluster test:
``SANDBOX_KERNEL_TEST_CLUSTER=auto`` runs it when this machine can start the cluster (and
skips saying what is missing otherwise), ``=1`` or ``CI=true`` makes a cluster that cannot
start a failure. The cluster administrator's kubeconfig only installs the chart's RBAC
objects and mints a token; every check then runs as the chart's kernel ServiceAccount.
Names carry a random tag; everything is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import time
import uuid

import pytest
import yaml

from helm_testlib import _chart

pytestmark = pytest.mark.cluster

#: the sandbox image scripts/cluster-images.sh builds (as tests/kubernetes/realcluster.py names it)
IMAGE = os.environ.get("SANDBOX_KERNEL_CLUSTER_SANDBOX_IMAGE", "sandbox-kernel.local/sandbox:cluster")


@pytest.fixture(scope="module")
def kubectl(local_cluster):
    """kubectl as the cluster administrator (set-up and clean-up only); returns stdout."""

    def run(*args, input=None, check=True) -> str:
        result = subprocess.run([str(local_cluster.bin / "kubectl"), f"--kubeconfig={local_cluster.kubeconfig}",
                                 *args], input=input, capture_output=True, text=True, timeout=120)
        if check and result.returncode:
            raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}")
        return result.stdout

    return run


@pytest.fixture(scope="module")
def chart_identity(local_cluster, kubectl):
    """The chart's RBAC objects installed under a random name; yields (client Configuration
    as the kernel ServiceAccount, names)."""
    from kubernetes import client, config

    tag = f"k8sfix-{secrets.token_hex(3)}"
    prefix = f"{tag}-u-"
    files = _chart().render({"fullnameOverride": tag, "sandbox": {"namespaceTemplate": prefix + "{slug}"}},
                            name=tag, namespace=tag, is_install=True)
    docs = [d for path, text in sorted(files.items()) if not path.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]
    wanted = [d for d in docs if d["kind"] in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                                "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")]
    kubectl("create", "namespace", tag)
    try:
        kubectl("apply", "-f", "-", input=yaml.safe_dump_all(wanted))
        token = kubectl("create", "token", tag, "-n", tag, "--duration", "1h").strip()
        admin = client.Configuration()
        config.load_kube_config(config_file=str(local_cluster.kubeconfig), client_configuration=admin)
        as_sa = client.Configuration(host=admin.host)
        as_sa.ssl_ca_cert = admin.ssl_ca_cert
        as_sa.api_key = {"BearerToken": token, "authorization": token}
        as_sa.api_key_prefix = {"BearerToken": "Bearer", "authorization": "Bearer"}
        yield as_sa, {"tag": tag, "prefix": prefix, "sandbox_role": f"{tag}-sandbox",
                      "subject": f"ServiceAccount:{tag}:{tag}"}
    finally:
        for ns in json.loads(kubectl("get", "namespaces", "-o", "json"))["items"]:
            if ns["metadata"]["name"].startswith(f"{tag}-"):  # user namespaces, and any a retry let in
                kubectl("delete", "namespace", ns["metadata"]["name"], "--wait=false", check=False)
        kubectl("delete", "-f", "-", "--ignore-not-found", input=yaml.safe_dump_all(wanted), check=False)
        kubectl("delete", "namespace", tag, "--wait=false", check=False)


def can(configuration, verb, resource, namespace=None, group="", subresource=None, name=None) -> bool:
    from kubernetes import client

    api = client.AuthorizationV1Api(client.ApiClient(configuration))
    review = api.create_self_subject_access_review(client.V1SelfSubjectAccessReview(
        spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=client.V1ResourceAttributes(
            verb=verb, group=group, resource=resource, subresource=subresource, namespace=namespace, name=name))))
    return bool(review.status.allowed)


def refused(call, *, within: float = 15.0) -> str:
    """``call()`` must fail with 403; returns the server's message. Admission policies take
    a moment to load after they are created, so a success is retried (and undone by the caller)."""
    from kubernetes.client.exceptions import ApiException

    deadline = time.monotonic() + within
    while True:
        try:
            call()
        except ApiException as err:
            assert err.status == 403, (err.status, err.body)
            return json.loads(err.body).get("message", "")
        if time.monotonic() > deadline:
            raise AssertionError("the request was allowed")
        time.sleep(0.5)


def test_the_identity_cannot_act_outside_sandbox_namespaces(chart_identity):
    as_sa, names = chart_identity
    # what it needs at cluster scope, and nothing namespaced anywhere yet
    assert can(as_sa, "create", "namespaces")
    for namespace in ("kube-system", "default", names["tag"], f"{names['prefix']}nobody"):
        for verb, resource, sub in [("create", "pods", None), ("get", "pods", None), ("list", "pods", None),
                                    ("create", "pods", "exec"), ("create", "serviceaccounts", None),
                                    ("patch", "configmaps", None), ("get", "secrets", None)]:
            assert not can(as_sa, verb, resource, namespace, subresource=sub), (verb, resource, sub, namespace)
        assert not can(as_sa, "patch", "networkpolicies", namespace, group="networking.k8s.io")
    assert not can(as_sa, "bind", "clusterroles", group="rbac.authorization.k8s.io", name="cluster-admin")
    assert can(as_sa, "bind", "clusterroles", group="rbac.authorization.k8s.io", name=names["sandbox_role"])
    assert not can(as_sa, "create", "clusterrolebindings", group="rbac.authorization.k8s.io")
    assert not can(as_sa, "list", "pods")  # cluster-wide reads: none


def test_admission_refuses_what_rbac_alone_would_allow(chart_identity):
    from kubernetes import client

    as_sa, names = chart_identity
    api = client.ApiClient(as_sa)
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    restricted = {"pod-security.kubernetes.io/enforce": "restricted"}
    # a new name per attempt: an attempt made before the admission policy was in force
    # created its namespace (a retry of the same name would get 409 AlreadyExists)
    other = lambda: f"{names['tag']}-other-{secrets.token_hex(2)}"  # noqa: E731
    message = refused(lambda: core.create_namespace(client.V1Namespace(
        metadata=client.V1ObjectMeta(name=other(), labels=restricted))))
    assert f"may act only in namespaces named {names['prefix']}*" in message
    message = refused(lambda: core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
        name=f"{names['prefix']}loose-{secrets.token_hex(2)}", labels={"pod-security.kubernetes.io/enforce": "privileged"}))))
    assert "must enforce Pod Security 'restricted'" in message

    def binding(namespace, role):
        return client.V1RoleBinding(
            metadata=client.V1ObjectMeta(name=f"{names['tag']}-x", namespace=namespace),
            role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=role),
            subjects=[client.RbacV1Subject(kind="ServiceAccount", name=names["tag"], namespace=names["tag"])])

    # its own role, but in kube-system: RBAC allows (create rolebindings + bind), admission refuses
    message = refused(lambda: rbac.create_namespaced_role_binding("kube-system", binding("kube-system", names["sandbox_role"])))
    assert "may act only in namespaces named" in message
    # in a sandbox namespace, but to cluster-admin: RBAC's escalation check refuses
    mine = f"{names['prefix']}rb"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=mine, labels=restricted)))
    message = refused(lambda: rbac.create_namespaced_role_binding(mine, binding(mine, "cluster-admin")))
    assert "cluster-admin" in message or "escalat" in message or "bind" in message


def test_a_sandbox_starts_with_only_the_per_namespace_grant(chart_identity):
    """The backend, as the identity, creates the user namespace, binds the sandbox role
    there, and runs a cell; afterwards it may create pods there and still nowhere else."""
    from sandbox_kernel.backends import kubernetes as kb
    from sandbox_kernel.policy.model import EgressPolicy

    as_sa, names = chart_identity
    backend = kb.KubernetesBackend(client_configuration=as_sa, user=f"rbac-{secrets.token_hex(2)}",
                                   namespace_template=names["prefix"] + "{slug}", image=IMAGE,
                                   image_pull_policy="Never", namespace_role=names["sandbox_role"],
                                   role_subject=names["subject"], start_timeout=240, gc_on_start=False)
    backend.always_blocked = ["169.254.0.0/16"]

    async def main():
        await backend.start(uuid.uuid4().hex, EgressPolicy(), lambda line: None)
        try:
            transport = await backend.attach()
            assert (await asyncio.wait_for(transport.recv(), 60))["type"] == "hello"
            await transport.send({"type": "execute", "id": 1, "code": "print(6 * 7)", "silent": False,
                                  "store_history": True, "user_expressions": {}, "allow_stdin": False})
            out = []
            while (frame := await asyncio.wait_for(transport.recv(), 60))["type"] != "done":
                out += [frame["text"]] if frame["type"] == "stream" else []
            assert "".join(out) == "42\n"
            await transport.close()
            return backend.namespace
        finally:
            await backend.stop()

    namespace = asyncio.run(main())
    assert can(as_sa, "create", "pods", namespace) and can(as_sa, "create", "pods", namespace, subresource="exec")
    assert not can(as_sa, "create", "pods", "kube-system")
    assert not can(as_sa, "get", "secrets", namespace)  # the sandbox role has no secrets at all
