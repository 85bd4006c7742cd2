"""What must hold in every pod that carries the consul-registrar sidecar, however it was rendered
(the Helm chart or the kustomize manifests of deploy/). test_chart.py and test_deploy.py both call
these checks, so the two ways of installing cannot drift apart on what matters:

- the sidecar gets the Downward API variables the manifest reads, and its args name the manifest
  and the admin address;
- the app's preStop hook GETs the sidecar's /drain?wait=true on the admin port (the kubelet sends
  it to the pod IP) with the drain token the sidecar reads from a Secret, so the instance leaves
  Consul before the app gets SIGTERM;
- the grace period leaves room for the drain delay, the deregistration and the app's shutdown;
- every container runs non-root, read-only, without capabilities, with resource requests.
"""

import base64
import posixpath
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SIDECAR = "consul-registrar"
ADMIN_PORT_NAME = "registrar-admin"
DOWNWARD_API = {
    "POD_IP": "status.podIP",
    "POD_NAME": "metadata.name",
    "POD_NAMESPACE": "metadata.namespace",
    "POD_UID": "metadata.uid",
    "HOST_IP": "status.hostIP",
    "NODE_NAME": "spec.nodeName",
}
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go-style duration, as the sidecar reads them (`500ms`, `1m30s`, `0`)."""
    text = str(text).strip()
    if text == "0":
        return 0.0
    parts = re.findall(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|μs|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * _UNITS[u] for n, u in parts)


def image_user() -> tuple[int, int]:
    """The numeric USER of the Dockerfile's final stages (all of them must agree)."""
    users = set(re.findall(r"^USER\s+(\d+):(\d+)\s*$", (REPO / "Dockerfile").read_text(), re.M))
    assert len(users) == 1, f"the Dockerfile's stages should share one numeric USER uid:gid, found {users}"
    uid, gid = users.pop()
    return int(uid), int(gid)


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def sidecar_of(spec: dict, native: bool) -> dict:
    """The sidecar container, checking that it sits where `native` says: an init container with
    restartPolicy Always (a native sidecar), or a regular container next to the app."""
    inits = {c["name"]: c for c in spec.get("initContainers", [])}
    regular = {c["name"]: c for c in spec["containers"]}
    if native:
        assert SIDECAR in inits, f"native sidecar expected in initContainers, got {list(inits)}"
        assert SIDECAR not in regular, "the sidecar must not also be a regular container"
        sidecar = inits[SIDECAR]
        assert sidecar.get("restartPolicy") == "Always", "a native sidecar needs restartPolicy: Always"
    else:
        assert SIDECAR in regular, f"sidecar expected in containers, got {list(regular)}"
        assert SIDECAR not in inits, "the sidecar must not also be an init container"
        sidecar = regular[SIDECAR]
        assert "restartPolicy" not in sidecar, "restartPolicy on a regular container is invalid"
    return sidecar


def app_containers(spec: dict) -> list[dict]:
    apps = [c for c in spec["containers"] if c["name"] != SIDECAR]
    assert apps, "no app container"
    return apps


def env_of(container: dict) -> dict:
    names = [e["name"] for e in container.get("env", [])]
    duplicates = {n for n in names if names.count(n) > 1}
    assert not duplicates, f"{container['name']}: duplicate env vars {duplicates}"
    return {e["name"]: e for e in container.get("env", [])}


def flag(args: list, name: str) -> str:
    assert args.count(name) == 1, f"expected one {name} in args {args}"
    i = args.index(name)
    assert i + 1 < len(args), f"{name} has no value in {args}"
    return str(args[i + 1])


def admin_port(sidecar: dict) -> int:
    ports = {p.get("name"): p for p in sidecar.get("ports", [])}
    assert ADMIN_PORT_NAME in ports, f"sidecar needs a port named {ADMIN_PORT_NAME}, has {list(ports)}"
    return int(ports[ADMIN_PORT_NAME]["containerPort"])


