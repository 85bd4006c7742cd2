"""Strict validation of rendered Kubernetes objects.

Built-in kinds are checked against the Kubernetes JSON schemas that PyPI's kubernetes-validate
ships, in their strict variant (unknown fields are errors), for each version in K8S_VERSIONS. The
prometheus-operator kinds the chart can render (PodMonitor, ServiceMonitor, PrometheusRule) are CRDs without
schemas there: schemas/ holds strict schemas for the fields the chart renders, written from the
monitoring.coreos.com/v1 CRDs. Any other kind is an error, so nothing is waved through unchecked.

The published schemas carry no `enum` for the API's enumerated strings (`strategy.type` says "Can
be Recreate or RollingUpdate" only in its description), so ENUMS adds those a workload's
free-form values can hold: `strategy.type: Recreat` fails here as `readinessProbe.grpcc` fails
the strict schema.
"""

import json
from pathlib import Path

import jsonschema
import kubernetes_validate

LOCAL_SCHEMAS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule-monitoring-v1.json",
}
_SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


# (kinds or None for any, path with "*" for every list item / "{a,b}" for alternatives, allowed values)
_POD_SPECS = ["spec.template.spec", "spec.jobTemplate.spec.template.spec"]
_CONTAINERS = [f"{pod}.{kind}.*" for pod in _POD_SPECS + ["spec"] for kind in ("containers", "initContainers")]
_PROBES = ["livenessProbe", "readinessProbe", "startupProbe", "lifecycle.preStop", "lifecycle.postStart"]
ENUMS = [
    ({"Deployment"}, ["spec.strategy.type"], {"Recreate", "RollingUpdate"}),
    ({"StatefulSet"}, ["spec.updateStrategy.type"], {"RollingUpdate", "OnDelete"}),
    ({"DaemonSet"}, ["spec.updateStrategy.type"], {"RollingUpdate", "OnDelete"}),
    ({"StatefulSet"}, ["spec.podManagementPolicy"], {"OrderedReady", "Parallel"}),
    ({"Service"}, ["spec.type"], {"ClusterIP", "NodePort", "LoadBalancer", "ExternalName"}),
    ({"Service"}, ["spec.ports.*.protocol"], {"TCP", "UDP", "SCTP"}),
    ({"NetworkPolicy"}, ["spec.ingress.*.ports.*.protocol"], {"TCP", "UDP", "SCTP"}),
    ({"NetworkPolicy"}, ["spec.policyTypes.*"], {"Ingress", "Egress"}),
    (None, [f"{p}.restartPolicy" for p in _POD_SPECS + ["spec"]], {"Always", "OnFailure", "Never"}),
    (None, [f"{p}.dnsPolicy" for p in _POD_SPECS + ["spec"]], {"ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"}),
    (None, [f"{p}.securityContext.seccompProfile.type" for p in _POD_SPECS + ["spec"] + _CONTAINERS],
     {"RuntimeDefault", "Unconfined", "Localhost"}),
    (None, [f"{p}.tolerations.*.operator" for p in _POD_SPECS + ["spec"]], {"Exists", "Equal"}),
    (None, [f"{p}.tolerations.*.effect" for p in _POD_SPECS + ["spec"]], {"NoSchedule", "PreferNoSchedule", "NoExecute"}),
    (None, [f"{p}.topologySpreadConstraints.*.whenUnsatisfiable" for p in _POD_SPECS + ["spec"]], {"DoNotSchedule", "ScheduleAnyway"}),
    (None, [f"{c}.imagePullPolicy" for c in _CONTAINERS], {"Always", "IfNotPresent", "Never"}),
    (None, [f"{c}.restartPolicy" for c in _CONTAINERS], {"Always", "OnFailure", "Never"}),
    (None, [f"{c}.ports.*.protocol" for c in _CONTAINERS], {"TCP", "UDP", "SCTP"}),
    (None, [f"{c}.{probe}.httpGet.scheme" for c in _CONTAINERS for probe in _PROBES], {"HTTP", "HTTPS"}),
]


def _values_at(node, path: list[str], where: str):
    if not path:
        yield where, node
        return
    head, rest = path[0], path[1:]
    if head == "*":
        for i, item in enumerate(node if isinstance(node, list) else []):
            yield from _values_at(item, rest, f"{where}.{i}")
    elif isinstance(node, dict) and head in node:
        yield from _values_at(node[head], rest, f"{where}.{head}" if where else head)


def enum_problems(doc: dict) -> list[str]:
    found = []
    for kinds, paths, allowed in ENUMS:
        if kinds is not None and doc.get("kind") not in kinds:
            continue
        for path in paths:
            for where, value in _values_at(doc, path.split("."), ""):
                if value is not None and value not in allowed:
                    found.append(f"{where}: {value!r} is not one of {sorted(allowed)}")
    return found


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
    found = [f"{where}: {p}" for p in enum_problems(doc)]
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        found.append(f"{where}: {'.'.join(str(p) for p in e.path) or '<root>'}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        found.append(f"{where}: {e.message}")
    return found


def assert_valid(docs: list[dict], versions: list[str]) -> None:
    assert docs, "nothing was rendered"
    found = [p for version in versions for doc in docs for p in problems(doc, version)]
    assert not found, "invalid Kubernetes objects:\n  " + "\n  ".join(found)
