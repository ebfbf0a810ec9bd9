"""The errors a user of the Kubernetes backend can hit, and how an API error becomes one.

:func:`_api_error` (pure) maps an ``ApiException`` to the typed error naming the verb, the
resource and what to do; ``ApiAccess._call`` (api.py) applies it to every call.
"""

from __future__ import annotations

import json
import re

from ...errors import SandboxError, SandboxStartError


# --- errors a user can hit ---------------------------------------------------------

class KubernetesUnavailable(SandboxStartError):
    """No credentials, or the API server cannot be reached."""

    ename = "KubernetesUnavailable"


class KubernetesForbidden(SandboxStartError):
    """RBAC refused one call; names the verb and the resource."""

    ename = "KubernetesForbidden"

    def __init__(self, verb: str, resource: str, namespace: str | None, detail: str = ""):
        self.verb, self.resource, self.namespace = verb, resource, namespace
        where = f' in namespace "{namespace}"' if namespace else ""
        super().__init__(
            f"Kubernetes refused to let the kernel {verb} {resource}{where} (RBAC: forbidden). "
            f"Ask your administrator to grant the kernel's service account '{verb}' on '{resource}' "
            f"(the Helm chart's RBAC does; see docs/kubernetes.md).{_detail(detail)}"
        )


class KubernetesRefused(SandboxStartError):
    """A 403 that is not RBAC: Pod Security admission, an admission webhook or policy
    (GKE Autopilot's), a namespace being deleted. Quotes the server's reason."""

    ename = "KubernetesRefused"

    #: what refused, from the server's message: (cause, pattern, what the user should do)
    CAUSES: tuple[tuple[str, str, str], ...] = (
        ("namespace-terminating", r"because it is being terminated|NamespaceTerminating",
         "the namespace is being deleted; start the kernel again once it is gone"),
        ("pod-security", r"violates PodSecurity",
         "Pod Security admission refused the sandbox pod; the image or c.KubernetesBackend settings "
         "(runtime class, security context) must fit the namespace's level, or the namespace's "
         "pod-security labels were changed"),
        ("admission-webhook", r'admission webhook "[^"]*" denied',
         "an admission webhook of the cluster refused it (on GKE Autopilot: Autopilot's own rules); "
         "ask your administrator"),
        ("admission-policy", r"ValidatingAdmissionPolicy",
         "a ValidatingAdmissionPolicy of the cluster refused it; ask your administrator"),
    )

    def __init__(self, verb: str, resource: str, namespace: str | None, cause: str, advice: str, detail: str):
        self.verb, self.resource, self.namespace, self.cause = verb, resource, namespace, cause
        where = f' in namespace "{namespace}"' if namespace else ""
        super().__init__(f"Kubernetes refused to {verb} {resource}{where}: {advice}.{_detail(detail)}")


class QuotaExceeded(SandboxStartError):
    """The user's ResourceQuota has no room for another sandbox."""

    ename = "QuotaExceeded"

    def __init__(self, namespace: str, detail: str):
        super().__init__(
            f"Your sandbox quota in namespace {namespace} is used up, so no new sandbox was started. "
            f"Shut down another notebook's kernel, or ask your administrator for a larger quota.{_detail(detail)}"
        )


class ImagePullFailed(SandboxStartError):
    """The node could not pull the sandbox image."""

    ename = "ImagePullFailed"

    def __init__(self, image: str, detail: str):
        self.image = image
        super().__init__(
            f"The sandbox image {image} could not be pulled. Check the image name and that the "
            f"cluster may pull it (c.KubernetesBackend.image / SANDBOX_KERNEL_K8S_IMAGE).{_detail(detail)}"
        )


class Unschedulable(SandboxStartError):
    """No node can run the sandbox pod."""

    ename = "Unschedulable"

    def __init__(self, detail: str, waited: float):
        super().__init__(
            f"No node could run the sandbox after {waited:.0f} s: the cluster is full or no node matches "
            f"the requested resources, node selector or tolerations. Try again later or ask your "
            f"administrator.{_detail(detail)}"
        )


def _detail(text: str) -> str:
    return f"\nKubernetes said: {text}" if text else ""


class _NotFound(SandboxError):
    ename = "NotFound"


def _status_message(err) -> tuple[str, str]:
    try:
        body = json.loads(err.body or "{}")
        return body.get("message", ""), body.get("reason", "")
    except (TypeError, ValueError):
        return str(err.body or err.reason or ""), ""


def _api_error(err, verb: str, resource: str, namespace: str | None) -> SandboxError:
    """An ApiException as the error a user should see (pure; the tests call it too)."""
    message, reason = _status_message(err)
    if err.status == 404:
        return _NotFound(message or f"{resource} not found")
    if err.status == 403 and ("exceeded quota" in message or "failed quota" in message):
        return QuotaExceeded(namespace or "?", message)
    if err.status == 403:
        # the RBAC authorizer's own phrasing; anything else is admission, not permissions
        if re.search(r'cannot [a-z]+ resource "', message):
            return KubernetesForbidden(verb, resource, namespace, message)
        for cause, pattern, advice in KubernetesRefused.CAUSES:
            if re.search(pattern, message) or re.search(pattern, err.body or ""):
                return KubernetesRefused(verb, resource, namespace, cause, advice, message)
        return KubernetesRefused(verb, resource, namespace, "forbidden",
                                 "the API server answered 403 Forbidden, not for a missing permission of the kernel's "
                                 "account but for the reason it gives below; show it to your administrator", message)
    if err.status == 401:
        return KubernetesUnavailable(f"the Kubernetes API server rejected the kernel's credentials (401): {message}")
    if err.status == 422:
        return SandboxStartError(f"Kubernetes rejected the {resource} object as invalid (a bug in "
                                 f"sandbox-kernel or its configuration): {message}")
    return SandboxStartError(f"Kubernetes could not {verb} {resource}: {err.status} {reason} {message}".strip())
