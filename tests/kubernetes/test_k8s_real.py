"""The Kubernetes backend on the REAL one-node cluster of scripts/cluster.sh.

Real kube-apiserver (RBAC, Pod Security admission), kubelet, containerd, kube-router
enforcing NetworkPolicy, CoreDNS. The Helm chart is installed with the Helm CLI built
by scripts/cluster-images.sh; the kernels, ``gc`` and ``doctor`` authenticate with a
TokenRequest token of the chart's kernel ServiceAccount, never as cluster admin (the
admin kubeconfig only installs the chart, mints the token, routes test hosts and
inspects). Sandbox pods run the image scripts/cluster-images.sh builds from Debian's
packages. Test hosts are network namespaces on this machine (tests/conftest.py,
10.231.0.0/16), which the node routes pod traffic to.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import asyncio
import uuid

import pytest

from kerneltest import CONNECT, KernelDriver
from realcluster import (CHART_NAMESPACE, CLUSTER_RANGES, GC_SA, HELM, KERNEL_SA, LISTEN, SANDBOX_IMAGE, admin_client, delete_namespace, may,
                         pods, service_account_kubeconfig, wait_for, whoami)

from sandbox_kernel.errors import SandboxStartError
from sandbox_kernel.notices import NOTICE_MIME

pytestmark = pytest.mark.cluster


# -- the cluster, the chart and the kernels' identity -----------------------------------------

@pytest.fixture(scope="module")
def cluster_admin(local_cluster):
    """The cluster administrator's kubeconfig (set-up and inspection only, never the identity
    under test)."""
    return str(local_cluster.kubeconfig)


@pytest.fixture(scope="module")
def kernel_kubeconfig(cluster_admin, tmp_path_factory):
    """Install the chart (defaults + the test image), then a kubeconfig with a token of its
    kernel ServiceAccount."""
    from realcluster import install_chart

    install_chart(cluster_admin)
    path = service_account_kubeconfig(cluster_admin, CHART_NAMESPACE, KERNEL_SA,
                                      tmp_path_factory.mktemp("sa") / "kernel.kubeconfig")
    return str(path)


def kernel_env(kubeconfig: str, user: str, **extra: str) -> dict:
    return {"SANDBOX_KERNEL_BACKEND": "kubernetes", "KUBECONFIG": kubeconfig, "KUBERNETES_SERVICE_HOST": "",
            "SANDBOX_KERNEL_USER": user, "SANDBOX_KERNEL_K8S_IMAGE": SANDBOX_IMAGE,
            "SANDBOX_KERNEL_K8S_IMAGE_PULL_POLICY": "Never", "SANDBOX_KERNEL_K8S_START_TIMEOUT": "180",
            "SANDBOX_KERNEL_K8S_REQUESTS": json.dumps({"cpu": "50m", "memory": "128Mi"}),
            "SANDBOX_KERNEL_PROGRESS_DELAY": "0", "SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "any",
            # as the chart configures its kernels: namespaced rights through a RoleBinding per
            # user namespace, to the chart's sandbox role (issue 15 point 1)
            "SANDBOX_KERNEL_K8S_NAMESPACE_ROLE": f"{KERNEL_SA}-sandbox",
            "SANDBOX_KERNEL_K8S_ROLE_SUBJECT": f"ServiceAccount:{CHART_NAMESPACE}:{KERNEL_SA}",
            # the cluster's own ranges stay blocked; the test hosts (10.231.0.0/16) may be allowed
            "SANDBOX_KERNEL_POLICY_CLUSTER_RANGES": CLUSTER_RANGES, **extra}


@pytest.fixture(scope="module")
def gc_kubeconfig(cluster_admin, kernel_kubeconfig, tmp_path_factory):
    """A kubeconfig with a token of the chart's gc ServiceAccount."""
    return str(service_account_kubeconfig(cluster_admin, CHART_NAMESPACE, GC_SA,
                                          tmp_path_factory.mktemp("sa") / "gc.kubeconfig"))


@pytest.fixture(scope="module")
def kernel(cluster_admin, kernel_kubeconfig):
    """One Sandbox kernel on the cluster (jupyter_client), as the chart's ServiceAccount."""
    user = f"ci-{uuid.uuid4().hex[:6]}"
    driver = KernelDriver(kernel_env(kernel_kubeconfig, user))
    driver.user = user
    try:
        yield driver
    finally:
        driver.shutdown()
        for ns in _user_namespaces(cluster_admin, user):
            delete_namespace(cluster_admin, ns)


def _user_namespaces(admin: str, user: str) -> list[str]:
    from kubernetes import client

    items = client.CoreV1Api(admin_client(admin)).list_namespace(
        label_selector=f"sandbox-kernel.io/user={user}").items
    return [n.metadata.name for n in items]


def the_pod(admin: str, user: str) -> dict:
    """The kernel's one live sandbox pod."""
    live = [p for ns in _user_namespaces(admin, user) for p in pods(admin, ns)]
    assert len(live) == 1, [p["metadata"]["name"] for p in live]
    return live[0]


def admin_exec(admin: str, pod: dict, command: list[str]) -> str:
    """Run a command in a sandbox pod as the cluster admin (the outside world)."""
    from kubernetes import client
    from kubernetes.stream import stream

    core = client.CoreV1Api(admin_client(admin))
    return stream(core.connect_get_namespaced_pod_exec, pod["metadata"]["name"], pod["metadata"]["namespace"],
                  command=command, stderr=True, stdin=False, stdout=True, tty=False)


def notices(cell) -> list[dict]:
    by_id = {}
    for out in cell.outputs:
        if out["msg_type"] in ("display_data", "update_display_data") and NOTICE_MIME in out["content"]["data"]:
            by_id[out["content"]["transient"]["display_id"]] = out["content"]["data"][NOTICE_MIME]
    return list(by_id.values())


def connect(kernel, ip, port, *, guard=True, timeout=3, kind="tcp"):
    """Try a connection from the sandbox; with guard=False the agent's advisory guard is off,
    so only the network (kube-router's NetworkPolicy) decides. Returns (reached, cell)."""
    if kind == "udp":
        attempt = (f"s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout({timeout})\n"
                   f"    s.sendto(b'ping', ({ip!r}, {port})); print('REPLY', s.recvfrom(10)[0])")
    else:
        attempt = f"c = socket.create_connection(({ip!r}, {port}), timeout={timeout}); print('REPLY', c.recv(100))"
    code = ("import socket\nimport sandbox_agent.guard as _g\n"
            f"_g.enabled = {bool(guard)}\n"
            f"try:\n    {attempt}\nexcept OSError as e:\n    print('FAILED', type(e).__name__, e)\n"
            "finally:\n    _g.enabled = True")
    cell = kernel.execute(code, timeout=timeout + 60)
    assert cell.status == "ok", cell.reply["content"]
    return "REPLY" in cell.stream(), cell


