"""The manifest's JSON Schema (docs/manifest.schema.json; tests/cli.rs checks that it is what
`consul-registrar schema` prints) and what is made from it: the reference in docs/manifest.md and
the manifest part of the chart's values.schema.json are generated from it; the examples, the
chart's test values and every manifest the chart renders validate against it; and on a sample of
values of every kind, the schema and the parser (`consul-registrar validate`) agree. Run through
`bash scripts/check-k8s.sh`."""

import copy
import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import CHART, DEPLOY, EXAMPLE_CHART, POD_ENV, REPO, manifest_of
import podspec

SCHEMA_PATH = REPO / "docs" / "manifest.schema.json"
SCHEMA = json.loads(SCHEMA_PATH.read_text())
VALUES_SCHEMA = json.loads((CHART / "values.schema.json").read_text())

_spec = importlib.util.spec_from_file_location("manifest_schema", REPO / "scripts" / "manifest_schema.py")
generator = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generator)

# Every manifest file of the repository that users copy from, and the chart values holding services.
EXAMPLE_MANIFESTS = [REPO / "examples" / "manifest.yaml", *sorted(DEPLOY.glob("overlays/*/manifest.yaml"))]
CHART_VALUES = [*sorted((CHART / "ci").glob("*.yaml")), REPO / "tests" / "e2e" / "values.yaml"]


def validator(schema: dict = SCHEMA) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def problems(instance, schema: dict = SCHEMA) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in validator(schema).iter_errors(instance)]


def service_schema() -> dict:
    return {**SCHEMA["definitions"]["Service"], "definitions": SCHEMA["definitions"]}


def test_the_schema_is_a_valid_draft_07_schema():
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.Draft7Validator.check_schema(VALUES_SCHEMA)
    assert SCHEMA["$schema"] == "http://json-schema.org/draft-07/schema#"


@pytest.mark.parametrize("path", sorted(generator.expected_files()), ids=lambda p: str(p.relative_to(REPO)))
def test_generated_files_are_made_from_the_committed_schema(path):
    expected = generator.expected_files()[path]
    assert path.read_text() == expected, (
        f"{path.relative_to(REPO)} is not what scripts/manifest_schema.py makes from docs/manifest.schema.json: "
        "run `make schema` and commit the result")


def test_the_reference_documents_every_field_and_no_other():
    """docs/manifest.md's tables: one row per field of each object of the schema, none stale."""
    page = (REPO / "docs" / "manifest.md").read_text()
    documented = set()
    section = None
    for line in page.splitlines():
        heading = re.match(r"^### (?:`(.+)`|Top level)$", line)
        if heading:
            section = heading.group(1) or ""
        row = re.match(r"^\| `([^`]+)` \|", line)
        if row and section is not None:
            documented.add(f"{section}.{row.group(1)}" if section else row.group(1))
    expected = set()
    for _, path, definition, _ in generator.sections(SCHEMA):
        for field in definition["properties"]:
            expected.add(f"{path}.{field}" if path else field)
    assert documented == expected, (
        f"undocumented: {sorted(expected - documented)}; documented but not in the schema: {sorted(documented - expected)}")


def test_the_reference_block_is_regenerated_when_the_schema_changes():
    """The check above fails on a stale page: a field added to the schema shows in the block."""
    schema = copy.deepcopy(SCHEMA)
    schema["definitions"]["Drain"]["properties"]["newSetting"] = {"description": "A setting added in schema.rs."}
    page = generator.reference_page(schema, (REPO / "docs" / "manifest.md").read_text())
    assert "| `newSetting` |" in page
    assert page != (REPO / "docs" / "manifest.md").read_text()


