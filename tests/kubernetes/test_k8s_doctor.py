"""``sandbox-kernel doctor --backend kubernetes`` and ``gc --backend kubernetes`` against the fake."""

from __future__ import annotations

import time

import pytest

from sandbox_kernel import cli, doctor_k8s
from sandbox_kernel.backends import kubernetes as kb
from sandbox_kernel.backends.objects import KERNEL_LABEL, MANAGED_BY_LABEL


def backend(fakekube, **kw):
    kw.setdefault("user", "alice")
    return kb.KubernetesBackend(client_configuration=fakekube.configuration(), **kw)


def rows(fakekube, **kw):
    return {r.name: r for r in doctor_k8s.run_checks(backend(fakekube, **kw))}


def gke_cluster(fakekube):
    """What a GKE Autopilot/Standard cluster with Dataplane V2, GKE Sandbox and FQDN policies shows."""
    fakekube.add_daemonset("anetd")
    fakekube.add_daemonset("kube-proxy")
    fakekube.add_runtime_class("gvisor", "runsc")
    fakekube.add_crd("fqdnnetworkpolicies.networking.gke.io")


def test_ready_cluster_exit_0_and_only_read_or_review_calls(fakekube):
    gke_cluster(fakekube)
    fakekube.clear_requests()
    out = []
    code = doctor_k8s.main(backend(fakekube, runtime_class="gvisor", enforcers=["gke-fqdn"]), out=out.append)
    text = "\n".join(out)
    assert code == 0, text
    assert text.splitlines()[-1] == "ready"
    assert "CHECK" in text and "STATUS" in text
    for needed in ("credentials", "API server", "RBAC create pods ", "RBAC create pods/exec",
                   "RBAC patch fqdnnetworkpolicies.networking.gke.io", "NetworkPolicy enforcement",
                   "RuntimeClass gvisor", "CRD fqdnnetworkpolicies.networking.gke.io", "image"):
        assert needed in text, needed
    assert "GKE Dataplane V2 (DaemonSet kube-system/anetd)" in text
    assert "v1.37.0-fakekube" in text
    # nothing but GETs/LISTs and SelfSubjectAccessReviews; every permission is in a list
    used = fakekube.permissions_used()
    assert {v for _, _, v in used} <= {"get", "list", "create"}
    assert {p for p in used if p[2] == "create"} == {("authorization.k8s.io", "selfsubjectaccessreviews", "create")}
    assert used - set(kb.REQUIRED_PERMISSIONS) - set(doctor_k8s.DOCTOR_PERMISSIONS) == set()
    # one review per backend permission, and one before each of the doctor's own reads, all
    # by name (the chart can grant exactly those): DaemonSets, the RuntimeClass, the FQDN CRDs
    reviews = fakekube.count("create", "selfsubjectaccessreviews")
    assert reviews == len(kb.required_permissions(["gke-fqdn"])) + len(doctor_k8s.DOCTOR_DAEMONSETS) + 1 \
        + len(doctor_k8s.FQDN_CRDS)
    assert ("apps", "daemonsets", "list") not in used
    assert fakekube.count("get", "daemonsets") == len(doctor_k8s.DOCTOR_DAEMONSETS)


def test_each_failure_says_what_to_do(fakekube):
    fakekube.add_daemonset("kube-proxy")  # no enforcing dataplane
    fakekube.forbid("create", "pods/exec")
    fakekube.forbid("deletecollection", "networkpolicies", group="networking.k8s.io")
    out = []
    code = doctor_k8s.main(backend(fakekube, runtime_class="gvisor", enforcers=["networkpolicy", "cilium"]),
                           out=out.append)
    assert code == 1
    text = "\n".join(out)
    assert "not ready: 5 checks failed" in text, text
    table = {r.name: r for r in doctor_k8s.run_checks(backend(fakekube, runtime_class="gvisor",
                                                                   enforcers=["networkpolicy", "cilium"]))}
    exec_row = table["RBAC create pods/exec"]
    assert exec_row.status == "FAIL" and "grant the kernel's service account 'create' on 'pods/exec'" in exec_row.detail
    assert table["RBAC deletecollection networkpolicies.networking.k8s.io"].status == "FAIL"
    assert table["RBAC get pods/exec"].status == "ok"
    np = table["NetworkPolicy enforcement"]
    assert np.status == "FAIL" and "--enable-dataplane-v2" in np.detail and "NOT enforced" in np.detail
    rc = table["RuntimeClass gvisor"]
    assert rc.status == "FAIL" and "GKE Sandbox" in rc.detail
    cilium = table["CRD ciliumnetworkpolicies.cilium.io"]
    assert cilium.status == "FAIL" and "install Cilium" in cilium.detail
    assert table["CRD fqdnnetworkpolicies.networking.gke.io"].status == "info"  # not configured: optional
    assert all(r.detail for r in table.values() if r.status == "FAIL")