# -- identity and RBAC --------------------------------------------------------------------------

def test_the_tests_run_as_the_charts_kernel_service_account(kernel_kubeconfig):
    assert whoami(kernel_kubeconfig) == f"system:serviceaccount:{CHART_NAMESPACE}:{KERNEL_SA}"


def _refused(kubeconfig: str, permissions, namespace: str = "user-sandbox-rbac-check") -> list:
    refused = []
    for group, resource, verb in sorted(set(permissions)):
        name, _, sub = resource.partition("/")
        cluster_scoped = name == "namespaces" or group in ("authorization.k8s.io", "apiextensions.k8s.io",
                                                           "node.k8s.io")
        where = None if cluster_scoped else ("kube-system" if name == "daemonsets" else namespace)
        if not may(kubeconfig, verb, name, where, group, sub or None):
            refused.append((group, resource, verb, where))
    return refused


def test_rbac_permits_every_call_of_the_backend_and_gc(kernel_kubeconfig, gc_kubeconfig):
    from sandbox_kernel.backends import kubernetes as kb

    # the kernel identity: everything the backend calls except gc's cluster-wide lists, in a
    # user namespace the backend prepared (namespaced rights come with its RoleBinding there)
    from sandbox_kernel.policy.model import EgressPolicy

    async def prepare():
        prepared = _backend(kernel_kubeconfig, "rbac-check")
        await prepared.start(uuid.uuid4().hex, EgressPolicy(), lambda line: None)
        await prepared.stop()

    asyncio.run(prepare())
    backend = [p for p in kb.required_permissions(["networkpolicy"]) if p[2] != "list"]
    assert _refused(kernel_kubeconfig, backend) == []
    # the gc identity: list everywhere, delete what it found
    gc = [("", "pods", "list"), ("", "pods", "delete"), ("networking.k8s.io", "networkpolicies", "list"),
          ("networking.k8s.io", "networkpolicies", "delete")]
    assert _refused(gc_kubeconfig, gc) == []
    assert _refused(gc_kubeconfig, gc, namespace=None) == []  # --all-namespaces lists


def test_rbac_permits_doctors_reads_by_name_and_nothing_wider(kernel_kubeconfig):
    """The chart (rbac.doctor, the default) lets the kernel identity make each read of
    `sandbox-kernel doctor`, on exactly the names it reads, and nothing around them."""
    from sandbox_kernel.backends.kubernetes import doctor as doctor_k8s

    kc = kernel_kubeconfig
    assert may(kc, "create", "selfsubjectaccessreviews", group="authorization.k8s.io")
    refused = [ds for ds in doctor_k8s.DOCTOR_DAEMONSETS if not may(kc, "get", "daemonsets", "kube-system", "apps", name=ds)]
    refused += [crd for crd in doctor_k8s.DOCTOR_CRDS
                if not may(kc, "get", "customresourcedefinitions", group="apiextensions.k8s.io", name=crd)]
    refused += [rc for rc in ["gvisor"] if not may(kc, "get", "runtimeclasses", group="node.k8s.io", name=rc)]
    assert refused == []
    wider = [("list", "daemonsets", "kube-system", "apps", None), ("get", "daemonsets", "kube-system", "apps", "kube-proxy"),
             ("get", "daemonsets", "default", "apps", "kube-router"), ("watch", "daemonsets", "kube-system", "apps", None),
             ("get", "pods", "kube-system", "", None), ("get", "configmaps", "kube-system", "", "coredns"),
             ("list", "customresourcedefinitions", None, "apiextensions.k8s.io", None),
             ("get", "customresourcedefinitions", None, "apiextensions.k8s.io", "certificates.cert-manager.io"),
             ("list", "runtimeclasses", None, "node.k8s.io", None)]
    assert [w for w in wider if may(kc, w[0], w[1], w[2], w[3], name=w[4])] == []


def test_rbac_denies_what_the_kernel_identity_must_not_do(kernel_kubeconfig):
    must_not = [
        ("create", "pods", "kube-system", "", None),
        ("get", "secrets", "kube-system", "", None),
        ("list", "secrets", "user-sandbox-rbac-check", "", None),
        ("create", "pods", "exec", "default", None),
        ("create", "pods", "default", "", "exec"),
        ("create", "clusterrolebindings", None, "rbac.authorization.k8s.io", None),
        ("delete", "namespaces", None, "", None),
        ("patch", "nodes", None, "", None),
    ]
    allowed = [m for m in must_not if may(kernel_kubeconfig, m[0], m[1], m[2], m[3], m[4])]
    assert allowed == []


# -- the kernel end to end -------------------------------------------------------------------------

def test_kernel_end_to_end_on_a_real_pod(cluster_admin, kernel):
    first = kernel.execute("x = 20\nprint(x + 1)", timeout=240)
    assert first.status == "ok", first.reply
    text = first.stream()
    assert "21\n" in text
    # the start's progress lines come from the real pod events, in their order
    lines = [line.split("[sandbox] ", 1)[1] for line in text.splitlines() if "[sandbox] " in line]
    order = [next((i for i, line in enumerate(lines) if line.startswith(w)), None)
             for w in ("Scheduling", "Scheduled on node ", f"Pulled image {SANDBOX_IMAGE}", "Started", "Ready")]
    assert None not in order and order == sorted(order), lines
    pod = the_pod(cluster_admin, kernel.user)
    assert pod["spec"]["containers"][0]["image"] == SANDBOX_IMAGE
    assert pod["status"]["containerStatuses"][0]["ready"] is True

    # exit statuses
    assert kernel.execute("1 + 1").sandbox["exit_status"] == 0
    assert kernel.execute("raise ValueError('no')").sandbox["exit_status"] == 1
    assert kernel.execute("raise SystemExit(3)").sandbox["exit_status"] == 3
    shell = kernel.execute("!false")
    assert shell.sandbox["exit_status"] == 1, shell.sandbox
    # state kept, rich output
    assert kernel.execute("print(x)").stream().startswith("20\n")
    rich = kernel.execute("from IPython.display import HTML, display\ndisplay(HTML('<b>bold</b>'))")
    assert rich.of_type("display_data")[0]["content"]["data"]["text/html"] == "<b>bold</b>"
    result = kernel.execute("{'a': 1}")
    assert result.of_type("execute_result")[0]["content"]["data"]["text/plain"] == "{'a': 1}"
    # input()
    asked = kernel.execute("name = input('who? ')\nprint('hi', name)", stdin=lambda prompt: "pod")
    assert "hi pod\n" in asked.stream(), asked.outputs
    # interrupt: a busy loop and a sleep both stop, the interpreter stays
    for code in ("while True: pass", "import time; time.sleep(100)"):
        timer = threading.Timer(1.0, kernel.km.interrupt_kernel)
        timer.start()
        cell = kernel.execute(code, timeout=30)
        assert cell.reply["content"].get("ename") == "KeyboardInterrupt", cell.reply["content"]
    assert kernel.execute("print(x)").stream().startswith("20\n")