@pytest.mark.parametrize("path", EXAMPLE_MANIFESTS, ids=lambda p: str(p.relative_to(REPO)))
def test_example_manifests_validate_and_name_the_schema_for_editors(path):
    text = path.read_text()
    header = re.search(r"^# yaml-language-server: \$schema=(\S+)$", text, re.M)
    assert header, f"{path.relative_to(REPO)} lacks `# yaml-language-server: $schema=...` for editors"
    assert (path.parent / header.group(1)).resolve() == SCHEMA_PATH, (
        f"{path.relative_to(REPO)}: $schema={header.group(1)} is not docs/manifest.schema.json")
    assert problems(yaml.safe_load(text)) == []


@pytest.mark.parametrize("path", CHART_VALUES, ids=lambda p: str(p.relative_to(REPO)))
def test_chart_test_values_hold_services_the_manifest_schema_accepts(path):
    values = yaml.safe_load(path.read_text()) or {}
    services = values.get("manifest", {}).get("services", [])
    for i, service in enumerate(services):
        assert problems(service, service_schema()) == [], f"{path.relative_to(REPO)}: manifest.services[{i}]"


def test_the_example_charts_services_validate():
    values = yaml.safe_load((EXAMPLE_CHART / "values.yaml").read_text())
    services = values["consulRegistrar"]["manifest"]["services"]
    assert services
    for service in services:
        assert problems(service, service_schema()) == []


def rendered_manifests(helm) -> dict[str, dict]:
    import test_chart
    out = {}
    for variant in test_chart.VARIANTS:
        if variant == "existing-configmap":
            continue
        docs = test_chart.render(helm, variant)
        facts = podspec.check_sidecar(test_chart.workload_spec(docs), test_chart.VARIANTS[variant][2])
        out[variant] = manifest_of(docs, facts["config_map"], facts["key"])
    return out


def test_every_manifest_the_chart_renders_validates(helm):
    manifests = rendered_manifests(helm)
    assert len(manifests) >= 10
    for variant, manifest in manifests.items():
        assert problems(manifest) == [], f"the chart's {variant} render"


def test_the_charts_values_schema_takes_the_manifest_services_and_consul_settings_from_the_schema():
    manifest = VALUES_SCHEMA["properties"]["manifest"]["properties"]
    assert manifest["services"]["items"] == {"$ref": "#/definitions/Service"}
    assert VALUES_SCHEMA["definitions"] == SCHEMA["definitions"]
    consul = SCHEMA["definitions"]["Consul"]["properties"]
    for key, sub in manifest["consul"]["properties"].items():
        assert sub == consul[key], f"manifest.consul.{key}"


@pytest.mark.parametrize("value", ["5s", "0", "0s", "1m30s", "500ms", "1.5h", "${DELAY}", "5 seconds", "-1s", 5, ""])
@pytest.mark.parametrize("field", ["delay", "deregisterTimeout"])
def test_the_charts_stricter_drain_settings_accept_only_what_the_manifest_accepts(field, value):
    """The chart's drain settings are its own (no ${VAR}: the grace period is checked against
    them), but nothing the chart lets through may be refused by the manifest's schema."""
    chart_drain = VALUES_SCHEMA["properties"]["manifest"]["properties"]["drain"]
    assert set(chart_drain["properties"]) <= set(SCHEMA["definitions"]["Drain"]["properties"])
    chart_ok = not problems({field: value}, chart_drain)
    manifest_ok = not problems({"drain": {field: value}, "services": [{"name": "a", "port": 1}]})
    assert manifest_ok or not chart_ok, f"the chart accepts drain.{field}={value!r}, the manifest schema does not"


