"""The Helm chart, rendered with `helm template` and read back: every variant validates strictly
against the Kubernetes schemas, and the pod spec carries what the sidecar contract needs (see
podspec.py). Run through `bash scripts/check-k8s.sh`."""

import json
import re
from pathlib import Path

import pytest
import yaml

import podspec
from conftest import CHART, DEPLOY, POD_ENV, RenderError, kinds, manifest_of, one, validate_manifest
from conftest import k8s_versions
from k8s_schemas import assert_valid

DEMO_VALUES = CHART / "ci" / "demo-values.yaml"
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())

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
# Each variant: (values dicts, values files, native sidecar?)
VARIANTS = {
    "defaults": ([], [], True),
    "classic-sidecar": ([{"sidecar": {"native": False}}], [], False),
    "demo-values": ([], [DEMO_VALUES], True),
    "demo-values-classic": ([{"sidecar": {"native": False}}], [DEMO_VALUES], False),
    "existing-configmap": ([{"manifest": {"existingConfigMap": "shop-registrar", "existingConfigMapKey": "registrar.yaml"}}], [], True),
    "tls-and-token": ([TLS_AND_TOKEN], [], True),
    "tls-and-token-classic": ([TLS_AND_TOKEN, {"sidecar": {"native": False}}], [], False),
    "monitoring-and-pdb": (
        [{
            "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}},
                        "serviceMonitor": {"enabled": True, "scrapeTimeout": "10s"}},
            "podDisruptionBudget": {"enabled": True, "minAvailable": "50%"},
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
                                           "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "consul-registrar"}}}],
        }],
        [],
        True,
    ),
}


def render(helm, name: str, **kw) -> list[dict]:
    values, files, _ = VARIANTS[name]
    return helm.template(*values, files=files, **kw)


def deployment_spec(docs: list[dict]) -> dict:
    return podspec.pod_spec(one(docs, "Deployment"))


def drain_delay(docs: list[dict], name: str) -> str:
    values, files, _ = VARIANTS[name]
    merged = DEFAULTS["manifest"]["drain"]["delay"]
    for f in files:
        merged = yaml.safe_load(Path(f).read_text()).get("manifest", {}).get("drain", {}).get("delay", merged)
    for v in values:
        merged = v.get("manifest", {}).get("drain", {}).get("delay", merged)
    return merged


@pytest.mark.parametrize("version", k8s_versions())
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_render_is_valid_kubernetes(helm, variant, version):
    assert_valid(render(helm, variant, kube_version=version), [version])


def test_native_sidecar_needs_kubernetes_1_29(helm):
    """Native sidecars exist from 1.29 on: the chart refuses them for older clusters, and the
    schemas agree (restartPolicy on an init container is unknown to 1.27's)."""
    with pytest.raises(RenderError, match="sidecar.native=true needs Kubernetes 1.29"):
        render(helm, "defaults", kube_version="1.28")
    with pytest.raises(AssertionError, match="restartPolicy"):
        assert_valid(render(helm, "defaults"), ["1.27"])
    assert_valid(render(helm, "classic-sidecar", kube_version="1.27"), ["1.27"])
    with pytest.raises(RenderError, match="kubeVersion"):
        render(helm, "classic-sidecar", kube_version="1.26")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pod_spec_has_what_the_sidecar_needs(helm, variant):
    docs = render(helm, variant)
    native = VARIANTS[variant][2]
    spec = deployment_spec(docs)
    facts = podspec.check_sidecar(spec, native)
    podspec.check_prestop(spec, facts["admin_port"])
    podspec.check_grace(spec, drain_delay(docs, variant))
    podspec.check_security(spec)
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items(), "the Deployment's selector must match its pods"
    if variant != "existing-configmap":
        manifest = manifest_of(docs, facts["config_map"], facts["key"])
        args = [str(a) for a in facts["sidecar"]["args"]]
        assert manifest["admin"]["address"] == podspec.flag(args, "--admin-addr")
        assert set(manifest) <= {"consul", "admin", "drain", "services"}, f"unexpected manifest keys {set(manifest)}"


