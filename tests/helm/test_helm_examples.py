"""helm/examples/z2jh-values.yaml fits the chart it goes with and holds valid Kubernetes pieces."""

from __future__ import annotations

import yaml

from helm_testlib import EXAMPLES, NAMESPACE, requires_helm

pytestmark = requires_helm

EXAMPLE = EXAMPLES / "z2jh-values.yaml"


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def rendered_as_documented(helm_chart) -> list[dict]:
    """The chart installed as the example's header says: release "sandbox-kernel"."""
    files = helm_chart.render({}, name="sandbox-kernel", namespace=NAMESPACE, is_install=True)
    return [d for p, t in files.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]


def test_names_match_what_the_chart_creates(helm_chart):
    objects = rendered_as_documented(helm_chart)
    singleuser = example()["singleuser"]
    (account,) = [o for o in objects if o["kind"] == "ServiceAccount"]
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    assert singleuser["serviceAccountName"] == account["metadata"]["name"]
    (volume,) = singleuser["storage"]["extraVolumes"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    (mount,) = singleuser["storage"]["extraVolumeMounts"]
    assert mount["name"] == volume["name"] and "subPath" not in mount


def test_the_config_lands_where_the_kernel_reads_it():
    from IPython.core.application import SYSTEM_CONFIG_DIRS

    from sandbox_kernel.kernelapp import SandboxKernelApp

    (mount,) = example()["singleuser"]["storage"]["extraVolumeMounts"]
    assert mount["mountPath"] in SYSTEM_CONFIG_DIRS
    assert SandboxKernelApp().config_file_name.rsplit(".", 1)[0] + ".json" == "sandbox_kernel_config.json"
    assert example()["singleuser"]["extraEnv"]["SANDBOX_KERNEL_BACKEND"] == "kubernetes"


def test_kubernetes_pieces_are_valid(validate_object):
    singleuser = example()["singleuser"]
    egress = [yaml.safe_load(yaml.safe_dump(rule).replace("<API_SERVER_IP>", "203.0.113.10"))
              for rule in singleuser["networkPolicy"]["egress"]]
    validate_object({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": "singleuser", "namespace": NAMESPACE},
                     "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": egress}})
    assert {"protocol": "TCP", "port": 443} in egress[0]["ports"]
    validate_object({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "jupyter-alice"},
                     "spec": {"serviceAccountName": singleuser["serviceAccountName"],
                              "volumes": singleuser["storage"]["extraVolumes"],
                              "containers": [{"name": "notebook", "image": "x",
                                              "volumeMounts": singleuser["storage"]["extraVolumeMounts"]}]}})


def test_nothing_but_the_sandbox_kernel_runs_user_code_in_the_server():
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_server.serverapp import ServerApp
    from traitlets.config import Config

    config = Config(example()["singleuser"]["extraFiles"]["sandbox-only"]["data"])
    assert ServerApp(config=config).terminals_enabled is False
    assert KernelSpecManager(config=config).allowed_kernelspecs == {"sandbox"}