def _api_connections(pid: int, server: tuple[str, int]) -> list[int]:
    """Local ports of the TCP connections process ``pid`` holds to ``server``."""
    import socket
    import struct

    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = []
    with open("/proc/net/tcp") as f:
        for line in list(f)[1:]:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            r_ip, r_port = remote.split(":")
            if inode in inodes and state == "01" and int(r_port, 16) == server[1] \
                    and socket.inet_ntoa(struct.pack("<I", int(r_ip, 16))) == server[0]:
                ports.append(int(local.split(":")[1], 16))
    return ports


def test_exec_connection_cut_from_outside_is_reattached_with_state(cluster_admin, kernel_kubeconfig, kernel):
    """Every TCP connection of the kernel to the API server is destroyed (ss -K), as an API
    server restart or a load balancer would: the next cells run in the same pod, with state,
    including a cell that was running when the connection went."""
    import yaml

    server = yaml.safe_load(open(kernel_kubeconfig))["clusters"][0]["cluster"]["server"]
    host, port = server.split("//")[1].rsplit(":", 1)
    kernel.execute("y = 41")
    pod = the_pod(cluster_admin, kernel.user)

    def cut():
        ports = _api_connections(kernel.pid, (host, int(port)))
        for local in ports:
            subprocess.run(["ss", "-K", "dst", host, "dport", "=", port, "sport", "=", str(local)],
                           check=True, capture_output=True)
        return ports

    assert cut(), "the kernel holds no connection to the API server"
    after = kernel.execute("print(y + 1)", timeout=120)
    assert after.stream().startswith("42\n"), after.outputs
    # and during a cell
    timer = threading.Timer(1.0, cut)
    timer.start()
    during = kernel.execute("import time\nprint('a', flush=True)\ntime.sleep(3)\nprint(y * 2)", timeout=120)
    timer.join()
    assert during.status == "ok" and during.stream().startswith("a\n82\n"), during.outputs
    assert the_pod(cluster_admin, kernel.user)["metadata"]["name"] == pod["metadata"]["name"]


def test_pod_deleted_from_outside_then_next_cell_in_a_new_pod(cluster_admin, kernel):
    from kubernetes import client

    pod = the_pod(cluster_admin, kernel.user)
    core = client.CoreV1Api(admin_client(cluster_admin))
    name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
    core.delete_namespaced_pod(name, namespace, grace_period_seconds=1)
    # gone from the API once the kubelet has killed its containers (not forced: a forced
    # delete removes the object while the container, and the exec stream, still run)
    wait_for("the pod to be gone", lambda: name not in [p.metadata.name for p in core.list_namespaced_pod(namespace).items],
             timeout=60)
    said = kernel.execute("print('after')", timeout=240)
    words = json.dumps(said.outputs, default=str) + json.dumps(said.reply["content"], default=str)
    assert "deleted" in words, words
    if "after\n" not in said.stream():  # the loss was seen during this cell: the next one runs
        said = kernel.execute("print('after')", timeout=240)
    assert "after\n" in said.stream(), said.outputs
    new = the_pod(cluster_admin, kernel.user)
    assert new["metadata"]["name"] != pod["metadata"]["name"]


def test_refusals_between_cells_are_said_in_the_notebook(cluster_admin, kernel_kubeconfig):
    """Between two cells of one kernel the cluster changes under it, as an administrator
    would change it: the pod is deleted and the namespace's RoleBinding removed, so the
    replacement is refused by RBAC (a real 403); the binding comes back but the quota is
    full (a real "exceeded quota"); the quota is restored and the next cell gets a fresh pod.
    Each refusal is shown in the notebook, in plain words."""
    from kubernetes import client

    user = f"ci-{uuid.uuid4().hex[:6]}"
    driver = KernelDriver(kernel_env(kernel_kubeconfig, user))
    api = admin_client(cluster_admin)
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    try:
        assert "x=1\n" in driver.execute("print('x=1')", timeout=240).stream()
        pod = the_pod(cluster_admin, user)
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        binding = rbac.read_namespaced_role_binding("sandbox-kernel", namespace)
        rbac.delete_namespaced_role_binding("sandbox-kernel", namespace)
        wait_for("RBAC to drop the binding", lambda: not may(kernel_kubeconfig, "create", "pods", namespace), timeout=30)
        core.delete_namespaced_pod(name, namespace, grace_period_seconds=1)
        wait_for("the pod to be gone", lambda: name not in [p.metadata.name for p in core.list_namespaced_pod(namespace).items],
                 timeout=60)
        denied = driver.execute("print('after')", timeout=240)
        if denied.reply["content"].get("ename") == "SandboxCrashed":  # the loss was seen during the cell
            assert "deleted" in denied.reply["content"]["evalue"]
            denied = driver.execute("print('after')", timeout=240)
        content = denied.reply["content"]
        assert content.get("ename") == "KubernetesForbidden", content
        assert f'namespace "{namespace}"' in content["evalue"] and "cannot " in content["evalue"], content["evalue"]
        assert "Kubernetes refused" in str(denied.outputs)  # shown in the notebook, not only in the reply

        # the binding is back, the quota is full
        core.patch_namespaced_resource_quota("sandbox-quota", namespace, {"spec": {"hard": {"pods": "0"}}})
        rbac.create_namespaced_role_binding(namespace, {
            "metadata": {"name": "sandbox-kernel", "labels": binding.metadata.labels},
            "roleRef": api.sanitize_for_serialization(binding.role_ref),
            "subjects": api.sanitize_for_serialization(binding.subjects)})
        wait_for("RBAC to see the binding again", lambda: may(kernel_kubeconfig, "create", "pods", namespace), timeout=30)
        full = driver.execute("print('after')", timeout=240)
        assert full.reply["content"].get("ename") == "QuotaExceeded", full.reply["content"]
        assert f"quota in namespace {namespace}" in full.reply["content"]["evalue"]
        assert "exceeded quota: sandbox-quota" in str(full.outputs)

        # and once there is room again, the next cell gets a fresh sandbox
        core.patch_namespaced_resource_quota("sandbox-quota", namespace, {"spec": {"hard": {"pods": "4"}}})
        again = driver.execute("print('fresh')", timeout=240)
        assert "fresh\n" in again.stream(), again.outputs
        assert the_pod(cluster_admin, user)["metadata"]["name"] != name
    finally:
        driver.shutdown()
        for ns in _user_namespaces(cluster_admin, user):
            delete_namespace(cluster_admin, ns)