def check_sidecar(spec: dict, native: bool) -> dict:
    """Env, args, mounts and probes of the sidecar. Returns facts the caller compares with the
    rest of the render: the admin port, the manifest's ConfigMap and key."""
    sidecar = sidecar_of(spec, native)
    env = env_of(sidecar)
    names = list(env)
    for var, field in DOWNWARD_API.items():
        assert var in env, f"sidecar env lacks the Downward API variable {var}"
        assert env[var].get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == field, (
            f"{var} must come from the Downward API field {field}, got {env[var]}"
        )
    # Kubernetes expands $(VAR) only from variables defined earlier in the list.
    for var, entry in env.items():
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(entry.get("value", ""))):
            assert ref in names[: names.index(var)], f"{var} uses $({ref}), which must be defined before it"
    assert "CONSUL_HTTP_ADDR" in env, "sidecar env lacks CONSUL_HTTP_ADDR"

    args = [str(a) for a in sidecar.get("args", [])]
    assert args and args[0] == "run", f"sidecar args must start with the run subcommand: {args}"
    assert "command" not in sidecar, "the sidecar must use the image's ENTRYPOINT"
    port = admin_port(sidecar)
    admin_addr = flag(args, "--admin-addr")
    host, _, addr_port = admin_addr.rpartition(":")
    assert int(addr_port) == port, f"--admin-addr {admin_addr} does not match the admin containerPort {port}"
    assert host.strip("[]") not in ("127.0.0.1", "localhost", "::1"), (
        f"--admin-addr {admin_addr} is loopback: the kubelet's preStop GET goes to the pod IP"
    )
    assert flag(args, "--log-format") in ("json", "human")
    manifest_path = flag(args, "--manifest")

    mounts = {m["mountPath"]: m for m in sidecar.get("volumeMounts", [])}
    mount = mounts.get(posixpath.dirname(manifest_path))
    assert mount, f"--manifest {manifest_path} is not inside a volume mount of the sidecar ({list(mounts)})"
    assert mount.get("readOnly") is True, "the manifest mount should be read-only"
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    config_map = volumes[mount["name"]].get("configMap")
    assert config_map, f"the manifest volume {mount['name']} should be a ConfigMap"
    key = posixpath.basename(manifest_path)
    for item in config_map.get("items", []):
        if item["path"] == key:
            key = item["key"]
            break
    else:
        assert not config_map.get("items"), f"no ConfigMap item is mounted as {key}"

    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = sidecar.get(probe, {}).get("httpGet")
        assert get, f"sidecar needs an httpGet {probe}"
        assert get["path"] == path, f"sidecar {probe} should GET {path}, not {get['path']}"
        assert get["port"] in (ADMIN_PORT_NAME, port), f"sidecar {probe} must target the admin port"
    return {"admin_port": port, "config_map": config_map["name"], "key": key, "sidecar": sidecar, "env": env}


DRAIN_TOKEN_ENV = "CONSUL_REGISTRAR_DRAIN_TOKEN"
DRAIN_TOKEN_HEADER = "X-Drain-Token"


def check_prestop(spec: dict, port: int, apps: list[dict] | None = None) -> list[str]:
    """Every app container (or those given) drains through the sidecar before it gets SIGTERM,
    sending the drain token. Returns the header values."""
    tokens = []
    for app in apps if apps is not None else app_containers(spec):
        get = app.get("lifecycle", {}).get("preStop", {}).get("httpGet")
        assert get, f"app container {app['name']} needs a preStop httpGet to the sidecar's drain endpoint"
        assert get["path"] == "/drain?wait=true", f"preStop path is {get['path']!r}"
        # A named port would be looked up among the app container's own ports: use the number.
        assert get["port"] == port, f"preStop port {get['port']!r} is not the sidecar's admin port {port}"
        assert "host" not in get, "the preStop GET must go to the pod IP (no host)"
        assert get.get("scheme", "HTTP") == "HTTP"
        headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
        assert DRAIN_TOKEN_HEADER in headers, f"{app['name']}: the preStop GET must send {DRAIN_TOKEN_HEADER}"
        tokens.append(headers[DRAIN_TOKEN_HEADER])
    return tokens


def drain_token_secret(sidecar: dict) -> tuple[str, str]:
    """(Secret name, key) the sidecar reads its drain token from."""
    env = env_of(sidecar)
    assert DRAIN_TOKEN_ENV in env, f"the sidecar needs {DRAIN_TOKEN_ENV}"
    ref = env[DRAIN_TOKEN_ENV].get("valueFrom", {}).get("secretKeyRef")
    assert ref, f"{DRAIN_TOKEN_ENV} must come from a Secret (secretKeyRef), not a literal"
    return ref["name"], ref["key"]


