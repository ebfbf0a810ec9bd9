"""The Kubernetes backend's access to the API server.

The official client is imported on first use, never at import; credentials are loaded lazily
(:meth:`ApiAccess.configuration`): a given ``client_configuration``, else in-cluster config in a
pod, else kubeconfig. Every call goes through :meth:`ApiAccess._call`, which turns the client's
exceptions into the typed errors of errors.py; objects are written by server-side apply
(:meth:`ApiAccess.apply_object`, field manager :data:`FIELD_MANAGER`).
"""

from __future__ import annotations

import os
import re
import threading

from .errors import KubernetesUnavailable, _api_error
from .permissions import ENFORCER_KINDS

#: the oldest official client this backend works with (pyproject.toml declares it; CI runs
#: the fake-API-server suite with exactly this version): server-side apply passes
#: ``_content_type`` to the typed patch methods, which clients before 37 refuse
MIN_CLIENT_VERSION = (37, 0, 0)

FIELD_MANAGER = "sandbox-kernel"


def check_client_version(version: str | None = None) -> str:
    """The installed ``kubernetes`` client's version; KubernetesUnavailable when it is older
    than :data:`MIN_CLIENT_VERSION` (called by check() and the doctor, before any call
    could fail halfway with a TypeError deep in the client)."""
    if version is None:
        try:
            import kubernetes
        except ImportError:
            raise KubernetesUnavailable("the kubernetes backend needs the official client: "
                                        "pip install 'sandbox-kernel[kubernetes]'") from None
        version = kubernetes.__version__
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    wanted = ".".join(map(str, MIN_CLIENT_VERSION))
    if parts < MIN_CLIENT_VERSION:
        raise KubernetesUnavailable(
            f"the kubernetes Python client {version} is too old: the kubernetes backend needs {wanted} "
            f"or later (pip install 'kubernetes>={wanted}', or 'sandbox-kernel[kubernetes]')")
    return version


def _plural(group: str, kind: str) -> str:
    for kinds in ENFORCER_KINDS.values():
        for g, _, plural in kinds:
            if g == group and plural.rstrip("s") in (kind.lower(), kind.lower().rstrip("y") + "ie"):
                return plural
    return kind.lower() + "s"


def _load_configuration(context: str | None):
    """In-cluster config when running in a pod, else kubeconfig. Raises KubernetesUnavailable."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and not context:
            config.load_incluster_config(client_configuration=cfg)
        else:
            # KUBECONFIG read now: the client reads it once, when kubernetes.config is imported
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, context=context,
                                    client_configuration=cfg)
    except Exception as err:  # noqa: BLE001 - the client raises several unrelated types here
        raise KubernetesUnavailable(
            "no Kubernetes credentials: run the kernel in a pod with a service account, or provide a "
            f"kubeconfig (KUBECONFIG, ~/.kube/config; context: c.KubernetesBackend.context). ({err})"
        ) from None
    return cfg


class ApiAccess:
    """The API half of :class:`~sandbox_kernel.backends.kubernetes.KubernetesBackend` (which
    inherits it and calls :meth:`_reset_api` when it is made). Reads the backend's
    ``client_configuration`` and ``context`` settings."""

    client_configuration: object
    context: str | None

    def _reset_api(self) -> None:
        self._api_client = None
        self._config = None
        self._config_lock = threading.Lock()

    def configuration(self):
        """The client Configuration: given, in-cluster, or kubeconfig — loaded once, on first use."""
        with self._config_lock:
            if self._config is None:
                if self.client_configuration is not None:
                    self._config = self.client_configuration
                else:
                    self._config = _load_configuration(self.context)
            return self._config

    def api_client(self):
        """The shared ``ApiClient`` for REST calls (exec uses its own, see :meth:`attach`)."""
        from kubernetes import client

        if self._api_client is None:
            self._api_client = client.ApiClient(self.configuration())
        return self._api_client

    def _core(self):
        from kubernetes import client

        return client.CoreV1Api(self.api_client())

    def apply_object(self, body: dict) -> dict:
        """Server-side apply one object (typed API for core/networking kinds, custom objects
        for CRDs) with field manager ``sandbox-kernel``. The seam the policy objects go through."""
        from kubernetes import client

        api_version, kind = body["apiVersion"], body["kind"]
        name = body["metadata"]["name"]
        ns = body["metadata"].get("namespace")
        kw = {"field_manager": FIELD_MANAGER, "force": True, "_content_type": "application/apply-patch+yaml"}
        api = self.api_client()
        typed = {
            ("v1", "Namespace"): ("namespaces", lambda: client.CoreV1Api(api).patch_namespace(name, body, **kw)),
            ("v1", "ServiceAccount"): ("serviceaccounts", lambda: client.CoreV1Api(api).patch_namespaced_service_account(name, ns, body, **kw)),
            ("v1", "ResourceQuota"): ("resourcequotas", lambda: client.CoreV1Api(api).patch_namespaced_resource_quota(name, ns, body, **kw)),
            ("v1", "LimitRange"): ("limitranges", lambda: client.CoreV1Api(api).patch_namespaced_limit_range(name, ns, body, **kw)),
            ("v1", "ConfigMap"): ("configmaps", lambda: client.CoreV1Api(api).patch_namespaced_config_map(name, ns, body, **kw)),
            ("networking.k8s.io/v1", "NetworkPolicy"): ("networkpolicies", lambda: client.NetworkingV1Api(api).patch_namespaced_network_policy(name, ns, body, **kw)),
            ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("rolebindings", lambda: client.RbacAuthorizationV1Api(api).patch_namespaced_role_binding(name, ns, body, **kw)),
        }
        if (api_version, kind) in typed:
            resource, call = typed[(api_version, kind)]
            group = api_version.rpartition("/")[0]
            result = self._call("patch", resource, ns, call, group=group)
            return api.sanitize_for_serialization(result)
        group, _, version = api_version.partition("/")
        plural = _plural(group, kind)
        return self._call("patch", plural, ns, lambda: client.CustomObjectsApi(api).patch_namespaced_custom_object(
            group, version, ns, plural, name, body, **kw), group=group)

    def _call(self, verb: str, resource: str, namespace: str | None, fn, *args, group: str = "", **kwargs):
        """Run one API call; turn ApiException into a typed error naming verb and resource."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as err:
            raise _api_error(err, verb, resource if not group else f"{resource}.{group}", namespace) from None
        except HTTPError as err:
            raise KubernetesUnavailable(
                f"cannot reach the Kubernetes API server at {self.configuration().host}: {err}") from None
