"""The Helm chart, rendered with `helm template` and read back: every variant validates strictly
against the Kubernetes schemas, and the pod spec carries what the sidecar contract needs (see
podspec.py). The chart describes the user's app: renders start from a user's values (APP, or
ci/user-values.yaml), never from demo defaults. Run through `bash scripts/check-k8s.sh`."""

import copy
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

import podspec
from conftest import CHART, DEPLOY, POD_ENV, RenderError, kinds, manifest_of, one, registered_instance, validate_manifest
from conftest import k8s_versions
from k8s_schemas import assert_valid

DEMO_VALUES = CHART / "ci" / "demo-values.yaml"
USER_VALUES = CHART / "ci" / "user-values.yaml"
STATEFULSET_VALUES = CHART / "ci" / "statefulset-values.yaml"
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
TOKEN = "test-drain-token-0123456789"

# The least a user sets: an image, a port, requests, the services; a fixed drain token so that
# renders compare (a generated one differs per `helm template`).
APP = {
    "app": {
        "image": {"repository": "registry.example.com/shop", "tag": "2.4.1"},
        "ports": [{"name": "grpc", "containerPort": 8443, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
    },
    "manifest": {"services": [{"name": "shop", "port": 8443, "health": {"address": "127.0.0.1", "service": "shop.v1.Shop"}}]},
    "drainToken": {"value": TOKEN},
}
TLS_AND_TOKEN = {
    "consul": {
        "namespace": "team-a",
        "partition": "payments",
        "aclToken": {"secretName": "consul-acl", "secretKey": "token"},
        "tls": {
            "enabled": True,
            "caSecretName": "consul-ca",
            "caSecretKey": "tls.crt",
            "clientSecretName": "consul-client",
            "serverName": "server.dc1.consul",
        },
    },
}
SERVERS = "http://consul-server.consul.svc:8500"
# Catalog mode (issue 12): the servers' address, the virtual node's settings left to their defaults
# but the two a user most likely sets.
CATALOG = {"consul": {"mode": "catalog", "address": SERVERS,
                      "catalog": {"sessionTTL": "15s", "keyPrefix": "shop/instances"}}}
# Each variant: (values dicts applied after APP — or after the files, without APP —, values files, native sidecar?)
LOGIN = {"consul": {"login": {"authMethod": "consul-k8s-auth-method", "meta": {"team": "shop"}}}}
VARIANTS = {
    "minimal": ([], [], True),
    "classic-sidecar": ([{"sidecar": {"native": False}}], [], False),
    "demo-values": ([], [DEMO_VALUES], True),
    "demo-values-classic": ([{"sidecar": {"native": False}}], [DEMO_VALUES], False),
    "user-values": ([], [USER_VALUES], True),
    "user-statefulset": ([], [USER_VALUES, STATEFULSET_VALUES], False),
    "existing-configmap": ([{"manifest": {"existingConfigMap": "shop-registrar", "existingConfigMapKey": "registrar.yaml"}}], [], True),
    "tls-and-token": ([TLS_AND_TOKEN], [], True),
    "tls-and-token-classic": ([TLS_AND_TOKEN, {"sidecar": {"native": False}}], [], False),
    "catalog-mode": ([CATALOG], [], True),
    "login": ([LOGIN], [], True),
    "catalog-mode-classic-tls": ([TLS_AND_TOKEN, CATALOG, {"consul": {"address": "https://consul-server.consul.svc:8501"}},
                                  {"sidecar": {"native": False}}], [], False),
    "monitoring-and-pdb": (
        [{
            "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}},
                        "serviceMonitor": {"enabled": True, "scrapeTimeout": "10s"}},
            "podDisruptionBudget": {"enabled": True, "minAvailable": "50%"},
            "networkPolicy": {"enabled": True, "metrics": {"from": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]}},
        }],
        [],
        True,
    ),
    "everything-else": (
        [{
            "fullnameOverride": "shop",
            "commonLabels": {"team": "payments"},
            "podAnnotations": {"prometheus.io/scrape": "false"},
            "serviceAccount": {"create": False, "name": "shop"},
            "imagePullSecrets": [{"name": "registry"}],
            "app": {
                "image": {"repository": "registry.example.com/shop", "digest": "sha256:" + "a" * 64},
                "env": [{"name": "MODE", "value": "prod"}],
                "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
            },
            "extraVolumes": [{"name": "cache", "emptyDir": {}}],
            "sidecar": {"adminPort": 9300, "adminBindAddress": "::", "logFormat": "human", "logLevel": "debug",
                        "extraEnv": [{"name": "REGION", "value": "eu-1"}]},
            "manifest": {
                "consul": {"retry": {"initial": "200ms", "max": "2s"}, "resyncInterval": "30s"},
                "services": [
                    {"name": "shop", "port": 8443, "tags": ["grpc"], "meta": {"region": "${REGION}"},
                     "health": {"service": "shop.v1.Shop", "mode": "watch"}},
                    {"name": "shop-admin", "port": 9000, "id": "shop-admin-${POD_NAME}",
                     "health": {"port": 8443, "mode": "poll", "interval": "2s"}},
                ],
            },
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                           "whenUnsatisfiable": "ScheduleAnyway",
                                           "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "shop"}}}],
        }],
        [],
        True,
    ),
}


def variant_values(name: str) -> tuple[list[dict], list[Path]]:
    values, files, _ = VARIANTS[name]
    return (list(values) if files else [APP, *values]), files


def render(helm, name: str, **kw) -> list[dict]:
    values, files = variant_values(name)
    return helm.template(*values, files=files, **kw)


def merged_values(name: str) -> dict:
    """The variant's values merged over values.yaml as Helm does (maps merged, the rest replaced)."""
    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v
    merged = copy.deepcopy(DEFAULTS)
    values, files = variant_values(name)
    for source in [yaml.safe_load(Path(f).read_text()) for f in files] + values:
        merge(merged, copy.deepcopy(source))
    return merged


def workload(docs: list[dict]) -> dict:
    found = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    assert len(found) == 1, [d["kind"] for d in found]
    return found[0]


def workload_spec(docs: list[dict]) -> dict:
    return podspec.pod_spec(workload(docs))


