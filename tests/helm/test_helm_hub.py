"""Hub mode (hub.enabled): the sandbox service's Deployment, Service and PVC, the kernels' RBAC
bound to the service's account, the service reading its configuration back from what the
chart renders, and helm/examples/z2jh-hub-values.yaml registering the same service."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import pytest
import yaml

from helm_testlib import EXAMPLES, HUB, MATRIX, NAMESPACE, RELEASE, helm, requires_helm

pytestmark = requires_helm

HUB_EXAMPLE = EXAMPLES / "z2jh-hub-values.yaml"
CONFIG_FILE = "sandbox_kernel_config.json"


def one(objects, kind, name_suffix=""):
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    return obj


def container_of(deployment):
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_hub_mode_adds_the_service_and_drops_the_kernels_account(render, validate_object):
    base = {(o["kind"], o["metadata"]["name"]) for o in render({})}
    objects = render({"hub": HUB})
    for obj in objects:
        validate_object(obj)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    full = f"{RELEASE}-sandbox-kernel"
    assert names - base == {("ServiceAccount", f"{full}-hub"), ("Deployment", f"{full}-hub"),
                            ("Service", f"{full}-hub"), ("PersistentVolumeClaim", f"{full}-hub-state")}
    assert base - names == {("ServiceAccount", full)}, "user servers need no account in hub mode"


@pytest.mark.parametrize("case", ["hub", "hub-exam", "everything"])
def test_deployment_service_and_pvc_fit_together(case, render, merged_values):
    values = merged_values(MATRIX[case])["hub"]
    objects = render(MATRIX[case])
    deployment, service, pvc = one(objects, "Deployment"), one(objects, "Service"), one(objects, "PersistentVolumeClaim")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"] == spec["selector"]["matchLabels"]
    assert pod["serviceAccountName"] == one(objects, "ServiceAccount", "-hub")["metadata"]["name"]
    assert spec["template"]["metadata"]["labels"]["hub.jupyter.org/network-access-hub"] == "true"
    container = container_of(deployment)
    assert container["image"] == f"{values['image']['name']}:{values['image']['tag']}"
    assert container["command"] == ["python3", "-m", "sandbox_kernel.hub"]
    (port,) = container["ports"]
    (service_port,) = service["spec"]["ports"]
    assert port["containerPort"] == service_port["port"] == values["port"] and service_port["targetPort"] == "http"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts["/var/lib/sandbox-kernel-hub"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert mounts["/etc/sandbox-kernel"]["configMap"]["name"] == one(objects, "ConfigMap")["metadata"]["name"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == values["stateVolume"]["size"]
    assert pvc["spec"].get("storageClassName", "") == values["stateVolume"]["storageClass"]
    assert container["resources"] == values["resources"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {e["name"]: e for e in container["env"]}
    assert env["JUPYTERHUB_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": values["apiTokenSecret"], "key": "token"}
    assert container["readinessProbe"]["httpGet"]["path"] == f"/services/{values['serviceName']}/api/health"


def test_the_service_reads_back_what_the_chart_renders(render, merged_values, tmp_path, monkeypatch):
    """The Deployment's argv and env, given to the real SandboxService with the rendered
    ConfigMap as its file, configure it (and its backend and ceiling) as the values say."""
    from sandbox_kernel.backends.kubernetes import KubernetesBackend
    from sandbox_kernel.hub.service import HealthHandler, SandboxService
    from sandbox_kernel.policy.admin import AdminPolicy

    for var in [v for v in os.environ if v.startswith(("SANDBOX_", "JUPYTERHUB_"))]:
        monkeypatch.delenv(var)
    values = merged_values(MATRIX["hub-exam"])
    objects = render(MATRIX["hub-exam"])
    container = container_of(one(objects, "Deployment"))
    (tmp_path / CONFIG_FILE).write_text(one(objects, "ConfigMap")["data"][CONFIG_FILE])
    for e in container["env"]:
        monkeypatch.setenv(e["name"], e.get("value", "a-token-from-the-secret"))
    argv = [a.replace("/etc/sandbox-kernel", str(tmp_path)) for a in container["args"]]

    app = SandboxService()
    app.initialize(argv)
    hub = values["hub"]
    assert (app.backend_name, app.ip, app.port) == ("kubernetes", "0.0.0.0", hub["port"])
    assert app.prefix == f"/services/{hub['serviceName']}/"
    assert app.state_dir in {m["mountPath"] for m in container["volumeMounts"]}
    assert app.admin_groups == hub["adminGroups"] == ["teachers", "class-b"]
    assert (app.abandoned_after, app.keep_stopped) == (hub["abandonedAfter"], hub["keepStopped"]) == (1800, 0)
    assert app.group_refresh_interval == hub["groupRefreshInterval"] == 120
    assert app.max_sandboxes_per_user == hub["maxSandboxesPerUser"] == 2
    assert (app.audit_max_bytes, app.audit_backups) == (hub["auditMaxBytes"], hub["auditBackups"]) == (52428800, 3)
    assert app.admin_origin == hub["adminOrigin"] == "https://sbx.example.org"
    assert os.environ["JUPYTERHUB_HOST"] == "https://hub.example.org"
    sandbox = values["sandbox"]
    backend = KubernetesBackend(parent=app, user="alice")
    assert backend.image == f"{sandbox['image']['name']}:{sandbox['image']['tag']}"
    assert backend.enforcers == sandbox["enforcers"] and backend.quota == sandbox["quota"]
    admin = AdminPolicy(parent=app)
    assert admin.locked is True and admin.user_may_allow == []
    # the probe's path is a route of the app, under the prefix the hub proxies
    probe = container["readinessProbe"]["httpGet"]["path"]
    assert any(rule.matcher.match(_Request(probe)) is not None and rule.target is HealthHandler
               for rule in app.make_app().default_router.rules[0].target.rules)


class _Request:
    def __init__(self, path):
        self.path, self.host, self.headers = path, "x", {}


def test_kernel_role_is_bound_to_the_service_in_hub_mode_else_to_the_kernels(render):
    full = f"{RELEASE}-sandbox-kernel"
    for values, account in [({}, full), ({"hub": HUB}, f"{full}-hub"),
                            ({"hub": HUB, "serviceAccount": {"create": False, "name": "hub-users"}}, f"{full}-hub"),
                            ({"serviceAccount": {"create": False, "name": "hub-users"}}, "hub-users")]:
        objects = render(values)
        binding = one(objects, "ClusterRoleBinding", "-kernel")
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}], values
        if values.get("serviceAccount", {}).get("create", True):
            assert account in {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
    # the same rules either way: the service does what the kernel would
    assert one(render({}), "ClusterRole", "-kernel")["rules"] == one(render({"hub": HUB}), "ClusterRole", "-kernel")["rules"]


HUB_BAD_VALUES = [
    ("typo in the block", {"hub": {"enabeld": True}}),
    ("typo in the image", {"hub": {"image": {"pulPolicy": "Always"}}}),
    ("typo in the state volume", {"hub": {"stateVolume": {"sizee": "2Gi"}}}),
    ("typo in resources", {"hub": {"resources": {"request": {"cpu": "1"}}}}),
    ("local backend in-cluster", {"hub": {"backend": "local"}}),
    ("service name with capitals", {"hub": {"serviceName": "Sandbox"}}),
    ("service name with a slash", {"hub": {"serviceName": "a/b"}}),
    ("group name with a comma", {"hub": {"adminGroups": ["a,b"]}}),
    ("groups as a string", {"hub": {"adminGroups": "teachers"}}),
    ("port as a string", {"hub": {"port": "10101"}}),
    ("negative sandbox limit", {"hub": {"maxSandboxesPerUser": -1}}),
    ("admin origin with a path", {"hub": {"adminOrigin": "https://sbx.example.org/services/sandbox/"}}),
    ("admin origin without a scheme", {"hub": {"adminOrigin": "sbx.example.org"}}),
    ("sandbox limit as a string", {"hub": {"maxSandboxesPerUser": "4"}}),
    ("port out of range", {"hub": {"port": 70000}}),
    ("size without a number", {"hub": {"stateVolume": {"size": "big"}}}),
    ("hub URL without a scheme", {"hub": {"hubApiUrl": "hub:8081"}}),
]


@pytest.mark.parametrize("overrides", [v for _, v in HUB_BAD_VALUES], ids=[n for n, _ in HUB_BAD_VALUES])
def test_schema_rejects_bad_hub_values(overrides, helm_chart):
    with pytest.raises(helm.HelmValuesError):
        helm_chart.validate_schema(helm_chart.merge_values(overrides))


@pytest.mark.parametrize("missing, message", [("image", "hub.image.name is required"),
                                              ("apiTokenSecret", "hub.apiTokenSecret is required")])
def test_required_hub_values_fail_with_a_clear_message(missing, message, helm_chart):
    values = {k: v for k, v in HUB.items() if k != missing}
    with pytest.raises(helm.HelmError, match=message):
        helm_chart.render({"hub": values}, name=RELEASE, namespace=NAMESPACE)


def test_notes_say_users_need_no_account(render_files):
    (notes,) = [t for p, t in render_files({"hub": HUB}).items() if p.endswith("NOTES.txt")]
    assert "user servers need no service" in notes and "singleuser.serviceAccountName" in notes
    assert f"hub.services.sandbox.url:      http://{RELEASE}-sandbox-kernel-hub:10101" in notes
    assert "kubectl create secret generic sandbox-hub-token" in notes
    assert f"--as=system:serviceaccount:{NAMESPACE}:{RELEASE}-sandbox-kernel-hub" in notes
    assert "It is OFF (hub.adminOrigin is empty)" in notes
    (on,) = [t for p, t in render_files({"hub": {**HUB, "adminOrigin": "https://sbx.example.org/",
                                                 "hubPublicUrl": "https://hub.example.org"}}).items()
             if p.endswith("NOTES.txt")]
    assert "It is at https://sbx.example.org/services/sandbox/admin" in on
    assert "oauth_redirect_uri: https://sbx.example.org/services/sandbox/oauth_callback" in on
    assert "never proxy-public" in on and "WARNING: set hub.hubPublicUrl" not in on
    assert "hub.loadRoles.sandbox-service: scopes [read:groups, list:groups], services [sandbox]" in notes


# --- helm/examples/z2jh-hub-values.yaml -------------------------------------------------

def hub_example() -> dict:
    return yaml.safe_load(HUB_EXAMPLE.read_text())


def test_both_examples_parse():
    for path in sorted(EXAMPLES.glob("*.yaml")):
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_hub_example_registers_the_service_the_chart_deploys(helm_chart, merged_values):
    """Installed as the example's header says: release "sandbox-kernel", hub.enabled."""
    files = helm_chart.render({"hub": HUB}, name="sandbox-kernel", namespace=NAMESPACE, is_install=True)
    objects = [d for p, t in files.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    service, deployment = one(objects, "Service"), one(objects, "Deployment")
    name = merged_values({})["hub"]["serviceName"]
    example = hub_example()

    (registered,) = example["hub"]["services"]
    assert registered == name
    url = urlparse(example["hub"]["services"][name]["url"])
    assert (url.hostname, url.port) == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])
    assert "apiToken" in example["hub"]["services"][name]
    scope = f"access:services!service={name}"
    assert scope in example["hub"]["loadRoles"]["user"]["scopes"]
    assert scope in example["hub"]["config"]["Spawner"]["server_token_scopes"]
    # the service reads group members (exam mode for a class reaches running sandboxes)
    role = example["hub"]["loadRoles"]["sandbox-service"]
    assert role == {"scopes": ["read:groups", "list:groups"], "services": [name]}
    env = example["singleuser"]["extraEnv"]
    assert env == {"SANDBOX_KERNEL_BACKEND": "hub", "SANDBOX_KERNEL_HUB_URL": f"http://proxy-public/services/{name}/"}
    # the prefix the kernel calls is the one the service serves
    service_env = {e["name"]: e.get("value") for e in container_of(deployment)["env"]}
    assert urlparse(env["SANDBOX_KERNEL_HUB_URL"]).path == service_env["JUPYTERHUB_SERVICE_PREFIX"]
    assert service_env["JUPYTERHUB_SERVICE_NAME"] == name
    # no Kubernetes identity for user servers, and no ConfigMap for them either
    assert example["singleuser"].get("serviceAccountName") is None
    assert "storage" not in example["singleuser"]
    # the proxy's extra egress rule selects the service's pods on its port
    (rule,) = example["proxy"]["chp"]["networkPolicy"]["egress"]
    assert rule["to"][0]["podSelector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert rule["ports"] == [{"protocol": "TCP", "port": service["spec"]["ports"][0]["port"]}]


def test_hub_example_env_configures_the_kernels_hub_backend(monkeypatch):
    from sandbox_kernel.hub.backend import HubBackend

    for key, value in hub_example()["singleuser"]["extraEnv"].items():
        monkeypatch.setenv(key, value)
    assert HubBackend().service_url == "http://proxy-public/services/sandbox/"


def test_hub_example_kubernetes_pieces_are_valid(validate_object):
    singleuser = hub_example()["singleuser"]
    validate_object({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": "singleuser", "namespace": NAMESPACE},
                     "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": singleuser["networkPolicy"]["egress"]}})
    validate_object({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": "proxy", "namespace": NAMESPACE},
                     "spec": {"podSelector": {}, "policyTypes": ["Egress"],
                              "egress": hub_example()["proxy"]["chp"]["networkPolicy"]["egress"]}})