# (field path, value, accepted?): what the parser says; the schema must say the same.
SAMPLES = [
    ("services.0.port", 8080, True),
    ("services.0.port", "8080", True),
    ("services.0.port", "${PORT:-8080}", True),
    ("services.0.port", 0, False),
    ("services.0.port", 70000, False),
    ("services.0.port", "http", False),
    ("services.0.port", True, False),
    ("services.0.name", "hello_2-b", True),
    ("services.0.name", "-x", False),
    ("services.0.name", "a.b", False),
    ("services.0.name", "x" * 64, False),
    ("services.0.id", "shop.ns.pod-1", True),
    ("services.0.id", "a/b", False),
    ("services.0.id", "a b", False),
    ("services.0.address", "10.0.0.1", True),
    ("services.0.address", "pod.example", True),
    ("services.0.address", "0.0.0.0", False),
    ("services.0.address", "a/b", False),
    ("services.0.tags", ["grpc", 1, True], True),
    ("services.0.tags", "grpc", False),
    ("services.0.meta", {"version": 2, "team": "${TEAM:-a}"}, True),
    ("services.0.meta", {"a.b": "x"}, False),
    ("services.0.meta", {"consul-x": "x"}, False),
    ("services.0.enableTagOverride", True, True),
    ("services.0.enableTagOverride", "false", True),
    ("services.0.enableTagOverride", "yes", False),
    ("services.0.weights", {"passing": 3}, True),
    ("services.0.weights", {"warning": 1}, False),
    ("services.0.health.interval", "1s", True),
    ("services.0.health.interval", "2s", True),
    ("services.0.health.interval", "${INTERVAL:-2s}", True),
    ("services.0.health.interval", "5 seconds", False),
    ("services.0.health.interval", "10", False),
    ("services.0.health.interval", 5, False),
    ("services.0.health.interval", "0s", False),
    ("services.0.health.interval", "0.0ms", False),
    ("services.0.health.mode", "poll", True),
    ("services.0.health.mode", "fast", False),
    ("services.0.health.successThreshold", 2, True),
    ("services.0.health.successThreshold", "3", True),
    ("services.0.health.successThreshold", 0, False),
    ("services.0.health.initialDelay", 0, True),
    ("services.0.health.initialDelay", "0", True),
    ("services.0.health.initialDelay", "-1s", False),
    ("services.0.health.tls", {"insecureSkipVerify": True}, True),
    ("services.0.health.tls", {"ca": "x"}, False),
    ("services.0.check.notes", "see the runbook", True),
    ("drain.delay", "0s", True),
    ("consul.blockingWatches", 1, True),
    ("consul.blockingWatches", -1, False),
    ("consul.catalog.keyPrefix", "team/instances", True),
    ("consul.catalog.keyPrefix", "/leading", False),
    ("consul.mode", "agents", False),
    ("admin", {"adress": "0.0.0.0:9102"}, False),
]


def set_path(document: dict, path: str, value):
    node = document
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for key in keys[:-1]:
        if isinstance(key, str) and key not in node:
            node[key] = {}
        node = node[key]
    node[keys[-1]] = value


@pytest.mark.parametrize("path, value, accepted", SAMPLES, ids=lambda v: repr(v)[:30])
def test_schema_and_parser_agree(registrar_bin, tmp_path, path, value, accepted):
    manifest = {"services": [{"name": "hello", "id": "hello-1", "address": "127.0.0.1", "port": 50051}]}
    if path.startswith("consul.catalog."):
        manifest["consul"] = {"mode": "catalog", "address": "http://127.0.0.1:8500"}
    set_path(manifest, path, value)
    file = tmp_path / "manifest.yaml"
    file.write_text(yaml.safe_dump(manifest))
    result = subprocess.run([registrar_bin, "validate", "--manifest", str(file)], capture_output=True, text=True,
                            env={"PATH": os.environ.get("PATH", ""), **POD_ENV}, timeout=30)
    assert result.returncode in (0, 65), result.stderr
    parser_ok = result.returncode == 0
    assert parser_ok == accepted, f"the sample's expectation is wrong: validate says {result.stderr or 'ok'}"
    schema_ok = not problems(manifest)
    assert schema_ok == parser_ok, (
        f"{path}={value!r}: the parser {'accepts' if parser_ok else 'refuses'} it "
        f"({result.stderr.strip() or 'ok'}), the schema {'accepts' if schema_ok else 'refuses'} it: {problems(manifest)}")
