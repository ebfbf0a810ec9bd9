"""One entry point to every compiler: ``render(policy, enforcer, **options)``.

Called by the backends (which enforcer is configuration: the local backend always uses
``nftables``; the Kubernetes backend uses its configured list) and by
``sandbox-kernel policy render``. Returns the nftables script as text, or a list of
Kubernetes objects as plain dicts, ready for ``yaml.safe_dump_all`` or an API client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import PolicyError
from .compile_cilium import compile_cilium
from .compile_gke import compile_gke_fqdn
from .compile_networkpolicy import compile_networkpolicy
from .compile_nftables import compile_nftables
from .destinations import AddressScreen
from .model import EgressPolicy, IPNetwork

#: Istio is not one: as built it could not work (nothing labelled namespaces for injection,
#: istio-init needs NET_ADMIN under Pod Security "restricted", the default deny cut the
#: sidecar from istiod, one namespace-wide Sidecar was shared by a user's kernels, and
#: its AuthorizationPolicy in istio-system leaked) — see docs/policy.md
ENFORCERS = ("nftables", "networkpolicy", "gke-fqdn", "cilium")


class UnknownEnforcer(PolicyError):
    """An enforcer name that is not one of :data:`ENFORCERS`."""

    ename = "UnknownEnforcer"

    def __init__(self, enforcer: str):
        self.enforcer = enforcer
        super().__init__(f"unknown enforcer {enforcer!r}; choose one of {', '.join(ENFORCERS)}")


def default_always_blocked() -> tuple[IPNetwork, ...]:
    """The always-blocked set of a default :class:`AdminPolicy` (config and env applied)."""
    from .admin import AdminPolicy  # traitlets is only needed when no set is passed

    return AdminPolicy().blocked_networks()


def render(
    policy: EgressPolicy,
    enforcer: str,
    *,
    namespace: str = "sandbox",
    pod_selector: Mapping[str, str] | None = None,
    name: str = "sandbox-egress",
    resolved: Mapping[str, Sequence[str]] | None = None,
    resolver: str | None = None,
    always_blocked: Sequence[str | IPNetwork] | None = None,
    node_local_dns: bool = False,
    gke_cloud_dns: bool = False,
    table: str = "sandbox_kernel",
    nflog_group: int = 42,
    screen: AddressScreen | None = None,
) -> str | list[dict]:
    """Compile ``policy`` for ``enforcer``: nft text for ``nftables``, object dicts otherwise.

    ``gke-fqdn`` returns the NetworkPolicy (default deny, DNS, CIDR entries) followed by
    the FQDNNetworkPolicy for the names, because GKE's FQDN policy only adds to it.
    ``screen`` decides which resolved addresses a domain may open; without one, only
    globally routable addresses outside ``always_blocked``.
    """
    if enforcer not in ENFORCERS:
        raise UnknownEnforcer(enforcer)
    blocked = tuple(always_blocked) if always_blocked is not None else default_always_blocked()
    if enforcer == "nftables":
        return compile_nftables(
            policy, table=table, resolved=resolved, resolver=resolver, always_blocked=blocked, nflog_group=nflog_group,
            screen=screen,
        )
    if not pod_selector:
        raise PolicyError(f"the {enforcer} enforcer needs a pod selector (the labels of the sandbox pod)")
    if enforcer == "cilium":
        return compile_cilium(
            policy, namespace=namespace, pod_selector=pod_selector, name=name,
            always_blocked=blocked, node_local_dns=node_local_dns,
        )
    objects = compile_networkpolicy(
        policy, namespace=namespace, pod_selector=pod_selector, name=name, resolved=resolved,
        always_blocked=blocked, node_local_dns=node_local_dns, gke_cloud_dns=gke_cloud_dns,
        include_domains=enforcer == "networkpolicy", screen=screen,
    )
    if enforcer == "gke-fqdn":
        objects += compile_gke_fqdn(policy, namespace=namespace, pod_selector=pod_selector, name=f"{name}-fqdn")
    return objects
