"""Strict validation of rendered Kubernetes objects.

Built-in kinds are checked against the Kubernetes JSON schemas that PyPI's kubernetes-validate
ships, in their strict variant (unknown fields are errors), for each version in K8S_VERSIONS. The
two prometheus-operator kinds the chart can render (PodMonitor, ServiceMonitor) are CRDs without
schemas there: schemas/ holds strict schemas for the fields the chart renders, written from the
monitoring.coreos.com/v1 CRDs. Any other kind is an error, so nothing is waved through unchecked.
"""

import json
from pathlib import Path

import jsonschema
import kubernetes_validate

LOCAL_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
}
_SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


def problems(doc: dict, version: str) -> list[str]:
    """Everything wrong with one object for one Kubernetes version (empty when valid)."""
    where = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')} (Kubernetes {version})"
    local = LOCAL_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    if local:
        schema = json.loads((_SCHEMA_DIR / local).read_text())
        validator = jsonschema.Draft7Validator(schema)
        return [
            f"{where}: {'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
        ]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{where}: {e.message}"]
    return []


def assert_valid(docs: list[dict], versions: list[str]) -> None:
    assert docs, "nothing was rendered"
    found = [p for version in versions for doc in docs for p in problems(doc, version)]
    assert not found, "invalid Kubernetes objects:\n  " + "\n  ".join(found)
