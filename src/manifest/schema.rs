//! The manifest exactly as written in YAML (camelCase keys, unknown keys rejected). Defaults and
//! cross-field rules are applied when this is resolved into [`super::Manifest`].
//!
//! These types are also the manifest's JSON Schema (`consul-registrar schema`, see
//! [`json_schema`]): each field's doc comment is its description in the schema and in the
//! reference page generated from it (docs/manifest.md), and `default` names the default the
//! resolver applies when the default does not depend on the environment (a test checks that the
//! two agree). A new field needs a doc comment here; then `make schema` updates the committed
//! schema, the reference page and the chart's values schema.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde::Deserialize;

use super::values::{
    ConsulModeName, Count, Delay, Flag, HealthMode, InstanceId, KeyPrefix, MetaKey, NodeName, Port,
    PositiveDuration, Readiness, ServiceAddress, ServiceName, Text,
};

/// Where the published schema lives (its `$id`); editors may also use the copy in a checkout.
pub const SCHEMA_ID: &str = "https://raw.githubusercontent.com/consul-registrar/consul-registrar/main/docs/manifest.schema.json";

/// The manifest's JSON Schema, as `consul-registrar schema` prints it: draft-07 (what editors'
/// YAML language servers and Helm read best), derived from the types below.
pub fn json_schema() -> serde_json::Value {
    let mut schema = SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<RawManifest>();
    schema.insert("$id".into(), SCHEMA_ID.into());
    let mut value = schema.to_value();
    unwrap_doc_lines(&mut value);
    value
}

/// Doc comments are wrapped at 100 columns; a description is one paragraph per line.
fn unwrap_doc_lines(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    serde_json::Value::String(text) if key == "description" || key == "title" => {
                        *text = text
                            .split("\n\n")
                            .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
                            .collect::<Vec<_>>()
                            .join("\n\n");
                    }
                    _ => unwrap_doc_lines(v),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unwrap_doc_lines),
        _ => {}
    }
}

/// A consul-registrar manifest: the services to keep registered in Consul while their gRPC health
/// service says SERVING, how to reach Consul, the admin server, and how to drain. Every string,
/// number and boolean may use `${VAR}` (an error if unset or empty) or `${VAR:-default}`; `$$` is a
/// `$`. Durations are written as Consul writes them (`500ms`, `10s`, `1m30s`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(title = "consul-registrar manifest")]
pub struct RawManifest {
    /// How to reach Consul and register through it. Settings left out come from Consul's own
    /// environment variables (`CONSUL_HTTP_ADDR`, `CONSUL_HTTP_TOKEN`, ...), then the defaults.
    #[serde(default)]
    pub consul: RawConsul,
    /// The admin server (`/metrics`, `/healthz`, `/readyz`, `/drain`, `/status`).
    #[serde(default)]
    pub admin: RawAdmin,
    /// What happens on SIGTERM/SIGINT or `/drain`: every instance critical, a delay, then
    /// deregistration.
    #[serde(default)]
    pub drain: RawDrain,
    /// What makes the pod Ready (`/readyz`, the sidecar's readiness probe): `all`, every instance
    /// passing in Consul for the probe's current verdict; `any`, at least one (for a manifest whose
    /// services may legitimately be NOT_SERVING); `registered`, every instance in Consul, whatever
    /// its status. A Kubernetes Service in front of the pods sends traffic only to Ready pods.
    #[schemars(extend("default" = "all"))]
    pub readiness: Option<Readiness>,
    /// The service instances to register (at least one), each probed on its own.
    pub services: Vec<RawService>,
}

