"""Each compiler's output: golden files, schema validation of every object, invariants.

Regenerate the golden files after an intended change with
``UPDATE_GOLDEN=1 python -m pytest tests/policy`` and review ``git diff tests/policy/golden``.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
from policy_testlib import as_text, check_golden, validate_object

from sandbox_kernel.errors import PolicyError
from sandbox_kernel.policy.admin import AdminPolicy
from sandbox_kernel.policy.compile_gke import compile_gke_fqdn, make_network_logging
from sandbox_kernel.policy.compile_networkpolicy import compile_networkpolicy, make_default_deny
from sandbox_kernel.policy.enforcers import ENFORCERS, UnknownEnforcer, render
from sandbox_kernel.policy.model import EgressPolicy, UnsupportedByEnforcer

BLOCKED = AdminPolicy(cluster_ranges=["10.96.0.0/12"]).blocked_networks()
SELECTOR = {"sandbox-kernel/kernel-id": "k-1234"}
RESOLVED = {
    "pypi.org": ["151.101.0.223", "2a04:4e42::223"],
    "files.pythonhosted.org": ["151.101.64.223"],
    "api.github.com": ["140.82.112.5"],
    "rebind.example.com": ["169.254.169.254", "203.0.113.7"],
}
POLICIES = {
    "deny": EgressPolicy(),
    "allowlist": EgressPolicy.parse(
        {
            "name": "demo",
            "mode": "allowlist",
            "presets": ["pypi"],
            "entries": [
                "api.github.com:443/tcp",
                "*.pythonhosted.org:443/tcp",
                "rebind.example.com:80",
                "10.1.2.0/24:5432/tcp",
                "[2001:db8::/32]:443",
                "0.0.0.0/0:22/tcp",
                "203.0.113.0/24:8000-8100",
                "dns.example.com/udp",
                "unresolved.example.com",
            ],
        }
    ),
    "empty-allowlist": EgressPolicy(mode="allowlist"),
}
OPTIONS = {"namespace": "user-alice", "pod_selector": SELECTOR, "resolved": RESOLVED, "resolver": "10.96.0.10", "always_blocked": BLOCKED}


def _cases():
    for policy_name in POLICIES:
        for enforcer in ENFORCERS:
            yield policy_name, enforcer


@pytest.mark.parametrize("policy_name, enforcer", list(_cases()))
def test_golden_and_schema(policy_name, enforcer):
    output = render(POLICIES[policy_name], enforcer, **OPTIONS)
    suffix = "nft" if enforcer == "nftables" else "yaml"
    check_golden(f"{policy_name}.{enforcer}.{suffix}", as_text(output))
    if enforcer != "nftables":
        assert output, "every Kubernetes enforcer emits at least one object"
        for obj in output:
            validate_object(obj)


def test_dns_options_golden_and_schema():
    policy = POLICIES["allowlist"]
    objects = render(policy, "networkpolicy", node_local_dns=True, gke_cloud_dns=True, **OPTIONS)
    objects += render(policy, "cilium", node_local_dns=True, **OPTIONS)
    objects += [make_default_deny("user-alice"), make_network_logging(), make_network_logging(log_allowed=True, delegate=True)]
    check_golden("dns-options.yaml", as_text(objects))
    for obj in objects:
        validate_object(obj)


def test_networkpolicy_dns_rule_avoids_the_reference_mistakes():
    (policy,) = render(POLICIES["allowlist"], "networkpolicy", node_local_dns=True, gke_cloud_dns=True, **OPTIONS)
    dns = policy["spec"]["egress"][0]
    assert dns["to"][0] == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
        "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
    }
    assert {"protocol": "UDP", "port": 53} in dns["ports"] and {"protocol": "TCP", "port": 53} in dns["ports"]
    assert {"ipBlock": {"cidr": "169.254.20.10/32"}} in dns["to"]
    assert {"ipBlock": {"cidr": "169.254.169.254/32"}} in dns["to"]
    for rule in policy["spec"]["egress"]:
        assert rule.get("to"), "an egress rule without `to` allows every destination"
        for peer in rule["to"]:
            assert peer.get("namespaceSelector", {"x": 1}) != {}, "namespaceSelector: {} selects every namespace"
    # 169.254.169.254 is reachable only through the DNS rule, on port 53
    rebinding = [r for r in policy["spec"]["egress"][1:] for p in r["to"] if p["ipBlock"]["cidr"].startswith("169.254")]
    assert not rebinding


def test_deny_mode_has_no_egress_rule_at_all():
    (policy,) = render(EgressPolicy(), "networkpolicy", **OPTIONS)
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "egress" not in policy["spec"] and "ingress" not in policy["spec"]
    assert compile_gke_fqdn(EgressPolicy(), namespace="a", pod_selector=SELECTOR) == []


def test_nftables_sets_and_verdict_prefixes():
    text = render(POLICIES["allowlist"], "nftables", **OPTIONS)
    assert text.index("delete table inet sandbox_kernel") < text.index("table inet sandbox_kernel {")
    assert "ip daddr 10.96.0.10 meta l4proto { tcp, udp } th dport 53 accept" in text
    assert "# deferred wildcard *.pythonhosted.org:443/tcp" in text
    assert "# dropped rebind.example.com -> 169.254.169.254" in text
    assert '"sandbox-kernel:always-blocked "' in text and '"sandbox-kernel:denied "' in text
    assert "reject with tcp reset" in text and "reject with icmpx type admin-prohibited" in text
    deny = render(EgressPolicy(), "nftables", **OPTIONS)
    assert "dport 53" not in deny.replace("hoplimit", "")  # no DNS at all in deny mode


def test_nftables_refuse_with_drop_is_a_compiler_choice():
    from sandbox_kernel.policy.compile_nftables import compile_nftables

    options = {"resolved": RESOLVED, "resolver": "10.96.0.10", "always_blocked": BLOCKED}
    reject = compile_nftables(POLICIES["allowlist"], **options)
    drop = compile_nftables(POLICIES["allowlist"], refuse_with="drop", **options)
    assert "reject" not in drop
    # the same rules; only the refusing ones end differently
    swapped = reject.replace("reject with tcp reset", "drop").replace("reject with icmpx type admin-prohibited", "drop")
    assert drop == swapped != reject
    with pytest.raises(PolicyError, match="refuse_with"):
        compile_nftables(POLICIES["allowlist"], refuse_with="ignore", **options)


@pytest.mark.skipif(shutil.which("nft") is None, reason="nft (nftables) is not installed")
@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_nft_accepts_the_script(policy_name, tmp_path):
    path = tmp_path / "ruleset.nft"
    path.write_text(render(POLICIES[policy_name], "nftables", **OPTIONS))
    result = subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True)
    if result.returncode != 0 and "Operation not permitted" in result.stderr:
        pytest.skip("nft -c needs CAP_NET_ADMIN here")
    assert result.returncode == 0, result.stderr


def test_unknown_enforcer_and_missing_selector():
    with pytest.raises(UnknownEnforcer, match="choose one of nftables"):
        render(EgressPolicy(), "calico")
    with pytest.raises(PolicyError, match="pod selector"):
        render(EgressPolicy(), "networkpolicy")
    with pytest.raises(PolicyError, match="must not be empty"):
        compile_networkpolicy(EgressPolicy(), namespace="a", pod_selector={}, resolved=None, always_blocked=())
    with pytest.raises(PolicyError, match="not a valid label"):
        render(EgressPolicy(), "networkpolicy", namespace="a", pod_selector={"bad key!": "x"})
    with pytest.raises(PolicyError, match="namespace"):
        render(EgressPolicy(), "networkpolicy", namespace="Not_A_Namespace", pod_selector=SELECTOR)
    with pytest.raises(PolicyError, match="table name"):
        render(EgressPolicy(), "nftables", table="bad table")


def test_enforcers_refuse_what_they_cannot_express():
    wide = EgressPolicy.parse(["example.com:1000-2000"])  # 1001 single ports
    with pytest.raises(UnsupportedByEnforcer) as info:
        render(wide, "gke-fqdn", **OPTIONS)
    assert info.value.entry == "example.com:1000-2000" and "gke-fqdn" in str(info.value)
    with pytest.raises(UnknownEnforcer, match="istio"):
        render(wide, "istio", **OPTIONS)  # removed: it could not work as built (docs/policy.md)
    for enforcer in ("networkpolicy", "cilium", "nftables"):
        render(wide, enforcer, **OPTIONS)  # these have port ranges


def _dns_rule(objects):
    (obj,) = [o for o in objects if o["kind"] == "NetworkPolicy" and o["spec"].get("egress")]
    return obj["spec"]["egress"][0]


def test_gke_resolvers_are_reachable_on_port_53_only():
    """Issue 15 point 5: NodeLocal DNSCache (address and pods) and Cloud DNS for GKE on the
    metadata address are in the DNS rule, whose only ports are UDP and TCP 53."""
    policy = POLICIES["allowlist"]
    for enforcer in ("networkpolicy", "gke-fqdn"):
        rule = _dns_rule(render(policy, enforcer, node_local_dns=True, gke_cloud_dns=True, **OPTIONS))
        assert rule["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
        assert {"ipBlock": {"cidr": "169.254.20.10/32"}} in rule["to"]
        assert {"ipBlock": {"cidr": "169.254.169.254/32"}} in rule["to"]
        assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "node-local-dns"}}} in rule["to"]
        # no other rule opens any port of the link-local range
        for obj in render(policy, enforcer, node_local_dns=True, gke_cloud_dns=True, **OPTIONS):
            for other in obj["spec"].get("egress", [])[1:]:
                for peer in other.get("to", []):
                    if "ipBlock" in peer:
                        assert not peer["ipBlock"]["cidr"].startswith("169.254.")
    (cnp,) = render(policy, "cilium", node_local_dns=True, **OPTIONS)
    dns = cnp["spec"]["egress"][0]
    assert dns["toEndpoints"][1] == {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system",
                                                     "k8s:k8s-app": "node-local-dns"}}
    assert dns["toPorts"][0]["ports"] == [{"port": "53", "protocol": "ANY"}]
    assert not any("toCIDRSet" in r and any(c["cidr"].startswith("169.254.20.10") for c in r["toCIDRSet"])
                   for r in cnp["spec"]["egress"])
    # the deny keeps all of 169.254.0.0/16: the cache is reached through its pods, not its address
    assert {"cidr": "169.254.0.0/16"} in cnp["spec"]["egressDeny"][0]["toCIDRSet"]


def test_kubernetes_backend_allows_gke_resolvers_by_default(monkeypatch):
    from sandbox_kernel.backends.kubernetes import KubernetesBackend

    monkeypatch.delenv("SANDBOX_KERNEL_K8S_NODE_LOCAL_DNS", raising=False)
    monkeypatch.delenv("SANDBOX_KERNEL_K8S_GKE_CLOUD_DNS", raising=False)
    backend = KubernetesBackend(user="alice")
    backend.namespace, backend.pod, backend.kernel_id = "user-sandbox-alice", "sandbox-k-1", "k-1"
    backend.always_blocked = [str(n) for n in BLOCKED]
    rule = _dns_rule(backend.policy_objects(POLICIES["allowlist"], RESOLVED))
    assert {"ipBlock": {"cidr": "169.254.20.10/32"}} in rule["to"]
    assert {"ipBlock": {"cidr": "169.254.169.254/32"}} in rule["to"]
    backend.node_local_dns = backend.gke_cloud_dns = "false"
    rule = _dns_rule(backend.policy_objects(POLICIES["allowlist"], RESOLVED))
    assert [p for p in rule["to"] if "ipBlock" in p] == []


def test_gke_fqdn_writes_one_object_per_name():
    """Issue 15 point 8: GKE programs at most 50 addresses per FQDNNetworkPolicy, so one
    object listing every name overflowed with a few CDN names; now one object per entry,
    named by the entry (stable when other entries change)."""
    names = [f"host{i}.example.com:443/tcp" for i in range(30)] + ["*.pythonhosted.org:443/tcp"]
    objects = render(EgressPolicy.parse(names), "gke-fqdn", **OPTIONS)
    fqdn = [o for o in objects if o["kind"] == "FQDNNetworkPolicy"]
    assert len(fqdn) == 31
    for obj in fqdn:
        validate_object(obj)
        (rule,) = obj["spec"]["egress"]
        assert len(rule["matches"]) == 1 and rule["ports"] == [{"port": 443, "protocol": "TCP"}]
    smaller = render(EgressPolicy.parse(names[1:]), "gke-fqdn", **OPTIONS)
    before = {o["metadata"]["name"] for o in fqdn}
    after = {o["metadata"]["name"] for o in smaller if o["kind"] == "FQDNNetworkPolicy"}
    assert after < before and len(before - after) == 1  # only the removed entry's object goes