def test_dataplanes_are_recognised(fakekube):
    fakekube.add_daemonset("calico-node")
    fakekube.add_daemonset("cilium")
    row = rows(fakekube)["NetworkPolicy enforcement"]
    assert row.status == "ok" and "Calico" in row.detail and "Cilium" in row.detail


def test_enforcer_crd_outside_kube_system_is_a_warning(fakekube):
    fakekube.add_crd("felixconfigurations.crd.projectcalico.org", ("v1",))
    row = rows(fakekube)["NetworkPolicy enforcement"]
    assert row.status == "warn" and "Calico (operator install)" in row.detail


def test_crd_serving_another_version_fails(fakekube):
    fakekube.add_daemonset("anetd")
    fakekube.add_crd("fqdnnetworkpolicies.networking.gke.io", ("v1beta1",))
    row = rows(fakekube, enforcers=["gke-fqdn"])["CRD fqdnnetworkpolicies.networking.gke.io"]
    assert row.status == "FAIL" and "serves v1beta1, not v1alpha1" in row.detail


def test_unused_gvisor_is_a_warning(fakekube):
    fakekube.add_daemonset("anetd")
    fakekube.add_runtime_class()
    table = rows(fakekube)
    assert table["RuntimeClass gvisor"].status == "warn" and "not used" in table["RuntimeClass gvisor"].detail
    assert doctor_k8s.ready(list(table.values()))  # warnings do not make a cluster unready


def test_missing_doctor_permissions_say_what_to_grant_and_no_refused_call_is_made(fakekube):
    fakekube.forbid("get", "daemonsets", group="apps")
    fakekube.forbid("get", "runtimeclasses", group="node.k8s.io")
    fakekube.forbid("get", "customresourcedefinitions", group="apiextensions.k8s.io")
    table = rows(fakekube, runtime_class="gvisor")
    np = table["NetworkPolicy enforcement"]
    assert np.status == "FAIL" and "could not check" in np.detail and "daemonsets.apps in kube-system" in np.detail
    assert "may not get daemonsets.apps 'anetd' in kube-system" in np.detail and "rbac.doctor" in np.detail
    assert "could not check" in table["RuntimeClass gvisor"].detail
    assert table["DNS"].status == "warn" and "could not see which resolvers run" in table["DNS"].detail
    crd = table["CRD ciliumnetworkpolicies.cilium.io"]
    assert crd.status == "info" and "could not check" in crd.detail  # not configured: not a failure
    # the doctor asked first and did not make the reads it was refused
    for resource in ("daemonsets", "runtimeclasses", "customresourcedefinitions"):
        assert fakekube.count("get", resource) == 0, resource


def test_access_reviews_forbidden_stop_after_one(fakekube):
    fakekube.add_daemonset("anetd")
    fakekube.forbid("create", "selfsubjectaccessreviews", group="authorization.k8s.io")
    table = rows(fakekube)
    rbac = [r for name, r in table.items() if name.startswith("RBAC")]
    assert len(rbac) == 1 and rbac[0].status == "FAIL" and "selfsubjectaccessreviews" in rbac[0].detail
    assert fakekube.count("create", "selfsubjectaccessreviews") == 1


