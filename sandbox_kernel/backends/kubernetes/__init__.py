"""The Kubernetes backend: one namespace per user, one pod per kernel, cells over exec.

Selected with ``c.SandboxKernel.backend_name = "kubernetes"``. One
:class:`KubernetesBackend` per kernel, created by the kernel; the Session is its only
caller. What it does on :meth:`~KubernetesBackend.start`:

1. ``GET`` the user's namespace. If its ``sandbox-kernel.io/setup`` annotation matches
   the hash of what this configuration wants there, skip to 3.
2. Server-side apply (field manager ``sandbox-kernel``): Namespace, ServiceAccount,
   ResourceQuota, LimitRange, default-deny NetworkPolicy, agent ConfigMap; then the
   namespace again with the setup annotation (last, so a half-done setup is redone).
3. Apply the kernel's egress policy objects (compiled by :mod:`sandbox_kernel.policy`).
4. Create the pod, then WATCH the pod and its events from the create's
   resourceVersion (no polling) until Ready, reporting progress lines.

:meth:`~KubernetesBackend.attach` execs ``agent.pyz attach`` in the pod over the
WebSocket exec API; the agent itself is the pod's main process, so a dropped stream
is re-attached without losing state.

Every Kubernetes call is blocking in the official client, so each runs in a thread
(``asyncio.to_thread``). Cluster credentials are loaded lazily on first use, never at
import. :data:`REQUIRED_PERMISSIONS` lists every API call this package makes; the Helm
chart's RBAC and the tests check against it.

The package's modules: ``backend.py`` (``KubernetesBackend``: configuration, start, policy
objects, stop; ``gc``), ``api.py`` (API access, server-side apply), ``errors.py`` (the typed
errors and the mapping of API errors to them), ``permissions.py`` (:data:`REQUIRED_PERMISSIONS`),
``start.py`` (start tracking), ``watch.py`` (watches in threads), ``transport.py`` (the exec
stream), ``cleanup.py`` (the orphan sweep), ``objects.py`` and ``slug.py`` (pure builders of
the objects and names), ``doctor.py`` (``sandbox-kernel doctor --backend kubernetes``).
The names below are imported on first use: ``import sandbox_kernel.backends.kubernetes``
loads nothing else, and the package's modules may import one another through it without a
cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

#: public name -> the module of this package that defines it
_EXPORTS = {
    "KubernetesBackend": "backend",
    "gc": "backend",
    "gc_command": "backend",
    "SETUP_ANNOTATION": "backend",
    "MIN_CLIENT_VERSION": "api",
    "FIELD_MANAGER": "api",
    "check_client_version": "api",
    "KubernetesUnavailable": "errors",
    "KubernetesForbidden": "errors",
    "KubernetesRefused": "errors",
    "QuotaExceeded": "errors",
    "ImagePullFailed": "errors",
    "Unschedulable": "errors",
    "ENFORCER_KINDS": "permissions",
    "REQUIRED_PERMISSIONS": "permissions",
    "CLUSTER_SCOPED": "permissions",
    "required_permissions": "permissions",
    "StartTracker": "start",
    "pod_alive": "start",
    "describe_pod_end": "start",
    "ExecTransport": "transport",
    # for doctor.py, which reads the backend's settings as the backend does
    "_yes": "backend",
    "_NotFound": "errors",
}

#: the package's modules, reachable as attributes (``kubernetes.objects.MANAGED_BY_LABEL``)
_MODULES = {"api", "backend", "cleanup", "doctor", "errors", "objects", "permissions", "slug", "start",
            "transport", "watch"}

__all__ = ["CLUSTER_SCOPED", "ENFORCER_KINDS", "FIELD_MANAGER", "MIN_CLIENT_VERSION", "REQUIRED_PERMISSIONS",
           "SETUP_ANNOTATION", "ExecTransport", "ImagePullFailed", "KubernetesBackend", "KubernetesForbidden",
           "KubernetesRefused", "KubernetesUnavailable", "QuotaExceeded", "StartTracker", "Unschedulable",
           "check_client_version", "describe_pod_end", "gc", "gc_command", "pod_alive", "required_permissions"]

if TYPE_CHECKING:
    from .api import FIELD_MANAGER, MIN_CLIENT_VERSION, check_client_version
    from .backend import SETUP_ANNOTATION, KubernetesBackend, gc, gc_command
    from .errors import (
        ImagePullFailed, KubernetesForbidden, KubernetesRefused, KubernetesUnavailable, QuotaExceeded, Unschedulable,
    )
    from .permissions import CLUSTER_SCOPED, ENFORCER_KINDS, REQUIRED_PERMISSIONS, required_permissions
    from .start import StartTracker, describe_pod_end, pod_alive
    from .transport import ExecTransport


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, _MODULES)
