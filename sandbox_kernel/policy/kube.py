"""Pieces every Kubernetes compiler shares: object metadata, selectors, port lists.

Used by compile_networkpolicy.py, compile_gke.py and compile_cilium.py.
Names, namespaces and labels come from the caller (the Kubernetes backend), so they are
validated here once: a bad value is a PolicyError before any object is built, never a
half-valid manifest.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping

from ..errors import PolicyError
from .destinations import Destination
from .model import EgressPolicy, PortRange

MANAGED_BY = {"app.kubernetes.io/managed-by": "sandbox-kernel"}

#: the cluster DNS pods, by labels that exist on every conformant cluster (the
#: ``kubernetes.io/metadata.name`` namespace label is set by the API server itself)
KUBE_DNS_NAMESPACE = {"kubernetes.io/metadata.name": "kube-system"}
KUBE_DNS_PODS = {"k8s-app": "kube-dns"}
#: NodeLocal DNSCache: the link-local address it answers on, and its pods' label (on
#: GKE Dataplane V2 and Cilium the address is redirected to these pods, which the
#: policy then sees as the destination)
NODE_LOCAL_DNS = "169.254.20.10/32"
NODE_LOCAL_DNS_PODS = {"k8s-app": "node-local-dns"}
#: Cloud DNS for GKE answers on the metadata server's address, port 53 (never any other
#: port of that address: 80 is the metadata server with the node's credentials)
GKE_METADATA_DNS = "169.254.169.254/32"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def check_name(name: str, what: str = "object name") -> str:
    if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        raise PolicyError(f"{what} {name!r} is not a valid Kubernetes name (lowercase DNS subdomain)")
    return name


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or len(namespace) > 63 or not _DNS_LABEL.match(namespace):
        raise PolicyError(f"namespace {namespace!r} is not a valid Kubernetes namespace (lowercase DNS label)")
    return namespace


def check_labels(labels: Mapping[str, str], what: str) -> dict[str, str]:
    """Validate label keys and values (selectors and metadata labels)."""
    out = {}
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))) or not (
            0 < len(name) <= 63 and _LABEL_NAME.match(name)
        ):
            raise PolicyError(f"{what}: {key!r} is not a valid label key")
        if not isinstance(value, str) or len(value) > 63 or (value and not _LABEL_NAME.match(value)):
            raise PolicyError(f"{what}: value {value!r} of {key!r} is not a valid label value")
        out[key] = value
    return out


def metadata(name: str, namespace: str | None, policy: EgressPolicy, labels: Mapping[str, str] | None) -> dict:
    """``metadata`` for an emitted object: name, namespace, and who manages it."""
    meta: dict = {"name": check_name(name)}
    if namespace is not None:
        meta["namespace"] = check_namespace(namespace)
    meta["labels"] = {**MANAGED_BY, "sandbox-kernel/policy": policy.name, **check_labels(labels or {}, "labels")}
    return meta


def match_labels(selector: Mapping[str, str]) -> dict:
    """A ``matchLabels`` selector. Empty is refused: it would select every pod."""
    if not selector:
        raise PolicyError("pod_selector must not be empty: it would select every pod in the namespace")
    return {"matchLabels": check_labels(selector, "pod_selector")}


def child_name(base: str, suffix: str) -> str:
    """``base-suffix`` as a valid name, shortened with a hash when it would be too long."""
    name = f"{base}-{suffix}"
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    return f"{name[:242]}-{digest}"


def group_by_l4(
    destinations: Iterable[Destination],
) -> dict[tuple[str | None, tuple[PortRange, ...]], list[Destination]]:
    """Destinations grouped by (protocol, ports), groups in a deterministic order."""
    groups: dict[tuple[str | None, tuple[PortRange, ...]], list[Destination]] = {}
    for dest in destinations:
        groups.setdefault((dest.protocol, dest.ports), []).append(dest)
    return {key: groups[key] for key in sorted(groups, key=lambda k: (k[0] or "", k[1]))}


def expand_ports(ports: tuple[PortRange, ...], limit: int) -> list[int] | None:
    """Single ports of ``ports``, or None if there are more than ``limit``."""
    total = sum(hi - lo + 1 for lo, hi in ports)
    if total > limit:
        return None
    return [port for lo, hi in ports for port in range(lo, hi + 1)]
