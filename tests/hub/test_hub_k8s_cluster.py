"""Hub mode on the REAL cluster (scripts/cluster.sh): the chart installed in hub mode with the
Helm CLI built here runs the sandbox service in a pod, as the chart's hub ServiceAccount (its
in-cluster token; no other credential), with the image scripts/cluster-images.sh builds
(``hub``: Debian's python3 + this checkout's sandbox-kernel[kubernetes,hub]). A real JupyterHub
(as in the other hub tests) runs on this machine, its API on the node address so the service's
pod can ask it about tokens; the hub's proxy routes ``/services/sandbox/`` to the service's
Kubernetes Service. Kernels act as in tests/hub: a Session over a HubBackend with each user's
token, through the hub's proxy.

Covered: ``helm install`` in hub mode ends with the service Ready (the Deployment, its state
volume bound, the health check answered through the hub); alice's and bob's sandboxes are
separate pods in separate namespaces, each namespace's RoleBinding names the service's
account; bob's token cannot read, change, interrupt or stop alice's sandbox; alice's sandbox
cannot connect to bob's pod (kube-router enforcing NetworkPolicy; the node can, which shows
the listener is up); a change beyond the ceiling (bob's pod address: a cluster range; the
metadata address) is refused, audited and leaves alice's NetworkPolicy as it was, while one
within it becomes her NetworkPolicy.

The cluster administrator's kubeconfig only installs the chart, provides the state volume
(a hostPath PersistentVolume: the cluster has no provisioner), inspects and cleans up.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parents[2]
#: the first test may build the hub image (about 5 minutes cold, 1.5 when only the code changed)
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1200)]

_K8S_TESTS = str(Path(__file__).resolve().parents[1] / "kubernetes")
if _K8S_TESTS not in sys.path:
    sys.path.append(_K8S_TESTS)  # realcluster.py (appended: never shadows this directory's conftest)

RELEASE, NAMESPACE = "skhub", "skci-hubmode"
FULLNAME = f"{RELEASE}-sandbox-kernel"
HUB_SA = f"{FULLNAME}-hub"                 # the chart's hub ServiceAccount, Deployment and Service
PREFIX = "skhub-u-"                         # the users' namespaces: skhub-u-alice, skhub-u-bob
HUB_IMAGE = os.environ.get("SANDBOX_KERNEL_CLUSTER_HUB_IMAGE", "sandbox-kernel.local/hub:cluster")
SANDBOX_IMAGE = os.environ.get("SANDBOX_KERNEL_CLUSTER_SANDBOX_IMAGE", "sandbox-kernel.local/sandbox:cluster")
STATE_CLASS = "skhub-state"                 # a class name no provisioner serves: only our PV binds



def _connect(ip: str, port: int) -> str:
    """A cell: a TCP connection with the agent's advisory guard off, so only the network decides."""
    return ("import socket\nimport sandbox_agent.guard as _g\n_g.enabled = False\n"
            f"try:\n    c = socket.create_connection(({ip!r}, {port}), timeout=3); print('REPLY', c.recv(10))\n"
            "except OSError as e:\n    print('FAILED', type(e).__name__)\nfinally:\n    _g.enabled = True\n")


def _image_on_node(local_cluster, image: str, wait: float = 60) -> bool:
    """The kubelet lists the node's images in its status (refreshed every few seconds)."""
    deadline = time.monotonic() + wait
    while True:
        names = local_cluster.kubectl("get", "node", local_cluster.node_name, "-o",
                                      "jsonpath={.status.images[*].names}").stdout
        if image in names:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(2)


