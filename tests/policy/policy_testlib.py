"""Shared by the policy tests: schema validation of emitted objects, golden files.

Custom resources are validated against the CRD schemas kept as test data in
``tests/data/crd-schemas`` (its README gives their source and licence); core kinds with the
``kubernetes-validate`` package.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_SCHEMAS = REPO / "tests" / "data" / "crd-schemas"
GOLDEN = Path(__file__).parent / "golden"
KUBERNETES_VERSION = "1.30.0"

CUSTOM_KINDS = {
    ("networking.gke.io/v1alpha1", "FQDNNetworkPolicy"): "networking.gke.io/fqdnnetworkpolicy_v1alpha1.json",
    ("networking.gke.io/v1alpha1", "NetworkLogging"): "networking.gke.io/networklogging_v1alpha1.json",
    ("cilium.io/v2", "CiliumNetworkPolicy"): "cilium.io/ciliumnetworkpolicy_v2.json",
}


@lru_cache(maxsize=None)
def _validator(path: str) -> jsonschema.protocols.Validator:
    schema = json.loads((CRD_SCHEMAS / path).read_text())
    # No check_schema(): the catalog's files are kept unchanged and some use regexes
    # (\\PC) that Python's re cannot compile; only the parts we emit are exercised.
    return jsonschema.Draft7Validator(schema)


def validate_object(obj: dict) -> None:
    """Raise if ``obj`` is not valid for its kind (core: kubernetes-validate; CRDs: jsonschema)."""
    key = (obj["apiVersion"], obj["kind"])
    if key in CUSTOM_KINDS:
        errors = sorted(_validator(CUSTOM_KINDS[key]).iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, f"{key[1]} {obj['metadata'].get('name')}: " + "; ".join(
            f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors
        )
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data):
        return True


def as_text(output) -> str:
    if isinstance(output, str):
        return output
    return yaml.dump_all(output, Dumper=_Dumper, sort_keys=False, explicit_start=True)


def check_golden(name: str, text: str) -> None:
    """Compare with tests/policy/golden/<name>; UPDATE_GOLDEN=1 rewrites the file instead."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
        return
    assert path.exists(), f"missing golden file {path}; run with UPDATE_GOLDEN=1 to create it"
    expected = path.read_text()
    assert text == expected, f"{name} differs from the golden file; if the change is intended, rerun with UPDATE_GOLDEN=1 and review the diff"
