"""The chart's alerts (templates/prometheusrule.yaml) and Grafana dashboard
(dashboards/consul-registrar.json, templates/grafana-dashboard.yaml): rendered, valid, each alert
unit-tested with `promtool test rules` (tests/alerts/), each dashboard query parsed by promtool.
That every metric they name is one the sidecar exports is checked against a live /metrics by
tests/admin.rs. Run through `bash scripts/check-k8s.sh` (PROMTOOL from scripts/promtool.sh)."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import CHART, REPO, one
from k8s_schemas import assert_valid
from test_chart import APP

ALERT_TESTS = REPO / "tests" / "alerts" / "consul-registrar.test.yaml"
DASHBOARD = CHART / "dashboards" / "consul-registrar.json"
_links_spec = importlib.util.spec_from_file_location("check_links", REPO / "scripts" / "check-links.py")
check_links = importlib.util.module_from_spec(_links_spec)
_links_spec.loader.exec_module(check_links)
# The symptoms of docs/troubleshooting.md, which the alerts' runbook_urls point to.
RUNBOOK_ANCHORS = check_links.anchors(REPO / "docs" / "troubleshooting.md")
RULES = {"prometheusRule": {"enabled": True}}


@pytest.fixture(scope="session")
def promtool() -> str:
    path = os.environ.get("PROMTOOL", "")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(f"PROMTOOL is not set to an executable ({path!r}): run through `bash scripts/check-k8s.sh`",
                    pytrace=False)
    return path


def run(promtool: str, *args: str, cwd: Path | None = None) -> str:
    result = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=cwd, timeout=120)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result.stdout


def rule_object(helm, *values) -> dict:
    return one(helm.template(APP, *values), "PrometheusRule")


def alerts(rule: dict) -> list[dict]:
    return [r for group in rule["spec"]["groups"] for r in group["rules"] if "alert" in r]


def test_off_by_default(helm):
    kinds = {d["kind"] for d in helm.template(APP)}
    assert "PrometheusRule" not in kinds
    assert not any(d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard") for d in helm.template(APP))


@pytest.mark.parametrize("version", ["1.29", "1.37"])
def test_rendered_objects_are_valid(helm, version):
    docs = helm.template(APP, RULES, {"grafanaDashboard": {"enabled": True},
                                      "metrics": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}})
    assert_valid(docs, [version])


def test_every_alert_is_unit_tested_with_promtool(helm, promtool, tmp_path):
    rule = rule_object(helm, RULES)
    full = tmp_path / "full.yaml"
    full.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    run(promtool, "check", "rules", str(full))
    # The unit tests compare annotations exactly: they check the summary's templating; the rest is
    # checked below.
    groups = json.loads(json.dumps(rule["spec"]["groups"]))
    for group in groups:
        for r in group["rules"]:
            r["annotations"] = {"summary": r["annotations"]["summary"]}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    run(promtool, "test", "rules", ALERT_TESTS.name, cwd=tmp_path)

    tested = {t["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    names = {a["alert"] for a in alerts(rule)}
    assert names == tested, f"alerts without a firing test: {names - tested}; tests of no alert: {tested - names}"


def test_the_unit_tests_fail_when_an_alert_breaks(helm, promtool, tmp_path):
    """A rule that never fires (its threshold off) fails `promtool test rules`."""
    rule = rule_object(helm, RULES)
    groups = rule["spec"]["groups"]
    for r in groups[0]["rules"]:
        r["annotations"] = {"summary": r["annotations"]["summary"]}
        if r["alert"] == "ConsulRegistrarRepairsRepeating":
            r["expr"] = r["expr"].replace("> 3", "> 300")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    result = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode != 0 and "ConsulRegistrarRepairsRepeating" in result.stdout + result.stderr


def test_each_alert_tells_the_on_call_engineer_what_and_where_to_look(helm):
    for alert in alerts(rule_object(helm, RULES)):
        name = alert["alert"]
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), name
        url, _, anchor = annotations["runbook_url"].partition("#")
        assert url.endswith("docs/troubleshooting.md") and anchor in RUNBOOK_ANCHORS, f"{name}: {annotations['runbook_url']}"
        assert "{{ $labels.pod }}" in annotations["description"], f"{name}: the description names no pod"
        assert len(annotations["description"]) > 200, f"{name}: say what it means and what to check"


def test_alerts_watch_only_this_releases_pods(helm):
    rule = rule_object(helm, RULES)
    pods = 'pod=~"demo-[a-z0-9]+-[a-z0-9]+"'
    for alert in alerts(rule):
        selectors = re.findall(r"consul_registrar_\w+\{([^}]*)\}", alert["expr"])
        assert selectors and all('namespace="shop"' in s and pods in s for s in selectors), alert["expr"]
    statefulset = rule_object(helm, RULES, {"kind": "StatefulSet"})
    assert all('pod=~"demo-[0-9]+"' in a["expr"] for a in alerts(statefulset))
    custom = rule_object(helm, {"prometheusRule": {"enabled": True, "selector": 'job="shop-registrar"',
                                                  "alertLabels": {"team": "payments"}, "labels": {"release": "prom"}}})
    assert custom["metadata"]["labels"]["release"] == "prom"
    for alert in alerts(custom):
        assert 'job="shop-registrar"' in alert["expr"] and "namespace=" not in alert["expr"]
        assert alert["labels"] == {"severity": "warning", "team": "payments"}


def test_the_monitors_keep_the_sidecars_service_and_instance_labels(helm):
    docs = helm.template(APP, {"metrics": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}}})
    assert one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
    assert one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["honorLabels"] is True


def test_the_dashboard_configmap_carries_the_dashboard_for_grafanas_sidecar(helm):
    docs = helm.template(APP, {"grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "Consul"}}})
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "demo-registrar-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Consul"}
    assert json.loads(cm["data"]["consul-registrar.json"]) == json.loads(DASHBOARD.read_text())
    elsewhere = helm.template(APP, {"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}})
    assert any(d["kind"] == "ConfigMap" and d["metadata"].get("namespace") == "monitoring" for d in elsewhere)


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    for variable in dashboard["templating"]["list"]:
        query = variable.get("definition", "")
        found = re.match(r"label_values\((.*), \w+\)$", query)
        if found:
            out.append((f"variable {variable['name']}", found.group(1)))
    return out


def test_every_dashboard_query_is_valid_promql(promtool, tmp_path):
    """Grafana's variables replaced by values, each query becomes a recording rule that promtool
    parses."""
    queries = dashboard_queries()
    assert len(queries) >= 25
    rules = []
    for i, (title, expr) in enumerate(queries):
        concrete = expr.replace("$__rate_interval", "5m").replace("$namespace", ".*").replace("$pod", ".*")
        concrete = concrete.replace("$service", ".*")
        assert "$" not in concrete, f"{title}: a variable promtool cannot check: {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": concrete})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run(promtool, "check", "rules", str(path))


def test_the_dashboard_is_one_grafana_loads():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "consul-registrar" and dashboard["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "pod", "service"} <= variables
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel.get("description"), f"{panel['title']}: say what the panel shows"
