//! The YAML service manifest: what to register, how to probe it, how to reach Consul, how to drain.
//!
//! [`load`] reads a file, [`parse`] a string. Both interpolate `${VAR}` from an [`Environment`],
//! reject unknown fields, apply defaults and the cross-field rules, and either return a complete
//! [`Manifest`] or every problem found, each with `file:line:column: field: problem`. Nothing else in
//! the crate sees YAML: later stages work on the resolved types defined here.

pub mod duration;
pub mod interpolate;
pub mod locate;
pub mod schema;
pub mod values;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use interpolate::Environment;
pub use values::{HealthMode, Readiness};

use locate::Segment::{self, Index, Key};
use schema::{RawManifest, RawService, RawTls};
use values::Text;

/// Meta key that marks an instance as ours; we never touch instances without it.
pub const MANAGED_BY_KEY: &str = "managed-by";
/// Value of [`MANAGED_BY_KEY`].
pub const MANAGED_BY_VALUE: &str = "consul-registrar";
/// Meta key of the pod's UID (the Downward API's `metadata.uid`, in `POD_UID`): the same across
/// restarts of the sidecar's container, another for every pod, even one of the same name.
pub const POD_UID_KEY: &str = "pod-uid";
/// Meta keys the sidecar sets itself; the manifest may not set them.
pub const RESERVED_META_KEYS: [&str; 5] = [
    MANAGED_BY_KEY,
    "pod-name",
    "pod-namespace",
    POD_UID_KEY,
    "node-name",
];
/// Consul's limit on meta pairs per instance.
pub const MAX_META_KEYS: usize = 64;
/// Consul's limit on the length of a meta value, in bytes.
pub const MAX_META_VALUE_LEN: usize = 512;
/// Consul raises any smaller `DeregisterCriticalServiceAfter` to this.
pub const MIN_DEREGISTER_AFTER: Duration = Duration::from_secs(60);
/// The admin server's address when neither flag, environment nor manifest sets one.
pub const DEFAULT_ADMIN_ADDRESS: &str = "0.0.0.0:9102";
/// The Consul agent address when neither manifest nor CONSUL_HTTP_ADDR sets one.
pub const DEFAULT_CONSUL_ADDRESS: &str = "http://127.0.0.1:8500";

/// A resolved manifest: every default applied, every rule checked.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub consul: ConsulConnection,
    pub admin_address: SocketAddr,
    pub drain: DrainPolicy,
    /// What `/readyz` requires of the instances in Consul (default: all passing).
    pub readiness: Readiness,
    pub services: Vec<ServiceSpec>,
}

/// How to reach the Consul agent (manifest, then the official CONSUL_* variables, then defaults).
#[derive(Clone)]
pub struct ConsulConnection {
    /// Base URL, `http://host:port` or `https://host:port`, without a trailing slash.
    pub address: String,
    pub token: Option<Secret>,
    /// The file `token` was read from (consul.tokenFile or CONSUL_HTTP_TOKEN_FILE): the client
    /// reads it again when it changes (Kubernetes updates a mounted Secret in place).
    pub token_file: Option<PathBuf>,
    /// Log in with an auth method instead (`token` and `token_file` are then None).
    pub login: Option<LoginSettings>,
    pub datacenter: Option<String>,
    pub namespace: Option<String>,
    pub partition: Option<String>,
    pub tls: TlsSettings,
    pub retry: RetryPolicy,
    pub resync_interval: Duration,
    /// How many instances keep a blocking query open on the agent (the rest are read on alarm
    /// and every resync interval).
    pub blocking_watches: usize,
    /// Which API registers the instances: the node's agent, or the servers' catalog.
    pub mode: ConsulMode,
}

/// The bearer token file when `consul.login.bearerTokenFile` is left out: the service account
/// token Kubernetes mounts into every pod (a projected, rotating token).
pub const DEFAULT_BEARER_TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// `consul.login`, resolved: how to get a token from an auth method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginSettings {
    pub auth_method: String,
    pub bearer_token_file: PathBuf,
    pub meta: std::collections::BTreeMap<String, String>,
    /// The auth method's namespace and partition (Enterprise), when not the connection's.
    pub namespace: Option<String>,
    pub partition: Option<String>,
}

/// `consul.mode`: how the sidecar registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsulMode {
    /// The node's client agent: agent API, a TTL check, the agent's reaper as the crash net.
    Agent,
    /// No client agent: the servers' catalog, a virtual node, sessions as the crash net.
    Catalog(CatalogSettings),
}

