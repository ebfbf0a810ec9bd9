"""Compile an egress policy to a ``CiliumNetworkPolicy`` (cilium.io/v2).

Called through ``enforcers.render(..., "cilium")`` by the Kubernetes backend on
clusters running Cilium. Domains and wildcards become ``toFQDNs`` (``matchName`` /
``matchPattern``); Cilium learns their addresses from the DNS answers it proxies, which
is why the DNS rule to kube-dns carries ``rules: dns: [{matchPattern: "*"}]``: without
an L7 DNS rule the proxy sees no answers and ``toFQDNs`` never matches anything.

Always-blocked ranges go into ``egressDeny``, which Cilium evaluates before any allow,
so even a name that resolves to 169.254.169.254 cannot reach it. (CIDR rules do not
apply to traffic between Cilium-managed endpoints, so denying cluster ranges does not
cut the pod off from kube-dns, nor 169.254.0.0/16 from NodeLocal DNSCache, whose
address Cilium redirects to the node-local-dns pods.) CIDR entries also carry the blocked ranges as ``except``.

``ingress: [{}]`` and ``enableDefaultDeny`` put the pod in default deny both ways.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .destinations import parse_networks, plan_destinations
from .kube import NODE_LOCAL_DNS_PODS, group_by_l4, match_labels, metadata
from .model import EgressPolicy, IPNetwork, PortRange

API_VERSION = "cilium.io/v2"
KUBE_DNS_ENDPOINT = {"k8s:io.kubernetes.pod.namespace": "kube-system", "k8s:k8s-app": "kube-dns"}
#: Cilium serves NodeLocal DNSCache through a Local Redirect Policy: 169.254.20.10 is
#: translated to the node's node-local-dns pod before policy applies, so the rule selects
#: those endpoints (a CIDR rule for the address would never match)
NODE_LOCAL_DNS_ENDPOINT = {"k8s:io.kubernetes.pod.namespace": "kube-system",
                           **{f"k8s:{k}": v for k, v in NODE_LOCAL_DNS_PODS.items()}}
_MAX_PORTS_PER_RULE = 40  # the CRD's maxItems for toPorts[].ports


def compile_cilium(
    policy: EgressPolicy,
    *,
    namespace: str,
    pod_selector: Mapping[str, str],
    name: str = "sandbox-egress",
    always_blocked: Sequence[str | IPNetwork],
    node_local_dns: bool = False,
    labels: Mapping[str, str] | None = None,
) -> list[dict]:
    """Return ``[CiliumNetworkPolicy]`` enforcing ``policy`` for the selected pods."""
    blocked = parse_networks(always_blocked)
    egress: list[dict] = []
    if policy.mode == "allowlist":
        egress += _dns_rules(node_local_dns)
        plan = plan_destinations(policy, None, blocked)
        for (protocol, ports), group in group_by_l4(plan.destinations).items():
            names = [d for d in group if d.entry.kind in ("domain", "wildcard")]
            if names:
                rule: dict = {
                    "toFQDNs": [
                        {"matchPattern": d.entry.value} if d.entry.kind == "wildcard" else {"matchName": d.entry.value}
                        for d in names
                    ]
                }
                egress.append(_with_ports(rule, _to_ports(protocol, ports)))
            blocks = sorted({b for d in group if d.entry.kind == "cidr" for b in d.blocks}, key=lambda b: (b.cidr.version, b.cidr))
            if blocks:
                cidr_set = []
                for block in blocks:
                    item: dict = {"cidr": str(block.cidr)}
                    if block.excepted:
                        item["except"] = [str(n) for n in block.excepted]
                    cidr_set.append(item)
                egress.append(_with_ports({"toCIDRSet": cidr_set}, _to_ports(protocol, ports)))
    spec: dict = {
        "endpointSelector": match_labels(pod_selector),
        "enableDefaultDeny": {"egress": True, "ingress": True},
        "ingress": [{}],
        "egress": egress or [{}],
        "egressDeny": [{"toCIDRSet": [{"cidr": str(net)} for net in blocked]}],
    }
    return [
        {
            "apiVersion": API_VERSION,
            "kind": "CiliumNetworkPolicy",
            "metadata": metadata(name, namespace, policy, labels),
            "spec": spec,
        }
    ]


def _dns_rules(node_local_dns: bool) -> list[dict]:
    """DNS to kube-dns (and NodeLocal DNSCache), through Cilium's DNS proxy."""

    def to_ports() -> list[dict]:
        return [{"ports": [{"port": "53", "protocol": "ANY"}], "rules": {"dns": [{"matchPattern": "*"}]}}]

    endpoints = [{"matchLabels": dict(KUBE_DNS_ENDPOINT)}]
    if node_local_dns:
        endpoints.append({"matchLabels": dict(NODE_LOCAL_DNS_ENDPOINT)})
    return [{"toEndpoints": endpoints, "toPorts": to_ports()}]


def _to_ports(protocol: str | None, ports: tuple[PortRange, ...]) -> list[dict]:
    cilium_protocol = protocol.upper() if protocol else "ANY"
    if not ports:
        # port "0" is "every port" in Cilium; only needed to pin the protocol
        return [{"ports": [{"port": "0", "protocol": cilium_protocol}]}] if protocol else []
    items = []
    for lo, hi in ports:
        item: dict = {"port": str(lo), "protocol": cilium_protocol}
        if hi > lo:
            item["endPort"] = hi
        items.append(item)
    return [{"ports": items[i : i + _MAX_PORTS_PER_RULE]} for i in range(0, len(items), _MAX_PORTS_PER_RULE)]


def _with_ports(rule: dict, to_ports: list[dict]) -> dict:
    if to_ports:
        rule["toPorts"] = to_ports
    return rule