def test_sidecar_args_and_env_by_default(helm):
    spec = deployment_spec(render(helm, "defaults"))
    sidecar = podspec.sidecar_of(spec, native=True)
    assert sidecar["args"] == [
        "run", "--manifest", "/etc/consul-registrar/manifest.yaml", "--admin-addr", "0.0.0.0:9102",
        "--log-format", "json", "--log-level", "info",
    ]
    env = podspec.env_of(sidecar)
    assert env["CONSUL_HTTP_ADDR"]["value"] == "http://$(HOST_IP):8500", "default: the node-local agent"
    assert list(env)[:5] == list(podspec.DOWNWARD_API), "the Downward API variables come first"
    assert not {"CONSUL_HTTP_TOKEN_FILE", "CONSUL_CACERT", "CONSUL_HTTP_SSL"} & set(env)
    assert sidecar["image"] == "ghcr.io/consul-registrar/consul-registrar:0.1.0"
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/healthz", "the app starts once the sidecar answers"
    assert [c["name"] for c in spec["containers"]] == ["app"]


def test_classic_sidecar_is_a_second_container(helm):
    spec = deployment_spec(render(helm, "classic-sidecar"))
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["app", "consul-registrar"]


def test_token_and_tls_come_from_secrets(helm):
    docs = render(helm, "tls-and-token")
    spec = deployment_spec(docs)
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


def test_existing_configmap_is_mounted_as_is(helm):
    docs = render(helm, "existing-configmap")
    assert "ConfigMap" not in kinds(docs)
    spec = deployment_spec(docs)
    facts = podspec.check_sidecar(spec, native=True)
    assert (facts["config_map"], facts["key"]) == ("shop-registrar", "registrar.yaml")
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    assert "checksum/manifest" not in annotations
    env = podspec.env_of(facts["sidecar"])
    assert "CONSUL_HTTP_ADDR" in env, "an existing manifest still gets the Consul address from the env"


@pytest.mark.parametrize(
    "delay, grace, margin, ok",
    [
        ("5s", 30, 5, True),
        ("5s", 10, 5, True),
        ("5s", 9, 5, False),
        ("5s", 5, 5, False),  # equal to the delay
        ("5s", 4, 5, False),  # below it
        ("20s", 20, 1, False),
        ("20s", 21, 1, True),
        ("1m30s", 30, 5, False),
        ("1m30s", 95, 5, True),
        ("1500ms", 6, 5, False),  # rounded up: 2 s + 5 s
        ("1500ms", 7, 5, True),
        ("0s", 1, 1, True),
    ],
)
def test_grace_period_must_exceed_the_drain_delay(helm, delay, grace, margin, ok):
    values = {"manifest": {"drain": {"delay": delay}}, "terminationGracePeriodSeconds": grace,
              "drainGraceMarginSeconds": margin}
    if ok:
        spec = deployment_spec(helm.template(values))
        assert spec["terminationGracePeriodSeconds"] == grace
        podspec.check_grace(spec, delay)
    else:
        with pytest.raises(RenderError, match=r"terminationGracePeriodSeconds \(\d+\) must be at least the drain delay"):
            helm.template(values)


def test_grace_period_check_also_guards_existing_configmaps(helm):
    with pytest.raises(RenderError, match="must be at least the drain delay"):
        helm.template({"manifest": {"existingConfigMap": "x", "drain": {"delay": "40s"}}})


def checksum(helm, *values) -> str:
    docs = helm.template(*values)
    return one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/manifest"]


def test_manifest_checksum_follows_the_manifest(helm):
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
    for what, values in {"replicas": {"replicaCount": 5}, "app image": {"app": {"image": {"tag": "2"}}}}.items():
        assert checksum(helm, values) == base, f"changing the {what} must not change the manifest checksum"