/// How to reach Consul.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Consul")]
pub struct RawConsul {
    /// Consul's HTTP address: `host:port`, `http://…` or `https://…` (`unix://` is refused). Agent
    /// mode: the node's client agent (e.g. `http://${HOST_IP}:8500`); catalog mode: the servers.
    /// Without a scheme: https when `CONSUL_HTTP_SSL=true` or a CA is configured; without a port:
    /// 8500 (8501 for https). Default: `$CONSUL_HTTP_ADDR`, else `http://127.0.0.1:8500`.
    pub address: Option<Text>,
    /// The ACL token, sent as `X-Consul-Token` and never logged. Set `token`, `tokenFile` or
    /// `login`, one of them. Default: `$CONSUL_HTTP_TOKEN_FILE`, then `$CONSUL_HTTP_TOKEN`.
    pub token: Option<Text>,
    /// A file holding the ACL token (a mounted Secret). A missing or empty file is an error; the
    /// file is read again after a 403 and every 30 s, so a rotated Secret takes effect without a
    /// restart. Default: `$CONSUL_HTTP_TOKEN_FILE`.
    pub token_file: Option<Text>,
    /// Log in with a Consul auth method instead of holding a token (consul-k8s's way with
    /// `manageSystemACLs`): `POST /v1/acl/login` with the pod's service account token before the
    /// first call, again when Consul no longer knows the token or the bearer token file changes,
    /// and `POST /v1/acl/logout` after the drain. Not with `token` or `tokenFile` (the
    /// `CONSUL_HTTP_TOKEN*` variables are then ignored).
    pub login: Option<RawLogin>,
    /// The datacenter; informational (agent registrations go to the agent's datacenter).
    pub datacenter: Option<Text>,
    /// Consul Enterprise namespace (the `ns` query parameter). Default: `$CONSUL_NAMESPACE`.
    pub namespace: Option<Text>,
    /// Consul Enterprise admin partition. Default: `$CONSUL_PARTITION`.
    pub partition: Option<Text>,
    /// TLS towards Consul, for an `https://` address (TLS settings next to `http://` are an error).
    pub tls: Option<RawTls>,
    /// The backoff for failed Consul calls: capped exponential, with jitter.
    pub retry: Option<RawRetry>,
    /// The anti-entropy watch reads every instance again at least this often (the periodic full
    /// resync). In catalog mode it also paces the elected reaper's sweep for instances that never
    /// had a liveness key.
    #[schemars(extend("default" = "1m"))]
    pub resync_interval: Option<PositiveDuration>,
    /// How many instances (the first in the manifest) keep a blocking query open on Consul; the
    /// others are read again when a watched one goes missing, every `resyncInterval`, and at once
    /// when a TTL refresh finds them gone. Keeps a manifest of 1,000 services under Consul's
    /// per-client connection limit.
    #[schemars(extend("default" = 8))]
    pub blocking_watches: Option<Count>,
    /// `agent`: register through a Consul client agent on the node. `catalog`: register through
    /// the servers' catalog on a virtual node, for clusters without client agents (consul-k8s
    /// 1.0+'s default); needs `address` to be the servers and refuses `check.ttl` and
    /// `check.deregisterCriticalServiceAfter`.
    #[schemars(extend("default" = "agent"))]
    pub mode: Option<ConsulModeName>,
    /// Catalog mode's settings (refused in agent mode).
    pub catalog: Option<RawCatalog>,
}

/// `consul.login`: the auth method to log in with.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Login")]
pub struct RawLogin {
    /// The auth method's name (a consul-k8s install's is `<release>-k8s-auth-method`).
    pub auth_method: Text,
    /// The bearer token sent to the auth method, read at every login: the pod's service account
    /// token (a `kubernetes` method) or any JWT a `jwt` method accepts. Projected tokens rotate:
    /// a changed file means a new login.
    #[schemars(extend("default" = "/var/run/secrets/kubernetes.io/serviceaccount/token"))]
    pub bearer_token_file: Option<Text>,
    /// Meta put on the login token (Consul shows it with the token), e.g. `pod: ${POD_NAME}`.
    #[serde(default)]
    pub meta: BTreeMap<Text, Text>,
    /// Consul Enterprise: the namespace the auth method lives in. Default: `consul.namespace`.
    pub namespace: Option<Text>,
    /// Consul Enterprise: the partition the auth method lives in. Default: `consul.partition`.
    pub partition: Option<Text>,
}

