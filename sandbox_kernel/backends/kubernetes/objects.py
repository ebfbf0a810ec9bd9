"""Pure builders of the Kubernetes objects of a sandbox (kubespawner ``objects.py`` style).

Every function takes plain arguments and returns a typed ``kubernetes.client.V1*``
object (or a dict for custom resources); nothing here talks to a cluster. Called by
:class:`~sandbox_kernel.backends.kubernetes.KubernetesBackend` and by the tests, which
compare ``ApiClient().sanitize_for_serialization(obj)`` with expected dicts.

Per user namespace (created once, re-applied idempotently): Namespace, ServiceAccount,
ResourceQuota, LimitRange, default-deny NetworkPolicy, agent ConfigMap. Per kernel:
the Pod and the egress policy objects compiled by :mod:`sandbox_kernel.policy`.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

from kubernetes import client

from .slug import label_value

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "sandbox-kernel"
COMPONENT_LABEL = "app.kubernetes.io/component"
KERNEL_LABEL = "sandbox-kernel.io/kernel-id"
USER_LABEL = "sandbox-kernel.io/user"
#: the unmodified user name (annotations take any text, labels do not)
USER_ANNOTATION = "sandbox-kernel.io/user"
#: GKE Dataplane V2: log this namespace's denied connections when NetworkLogging delegates
DENY_LOGGING_ANNOTATION = "policy.network.gke.io/enable-deny-logging"
AGENT_DIGEST_LABEL = "sandbox-kernel.io/agent-digest"
SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"

AGENT_DIR = "/opt/sandbox-agent"
AGENT_PYZ = f"{AGENT_DIR}/agent.pyz"
AGENT_SOCKET = "/tmp/.sandbox-agent.sock"
HOME_DIR = "/home/sandbox"
SANDBOX_UID = 1000
SERVICE_ACCOUNT = "sandbox"
CONTAINER = "sandbox"

#: the pod's main process: the persistent agent listening on a unix socket
SERVE_COMMAND = ["python3", AGENT_PYZ, "serve", "--socket", AGENT_SOCKET]
#: what each exec runs: a thin client joining the exec stream to the socket
ATTACH_COMMAND = ["python3", AGENT_PYZ, "attach", "--socket", AGENT_SOCKET]
#: ready when the agent's socket exists (the path is its own argv item, so tools that
#: rewrite paths — like the test suite's fake cluster — see it)
READINESS_COMMAND = ["python3", "-c", "import os,sys; sys.exit(not os.path.exists(sys.argv[1]))", AGENT_SOCKET]


def base_labels(user: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The labels on everything the backend creates (``gc`` selects by them)."""
    labels = {MANAGED_BY_LABEL: MANAGED_BY}
    if user is not None:
        labels[USER_LABEL] = label_value(user)
    labels.update(extra or {})
    return labels


def _meta(name: str, namespace: str | None, labels: Mapping[str, str], annotations=None) -> client.V1ObjectMeta:
    return client.V1ObjectMeta(name=name, namespace=namespace, labels=dict(labels),
                               annotations=dict(annotations) if annotations else None)


def make_namespace(name: str, user: str, labels: Mapping[str, str] | None = None) -> client.V1Namespace:
    """The user's namespace, with Pod Security Admission enforcing ``restricted``, and
    annotated for GKE's delegated deny logging (a ``NetworkLogging`` with ``delegate: true``
    logs denied connections only in namespaces that ask; elsewhere the annotation is inert)."""
    all_labels = base_labels(user, labels)
    all_labels.update({
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    })
    return client.V1Namespace(api_version="v1", kind="Namespace",
                              metadata=_meta(name, None, all_labels, {USER_ANNOTATION: user,
                                                                      DENY_LOGGING_ANNOTATION: "true"}))


def make_service_account(namespace: str, labels: Mapping[str, str] | None = None,
                         name: str = SERVICE_ACCOUNT) -> client.V1ServiceAccount:
    """The pods' identity: no API token is ever mounted."""
    return client.V1ServiceAccount(api_version="v1", kind="ServiceAccount",
                                   metadata=_meta(name, namespace, base_labels(extra=labels)),
                                   automount_service_account_token=False)


