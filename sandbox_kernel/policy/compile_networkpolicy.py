"""Compile an egress policy to Kubernetes NetworkPolicy objects (``networking.k8s.io/v1``).

Called by the Kubernetes backend when it starts a sandbox pod and whenever the
policy changes or its DNS answers expire (:attr:`Resolution.expires_at`): NetworkPolicy
knows only addresses, so allowed domains become ``/32`` and ``/128`` ipBlocks of the
addresses resolved at apply time. Those go stale when a name's addresses change; the
backend re-resolves and re-applies on TTL expiry (docs/policy.md, "Limits").

One NetworkPolicy per sandbox pod selects it and:

* has ``policyTypes: [Ingress, Egress]`` and no ingress rule: nothing may connect in;
* in ``deny`` mode has no egress rule either: nothing leaves the pod, not even DNS;
* in ``allowlist`` mode allows DNS to the cluster DNS pods (namespace label
  ``kubernetes.io/metadata.name: kube-system`` AND pod label ``k8s-app: kube-dns``) on
  UDP and TCP 53, and (on by default in the backend, for GKE Autopilot and GKE Standard
  from 1.33) NodeLocal DNSCache (169.254.20.10 and its ``k8s-app: node-local-dns`` pods)
  and Cloud DNS for GKE (169.254.169.254), all in the one rule whose ports are 53 only,
  plus one rule per (protocol, ports) group listing the
  ipBlocks of the entries, with the always-blocked ranges inside a CIDR as ``except``.

Never emitted: ``namespaceSelector: {}`` (every namespace), or an egress rule without
``to`` (every destination). Wildcards cannot be expressed here and are left out: use the
gke-fqdn or cilium enforcer for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .destinations import AddressScreen, IPBlock, parse_networks, plan_destinations
from .kube import (
    GKE_METADATA_DNS,
    KUBE_DNS_NAMESPACE,
    KUBE_DNS_PODS,
    NODE_LOCAL_DNS,
    NODE_LOCAL_DNS_PODS,
    group_by_l4,
    metadata,
    match_labels,
)
from .model import EgressPolicy, IPNetwork, PortRange

API_VERSION = "networking.k8s.io/v1"


def compile_networkpolicy(
    policy: EgressPolicy,
    *,
    namespace: str,
    pod_selector: Mapping[str, str],
    name: str = "sandbox-egress",
    resolved: Mapping[str, Sequence[str]] | None,
    always_blocked: Sequence[str | IPNetwork],
    node_local_dns: bool = False,
    gke_cloud_dns: bool = False,
    include_domains: bool = True,
    labels: Mapping[str, str] | None = None,
    screen: AddressScreen | None = None,
) -> list[dict]:
    """Return ``[NetworkPolicy]`` enforcing ``policy`` for the pods ``pod_selector`` selects.

    ``include_domains=False`` leaves domain entries out (the gke-fqdn enforcer covers
    them with an FQDNNetworkPolicy next to this one). ``screen`` (the ceiling's
    :class:`~.destinations.AddressScreen`) decides which resolved addresses may be opened.
    """
    spec: dict = {
        "podSelector": match_labels(pod_selector),
        "policyTypes": ["Ingress", "Egress"],
    }
    egress = []
    if policy.mode == "allowlist":
        egress.append(dns_rule(node_local_dns=node_local_dns, gke_cloud_dns=gke_cloud_dns))
        plan = plan_destinations(policy, resolved, parse_networks(always_blocked), screen)
        destinations = [
            d for d in plan.destinations if include_domains or d.entry.kind != "domain"
        ]
        for (protocol, ports), group in group_by_l4(destinations).items():
            blocks = sorted({b for d in group for b in d.blocks}, key=lambda b: (b.cidr.version, b.cidr))
            if not blocks:
                continue  # a rule without `to` would allow every destination
            rule: dict = {"to": [{"ipBlock": ip_block(b)} for b in blocks]}
            port_list = np_ports(protocol, ports)
            if port_list:
                rule["ports"] = port_list
            egress.append(rule)
    if egress:
        spec["egress"] = egress
    return [
        {
            "apiVersion": API_VERSION,
            "kind": "NetworkPolicy",
            "metadata": metadata(name, namespace, policy, labels),
            "spec": spec,
        }
    ]


def make_default_deny(namespace: str, *, name: str = "sandbox-default-deny", labels: Mapping[str, str] | None = None) -> dict:
    """A NetworkPolicy denying all ingress and egress for every pod of ``namespace``.

    Created with each user namespace by the Kubernetes backend, so a pod is isolated even
    before (or if ever without) its own policy. ``podSelector: {}`` selects the pods of
    this namespace only.
    """
    return {
        "apiVersion": API_VERSION,
        "kind": "NetworkPolicy",
        "metadata": metadata(name, namespace, EgressPolicy(), labels),
        "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]},
    }


def dns_rule(*, node_local_dns: bool, gke_cloud_dns: bool) -> dict:
    """Egress to the cluster DNS on UDP and TCP 53 (TCP: answers too big for UDP).

    Every peer is in this one rule, so the link-local resolvers are reachable on port 53
    and nothing else (the metadata server's port 80 stays closed)."""
    peers: list[dict] = [
        {
            "namespaceSelector": {"matchLabels": dict(KUBE_DNS_NAMESPACE)},
            "podSelector": {"matchLabels": dict(KUBE_DNS_PODS)},
        }
    ]
    if node_local_dns:
        # the address (kube-proxy/iptables NodeLocal) and its pods (Dataplane V2 redirects there)
        peers.append({"ipBlock": {"cidr": NODE_LOCAL_DNS}})
        peers.append({"namespaceSelector": {"matchLabels": dict(KUBE_DNS_NAMESPACE)},
                      "podSelector": {"matchLabels": dict(NODE_LOCAL_DNS_PODS)}})
    if gke_cloud_dns:
        # GKE Cloud DNS answers on the metadata address; port 53 only, via this rule.
        peers.append({"ipBlock": {"cidr": GKE_METADATA_DNS}})
    return {"to": peers, "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}


def ip_block(block: IPBlock) -> dict:
    out: dict = {"cidr": str(block.cidr)}
    if block.excepted:
        out["except"] = [str(n) for n in block.excepted]
    return out


def np_ports(protocol: str | None, ports: tuple[PortRange, ...]) -> list[dict]:
    """NetworkPolicyPort list; empty means all ports and protocols (no ``ports`` key)."""
    protocols = [protocol.upper()] if protocol else ["TCP", "UDP"]
    if not ports:
        return [{"protocol": p} for p in protocols] if protocol else []
    out = []
    for p in protocols:
        for lo, hi in ports:
            item: dict = {"protocol": p, "port": lo}
            if hi > lo:
                item["endPort"] = hi
            out.append(item)
    return out
