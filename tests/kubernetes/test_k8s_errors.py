"""A 403 is called RBAC only when it is RBAC (issue 15, point 11).

Real API servers answer 403 for Pod Security admission, admission webhooks (GKE
Autopilot's), ValidatingAdmissionPolicies and namespaces being deleted, not only for
RBAC. The messages below are the servers' own phrasing; the fake API server sends them
back for a real start, so the whole path (client → _api_error → start) is exercised.
"""

from __future__ import annotations

import asyncio

import pytest

from sandbox_kernel.backends import kubernetes as kb
from sandbox_kernel.policy.model import EgressPolicy

NS = "user-sandbox-alice"
MESSAGES = {
    "rbac": ('pods is forbidden: User "system:serviceaccount:hub:sk" cannot create resource "pods" '
             f'in API group "" in the namespace "{NS}"'),
    "pod-security": ('pods "sandbox-x" is forbidden: violates PodSecurity "restricted:latest": '
                     'allowPrivilegeEscalation != false (container "agent" must set '
                     'securityContext.allowPrivilegeEscalation=false)'),
    "admission-webhook": ('admission webhook "warden-validating.common-webhooks.networking.gke.io" denied the '
                          "request: GKE Warden rejected the request because it violates one or more "
                          "constraints."),
    "admission-policy": ("pods \"sandbox-x\" is forbidden: ValidatingAdmissionPolicy 'sandbox-kernel-scope' with "
                         "binding 'sandbox-kernel-scope' denied request: only user-sandbox-* namespaces"),
    "namespace-terminating": (f'pods "sandbox-x" is forbidden: unable to create new content in namespace {NS} '
                              "because it is being terminated"),
    "forbidden": "pods is forbidden: something this project has never seen",
}


def _start(fakekube, message):
    fakekube.ensure_namespace(NS)
    fakekube.fail("create", "pods", 403, "Forbidden", message, times=None)
    backend = kb.KubernetesBackend(client_configuration=fakekube.configuration(), user="alice", start_timeout=20.0)
    backend.always_blocked = ["169.254.0.0/16"]
    return asyncio.run(asyncio.wait_for(backend.start("0ddba11", EgressPolicy(), lambda line: None), 30))


def test_rbac_is_still_called_rbac(fakekube):
    with pytest.raises(kb.KubernetesForbidden) as err:
        _start(fakekube, MESSAGES["rbac"])
    assert "(RBAC: forbidden)" in str(err.value) and MESSAGES["rbac"] in str(err.value)


@pytest.mark.parametrize("cause", ["pod-security", "admission-webhook", "admission-policy",
                                   "namespace-terminating", "forbidden"])
def test_other_refusals_quote_the_server_and_never_say_rbac(fakekube, cause):
    with pytest.raises(kb.KubernetesRefused) as err:
        _start(fakekube, MESSAGES[cause])
    text = str(err.value)
    assert err.value.cause == cause and err.value.ename == "KubernetesRefused"
    assert "RBAC" not in text and "grant" not in text
    assert "Kubernetes said: " in text and MESSAGES[cause] in text
    assert not isinstance(err.value, kb.KubernetesForbidden)


def test_quota_stays_quota(fakekube):
    fakekube.ensure_namespace(NS)
    fakekube.exceed_quota(NS)
    backend = kb.KubernetesBackend(client_configuration=fakekube.configuration(), user="alice")
    with pytest.raises(kb.QuotaExceeded):
        asyncio.run(asyncio.wait_for(backend.start("0ddba12", EgressPolicy(), lambda line: None), 30))