def test_unreachable_and_bad_image(fakekube, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    out = []
    assert doctor_k8s.main(kb.KubernetesBackend(user="alice"), out=out.append) == 1
    lines = "\n".join(out).splitlines()
    assert lines[2].startswith("kubernetes client") and " ok " in lines[2]
    assert lines[3].startswith("credentials") and "FAIL" in lines[3] and "no Kubernetes credentials" in lines[3]
    from kubernetes import client

    closed = client.Configuration(host="http://127.0.0.1:9")  # nothing listens on the discard port
    closed.retries = 0
    table = doctor_k8s.run_checks(kb.KubernetesBackend(client_configuration=closed, user="alice"))
    assert [r.status for r in table] == ["ok", "ok", "FAIL"]
    assert "cannot reach the Kubernetes API server at http://127.0.0.1:9" in table[2].detail
    fakekube.add_daemonset("anetd")
    image = rows(fakekube, image="Not An Image!")["image"]
    assert image.status == "FAIL" and "not a valid image reference" in image.detail


def _kubeconfig(fakekube, tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", fakekube.write_kubeconfig(tmp_path / "kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


def test_cli_doctor_backend_flag_and_env(fakekube, tmp_path, monkeypatch, capsys):
    _kubeconfig(fakekube, tmp_path, monkeypatch)
    gke_cluster(fakekube)
    assert cli.main(["doctor", "--backend", "kubernetes"]) == 0
    out = capsys.readouterr().out
    assert f"kubeconfig {tmp_path / 'kubeconfig'}, current context → {fakekube.url}" in out
    monkeypatch.setenv("SANDBOX_KERNEL_BACKEND", "kubernetes")
    monkeypatch.setenv("SANDBOX_KERNEL_K8S_RUNTIME_CLASS", "kata")
    assert cli.main(["doctor"]) == 1  # configured by the environment, as the kernel is
    assert "RuntimeClass kata" in capsys.readouterr().out
    monkeypatch.delenv("SANDBOX_KERNEL_K8S_RUNTIME_CLASS")
    config_dir = tmp_path / "jupyter-config"
    config_dir.mkdir()
    (config_dir / "sandbox_kernel_config.py").write_text('c.KubernetesBackend.image = "registry.example/sbx:7"\n')
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(config_dir))
    assert cli.main(["doctor"]) == 0
    assert "registry.example/sbx:7" in capsys.readouterr().out  # the kernel's config file is read too


class _Sandbox:
    def __init__(self, namespace, pod):
        self.namespace, self.pod = namespace, pod


def seed_sandbox(fakekube, user, kernel):
    """A sandbox pod and its egress policy as the backend labels them (no agent process:
    gc only looks at labels, phase and age)."""
    ns, pod = f"user-sandbox-{user}", f"sandbox-{kernel}-abc123"
    labels = {MANAGED_BY_LABEL: "sandbox-kernel", KERNEL_LABEL: kernel}
    fakekube.ensure_namespace(ns)
    fakekube.put_object({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod, "namespace": ns, "labels": labels},
                         "spec": {"containers": [{"name": "sandbox", "image": "python:3.12-slim"}]}})
    fakekube.put_object({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                         "metadata": {"name": f"{pod}-egress", "namespace": ns, "labels": labels},
                         "spec": {"podSelector": {"matchLabels": {KERNEL_LABEL: kernel}}, "policyTypes": ["Egress"]}})
    deadline = time.monotonic() + 10  # let the fake kubelet finish its steps before a test evicts it
    while (fakekube.get_object("pods", ns, pod) or {}).get("status", {}).get("phase") != "Running":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return _Sandbox(ns, pod)