@pytest.fixture(scope="module")
def cluster_hub(local_cluster, hub_kit, tmp_path_factory):
    """The chart in hub mode on the cluster, a JupyterHub on this machine registering its
    service; yields what the tests need. Everything is removed afterwards."""
    from kubernetes import client

    from realcluster import admin_client, delete_namespace, helm, wait_for

    # the service's image of this checkout: built (or found current) and imported into the cluster
    built = subprocess.run(["bash", str(ROOT / "scripts" / "cluster-hub-image.sh"), "build"], capture_output=True,
                           text=True, timeout=1100, env={**os.environ, "SANDBOX_KERNEL_CLUSTER_HUB_IMAGE": HUB_IMAGE})
    if built.returncode != 0:
        pytest.fail("scripts/cluster-hub-image.sh build failed:\n" + "\n".join(built.stderr.splitlines()[-15:]),
                    pytrace=False)
    if not _image_on_node(local_cluster, HUB_IMAGE):
        pytest.fail(f"the hub image {HUB_IMAGE} was built but the node does not list it", pytrace=False)
    admin = str(local_cluster.kubeconfig)
    api = admin_client(admin)
    core = client.CoreV1Api(api)
    tmp = tmp_path_factory.mktemp("hubk8s")
    os.chmod(tmp, 0o755)
    (tmp / "hub").mkdir(mode=0o700)
    hub = hub_kit.Hub(tmp / "hub")
    hub.service_token = secrets.token_hex(16)
    node = local_cluster.node_ip
    hub.api_url = f"http://{node}:{hub.hub_port}/hub/api"  # where the service's pod asks about tokens
    state = tmp / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 1000, 1000)  # the service runs as 1000:1000; a hostPath volume ignores fsGroup
    pv = f"skhub-state-{secrets.token_hex(3)}"
    state_claim = f"{HUB_SA}-state"
    installed = False
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
        core.create_namespaced_secret(NAMESPACE, client.V1Secret(
            metadata=client.V1ObjectMeta(name="hub-token"), string_data={"token": hub.service_token}))
        core.create_persistent_volume(client.V1PersistentVolume(
            metadata=client.V1ObjectMeta(name=pv),
            spec=client.V1PersistentVolumeSpec(
                capacity={"storage": "1Gi"}, access_modes=["ReadWriteOnce"], storage_class_name=STATE_CLASS,
                persistent_volume_reclaim_policy="Retain", host_path=client.V1HostPathVolumeSource(path=str(state)),
                claim_ref=client.V1ObjectReference(namespace=NAMESPACE, name=state_claim))))
        values = {
            "serviceAccount": {"create": False},  # hub mode: user servers get no account
            "sandbox": {"image": {"name": SANDBOX_IMAGE.rpartition(":")[0], "tag": SANDBOX_IMAGE.rpartition(":")[2],
                                  "pullPolicy": "Never"},
                        "namespaceTemplate": PREFIX + "{slug}", "requests": {"cpu": "50m", "memory": "128Mi"}},
            "hub": {"enabled": True, "image": {"name": HUB_IMAGE.rpartition(":")[0], "tag": HUB_IMAGE.rpartition(":")[2],
                                               "pullPolicy": "Never"},
                    "apiTokenSecret": "hub-token", "hubApiUrl": hub.api_url, "adminGroups": ["staff"],
                    "stateVolume": {"storageClass": STATE_CLASS},
                    "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}},
        }
        values_file = tmp / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        started = time.monotonic()
        installed = True
        helm(admin, "upgrade", "--install", RELEASE, str(ROOT / "helm" / "sandbox-kernel"),
             "--namespace", NAMESPACE, "-f", str(values_file), "--wait", "--timeout", "240s")
        install_took = time.monotonic() - started
        service_ip = core.read_namespaced_service(HUB_SA, NAMESPACE).spec.cluster_ip
        service_url = f"http://{service_ip}:10101"
        # the hub's API on the node address (the pod reaches it there), its entry for the
        # service pointing at the service's Kubernetes Service, with the Secret's token
        base_config = hub.config

        def config(chp: str) -> str:
            return base_config(chp) + f"""
c.JupyterHub.hub_ip = {node!r}
for _service in c.JupyterHub.services:
    if _service["name"] == {hub_kit.SERVICE!r}:
        _service["url"] = {service_url!r}
"""

        hub.config = config
        hub.start(hub_kit.chp(tmp))
        svc = SimpleNamespace(hub=hub, proxied_url=f"{hub.public_url}/services/{hub_kit.SERVICE}/",
                              url=f"{service_url}/services/{hub_kit.SERVICE}/")
        kernels = hub_kit.Kernels(svc)
        yield SimpleNamespace(hub=hub, svc=svc, kernels=kernels, admin=admin, api=api, core=core, cluster=local_cluster,
                              install_took=install_took, service_url=service_url)
        kernels.close()
    finally:
        hub.stop()
        if installed:
            helm(admin, "uninstall", RELEASE, "--namespace", NAMESPACE, "--wait", "--timeout", "120s", check=False)
        for ns in core.list_namespace().items:
            if ns.metadata.name.startswith(PREFIX):
                delete_namespace(admin, ns.metadata.name)
        delete_namespace(admin, NAMESPACE, wait=120)  # the state claim (kept by the chart) goes with it
        try:
            core.delete_persistent_volume(pv)
        except client.exceptions.ApiException:
            pass
        wait_for("the state volume to be released", lambda: not [
            v for v in core.list_persistent_volume().items if v.metadata.name == pv], timeout=60)
        shutil.rmtree(state, ignore_errors=True)


def _api(ch, method: str, path: str, user: str, **kw) -> requests.Response:
    return requests.request(method, ch.svc.proxied_url + path, timeout=60,
                            headers={"Authorization": f"token {ch.hub.tokens[user]}"}, **kw)


def test_helm_install_in_hub_mode_ends_with_the_service_ready(cluster_hub, tmp_path):
    from kubernetes import client

    from realcluster import may, service_account_kubeconfig, whoami

    ch = cluster_hub
    print(f"helm install (hub mode) → Ready in {ch.install_took:.1f} s")
    deployment = client.AppsV1Api(ch.api).read_namespaced_deployment(HUB_SA, NAMESPACE)
    assert deployment.status.ready_replicas == 1, deployment.status
    pod, = [p for p in ch.core.list_namespaced_pod(NAMESPACE).items if not p.metadata.deletion_timestamp]
    assert pod.spec.service_account_name == HUB_SA
    assert pod.spec.containers[0].image == HUB_IMAGE
    assert all(c.ready for c in pod.status.container_statuses)
    claim = ch.core.read_namespaced_persistent_volume_claim(f"{HUB_SA}-state", NAMESPACE)
    assert claim.status.phase == "Bound"
    # the kernels' role is bound to the service's account, and to nothing else
    binding = client.RbacAuthorizationV1Api(ch.api).read_cluster_role_binding(f"{FULLNAME}-kernel")
    assert [(s.kind, s.name, s.namespace) for s in binding.subjects] == [("ServiceAccount", HUB_SA, NAMESPACE)]
    # what that account may do: create user namespaces, and nothing namespaced outside them
    as_service = str(service_account_kubeconfig(ch.admin, NAMESPACE, HUB_SA, tmp_path / "hub.kubeconfig", 600))
    assert whoami(as_service) == f"system:serviceaccount:{NAMESPACE}:{HUB_SA}"
    assert may(as_service, "create", "namespaces")
    for verb, resource, namespace, sub in [("create", "pods", "kube-system", None), ("get", "secrets", NAMESPACE, None),
                                           ("create", "pods", "default", "exec"), ("list", "pods", None, None)]:
        assert not may(as_service, verb, resource, namespace, subresource=sub), (verb, resource, namespace, sub)
    # answered through the hub's proxy, and the service knows the users' tokens through the hub
    assert requests.get(ch.svc.proxied_url + "api/health", timeout=30).json() == {"ok": True}
    ceiling = _api(ch, "GET", "api/ceiling", "alice")
    assert ceiling.status_code == 200, ceiling.text
    assert requests.get(ch.svc.proxied_url + "api/ceiling", timeout=30).status_code == 401


def test_two_users_are_isolated_and_a_change_beyond_the_ceiling_is_refused(cluster_hub):
    import socket

    from kubernetes import client

    from sandbox_kernel.policy.admin import CeilingRefused
    from sandbox_kernel.policy.model import EgressPolicy
    from realcluster import LISTEN, wait_for

    ch = cluster_hub
    kernels = ch.kernels
    alice = kernels.open("alice", timeout=300)
    bob = kernels.open("bob", timeout=300)
    a_id, b_id = alice.backend.sandbox_id, bob.backend.sandbox_id
    assert a_id != b_id

    # cells run in each user's own interpreter
    result, out = kernels.execute(alice, "secret = 'alice-only'\nprint('alice ok')", timeout=120)
    assert result.exit_status == 0 and out.stdout() == "alice ok\n", out.frames
    result, out = kernels.execute(bob, "print(globals().get('secret'))", timeout=120)
    assert result.exit_status == 0 and out.stdout() == "None\n", out.frames

    # two pods, in two namespaces, each the one the service reports for that user
    details = {user: _api(ch, "GET", f"api/sandboxes/{sid}", user).json() for user, sid in (("alice", a_id), ("bob", b_id))}
    pods = {}
    for user in ("alice", "bob"):
        namespace = PREFIX + user
        assert details[user]["details"]["namespace"] == namespace, details[user]
        live = [p for p in ch.core.list_namespaced_pod(namespace).items if not p.metadata.deletion_timestamp]
        assert [p.metadata.name for p in live] == [details[user]["details"]["pod"]]
        pods[user] = live[0]
        # the namespaced rights there are the service account's, by the RoleBinding the backend made
        rb = client.RbacAuthorizationV1Api(ch.api).read_namespaced_role_binding("sandbox-kernel", namespace)
        assert [(s.kind, s.name, s.namespace) for s in rb.subjects] == [("ServiceAccount", HUB_SA, NAMESPACE)]
        assert rb.role_ref.name == f"{FULLNAME}-sandbox"
    assert pods["alice"].metadata.namespace != pods["bob"].metadata.namespace

    # bob's token reaches nothing of alice's sandbox (404, as for one that does not exist)
    wide = {"policy": {"mode": "allowlist", "entries": ["9.9.9.9:443/tcp"]}}
    assert _api(ch, "GET", f"api/sandboxes/{a_id}", "bob").status_code == 404
    assert _api(ch, "PUT", f"api/sandboxes/{a_id}/policy", "bob", json=wide).status_code == 404
    assert _api(ch, "POST", f"api/sandboxes/{a_id}/interrupt", "bob").status_code == 404
    assert _api(ch, "DELETE", f"api/sandboxes/{a_id}", "bob").status_code == 404
    assert a_id not in {s["id"] for s in _api(ch, "GET", "api/sandboxes", "bob").json()["sandboxes"]}
    result, out = kernels.execute(alice, "print(secret)", timeout=120)
    assert out.stdout() == "alice-only\n", out.frames  # still running, untouched

    # alice's sandbox cannot connect to bob's pod; the node can (the listener is up)
    result, out = kernels.execute(bob, LISTEN, timeout=120)
    assert out.stdout() == "listening\n", out.frames
    bob_ip = ch.core.read_namespaced_pod(pods["bob"].metadata.name, PREFIX + "bob").status.pod_ip
    result, out = kernels.execute(alice, _connect(bob_ip, 8000), timeout=120)
    assert out.stdout().startswith("FAILED"), out.stdout()
    with socket.create_connection((bob_ip, 8000), timeout=10) as conn:
        assert conn.recv(2) == b"hi"
    result, out = kernels.execute(bob, "print(len(accepted))", timeout=120)
    assert out.stdout() == "1\n", out.stdout()  # only the node's connection got in

    # a change beyond the ceiling: refused by the service, audited, nothing applied
    net = client.NetworkingV1Api(ch.api)

    def cidrs(user: str) -> set[str]:
        """The ipBlocks of the egress NetworkPolicy of the user's pod (none yet: empty)."""
        try:
            policy = net.read_namespaced_network_policy(f"{pods[user].metadata.name}-egress", PREFIX + user)
        except client.exceptions.ApiException as err:
            assert err.status == 404, err
            return set()
        return {peer.ip_block.cidr for rule in policy.spec.egress or [] for peer in rule.to or [] if peer.ip_block}

    before = cidrs("alice")
    for entry in (f"{bob_ip}:8000/tcp", "169.254.169.254:80/tcp"):
        with pytest.raises(CeilingRefused) as refused:
            kernels.run(alice.backend.apply_policy(EgressPolicy(mode="allowlist", entries=(entry,))), 60)
        print(f"{entry}: {refused.value}")
    assert cidrs("alice") == before and f"{bob_ip}/32" not in before
    records = _api(ch, "GET", "api/audit?user=alice", "teacher").json()["events"]
    refusals = [r for r in records if r.get("event") == "policy" and r.get("result") == "refused"]
    assert len(refusals) >= 2, json.dumps(records[-5:], indent=1)
    assert any(bob_ip in json.dumps(r) for r in refusals)
    result, out = kernels.execute(alice, _connect(bob_ip, 8000), timeout=120)
    assert out.stdout().startswith("FAILED"), out.stdout()

    # a change within it becomes her pod's NetworkPolicy (and only hers)
    kernels.run(alice.backend.apply_policy(EgressPolicy(mode="allowlist", entries=("9.9.9.9:443/tcp",))), 60)
    wait_for("alice's NetworkPolicy to open 9.9.9.9", lambda: "9.9.9.9/32" in cidrs("alice"), timeout=30)
    assert "9.9.9.9/32" not in cidrs("bob")


def test_the_service_restarted_in_its_pod_adopts_the_running_sandbox(cluster_hub):
    """`kubectl rollout restart` of the service (Recreate: the old pod ends first): the
    sandbox pod outlives it, the new service process adopts it from the state volume, and the
    kernel's next cell runs in the same interpreter.

    While the Service has no endpoint, what answers the kernel's status polls is not the
    service: the hub's proxy (503, an HTML page) and, on this machine, a gateway beyond it
    (403, "resolve_deny: denied destination", plain text). The kernel gave up at that 403 as
    if the service had refused its token (3 of 5 runs); it now takes only the service's own
    JSON refusals as final."""
    ch = cluster_hub
    kernels = ch.kernels
    alice = kernels.open("alice", timeout=300)
    sid = alice.backend.sandbox_id
    result, out = kernels.execute(alice, "kept = 41\nprint('set')", timeout=120)
    assert out.stdout() == "set\n", out.frames
    sandbox_pod = _api(ch, "GET", f"api/sandboxes/{sid}", "alice").json()["details"]["pod"]
    old_service, = [p.metadata.name for p in ch.core.list_namespaced_pod(NAMESPACE).items]

    stream = alice.backend._transport._ws

    def restart():
        ch.cluster.kubectl("rollout", "restart", f"deployment/{HUB_SA}", "-n", NAMESPACE)
        ch.cluster.kubectl("rollout", "status", f"deployment/{HUB_SA}", "-n", NAMESPACE, "--timeout=180s", timeout=200)

    async def restart_while_the_kernel_runs() -> float:
        # the kernel's event loop runs meanwhile, as a real kernel's does: its reader sees the
        # stream end and re-opens it once the new service process has adopted the pod
        started = time.monotonic()
        await asyncio.to_thread(restart)
        while alice.backend._transport._ws is stream:
            if time.monotonic() - started > 240:
                sandboxes = await asyncio.to_thread(lambda: _api(ch, "GET", "api/sandboxes", "alice").text)
                logs = await asyncio.to_thread(lambda: ch.cluster.kubectl(
                    "logs", f"deployment/{HUB_SA}", "-n", NAMESPACE, "--tail=60", check=False).stdout)
                raise AssertionError(f"the kernel did not re-open its stream (its sandbox {sid} started at "
                                     f"{alice.backend.started}); the service says {sandboxes}\n{logs}")
            await asyncio.sleep(0.1)
        return time.monotonic() - started

    took = kernels.run(restart_while_the_kernel_runs(), 300)
    print(f"rollout restart → adopted, the kernel's stream re-opened in {took:.1f} s")
    assert _api(ch, "GET", f"api/sandboxes/{sid}", "alice").json()["state"] == "running"
    new_service = [p.metadata.name for p in ch.core.list_namespaced_pod(NAMESPACE).items
                   if not p.metadata.deletion_timestamp]
    assert new_service and old_service not in new_service
    result, out = kernels.execute(alice, "print(kept + 1)", timeout=120)
    assert result.exit_status == 0 and out.stdout() == "42\n", out.frames  # the same interpreter
    assert _api(ch, "GET", f"api/sandboxes/{sid}", "alice").json()["details"]["pod"] == sandbox_pod
    live = [p.metadata.name for p in ch.core.list_namespaced_pod(PREFIX + "alice").items if not p.metadata.deletion_timestamp]
    assert sandbox_pod in live
    events = _api(ch, "GET", "api/audit?user=alice", "teacher").json()["events"]
    assert any(e.get("action") == "adopt" and e.get("sandbox") == sid for e in events), events[-5:]