#: the RoleBinding each user namespace gets when c.KubernetesBackend.namespace_role is set
ROLE_BINDING = "sandbox-kernel"


def make_role_binding(namespace: str, cluster_role: str, subject: Mapping[str, str],
                      labels: Mapping[str, str] | None = None, name: str = ROLE_BINDING) -> client.V1RoleBinding:
    """Binds ``cluster_role`` (the kernel identity's namespaced permissions) to ``subject``
    in this namespace only, so the identity needs no namespaced rights cluster-wide."""
    return client.V1RoleBinding(
        api_version="rbac.authorization.k8s.io/v1", kind="RoleBinding",
        metadata=_meta(name, namespace, base_labels(extra=labels)),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="ClusterRole", name=cluster_role),
        subjects=[client.RbacV1Subject(kind=subject["kind"], name=subject["name"], namespace=subject.get("namespace"),
                                       api_group="rbac.authorization.k8s.io" if subject["kind"] != "ServiceAccount" else None)])


def make_resource_quota(namespace: str, hard: Mapping[str, str], labels: Mapping[str, str] | None = None,
                        name: str = "sandbox-quota") -> client.V1ResourceQuota:
    """Caps what all of the user's sandboxes may use together (``hard``: ``{"pods": "4", …}``)."""
    return client.V1ResourceQuota(api_version="v1", kind="ResourceQuota",
                                  metadata=_meta(name, namespace, base_labels(extra=labels)),
                                  spec=client.V1ResourceQuotaSpec(hard={k: str(v) for k, v in hard.items()}))


def make_limit_range(namespace: str, default_requests: Mapping[str, str], default_limits: Mapping[str, str],
                     max_limits: Mapping[str, str] | None = None, labels: Mapping[str, str] | None = None,
                     name: str = "sandbox-limits") -> client.V1LimitRange:
    """Defaults (and optional maxima) for containers that state no resources."""
    item = client.V1LimitRangeItem(type="Container", default_request=dict(default_requests) or None,
                                   default=dict(default_limits) or None, max=dict(max_limits) if max_limits else None)
    return client.V1LimitRange(api_version="v1", kind="LimitRange",
                               metadata=_meta(name, namespace, base_labels(extra=labels)),
                               spec=client.V1LimitRangeSpec(limits=[item]))


def make_default_deny_policy(namespace: str, labels: Mapping[str, str] | None = None) -> client.V1NetworkPolicy:
    """Namespace-wide default deny of ingress and egress (built by the policy compiler,
    so there is one definition of it)."""
    from ...policy.compile_networkpolicy import make_default_deny

    body = make_default_deny(namespace, labels=base_labels(extra=labels))
    meta, spec = body["metadata"], body["spec"]
    assert spec["podSelector"] == {}, "the default deny selects every pod of the namespace"
    # built field by field (not Model.from_dict, which clients before 35 lack)
    return client.V1NetworkPolicy(
        api_version=body["apiVersion"], kind=body["kind"],
        metadata=client.V1ObjectMeta(name=meta["name"], namespace=meta["namespace"], labels=meta["labels"]),
        spec=client.V1NetworkPolicySpec(pod_selector=client.V1LabelSelector(), policy_types=spec["policyTypes"]))


def agent_configmap_name(digest: str) -> str:
    """One ConfigMap per agent version: pods started earlier keep the bytes they run."""
    return f"sandbox-agent-{digest}"


def make_agent_configmap(name: str, namespace: str, pyz_bytes: bytes, digest: str,
                         labels: Mapping[str, str] | None = None) -> client.V1ConfigMap:
    """The agent zipapp as ``binaryData["agent.pyz"]``, mounted at :data:`AGENT_DIR`."""
    return client.V1ConfigMap(
        api_version="v1", kind="ConfigMap",
        metadata=_meta(name, namespace, base_labels(extra={**(labels or {}), AGENT_DIGEST_LABEL: digest})),
        binary_data={"agent.pyz": base64.b64encode(pyz_bytes).decode("ascii")},
        immutable=True,
    )


