"""What the fake API server knows about kinds: URL names, scope, validation, selectors.

Pure helpers used by :mod:`fakekube.server`. Nothing here does I/O except reading the
JSON schemas shipped with ``kubernetes-validate`` (cached).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import jsonschema
import kubernetes_validate
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource as SchemaResource

#: the Kubernetes version whose schemas validate stored objects
SCHEMA_VERSION = "1.37"


@dataclass(frozen=True)
class ResourceType:
    """One REST resource (``pods``, ``fqdnnetworkpolicies`` …)."""

    group: str  # "" for core
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    #: True for kinds with a schema in kubernetes-validate (custom resources have none here)
    builtin: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)


RESOURCE_TYPES = [
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount"),
    ResourceType("", "v1", "resourcequotas", "ResourceQuota"),
    ResourceType("", "v1", "limitranges", "LimitRange"),
    ResourceType("", "v1", "configmaps", "ConfigMap"),
    ResourceType("", "v1", "pods", "Pod"),
    ResourceType("", "v1", "events", "Event"),
    ResourceType("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy"),
    ResourceType("apps", "v1", "daemonsets", "DaemonSet"),
    ResourceType("node.k8s.io", "v1", "runtimeclasses", "RuntimeClass", namespaced=False),
    ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                 "CustomResourceDefinition", namespaced=False),
    ResourceType("networking.gke.io", "v1alpha1", "fqdnnetworkpolicies", "FQDNNetworkPolicy", builtin=False),
    ResourceType("cilium.io", "v2", "ciliumnetworkpolicies", "CiliumNetworkPolicy", builtin=False),
]

BY_URL = {(r.group, r.version, r.plural): r for r in RESOURCE_TYPES}


class Invalid(Exception):
    """An object the real API server would reject with 422 Unprocessable Entity."""

    def __init__(self, field: str, message: str, reason: str = "FieldValueInvalid"):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.reason = reason


# --- names and labels (what apimachinery's validation enforces beyond the schema) ---

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_PART = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def check_metadata(rtype: ResourceType, obj: dict) -> None:
    """Raise :class:`Invalid` for a bad name, label or annotation."""
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    if rtype.plural in ("namespaces", "pods") or rtype.plural == "serviceaccounts":
        ok = len(name) <= 63 and _DNS_LABEL.match(name) if rtype.plural == "namespaces" else (
            len(name) <= 253 and _DNS_SUBDOMAIN.match(name))
        if not ok:
            kind = "RFC 1123 label" if rtype.plural == "namespaces" else "RFC 1123 subdomain"
            raise Invalid("metadata.name", f'Invalid value: "{name}": a lowercase {kind} must consist '
                          "of lower case alphanumeric characters or '-'")
    elif not (len(name) <= 253 and _DNS_SUBDOMAIN.match(name)):
        raise Invalid("metadata.name", f'Invalid value: "{name}": a lowercase RFC 1123 subdomain '
                      "must consist of lower case alphanumeric characters, '-' or '.'")
    for key, value in (meta.get("labels") or {}).items():
        check_label_key(key, "metadata.labels")
        if not isinstance(value, str) or len(value) > 63 or (value and not _LABEL_PART.match(value)):
            raise Invalid("metadata.labels", f'Invalid value: "{value}": a valid label must be an empty '
                          "string or consist of alphanumeric characters, '-', '_' or '.', at most 63")
    for key in (meta.get("annotations") or {}):
        check_label_key(key, "metadata.annotations")
    total = sum(len(k) + len(v) for k, v in (meta.get("annotations") or {}).items())
    if total > 256 * 1024:
        raise Invalid("metadata.annotations", "Too long: must have at most 262144 bytes")


def check_label_key(key: str, field: str) -> None:
    prefix, _, name = key.rpartition("/")
    if (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))) or not (
        0 < len(name) <= 63 and _LABEL_PART.match(name)
    ):
        raise Invalid(field, f'Invalid value: "{key}": name part must consist of alphanumeric '
                      "characters, '-', '_' or '.'")


@functools.lru_cache(maxsize=None)
def _validator(kind: str, api_version: str) -> jsonschema.Validator | None:
    """A cached Draft 2020-12 validator for one kind, from kubernetes-validate's strict schemas."""
    version = [v for v in kv_utils.all_versions()
               if kv_utils.major_minor(v) <= SCHEMA_VERSION][-1]
    folder = f"kubernetes-json-schema/v{version}-local-strict"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = kv_utils.schema_contents(f"{folder}/{kind.lower()}-{group_version}.json", version)
    except FileNotFoundError:
        return None
    defs = kv_utils.schema_contents(f"{folder}/_definitions.json", version)
    registry = SchemaResource.from_contents(defs) @ (SchemaResource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def validate(rtype: ResourceType, obj: dict) -> None:
    """Validate ``obj`` as the API server would on create/apply; raise :class:`Invalid`."""
    if obj.get("apiVersion") != rtype.api_version or obj.get("kind") != rtype.kind:
        raise Invalid("apiVersion/kind", f"expected {rtype.api_version} {rtype.kind}, "
                      f"got {obj.get('apiVersion')} {obj.get('kind')}")
    check_metadata(rtype, obj)
    if rtype.builtin:
        validator = _validator(rtype.kind, rtype.api_version)
        if validator is None:  # pragma: no cover - a kind listed above without schema
            raise RuntimeError(f"no schema for {rtype.kind}")
        error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
        if error is not None:
            field = ".".join(str(p) for p in error.absolute_path) or "<root>"
            raise Invalid(field, error.message)
    elif not isinstance(obj.get("spec", {}), dict):
        raise Invalid("spec", "must be an object")
    if rtype.plural == "configmaps":
        size = sum(len(v) for v in (obj.get("data") or {}).values())
        size += sum(len(v) * 3 // 4 for v in (obj.get("binaryData") or {}).values())
        if size > 1024 * 1024:
            raise Invalid("data", "Too long: must have at most 1048576 bytes", "FieldValueTooLong")


# --- selectors ---

_REQ = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*(?:(==|=|!=)\s*([A-Za-z0-9_.-]*)|"
                  r"\s+(in|notin)\s*\(([^)]*)\))?\s*$")


def _split_selector(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return parts


def label_selector(text: str | None):
    """Parse a label selector string into a predicate on a labels dict; ValueError if bad."""
    if not text:
        return lambda labels: True
    checks = []
    for part in _split_selector(text):
        m = _REQ.match(part)
        if not m:
            raise ValueError(f"unable to parse requirement: {part!r}")
        neg, key, op, value, setop, values = m.groups()
        if op in ("=", "=="):
            checks.append(lambda l, k=key, v=value: l.get(k) == v)
        elif op == "!=":
            checks.append(lambda l, k=key, v=value: l.get(k) != v)
        elif setop == "in":
            vals = {v.strip() for v in values.split(",")}
            checks.append(lambda l, k=key, vs=vals: l.get(k) in vs)
        elif setop == "notin":
            vals = {v.strip() for v in values.split(",")}
            checks.append(lambda l, k=key, vs=vals: l.get(k) not in vs)
        elif neg:
            checks.append(lambda l, k=key: k not in l)
        else:
            checks.append(lambda l, k=key: k in l)
    return lambda labels: all(check(labels or {}) for check in checks)


def field_selector(text: str | None):
    """Parse a field selector (``metadata.name=x,involvedObject.name=y``) into a predicate."""
    if not text:
        return lambda obj: True
    checks = []
    for part in text.split(","):
        m = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise ValueError(f"invalid field selector: {part!r}")
        path, op, value = m.groups()

        def get(obj, path=path):
            for step in path.split("."):
                obj = obj.get(step) if isinstance(obj, dict) else None
            return "" if obj is None else str(obj)

        if op == "!=":
            checks.append(lambda o, g=get, v=value: g(o) != v)
        else:
            checks.append(lambda o, g=get, v=value: g(o) == v)
    return lambda obj: all(check(obj) for check in checks)


def merge(base: dict, patch: dict) -> dict:
    """JSON merge (RFC 7386): dicts merge recursively, ``None`` deletes, anything else replaces.

    The fake uses it for merge patches AND for server-side apply (a simplification: no
    field ownership, no conflicts, lists are replaced whole, fields a manager stops
    applying are kept).
    """
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_quantity(text) -> float:
    """``"500m"`` → 0.5, ``"1Gi"`` → 1073741824.0 (enough for quota checks)."""
    s = str(text)
    suffixes = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "m": 1e-3,
                "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix, factor in suffixes.items():
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * factor
    return float(s)


__all__ = ["ResourceType", "RESOURCE_TYPES", "BY_URL", "Invalid", "validate", "label_selector",
           "field_selector", "merge", "parse_quantity", "kubernetes_validate"]
