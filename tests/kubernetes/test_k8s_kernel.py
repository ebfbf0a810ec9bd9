"""The whole Sandbox kernel on the Kubernetes backend, through the fake API server, for
what the real cluster (tests/kubernetes/test_k8s_real.py: cells, exit statuses, interrupt,
input, the exec stream cut and re-attached, the pod deleted, shutdown, gc) does not show:
faults injected between two cells of one kernel — RBAC refusing the replacement pod, then
the user's quota full — and how the notebook shows them.

A real kernel process (jupyter_client) reads a kubeconfig that points at the fake
(127.0.0.1, bearer token), so credential loading is the production path too.
"""

from __future__ import annotations

import time

import pytest

from kerneltest import KernelDriver  # tests/ is on sys.path (tests/kubernetes/conftest.py)

from sandbox_kernel import cli


@pytest.fixture
def kube_kernel(fakekube, tmp_path):
    kubeconfig = fakekube.write_kubeconfig(tmp_path / "kubeconfig")
    driver = KernelDriver({"SANDBOX_KERNEL_BACKEND": "kubernetes", "KUBECONFIG": kubeconfig,
                           "SANDBOX_KERNEL_USER": "Alice Smith", "SANDBOX_KERNEL_K8S_START_TIMEOUT": "60",
                           "SANDBOX_KERNEL_PROGRESS_DELAY": "0",
                           "KUBERNETES_SERVICE_HOST": ""})
    driver.kubeconfig = kubeconfig
    try:
        yield driver
    finally:
        driver.shutdown()


def test_faults_between_cells_are_said_in_the_notebook(fakekube, kube_kernel, monkeypatch, capsys):
    first = kube_kernel.execute("x = 20\nprint(x + 1)")
    assert first.status == "ok", first.reply
    assert "21\n" in first.stream()
    # the wait is announced with the backend's own progress lines, under the waiting cell
    assert "[sandbox] " in first.stream() and "Pulling image" in first.stream(), first.stream()
    pods = fakekube.objects("pods")
    assert len(pods) == 1 and pods[0]["metadata"]["namespace"].startswith("user-sandbox-alice-smith--")
    assert "20\n" in kube_kernel.execute("print(x)").stream()  # same interpreter

    # the pod disappears behind the kernel's back and RBAC refuses the replacement: the cell says so
    fakekube.forbid("create", "pods")
    fakekube.delete_pod_now(pods[0]["metadata"]["namespace"], pods[0]["metadata"]["name"])
    time.sleep(0.5)
    denied = kube_kernel.execute("print('after')", timeout=90)
    if denied.reply["content"].get("ename") == "SandboxCrashed":  # the loss was seen during the cell
        assert "deleted" in denied.reply["content"]["evalue"]
        denied = kube_kernel.execute("print('after')", timeout=90)
    content = denied.reply["content"]
    assert content["ename"] == "KubernetesForbidden", content
    assert "create pods" in content["evalue"] and 'namespace "user-sandbox-alice-smith--' in content["evalue"]
    assert "Kubernetes refused" in str(denied.outputs)  # shown in the notebook, not only in the reply

    # then the user's quota is full
    fakekube.rules.clear()
    fakekube.exceed_quota()
    full = kube_kernel.execute("print('after')", timeout=90)
    assert full.reply["content"]["ename"] == "QuotaExceeded", full.reply["content"]
    assert "quota in namespace user-sandbox-alice-smith--" in full.reply["content"]["evalue"]
    assert "exceeded quota: sandbox-quota" in str(full.outputs)

    # and once allowed, the next cell gets a fresh sandbox
    fakekube.rules.clear()
    again = kube_kernel.execute("print('fresh')", timeout=90)
    assert "fresh\n" in again.stream()
    live = fakekube.objects("pods")
    assert len(live) == 1 and live[0]["metadata"]["name"] != pods[0]["metadata"]["name"]

    kube_kernel.shutdown()
    kube_kernel.shutdown = lambda: None
    deadline = time.monotonic() + 10
    while fakekube.objects("pods") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fakekube.objects("pods") == []  # shutdown deleted the pod
    assert [o["metadata"]["name"] for o in fakekube.objects("networkpolicies")] == ["sandbox-default-deny"]

    # gc after a clean shutdown finds nothing, even with max age 0 (it removes by label and age)
    monkeypatch.setenv("KUBECONFIG", kube_kernel.kubeconfig)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["gc", "--backend", "kubernetes", "--max-age", "0"]) == 0
    assert "nothing to clean up" in capsys.readouterr().out
