"""The Helm values the guides print, rendered as a user copies them: docs/agentless-with-consul-k8s.md's
catalog-mode values and its TLS recipe for consul-k8s's CA (the Secret copied into the app's
namespace under consul-k8s's key `tls.crt`, and `serverName`). The blocks are read from the page,
so the page cannot drift from what the chart renders. Run through `bash scripts/check-k8s.sh`."""

import re
import subprocess

import yaml

import podspec
from conftest import POD_ENV, REPO, k8s_versions, manifest_of, one, registered_instance, validate_manifest
from k8s_schemas import assert_valid

PAGE = REPO / "docs" / "agentless-with-consul-k8s.md"
# What the guide leaves to the user's own values: the app.
APP = {
    "app": {"image": {"repository": "registry.example.com/shop", "tag": "2.4.1"},
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
    "manifest": {"services": [{"name": "shop", "port": 8443}]},
    "drainToken": {"value": "docs-recipe-token-0123456789"},
}


def section_blocks(heading: str, language: str) -> list[str]:
    """The `language` code blocks of the section `## heading` of the page."""
    text = PAGE.read_text()
    section = next((s for s in text.split("\n## ") if s.startswith(heading)), None)
    assert section is not None, f"{PAGE.name} has no section '## {heading}'"
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


def rendered_sidecar(helm, values: dict):
    docs = helm.template(APP, values)
    assert_valid(docs, k8s_versions())
    spec = podspec.pod_spec(one(docs, "Deployment"))
    facts = podspec.check_sidecar(spec, native=True)
    env = {k: v.get("value") for k, v in facts["env"].items()}
    return docs, spec, facts, env


def test_the_catalog_mode_values_render_catalog_mode_against_the_servers(helm):
    [values] = [yaml.safe_load(b) for b in section_blocks("Values", "yaml")]
    docs, _, facts, env = rendered_sidecar(helm, values)
    manifest = manifest_of(docs, facts["config_map"], facts["key"])
    assert manifest["consul"]["mode"] == "catalog"
    assert env["CONSUL_HTTP_ADDR"] == "http://consul-server.consul.svc:8500"
    assert env["CONSUL_HTTP_TOKEN_FILE"].endswith("/token")


def test_the_consul_k8s_tls_recipe_mounts_its_ca_under_tls_crt_and_verifies_server_dc1_consul(helm, registrar_bin, tmp_path):
    commands, = section_blocks("TLS with consul-k8s's CA", "sh")
    # The copy keeps consul-k8s's key: the Secret in the app's namespace holds tls.crt.
    assert "--from-file=tls.crt=" in commands and "consul-ca-cert" in commands, commands
    [values] = [yaml.safe_load(b) for b in section_blocks("TLS with consul-k8s's CA", "yaml")]
    docs, spec, facts, env = rendered_sidecar(helm, values)
    assert env["CONSUL_HTTP_ADDR"] == "https://consul-server.consul.svc:8501"
    assert env["CONSUL_TLS_SERVER_NAME"] == "server.dc1.consul"
    # The CA file the sidecar reads is key tls.crt of the Secret consul-ca-cert, mounted read-only.
    mount = next(m for m in facts["sidecar"]["volumeMounts"] if env["CONSUL_CACERT"].startswith(m["mountPath"] + "/"))
    assert mount["readOnly"] is True and env["CONSUL_CACERT"].endswith("/tls.crt")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])["secret"]
    assert volume["secretName"] == "consul-ca-cert" and {"key": "tls.crt", "path": "tls.crt"} in volume["items"]
    manifest_text = next(d for d in docs if d["kind"] == "ConfigMap")["data"][facts["key"]]
    manifest = yaml.safe_load(manifest_text)
    assert manifest["consul"]["tls"]["caFile"] == env["CONSUL_CACERT"]
    assert manifest["consul"]["tls"]["serverName"] == "server.dc1.consul"
    # And the sidecar accepts the manifest the recipe renders, with the environment the pod gives
    # it; `validate` loads the CA bundle, which exists only in the pod: a CA of our own stands in.
    ca = tmp_path / "ca.crt"
    ca.write_text(self_signed_ca())
    manifest["consul"]["tls"]["caFile"] = str(ca)
    pod_env = {**POD_ENV, **{k: v for k, v in env.items() if v is not None and "$(" not in v}, "CONSUL_CACERT": str(ca)}
    [registration] = validate_manifest(registrar_bin, yaml.safe_dump(manifest), tmp_path, pod_env)
    assert registered_instance(registration)["Service"] == "shop"


def self_signed_ca() -> str:
    """A throwaway self-signed CA certificate (PEM), made with openssl."""
    result = subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                             "-nodes", "-keyout", "/dev/null", "-subj", "/CN=docs-recipe-ca", "-days", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, f"openssl (needed to stand in for consul-k8s's CA) failed: {result.stderr}"
    return result.stdout
