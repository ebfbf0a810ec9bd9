"""The pure builders: exact dicts, official schema validation, Pod Security "restricted"."""

from __future__ import annotations

import base64

import kubernetes_validate
import pytest
from kubernetes.client import ApiClient

from sandbox_kernel.backends.kubernetes import objects as o

SCHEMA = "1.37"
MANAGED = {"app.kubernetes.io/managed-by": "sandbox-kernel"}


def as_dict(obj):
    return ApiClient().sanitize_for_serialization(obj)


def check_schema(obj):
    kubernetes_validate.validate(as_dict(obj), SCHEMA, strict=True)


def test_namespace():
    ns = o.make_namespace("user-sandbox-alice--1234abcd", "Alice", {"team": "a"})
    assert as_dict(ns) == {
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {
            "name": "user-sandbox-alice--1234abcd",
            "labels": {**MANAGED, "sandbox-kernel.io/user": o.label_value("Alice"), "team": "a",
                       "pod-security.kubernetes.io/enforce": "restricted",
                       "pod-security.kubernetes.io/enforce-version": "latest"},
            "annotations": {"sandbox-kernel.io/user": "Alice",
                            "policy.network.gke.io/enable-deny-logging": "true"},
        },
    }
    check_schema(ns)


def test_service_account():
    sa = o.make_service_account("ns1")
    assert as_dict(sa) == {"apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False,
                           "metadata": {"name": "sandbox", "namespace": "ns1", "labels": MANAGED}}
    check_schema(sa)


def test_quota_and_limit_range():
    q = o.make_resource_quota("ns1", {"pods": 4, "limits.memory": "8Gi"})
    assert as_dict(q) == {"apiVersion": "v1", "kind": "ResourceQuota",
                          "metadata": {"name": "sandbox-quota", "namespace": "ns1", "labels": MANAGED},
                          "spec": {"hard": {"pods": "4", "limits.memory": "8Gi"}}}
    lr = o.make_limit_range("ns1", {"cpu": "100m"}, {"memory": "1Gi"}, {"memory": "4Gi"})
    assert as_dict(lr) == {"apiVersion": "v1", "kind": "LimitRange",
                           "metadata": {"name": "sandbox-limits", "namespace": "ns1", "labels": MANAGED},
                           "spec": {"limits": [{"type": "Container", "defaultRequest": {"cpu": "100m"},
                                                "default": {"memory": "1Gi"}, "max": {"memory": "4Gi"}}]}}
    check_schema(q)
    check_schema(lr)


def test_default_deny():
    np = o.make_default_deny_policy("ns1")
    d = as_dict(np)
    assert d["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert d["metadata"]["namespace"] == "ns1"
    assert d["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "sandbox-kernel"
    assert "ingress" not in d["spec"] and "egress" not in d["spec"]
    check_schema(np)


def test_agent_configmap():
    cm = o.make_agent_configmap("sandbox-agent-abc", "ns1", b"PK\x03\x04zip", "abc")
    assert as_dict(cm) == {
        "apiVersion": "v1", "kind": "ConfigMap", "immutable": True,
        "metadata": {"name": "sandbox-agent-abc", "namespace": "ns1",
                     "labels": {**MANAGED, "sandbox-kernel.io/agent-digest": "abc"}},
        "binaryData": {"agent.pyz": base64.b64encode(b"PK\x03\x04zip").decode()},
    }
    check_schema(cm)


def test_agent_configmap_holds_the_real_agent():
    from sandbox_kernel.agent.bundle import build_pyz, pyz_digest

    cm = o.make_agent_configmap(o.agent_configmap_name(pyz_digest()), "ns1", build_pyz(), pyz_digest())
    assert base64.b64decode(cm.binary_data["agent.pyz"]) == build_pyz()
    assert len(build_pyz()) < 1024 * 1024  # ConfigMaps hold at most 1 MiB
    check_schema(cm)


def pod(**kw):
    args = dict(kernel_id="0b9c1e4e-2f4d-4c8e-9e5e-1f2a3b4c5d6e", user="alice", image="python:3.12-slim",
                agent_configmap="sandbox-agent-abc", requests={"cpu": "250m", "memory": "512Mi"},
                limits={"cpu": "1", "memory": "1Gi"})
    args.update(kw)
    return o.make_pod("sandbox-0b9c1e4e-2f4d-4c8e-9e5e-1f2a3b4c5d6e", "user-sandbox-alice", **args)


EXPECTED_POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {
        "name": "sandbox-0b9c1e4e-2f4d-4c8e-9e5e-1f2a3b4c5d6e", "namespace": "user-sandbox-alice",
        "labels": {**MANAGED, "sandbox-kernel.io/user": "alice", "app.kubernetes.io/component": "sandbox",
                   "sandbox-kernel.io/kernel-id": "0b9c1e4e-2f4d-4c8e-9e5e-1f2a3b4c5d6e"},
        "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false",
                        "sandbox-kernel.io/user": "alice"},
    },
    "spec": {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": "Never",
        "serviceAccountName": "sandbox",
        "terminationGracePeriodSeconds": 5,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "sandbox", "image": "python:3.12-slim", "imagePullPolicy": "IfNotPresent",
            "command": ["python3", "/opt/sandbox-agent/agent.pyz", "serve", "--socket", "/tmp/.sandbox-agent.sock"],
            "workingDir": "/home/sandbox",
            "env": [{"name": "HOME", "value": "/home/sandbox"}, {"name": "PYTHONUNBUFFERED", "value": "1"}],
            "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                                "allowPrivilegeEscalation": False, "privileged": False,
                                "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "readinessProbe": {"exec": {"command": o.READINESS_COMMAND}, "periodSeconds": 1,
                               "timeoutSeconds": 5, "failureThreshold": 3},
            "volumeMounts": [{"name": "agent", "mountPath": "/opt/sandbox-agent", "readOnly": True},
                             {"name": "tmp", "mountPath": "/tmp"},
                             {"name": "home", "mountPath": "/home/sandbox"}],
        }],
        "volumes": [{"name": "agent", "configMap": {"name": "sandbox-agent-abc", "defaultMode": 0o444}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                    {"name": "home", "emptyDir": {"sizeLimit": "2Gi"}}],
    },
}