def test_pod_security_restricted_rejects_a_violating_pod(cluster_admin, kernel_kubeconfig, kernel):
    """The user namespace enforces restricted: the sandbox pod got in (the kernel started),
    and a privileged spec sent by the same identity is refused by the real admission."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    assert "admitted\n" in kernel.execute("print('admitted')", timeout=240).stream()
    pod = the_pod(cluster_admin, kernel.user)
    namespace = pod["metadata"]["namespace"]
    labels = client.CoreV1Api(admin_client(cluster_admin)).read_namespace(namespace).metadata.labels
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    from kubernetes import config

    api = config.new_client_from_config(config_file=kernel_kubeconfig)
    bad = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "skci-privileged"},
           "spec": {"containers": [{"name": "c", "image": SANDBOX_IMAGE, "imagePullPolicy": "Never",
                                    "command": ["sleep", "1"], "securityContext": {"privileged": True}}]}}
    with pytest.raises(ApiException) as err:
        client.CoreV1Api(api).create_namespaced_pod(namespace, bad)
    assert err.value.status == 403
    message = json.loads(err.value.body)["message"]
    assert 'violates PodSecurity "restricted:latest"' in message, message
    assert "privileged" in message


# -- egress, enforced by kube-router ---------------------------------------------------------------

def test_default_deny_refuses_with_a_notice_and_the_network_drops(kernel, test_host):
    host = test_host(8080)
    reached, cell = connect(kernel, host.ip, 8080)
    assert not reached and "ConnectionRefusedError" in cell.stream()
    found = notices(cell)
    assert len(found) == 1 and found[0]["ip"] == host.ip and found[0]["port"] == 8080, found
    # with the advisory guard off, the network itself refuses: nothing reaches the host
    reached, cell = connect(kernel, host.ip, 8080, guard=False)
    assert not reached, cell.stream()
    assert host.seen() == 0


def test_allowlist_opens_exactly_host_port_tcp_and_deny_closes_it(kernel, test_host):
    a, b = test_host(8080), test_host(8080)
    change = kernel.execute(f"%sandbox allow {a.ip}:8080/tcp")
    assert change.status == "ok", change.outputs
    # enforcement by the real enforcer is asynchronous: poll with the guard off
    started = time.monotonic()
    wait_for("the allowed host to be reachable through kube-router",
             lambda: connect(kernel, a.ip, 8080, guard=False, timeout=2)[0], timeout=60, interval=0)
    print(f"allow -> enforced in {time.monotonic() - started:.2f} s")
    seen = a.seen()
    assert seen >= 1
    for ip, port in [(a.ip, 8081), (b.ip, 8080)]:
        reached, cell = connect(kernel, ip, port, guard=False)
        assert not reached, (ip, port, cell.stream())
    reached, _ = connect(kernel, a.ip, 8080, guard=False, kind="udp")
    assert not reached
    assert a.seen() == seen and b.seen() == 0

    change = kernel.execute("%sandbox mode deny")
    assert "egress now: default-deny" in change.stream()
    reached, cell = connect(kernel, a.ip, 8080)  # the guard refuses at once
    assert not reached and "ConnectionRefusedError" in cell.stream()
    started = time.monotonic()
    wait_for("deny to be enforced by kube-router",
             lambda: not connect(kernel, a.ip, 8080, guard=False, timeout=2)[0], timeout=60, interval=0)
    print(f"deny -> enforced in {time.monotonic() - started:.2f} s")
    count = a.seen()
    assert not connect(kernel, a.ip, 8080, guard=False)[0]
    assert a.seen() == count


DNS_QUERY = r"""
import socket, struct
def query(name, tcp):
    q = struct.pack('>HHHHHH', 0x1234, 0x0100, 1, 0, 0, 0)
    q += b''.join(bytes([len(p)]) + p.encode() for p in name.split('.')) + b'\0' + struct.pack('>HH', 1, 1)
    if tcp:
        s = socket.create_connection(('10.96.0.10', 53), timeout=3)
        s.sendall(struct.pack('>H', len(q)) + q)
        data = s.recv(2)
        data = s.recv(struct.unpack('>H', data)[0])
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
        s.sendto(q, ('10.96.0.10', 53)); data = s.recvfrom(512)[0]
    answers = struct.unpack('>H', data[6:8])[0]
    return socket.inet_ntoa(data[-4:]) if answers else None
for tcp in (False, True):
    try:
        print('TCP' if tcp else 'UDP', query('kubernetes.default.svc.cluster.local', tcp))
    except OSError as e:
        print('TCP' if tcp else 'UDP', 'FAILED', type(e).__name__)
