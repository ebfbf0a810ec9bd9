"""The local cluster itself (scripts/cluster.sh): a pod runs, CoreDNS answers, kube-router
enforces NetworkPolicy. Cluster admin here on purpose: this checks the test bed, not the
backend (the backend's tests authenticate as the chart's kernel ServiceAccount).
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

pytestmark = pytest.mark.cluster

#: how long a change may take to be programmed (kube-router syncs on events, but two
#: CPU-bound processes may run beside the tests); checks poll, they never sleep blindly
SETTLE = 90


def _apply(cluster, *objects: dict) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                         "items": list(objects)}))


def _probe_pod(cluster, namespace: str, name: str, script: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "enableServiceLinks": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "runAsGroup": 65534,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "probe", "image": cluster.probe_image, "imagePullPolicy": "Never",
                "args": ["sh", "-c", script],
                "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


def _deny_all(namespace: str, *types: str) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny-" + "-".join(t.lower() for t in types), "namespace": namespace},
            "spec": {"podSelector": {}, "policyTypes": list(types)}}


def _allow_dns(namespace: str) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "allow-dns", "namespace": namespace},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{
                "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
                "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}}


class Client:
    """Runs busybox commands in the client pod."""

    def __init__(self, cluster, namespace: str):
        self.cluster, self.namespace = cluster, namespace

    def run(self, *argv: str) -> tuple[int, str]:
        proc = self.cluster.kubectl("exec", "-n", self.namespace, "client", "--", "busybox", *argv,
                                    check=False, timeout=60)
        return proc.returncode, proc.stdout + proc.stderr

    def resolves(self, name: str) -> str | None:
        """The first address CoreDNS gives for ``name``, or None."""
        code, out = self.run("nslookup", name)
        answers = out.split("Name:", 1)[1] if "Name:" in out else ""
        addresses = [line.split()[-1] for line in answers.splitlines() if line.startswith("Address")]
        return addresses[0] if code == 0 and addresses else None

    def web(self, host: str, port: int = 8080) -> bool:
        """An HTTP GET to the server pod (busybox nc: its static wget crashes without NSS)."""
        code, out = self.run("sh", "-c", f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 3 {host} {port}")
        return "hello-from-server" in out

    def tcp(self, ip: str, port: int) -> bool:
        code, out = self.run("nc", "-w", "3", ip, str(port))
        return "hello from test host" in out


def _eventually(what: str, check) -> None:
    deadline = time.monotonic() + SETTLE
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"still not {what} after {SETTLE}s")
        time.sleep(1)


@pytest.fixture
def smoke_namespaces(local_cluster):
    suffix = uuid.uuid4().hex[:6]
    names = (f"skc-smoke-server-{suffix}", f"skc-smoke-client-{suffix}")
    for name in names:
        local_cluster.kubectl("create", "namespace", name)
    yield names
    for name in names:
        local_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_pod_dns_and_network_policy(local_cluster, smoke_namespaces, test_host):
    cluster = local_cluster
    server_ns, client_ns = smoke_namespaces
    host = test_host()
    _apply(cluster,
           _probe_pod(cluster, server_ns, "server",
                      "busybox mkdir -p /tmp/www && echo hello-from-server > /tmp/www/index.html"
                      " && exec busybox httpd -f -p 8080 -h /tmp/www"),
           {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": server_ns},
            "spec": {"selector": {"app": "server"}, "ports": [{"port": 8080, "protocol": "TCP"}]}},
           _probe_pod(cluster, client_ns, "client", "exec busybox sleep 86400"))
    for namespace, name in ((server_ns, "server"), (client_ns, "client")):
        cluster.kubectl("wait", "-n", namespace, "--for=condition=Ready", f"pod/{name}", "--timeout=180s",
                        timeout=200)
    pod = json.loads(cluster.kubectl("get", "-n", client_ns, "pod/client", "-o", "json").stdout)
    assert pod["spec"]["nodeName"] == cluster.node_name
    assert pod["status"]["podIP"].startswith("10.244.")

    client = Client(cluster, client_ns)
    service = f"web.{server_ns}.svc.cluster.local"
    # before any policy: CoreDNS answers, the Service and the test host are reachable
    assert client.resolves("kubernetes.default.svc.cluster.local") == "10.96.0.1"
    service_ip = json.loads(cluster.kubectl("get", "-n", server_ns, "svc/web", "-o", "json").stdout)["spec"]["clusterIP"]
    assert client.resolves(service) == service_ip
    # the Service's endpoints reach kube-proxy's rules a moment after the pod is Ready
    _eventually("the server through its Service", lambda: client.web(service))
    seen = host.seen()
    assert client.tcp(host.ip, host.port)
    assert host.seen() == seen + 1

    # default deny for the client's egress: nothing leaves, not even DNS
    _apply(cluster, _deny_all(client_ns, "Egress"))
    _eventually("blocked by the egress default-deny", lambda: not client.web(service_ip))
    assert not client.tcp(host.ip, host.port)
    assert client.resolves("kubernetes.default.svc.cluster.local") is None

    # DNS to CoreDNS (selected by its k8s-app: kube-dns label) allowed; the rest stays closed
    _apply(cluster, _allow_dns(client_ns))
    _eventually("resolving after allowing DNS",
                lambda: client.resolves("kubernetes.default.svc.cluster.local") == "10.96.0.1")
    assert not client.web(service_ip)
    seen = host.seen()
    assert not client.tcp(host.ip, host.port)
    assert host.seen() == seen

    # egress open again, the server's namespace denies ingress: the test host is reachable,
    # the server is not
    _apply(cluster, _deny_all(server_ns, "Ingress"))
    cluster.kubectl("delete", "-n", client_ns, "networkpolicy", "--all")
    _eventually("reaching the test host after deleting the egress policies",
                lambda: client.tcp(host.ip, host.port))
    _eventually("blocked by the server's ingress default-deny",
                lambda: not client.web(service_ip))
