"""Compile the domain entries of a policy to a GKE ``FQDNNetworkPolicy`` (networking.gke.io/v1alpha1).

Called through ``enforcers.render(..., "gke-fqdn")`` by the Kubernetes backend on GKE
clusters with FQDN network policy enabled (Dataplane V2). GKE resolves the names itself
and keeps the allowed addresses current, so nothing goes stale; wildcards work
(``*.pythonhosted.org`` → ``pattern``; in GKE ``*`` matches one label, as in our model).

FQDNNetworkPolicy only adds allowed traffic on top of Kubernetes NetworkPolicy, so the
gke-fqdn enforcer always emits it together with the NetworkPolicy from
compile_networkpolicy.py (default deny, DNS, CIDR entries). Limit (docs/policy.md): it
cannot except addresses, so a listed name that resolves into an always-blocked range is
reachable; on GKE the metadata server is protected separately (Workload Identity).

**One FQDNNetworkPolicy per name.** GKE programs at most 50 addresses per
FQDNNetworkPolicy (all its names together); one object listing every name of a policy
passes that with a handful of CDN names and GKE silently drops the rest. So each domain or
wildcard entry gets its own object (its ports in its one rule), named after a hash of the
entry: an unchanged entry keeps its object when the policy changes, a removed one's
object is deleted by the backend.

:func:`make_network_logging` builds the cluster-wide ``NetworkLogging`` object that turns
on logs of denied connections (the enforcer-log source of blocked notices on GKE).
"""

from __future__ import annotations

from collections.abc import Mapping

from .destinations import plan_destinations
import hashlib

from .kube import child_name, match_labels, metadata, expand_ports
from .model import EgressPolicy, PortRange, UnsupportedByEnforcer

API_VERSION = "networking.gke.io/v1alpha1"
#: more single ports than this in one entry is refused rather than silently widened
MAX_PORTS = 256


def compile_gke_fqdn(
    policy: EgressPolicy,
    *,
    namespace: str,
    pod_selector: Mapping[str, str],
    name: str = "sandbox-egress-fqdn",
    labels: Mapping[str, str] | None = None,
) -> list[dict]:
    """Return one ``FQDNNetworkPolicy`` per domain or wildcard entry (``[]`` if none), each
    named ``<name>-<hash of the entry>``."""
    plan = plan_destinations(policy, None, ())
    named = sorted((d for d in plan.destinations if d.entry.kind in ("domain", "wildcard")),
                   key=lambda d: d.entry.sort_key)
    out = []
    for dest in named:
        entry = dest.entry
        rule: dict = {"matches": [{"pattern": entry.value} if entry.kind == "wildcard" else {"name": entry.value}]}
        port_list = _ports(entry.protocol, entry.ports, entry)
        if port_list:
            rule["ports"] = port_list
        digest = hashlib.sha256(str(entry).encode()).hexdigest()[:10]
        out.append({
            "apiVersion": API_VERSION,
            "kind": "FQDNNetworkPolicy",
            "metadata": metadata(child_name(name, digest), namespace, policy, labels),
            "spec": {"podSelector": match_labels(pod_selector), "egress": [rule]},
        })
    return out


def make_network_logging(*, log_denied: bool = True, log_allowed: bool = False, delegate: bool = False) -> dict:
    """The cluster-scoped ``NetworkLogging`` object (its name must be ``default``).

    With ``delegate=True`` denied connections are logged only for namespaces annotated
    ``policy.network.gke.io/enable-deny-logging: "true"`` (the backend annotates sandbox
    namespaces), so other workloads' logs are untouched.
    """
    return {
        "apiVersion": API_VERSION,
        "kind": "NetworkLogging",
        "metadata": {"name": "default"},
        "spec": {
            "cluster": {
                "allow": {"log": log_allowed, "delegate": delegate and log_allowed},
                "deny": {"log": log_denied, "delegate": delegate and log_denied},
            }
        },
    }


def _ports(protocol: str | None, ports: tuple[PortRange, ...], entry) -> list[dict]:
    protocols = [protocol.upper()] if protocol else ["TCP", "UDP"]
    if not ports:
        return [{"protocol": p} for p in protocols] if protocol else []
    single = expand_ports(ports, MAX_PORTS)
    if single is None:
        raise UnsupportedByEnforcer(
            entry, "gke-fqdn", f"FQDNNetworkPolicy has no port ranges and more than {MAX_PORTS} ports would be listed"
        )
    return [{"port": port, "protocol": p} for p in protocols for port in single]