/// Catalog mode's settings (`consul.catalog`), resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogSettings {
    /// The virtual node the instances are registered on (`consul-registrar-<NODE_NAME>`).
    pub node: String,
    /// The node's address (the Kubernetes node's IP, HOST_IP).
    pub node_address: String,
    /// The session's TTL; Consul invalidates it between 1× and 2× this after the last renewal.
    pub session_ttl: Duration,
    /// Liveness keys live under `<key_prefix>/<service>/<node>/<instance id>`.
    pub key_prefix: String,
    /// Where the other sidecars of the virtual node reach this one's admin server, when the
    /// virtual node's sidecars share one session (`sharedSession.advertise`).
    pub shared_session: Option<String>,
}

/// `IP:port`, with an IPv6 address in brackets or not (`${POD_IP}:9102` in an IPv6 pod is
/// `fd00::5:9102`).
fn advertise_address(text: &str) -> Option<std::net::SocketAddr> {
    if let Ok(address) = text.parse() {
        return Some(address);
    }
    let (ip, port) = text.rsplit_once(':')?;
    Some(std::net::SocketAddr::new(
        ip.parse().ok()?,
        port.parse().ok()?,
    ))
}

/// The prefix of the default virtual node name: `consul-registrar-<NODE_NAME>`. No Consul agent
/// and no consul-k8s controller names a node so (consul-k8s uses `<node>-virtual`).
pub const VIRTUAL_NODE_PREFIX: &str = "consul-registrar-";
/// The default prefix of the liveness keys.
pub const DEFAULT_KEY_PREFIX: &str = "consul-registrar/instances";
/// Consul's bounds on a session TTL.
pub const SESSION_TTL_MIN: Duration = Duration::from_secs(10);
pub const SESSION_TTL_MAX: Duration = Duration::from_secs(86_400);

impl fmt::Debug for ConsulConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsulConnection")
            .field("address", &self.address)
            .field("token", &self.token)
            .field("login", &self.login)
            .field("datacenter", &self.datacenter)
            .field("namespace", &self.namespace)
            .field("partition", &self.partition)
            .field("tls", &self.tls)
            .field("retry", &self.retry)
            .field("resync_interval", &self.resync_interval)
            .field("blocking_watches", &self.blocking_watches)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// A secret (the ACL token) that never shows in `Debug`, `Display` or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself, for the one place that sends it (the `X-Consul-Token` header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// TLS towards Consul or towards the app.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub server_name: Option<String>,
    pub insecure_skip_verify: bool,
}

/// Capped exponential backoff with jitter for Consul calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        }
    }
}

/// What happens on SIGTERM/SIGINT or `/drain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainPolicy {
    /// Time between marking every instance critical and deregistering them.
    pub delay: Duration,
    /// How long deregistration is retried when Consul is unreachable during shutdown.
    pub deregister_timeout: Duration,
}

impl Default for DrainPolicy {
    fn default() -> Self {
        DrainPolicy {
            delay: Duration::from_secs(5),
            deregister_timeout: Duration::from_secs(10),
        }
    }
}

/// One service instance to keep registered.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    pub id: String,
    pub name: String,
    /// `None`: Consul uses the agent's node address.
    pub address: Option<String>,
    pub port: u16,
    pub tags: Vec<String>,
    /// The manifest's meta plus the sidecar's own keys (managed-by, pod identity).
    pub meta: BTreeMap<String, String>,
    pub weights: Option<Weights>,
    pub tagged_addresses: BTreeMap<String, TaggedAddress>,
    pub enable_tag_override: bool,
    pub health: HealthSpec,
    pub check: CheckSpec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Weights {
    pub passing: u32,
    pub warning: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaggedAddress {
    pub address: String,
    pub port: u16,
}

/// How to probe the app's `grpc.health.v1.Health` service.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSpec {
    pub address: String,
    pub port: u16,
    /// The health service name asked about; `""` is the whole server.
    pub service: String,
    pub tls: Option<TlsSettings>,
    pub mode: HealthMode,
    pub interval: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
    pub initial_delay: Duration,
}

/// The TTL check the sidecar owns on each instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    pub id: String,
    pub name: String,
    pub ttl: Duration,
    pub deregister_critical_service_after: Duration,
    pub notes: Option<String>,
}

/// Who we are, from the Downward API (or the host), for default IDs and meta.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodIdentity {
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_uid: Option<String>,
    pub node_name: Option<String>,
    pub hostname: Option<String>,
}