def test_prometheus_scraping(helm):
    docs = render(helm, "monitoring-and-pdb")
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]
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

    quiet = one(helm.template({"metrics": {"scrapeAnnotations": False}}), "Deployment")
    assert not any(k.startswith("prometheus.io/") for k in quiet["spec"]["template"]["metadata"]["annotations"])


def test_user_pod_annotations_win(helm):
    docs = render(helm, "everything-else")
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "false"


def test_everything_else_is_passed_through(helm):
    docs = render(helm, "everything-else")
    deployment = one(docs, "Deployment")
    assert deployment["metadata"]["name"] == "shop"
    assert deployment["metadata"]["labels"]["team"] == "payments"
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
        ({"manifest": {"services": []}}, "minItems"),
        ({"manifest": {"drain": {"delay": "5 seconds"}}}, "/manifest/drain/delay"),
        ({"sidecar": {"logFormat": "xml"}}, "/sidecar/logFormat"),
        ({"sidecar": {"adminBindAddress": "127.0.0.1"}}, "/sidecar/adminBindAddress"),
        ({"app": {"name": "consul-registrar"}}, "/app/name"),
        ({"sidecar": {"image": {"pullPolicy": "Sometimes"}}}, "/sidecar/image/pullPolicy"),
    ],
)
def test_schema_rejects_mistakes(helm, values, complaint):
    with pytest.raises(RenderError) as error:
        helm.template(values)
    message = str(error.value)
    assert complaint in message or re.search(complaint, message), message


def test_demo_values_run_three_replicas_against_the_consul_dev_server(helm, kustomize):
    docs = render(helm, "demo-values")
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    spec = podspec.pod_spec(deployment)
    facts = podspec.check_sidecar(spec, native=True)
    # The images the kind provider builds and loads, never pulled.
    run_sh = (Path(__file__).resolve().parents[1] / "e2e" / "kind" / "cluster.sh").read_text()
    for container in [facts["sidecar"], *podspec.app_containers(spec)]:
        assert container["imagePullPolicy"] == "Never"
        assert container["image"] in run_sh, f"kind/cluster.sh does not build {container['image']}"
    # The Consul address is the Service of deploy/consul-dev.
    consul = kustomize(DEPLOY / "consul-dev")
    service = one(consul, "Service")
    port = service["spec"]["ports"][0]["port"]
    expected = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{port}"
    assert facts["env"]["CONSUL_HTTP_ADDR"]["value"] == expected
    assert one(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("variant", ["defaults", "demo-values", "classic-sidecar", "everything-else"])
def test_rendered_manifest_is_accepted_by_the_sidecar(helm, registrar_bin, tmp_path, variant):
    docs = render(helm, variant)
    facts = podspec.check_sidecar(deployment_spec(docs), VARIANTS[variant][2])
    config_map = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == facts["config_map"])
    env = dict(POD_ENV)
    for name, entry in facts["env"].items():
        if "value" in entry and "$(" not in entry["value"]:
            env[name] = entry["value"]
    registrations = validate_manifest(registrar_bin, config_map["data"][facts["key"]], tmp_path, env)
    assert registrations, "no service registered"
    for reg in registrations:
        assert reg["Address"] == POD_ENV["POD_IP"], "instances register at the pod IP"
        assert POD_ENV["POD_NAME"] in reg["ID"], "instance IDs are per pod"


@pytest.mark.parametrize(
    "values, expect",
    [
        ({}, ["rollout status deployment/demo-consul-registrar", "/v1/health/service/hello", "HOST_IP"]),
        ({"manifest": {"existingConfigMap": "shop"}}, ["ConfigMap shop"]),
        ({"app": {"drainOnStop": False}}, ["WARNING: app.drainOnStop=false"]),
    ],
)
def test_notes(helm, values, expect):
    notes = helm.notes(values)
    for text in expect:
        assert text in notes, notes


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