def secret_value(docs: list[dict], name: str, key: str) -> str:
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert name in secrets, f"Secret {name} is not rendered ({list(secrets)})"
    secret = secrets[name]
    if key in secret.get("stringData", {}):
        return secret["stringData"][key]
    return base64.b64decode(secret["data"][key]).decode()


def check_drain_token(docs: list[dict], spec: dict, sidecar: dict, port: int) -> str:
    """The preStop header and the sidecar's Secret carry the same token."""
    headers = check_prestop(spec, port)
    name, key = drain_token_secret(sidecar)
    token = secret_value(docs, name, key)
    assert len(token) >= 16, "the drain token is too short"
    assert set(headers) == {token}, "the preStop header must carry the token of the sidecar's Secret"
    return token


def check_grace(spec: dict, drain: dict, app_shutdown: float = 0) -> None:
    """The grace period covers the drain delay, the deregistration and the app's shutdown."""
    grace = spec.get("terminationGracePeriodSeconds", 30)
    needed = parse_duration(drain["delay"]) + parse_duration(drain.get("deregisterTimeout", "10s")) + app_shutdown
    assert grace >= needed, (
        f"terminationGracePeriodSeconds {grace} does not cover the drain {drain} plus {app_shutdown}s of app shutdown"
    )


def check_security(spec: dict) -> None:
    uid, gid = image_user()
    pod = spec.get("securityContext", {})
    assert pod.get("runAsNonRoot") is True, "pod securityContext.runAsNonRoot must be true"
    assert pod.get("runAsUser") == uid and pod.get("runAsGroup") == gid, (
        f"pod should run as the images' USER {uid}:{gid}, got {pod.get('runAsUser')}:{pod.get('runAsGroup')}"
    )
    assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", "pod seccompProfile must be RuntimeDefault"
    assert spec.get("automountServiceAccountToken") is False, "no Kubernetes API token is needed"
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c.get("securityContext", {})
        name = c["name"]
        assert sc.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation must be false"
        assert sc.get("readOnlyRootFilesystem") is True, f"{name}: readOnlyRootFilesystem must be true"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities.drop must be [ALL]"
        assert not sc.get("capabilities", {}).get("add"), f"{name}: no capabilities may be added"
        assert sc.get("privileged") in (None, False), f"{name}: must not be privileged"
        assert sc.get("runAsNonRoot", True) is True, f"{name}: runAsNonRoot must not be turned off"
        requests = c.get("resources", {}).get("requests", {})
        assert "cpu" in requests and "memory" in requests, f"{name}: set cpu and memory requests"


AGENT_ONLY_CHECK_FIELDS = ("ttl", "deregisterCriticalServiceAfter")


def check_catalog_mode(manifest: dict, env: dict) -> None:
    """A catalog-mode manifest (consul.mode: catalog) in a pod that can run it: the sidecar talks
    to the servers (not the node's agent, $(HOST_IP)), its virtual node and the node's address
    default to the Downward API's NODE_NAME and HOST_IP unless the manifest names them, and no
    service carries the agent-only check fields the sidecar refuses in catalog mode."""
    consul = manifest.get("consul", {})
    assert consul.get("mode") == "catalog", f"not a catalog-mode manifest: consul {consul}"
    address = env["CONSUL_HTTP_ADDR"].get("value", "")
    assert address and "$(HOST_IP)" not in address, (
        f"catalog mode talks to the Consul servers, not the node's agent: CONSUL_HTTP_ADDR={address!r}")
    catalog = consul.get("catalog", {})
    for field, var in (("node", "NODE_NAME"), ("nodeAddress", "HOST_IP")):
        if not catalog.get(field):
            assert env.get(var, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == DOWNWARD_API[var], (
                f"consul.catalog.{field} defaults to ${var}, which the sidecar must get from the Downward API")
    shared = catalog.get("sharedSession")
    if shared:
        # The node's other sidecars reach this one's admin server at the pod IP.
        assert shared["advertise"].startswith("${POD_IP}:"), shared
        assert env.get("POD_IP", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "status.podIP", (
            "sharedSession.advertise names ${POD_IP}, which the sidecar must get from the Downward API")
    for i, service in enumerate(manifest.get("services", [])):
        for field in AGENT_ONLY_CHECK_FIELDS:
            assert field not in (service.get("check") or {}), f"services[{i}].check.{field} is agent-only"
