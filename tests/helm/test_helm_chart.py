"""The chart lints, renders valid objects for every values case, and its schema rejects bad values."""

from __future__ import annotations

import time

import pytest

from fakekube.fixtures import fakekube  # noqa: F401 - the gc job's argv runs against the fake API server
from helm_testlib import CHART, GC_IMAGE, MATRIX, NAMESPACE, helm, requires_helm

pytestmark = requires_helm


def test_lint_strict_for_every_case():
    for name, overrides in MATRIX.items():
        report = helm.lint(CHART, overrides, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, f"{name}: {problems}"


def test_every_rendered_object_is_valid(case, render, validate_object):
    name, overrides = case
    objects = render(overrides)
    assert objects, name
    for obj in objects:
        validate_object(obj)
        if obj["kind"] in ("Role", "RoleBinding") and obj["metadata"]["name"].endswith("-doctor"):
            assert obj["metadata"]["namespace"] == "kube-system"  # the doctor's reads there, by name
        elif obj["kind"] not in ("ClusterRole", "ClusterRoleBinding", "RuntimeClass", "NetworkLogging",
                                 "CiliumClusterwideNetworkPolicy", "ValidatingAdmissionPolicy",
                                 "ValidatingAdmissionPolicyBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]
        assert len(obj["metadata"]["name"]) <= 63


def test_defaults_render_only_the_core(render):
    kinds = sorted(o["kind"] for o in render({}))
    assert kinds == ["ClusterRole", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding",
                     "ConfigMap", "Role", "RoleBinding", "ServiceAccount",
                     "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]


@pytest.mark.parametrize("piece, values, kinds", [
    ("gc", {"gc": {"enabled": True, "image": GC_IMAGE}}, {"CronJob", "ClusterRole", "ClusterRoleBinding", "ServiceAccount"}),
    ("prePuller", {"prePuller": {"enabled": True}}, {"DaemonSet"}),
    ("networkLogging", {"networkLogging": {"enabled": True}}, {"NetworkLogging"}),
    ("metadataDeny", {"metadataDeny": {"enabled": True}}, {"CiliumClusterwideNetworkPolicy"}),
    ("gvisor", {"gvisor": {"enabled": True, "runtimeClass": {"create": True, "handler": "runsc"}}}, {"RuntimeClass"}),
])
def test_each_optional_piece_is_off_by_default_and_one_value_turns_it_on(piece, values, kinds, render, merged_values):
    assert merged_values({})[piece]["enabled"] is False
    base = [(o["kind"], o["metadata"]["name"]) for o in render({})]
    added = {kind for kind, name in [(o["kind"], o["metadata"]["name"]) for o in render(values)] if (kind, name) not in base}
    assert added == kinds


def test_gc_job_runs_the_cli_verb_and_it_cleans_the_fake_cluster(render, find, fakekube, tmp_path, monkeypatch,
                                                                  capsys):
    """The CronJob's argv, run by the real CLI against the fake API server: it parses, sees
    the chart's max age and enforcers, and removes an ended sandbox pod."""
    from sandbox_kernel import cli
    from sandbox_kernel.backends import objects as k8s_objects

    (job,) = find(render(MATRIX["everything"]), "CronJob")
    assert job["spec"]["schedule"] == "0 * * * *"
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"{GC_IMAGE['name']}:{GC_IMAGE['tag']}"
    command = container["command"]
    assert command == ["sandbox-kernel", "gc", "--backend=kubernetes", "--max-age=7200",
                       "--enforcers=networkpolicy,gke-fqdn,cilium"]
    assert pod["serviceAccountName"].endswith("-gc") and pod["securityContext"]["runAsNonRoot"] is True

    monkeypatch.setenv("KUBECONFIG", fakekube.write_kubeconfig(tmp_path / "kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    ns, name = "user-sandbox-alice", "sandbox-k-old-abc123"
    fakekube.ensure_namespace(ns)
    fakekube.put_object({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": {
        k8s_objects.MANAGED_BY_LABEL: k8s_objects.MANAGED_BY, k8s_objects.KERNEL_LABEL: "k-old"}},
        "spec": {"containers": [{"name": "sandbox", "image": "python:3.12-slim"}]}})
    deadline = time.monotonic() + 10
    while (fakekube.get_object("pods", ns, name) or {}).get("status", {}).get("phase") != "Running":
        assert time.monotonic() < deadline, "the fake kubelet did not run the pod"
        time.sleep(0.01)
    fakekube.evict(ns, name)  # ended: gc removes it whatever its age
    assert cli.main(command[1:]) == 0
    out = capsys.readouterr().out
    assert f"removed pods {ns}/{name}" in out, out
    assert fakekube.objects("pods", ns) == []


def test_gc_without_an_image_fails_with_a_clear_message(helm_chart):
    with pytest.raises(helm.HelmError, match="gc.image.name is required"):
        helm_chart.render({"gc": {"enabled": True}}, name="sk", namespace=NAMESPACE)


def test_pre_puller_follows_the_sandboxes(render, find):
    (ds,) = find(render(MATRIX["gvisor"]), "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["initContainers"][0]["image"] == "python:3.12-slim"
    assert spec["initContainers"][0]["command"] == ["python3", "-c", "pass"]
    assert spec["runtimeClassName"] == "gvisor"
    assert spec["nodeSelector"] == MATRIX["gvisor"]["sandbox"]["nodeSelector"]
    assert spec["tolerations"] == MATRIX["gvisor"]["sandbox"]["tolerations"]
    assert spec["automountServiceAccountToken"] is False


def test_network_logging_is_the_policy_modules_object(render, find):
    from sandbox_kernel.policy.compile_gke import make_network_logging

    (obj,) = find(render({"networkLogging": {"enabled": True, "logAllowed": True}}), "NetworkLogging")
    assert obj == make_network_logging(log_denied=True, log_allowed=True)
    (obj,) = find(render({"networkLogging": {"enabled": True, "logDenied": False}}), "NetworkLogging")
    assert obj == make_network_logging(log_denied=False)
    (obj,) = find(render({"networkLogging": {"enabled": True, "delegate": True}}), "NetworkLogging")
    assert obj == make_network_logging(delegate=True)
    assert obj["spec"]["cluster"]["deny"] == {"log": True, "delegate": True}


def test_delegated_logging_matches_the_sandbox_namespaces_annotation():
    from sandbox_kernel.backends import objects as k8s_objects

    ns = k8s_objects.to_dict(k8s_objects.make_namespace("user-sandbox-alice", "alice"))
    assert ns["metadata"]["annotations"]["policy.network.gke.io/enable-deny-logging"] == "true"


def test_metadata_deny_selects_sandbox_pods_and_denies_the_metadata_server(render, find):
    from sandbox_kernel.backends import objects as k8s_objects

    (policy,) = find(render(MATRIX["metadata-deny"]), "CiliumClusterwideNetworkPolicy")
    spec = policy["spec"]
    pod = k8s_objects.to_dict(k8s_objects.make_pod(
        "p", "user-sandbox-a", kernel_id="k", user="a", image="python:3.12-slim", agent_configmap="c",
        requests={}, limits={}, image_pull_policy="IfNotPresent", runtime_class=None, node_selector={},
        tolerations=[]))
    assert spec["endpointSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert spec["egressDeny"] == [{"toCIDR": ["169.254.169.254/32", "fd00:ec2::254/128"]}]
    (ported,) = find(render(MATRIX["metadata-deny-ports"]), "CiliumClusterwideNetworkPolicy")
    assert ported["spec"]["egressDeny"][0]["toPorts"] == [
        {"ports": [{"port": p, "protocol": "TCP"} for p in ("80", "988", "8080")]}]


BAD_VALUES = [
    ("typo at the top", {"gcc": {"enabled": True}}),
    ("typo in a section", {"policy": {"lockd": True}}),
    ("typo deep down", {"gc": {"image": {"name": "x", "tag": "y", "pulPolicy": "Always"}}}),
    ("wrong type", {"policy": {"locked": "yes"}}),
    ("wrong type of number", {"sandbox": {"startTimeout": "300"}}),
    ("unknown enforcer", {"sandbox": {"enforcers": ["calico"]}}),
    ("unknown mode", {"policy": {"mode": "allow"}}),
    ("unknown preset", {"policy": {"presets": ["pip"]}}),
    ("quota as a number", {"sandbox": {"quota": {"pods": 4}}}),
    ("template without a prefix", {"sandbox": {"namespaceTemplate": "{slug}"}}),
    ("not a CIDR", {"policy": {"alwaysBlocked": ["metadata.google.internal"]}}),
    ("toleration typo", {"sandbox": {"tolerations": [{"key": "a", "efect": "NoSchedule"}]}}),
]


@pytest.mark.parametrize("overrides", [v for _, v in BAD_VALUES], ids=[n for n, _ in BAD_VALUES])
def test_schema_rejects_bad_values(overrides, helm_chart):
    with pytest.raises(helm.HelmValuesError):
        helm_chart.validate_schema(helm_chart.merge_values(overrides))
    with pytest.raises(helm.HelmError):
        helm_chart.render(overrides, name="sk", namespace=NAMESPACE)


def test_schema_accepts_the_matrix_and_describes_every_key(helm_chart):
    for overrides in MATRIX.values():
        helm_chart.validate_schema(helm_chart.merge_values(overrides))

    def walk(node, path):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path}: unknown keys must be rejected"
            for key, child in node["properties"].items():
                assert child.get("description"), f"{path}.{key} has no description"
                walk(child, f"{path}.{key}")
        if node.get("type") == "array":
            walk(node["items"], f"{path}[]")

    walk(helm_chart.schema, "values")


def test_schema_enums_follow_the_code(helm_chart):
    from sandbox_kernel.backends.kubernetes import ENFORCER_KINDS
    from sandbox_kernel.policy.model import MODES
    from sandbox_kernel.policy.presets import PRESETS

    props = helm_chart.schema["properties"]
    assert props["sandbox"]["properties"]["enforcers"]["items"]["enum"] == list(ENFORCER_KINDS)
    assert props["policy"]["properties"]["presets"]["items"]["enum"] == list(PRESETS)
    assert props["policy"]["properties"]["mode"]["enum"] == list(MODES)


def test_values_yaml_defaults_match_the_kernels_defaults(merged_values, monkeypatch):
    """Installing with default values changes nothing the kernel would do without the chart."""
    from sandbox_kernel.backends.kubernetes import KubernetesBackend
    from sandbox_kernel.policy.admin import DEFAULT_ALWAYS_BLOCKED, DEFAULT_CLUSTER_RANGES, AdminPolicy

    for var in [v for v in __import__("os").environ if v.startswith("SANDBOX_KERNEL_")]:
        monkeypatch.delenv(var)
    values, backend, admin = merged_values({}), KubernetesBackend(), AdminPolicy()
    sandbox, policy = values["sandbox"], values["policy"]
    assert f"{sandbox['image']['name']}:{sandbox['image']['tag']}" == backend.image
    assert (sandbox["requests"], sandbox["limits"], sandbox["quota"]) == (backend.requests, backend.limits, backend.quota)
    assert sandbox["enforcers"] == backend.enforcers and sandbox["namespaceTemplate"] == backend.namespace_template
    assert (sandbox["startTimeout"], sandbox["scheduleTimeout"], sandbox["idleTimeout"]) == (
        backend.start_timeout, backend.schedule_timeout, backend.idle_timeout)
    assert policy["alwaysBlocked"] == list(DEFAULT_ALWAYS_BLOCKED) == admin.always_blocked
    assert policy["clusterRanges"] == list(DEFAULT_CLUSTER_RANGES) == admin.cluster_ranges
    assert (sandbox["orphanTimeout"], sandbox["gcOnStart"]) == (backend.orphan_timeout, backend.gc_on_start) == (600, True)
    assert (str(sandbox["nodeLocalDNS"]).lower(), str(sandbox["gkeCloudDNS"]).lower()) == (
        backend.node_local_dns, backend.gke_cloud_dns) == ("true", "true")
    assert (policy["mode"], policy["locked"], policy["userMayAllow"], policy["maxEntries"]) == (
        admin.mode, admin.locked, admin.user_may_allow, admin.max_entries)


def test_notes_tell_the_admin_what_to_do_next(render_files):
    (notes,) = [t for p, t in render_files(MATRIX["exam-mode"]).items() if p.endswith("NOTES.txt")]
    assert "singleuser.serviceAccountName: sk-sandbox-kernel" in notes
    assert "configMap sk-sandbox-kernel-config" in notes
    assert "LOCKED" in notes and "kubectl auth can-i create pods/exec -n user-sandbox-test" in notes