/// `consul.catalog`: settings of catalog mode only.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Catalog")]
pub struct RawCatalog {
    /// The virtual node the instances are registered on. Never a real agent's node (its
    /// anti-entropy would delete them) nor one consul-k8s manages (`<node>-virtual`). Default:
    /// `consul-registrar-${NODE_NAME}` (without `NODE_NAME` an error).
    pub node: Option<NodeName>,
    /// The virtual node's address (the Kubernetes node's IP). Default: `$HOST_IP`.
    pub node_address: Option<ServiceAddress>,
    /// TTL of the sidecar's Consul session (10s to 24h), renewed twice a TTL: a crashed
    /// sidecar's instances are reaped within 2 × this + 1 s.
    #[serde(rename = "sessionTTL")]
    #[schemars(extend("default" = "10s"))]
    pub session_ttl: Option<PositiveDuration>,
    /// The KV prefix of the per-instance liveness keys, `<keyPrefix>/<service>/<node>/<instance id>`.
    #[schemars(extend("default" = "consul-registrar/instances"))]
    pub key_prefix: Option<KeyPrefix>,
    /// Share one session among the sidecars of the virtual node: one of them holds and renews it,
    /// the others prove they are alive to that one over the pod network instead of renewing
    /// sessions of their own. Without it every sidecar renews its own session.
    pub shared_session: Option<RawSharedSession>,
}

/// `consul.catalog.sharedSession`: one session per virtual node.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "SharedSession")]
pub struct RawSharedSession {
    /// `IP:port` where the other sidecars of the virtual node reach this sidecar's admin server
    /// (in Kubernetes `${POD_IP}:9102`). A sidecar that cannot reach the holder keeps a session
    /// of its own.
    pub advertise: Text,
}

/// TLS settings (towards Consul, or towards the app's health service).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Tls")]
pub struct RawTls {
    /// Trust only this CA bundle (PEM). Without it the server is verified against the system's CA
    /// bundle. Towards Consul, default: `$CONSUL_CACERT`.
    pub ca_file: Option<Text>,
    /// A client certificate (PEM), with `keyFile`: both or neither. Towards Consul, default:
    /// `$CONSUL_CLIENT_CERT`.
    pub cert_file: Option<Text>,
    /// The client certificate's private key (PEM). Towards Consul, default: `$CONSUL_CLIENT_KEY`.
    pub key_file: Option<Text>,
    /// The name to verify the server's certificate against. Towards Consul, default:
    /// `$CONSUL_TLS_SERVER_NAME`.
    pub server_name: Option<Text>,
    /// Do not verify the server's certificate (for experiments only). Towards Consul, default:
    /// `true` when `CONSUL_HTTP_SSL_VERIFY=false`, else `false`.
    pub insecure_skip_verify: Option<Flag>,
}

/// The backoff for failed Consul calls.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Retry")]
pub struct RawRetry {
    /// The first wait after a failed call.
    #[schemars(extend("default" = "100ms"))]
    pub initial: Option<PositiveDuration>,
    /// The cap of the exponential backoff; not shorter than `initial`. Default: `1s`, or
    /// `initial` when that is longer.
    pub max: Option<PositiveDuration>,
}

/// The admin server.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Admin")]
pub struct RawAdmin {
    /// The admin server's `IP:port`. In Kubernetes it must be reachable from the pod network: the
    /// kubelet sends a preStop `httpGet` to the pod IP. The `--admin-addr` flag
    /// (`CONSUL_REGISTRAR_ADMIN_ADDR`) wins over it.
    #[schemars(extend("default" = "0.0.0.0:9102"))]
    pub address: Option<Text>,
}

/// The drain.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Drain")]
pub struct RawDrain {
    /// After marking every instance critical, wait this long before deregistering, so that
    /// clients stop picking the instance (a second signal cuts it short). `0s`: no wait.
    #[schemars(extend("default" = "5s"))]
    pub delay: Option<Delay>,
    /// How long deregistration is retried (Consul unreachable) after the delay before the sidecar
    /// gives up and exits 1. Give the pod a grace period above `delay + deregisterTimeout + 1s`.
    #[schemars(extend("default" = "10s"))]
    pub deregister_timeout: Option<PositiveDuration>,
}