impl PodIdentity {
    pub fn from_environment(env: &Environment) -> Self {
        let hostname = env.non_empty("HOSTNAME").or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        });
        PodIdentity {
            pod_name: env.non_empty("POD_NAME"),
            pod_namespace: env.non_empty("POD_NAMESPACE"),
            pod_uid: env.non_empty("POD_UID"),
            node_name: env.non_empty("NODE_NAME"),
            hostname,
        }
    }

    /// The default instance ID: `<name>.<POD_NAMESPACE>.<POD_NAME>` in a pod (the namespace part is
    /// left out when unset), `<name>.<hostname>.<port>` elsewhere. Service names have no dots and
    /// namespaces have none either, so IDs of different pods can't collide; a restarted sidecar in
    /// the same pod derives the same ID and takes its instance over.
    pub fn default_instance_id(&self, name: &str, port: u16) -> String {
        match (&self.pod_namespace, &self.pod_name) {
            (Some(ns), Some(pod)) => format!("{name}.{ns}.{pod}"),
            (None, Some(pod)) => format!("{name}.{pod}"),
            _ => format!(
                "{name}.{}.{port}",
                self.hostname.as_deref().unwrap_or("localhost")
            ),
        }
    }

    fn meta(&self) -> impl Iterator<Item = (&'static str, &String)> {
        [
            ("pod-name", &self.pod_name),
            ("pod-namespace", &self.pod_namespace),
            (POD_UID_KEY, &self.pod_uid),
            ("node-name", &self.node_name),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    }
}

/// One problem in a manifest, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: String,
    /// 1-based line and column, when the problem has a place in the text.
    pub position: Option<(usize, usize)>,
    /// The field path, e.g. `services[0].health.timeout`; empty for the document as a whole.
    pub field: String,
    pub problem: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// Every problem found in a manifest (at least one).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestErrors {
    /// The file could not be read.
    #[error("{file}: cannot read the manifest: {problem}")]
    Unreadable { file: String, problem: String },
    /// The manifest was read but is not valid.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<ManifestError>),
}

impl ManifestErrors {
    /// The individual problems (empty for an unreadable file).
    pub fn problems(&self) -> &[ManifestError] {
        match self {
            ManifestErrors::Unreadable { .. } => &[],
            ManifestErrors::Invalid(v) => v,
        }
    }
}

/// Reads, interpolates, checks and resolves the manifest at `path`.
pub fn load(path: &Path, env: &Environment) -> Result<Manifest, ManifestErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ManifestErrors::Unreadable {
        file: file.clone(),
        problem: e.to_string(),
    })?;
    parse(&text, &file, env)
}

/// Like [`load`], for manifest text; `file` names it in errors.
pub fn parse(text: &str, file: &str, env: &Environment) -> Result<Manifest, ManifestErrors> {
    let raw: RawManifest = interpolate::with_environment(env, || serde_yaml::from_str(text))
        .map_err(|e| ManifestErrors::Invalid(vec![from_yaml_error(&e, file)]))?;
    let mut resolver = Resolver {
        text,
        file,
        env,
        errors: Vec::new(),
    };
    let manifest = resolver.resolve(raw);
    match manifest {
        Some(m) if resolver.errors.is_empty() => Ok(m),
        _ => Err(ManifestErrors::Invalid(resolver.errors)),
    }
}

/// Turns serde_yaml's `path: message at line L column C` into our error shape.
fn from_yaml_error(e: &serde_yaml::Error, file: &str) -> ManifestError {
    let position = e.location().map(|l| (l.line(), l.column()));
    let mut message = e.to_string();
    if let Some(at) = message.rfind(" at line ") {
        message.truncate(at);
    }
    let (field, problem) = match message.split_once(": ") {
        Some((path, rest)) if looks_like_path(path) => (path.to_string(), rest.to_string()),
        _ => (String::new(), message),
    };
    ManifestError {
        file: file.to_string(),
        position,
        field,
        problem,
    }
}

fn looks_like_path(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '[' | ']' | '_' | '-'))
}

struct Resolver<'a> {
    text: &'a str,
    file: &'a str,
    env: &'a Environment,
    errors: Vec<ManifestError>,
}