"""


def test_dns_through_coredns_on_udp_and_tcp_under_an_allowlist(kernel, test_host):
    host = test_host(8080)
    kernel.execute(f"%sandbox allow {host.ip}:8080/tcp")
    code = "import sandbox_agent.guard as _g\n_g.enabled = False\n" + DNS_QUERY + "_g.enabled = True\n"
    answer = wait_for("DNS answers through the policy's DNS rule",
                      lambda: (lambda out: out if "FAILED" not in out else None)(kernel.execute(code).stream()),
                      timeout=60, interval=0)
    assert "UDP 10.96.0.1\nTCP 10.96.0.1\n" in answer, answer
    # and the sandbox's own resolver (the pod's /etc/resolv.conf) finds cluster names
    cell = kernel.execute("import socket\nprint(socket.gethostbyname('kubernetes.default.svc.cluster.local'))")
    assert cell.stream().startswith("10.96.0.1\n"), cell.outputs
    kernel.execute("%sandbox mode deny")


def test_metadata_address_is_refused_even_when_routed_to_a_host(cluster_admin, kernel, test_host):
    """169.254.169.254 routed, for pod traffic only, to a test host that answers on it; a wide
    allowlist still cannot reach it (always blocked)."""
    host = test_host(80)
    table, prio = "231", "23169"
    subprocess.run(["ip", "-n", host.name, "addr", "add", "169.254.169.254/32", "dev", f"{host.name}p"], check=True)
    subprocess.run(["ip", "route", "replace", "169.254.169.254/32", "via", host.ip, "table", table], check=True)
    subprocess.run(["ip", "rule", "add", "from", "10.244.0.0/16", "to", "169.254.169.254/32",
                    "lookup", table, "priority", prio], check=True)
    try:
        wide = kernel.execute("%sandbox allow 0.0.0.0/0:80/tcp")  # every IPv4 address on port 80 ...
        assert wide.status == "ok", wide.reply["content"]
        wait_for("the test host to be reachable", lambda: connect(kernel, host.ip, 80, guard=False)[0], timeout=60,
                 interval=0)
        seen = host.seen()
        # ... but the metadata address, routed to the same host, stays blocked by the network
        reached, cell = connect(kernel, "169.254.169.254", 80, guard=False)
        assert not reached, cell.stream()
        assert host.seen() == seen
        refused = kernel.execute("%sandbox allow 169.254.169.254:80")
        assert refused.reply["content"].get("ename") == "CeilingRefused", refused.reply["content"]
    finally:
        subprocess.run(["ip", "rule", "del", "priority", prio], check=False)
        subprocess.run(["ip", "route", "flush", "table", table], check=False)
        kernel.execute("%sandbox mode deny")


# -- shutdown and gc --------------------------------------------------------------------------------

def test_shutdown_removes_the_pod_and_the_kernels_objects(cluster_admin, kernel_kubeconfig):
    from kubernetes import client

    user = f"ci-{uuid.uuid4().hex[:6]}"
    driver = KernelDriver(kernel_env(kernel_kubeconfig, user))
    try:
        assert "up\n" in driver.execute("print('up')", timeout=240).stream()
        pod = the_pod(cluster_admin, user)
        namespace = pod["metadata"]["namespace"]
        net = client.NetworkingV1Api(admin_client(cluster_admin))
        kernel_label = pod["metadata"]["labels"]["sandbox-kernel.io/kernel-id"]
        selector = f"sandbox-kernel.io/kernel-id={kernel_label}"
        assert net.list_namespaced_network_policy(namespace, label_selector=selector).items
        driver.shutdown()
        driver.shutdown = lambda: None
        wait_for("the pod to be gone", lambda: not pods(cluster_admin, namespace), timeout=60)
        assert net.list_namespaced_network_policy(namespace, label_selector=selector).items == []
        left = [p.metadata.name for p in net.list_namespaced_network_policy(namespace).items]
        assert left == ["sandbox-default-deny"]
    finally:
        driver.shutdown()
        delete_namespace(cluster_admin, f"user-sandbox-{user}")
        for ns in _user_namespaces(cluster_admin, user):
            delete_namespace(cluster_admin, ns)


def _kill_agent_from_the_node(pod: dict) -> None:
    """SIGKILL the pod's agent (its PID 1) from this machine, as a crash would end it (inside
    the pod, PID 1 cannot be sent SIGKILL)."""
    uid = pod["metadata"]["uid"]
    killed = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cgroup") as f:
                cgroups = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if (f"pod{uid}" in cgroups or f"pod{uid.replace('-', '_')}" in cgroups) and b"serve" in cmd:
            os.kill(int(pid), signal.SIGKILL)
            killed.append(pid)
    assert killed, f"no agent process of pod {uid} on this node"


def test_gc_removes_an_orphan_and_leaves_a_live_sandbox(cluster_admin, kernel_kubeconfig, gc_kubeconfig, kernel):
    """A kernel killed with SIGKILL leaves its pod; once that pod has ended, `sandbox-kernel gc`
    (as the chart's gc identity, default max age) removes it and its policy objects, and
    leaves the live kernel's pod alone."""
    from kubernetes import client

    assert "live\n" in kernel.execute("print('live')").stream()
    live = the_pod(cluster_admin, kernel.user)
    user = f"ci-{uuid.uuid4().hex[:6]}"
    driver = KernelDriver(kernel_env(kernel_kubeconfig, user))
    try:
        assert "up\n" in driver.execute("print('up')", timeout=240).stream()
        orphan = the_pod(cluster_admin, user)
        os.kill(driver.pid, signal.SIGKILL)  # no shutdown: the pod is an orphan now
        # the orphan's agent ends (as a crashed one would): the pod is Failed, nobody deletes it
        _kill_agent_from_the_node(orphan)
        ns, name = orphan["metadata"]["namespace"], orphan["metadata"]["name"]
        core = client.CoreV1Api(admin_client(cluster_admin))
        wait_for("the orphan pod to end", lambda: core.read_namespaced_pod(name, ns).status.phase == "Failed",
                 timeout=60)
        env = {**os.environ, "KUBECONFIG": gc_kubeconfig, "KUBERNETES_SERVICE_HOST": ""}
        done = subprocess.run(["sandbox-kernel", "gc", "--backend", "kubernetes"], capture_output=True, text=True,
                              env=env, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"removed pods {ns}/{name}" in done.stdout, done.stdout
        assert f"removed networkpolicies {ns}/{name}-egress" in done.stdout, done.stdout
        assert live["metadata"]["name"] not in done.stdout
        assert the_pod(cluster_admin, kernel.user)["metadata"]["name"] == live["metadata"]["name"]
    finally:
        try:
            driver.kc.stop_channels()
            driver.km.shutdown_kernel(now=True)  # reaps the killed process, removes its files
        except Exception:  # noqa: BLE001 - the kernel process is gone
            pass
        for ns in _user_namespaces(cluster_admin, user):
            delete_namespace(cluster_admin, ns)


def test_an_orphaned_pod_ends_by_itself_and_the_next_start_collects_it(cluster_admin, kernel_kubeconfig):
    """Issue 15 point 4 on a real pod: the kernel goes away without stopping its sandbox
    (its exec stream closes, nothing deletes the pod); the agent, the pod's main process,
    exits after ``orphan_timeout`` with no client attached, so the pod ends (Succeeded) by
    itself; the user's next start sweeps it away. Its egress policy is younger than gc's
    10 minutes and stays for now (another start may own it)."""
    from kubernetes import client

    from sandbox_kernel.policy.model import EgressPolicy

    user = f"ci-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(admin_client(cluster_admin))

    async def main():
        orphan = _backend(kernel_kubeconfig, user, orphan_timeout=3.0, gc_on_start=True)
        await orphan.start(uuid.uuid4().hex, EgressPolicy(), lambda line: None)
        await orphan._gc_task
        transport = await orphan.attach()
        assert (await asyncio.wait_for(transport.recv(), 60))["type"] == "hello"
        namespace, pod = orphan.namespace, orphan.pod
        await transport.close()  # the kernel is gone: no stop()
        await asyncio.to_thread(wait_for, "the orphaned pod to end by itself",
                                lambda: core.read_namespaced_pod(pod, namespace).status.phase == "Succeeded",
                                120)
        fresh = _backend(kernel_kubeconfig, user, gc_on_start=True)
        await fresh.start(uuid.uuid4().hex, EgressPolicy(), lambda line: None)
        removed = await fresh._gc_task
        await fresh.stop()
        return namespace, pod, removed

    try:
        namespace, pod, removed = asyncio.run(main())
        assert f"pods {namespace}/{pod}" in removed, removed
        wait_for("the orphan to be gone", lambda: pod not in [p.metadata.name for p in core.list_namespaced_pod(namespace).items],
                 timeout=60)
        net = client.NetworkingV1Api(admin_client(cluster_admin))
        assert f"{pod}-egress" in [n.metadata.name for n in net.list_namespaced_network_policy(namespace).items]
    finally:
        for ns in _user_namespaces(cluster_admin, user):
            delete_namespace(cluster_admin, ns)


def test_learn_mode_records_what_the_guard_let_through(cluster_admin, kernel_kubeconfig, test_host):
    """Learn mode on a real pod: there is no enforcer log, so the kernel asks the agent's
    guard what it let through; the proposal has the allowed port and the refused one, and
    learning changes nothing about the policy in force (kube-router still lets 8080 through)."""
    from sandbox_kernel.learn import LEARN_MIME

    host = test_host(8080)
    user = f"ci-{uuid.uuid4().hex[:6]}"
    driver = KernelDriver(kernel_env(kernel_kubeconfig, user))
    try:
        assert driver.execute(f"%sandbox allow {host.ip}:8080/tcp", timeout=240).status == "ok"
        # NetworkPolicy is programmed asynchronously: wait until the allowed port connects
        wait_for("the allowed port to connect through kube-router",
                 lambda: "connected" in driver.execute(CONNECT.format(ip=host.ip, port=8080)).stream(),
                 timeout=60, interval=0)
        started = driver.execute("%sandbox learn")
        assert "allowed ones as the sandbox's guard reports them" in started.stream(), started.stream()
        assert "connected" in driver.execute(CONNECT.format(ip=host.ip, port=8080)).stream()
        assert "refused" in driver.execute(CONNECT.format(ip=host.ip, port=8081)).stream()
        stop = driver.execute("%sandbox learn stop")
        [proposal] = [m["content"]["data"][LEARN_MIME] for m in stop.of_type("display_data")
                      if LEARN_MIME in m["content"]["data"]]
        assert {(t["port"], t["verdict"], tuple(t["sources"])) for t in proposal["tried"]} == {
            (8080, "allowed", ("guard",)), (8081, "blocked", ("guard",))}, proposal["tried"]
        [item] = proposal["items"]
        assert item["text"] == f"{host.ip}:8080-8081/tcp" and item["sandbox_reported"]
        assert "connected" in driver.execute(CONNECT.format(ip=host.ip, port=8080)).stream()
    finally:
        driver.shutdown()
        for ns in _user_namespaces(cluster_admin, user):
            delete_namespace(cluster_admin, ns)


# -- helm and doctor -------------------------------------------------------------------------------

def test_doctor_as_the_kernel_identity_reports_networkpolicy_enforcement(cluster_admin, kernel_kubeconfig, kernel,
                                                                          tmp_path):
    """`sandbox-kernel doctor`, configured as the chart configures kernels (its ConfigMap) and
    authenticated as the chart's kernel ServiceAccount: every row checked (no "could not
    check"), kube-router found enforcing NetworkPolicy, the namespaced rights checked in a
    user namespace that exists, and ready."""
    from realcluster import chart_kernel_config

    assert "up\n" in kernel.execute("print('up')", timeout=240).stream()  # its user namespace exists
    config_dir = chart_kernel_config(cluster_admin, tmp_path / "jupyter-config")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_KERNEL_K8S_")},
           "KUBECONFIG": kernel_kubeconfig, "KUBERNETES_SERVICE_HOST": "", "JUPYTER_CONFIG_DIR": str(config_dir),
           "SANDBOX_KERNEL_USER": kernel.user}
    done = subprocess.run(["sandbox-kernel", "doctor", "--backend", "kubernetes"], capture_output=True, text=True,
                          env=env, timeout=120)
    out = done.stdout + done.stderr
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    row = rows.get("NetworkPolicy enforcement", "")
    assert " ok " in row and "kube-router (DaemonSet kube-system/kube-router)" in row, out
    namespaced = rows.get("RBAC in user namespaces", "")
    assert " ok " in namespaced and f"user-sandbox-{kernel.user}" in namespaced, out
    assert " ok " in rows.get("RBAC bind clusterroles.rbac.authorization.k8s.io", ""), out
    assert " ok " in rows.get("DNS", "") and "no NodeLocal DNSCache DaemonSet" in rows["DNS"], out
    assert "could not check" not in out and "FAIL" not in out, out
    assert done.returncode == 0 and out.rstrip().endswith("ready"), out


def test_helm_install_in_hub_mode_binds_the_role_to_the_service(cluster_admin):
    from kubernetes import client

    from realcluster import install_chart

    # names of this run only: the cluster is shared, and a namespace of the same name deleted by an
    # earlier run stays "Terminating" for seconds, refusing the next install into it
    suffix = uuid.uuid4().hex[:6]
    release, namespace = f"skcihub-{suffix}", f"skci-hub-{suffix}"
    try:
        install_chart(cluster_admin, release=release, namespace=namespace, wait=False, values={
            "hub.enabled": "true", "hub.image.name": "sandbox-kernel.local/hub", "hub.image.tag": "none",
            "hub.apiTokenSecret": "hub-token", "serviceAccount.create": "false"})
        rbac = client.RbacAuthorizationV1Api(admin_client(cluster_admin))
        binding = rbac.read_cluster_role_binding(f"{release}-sandbox-kernel-kernel")
        assert [(s.kind, s.name, s.namespace) for s in binding.subjects] == [
            ("ServiceAccount", f"{release}-sandbox-kernel-hub", namespace)]
        apps = client.AppsV1Api(admin_client(cluster_admin))
        assert apps.read_namespaced_deployment(f"{release}-sandbox-kernel-hub", namespace)
    finally:
        from realcluster import helm

        helm(cluster_admin, "uninstall", release, "--namespace", namespace, check=False)
        delete_namespace(cluster_admin, namespace)


def test_helm_cli_is_the_one_built_here():
    version = subprocess.run([str(HELM), "version", "--short"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("v3."), version


# -- start failures, in plain words --------------------------------------------------------------

def _backend(kubeconfig: str, user: str, **kw):
    from kubernetes import client, config

    from sandbox_kernel.backends import kubernetes as kb

    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    kw.setdefault("image", SANDBOX_IMAGE)
    kw.setdefault("image_pull_policy", "Never")
    kw.setdefault("requests", {"cpu": "50m", "memory": "128Mi"})
    kw.setdefault("namespace_role", f"{KERNEL_SA}-sandbox")  # as the chart configures its kernels
    kw.setdefault("role_subject", f"ServiceAccount:{CHART_NAMESPACE}:{KERNEL_SA}")
    kw.setdefault("start_timeout", 120)
    backend = kb.KubernetesBackend(client_configuration=configuration, user=user, **kw)
    backend.always_blocked = ["169.254.0.0/16"]
    return backend


async def _cell(transport, code: str, cell_id: int) -> tuple[str, int]:
    """Run one cell over a backend transport: (its stdout, its exit status)."""
    await transport.send({"type": "execute", "id": cell_id, "code": code, "silent": False,
                          "store_history": True, "user_expressions": {}, "allow_stdin": False})
    out = []
    while True:
        frame = await asyncio.wait_for(transport.recv(), 60)
        assert frame is not None, "the stream ended during a cell"
        if frame["type"] == "stream" and frame.get("name", "stdout") == "stdout":
            out.append(frame["text"])
        if frame["type"] == "done":
            return "".join(out), frame["exit_status"]


def test_api_requests_per_start_and_no_polling(cluster_admin, kernel_kubeconfig):
    """On the real API server, as the chart's identity: the first start in a new namespace
    applies its objects (namespace, RoleBinding, ServiceAccount, quota, limits, default deny,
    agent ConfigMap, then the setup mark); a start in a set-up namespace is 5 requests — GET
    namespace, apply the egress NetworkPolicy, create the pod, watch the pod and watch its
    events, both from the create's resourceVersion — and no GET or LIST of the pod while it
    waits; after Ready, the start's sweep lists the user's pods and policies once each. Stop
    deletes the pod and the kernel's NetworkPolicy; the namespace and its default deny stay."""
    from urllib.parse import parse_qs, urlparse

    from kubernetes import client

    from sandbox_kernel.policy.model import EgressPolicy

    user = f"ci-{uuid.uuid4().hex[:6]}"

    async def start(calls: list):
        backend = _backend(kernel_kubeconfig, user, gc_on_start=True)
        rest = backend.api_client().rest_client
        plain = rest.request

        def request(method, url, *args, **kwargs):
            parsed = urlparse(url)
            calls.append((method, parsed.path, {k: v[-1] for k, v in parse_qs(parsed.query).items()}))
            return plain(method, url, *args, **kwargs)

        rest.request = request
        lines: list[str] = []
        await backend.start(uuid.uuid4().hex, EgressPolicy(), lines.append)
        ready_at = len(calls)
        await backend._gc_task
        return backend, lines, ready_at

    async def main():
        first_calls, second_calls = [], []
        first, first_lines, _ = await start(first_calls)
        second, second_lines, ready_at = await start(second_calls)
        # cells; a second transport (a new attach, as after a restart of the sandbox service)
        # finds the interpreter's state
        t1 = await second.attach()
        assert (await asyncio.wait_for(t1.recv(), 60))["type"] == "hello"
        assert await _cell(t1, "secret = 'kept'\nprint(6 * 7)", 1) == ("42\n", 0)
        assert (await _cell(t1, "raise SystemExit(3)", 2))[1] == 3
        await t1.close()
        t2 = await second.attach()
        assert (await asyncio.wait_for(t2.recv(), 60))["type"] == "hello"
        assert await _cell(t2, "print(secret)", 3) == ("kept\n", 0)
        await t2.close()
        namespace = second.namespace
        pod = second.pod
        net = client.NetworkingV1Api(admin_client(cluster_admin))
        egress = [n.metadata.name for n in net.list_namespaced_network_policy(namespace).items]
        await first.stop()
        await second.stop()
        wait_for("the pods to be gone", lambda: not pods(cluster_admin, namespace), timeout=60)
        left = [n.metadata.name for n in net.list_namespaced_network_policy(namespace).items]
        return first_calls, first_lines, second_calls, second_lines, ready_at, namespace, pod, egress, left

    try:
        (first_calls, first_lines, second_calls, second_lines, ready_at, namespace, pod, egress,
         left) = asyncio.run(main())
    finally:
        for ns in _user_namespaces(cluster_admin, user):
            delete_namespace(cluster_admin, ns)
    # the first start prepared the namespace (RBAC may need a moment to see the new
    # RoleBinding: an apply refused meanwhile is retried, so count kinds, not requests)
    assert first_lines[0] == f"Preparing namespace {namespace}…", first_lines
    patched = {path.split("/")[-2] for method, path, _ in first_calls if method == "PATCH"}  # plural/name
    assert {"namespaces", "rolebindings", "serviceaccounts", "resourcequotas", "limitranges", "networkpolicies",
            "configmaps"} <= patched, first_calls
    # the second: five requests until Ready, none of them a poll
    before_ready = second_calls[:ready_at]
    summary = [(m, p.split("/")[-1] if q.get("watch") else p, q.get("watch")) for m, p, q in before_ready]
    assert len(before_ready) == 5, summary
    (m0, p0, _), (m1, p1, _), (m2, p2, _) = before_ready[:3]
    assert (m0, p0) == ("GET", f"/api/v1/namespaces/{namespace}"), summary
    assert (m1, p1) == ("PATCH", f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies/{pod}-egress"), summary
    assert (m2, p2) == ("POST", f"/api/v1/namespaces/{namespace}/pods"), summary
    watches = sorted((p, q.get("fieldSelector", "")) for _, p, q in before_ready[3:] if q.get("watch") == "true")
    assert watches == [(f"/api/v1/namespaces/{namespace}/events", f"involvedObject.name={pod}"),
                       (f"/api/v1/namespaces/{namespace}/pods", f"metadata.name={pod}")], summary
    assert all(q.get("resourceVersion") for _, _, q in before_ready[3:]), summary
    # after Ready: the sweep, one LIST per kind in that namespace
    sweep = sorted(p for m, p, q in second_calls[ready_at:] if m == "GET" and not q.get("watch"))
    assert sweep == [f"/api/v1/namespaces/{namespace}/pods",
                     f"/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies"], second_calls[ready_at:]
    assert "sandbox-default-deny" in egress and f"{pod}-egress" in egress, egress
    assert left == ["sandbox-default-deny"], left
    assert "Preparing namespace" not in " ".join(second_lines)


def test_rbac_refusal_names_the_verb_the_resource_and_the_servers_words(cluster_admin, gc_kubeconfig):
    """A real RBAC 403: the chart's gc identity may not read namespaces, so a start with its
    token fails at its first call, and says which permission is missing."""
    from sandbox_kernel.backends import kubernetes as kb
    from sandbox_kernel.policy.model import EgressPolicy

    user = f"ci-{uuid.uuid4().hex[:6]}"
    with pytest.raises(kb.KubernetesForbidden) as err:
        asyncio.run(_backend(gc_kubeconfig, user).start(uuid.uuid4().hex, EgressPolicy(), lambda line: None))
    assert (err.value.verb, err.value.resource) == ("get", "namespaces")
    assert 'cannot get resource "namespaces"' in str(err.value), str(err.value)
    assert f"system:serviceaccount:{CHART_NAMESPACE}:{GC_SA}" in str(err.value), str(err.value)
    assert _user_namespaces(cluster_admin, user) == []  # nothing was created


def test_idle_timeout_removes_the_pod(cluster_admin, kernel_kubeconfig):
    from sandbox_kernel.policy.model import EgressPolicy

    user = f"ci-{uuid.uuid4().hex[:6]}"

    async def main():
        backend = _backend(kernel_kubeconfig, user, idle_timeout=2.0)
        await backend.start(uuid.uuid4().hex, EgressPolicy(), lambda line: None)
        transport = await backend.attach()
        assert (await asyncio.wait_for(transport.recv(), 60))["type"] == "hello"
        assert await _cell(transport, "import time; time.sleep(3); print('done')", 1) == ("done\n", 0)  # busy, not idle
        assert await asyncio.wait_for(transport.recv(), 60) is None  # then idle: the pod goes
        return backend.namespace, await backend.exit_reason()

    try:
        namespace, reason = asyncio.run(main())
        assert "idle_timeout" in reason, reason
        wait_for("the idle pod to be gone", lambda: not pods(cluster_admin, namespace), timeout=60)
    finally:
        for ns in _user_namespaces(cluster_admin, user):
            delete_namespace(cluster_admin, ns)


@pytest.mark.parametrize("case", ["image", "unschedulable", "quota", "timeout"])
def test_start_failures_say_what_happened(cluster_admin, kernel_kubeconfig, case):
    import asyncio

    from sandbox_kernel.backends import kubernetes as kb
    from sandbox_kernel.policy.model import EgressPolicy

    user = f"ci-{uuid.uuid4().hex[:6]}"
    kw = {"image": {"image": "sandbox-kernel.local/no-such-image:1", "image_pull_policy": "IfNotPresent"},
          "unschedulable": {"node_selector": {"sandbox-kernel.io/no-such-node": "x"}, "schedule_timeout": 3},
          "quota": {"quota": {"pods": "1"}},
          # never scheduled (schedule_timeout far away): the start timeout ends it
          "timeout": {"node_selector": {"sandbox-kernel.io/no-such-node": "x"}, "schedule_timeout": 600,
                      "start_timeout": 5}}[case]
    lines: list[str] = []

    async def main():
        first = _backend(kernel_kubeconfig, user, **kw)
        if case != "quota":
            await first.start(uuid.uuid4().hex, EgressPolicy(), lines.append)
            return
        await first.start(uuid.uuid4().hex, EgressPolicy(), lines.append)
        try:
            await _backend(kernel_kubeconfig, user, **kw).start(uuid.uuid4().hex, EgressPolicy(), lines.append)
        finally:
            await first.stop()

    expected = {"image": kb.ImagePullFailed, "unschedulable": kb.Unschedulable, "quota": kb.QuotaExceeded,
                "timeout": SandboxStartError}[case]
    try:
        with pytest.raises(expected) as err:
            asyncio.run(main())
        words = {"image": "could not be pulled", "unschedulable": "No node could run the sandbox",
                 "quota": "quota in namespace user-sandbox-", "timeout": "was not ready within 5 s"}[case]
        assert words in str(err.value), str(err.value)
        assert "Kubernetes said:" in str(err.value) or case == "timeout"
        # what the user saw while it waited, and the server's own words
        if case == "image":
            assert "Pulling image sandbox-kernel.local/no-such-image:1…" in lines, lines
        elif case == "unschedulable":
            assert [line for line in lines if line.startswith("Waiting for a node: ")], lines
            assert "didn't match Pod's node affinity/selector" in str(err.value), str(err.value)
        elif case == "quota":
            assert "exceeded quota" in str(err.value), str(err.value)
        else:
            assert "c.KubernetesBackend.start_timeout" in str(err.value) and "last state: " in str(err.value)
        # nothing of the failed start is left behind
        for ns in _user_namespaces(cluster_admin, user):
            wait_for("the failed pod to go", lambda: not pods(cluster_admin, ns), timeout=60)
    finally:
        for ns in _user_namespaces(cluster_admin, user):
            delete_namespace(cluster_admin, ns)


# -- isolation between users ------------------------------------------------------------------------



def test_another_users_pod_is_unreachable_and_ingress_is_refused(cluster_admin, kernel_kubeconfig, kernel):
    """User B's sandbox listens on 8000. User A's sandbox (guard off) and a pod in another
    namespace cannot connect; the node itself can (NetworkPolicy never applies to the pod's own
    node), which also shows the listener works."""
    import socket

    from kubernetes import client

    user = f"ci-{uuid.uuid4().hex[:6]}"
    other = KernelDriver(kernel_env(kernel_kubeconfig, user))
    probe_ns = f"skci-probe-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(admin_client(cluster_admin))
    try:
        assert "listening\n" in other.execute(LISTEN, timeout=240).stream()
        target = the_pod(cluster_admin, user)["status"]["podIP"]
        # A -> B, with A's egress opened to B's address (the cluster range stays blocked)
        reached, cell = connect(kernel, target, 8000, guard=False)
        assert not reached, cell.stream()
        # a pod in a namespace that is not a sandbox -> B (ingress)
        core.create_namespace({"metadata": {"name": probe_ns}})
        core.create_namespaced_pod(probe_ns, {"metadata": {"name": "probe"}, "spec": {
            "restartPolicy": "Never", "containers": [{
                "name": "probe", "image": "sandbox-kernel.local/probe:1", "imagePullPolicy": "Never",
                "command": ["/bin/busybox", "sh", "-c",
                            f"if /bin/busybox nc -w 3 {target} 8000 </dev/null; then echo OPEN; else echo CLOSED; fi"]}]}})
        wait_for("the probe pod to finish",
                 lambda: core.read_namespaced_pod("probe", probe_ns).status.phase in ("Succeeded", "Failed"),
                 timeout=120)
        assert core.read_namespaced_pod_log("probe", probe_ns).strip().endswith("CLOSED")
        # the node (this machine) reaches the pod: the listener is up, and the exception is real
        with socket.create_connection((target, 8000), timeout=5) as conn:
            assert conn.recv(2) == b"hi"
        count = other.execute("print(len(accepted))").stream().splitlines()[0]
        assert count == "1", count  # only the node's connection got through
    finally:
        other.shutdown()
        delete_namespace(cluster_admin, probe_ns)
        for ns in _user_namespaces(cluster_admin, user):
            delete_namespace(cluster_admin, ns)