@pytest.mark.parametrize("version", k8s_versions())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_render_is_valid_kubernetes(helm, variant, version):
    assert_valid(render(helm, variant, kube_version=version), [version])


def test_native_sidecar_needs_kubernetes_1_29(helm):
    """Native sidecars exist from 1.29 on: the chart refuses them for older clusters, and the
    schemas agree (restartPolicy on an init container is unknown to 1.27's)."""
    with pytest.raises(RenderError, match="native consul-registrar sidecar needs Kubernetes 1.29"):
        render(helm, "minimal", kube_version="1.28")
    with pytest.raises(AssertionError, match="restartPolicy"):
        assert_valid(render(helm, "minimal"), ["1.27"])
    assert_valid(render(helm, "classic-sidecar", kube_version="1.27"), ["1.27"])
    with pytest.raises(RenderError, match="kubeVersion"):
        render(helm, "classic-sidecar", kube_version="1.26")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pod_spec_has_what_the_sidecar_needs(helm, variant):
    docs = render(helm, variant)
    native = VARIANTS[variant][2]
    values = merged_values(variant)
    spec = workload_spec(docs)
    facts = podspec.check_sidecar(spec, native)
    podspec.check_drain_token(docs, spec, facts["sidecar"], facts["admin_port"])
    podspec.check_grace(spec, values["manifest"]["drain"], values["app"]["shutdownSeconds"])
    podspec.check_security(spec)
    pod_labels = workload(docs)["spec"]["template"]["metadata"]["labels"]
    selector = workload(docs)["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items(), "the workload's selector must match its pods"
    if variant != "existing-configmap":
        manifest = manifest_of(docs, facts["config_map"], facts["key"])
        args = [str(a) for a in facts["sidecar"]["args"]]
        assert manifest["admin"]["address"] == podspec.flag(args, "--admin-addr")
        assert set(manifest) <= {"consul", "admin", "drain", "readiness", "services"}, f"unexpected manifest keys {set(manifest)}"
        assert manifest["readiness"] == values["manifest"].get("readiness", "all"), "the pod is Ready only while Consul holds it passing"
        if values["consul"]["mode"] == "catalog":
            podspec.check_catalog_mode(manifest, facts["env"])
        else:
            assert not {"mode", "catalog"} & set(manifest.get("consul", {})), manifest["consul"]


def test_sidecar_args_and_env_by_default(helm):
    spec = workload_spec(render(helm, "minimal"))
    sidecar = podspec.sidecar_of(spec, native=True)
    assert sidecar["args"] == [
        "run", "--manifest", "/etc/consul-registrar/manifest.yaml", "--admin-addr", "0.0.0.0:9102",
        "--log-format", "json", "--log-level", "info",
    ]
    env = podspec.env_of(sidecar)
    assert env["CONSUL_HTTP_ADDR"]["value"] == "http://$(HOST_IP):8500", "default: the node-local agent"
    assert list(env)[:len(podspec.DOWNWARD_API)] == list(podspec.DOWNWARD_API), "the Downward API variables come first"
    assert not {"CONSUL_HTTP_TOKEN_FILE", "CONSUL_CACERT", "CONSUL_HTTP_SSL"} & set(env)
    assert sidecar["image"] == "ghcr.io/consul-registrar/consul-registrar:0.1.0"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/healthz", "the app starts once the sidecar answers"
    assert sidecar["resources"] == {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}}
    assert [c["name"] for c in spec["containers"]] == ["app"]


def test_classic_sidecar_is_a_second_container(helm):
    spec = workload_spec(render(helm, "classic-sidecar"))
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["app", "consul-registrar"]


def test_the_app_is_required_and_nothing_of_the_demo_is_left_in_the_defaults(helm):
    services = {"manifest": APP["manifest"]}
    for values, complaint in [
        (services, "app.image.repository is required"),
        ({**services, "app": {"image": {"repository": "shop"}}}, r"app.image.tag \(or app.image.digest\) is required"),
        ({"app": {"image": {"repository": "shop", "tag": "1"}}}, "set manifest.services"),
    ]:
        with pytest.raises(RenderError, match=complaint):
            helm.template(values)
    text = (CHART / "values.yaml").read_text()
    for demo in ("demo-app", "helloworld", "hello", "50051"):
        assert demo not in text, f"values.yaml still mentions the demo's {demo!r}"


def test_image_tags_must_be_strings(helm):
    """YAML reads `tag: 1.10` as the number 1.1: refused, not rendered as `:1.1`."""
    for values in ({"app": {"image": {"tag": 1.10}}}, {"sidecar": {"image": {"tag": 1.10}}}):
        with pytest.raises(RenderError, match=r"image/tag.*(string|got number)|must be a string"):
            helm.template(APP, values)
    spec = workload_spec(render(helm, "user-values"))
    assert podspec.app_containers(spec)[0]["image"] == "registry.example.com/payments/shop:1.10"


