"""Helpers for the tests on the real one-node cluster (scripts/cluster.sh).

The cluster administrator's kubeconfig is used for set-up only: installing the Helm chart,
minting a token for the chart's kernel ServiceAccount (TokenRequest API), routing test
hosts and cleaning up. Everything under test authenticates with that token.
(A module of its own, not conftest.py; see tests/kerneltest.py for why.)
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "sandbox-kernel"
CACHE = Path(os.environ.get("SANDBOX_KERNEL_CLUSTER_CACHE", "/var/cache/sandbox-kernel/cluster"))
HELM = CACHE / "bin" / "helm"
#: the sandbox image scripts/cluster-images.sh builds (Debian python3 + IPython, uid 1000)
SANDBOX_IMAGE = os.environ.get("SANDBOX_KERNEL_CLUSTER_SANDBOX_IMAGE", "sandbox-kernel.local/sandbox:cluster")
#: where the tests install the chart, and its release name
CHART_NAMESPACE = "skci-chart"
RELEASE = "skci"
#: the chart's ServiceAccount for kernels: <release>-sandbox-kernel
KERNEL_SA = f"{RELEASE}-sandbox-kernel"
#: the chart's ServiceAccount of the gc CronJob
GC_SA = f"{RELEASE}-sandbox-kernel-gc"
#: what the tests install: gc on (its CronJob never fires during a run; the tests run
#: `sandbox-kernel gc` themselves with the gc account's token)
CHART_VALUES = {"gc.enabled": "true", "gc.schedule": "0 0 1 1 *",
                "gc.image.name": SANDBOX_IMAGE.rpartition(":")[0], "gc.image.tag": SANDBOX_IMAGE.rpartition(":")[2]}
#: the cluster's own ranges (scripts/cluster.sh): pods, services, the node address
CLUSTER_RANGES = "10.244.0.0/16 10.96.0.0/16 10.245.0.1/32"


#: a cell that serves TCP 8000 in a sandbox pod (greets, records who connected in `accepted`)
LISTEN = """
import socket, threading
accepted = []
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(('0.0.0.0', 8000)); srv.listen(8)
def serve():
    while True:
        c, peer = srv.accept(); accepted.append(peer[0]); c.sendall(b'hi'); c.close()
threading.Thread(target=serve, daemon=True).start()
print('listening')
"""

def admin_client(admin_kubeconfig: str):
    from kubernetes import config

    return config.new_client_from_config(config_file=admin_kubeconfig)


def helm(admin_kubeconfig: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the Helm CLI built by scripts/cluster-images.sh as the cluster administrator."""
    env = {**os.environ, "KUBECONFIG": admin_kubeconfig, "HELM_CACHE_HOME": str(CACHE / "helm" / "cache"),
           "HELM_CONFIG_HOME": str(CACHE / "helm" / "config"), "HELM_DATA_HOME": str(CACHE / "helm" / "data")}
    done = subprocess.run([str(HELM), *args], capture_output=True, text=True, env=env, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def install_chart(admin_kubeconfig: str, release: str = RELEASE, namespace: str = CHART_NAMESPACE,
                  values: dict | None = None, wait: bool = True) -> subprocess.CompletedProcess:
    """``helm upgrade --install`` the chart with the test cluster's sandbox image."""
    name, _, tag = SANDBOX_IMAGE.rpartition(":")
    sets = {"sandbox.image.name": name, "sandbox.image.tag": tag, **(CHART_VALUES if values is None else values)}
    args = ["upgrade", "--install", release, str(CHART), "--namespace", namespace, "--create-namespace"]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    if wait:
        args += ["--wait", "--timeout", "120s"]
    return helm(admin_kubeconfig, *args)


def service_account_kubeconfig(admin_kubeconfig: str, namespace: str, account: str, out: Path,
                               seconds: int = 3 * 3600) -> Path:
    """A kubeconfig holding a TokenRequest token of ``namespace/account`` (nothing else)."""
    from kubernetes import client

    api = admin_client(admin_kubeconfig)
    request = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
        audiences=[], expiration_seconds=seconds))
    token = client.CoreV1Api(api).create_namespaced_service_account_token(account, namespace, request).status.token
    admin = yaml.safe_load(Path(admin_kubeconfig).read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin.get("current-context")) \
        if admin.get("current-context") else admin["contexts"][0]
    cluster = next(c for c in admin["clusters"] if c["name"] == context["context"]["cluster"])["cluster"]
    cluster = dict(cluster)
    if "certificate-authority" in cluster:  # inline it: the file may be relative to the admin kubeconfig
        ca = Path(admin_kubeconfig).parent / cluster.pop("certificate-authority")
        cluster["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "kernel",
        "clusters": [{"name": "test-cluster", "cluster": cluster}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "kernel", "context": {"cluster": "test-cluster", "user": account}}],
    }
    out.write_text(yaml.safe_dump(config))
    out.chmod(0o600)
    return out


def whoami(kubeconfig: str) -> str:
    """The user name the API server sees for ``kubeconfig`` (SelfSubjectReview)."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=kubeconfig)
    review = client.AuthenticationV1Api(api).create_self_subject_review(client.V1SelfSubjectReview())
    return review.status.user_info.username


def may(kubeconfig: str, verb: str, resource: str, namespace: str | None = None, group: str = "",
        subresource: str | None = None, name: str | None = None) -> bool:
    """SelfSubjectAccessReview as the identity of ``kubeconfig`` (``name``: one object)."""
    from kubernetes import client, config

    api = config.new_client_from_config(config_file=kubeconfig)
    attrs = client.V1ResourceAttributes(verb=verb, resource=resource, namespace=namespace, group=group,
                                        subresource=subresource, name=name)
    review = client.AuthorizationV1Api(api).create_self_subject_access_review(
        client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attrs)))
    return bool(review.status.allowed)


def chart_kernel_config(admin_kubeconfig: str, out_dir: Path, namespace: str = CHART_NAMESPACE) -> Path:
    """The chart's kernel configuration (its ConfigMap's ``sandbox_kernel_config.json``)
    written into ``out_dir``, a Jupyter config directory (``JUPYTER_CONFIG_DIR``): a
    kernel, ``gc`` or ``doctor`` run with it is configured as the chart configures them."""
    from kubernetes import client

    for cm in client.CoreV1Api(admin_client(admin_kubeconfig)).list_namespaced_config_map(namespace).items:
        text = (cm.data or {}).get("sandbox_kernel_config.json")
        if text:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "sandbox_kernel_config.json").write_text(text)
            return out_dir
    raise AssertionError(f"no ConfigMap with sandbox_kernel_config.json in {namespace}: is the chart installed?")


def delete_namespace(admin_kubeconfig: str, namespace: str, wait: float = 0) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(admin_client(admin_kubeconfig))
    try:
        core.delete_namespace(namespace)
    except ApiException as err:
        if err.status != 404:
            raise
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            core.read_namespace(namespace)
        except ApiException:
            return
        time.sleep(0.5)


def pods(admin_kubeconfig: str, namespace: str) -> list[dict]:
    """Live (not terminating) pods of a namespace, as dicts."""
    from kubernetes import client

    api = admin_client(admin_kubeconfig)
    items = client.CoreV1Api(api).list_namespaced_pod(namespace).items
    return [api.sanitize_for_serialization(p) for p in items if not p.metadata.deletion_timestamp]


def wait_for(what: str, predicate, timeout: float = 60, interval: float = 0.2):
    """Poll ``predicate`` until it returns a truthy value; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def dump(obj) -> str:
    return json.dumps(obj, indent=1, default=str)
