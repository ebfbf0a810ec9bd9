"""The whole Sandbox kernel on the Kubernetes backend, through the fake API server.

A real kernel process (jupyter_client) reads a kubeconfig that points at the fake
(127.0.0.1, bearer token), so credential loading is the production path too.
"""

from __future__ import annotations

import time

import pytest
import yaml

from kerneltest import KernelDriver  # tests/ is on sys.path (tests/kubernetes/conftest.py)


@pytest.fixture
def kube_kernel(fakekube, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": fakekube.url}}],
        "users": [{"name": "hub", "user": {"token": fakekube.token}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "hub"}}],
    }))
    driver = KernelDriver({"SANDBOX_KERNEL_BACKEND": "kubernetes", "KUBECONFIG": str(kubeconfig),
                           "SANDBOX_KERNEL_USER": "Alice Smith", "SANDBOX_KERNEL_K8S_START_TIMEOUT": "60",
                           "KUBERNETES_SERVICE_HOST": ""})
    try:
        yield driver
    finally:
        driver.shutdown()


def test_kernel_end_to_end(fakekube, kube_kernel):
    first = kube_kernel.execute("x = 20\nprint(x + 1)")
    assert first.status == "ok", first.reply
    assert "21\n" in first.stream()
    # the wait is announced with the backend's own progress lines, under the waiting cell
    assert "[sandbox] " in first.stream() and "Pulling image" in first.stream(), first.stream()
    pods = fakekube.objects("pods")
    assert len(pods) == 1 and pods[0]["metadata"]["namespace"].startswith("user-sandbox-alice-smith--")
    failed = kube_kernel.execute("raise SystemExit(3)")
    assert failed.sandbox["exit_status"] == 3
    assert "20\n" in kube_kernel.execute("print(x)").stream()  # same interpreter

    # the pod disappears behind the kernel's back: reported, then replaced on the next cell
    fakekube.delete_pod_now(pods[0]["metadata"]["namespace"], pods[0]["metadata"]["name"])
    time.sleep(0.5)
    lost = kube_kernel.execute("print('after')", timeout=90)
    text = str(lost.outputs) + str(lost.reply)
    assert "deleted" in text or "after\n" in lost.stream(), text
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