def test_user_kubernetes_objects_replace_the_defaults(helm):
    """A user's probe, resources or security context is rendered as written, never merged with a
    default (a user's httpGet next to a default grpc handler would be invalid)."""
    exec_probe = {"exec": {"command": ["/bin/true"]}, "periodSeconds": 7}
    values = {"sidecar": {"livenessProbe": exec_probe, "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
                          "securityContext": {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                              "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
                                              "runAsUser": 1234}},
              "podSecurityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                     "seccompProfile": {"type": "RuntimeDefault"}}}
    docs = helm.template(APP, values)
    spec = workload_spec(docs)
    sidecar = podspec.sidecar_of(spec, native=True)
    assert sidecar["livenessProbe"] == exec_probe
    assert sidecar["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}}
    assert sidecar["securityContext"]["runAsUser"] == 1234
    assert "fsGroup" not in spec["securityContext"], "the user's pod security context replaces the default"
    app = podspec.app_containers(workload_spec(render(helm, "user-values")))[0]
    assert app["readinessProbe"] == {"httpGet": {"path": "/ready", "port": 8081}}
    assert app["livenessProbe"] == {"exec": {"command": ["/shop", "healthcheck"]}}
    assert_valid(docs, k8s_versions())


@pytest.mark.parametrize(
    "typo, complaint",
    [
        ({"app": {"readinessProbe": {"grpcc": {"port": 8443}}}}, "grpcc"),
        ({"strategy": {"type": "Recreat"}}, "Recreat"),
        ({"sidecar": {"securityContext": {"runAsNonRot": True}}}, "runAsNonRot"),
        ({"app": {"env": [{"name": "A", "valu": "1"}]}}, "valu"),
    ],
)
def test_typos_in_free_form_kubernetes_fields_are_caught(helm, typo, complaint):
    """Probes, strategies, security contexts and env are passed through as written: the strict
    Kubernetes schemas catch what values.schema.json cannot."""
    docs = helm.template(APP, typo)
    with pytest.raises(AssertionError, match=complaint):
        assert_valid(docs, k8s_versions())


def pod_template(chart: Path, helm, *values, files=()) -> tuple[dict, dict]:
    docs = helm.template(*values, files=files, chart=chart)
    w = workload(docs)
    return w["spec"]["template"], w["metadata"]["labels"]


@pytest.mark.parametrize("variant", ["minimal", "user-values", "user-statefulset"])
def test_a_chart_version_only_upgrade_leaves_the_pod_template_unchanged(helm, tmp_path, variant):
    """Rendered twice, with the chart's version changed in between: the pod template (and so the
    pods) stays the same; only the objects' helm.sh/chart label changes."""
    bumped = tmp_path / "consul-registrar"
    shutil.copytree(CHART, bumped)
    chart_yaml = bumped / "Chart.yaml"
    text = chart_yaml.read_text()
    assert re.search(r"^version: \S+$", text, re.M)
    chart_yaml.write_text(re.sub(r"^version: \S+$", "version: 99.1.0", text, flags=re.M))
    values, files = variant_values(variant)
    before, before_labels = pod_template(CHART, helm, *values, files=files)
    after, after_labels = pod_template(bumped, helm, *values, files=files)
    assert before_labels["helm.sh/chart"] != after_labels["helm.sh/chart"], "the chart version did change"
    assert json.dumps(before, sort_keys=True) == json.dumps(after, sort_keys=True), "the pod template changed"
    text = json.dumps(before)
    assert "99.1.0" not in text and "helm.sh/chart" not in text


def test_names_and_labels_follow_the_app(helm):
    docs = helm.template(APP, release="shop")
    w = workload(docs)
    assert w["metadata"]["name"] == "shop"
    assert w["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "shop", "app.kubernetes.io/instance": "shop"}
    assert w["metadata"]["labels"]["app.kubernetes.io/version"] == "2.4.1", "the app's version, not the chart's"
    assert "app.kubernetes.io/part-of" not in json.dumps(docs)
    sidecar_objects = {d["kind"] for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "consul-registrar"}
    assert sidecar_objects == {"ConfigMap", "Secret", "Pod"}, "the sidecar's objects are marked as its component"
    assert "app.kubernetes.io/component" not in w["metadata"]["labels"]
    named = workload(helm.template(APP, {"nameOverride": "payments"}, release="prod"))
    assert named["metadata"]["name"] == "prod-payments"
    assert named["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "payments"
    assert workload(helm.template(APP, {"fullnameOverride": "x"}))["metadata"]["name"] == "x"
    # The demo values keep the names the e2e suites look for.
    demo = workload(render(helm, "demo-values"))
    assert demo["metadata"]["name"] == "demo-consul-registrar"
    assert demo["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "consul-registrar"


def test_replicas_can_be_left_to_an_autoscaler(helm):
    assert workload(helm.template(APP))["spec"]["replicas"] == 1
    w = workload(helm.template(APP, {"replicaCount": None}))
    assert "replicas" not in w["spec"]


def test_statefulset(helm):
    docs = render(helm, "user-statefulset")
    sts = one(docs, "StatefulSet")
    assert sts["spec"]["serviceName"] == "demo"
    assert sts["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    service = one(docs, "Service")
    assert service["metadata"]["name"] == "demo" and service["spec"]["clusterIP"] == "None"
    assert "Deployment" not in kinds(docs)


def test_service_is_optional_and_follows_the_app_ports(helm):
    assert "Service" not in kinds(helm.template(APP))
    docs = helm.template(APP, {"service": {"enabled": True}})
    service = one(docs, "Service")
    assert service["spec"]["ports"] == [{"name": "grpc", "port": 8443, "targetPort": "grpc", "protocol": "TCP"}]
    assert service["spec"]["selector"].items() <= workload(docs)["spec"]["template"]["metadata"]["labels"].items()
    with pytest.raises(RenderError, match="service.enabled needs service.ports or app.ports"):
        helm.template(APP, {"app": {"ports": None}, "service": {"enabled": True}})


@pytest.mark.parametrize(
    "pdb, replicas, ok",
    [
        ({"minAvailable": 2}, 3, True),
        ({"minAvailable": 3}, 3, False),
        ({"minAvailable": 4}, 3, False),
        ({"minAvailable": "100%"}, 3, False),
        ({"minAvailable": "50%"}, 3, True),
        ({"maxUnavailable": 0}, 3, False),
        ({"maxUnavailable": "0%"}, 3, False),
        ({"maxUnavailable": 1}, 1, True),
    ],
)
def test_pdb_cannot_block_node_drains(helm, pdb, replicas, ok):
    values = {"replicaCount": replicas, "podDisruptionBudget": {"enabled": True, **pdb}}
    if ok:
        one(helm.template(APP, values), "PodDisruptionBudget")
    else:
        with pytest.raises(RenderError, match="every node drain blocks"):
            helm.template(APP, values)


def test_token_and_tls_come_from_secrets(helm):
    docs = render(helm, "tls-and-token")
    spec = workload_spec(docs)
    facts = podspec.check_sidecar(spec, native=True)
    env = {k: v.get("value") for k, v in facts["env"].items()}
    mounts = {m["name"]: m for m in facts["sidecar"]["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}

    def secret_file(path: str, secret: str, key: str) -> None:
        """`path` is file `key` of Secret `secret`, mounted read-only into the sidecar."""
        mount = next((m for m in mounts.values() if path == f"{m['mountPath']}/{key}"), None)
        assert mount, f"{path} is not inside a sidecar mount ({[m['mountPath'] for m in mounts.values()]})"
        assert mount["readOnly"] is True
        source = volumes[mount["name"]]["secret"]
        assert source["secretName"] == secret
        assert {"key": key, "path": key} in source["items"]

    manifest = manifest_of(docs, facts["config_map"], facts["key"])
    assert manifest["consul"]["tokenFile"] == env["CONSUL_HTTP_TOKEN_FILE"]
    secret_file(env["CONSUL_HTTP_TOKEN_FILE"], "consul-acl", "token")
    assert manifest["consul"]["tls"]["caFile"] == env["CONSUL_CACERT"]
    secret_file(env["CONSUL_CACERT"], "consul-ca", "tls.crt")
    assert manifest["consul"]["tls"]["certFile"] == env["CONSUL_CLIENT_CERT"]
    secret_file(env["CONSUL_CLIENT_CERT"], "consul-client", "tls.crt")
    assert manifest["consul"]["tls"]["keyFile"] == env["CONSUL_CLIENT_KEY"]
    secret_file(env["CONSUL_CLIENT_KEY"], "consul-client", "tls.key")
    assert env["CONSUL_HTTP_ADDR"] == "https://$(HOST_IP):8501", "TLS defaults to the agent's HTTPS port"
    assert env["CONSUL_HTTP_SSL"] == "true"
    assert env["CONSUL_TLS_SERVER_NAME"] == manifest["consul"]["tls"]["serverName"] == "server.dc1.consul"
    assert env["CONSUL_NAMESPACE"] == "team-a" and env["CONSUL_PARTITION"] == "payments"
    assert "token" not in manifest["consul"], "the token itself never lands in the ConfigMap"
    # The app sees none of it.
    app = podspec.app_containers(spec)[0]
    assert not app.get("volumeMounts") and not app.get("env")


def test_drain_token(helm):
    """Set: the same everywhere and in every render. Generated: 32 characters, one per render,
    the same in the Secret and the preStop header."""
    docs = helm.template(APP)
    spec = workload_spec(docs)
    facts = podspec.check_sidecar(spec, native=True)
    assert podspec.check_drain_token(docs, spec, facts["sidecar"], facts["admin_port"]) == TOKEN
    assert podspec.drain_token_secret(facts["sidecar"]) == ("demo-registrar-drain-token", "token")
    generated = []
    for _ in range(2):
        docs = helm.template({**APP, "drainToken": {"value": ""}})
        spec = workload_spec(docs)
        facts = podspec.check_sidecar(spec, native=True)
        generated.append(podspec.check_drain_token(docs, spec, facts["sidecar"], facts["admin_port"]))
    assert all(re.fullmatch(r"[A-Za-z0-9]{32}", t) for t in generated), generated
    assert generated[0] != generated[1], "without cluster access each render generates a new token"
    with pytest.raises(RenderError, match="drainToken"):
        helm.template({**APP, "drainToken": {"value": "short"}})
    notes_or_values = (CHART / "values.yaml").read_text()
    assert "whoever can read the pod spec can read the token" in notes_or_values


def test_existing_configmap_is_mounted_as_is(helm):
    docs = render(helm, "existing-configmap")
    assert "ConfigMap" not in kinds(docs)
    spec = workload_spec(docs)
    facts = podspec.check_sidecar(spec, native=True)
    assert (facts["config_map"], facts["key"]) == ("shop-registrar", "registrar.yaml")
    annotations = workload(docs)["spec"]["template"]["metadata"].get("annotations", {})
    assert "checksum/manifest" not in annotations
    env = podspec.env_of(facts["sidecar"])
    assert "CONSUL_HTTP_ADDR" in env, "an existing manifest still gets the Consul address from the env"


@pytest.mark.parametrize(
    "delay, deregister, shutdown, grace, ok",
    [
        ("5s", "10s", 5, 30, True),
        ("5s", "10s", 5, 20, True),
        ("5s", "10s", 5, 19, False),
        ("5s", "10s", 0, 15, True),
        ("5s", "10s", 0, 14, False),  # the deregistration is part of the budget
        ("20s", "1s", 1, 21, False),
        ("20s", "1s", 1, 22, True),
        ("1m30s", "10s", 5, 30, False),
        ("1m30s", "10s", 5, 105, True),
        ("1500ms", "500ms", 2, 4, False),  # rounded up: 2 s + 1 s + 2 s
        ("1500ms", "500ms", 2, 5, True),
        ("0s", "0s", 1, 1, True),
    ],
)
def test_grace_period_must_cover_the_drain_and_the_app_shutdown(helm, delay, deregister, shutdown, grace, ok):
    values = {"manifest": {"drain": {"delay": delay, "deregisterTimeout": deregister}},
              "terminationGracePeriodSeconds": grace, "app": {"shutdownSeconds": shutdown}}
    if ok:
        spec = workload_spec(helm.template(APP, values))
        assert spec["terminationGracePeriodSeconds"] == grace
        podspec.check_grace(spec, values["manifest"]["drain"], shutdown)
    else:
        with pytest.raises(RenderError, match=r"terminationGracePeriodSeconds \(\d+\) must be at least the drain delay .* plus drain.deregisterTimeout"):
            helm.template(APP, values)


def test_grace_period_check_also_guards_existing_configmaps(helm):
    with pytest.raises(RenderError, match="must be at least the drain delay"):
        helm.template(APP, {"manifest": {"existingConfigMap": "x", "drain": {"delay": "40s"}}})


def checksum(helm, *values) -> str:
    docs = helm.template(APP, *values)
    return workload(docs)["spec"]["template"]["metadata"]["annotations"]["checksum/manifest"]


def test_manifest_checksum_follows_the_manifest_data_only(helm):
    base = checksum(helm)
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert checksum(helm) == base, "the checksum must be stable"
    changed = {
        "drain delay": {"manifest": {"drain": {"delay": "7s"}}},
        "services": {"manifest": {"services": [{"name": "other", "port": 1234}]}},
        "admin port": {"sidecar": {"adminPort": 9200}},
        "token secret": {"consul": {"aclToken": {"secretName": "acl"}}},
        "datacenter": {"consul": {"datacenter": "dc2"}},
    }
    for what, values in changed.items():
        assert checksum(helm, values) != base, f"changing the {what} must roll the pods"
    same = {"replicas": {"replicaCount": 5}, "app image": {"app": {"image": {"tag": "2"}}},
            "labels": {"commonLabels": {"team": "x"}}, "release": {}}
    for what, values in same.items():
        assert checksum(helm, values) == base, f"changing the {what} must not change the manifest checksum"


def test_prometheus_scraping(helm):
    docs = render(helm, "monitoring-and-pdb")
    pod = workload(docs)["spec"]["template"]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "9102"
    assert annotations["prometheus.io/path"] == "/metrics"
    labels = pod["metadata"]["labels"]

    monitor = one(docs, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["metadata"]["labels"]["release"] == "prom"
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == podspec.ADMIN_PORT_NAME and endpoint["path"] == "/metrics"

    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items(), "the metrics Service must select the pods"
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == 9102
    service_monitor = one(docs, "ServiceMonitor")
    assert service_monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert service_monitor["spec"]["endpoints"][0]["port"] == port["name"]
    assert service_monitor["spec"]["endpoints"][0]["scrapeTimeout"] == "10s"

    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"] == {"minAvailable": "50%", "selector": pdb["spec"]["selector"]}

    quiet = workload(helm.template(APP, {"metrics": {"scrapeAnnotations": False}}))
    assert not any(k.startswith("prometheus.io/") for k in quiet["spec"]["template"]["metadata"]["annotations"])


def test_network_policy_keeps_the_admin_port_to_the_scrapers(helm):
    assert "NetworkPolicy" not in kinds(helm.template(APP)), "off by default"
    docs = render(helm, "user-values")
    policy = one(docs, "NetworkPolicy")
    labels = workload(docs)["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    admin = 9102

    def allowed(port: int, protocol: str, peer: str) -> bool:
        for rule in policy["spec"]["ingress"]:
            peers = rule.get("from")
            if peers is not None and peer == "anyone":
                continue
            for p in rule.get("ports", []):
                if p.get("protocol", "TCP") == protocol and p["port"] <= port <= p.get("endPort", p["port"]):
                    return True
        return False

    assert not allowed(admin, "TCP", "anyone"), "the admin port (/drain) must not be open to every peer"
    assert allowed(admin, "TCP", "scraper")
    for port in (1, 8443, admin - 1, admin + 1, 65535):
        assert allowed(port, "TCP", "anyone"), f"the app's own port {port} must stay open"
    assert allowed(53, "UDP", "anyone")
    scrapers = [r for r in policy["spec"]["ingress"] if r.get("from")]
    assert scrapers[0]["from"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    closed = one(helm.template(APP, {"networkPolicy": {"enabled": True, "allowOtherPorts": False}}), "NetworkPolicy")
    assert closed["spec"]["ingress"] == [], "nothing allowed but what the user lists"
    # Catalog mode's shared session: the release's own pods reach the admin port (heartbeats).
    shared = one(helm.template(APP, CATALOG, {"networkPolicy": {"enabled": True, "allowOtherPorts": False}}),
                 "NetworkPolicy")
    assert shared["spec"]["ingress"] == [{
        "from": [{"podSelector": {"matchLabels": shared["spec"]["podSelector"]["matchLabels"]}}],
        "ports": [{"port": 9102, "protocol": "TCP"}]}], shared["spec"]["ingress"]
    alone = one(helm.template(APP, CATALOG, {"networkPolicy": {"enabled": True, "allowOtherPorts": False},
                                             "consul": {"catalog": {"sharedSession": False}}}), "NetworkPolicy")
    assert alone["spec"]["ingress"] == [], "a session per sidecar: no heartbeats to let in"


def test_catalog_mode_goes_into_the_manifest_and_the_sidecar_reaches_the_servers(helm):
    """consul.mode=catalog: the manifest says so (with the catalog settings that were set, and
    nothing for those left to the sidecar's defaults), CONSUL_HTTP_ADDR is the servers', the
    sidecar (and the helm test Pod) get NODE_NAME and HOST_IP from the Downward API, the virtual
    node's defaults. Agent mode leaves the manifest (and its checksum: no pods roll on upgrade)
    as it was before catalog mode existed."""
    docs = render(helm, "catalog-mode")
    spec = workload_spec(docs)
    facts = podspec.check_sidecar(spec, native=True)
    manifest = manifest_of(docs, facts["config_map"], facts["key"])
    assert manifest["consul"] == {"mode": "catalog", "catalog": {
        "sessionTTL": "15s", "keyPrefix": "shop/instances",
        # The node's other sidecars heartbeat the holder of its shared session on the pod IP.
        "sharedSession": {"advertise": "${POD_IP}:9102"}}}
    assert facts["env"]["CONSUL_HTTP_ADDR"]["value"] == SERVERS
    podspec.check_catalog_mode(manifest, facts["env"])
    test_pod = one(docs, "Pod")["spec"]["containers"][0]
    for var in ("NODE_NAME", "HOST_IP"):
        assert podspec.env_of(test_pod)[var] == facts["env"][var], f"helm test validates with the pod's {var}"
    named = {"node": "registrar-${NODE_NAME}-x", "nodeAddress": "${HOST_IP}", "sessionTTL": "1m", "keyPrefix": "k"}
    docs = helm.template(APP, CATALOG, {"consul": {"catalog": named}})
    facts = podspec.check_sidecar(workload_spec(docs), native=True)
    assert manifest_of(docs, facts["config_map"], facts["key"])["consul"]["catalog"] == {
        **named, "sharedSession": {"advertise": "${POD_IP}:9102"}}
    # A session per sidecar, and the admin port where it is moved.
    docs = helm.template(APP, CATALOG, {"consul": {"catalog": {"sharedSession": False}}})
    facts = podspec.check_sidecar(workload_spec(docs), native=True)
    assert "sharedSession" not in manifest_of(docs, facts["config_map"], facts["key"])["consul"]["catalog"]
    docs = helm.template(APP, CATALOG, {"sidecar": {"adminPort": 9200}})
    facts = podspec.check_sidecar(workload_spec(docs), native=True)
    assert manifest_of(docs, facts["config_map"], facts["key"])["consul"]["catalog"]["sharedSession"] == {
        "advertise": "${POD_IP}:9200"}
    # Agent mode, said or not: the same manifest and checksum as a chart without catalog mode.
    assert checksum(helm) == checksum(helm, {"consul": {"mode": "agent", "catalog": {}}})
    facts = podspec.check_sidecar(workload_spec(helm.template(APP)), native=True)
    assert "consul" not in manifest_of(helm.template(APP), facts["config_map"], facts["key"])
    assert checksum(helm, CATALOG) != checksum(helm, {"consul": {"address": SERVERS}}), "switching mode rolls the pods"


def test_a_login_mounts_a_projected_token_and_names_the_service_account_after_the_service(helm):
    """consul.login: the manifest's login reads a projected service account token the pod mounts
    into the sidecar (the API server's audience unless one is set), no token Secret or variable,
    and the ServiceAccount is named after the first service, so the auth method's default binding
    rule (bind_type service, ${serviceaccount.name}) lets the pod write it."""
    docs = render(helm, "login")
    spec = workload_spec(docs)
    facts = podspec.check_sidecar(spec, native=True)
    manifest = manifest_of(docs, facts["config_map"], facts["key"])
    assert manifest["consul"] == {"login": {
        "authMethod": "consul-k8s-auth-method",
        "bearerTokenFile": "/var/run/secrets/consul-registrar/login/token",
        "meta": {"pod": "${POD_NAMESPACE}/${POD_NAME}", "team": "shop"},
    }}
    volume = next(v for v in spec["volumes"] if v["name"] == "consul-registrar-login")
    assert volume["projected"]["sources"] == [{"serviceAccountToken": {"path": "token", "expirationSeconds": 3600}}]
    mounts = {m["name"]: m for m in facts["sidecar"]["volumeMounts"]}
    assert mounts["consul-registrar-login"]["mountPath"] == "/var/run/secrets/consul-registrar/login"
    assert "CONSUL_HTTP_TOKEN_FILE" not in facts["env"]
    assert spec["serviceAccountName"] == "shop"
    assert one(docs, "ServiceAccount")["metadata"]["name"] == "shop"
    docs = helm.template(APP, LOGIN, {"consul": {"login": {"audience": "consul", "expirationSeconds": 7200}}})
    spec = workload_spec(docs)
    volume = next(v for v in spec["volumes"] if v["name"] == "consul-registrar-login")
    assert volume["projected"]["sources"][0]["serviceAccountToken"] == {
        "path": "token", "expirationSeconds": 7200, "audience": "consul"}
    # An explicit name wins; without a login, the release's full name as before.
    assert workload_spec(helm.template(APP, LOGIN, {"serviceAccount": {"name": "mine"}}))["serviceAccountName"] == "mine"
    assert workload_spec(helm.template(APP))["serviceAccountName"] != "shop"


@pytest.mark.parametrize(
    "values, complaint",
    [
        # catalog-only values in agent mode
        ({"consul": {"catalog": {"node": "x"}}}, r"consul.catalog.node is only read in catalog mode, and consul.mode is agent"),
        ({"consul": {"address": SERVERS, "catalog": {"sessionTTL": "10s"}}}, r"consul.catalog.sessionTTL is only read in catalog mode"),
        ({"consul": {"catalog": {"keyPrefix": "k"}}}, r"consul.catalog.keyPrefix is only read in catalog mode"),
        # agent-only values in catalog mode
        ({**CATALOG, "manifest": {"services": [{"name": "shop", "port": 8443, "check": {"ttl": "10s"}}]}},
         r"manifest.services\[0\].check.ttl is agent-only and consul.mode is catalog"),
        ({**CATALOG, "manifest": {"services": [{"name": "a", "port": 1},
                                                 {"name": "b", "port": 2, "check": {"deregisterCriticalServiceAfter": "1m"}}]}},
         r"manifest.services\[1\].check.deregisterCriticalServiceAfter is agent-only"),
        # catalog mode needs the servers, a TTL Consul accepts, and its manifest generated
        ({"consul": {"mode": "catalog"}}, r"consul.mode=catalog registers through the Consul servers: set consul.address .*consul-server.consul.svc:8500"),
        ({"consul": {"mode": "catalog", "address": SERVERS, "catalog": {"sessionTTL": "9s"}}}, r"sessionTTL 9s is outside Consul's session TTL range, 10s..24h"),
        ({"consul": {"mode": "catalog", "address": SERVERS, "catalog": {"sessionTTL": "25h"}}}, r"sessionTTL 25h is outside"),
        ({**CATALOG, "manifest": {"existingConfigMap": "mine"}}, r"manifest.existingConfigMap \(mine\) replaces it: put `mode: catalog`"),
        # a login gets its own token, from a projected token Kubernetes accepts
        ({**LOGIN, "consul": {**LOGIN["consul"], "aclToken": {"secretName": "acl"}}},
         r"set consul.login.authMethod or consul.aclToken.secretName, not both"),
        ({"consul": {"login": {"authMethod": "m", "expirationSeconds": 599}}}, r"/consul/login/expirationSeconds"),
        ({"manifest": {"consul": {"login": {"authMethod": "m"}}}}, "additional properties 'login' not allowed"),
        # the schema
        ({"consul": {"mode": "Catalog"}}, r"/consul/mode"),
        ({"consul": {"mode": "catalog", "address": SERVERS, "catalog": {"sessionTtl": "10s"}}}, "additional properties 'sessionTtl' not allowed"),
        ({"manifest": {"consul": {"mode": "catalog"}}}, "additional properties 'mode' not allowed"),
        ({**CATALOG, "consul": {**CATALOG["consul"], "catalog": {"node": "node a"}}}, r"/consul/catalog/node"),
        ({**CATALOG, "consul": {**CATALOG["consul"], "catalog": {"keyPrefix": "/abs"}}}, r"/consul/catalog/keyPrefix"),
    ],
)
def test_mode_settings_that_do_not_go_together_are_refused(helm, values, complaint):
    """The sidecar's own rules (a manifest mixing agent-only and catalog-only fields is refused),
    checked when the chart renders instead of when the pods start."""
    with pytest.raises(RenderError) as error:
        helm.template(APP, values)
    assert re.search(complaint, str(error.value)), str(error.value)


def test_catalog_mode_accepts_what_the_sidecar_accepts(helm):
    for ttl in ("10s", "24h", "1m30s", "${SESSION_TTL}"):
        helm.template(APP, CATALOG, {"consul": {"catalog": {"sessionTTL": ttl}}})
    for node in ("consul-registrar-${NODE_NAME}", "kind-worker.eu_1"):
        helm.template(APP, CATALOG, {"consul": {"catalog": {"node": node}}})
    for prefix in ("consul-registrar/instances", "a/b/", "teams/${TEAM}/instances"):
        helm.template(APP, CATALOG, {"consul": {"catalog": {"keyPrefix": prefix}}})
    helm.template(APP, CATALOG, {"manifest": {"services": [{"name": "shop", "port": 1, "check": {"notes": "kept"}}]}})


def test_helm_test_pod_validates_the_manifest_the_pods_mount(helm):
    docs = render(helm, "tls-and-token")
    pod = one(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    [container] = pod["spec"]["containers"]
    assert container["args"][:2] == ["validate", "--manifest"]
    spec = workload_spec(docs)
    sidecar = podspec.sidecar_of(spec, native=True)
    assert container["image"] == sidecar["image"]
    assert container["env"] == [e for e in sidecar["env"] if e["name"] != podspec.DRAIN_TOKEN_ENV], (
        "validate sees the sidecar's environment (but the drain token)")
    assert container["volumeMounts"] == sidecar["volumeMounts"], "and its files (token, TLS, manifest)"
    pod_volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    for mount in container["volumeMounts"]:
        assert pod_volumes[mount["name"]] in spec["volumes"]
    assert pod["spec"]["restartPolicy"] == "Never"
    assert "Pod" not in kinds(helm.template(APP, {"tests": {"enabled": False}}))


def test_validate_on_install_fails_the_release_before_any_pod_changes(helm):
    """tests.validateOnInstall: a pre-install/pre-upgrade hook Pod validates a hook copy of the
    manifest (the release's own ConfigMap does not exist yet before an install)."""
    assert not [d for d in helm.template(APP) if "pre-install" in str(d["metadata"].get("annotations"))], "off by default"
    docs = helm.template(APP, {"tests": {"validateOnInstall": True}})
    hooks = [d for d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-install,pre-upgrade"]
    assert sorted(d["kind"] for d in hooks) == ["ConfigMap", "Pod"]
    config_map = one(hooks, "ConfigMap")
    pod = one(hooks, "Pod")
    assert int(config_map["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(pod["metadata"]["annotations"]["helm.sh/hook-weight"])
    volume = next(v for v in pod["spec"]["volumes"] if "configMap" in v)
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    facts = podspec.check_sidecar(workload_spec(docs), native=True)
    released = manifest_of(docs, facts["config_map"], facts["key"])
    assert config_map["metadata"]["name"] != facts["config_map"]
    assert yaml.safe_load(config_map["data"]["manifest.yaml"]) == released, "the hook checks the very manifest the pods get"
    assert podspec.DRAIN_TOKEN_ENV not in json.dumps(pod), "the drain token's Secret does not exist before an install"
    assert_valid(docs, k8s_versions())
    existing = helm.template(APP, {"tests": {"validateOnInstall": True}, "manifest": {"existingConfigMap": "mine"}})
    hooks = [d for d in existing if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-install,pre-upgrade"]
    assert [d["kind"] for d in hooks] == ["Pod"], "an existing ConfigMap is validated in place"


def test_user_pod_annotations_win(helm):
    docs = render(helm, "everything-else")
    annotations = workload(docs)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false"


def test_everything_else_is_passed_through(helm):
    docs = render(helm, "everything-else")
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["name"] == "shop"
    assert deployment["metadata"]["labels"]["team"] == "payments"
    assert "team" not in deployment["spec"]["template"]["metadata"]["labels"], "commonLabels stay off the pod template"
    spec = podspec.pod_spec(deployment)
    assert spec["serviceAccountName"] == "shop" and "ServiceAccount" not in kinds(docs)
    app = podspec.app_containers(spec)[0]
    assert app["image"] == "registry.example.com/shop@sha256:" + "a" * 64
    facts = podspec.check_sidecar(spec, native=True)
    assert podspec.flag(facts["sidecar"]["args"], "--admin-addr") == "[::]:9300"
    assert facts["env"]["REGION"]["value"] == "eu-1"
    manifest = manifest_of(docs, facts["config_map"], facts["key"])
    assert manifest["consul"] == {"retry": {"initial": "200ms", "max": "2s"}, "resyncInterval": "30s"}
    assert [s["name"] for s in manifest["services"]] == ["shop", "shop-admin"]
    assert app["lifecycle"]["preStop"]["httpGet"]["port"] == 9300


@pytest.mark.parametrize(
    "values, complaint",
    [
        ({"replicas": 3}, "additional properties 'replicas' not allowed"),
        ({"app": {"imagee": {}}}, "additional properties 'imagee' not allowed"),
        ({"sidecar": {"nativ": True}}, "additional properties 'nativ' not allowed"),
        ({"consul": {"tls": {"ca": "x"}}}, "additional properties 'ca' not allowed"),
        ({"manifest": {"services": [{"name": "a", "port": 1, "health": {"intervall": "1s"}}]}},
         "additional properties 'intervall' not allowed"),
        ({"manifest": {"services": [{"name": "a"}]}}, "missing property 'port'"),
        ({"manifest": {"drain": {"delay": "5 seconds"}}}, "/manifest/drain/delay"),
        ({"manifest": {"drain": {"deregisterTimeout": "${T}"}}}, "/manifest/drain/deregisterTimeout"),
        ({"manifest": {"readiness": "sometimes"}}, "/manifest/readiness"),
        ({"sidecar": {"logFormat": "xml"}}, "/sidecar/logFormat"),
        ({"sidecar": {"adminBindAddress": "127.0.0.1"}}, "/sidecar/adminBindAddress"),
        ({"app": {"name": "consul-registrar"}}, "/app/name"),
        ({"sidecar": {"image": {"pullPolicy": "Sometimes"}}}, "/sidecar/image/pullPolicy"),
        ({"kind": "DaemonSet"}, "/kind"),
        ({"drainToken": {"value": "has spaces in it, sixteen+"}}, "/drainToken/value"),
    ],
)
def test_schema_rejects_mistakes(helm, values, complaint):
    with pytest.raises(RenderError) as error:
        helm.template(APP, values)
    message = str(error.value)
    assert complaint in message or re.search(complaint, message), message


def test_demo_values_run_three_replicas_against_the_consul_dev_server(helm, kustomize):
    docs = render(helm, "demo-values")
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    spec = podspec.pod_spec(deployment)
    facts = podspec.check_sidecar(spec, native=True)
    # The images scripts/images.sh builds (ours always tagged :dev) and every provider loads, never
    # pulled.
    images_sh = (Path(__file__).resolve().parents[2] / "scripts" / "images.sh").read_text()
    built = re.search(r"^all=\(([^)]*)\)", images_sh, re.M)
    assert built, "scripts/images.sh has no all=(...) list of the images it builds"
    for container in [facts["sidecar"], *podspec.app_containers(spec)]:
        assert container["imagePullPolicy"] == "Never"
    assert {c["image"] for c in [facts["sidecar"], *podspec.app_containers(spec)]} == {
        "consul-registrar:dev", "consul-registrar-demo-app:dev"}
    assert {"consul-registrar", "consul-registrar-demo-app"} <= set(built.group(1).split()), (
        f"scripts/images.sh does not build both: {built.group(1)}")
    # The Consul address is the Service of deploy/consul-dev.
    consul = kustomize(DEPLOY / "consul-dev")
    service = one(consul, "Service")
    port = service["spec"]["ports"][0]["port"]
    expected = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{port}"
    assert facts["env"]["CONSUL_HTTP_ADDR"]["value"] == expected
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("variant", ["minimal", "demo-values", "classic-sidecar", "everything-else", "user-values",
                                     "catalog-mode", "login"])
def test_rendered_manifest_is_accepted_by_the_sidecar(helm, registrar_bin, tmp_path, variant):
    docs = render(helm, variant)
    facts = podspec.check_sidecar(workload_spec(docs), VARIANTS[variant][2])
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == facts["config_map"])
    env = dict(POD_ENV)
    for name, entry in facts["env"].items():
        if "value" in entry and "$(" not in entry["value"]:
            env[name] = entry["value"]
    text = config_map["data"][facts["key"]]
    manifest = yaml.safe_load(text)
    if "tokenFile" in manifest.get("consul", {}):
        token_file = tmp_path / "acl-token"
        token_file.write_text("00000000-0000-0000-0000-000000000000")
        manifest["consul"]["tokenFile"] = str(token_file)
        env.pop("CONSUL_HTTP_TOKEN_FILE", None)
        text = yaml.safe_dump(manifest)
    registrations = validate_manifest(registrar_bin, text, tmp_path, env)
    assert registrations, "no service registered"
    assert all(("Service" in reg) == (manifest.get("consul", {}).get("mode") == "catalog") for reg in registrations), (
        "catalog registrations in catalog mode, agent ones otherwise")
    for reg in map(registered_instance, registrations):
        assert reg["Address"] == POD_ENV["POD_IP"], "instances register at the pod IP"
        assert POD_ENV["POD_NAME"] in reg["ID"], "instance IDs are per pod"


@pytest.mark.parametrize(
    "values, expect",
    [
        ({}, ["rollout status deployment/demo", "/v1/health/service/shop", "CLIENT AGENT on every node",
              "catalog mode", "helm test demo"]),
        ({"manifest": {"existingConfigMap": "shop"}}, ["ConfigMap shop"]),
        ({"app": {"drainOnStop": False}}, ["WARNING: app.drainOnStop=false"]),
        ({"kind": "StatefulSet"}, ["rollout status statefulset/demo"]),
        (CATALOG, ["in catalog mode through the Consul servers at " + SERVERS,
                   "virtual node consul-registrar-<Kubernetes node>", "(15s TTL) expires"]),
    ],
)
def test_notes(helm, values, expect):
    notes = helm.notes(APP, values)
    for text in expect:
        assert text in notes, notes


def test_chart_and_readme_say_that_the_default_needs_a_client_agent_on_every_node():
    for path in (CHART / "README.md", CHART / "values.yaml", CHART.parents[1] / "README.md"):
        text = " ".join(path.read_text().split())
        assert re.search(r"client agent on every node", text, re.I), f"{path} must say the default needs a client agent per node"
        assert "catalog mode" in text, f"{path} must point agentless users to catalog mode"


def leaf_paths(values: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        # Kubernetes objects passed through verbatim are documented as one value.
        if isinstance(value, dict) and value and not key.endswith(("Probe", "Context", "resources")):
            paths += leaf_paths(value, path + ".")
        else:
            paths.append(path)
    return paths


def test_readme_documents_every_value():
    """The chart README's values table lists every value of values.yaml, with its default."""
    readme = (CHART / "README.md").read_text()
    rows = dict(re.findall(r"^\| `([^`]+)` \| ([^|]+) \|", readme, re.M))
    paths = leaf_paths(DEFAULTS)
    missing = [p for p in paths if p not in rows]
    assert not missing, f"charts/consul-registrar/README.md's values table lacks {missing}"
    unknown = [p for p in rows if p not in paths]
    assert not unknown, f"the README documents values that do not exist: {unknown}"
    for path in paths:
        value = DEFAULTS
        for key in path.split("."):
            value = value[key]
        if not isinstance(value, (dict, list)) or not value:
            expected = "`" + json.dumps(value) + "`"
            assert rows[path].strip() == expected, f"README says {path} defaults to {rows[path]}, values.yaml {expected}"