def test_pod_exact():
    assert as_dict(pod()) == EXPECTED_POD
    check_schema(pod())


def test_pod_options():
    d = as_dict(pod(runtime_class="gvisor", node_selector={"cloud.google.com/gke-spot": "true"},
                    tolerations=[{"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true",
                                  "effect": "NoSchedule"}], env={"MPLBACKEND": "agg"}))
    assert d["spec"]["runtimeClassName"] == "gvisor"
    assert d["spec"]["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert d["spec"]["tolerations"] == [{"key": "cloud.google.com/gke-spot", "operator": "Equal",
                                         "value": "true", "effect": "NoSchedule"}]
    assert {"name": "MPLBACKEND", "value": "agg"} in d["spec"]["containers"][0]["env"]
    kubernetes_validate.validate(d, SCHEMA, strict=True)


def test_invalid_toleration_is_refused_by_schema():
    d = as_dict(pod())
    d["spec"]["containers"][0]["securityContext"]["capabilities"]["drop"] = "ALL"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(d, SCHEMA, strict=True)


# --- Pod Security Standards, "restricted" profile, written out check by check -----------

SAFE_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                     "projected", "secret"}
SAFE_SYSCTLS_PREFIXES = ("kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                         "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range")


def restricted_violations(pod: dict) -> list[str]:
    """The checks of https://kubernetes.io/docs/concepts/security/pod-security-standards/
    (baseline + restricted), on a pod dict. Returns what fails."""
    spec = pod["spec"]
    psc = spec.get("securityContext") or {}
    bad = []
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(flag):
            bad.append(f"spec.{flag}")
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= SAFE_VOLUME_TYPES:
            bad.append(f"volume {v['name']}: {kinds - SAFE_VOLUME_TYPES}")
    for s in psc.get("sysctls") or []:
        if not s["name"].startswith(SAFE_SYSCTLS_PREFIXES):
            bad.append(f"sysctl {s['name']}")
    if (psc.get("seLinuxOptions") or {}).get("type") not in (None, "", "container_t", "container_init_t",
                                                             "container_kvm_t", "container_engine_t"):
        bad.append("seLinuxOptions.type")
    containers = spec["containers"] + spec.get("initContainers", []) + spec.get("ephemeralContainers", [])
    for c in containers:
        sc = c.get("securityContext") or {}
        where = f"container {c['name']}"
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("procMount") not in (None, "Default"):
            bad.append(f"{where}: procMount")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            bad.append(f"{where}: hostPort")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation must be false")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            bad.append(f"{where}: runAsNonRoot must be true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad.append(f"{where}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{where}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: capabilities.add")
        # not part of the profile, but part of our contract
        if sc.get("readOnlyRootFilesystem") is not True:
            bad.append(f"{where}: readOnlyRootFilesystem")
        if not (c.get("resources") or {}).get("limits") or not (c.get("resources") or {}).get("requests"):
            bad.append(f"{where}: requests and limits")
    if spec.get("automountServiceAccountToken") is not False:
        bad.append("automountServiceAccountToken")
    return bad


def test_pod_passes_restricted():
    assert restricted_violations(as_dict(pod())) == []
    assert restricted_violations(as_dict(pod(runtime_class="gvisor"))) == []


def test_restricted_checks_catch_violations():
    d = as_dict(pod())
    d["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    d["spec"]["containers"][0]["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}
    d["spec"]["hostNetwork"] = True
    d["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}})
    del d["spec"]["securityContext"]["seccompProfile"]
    del d["spec"]["containers"][0]["securityContext"]["seccompProfile"]
    got = "\n".join(restricted_violations(d))
    for needle in ("allowPrivilegeEscalation", "NET_ADMIN" if False else "capabilities.add", "hostNetwork",
                   "hostPath", "seccompProfile", "drop ALL"):
        assert needle in got, needle


def test_writable_paths_are_exactly_the_empty_dirs():
    d = as_dict(pod())
    mounts = {m["mountPath"]: m for m in d["spec"]["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in d["spec"]["volumes"]}
    writable = {p for p, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"/tmp", "/home/sandbox"}
    assert all("emptyDir" in volumes[mounts[p]["name"]] for p in writable)
    assert o.AGENT_SOCKET.startswith("/tmp/")