def test_cli_gc(fakekube, tmp_path, monkeypatch, capsys):
    _kubeconfig(fakekube, tmp_path, monkeypatch)
    live = seed_sandbox(fakekube, "alice", "live")
    dead = seed_sandbox(fakekube, "bob", "dead")
    fakekube.evict(dead.namespace, dead.pod)
    assert cli.main(["gc", "--backend", "kubernetes", "--max-age", "1h"]) == 0
    out = capsys.readouterr().out
    assert f"removed pods {dead.namespace}/{dead.pod}" in out
    assert f"removed networkpolicies {dead.namespace}/{dead.pod}-egress" in out
    assert [p["metadata"]["name"] for p in fakekube.objects("pods")] == [live.pod]
    assert cli.main(["gc", "--backend", "kubernetes", "--max-age", "1h"]) == 0
    assert "nothing to clean up" in capsys.readouterr().out
    assert cli.main(["gc", "--backend", "kubernetes", "--max-age", "0"]) == 0  # the CronJob's maxAge: seconds
    assert f"removed pods {live.namespace}/{live.pod}" in capsys.readouterr().out
    assert cli.main(["gc", "--backend", "kubernetes", "--max-age", "soon"]) == 2
    assert cli.main(["gc", "--backend", "kubernetes", "--enforcers", "networkpolicy,cilium"]) == 0
    assert ("cilium.io", "ciliumnetworkpolicies", "list") in fakekube.permissions_used()  # swept too
    fakekube.forbid("list", "pods")
    assert cli.main(["gc", "--backend", "kubernetes"]) == 1
    assert "list pods" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["gc", "--backend", "local", "--max-age", "1h"])


def test_parse_duration():
    assert [kb.parse_duration(t) for t in ("86400", "90s", "30m", "1.5h", "2d", 7)] == [86400, 90, 1800, 5400, 172800, 7]
    with pytest.raises(ValueError):
        kb.parse_duration("1w")


def test_dns_row_says_which_resolvers_are_allowed(fakekube):
    """Issue 15 point 5: GKE runs NodeLocal DNSCache (Autopilot always, Standard from 1.33)
    and may answer through Cloud DNS on 169.254.169.254:53; the doctor says what is allowed
    and fails when a resolver that runs here is left out of the policy."""
    gke_cluster(fakekube)
    fakekube.add_daemonset("node-local-dns")
    row = rows(fakekube)["DNS"]
    assert row.status == "ok"
    assert "port 53 (UDP, TCP) only" in row.detail and "NodeLocal DNSCache 169.254.20.10" in row.detail
    assert "Cloud DNS for GKE 169.254.169.254" in row.detail and "NodeLocal DNSCache runs" in row.detail
    off = rows(fakekube, node_local_dns="false")["DNS"]
    assert off.status == "FAIL" and "every lookup in an allowlist sandbox fails" in off.detail
    assert "sandbox.nodeLocalDNS" in off.detail
    assert rows(fakekube, gke_cloud_dns="false")["DNS"].status == "warn"
    assert rows(fakekube, node_local_dns="maybe")["DNS"].status == "FAIL"


def test_gke_fqdn_requirements_are_stated(fakekube):
    """Issue 15 point 8: the doctor says what GKE FQDN network policies need (Dataplane V2,
    GKE Enterprise, versions, DNS provider, 50 addresses per object) and fails without anetd."""
    fakekube.add_daemonset("kube-proxy")
    fakekube.add_crd("fqdnnetworkpolicies.networking.gke.io")
    row = rows(fakekube, enforcers=["gke-fqdn"])["gke-fqdn requirements"]
    assert row.status == "FAIL" and "no GKE Dataplane V2" in row.detail
    fakekube.add_daemonset("anetd")
    row = rows(fakekube, enforcers=["gke-fqdn"])["gke-fqdn requirements"]
    assert row.status == "info"
    for needed in ("GKE Enterprise", "Dataplane V2", "1.26.4-gke.500", "50 addresses per", "one object per name"):
        assert needed in row.detail
    assert "gke-fqdn requirements" not in rows(fakekube, enforcers=["networkpolicy"])


@pytest.mark.parametrize("image, status", [
    ("docker.io/kindest/kindnetd:v20240813-c6f155d6", "ok"),  # kind v0.24.0
    ("docker.io/kindest/kindnetd:v20250214-acbabc1a", "ok"),
    ("docker.io/kindest/kindnetd:v20240730-75a5af0c", "FAIL"),  # kind v0.23: stores, never enforces
    ("registry.example/kindnetd:latest", "warn"),
])
def test_kindnet_enforces_only_from_kind_0_24(fakekube, image, status):
    """Issue 15 point 12: kindnet was reported as enforcing on any kind."""
    fakekube.add_daemonset("kindnet", image=image)
    row = rows(fakekube)["NetworkPolicy enforcement"]
    assert row.status == status, row.detail
    if status == "FAIL":
        assert "older than kind v0.24" in row.detail