/// One service instance to register.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Service")]
pub struct RawService {
    /// The Consul service name: letters, digits, `-` and `_`, starting with a letter or digit, at
    /// most 63 characters (a DNS label for Consul DNS).
    pub name: ServiceName,
    /// The instance ID, unique in the manifest. Default: `<name>.<POD_NAMESPACE>.<POD_NAME>` in a
    /// pod (the namespace part left out if unset), else `<name>.<hostname>.<port>`: stable across
    /// sidecar restarts in the same pod (a restarted sidecar adopts its instance), unique across
    /// pods.
    pub id: Option<InstanceId>,
    /// The address clients reach the instance at; never `0.0.0.0`. Default: `$POD_IP`, else none
    /// (Consul uses the node's address).
    pub address: Option<ServiceAddress>,
    /// The port clients reach the instance at (1 to 65535).
    pub port: Port,
    /// Consul tags.
    #[serde(default)]
    pub tags: Vec<Text>,
    /// Consul meta (at most 64 pairs, values at most 512 bytes). The sidecar adds `managed-by:
    /// consul-registrar` and, when known, `pod-name`, `pod-namespace`, `pod-uid` and `node-name`:
    /// these keys are reserved.
    #[serde(default)]
    #[schemars(extend("propertyNames" = { "not": { "pattern": "^[cC][oO][nN][sS][uU][lL]-" } }))]
    pub meta: BTreeMap<MetaKey, Text>,
    /// Consul's DNS SRV weights.
    pub weights: Option<RawWeights>,
    /// Consul tagged addresses, by name (e.g. `lan`, `wan`).
    #[serde(default)]
    pub tagged_addresses: BTreeMap<Text, RawTaggedAddress>,
    /// Let external agents change the instance's tags (Consul's `EnableTagOverride`).
    #[schemars(extend("default" = false))]
    pub enable_tag_override: Option<Flag>,
    /// The gRPC health service (`grpc.health.v1.Health`) to probe.
    #[serde(default)]
    pub health: RawHealth,
    /// The check the sidecar keeps on the instance.
    #[serde(default)]
    pub check: RawCheck,
}

/// Consul's DNS SRV weights.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Weights")]
pub struct RawWeights {
    /// Weight while the instance is passing.
    pub passing: Count,
    /// Weight while the instance is warning.
    #[schemars(extend("default" = 1))]
    pub warning: Option<Count>,
}

/// A tagged address.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "TaggedAddress")]
pub struct RawTaggedAddress {
    /// The address.
    pub address: ServiceAddress,
    /// The port (1 to 65535).
    pub port: Port,
}

/// How to probe the app's gRPC health service.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Health")]
pub struct RawHealth {
    /// The health endpoint's address. Default: the service's address, else `127.0.0.1`.
    pub address: Option<ServiceAddress>,
    /// The health endpoint's port. Default: the service's port.
    pub port: Option<Port>,
    /// The health service name asked about; `""` asks about the whole server.
    #[schemars(extend("default" = ""))]
    pub service: Option<Text>,
    /// TLS towards the app (plain text when left out). Without `caFile` the system's CA bundle
    /// verifies the app.
    pub tls: Option<RawTls>,
    /// `auto`: Watch, falling back to Check polling if the app answers UNIMPLEMENTED; `watch`;
    /// `poll`.
    #[schemars(extend("default" = "auto"))]
    pub mode: Option<HealthMode>,
    /// How often Check is called (in watch mode: the liveness sample beside the stream).
    #[schemars(extend("default" = "1s"))]
    pub interval: Option<PositiveDuration>,
    /// The deadline of one Check.
    #[schemars(extend("default" = "1s"))]
    pub timeout: Option<PositiveDuration>,
    /// Consecutive SERVING answers before the instance passes.
    #[schemars(extend("default" = 1))]
    pub success_threshold: Option<Count>,
    /// Consecutive errors or timeouts before the instance fails (an explicit NOT_SERVING or
    /// SERVICE_UNKNOWN fails at once). After this many timeouts in a row the probe also connects
    /// anew, so a half-open connection is not reused.
    #[schemars(extend("default" = 3))]
    pub failure_threshold: Option<Count>,
    /// Nothing is probed (or counted) before this.
    #[schemars(extend("default" = "0s"))]
    pub initial_delay: Option<Delay>,
}

/// The check the sidecar keeps on the instance.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[schemars(rename = "Check")]
pub struct RawCheck {
    /// Agent mode only: the TTL check's TTL, refreshed every third of it; must exceed
    /// `health.interval + health.timeout`.
    #[schemars(extend("default" = "10s"))]
    pub ttl: Option<PositiveDuration>,
    /// Agent mode only: Consul removes an instance critical for this long (at least `1m`,
    /// Consul's minimum): the safety net for a sidecar that dies without draining.
    #[schemars(extend("default" = "1m"))]
    pub deregister_critical_service_after: Option<PositiveDuration>,
    /// The check's notes.
    pub notes: Option<Text>,
}