impl Resolver<'_> {
    fn error(&mut self, path: &[Segment], problem: impl Into<String>) {
        self.errors.push(ManifestError {
            file: self.file.to_string(),
            position: locate::position(self.text, path),
            field: render_path(path),
            problem: problem.into(),
        });
    }

    /// An error about settings that came from the environment, not from the text.
    fn env_error(&mut self, variable: &str, problem: impl Into<String>) {
        self.errors.push(ManifestError {
            file: self.file.to_string(),
            position: None,
            field: format!("${variable}"),
            problem: problem.into(),
        });
    }

    fn resolve(&mut self, raw: RawManifest) -> Option<Manifest> {
        let consul = self.consul(&raw);
        let admin_address = self.admin(&raw);
        let drain = DrainPolicy {
            delay: raw
                .drain
                .delay
                .map_or(DrainPolicy::default().delay, |d| d.0),
            deregister_timeout: raw
                .drain
                .deregister_timeout
                .map_or(DrainPolicy::default().deregister_timeout, |d| d.0),
        };
        if raw.services.is_empty() {
            self.error(&[Key("services")], "at least one service is required");
        }
        if raw.consul.mode == Some(values::ConsulModeName::Catalog) {
            // These configure the agent's TTL check and its reaper; the catalog has neither.
            for (i, s) in raw.services.iter().enumerate() {
                for (set, field) in [
                    (s.check.ttl.is_some(), "ttl"),
                    (
                        s.check.deregister_critical_service_after.is_some(),
                        "deregisterCriticalServiceAfter",
                    ),
                ] {
                    if set {
                        self.error(
                            &[Key("services"), Index(i), Key("check"), Key(field)],
                            format!("check.{field} belongs to agent mode (the agent's TTL check); consul.mode is catalog, where the check has no TTL and a crashed sidecar's instance is reaped through its session: remove it"),
                        );
                    }
                }
            }
        }
        let identity = PodIdentity::from_environment(self.env);
        let services: Vec<ServiceSpec> = raw
            .services
            .into_iter()
            .enumerate()
            .map(|(i, s)| self.service(i, s, &identity))
            .collect();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, s) in services.iter().enumerate() {
            if let Some(first) = seen.insert(&s.id, i) {
                let problem = format!(
                    "duplicate instance id {:?} (also used by services[{first}]); give one of them an explicit id",
                    s.id
                );
                self.error(&[Key("services"), Index(i), Key("id")], problem);
            }
        }
        Some(Manifest {
            consul: consul?,
            admin_address: admin_address?,
            drain,
            readiness: raw.readiness.unwrap_or_default(),
            services,
        })
    }

    fn admin(&mut self, raw: &RawManifest) -> Option<SocketAddr> {
        let text = raw
            .admin
            .address
            .as_ref()
            .map_or(DEFAULT_ADMIN_ADDRESS, |t| t.0.as_str());
        match text.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    &[Key("admin"), Key("address")],
                    format!("{text:?} is not an IP:port socket address (e.g. 0.0.0.0:9102)"),
                );
                None
            }
        }
    }

    fn consul(&mut self, raw: &RawManifest) -> Option<ConsulConnection> {
        let c = &raw.consul;
        let env = self.env;
        let path = |field: &'static str| [Key("consul"), Key(field)];

        // Address: manifest, then CONSUL_HTTP_ADDR (+ CONSUL_HTTP_SSL), then the default.
        let tls_section = c.tls.is_some() || env.non_empty("CONSUL_CACERT").is_some();
        let (address_text, from_env) = match (&c.address, env.non_empty("CONSUL_HTTP_ADDR")) {
            (Some(a), _) => (a.0.clone(), false),
            (None, Some(a)) => (a, true),
            (None, None) => (DEFAULT_CONSUL_ADDRESS.to_string(), false),
        };
        let ssl = env
            .non_empty("CONSUL_HTTP_SSL")
            .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "True"));
        let address = match normalize_consul_address(&address_text, ssl || tls_section) {
            Ok(a) => Some(a),
            Err(problem) => {
                if from_env {
                    self.env_error("CONSUL_HTTP_ADDR", problem);
                } else {
                    self.error(&path("address"), problem);
                }
                None
            }
        };

        // Token: a login, or manifest token / tokenFile, then CONSUL_HTTP_TOKEN_FILE, then
        // CONSUL_HTTP_TOKEN.
        let login = c.login.as_ref().map(|l| self.login(l, c));
        let token_file = match (&c.token, &c.token_file) {
            _ if login.is_some() => None,
            (None, Some(f)) => Some(PathBuf::from(&f.0)),
            (None, None) => env.non_empty("CONSUL_HTTP_TOKEN_FILE").map(PathBuf::from),
            _ => None,
        };
        let token = match (&c.token, &c.token_file) {
            _ if login.is_some() => None,
            (Some(_), Some(_)) => {
                self.error(
                    &path("tokenFile"),
                    "set either token or tokenFile, not both",
                );
                None
            }
            (Some(t), None) => Some(Secret::new(t.0.trim())),
            (None, Some(f)) => self.read_token(&f.0, Some(&path("tokenFile"))),
            (None, None) => match env.non_empty("CONSUL_HTTP_TOKEN_FILE") {
                Some(f) => self.read_token(&f, None),
                None => env.non_empty("CONSUL_HTTP_TOKEN").map(Secret::new),
            },
        };

        let tls = self.tls(c.tls.as_ref(), &[Key("consul"), Key("tls")], true);
        if let Some(plain) = address.as_deref().filter(|a| a.starts_with("http://")) {
            self.tls_without_https(c.tls.as_ref(), plain, c.address.is_some());
        }
        let retry = match &c.retry {
            None => RetryPolicy::default(),
            Some(r) => {
                let d = RetryPolicy::default();
                let policy = RetryPolicy {
                    initial: r.initial.as_ref().map_or(d.initial, |x| x.0),
                    max: r.max.as_ref().map_or(
                        d.max.max(r.initial.as_ref().map_or(d.initial, |x| x.0)),
                        |x| x.0,
                    ),
                };
                if policy.max < policy.initial {
                    self.error(
                        &[Key("consul"), Key("retry"), Key("max")],
                        "must not be shorter than retry.initial",
                    );
                }
                policy
            }
        };
        let pick = |field: &Option<Text>, var: &str| {
            field
                .as_ref()
                .map(|t| t.0.clone())
                .filter(|s| !s.is_empty())
                .or_else(|| env.non_empty(var))
        };
        Some(ConsulConnection {
            address: address?,
            token,
            token_file,
            login,
            datacenter: c
                .datacenter
                .as_ref()
                .map(|t| t.0.clone())
                .filter(|s| !s.is_empty()),
            namespace: pick(&c.namespace, "CONSUL_NAMESPACE"),
            partition: pick(&c.partition, "CONSUL_PARTITION"),
            tls,
            retry,
            resync_interval: c
                .resync_interval
                .as_ref()
                .map_or(Duration::from_secs(60), |d| d.0),
            blocking_watches: c.blocking_watches.as_ref().map_or(8, |n| n.0 as usize),
            mode: self.mode(c)?,
        })
    }

    /// `consul.login`, with its defaults; `token`/`tokenFile` beside it are an error.
    fn login(&mut self, raw: &schema::RawLogin, c: &schema::RawConsul) -> LoginSettings {
        if c.token.is_some() || c.token_file.is_some() {
            self.error(
                &[Key("consul"), Key("login")],
                "set either login or token/tokenFile, not both: a login gets its own token from the auth method",
            );
        }
        let text = |f: &Option<Text>| f.as_ref().map(|t| t.0.clone()).filter(|s| !s.is_empty());
        if raw.auth_method.0.trim().is_empty() {
            self.error(
                &[Key("consul"), Key("login"), Key("authMethod")],
                "must name the auth method (a consul-k8s install's is <release>-k8s-auth-method)",
            );
        }
        LoginSettings {
            auth_method: raw.auth_method.0.trim().to_string(),
            bearer_token_file: PathBuf::from(
                text(&raw.bearer_token_file)
                    .unwrap_or_else(|| DEFAULT_BEARER_TOKEN_FILE.to_string()),
            ),
            meta: raw
                .meta
                .iter()
                .map(|(k, v)| (k.0.clone(), v.0.clone()))
                .collect(),
            namespace: text(&raw.namespace),
            partition: text(&raw.partition),
        }
    }

    /// `consul.mode` and, for catalog mode, `consul.catalog` with its defaults from the
    /// Downward API (NODE_NAME, HOST_IP).
    fn mode(&mut self, c: &schema::RawConsul) -> Option<ConsulMode> {
        let catalog_at = |field: &'static str| [Key("consul"), Key("catalog"), Key(field)];
        let raw = match c.mode.unwrap_or_default() {
            values::ConsulModeName::Agent => {
                if c.catalog.is_some() {
                    self.error(
                        &[Key("consul"), Key("catalog")],
                        "consul.catalog configures catalog mode, but consul.mode is agent (the default): set consul.mode: catalog, or remove consul.catalog",
                    );
                    return None;
                }
                return Some(ConsulMode::Agent);
            }
            values::ConsulModeName::Catalog => c.catalog.as_ref(),
        };
        let empty = schema::RawCatalog::default();
        let raw = raw.unwrap_or(&empty);
        let node = match &raw.node {
            Some(n) => Some(n.0.clone()),
            None => match self.env.non_empty("NODE_NAME") {
                Some(node) => {
                    match values::NodeName::parse(&format!("{VIRTUAL_NODE_PREFIX}{node}")) {
                        Ok(n) => Some(n.0),
                        Err(problem) => {
                            self.env_error(
                                "NODE_NAME",
                                format!("cannot name the virtual node after it: {problem}"),
                            );
                            None
                        }
                    }
                }
                None => {
                    self.error(
                        &catalog_at("node"),
                        format!("catalog mode needs a node to register on: set consul.catalog.node, or NODE_NAME (the Downward API's spec.nodeName) for the default {VIRTUAL_NODE_PREFIX}<NODE_NAME>"),
                    );
                    None
                }
            },
        };
        let node_address = match &raw.node_address {
            Some(a) => Some(a.0.clone()),
            None => match self.env.non_empty("HOST_IP") {
                Some(ip) => Some(ip),
                None => {
                    self.error(
                        &catalog_at("nodeAddress"),
                        "catalog mode needs the node's address: set consul.catalog.nodeAddress, or HOST_IP (the Downward API's status.hostIP)",
                    );
                    None
                }
            },
        };
        let session_ttl = raw.session_ttl.as_ref().map_or(SESSION_TTL_MIN, |d| d.0);
        if !(SESSION_TTL_MIN..=SESSION_TTL_MAX).contains(&session_ttl) {
            self.error(
                &catalog_at("sessionTTL"),
                format!(
                    "{} is outside Consul's session TTL range (10s to 24h)",
                    duration::format(session_ttl)
                ),
            );
        }
        let shared_session = match &raw.shared_session {
            Some(shared) => {
                let advertise = shared.advertise.0.trim();
                match advertise_address(advertise) {
                    Some(address) => Some(address.to_string()),
                    None => {
                        self.error(
                            &[Key("consul"), Key("catalog"), Key("sharedSession"), Key("advertise")],
                            format!("{advertise:?} is not an IP:port (the other sidecars of the virtual node reach this one's admin server there, e.g. ${{POD_IP}}:9102)"),
                        );
                        None
                    }
                }
            }
            None => None,
        };
        Some(ConsulMode::Catalog(CatalogSettings {
            node: node?,
            shared_session,
            node_address: node_address?,
            session_ttl,
            key_prefix: raw
                .key_prefix
                .as_ref()
                .map_or_else(|| DEFAULT_KEY_PREFIX.to_string(), |p| p.0.clone()),
        }))
    }

    /// TLS settings next to a plain-HTTP Consul address would be dropped, and the token sent in
    /// clear text: an error, in the manifest or naming the variable. CONSUL_* TLS variables count
    /// only when the address did not come from the manifest (an explicit `http://` there wins
    /// over the environment, as every other manifest setting does).
    fn tls_without_https(
        &mut self,
        raw: Option<&RawTls>,
        address: &str,
        address_in_manifest: bool,
    ) {
        let fix = format!(
            "the Consul address {address} is plain HTTP, so TLS settings would be ignored and the token sent in clear text; use an https:// address (or CONSUL_HTTP_SSL=true with a scheme-less address), or remove the TLS settings"
        );
        if let Some(raw) = raw {
            let set = |f: &Option<Text>| f.as_ref().is_some_and(|t| !t.0.is_empty());
            if set(&raw.ca_file)
                || set(&raw.cert_file)
                || set(&raw.key_file)
                || set(&raw.server_name)
                || raw.insecure_skip_verify.as_ref().is_some_and(|f| f.0)
            {
                self.error(&[Key("consul"), Key("tls")], fix.clone());
                return;
            }
        }
        if address_in_manifest {
            return;
        }
        for var in [
            "CONSUL_CACERT",
            "CONSUL_CAPATH",
            "CONSUL_CLIENT_CERT",
            "CONSUL_CLIENT_KEY",
            "CONSUL_TLS_SERVER_NAME",
        ] {
            if self.env.non_empty(var).is_some() {
                self.env_error(var, fix);
                return;
            }
        }
    }

    fn read_token(&mut self, file: &str, at: Option<&[Segment]>) -> Option<Secret> {
        match std::fs::read_to_string(file) {
            Ok(t) if !t.trim().is_empty() => Some(Secret::new(t.trim())),
            Ok(_) => {
                let problem = format!("token file {file} is empty");
                match at {
                    Some(p) => self.error(p, problem),
                    None => self.env_error("CONSUL_HTTP_TOKEN_FILE", problem),
                }
                None
            }
            Err(e) => {
                let problem = format!("cannot read token file {file}: {e}");
                match at {
                    Some(p) => self.error(p, problem),
                    None => self.env_error("CONSUL_HTTP_TOKEN_FILE", problem),
                }
                None
            }
        }
    }

    /// TLS settings; for Consul (`consul_env`) the CONSUL_* variables fill what the manifest leaves out.
    fn tls(&mut self, raw: Option<&RawTls>, at: &[Segment], consul_env: bool) -> TlsSettings {
        let env = self.env;
        let from_env = |var: &str| if consul_env { env.non_empty(var) } else { None };
        let text = |f: &Option<Text>| f.as_ref().map(|t| t.0.clone()).filter(|s| !s.is_empty());
        let empty = RawTls::default();
        let raw = raw.unwrap_or(&empty);
        let settings = TlsSettings {
            ca_file: text(&raw.ca_file)
                .or_else(|| from_env("CONSUL_CACERT"))
                .map(PathBuf::from),
            cert_file: text(&raw.cert_file)
                .or_else(|| from_env("CONSUL_CLIENT_CERT"))
                .map(PathBuf::from),
            key_file: text(&raw.key_file)
                .or_else(|| from_env("CONSUL_CLIENT_KEY"))
                .map(PathBuf::from),
            server_name: text(&raw.server_name).or_else(|| from_env("CONSUL_TLS_SERVER_NAME")),
            insecure_skip_verify: match &raw.insecure_skip_verify {
                Some(f) => f.0,
                None => from_env("CONSUL_HTTP_SSL_VERIFY")
                    .is_some_and(|v| matches!(v.as_str(), "0" | "false" | "FALSE" | "False")),
            },
        };
        let field = |name: &'static str| {
            let mut p = at.to_vec();
            p.push(Key(name));
            p
        };
        if settings.cert_file.is_some() != settings.key_file.is_some() {
            let missing = if settings.cert_file.is_some() {
                "keyFile"
            } else {
                "certFile"
            };
            self.error(
                &field(missing),
                "certFile and keyFile go together: set both or neither",
            );
        }
        for (name, file) in [
            ("caFile", &settings.ca_file),
            ("certFile", &settings.cert_file),
            ("keyFile", &settings.key_file),
        ] {
            if let Some(f) = file
                && let Err(e) = std::fs::metadata(f)
            {
                self.error(&field(name), format!("cannot read {}: {e}", f.display()));
            }
        }
        settings
    }

    fn service(&mut self, i: usize, raw: RawService, identity: &PodIdentity) -> ServiceSpec {
        let at = |field: &'static str| vec![Key("services"), Index(i), Key(field)];
        let sub =
            |a: &'static str, b: &'static str| vec![Key("services"), Index(i), Key(a), Key(b)];
        let name = raw.name.0;
        let port = raw.port.0;
        let id = raw
            .id
            .map(|id| id.0)
            .unwrap_or_else(|| identity.default_instance_id(&name, port));
        let address = raw
            .address
            .map(|a| a.0)
            .or_else(|| self.env.non_empty("POD_IP"));

        let mut meta: BTreeMap<String, String> = BTreeMap::new();
        for (k, v) in raw.meta {
            if RESERVED_META_KEYS.contains(&k.0.as_str()) {
                self.error(
                    &at("meta"),
                    format!("meta key {:?} is set by consul-registrar itself", k.0),
                );
            }
            if v.0.len() > MAX_META_VALUE_LEN {
                self.error(
                    &at("meta"),
                    format!(
                        "the value of meta key {:?} has {} bytes; Consul allows at most {MAX_META_VALUE_LEN}",
                        k.0,
                        v.0.len()
                    ),
                );
            }
            meta.insert(k.0, v.0);
        }
        meta.insert(MANAGED_BY_KEY.into(), MANAGED_BY_VALUE.into());
        for (k, v) in identity.meta() {
            meta.insert(k.into(), v.clone());
        }
        if meta.len() > MAX_META_KEYS {
            self.error(
                &at("meta"),
                format!(
                    "{} meta keys with the sidecar's own; Consul allows at most {MAX_META_KEYS}",
                    meta.len()
                ),
            );
        }

        let h = raw.health;
        let health = HealthSpec {
            address: h
                .address
                .map(|a| a.0)
                .or_else(|| address.clone())
                .unwrap_or_else(|| "127.0.0.1".into()),
            port: h.port.map_or(port, |p| p.0),
            service: h.service.map(|s| s.0).unwrap_or_default(),
            tls: h
                .tls
                .as_ref()
                .map(|t| self.tls(Some(t), &sub("health", "tls"), false)),
            mode: h.mode.unwrap_or_default(),
            interval: h.interval.map_or(Duration::from_secs(1), |d| d.0),
            timeout: h.timeout.map_or(Duration::from_secs(1), |d| d.0),
            success_threshold: h.success_threshold.map_or(1, |c| c.0),
            failure_threshold: h.failure_threshold.map_or(3, |c| c.0),
            initial_delay: h.initial_delay.map_or(Duration::ZERO, |d| d.0),
        };

        let c = raw.check;
        let check = CheckSpec {
            id: format!("consul-registrar:{id}"),
            name: format!("gRPC health of {name} (consul-registrar)"),
            ttl: c.ttl.map_or(Duration::from_secs(10), |d| d.0),
            deregister_critical_service_after: c
                .deregister_critical_service_after
                .map_or(MIN_DEREGISTER_AFTER, |d| d.0),
            notes: c.notes.map(|n| n.0),
        };
        // Both are at most duration::MAX, so the sum cannot overflow.
        let cycle = health.interval.saturating_add(health.timeout);
        if check.ttl <= cycle {
            self.error(
                &sub("check", "ttl"),
                format!(
                    "ttl {} must be longer than one probe cycle (health.interval + health.timeout = {}); the sidecar refreshes it every ttl/3",
                    duration::format(check.ttl),
                    duration::format(cycle)
                ),
            );
        }
        if check.deregister_critical_service_after < MIN_DEREGISTER_AFTER {
            self.error(
                &sub("check", "deregisterCriticalServiceAfter"),
                format!(
                    "{} is below Consul's minimum of 1m",
                    duration::format(check.deregister_critical_service_after)
                ),
            );
        }

        ServiceSpec {
            id,
            name,
            address,
            port,
            tags: raw.tags.into_iter().map(|t| t.0).collect(),
            meta,
            weights: raw.weights.map(|w| Weights {
                passing: w.passing.0,
                warning: w.warning.map_or(1, |c| c.0),
            }),
            tagged_addresses: raw
                .tagged_addresses
                .into_iter()
                .map(|(k, v)| {
                    (
                        k.0,
                        TaggedAddress {
                            address: v.address.0,
                            port: v.port.0,
                        },
                    )
                })
                .collect(),
            enable_tag_override: raw.enable_tag_override.is_some_and(|f| f.0),
            health,
            check,
        }
    }
}