def make_pod(
    name: str,
    namespace: str,
    *,
    kernel_id: str,
    user: str,
    image: str,
    agent_configmap: str,
    requests: Mapping[str, str],
    limits: Mapping[str, str],
    service_account: str = SERVICE_ACCOUNT,
    image_pull_policy: str = "IfNotPresent",
    runtime_class: str | None = None,
    node_selector: Mapping[str, str] | None = None,
    tolerations: Sequence[Mapping[str, Any]] = (),
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    tmp_size: str | None = "1Gi",
    home_size: str | None = "2Gi",
    env: Mapping[str, str] | None = None,
    orphan_exit: float = 0,
) -> client.V1Pod:
    """One kernel's sandbox pod; passes the Pod Security ``restricted`` profile.

    The agent is the main process (:data:`SERVE_COMMAND`); the root filesystem is
    read-only, /tmp and the home directory are emptyDirs; no service account token.
    ``orphan_exit`` > 0: the agent exits (the pod ends) after that many seconds with no
    client attached.
    """
    pod_labels = base_labels(user, {COMPONENT_LABEL: "sandbox", KERNEL_LABEL: label_value(kernel_id),
                                    **(labels or {})})
    pod_annotations = {SAFE_TO_EVICT: "false", USER_ANNOTATION: user, **(annotations or {})}
    container_env = [client.V1EnvVar(name="HOME", value=HOME_DIR),
                     client.V1EnvVar(name="PYTHONUNBUFFERED", value="1")]
    container_env += [client.V1EnvVar(name=k, value=v) for k, v in (env or {}).items()]
    container = client.V1Container(
        name=CONTAINER,
        image=image,
        image_pull_policy=image_pull_policy,
        command=list(SERVE_COMMAND) + (["--orphan-exit", f"{orphan_exit:g}"] if orphan_exit > 0 else []),
        working_dir=HOME_DIR,
        env=container_env,
        resources=client.V1ResourceRequirements(requests=dict(requests), limits=dict(limits)),
        security_context=client.V1SecurityContext(
            run_as_non_root=True,
            run_as_user=SANDBOX_UID,
            run_as_group=SANDBOX_UID,
            allow_privilege_escalation=False,
            privileged=False,
            read_only_root_filesystem=True,
            capabilities=client.V1Capabilities(drop=["ALL"]),
            seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
        ),
        readiness_probe=client.V1Probe(
            _exec=client.V1ExecAction(command=list(READINESS_COMMAND)),
            period_seconds=1, timeout_seconds=5, failure_threshold=3,
        ),
        volume_mounts=[
            client.V1VolumeMount(name="agent", mount_path=AGENT_DIR, read_only=True),
            client.V1VolumeMount(name="tmp", mount_path="/tmp"),
            client.V1VolumeMount(name="home", mount_path=HOME_DIR),
        ],
    )
    spec = client.V1PodSpec(
        containers=[container],
        restart_policy="Never",  # a dead agent lost its state: the session replaces the pod
        service_account_name=service_account,
        automount_service_account_token=False,
        enable_service_links=False,
        termination_grace_period_seconds=5,
        security_context=client.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=SANDBOX_UID, run_as_group=SANDBOX_UID, fs_group=SANDBOX_UID,
            seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
        ),
        volumes=[
            client.V1Volume(name="agent", config_map=client.V1ConfigMapVolumeSource(name=agent_configmap,
                                                                                   default_mode=0o444)),
            client.V1Volume(name="tmp", empty_dir=client.V1EmptyDirVolumeSource(size_limit=tmp_size)),
            client.V1Volume(name="home", empty_dir=client.V1EmptyDirVolumeSource(size_limit=home_size)),
        ],
        runtime_class_name=runtime_class,
        node_selector=dict(node_selector) if node_selector else None,
        tolerations=[client.V1Toleration.from_dict(dict(t)) for t in tolerations] or None,
    )
    return client.V1Pod(api_version="v1", kind="Pod",
                        metadata=_meta(name, namespace, pod_labels, pod_annotations), spec=spec)


def to_dict(obj: Any) -> dict:
    """The JSON form of a builder's result (typed object or dict), as sent to the API."""
    return client.ApiClient().sanitize_for_serialization(obj)
