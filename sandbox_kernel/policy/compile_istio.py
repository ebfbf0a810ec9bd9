"""Compile an egress policy to Istio objects: ServiceEntry, Sidecar, AuthorizationPolicy.

Called through ``enforcers.render(..., "istio")`` for clusters whose sandbox namespaces
are in an Istio mesh. **Istio alone is not a secure egress control.** The sidecar runs
in the same pod as the code it is supposed to restrict: code that bypasses the proxy
(a raw socket with CAP_NET_RAW, UDP, which the sidecar does not capture, traffic
excluded from capture, or a pod without injection) is not stopped by anything here.
Always combine this enforcer with the NetworkPolicy enforcer, which is enforced outside
the pod, and treat these objects as defence in depth and as per-host visibility.

What is emitted (allowlist mode):

* one ``ServiceEntry`` per allowed host (``resolution: DNS``; ``NONE`` for wildcards,
  which Istio cannot resolve), exported to the sandbox namespace only, and one per CIDR
  entry (``addresses``, with the always-blocked ranges subtracted);
* a namespace-wide ``Sidecar`` with ``outboundTrafficPolicy: REGISTRY_ONLY``, so the
  proxy refuses destinations without a ServiceEntry (emitted in deny mode too);
* an ``AuthorizationPolicy`` for the egress gateway allowing this namespace's workloads
  exactly these hosts and ports, for meshes that route egress through the gateway.

Istio specifics the docs repeat: a ServiceEntry needs ports, so an entry without
ports is narrowed to 80 (HTTP) and 443 (TLS); UDP-only entries are left out (the sidecar
does not proxy UDP); Istio's ``*.example.com`` also matches deeper names
(``a.b.example.com``), wider than our one-label wildcard, which the NetworkPolicy
enforcer does not open anyway.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .destinations import parse_networks, plan_destinations
from .kube import check_namespace, child_name, expand_ports, match_labels, metadata
from .model import EgressPolicy, Entry, IPNetwork, UnsupportedByEnforcer

NETWORKING = "networking.istio.io/v1"
SECURITY = "security.istio.io/v1"
DEFAULT_PORTS = ((80, "HTTP"), (443, "TLS"))
MAX_PORTS = 256  # the CRD's maxItems for ports
MAX_ADDRESSES = 256  # the CRD's maxItems for addresses
_WELL_KNOWN = {80: "HTTP", 443: "TLS"}


def compile_istio(
    policy: EgressPolicy,
    *,
    namespace: str,
    name: str = "sandbox-egress",
    always_blocked: Sequence[str | IPNetwork],
    sidecar_name: str = "default",
    egress_gateway_namespace: str = "istio-system",
    egress_gateway_selector: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> list[dict]:
    """Return the Sidecar, the ServiceEntries and the gateway AuthorizationPolicy.

    The Sidecar and ServiceEntries apply to the whole namespace (a user's sandboxes
    share it); the AuthorizationPolicy lives in ``egress_gateway_namespace``.
    """
    check_namespace(egress_gateway_namespace)
    gateway_selector = egress_gateway_selector or {"istio": "egressgateway"}
    objects: list[dict] = [
        {
            "apiVersion": NETWORKING,
            "kind": "Sidecar",
            "metadata": metadata(sidecar_name, namespace, policy, labels),
            "spec": {
                "egress": [{"hosts": ["./*", f"{egress_gateway_namespace}/*"]}],
                "outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"},
            },
        }
    ]
    if policy.mode != "allowlist":
        return objects

    plan = plan_destinations(policy, None, parse_networks(always_blocked))
    hosts: dict[str, dict[int, str]] = {}  # host -> {port: protocol}
    cidrs: list[tuple[Entry, list[IPNetwork], dict[int, str]]] = []
    for dest in plan.destinations:
        entry = dest.entry
        if entry.protocol == "udp":
            continue
        ports = _ports(entry)
        if entry.kind == "cidr":
            nets = [n for block in dest.blocks for n in block.networks()]
            if len(nets) > MAX_ADDRESSES:
                raise UnsupportedByEnforcer(entry, "istio", f"more than {MAX_ADDRESSES} networks after removing blocked ranges")
            cidrs.append((entry, nets, ports))
        else:
            merged = hosts.setdefault(entry.value, {})
            merged.update(ports)
            if len(merged) > MAX_PORTS:
                raise UnsupportedByEnforcer(entry, "istio", f"its host would list more than {MAX_PORTS} ports")

    for host, ports in sorted(hosts.items()):
        objects.append(_service_entry(policy, child_name(name, host.replace("*", "wildcard")), namespace, labels,
                                      hosts=[host], resolution="NONE" if host.startswith("*") else "DNS", ports=ports))
    for entry, nets, ports in cidrs:
        slug = str(entry.network).replace("/", "-").replace(":", "-").replace(".", "-").strip("-")
        objects.append(_service_entry(policy, child_name(name, f"cidr-{slug}"), namespace, labels,
                                      hosts=[f"cidr-{slug}.sandbox-kernel.internal"], resolution="NONE",
                                      ports=ports, addresses=[str(n) for n in nets]))
    if hosts:
        objects.append(_gateway_authorization(policy, name, namespace, labels, egress_gateway_namespace, gateway_selector, hosts))
    return objects


def _ports(entry: Entry) -> dict[int, str]:
    if not entry.ports:
        return dict(DEFAULT_PORTS)
    single = expand_ports(entry.ports, MAX_PORTS)
    if single is None:
        raise UnsupportedByEnforcer(entry, "istio", f"a ServiceEntry lists single ports and this is more than {MAX_PORTS}")
    return {port: _WELL_KNOWN.get(port, "TCP") for port in single}


def _service_entry(policy, name, namespace, labels, *, hosts, resolution, ports, addresses=None) -> dict:
    spec: dict = {"hosts": hosts}
    if addresses:
        spec["addresses"] = addresses
    spec.update(
        {
            "location": "MESH_EXTERNAL",
            "resolution": resolution,
            "ports": [{"number": p, "name": f"{proto.lower()}-{p}", "protocol": proto} for p, proto in sorted(ports.items())],
            "exportTo": ["."],
        }
    )
    return {"apiVersion": NETWORKING, "kind": "ServiceEntry", "metadata": metadata(name, namespace, policy, labels), "spec": spec}


def _gateway_authorization(policy, name, namespace, labels, gateway_ns, gateway_selector, hosts) -> dict:
    rules = [
        {
            "from": [{"source": {"namespaces": [namespace]}}],
            "to": [{"operation": {"hosts": [host], "ports": [str(p) for p in sorted(ports)]}}],
        }
        for host, ports in sorted(hosts.items())
    ]
    return {
        "apiVersion": SECURITY,
        "kind": "AuthorizationPolicy",
        "metadata": metadata(child_name(name, namespace), gateway_ns, policy, labels),
        "spec": {"selector": match_labels(gateway_selector), "action": "ALLOW", "rules": rules},
    }
