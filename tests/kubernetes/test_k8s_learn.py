"""Learn mode on the Kubernetes backend (fake API server, real kernel and agent): there is no
enforcer log, so while learning the kernel asks the agent's guard for what it lets through."""

from __future__ import annotations

from kerneltest import CONNECT, KernelDriver  # tests/ is on sys.path (tests/kubernetes/conftest.py)

from sandbox_kernel.learn import LEARN_MIME

def test_learn_on_kubernetes_records_allowed_python_connections_from_the_guard(fakekube, tmp_path, test_host):
    host = test_host(8080)
    kernel = KernelDriver({"SANDBOX_KERNEL_BACKEND": "kubernetes",
                           "KUBECONFIG": fakekube.write_kubeconfig(tmp_path / "kubeconfig"),
                           "SANDBOX_KERNEL_USER": "learner", "SANDBOX_KERNEL_K8S_START_TIMEOUT": "60",
                           "SANDBOX_KERNEL_POLICY_USER_MAY_ALLOW": "10.231.0.0/16", "KUBERNETES_SERVICE_HOST": ""})
    try:
        assert kernel.execute(f"%sandbox allow {host.ip}:8080/tcp").status == "ok"
        start = kernel.execute("%sandbox learn")
        assert "allowed ones as the sandbox's guard reports them" in start.stream()
        assert "connected" in kernel.execute(CONNECT.format(ip=host.ip, port=8080)).stream()
        assert "refused" in kernel.execute(CONNECT.format(ip=host.ip, port=8081)).stream()
        stop = kernel.execute("%sandbox learn stop")
        [proposal] = [m["content"]["data"][LEARN_MIME] for m in stop.of_type("display_data")
                      if LEARN_MIME in m["content"]["data"]]
        assert {(t["port"], t["verdict"], tuple(t["sources"])) for t in proposal["tried"]} == {
            (8080, "allowed", ("guard",)), (8081, "blocked", ("guard",))}
        [item] = proposal["items"]
        assert item["text"] == f"{host.ip}:8080-8081/tcp" and item["sandbox_reported"]
        # learning changed nothing about the policy in force
        assert "connected" in kernel.execute(CONNECT.format(ip=host.ip, port=8080)).stream()
        assert "not learning; last proposal: 1 entry (1 you may allow)" in kernel.execute("%sandbox learn status").stream()
    finally:
        kernel.shutdown()
