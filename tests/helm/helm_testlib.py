"""Shared by the Helm chart tests (imported by name: ``from helm_testlib import ...``;
never ``from conftest import``, which resolves to whichever conftest pytest loaded last).

``helm-python-sdk`` (PyPI) binds Helm's Go SDK (lint, values schema, template engine), so
no ``helm`` binary and no cluster are needed. Rendered objects are validated with
``kubernetes-validate`` (core kinds, strict) and the CRD schemas kept in
``tests/data/crd-schemas`` (custom kinds; source and licence in its README).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

try:
    import helm_python as helm
except ImportError:  # skip (not fail) the chart tests, saying what to install
    helm = None

#: every test module in tests/helm carries this mark
requires_helm = pytest.mark.skipif(
    helm is None,
    reason="helm-python-sdk is not installed: pip install 'helm-python-sdk>=0.2.2' (it runs Helm's lint and "
           "template engine without a helm binary)",
)

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "sandbox-kernel"
EXAMPLES = REPO / "helm" / "examples"
CRD_SCHEMAS = REPO / "tests" / "data" / "crd-schemas"
KUBERNETES_VERSION = "1.30.0"
RELEASE, NAMESPACE = "sk", "jhub"

#: custom kinds the chart renders → their schema. CiliumClusterwideNetworkPolicy has the
#: same spec as CiliumNetworkPolicy (Cilium's CRDs share one type), so it uses that schema.
CUSTOM_KINDS = {
    ("networking.gke.io/v1alpha1", "NetworkLogging"): "networking.gke.io/networklogging_v1alpha1.json",
    ("cilium.io/v2", "CiliumClusterwideNetworkPolicy"): "cilium.io/ciliumnetworkpolicy_v2.json",
}

#: the values matrix: each optional piece on, exam mode, gVisor, each enforcer
GC_IMAGE = {"name": "europe-west1-docker.pkg.dev/p/r/singleuser", "tag": "2024-06"}
#: hub mode with its two required values
HUB = {"enabled": True, "image": GC_IMAGE, "apiTokenSecret": "sandbox-hub-token"}
MATRIX: dict[str, dict] = {
    "default": {},
    "gc": {"gc": {"enabled": True, "image": GC_IMAGE}},
    "pre-puller": {"prePuller": {"enabled": True}},
    "network-logging": {"networkLogging": {"enabled": True, "logAllowed": True}},
    "metadata-deny": {"metadataDeny": {"enabled": True}},
    "metadata-deny-ports": {"metadataDeny": {"enabled": True, "tcpPorts": [80, 988, 8080]}},
    "exam-mode": {"policy": {"locked": True, "userMayAllow": [], "mode": "allowlist",
                             "entries": ["exam.example.org:443"], "presets": ["pypi"]}},
    "gvisor": {"gvisor": {"enabled": True}, "prePuller": {"enabled": True},
               "sandbox": {"nodeSelector": {"sandbox.gke.io/runtime": "gvisor"},
                           "tolerations": [{"key": "sandbox.gke.io/runtime", "operator": "Equal",
                                            "value": "gvisor", "effect": "NoSchedule"}]}},
    "gvisor-runtimeclass": {"gvisor": {"enabled": True, "runtimeClass": {"create": True, "handler": "runsc"}}},
    "enforcer-networkpolicy": {"sandbox": {"enforcers": ["networkpolicy"]}},
    "enforcer-gke-fqdn": {"sandbox": {"enforcers": ["gke-fqdn"]}, "gc": {"enabled": True, "image": GC_IMAGE}},
    "enforcer-cilium": {"sandbox": {"enforcers": ["cilium"]}, "gc": {"enabled": True, "image": GC_IMAGE}},
    "enforcer-istio": {"sandbox": {"enforcers": ["istio"]}, "gc": {"enabled": True, "image": GC_IMAGE}},
    "hub": {"hub": HUB},
    "hub-exam": {"hub": {**HUB, "adminGroups": ["teachers", "class-b"], "serviceName": "sbx", "port": 8080,
                         "abandonedAfter": 1800, "keepStopped": 0, "groupRefreshInterval": 120,
                         "maxSandboxesPerUser": 2, "auditMaxBytes": 52428800, "auditBackups": 3,
                         "adminOrigin": "https://sbx.example.org", "hubPublicUrl": "https://hub.example.org/",
                         "stateVolume": {"size": "5Gi", "storageClass": "standard-rwo"}},
                 "policy": {"locked": True, "userMayAllow": []}},
    "everything": {
        "sandbox": {"enforcers": ["networkpolicy", "gke-fqdn", "cilium", "istio"], "nodeLocalDNS": True,
                    "idleTimeout": 900, "image": {"name": "python@sha256:" + "a" * 64, "tag": "", "pullPolicy": "Always"},
                    "quota": {"pods": "10", "requests.cpu": "8"}},
        "policy": {"clusterRanges": ["10.0.0.0/8", "fd00::/8"], "maxEntries": 20},
        "gc": {"enabled": True, "image": GC_IMAGE, "maxAge": 7200, "schedule": "0 * * * *"},
        "prePuller": {"enabled": True}, "networkLogging": {"enabled": True}, "metadataDeny": {"enabled": True},
        "gvisor": {"enabled": True, "runtimeClass": {"create": True, "handler": "runsc"}},
        "serviceAccount": {"annotations": {"example.org/owner": "platform"}},
        "hub": {**HUB, "adminGroups": ["teachers"], "nodeSelector": {"pool": "system"},
                "tolerations": [{"key": "pool", "operator": "Exists", "effect": "NoSchedule"}]},
    },
}


@lru_cache(maxsize=1)
def _chart():
    return helm.Chart.load(CHART)


def _merged_values(overrides: dict) -> dict:
    """The values Helm would use: the chart's defaults coalesced with ``overrides``."""
    return _chart().merge_values(overrides)


@lru_cache(maxsize=None)
def _render(key: str) -> tuple[dict[str, str], tuple[dict, ...]]:
    overrides = json.loads(key)
    files = _chart().render(overrides, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return files, tuple(objects)


def _render_objects(overrides: dict | None = None) -> list[dict]:
    """Every object the chart renders with ``overrides`` (cached per values)."""
    return [json.loads(json.dumps(o)) for o in _render(json.dumps(overrides or {}, sort_keys=True))[1]]


def _render_files(overrides: dict | None = None) -> dict[str, str]:
    return _render(json.dumps(overrides or {}, sort_keys=True))[0]


def _find(objects: list[dict], kind: str, name_suffix: str = "") -> list[dict]:
    return [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]


@lru_cache(maxsize=None)
def _crd_validator(path: str):
    import jsonschema

    # No check_schema(): the catalog's files are kept unchanged (see tests/data/crd-schemas/README.md)
    return jsonschema.Draft7Validator(json.loads((CRD_SCHEMAS / path).read_text()))


def _validate_object(obj: dict) -> None:
    """Raise if ``obj`` is invalid for its kind: CRD schema, else kubernetes-validate (strict)."""
    key = (obj["apiVersion"], obj["kind"])
    if key in CUSTOM_KINDS:
        errors = sorted(_crd_validator(CUSTOM_KINDS[key]).iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, f"{key[1]} {obj['metadata'].get('name')}: " + "; ".join(
            f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)
    else:
        import kubernetes_validate

        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