fn render_path(path: &[Segment]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// `host:port`, `http://host:port` or `https://host:port` → a base URL; `unix://` is refused.
fn normalize_consul_address(text: &str, default_https: bool) -> Result<String, String> {
    let text = text.trim().trim_end_matches('/');
    if text.starts_with("unix://") {
        return Err(format!(
            "{text:?}: unix sockets are not supported; use the agent's HTTP(S) address"
        ));
    }
    let with_scheme = if text.contains("://") {
        text.to_string()
    } else if default_https {
        format!("https://{text}")
    } else {
        format!("http://{text}")
    };
    let url = reqwest::Url::parse(&with_scheme).map_err(|e| {
        format!("{text:?} is not a Consul address ({e}); e.g. http://127.0.0.1:8500")
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{text:?}: the scheme must be http or https"));
    }
    let host = url
        .host_str()
        .ok_or_else(|| format!("{text:?} has no host"))?;
    if url.path() != "/" || url.query().is_some() {
        return Err(format!("{text:?}: give only scheme, host and port"));
    }
    // `http://host` without a port means Consul's default port (8500, or 8501 for https), not 80.
    let authority = with_scheme
        .split("://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_default();
    let explicit_port = authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    let port = match (explicit_port, url.port_or_known_default()) {
        (true, Some(p)) => p,
        _ if url.scheme() == "https" => 8501,
        _ => 8500,
    };
    Ok(format!("{}://{host}:{port}", url.scheme()))
}

#[cfg(test)]
mod tests;
