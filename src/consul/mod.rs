//! The Consul agent HTTP API, as much of it as the sidecar needs: register, update a TTL check,
//! deregister, read and watch one service. The client owns the HTTP details (base URL, TLS, the
//! ACL token header, namespaces) and records every call in the metrics; its token is a static one
//! (a value or a file read again) or a login's (`login.rs`).

pub mod backend;
pub mod catalog;
mod login;
pub mod node_view;
pub mod reaper;
pub mod registration;
pub mod session;
pub mod shared;

pub use backend::Registry;
pub use catalog::CatalogRegistry;

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use tokio::sync::Semaphore;

use crate::manifest::{ConsulConnection, MANAGED_BY_KEY, MANAGED_BY_VALUE, Secret, ServiceSpec};
use crate::metrics::Metrics;
pub use registration::{AgentService, AgentServiceRegistration, CheckSeen, CheckStatus, Drift};

/// How long any non-blocking call may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How many non-blocking calls may be in flight at once. Each one holds an HTTP/1.1 connection,
/// and a Consul agent refuses a client past `http_max_conns_per_client` (default 200) connections
/// with 429; a thousand instances whose TTL refreshes fall due together would otherwise open a
/// thousand connections (memory on both sides, refusals, retries). 32 calls to a local agent
/// still carry thousands of calls a second. Blocking watches are bounded apart, by
/// `consul.blockingWatches`.
pub const MAX_CONCURRENT_CALLS: usize = 32;
/// The operations that are blocking queries: they do not take a call permit and are not timed as
/// calls. The instances' watches are bounded by `consul.blockingWatches`; catalog mode adds one
/// on each service's reaper key, one on the service's keys per service whose reaper it is, and
/// (the holder of a shared session) one on its virtual node.
const BLOCKING_OPERATIONS: [&str; 5] = [
    "watch_service",
    "watch_instance",
    "watch_node",
    "watch_keys",
    "watch_reaper_key",
];
/// Idle connections kept for reuse: the concurrent calls and a margin for the blocking watches.
const MAX_IDLE_CONNECTIONS: usize = MAX_CONCURRENT_CALLS + 16;

/// What went wrong talking to Consul. Never carries the token.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("cannot reach Consul at {address} ({operation}): {reason}")]
    Unreachable {
        address: String,
        operation: &'static str,
        reason: String,
    },
    #[error(
        "Consul refused {operation} (HTTP {status}, permission denied: {body}); check the ACL token: it needs {}",
        needed_permission(operation)
    )]
    Forbidden {
        operation: &'static str,
        /// 403; or 409 for a transaction, whose refused operations Consul lists in a 409 answer
        /// ("Permission denied"), applying none.
        status: u16,
        body: String,
    },
    #[error("Consul answered {operation} with HTTP {status}: {body}")]
    Status {
        operation: &'static str,
        status: u16,
        body: String,
    },
    #[error("{operation}: Consul has no such {what}")]
    NotFound {
        operation: &'static str,
        what: &'static str,
    },
    #[error("Consul's answer to {operation} could not be read: {reason}")]
    Decode {
        operation: &'static str,
        reason: String,
    },
    #[error("cannot log in to Consul with the auth method {method:?}: {reason}")]
    Login { method: String, reason: String },
    #[error("cannot set up the Consul client: {0}")]
    Setup(String),
    #[error(
        "the liveness key {key} is held by another Consul session (another sidecar registering the same instance on the same node, or this instance's previous pod until its session expires); retrying"
    )]
    KeyHeld { key: String },
    #[error(
        "calls to {address} reached different Consul agents (node {first:?}, then node {now:?}): consul.address must be one agent, this node's own (e.g. the host IP), not a Service or load balancer over several agents or servers, because an agent keeps the instances it registered to itself. Without a client agent on the node, register through the servers' catalog instead: consul.mode: catalog"
    )]
    SeveralAgents {
        address: String,
        first: String,
        now: String,
    },
}

impl ConsulError {
    /// Whether the same call may succeed later. Everything but a malformed request (4xx other
    /// than 403/404/429) is worth retrying: Consul restarts, elects leaders, and tokens get fixed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConsulError::Status { status, .. } => *status == 429 || *status >= 500,
            ConsulError::Setup(_) | ConsulError::SeveralAgents { .. } => false,
            _ => true,
        }
    }

    /// Consul refused the request as such (HTTP 400 and the like, not 403/404/429): sending the
    /// same request again gets the same answer.
    pub fn is_refusal(&self) -> bool {
        matches!(self, ConsulError::Status { status, .. } if (400..500).contains(status) && !matches!(status, 404 | 429))
    }
}

/// A client for one Consul agent.
#[derive(Clone)]
pub struct ConsulClient {
    http: reqwest::Client,
    /// The same settings without a connection pool: for [`ConsulClient::verify_agent`] only.
    unpooled: reqwest::Client,
    base: Arc<str>,
    token: Arc<TokenSource>,
    /// The node name of the agent that answered first; every later answer must come from it.
    agent: Arc<AgentIdentity>,
    /// `ns` / `partition` query parameters (Consul Enterprise), empty otherwise.
    scope: Arc<[(&'static str, String)]>,
    /// Permits for non-blocking calls: at most [`MAX_CONCURRENT_CALLS`] in flight.
    calls: Arc<Semaphore>,
    metrics: Arc<Metrics>,
}

/// A successful answer, read whole while the call still held its permit.
struct Answer {
    /// `X-Consul-ContentHash`, sent with answers that support blocking by hash.
    content_hash: Option<String>,
    /// `X-Consul-Index`, sent with answers that support blocking by index.
    index: Option<String>,
    /// `X-Consul-Results-Filtered-By-ACLs: true`: the token may not see everything asked for.
    filtered_by_acls: bool,
    body: Vec<u8>,
}

/// One check as `GET /v1/agent/checks` lists it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct CheckEntry {
    #[serde(rename = "CheckID", default)]
    pub check_id: String,
    #[serde(rename = "Status", default)]
    pub status: String,
    #[serde(rename = "Output", default)]
    pub output: String,
}

/// One answer of a blocking read of a service.
#[derive(Debug)]
pub enum ServiceWatch {
    /// The agent has the service; `hash` goes into the next blocking read.
    Present {
        service: Box<AgentService>,
        hash: String,
    },
    /// The agent does not know the service.
    Missing,
}

impl ConsulClient {
    /// Builds a client from the resolved connection settings (reads the TLS files).
    pub fn new(conn: &ConsulConnection, metrics: Arc<Metrics>) -> Result<Self, ConsulError> {
        let (http, base) = http_client(conn, MAX_IDLE_CONNECTIONS)?;
        // No idle connection kept: every identity check opens its own, so that a load balancer
        // that routes per connection (any L4 one) may send it to another agent, as it does the
        // calls' pooled connections; over a kept-alive one it would always see the same agent.
        let (unpooled, _) = http_client(conn, 0)?;
        let mut scope = Vec::new();
        if let Some(ns) = &conn.namespace {
            scope.push(("ns", ns.clone()));
        }
        if let Some(p) = &conn.partition {
            scope.push(("partition", p.clone()));
        }
        Ok(ConsulClient {
            http,
            unpooled,
            base: base.into(),
            token: Arc::new(TokenSource::new(
                conn.token.clone(),
                conn.token_file.clone(),
                conn.login.clone(),
            )),
            agent: Arc::new(AgentIdentity::default()),
            scope: scope.into(),
            calls: Arc::new(Semaphore::new(MAX_CONCURRENT_CALLS)),
            metrics,
        })
    }

    /// The agent's base URL.
    pub fn address(&self) -> &str {
        &self.base
    }

    /// `PUT /v1/agent/service/register?replace-existing-checks=true`: idempotent.
    pub async fn register(&self, reg: &AgentServiceRegistration) -> Result<(), ConsulError> {
        let req = self
            .request(Method::PUT, "/v1/agent/service/register")
            .query(&[("replace-existing-checks", "true")])
            .json(reg);
        self.send("register", req, REQUEST_TIMEOUT).await.map(drop)
    }

    /// `PUT /v1/agent/check/update/:id`: sets the TTL check's status and output and resets its
    /// timer. `NotFound` when the agent has no such check (the instance is gone).
    pub async fn update_ttl(
        &self,
        check_id: &str,
        status: CheckStatus,
        output: &str,
    ) -> Result<(), ConsulError> {
        let body = serde_json::json!({ "Status": status.as_str(), "Output": output });
        let req = self
            .request(
                Method::PUT,
                &format!("/v1/agent/check/update/{}", path_escape(check_id)),
            )
            .json(&body);
        match self.send("update_ttl", req, REQUEST_TIMEOUT).await {
            Err(ConsulError::Status { status: 404, .. }) => Err(ConsulError::NotFound {
                operation: "update_ttl",
                what: "check",
            }),
            // Consul before 1.x answered an unknown check with 500 "Unknown check ID".
            Err(ConsulError::Status {
                status: 500, body, ..
            }) if body.contains("Unknown check")
                || body.contains("does not have associated TTL") =>
            {
                Err(ConsulError::NotFound {
                    operation: "update_ttl",
                    what: "check",
                })
            }
            other => other.map(drop),
        }
    }

    /// `PUT /v1/agent/service/deregister/:id`; an unknown service counts as done.
    pub async fn deregister(&self, service_id: &str) -> Result<(), ConsulError> {
        let req = self.request(
            Method::PUT,
            &format!("/v1/agent/service/deregister/{}", path_escape(service_id)),
        );
        match self.send("deregister", req, REQUEST_TIMEOUT).await {
            Err(ConsulError::Status { status: 404, .. }) => Ok(()),
            Err(ConsulError::Status {
                status: 500, body, ..
            }) if body.contains("Unknown service") => Ok(()),
            other => other.map(drop),
        }
    }

    /// `GET /v1/agent/service/:id`, blocking up to `wait` while the definition's hash is `hash`
    /// (a plain read when `hash` is `None`).
    pub async fn watch_service(
        &self,
        service_id: &str,
        hash: Option<&str>,
        wait: Duration,
    ) -> Result<ServiceWatch, ConsulError> {
        let path = format!("/v1/agent/service/{}", path_escape(service_id));
        let (operation, req, timeout) = match hash {
            Some(h) => (
                "watch_service",
                self.request(Method::GET, &path)
                    .query(&[("hash", h), ("wait", &wait_param(wait))]),
                blocking_timeout(wait),
            ),
            None => (
                "read_service",
                self.request(Method::GET, &path),
                REQUEST_TIMEOUT,
            ),
        };
        match self.send(operation, req, timeout).await {
            Ok(answer) => {
                let service: AgentService =
                    serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
                        operation,
                        reason: e.to_string(),
                    })?;
                let hash = answer
                    .content_hash
                    .filter(|h| !h.is_empty())
                    .unwrap_or_else(|| service.content_hash.clone());
                Ok(ServiceWatch::Present {
                    service: Box::new(service),
                    hash,
                })
            }
            Err(ConsulError::Status { status: 404, .. }) => Ok(ServiceWatch::Missing),
            Err(e) => Err(e),
        }
    }

    /// `GET /v1/agent/checks`: every check the agent holds (that the token may read).
    pub async fn agent_checks(&self) -> Result<Vec<CheckEntry>, ConsulError> {
        let req = self.request(Method::GET, "/v1/agent/checks");
        let answer = self.send("agent_checks", req, REQUEST_TIMEOUT).await?;
        let checks: std::collections::HashMap<String, CheckEntry> =
            serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
                operation: "agent_checks",
                reason: e.to_string(),
            })?;
        Ok(checks.into_values().collect())
    }

    /// Whether the servers (asked through the agent, which forwards catalog reads to the
    /// leader) no longer hold instance `spec`, after the agent deregistered it. An instance of
    /// ours they still hold (on this agent's node, when the sidecar knows it) is deregistered
    /// there (`PUT /v1/catalog/deregister`, which needs only `service:write`): false, read again.
    /// A token without `node:read` sees no catalog entry at all (Consul filters them and says
    /// so): the instance is then deregistered at the servers on the agent's node without looking,
    /// a Raft write that succeeds only once the servers have applied it.
    pub async fn servers_forget(&self, spec: &ServiceSpec) -> Result<bool, ConsulError> {
        let path = format!("/v1/catalog/service/{}", path_escape(&spec.name));
        let filter = format!("ServiceID == \"{}\"", filter_escape(&spec.id));
        let req = self
            .request(Method::GET, &path)
            .query(&[("filter", filter.as_str())]);
        let answer = self.send("catalog_service", req, REQUEST_TIMEOUT).await?;
        #[derive(serde::Deserialize)]
        struct Entry {
            #[serde(rename = "Node")]
            node: String,
            #[serde(rename = "ServiceID")]
            id: String,
            #[serde(rename = "ServiceMeta", default)]
            meta: Option<std::collections::HashMap<String, String>>,
        }
        let entries: Vec<Entry> =
            serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
                operation: "catalog_service",
                reason: e.to_string(),
            })?;
        let our_node = self.agent.first.get();
        let held: Vec<Entry> = entries
            .into_iter()
            .filter(|e| e.id == spec.id)
            .filter(|e| our_node.is_none_or(|n| *n == e.node))
            .filter(|e| {
                e.meta
                    .as_ref()
                    .and_then(|m| m.get(MANAGED_BY_KEY))
                    .is_some_and(|v| v == MANAGED_BY_VALUE)
            })
            .collect();
        if held.is_empty() && answer.filtered_by_acls {
            let Some(node) = our_node else {
                // Neither the node's services nor the agent's node may be read: nothing to go by.
                return Ok(true);
            };
            self.catalog_deregister(node, &spec.id).await?;
            return Ok(true);
        }
        if held.is_empty() {
            return Ok(true);
        }
        for entry in held {
            self.catalog_deregister(&entry.node, &entry.id).await?;
        }
        Ok(false)
    }

    /// `PUT /v1/catalog/deregister` of service `id` on `node`, through the agent to the servers.
    async fn catalog_deregister(&self, node: &str, id: &str) -> Result<(), ConsulError> {
        let body = serde_json::json!({ "Node": node, "ServiceID": id });
        let req = self
            .request(Method::PUT, "/v1/catalog/deregister")
            .json(&body);
        self.send("catalog_deregister", req, REQUEST_TIMEOUT)
            .await
            .map(drop)
    }

    /// `GET /v1/status/leader`: the raft leader's address, empty while there is none.
    pub async fn leader(&self) -> Result<String, ConsulError> {
        let req = self.request(Method::GET, "/v1/status/leader");
        let answer = self.send("leader", req, REQUEST_TIMEOUT).await?;
        serde_json::from_slice::<String>(&answer.body).map_err(|e| ConsulError::Decode {
            operation: "leader",
            reason: e.to_string(),
        })
    }

    /// Checks that calls reach the agent they reached first (its node name, from
    /// `GET /v1/agent/self`): at start-up once, and again with `again` before an instance found
    /// missing is registered anew, since an address over several agents shows itself that way.
    /// A different node is fatal: [`ConsulClient::several_agents`] reports it.
    pub async fn verify_agent(&self, again: bool) -> Result<(), ConsulError> {
        // At start-up every instance asks at once: one check answers them all, made before
        // anything is registered.
        let first = match self
            .agent
            .first
            .get_or_try_init(|| self.first_agent())
            .await
        {
            Ok(first) if again => first.clone(),
            Ok(_) | Err(ConsulError::Forbidden { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        match self.same_agent(first, IDENTITY_SAMPLES).await {
            Err(ConsulError::Forbidden { .. }) => Ok(()),
            other => other.map(drop),
        }
    }

    /// The first agent's node name, read over [`IDENTITY_SAMPLES`] connections of their own: an
    /// address over several agents shows itself here, before anything is registered on one of
    /// them (waiting for an instance to go missing can lose the race for good: registered on
    /// both agents, nothing missing again).
    async fn first_agent(&self) -> Result<String, ConsulError> {
        let first = self.agent_node().await?;
        self.same_agent(first, IDENTITY_SAMPLES - 1).await
    }

    /// Reads the node name `samples` times, each over a new connection, and compares each with
    /// `first`. A load balancer that routes per connection in turn (round robin) sends two
    /// consecutive ones to different agents; a random one, each with even odds. A different node
    /// is fatal: [`ConsulClient::several_agents`] reports it.
    async fn same_agent(&self, first: String, samples: usize) -> Result<String, ConsulError> {
        for _ in 0..samples {
            let node = self.agent_node().await?;
            if node != first {
                let error = ConsulError::SeveralAgents {
                    address: self.base.to_string(),
                    first,
                    now: node,
                };
                self.agent.fatal.send_replace(Some(error.to_string()));
                return Err(error);
            }
        }
        Ok(first)
    }

    /// The node name of the agent that answers `GET /v1/agent/self` on a connection of its own
    /// (see `unpooled`). `Forbidden` when the token may not read the agent (warned once): then
    /// nothing can be compared.
    async fn agent_node(&self) -> Result<String, ConsulError> {
        let req = self.request_on(&self.unpooled, Method::GET, "/v1/agent/self");
        let answer = match self.send("agent_self", req, REQUEST_TIMEOUT).await {
            Ok(a) => a,
            Err(e @ ConsulError::Forbidden { .. }) => {
                if !self
                    .agent
                    .forbidden
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(
                        "the ACL token may not read the agent (agent:read), so calls reaching different agents cannot be detected"
                    );
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        #[derive(serde::Deserialize)]
        struct AgentSelf {
            #[serde(rename = "Config")]
            config: AgentConfig,
        }
        #[derive(serde::Deserialize)]
        struct AgentConfig {
            #[serde(rename = "NodeName")]
            node_name: String,
        }
        let node = serde_json::from_slice::<AgentSelf>(&answer.body)
            .map_err(|e| ConsulError::Decode {
                operation: "agent_self",
                reason: e.to_string(),
            })?
            .config
            .node_name;
        Ok(node)
    }

    /// Which token calls carry now: it changes when the token file does. An instance registered
    /// under an older one must be registered again (the agent syncs it with the token that
    /// registered it, which may be deleted after a rotation).
    pub fn token_generation(&self) -> u64 {
        self.token
            .generation
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits until calls were found to reach different agents; the message says what to do.
    pub async fn several_agents(&self) -> String {
        let mut rx = self.agent.fatal.subscribe();
        let message = rx.wait_for(Option::is_some).await.map(|m| m.clone());
        match message {
            Ok(message) => message.unwrap_or_default(),
            // The sender lives in self: it cannot be dropped while we wait.
            Err(_) => std::future::pending().await,
        }
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.request_on(&self.http, method, path)
    }

    fn request_on(
        &self,
        http: &reqwest::Client,
        method: Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let mut req = http.request(method, format!("{}{path}", self.base));
        if let Some(token) = self.token.current() {
            req = req.header("X-Consul-Token", token.expose());
        }
        if !self.scope.is_empty() {
            req = req.query(&self.scope[..]);
        }
        req
    }

    /// Sends one call and reads its answer whole. The call's state (≈ 1.4 KiB: the request, the
    /// permit wait, the response) lives on the heap while the call runs, not inline in every
    /// long-lived task that may make a call: at 1,000 instances that is megabytes held idle.
    async fn send(
        &self,
        operation: &'static str,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Answer, ConsulError> {
        match &self.token.login {
            Some(login) => Box::pin(self.send_logged_in(login, operation, req, timeout)).await,
            None => Box::pin(self.send_now(operation, req, timeout)).await,
        }
    }

    /// `PUT /v1/txn` with `ops`: `Ok(false)` when Consul refused it (409: nothing applied) and
    /// `refused` says the refusal is an expected one (given the answer's body); any other 409 is
    /// the error it is.
    async fn txn(
        &self,
        operation: &'static str,
        ops: &serde_json::Value,
        refused: impl FnOnce(&str) -> bool,
    ) -> Result<bool, ConsulError> {
        let req = self.request(Method::PUT, "/v1/txn").json(ops);
        match self.send(operation, req, REQUEST_TIMEOUT).await {
            Ok(_) => Ok(true),
            Err(ConsulError::Status {
                status: 409, body, ..
            }) if refused(&body) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every call but a blocking watch waits for a permit first, and holds it until the answer is
    /// read; the duration metric starts once the permit is held, so it measures Consul, not the
    /// queue.
    async fn send_now(
        &self,
        operation: &'static str,
        req: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<Answer, ConsulError> {
        let blocking = BLOCKING_OPERATIONS.contains(&operation);
        let _permit = if blocking {
            None
        } else {
            // The semaphore is never closed, so acquiring cannot fail.
            self.calls.acquire().await.ok()
        };
        let started = Instant::now();
        let result = req.timeout(timeout).send().await;
        if !blocking {
            self.metrics
                .consul_request_duration
                .with_label_values(&[operation])
                .observe(started.elapsed().as_secs_f64());
        }
        let resp = match result {
            Ok(resp) => resp,
            Err(e) => {
                self.record(operation, "error");
                self.metrics.consul_reachable.set(0);
                return Err(self.unreachable(operation, &e));
            }
        };
        self.metrics.consul_reachable.set(1);
        let status = resp.status();
        self.record(operation, status_class(status));
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let index = header("X-Consul-Index");
        if status.is_success() {
            let content_hash = header("X-Consul-ContentHash");
            let filtered_by_acls = header("X-Consul-Results-Filtered-By-ACLs")
                .is_some_and(|v| v.eq_ignore_ascii_case("true"));
            let body = resp
                .bytes()
                .await
                .map_err(|e| self.unreachable(operation, &e))?;
            return Ok(Answer {
                content_hash,
                index,
                filtered_by_acls,
                body: body.to_vec(),
            });
        }
        if status == StatusCode::NOT_FOUND && operation == "watch_keys" {
            // No key under the prefix: an empty list, with the index to block on (a 404 carries
            // X-Consul-Index too, and a blocking query on it waits for the first key).
            return Ok(Answer {
                content_hash: None,
                index,
                filtered_by_acls: false,
                body: b"[]".to_vec(),
            });
        }
        let body = resp.text().await.unwrap_or_default();
        // A transaction the token may not apply is refused whole with a 409 that lists the
        // denied operations: a permission problem like a 403, not a failed check.
        let denied = status == StatusCode::FORBIDDEN
            || (status == StatusCode::CONFLICT && body.contains("Permission denied"));
        let body = body.trim().chars().take(300).collect::<String>();
        Err(if denied {
            self.metrics.consul_denied.inc();
            // The token may have been rotated: the next call uses the file's new one.
            self.token.reload_if_changed();
            ConsulError::Forbidden {
                operation,
                status: status.as_u16(),
                body,
            }
        } else {
            ConsulError::Status {
                operation,
                status: status.as_u16(),
                body,
            }
        })
    }

    /// The call got no (whole) answer: not connected, timed out, or cut off mid-answer.
    fn unreachable(&self, operation: &'static str, e: &reqwest::Error) -> ConsulError {
        ConsulError::Unreachable {
            address: self.base.to_string(),
            operation,
            reason: crate::error_chain(e),
        }
    }

    fn record(&self, operation: &str, class: &str) {
        self.metrics
            .consul_requests
            .with_label_values(&[operation, class])
            .inc();
    }
}

/// The `wait` parameter of one blocking query that should return at least every `wait`: drawn
/// anew for each query from ¾ × `wait` to `wait`. Sidecars started together (a rollout) would
/// otherwise re-arm together every `resyncInterval`, a wave on the servers each time that Consul's
/// own jitter (at most wait/16) spreads only over a few seconds; drawn anew, the waves spread over
/// a quarter of the interval at once and wider at each re-arm. Never longer than `wait`, which
/// stays the resync bound.
fn wait_param(wait: Duration) -> String {
    let drawn = wait.mul_f64(1.0 - 0.25 * fastrand::f64());
    format!("{}ms", drawn.as_millis())
}

/// How long a blocking query waiting up to `wait` may take: Consul adds up to wait/16 of jitter;
/// leave room for it and the network.
fn blocking_timeout(wait: Duration) -> Duration {
    wait.saturating_add(wait / 8)
        .saturating_add(Duration::from_secs(5))
}

/// The ACL permission an operation needs, for the 403 message.
fn needed_permission(operation: &str) -> &'static str {
    match operation {
        "catalog_register" | "catalog_status" | "catalog_deregister" => {
            "node:write on the virtual node (node_prefix \"consul-registrar-\"), service:write on the service and key:write on the liveness keys (key_prefix \"consul-registrar/instances/\")"
        }
        "remove_node" => "node:write on the virtual node (node_prefix \"consul-registrar-\")",
        "session_create" | "session_renew" | "session_destroy" | "session_list" => {
            "session:write on the virtual node (session_prefix \"consul-registrar-\")"
        }
        "key_acquire" | "key_delete" | "key_read" | "reaper_key" | "watch_reaper_key"
        | "holder_key" | "key_move" | "key_release" => {
            "key:write on the liveness keys (key_prefix \"consul-registrar/instances/\")"
        }
        "watch_keys" | "key_list" => {
            "key:read/list on the liveness keys (key_prefix \"consul-registrar/instances/\")"
        }
        "reap" => "service:write on the reaped service and node:write on its virtual node",
        "watch_instance" | "read_instance" | "managed_nodes" | "node_services" | "node_checks"
        | "service_instances" | "catalog_service" | "agent_checks" => "service:read and node:read",
        "agent_self" => "agent:read (agent_prefix \"\")",
        _ => "service:write on the service",
    }
}

/// An HTTP client for the agent with the connection's settings (TLS, server name, timeouts),
/// keeping at most `idle_per_host` idle connections for reuse; and the base URL it calls (the
/// server name's when one is set).
fn http_client(
    conn: &ConsulConnection,
    idle_per_host: usize,
) -> Result<(reqwest::Client, String), ConsulError> {
    install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(idle_per_host)
        .http1_only()
        .no_proxy();
    let mut base = conn.address.clone();
    let tls = &conn.tls;
    if base.starts_with("https://") {
        let roots = match &tls.ca_file {
            Some(ca) => ca_bundle(ca)?,
            None if tls.insecure_skip_verify => Vec::new(),
            None => system_roots(&base)?,
        };
        // Only these roots: reqwest's default (the platform verifier) fails to build in an
        // image without a CA bundle, with nothing but "builder error" to say why.
        builder = builder.tls_certs_only(roots);
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            let mut pem = std::fs::read(cert).map_err(|e| {
                ConsulError::Setup(format!(
                    "cannot read the client certificate {}: {e} (consul.tls.certFile or CONSUL_CLIENT_CERT)",
                    cert.display()
                ))
            })?;
            pem.extend(std::fs::read(key).map_err(|e| {
                ConsulError::Setup(format!(
                    "cannot read the client key {}: {e} (consul.tls.keyFile or CONSUL_CLIENT_KEY)",
                    key.display()
                ))
            })?);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                ConsulError::Setup(format!(
                    "the client certificate {} or key {} is not valid PEM: {}",
                    cert.display(),
                    key.display(),
                    crate::error_chain(&e)
                ))
            })?;
            builder = builder.identity(identity);
        }
        if tls.insecure_skip_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        if let Some(name) = &tls.server_name {
            // Verify the certificate against `name` (and send it as SNI) while connecting to
            // the configured host: address the server by that name, and resolve the name to
            // the configured host anew for every connection, so that a host whose address
            // changes (a Service, a rescheduled node) is followed.
            let url = reqwest::Url::parse(&base)
                .map_err(|e| ConsulError::Setup(format!("{base} is not a URL: {e}")))?;
            let host = url
                .host_str()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_string();
            let port = url.port_or_known_default().unwrap_or(8501);
            builder = builder.dns_resolver(Arc::new(ServerNameResolver {
                server_name: name.clone(),
                host,
            }));
            base = format!("https://{name}:{port}");
        }
    } else {
        // Plain HTTP needs no trust store; an empty one keeps reqwest from loading the
        // system's (which fails in an image without a CA bundle).
        builder = builder.tls_certs_only(Vec::new());
    }
    let http = builder.build().map_err(|e| {
        ConsulError::Setup(format!(
            "the HTTP client for {base} could not be built: {}",
            crate::error_chain(&e)
        ))
    })?;
    Ok((http, base))
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Escapes a value for a double-quoted string of Consul's filter expressions.
fn filter_escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Escapes an ID for use as one URL path segment.
fn path_escape(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':' | b'@') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The node identity behind the address (see [`ConsulClient::verify_agent`]).
#[derive(Default)]
struct AgentIdentity {
    first: tokio::sync::OnceCell<String>,
    /// Set once a different agent answered: the message to stop with.
    fatal: tokio::sync::watch::Sender<Option<String>>,
    /// The token may not read `/v1/agent/self`; warned once.
    forbidden: std::sync::atomic::AtomicBool,
}

/// How many connections of its own each agent identity check reads the node name over.
const IDENTITY_SAMPLES: usize = 2;

/// How often the token file is looked at without a 403 to prompt it.
const TOKEN_RECHECK: Duration = Duration::from_secs(30);

/// The ACL token, and the file it came from: read again after a 403 and every [`TOKEN_RECHECK`]
/// (cheap: a small file), so a rotated Kubernetes Secret (updated in place through a symlink
/// swap) takes effect without a restart.
struct TokenSource {
    /// Set with `consul.login`: the token comes from logging in (`current` stays None).
    login: Option<login::Login>,
    file: Option<std::path::PathBuf>,
    current: std::sync::RwLock<Option<Secret>>,
    /// Counts token changes: instances registered with an older token are registered again,
    /// since the agent syncs each instance to the catalog with the token that registered it.
    generation: std::sync::atomic::AtomicU64,
    checked_at: std::sync::Mutex<Instant>,
}

impl TokenSource {
    fn new(
        token: Option<Secret>,
        file: Option<std::path::PathBuf>,
        login: Option<crate::manifest::LoginSettings>,
    ) -> Self {
        TokenSource {
            login: login.map(login::Login::new),
            file,
            current: std::sync::RwLock::new(token),
            generation: std::sync::atomic::AtomicU64::new(0),
            checked_at: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// The token to send, after looking at the file when it is due.
    fn current(&self) -> Option<Secret> {
        if self.file.is_some() {
            let due = {
                let mut at = self.checked_at.lock().unwrap_or_else(|p| p.into_inner());
                let due = at.elapsed() >= TOKEN_RECHECK;
                if due {
                    *at = Instant::now();
                }
                due
            };
            if due {
                self.reload_if_changed();
            }
        }
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the file again; a different, non-empty token replaces the current one.
    fn reload_if_changed(&self) {
        let Some(file) = &self.file else { return };
        let fresh = match std::fs::read_to_string(file) {
            Ok(t) if !t.trim().is_empty() => Secret::new(t.trim()),
            Ok(_) => {
                tracing::warn!(file = %file.display(), "the token file is empty; keeping the token read before");
                return;
            }
            Err(e) => {
                tracing::warn!(file = %file.display(), error = %e, "cannot read the token file; keeping the token read before");
                return;
            }
        };
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        if current.as_ref() != Some(&fresh) {
            tracing::info!(file = %file.display(), "the token file changed; using the new token");
            *current = Some(fresh);
            self.generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The CA certificates in the PEM bundle `path` (consul.tls.caFile or CONSUL_CACERT).
fn ca_bundle(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, ConsulError> {
    let pem = std::fs::read(path).map_err(|e| {
        ConsulError::Setup(format!(
            "cannot read the CA bundle {}: {e} (consul.tls.caFile or CONSUL_CACERT)",
            path.display()
        ))
    })?;
    reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        ConsulError::Setup(format!(
            "{} is not a PEM CA bundle: {} (consul.tls.caFile or CONSUL_CACERT)",
            path.display(),
            crate::error_chain(&e)
        ))
    })
}

/// The system's CA certificates (SSL_CERT_FILE / SSL_CERT_DIR, else the distribution's bundle),
/// for an https:// agent without a CA file of its own. None at all is an error that says what to
/// do: a distroless or scratch image has no bundle unless one is added.
fn system_roots(base: &str) -> Result<Vec<reqwest::Certificate>, ConsulError> {
    let found = rustls_native_certs::load_native_certs();
    let certs: Vec<reqwest::Certificate> = found
        .certs
        .iter()
        .filter_map(|der| reqwest::Certificate::from_der(der).ok())
        .collect();
    if certs.is_empty() {
        let why = match found.errors.first() {
            Some(e) => format!(" ({e})"),
            None => String::new(),
        };
        return Err(ConsulError::Setup(format!(
            "{base} uses HTTPS but no CA certificates were found to verify it: the system has no CA bundle{why}, looked at SSL_CERT_FILE, SSL_CERT_DIR and the usual system paths; set consul.tls.caFile (or CONSUL_CACERT) to the CA that signed Consul's certificate, or add a CA bundle to the image"
        )));
    }
    Ok(certs)
}

/// Resolves `server_name` to the configured Consul host at every connection (TLS then verifies
/// the certificate against `server_name`); every other name is resolved as usual.
struct ServerNameResolver {
    server_name: String,
    host: String,
}

impl reqwest::dns::Resolve for ServerNameResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let target = if name.as_str().eq_ignore_ascii_case(&self.server_name) {
            self.host.clone()
        } else {
            name.as_str().to_string()
        };
        Box::pin(async move {
            // The port is ignored: reqwest uses the URL's.
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((target.as_str(), 0))
                .await?
                .collect();
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// rustls needs a process-wide crypto provider; we ship `ring`. Installing twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_waits_are_spread_over_the_last_quarter_of_the_interval() {
        let wait = Duration::from_secs(60);
        let drawn: Vec<u128> = (0..2000)
            .map(|_| {
                let p = wait_param(wait);
                p.strip_suffix("ms").unwrap().parse().unwrap()
            })
            .collect();
        let (low, high) = (*drawn.iter().min().unwrap(), *drawn.iter().max().unwrap());
        assert!(low >= 45_000 && high <= 60_000, "{low}..{high}");
        // Spread, not one value: 2,000 draws cover most of the 15 s.
        assert!(high - low >= 12_000, "{low}..{high}");
    }

    #[test]
    fn ids_are_escaped_for_paths() {
        assert_eq!(path_escape("hello.ns.pod-1"), "hello.ns.pod-1");
        assert_eq!(
            path_escape("consul-registrar:a b"),
            "consul-registrar:a%20b"
        );
    }

    #[test]
    fn filter_values_are_escaped() {
        assert_eq!(filter_escape(r#"a"b\c"#), r#"a\"b\\c"#);
    }

    #[test]
    fn retryable_errors() {
        let s = |status| ConsulError::Status {
            operation: "x",
            status,
            body: String::new(),
        };
        assert!(s(500).is_retryable());
        assert!(s(429).is_retryable());
        assert!(!s(400).is_retryable());
        assert!(
            ConsulError::Forbidden {
                operation: "x",
                status: 403,
                body: String::new()
            }
            .is_retryable()
        );
    }

    /// A 403 in agent mode names only what docs/acl-login.md's agent policy grants (service:write,
    /// agent:read): a hint that asks for more sends users after permissions they do not need.
    #[test]
    fn agent_mode_403_hints_name_only_the_documented_policy() {
        for operation in ["register", "update_ttl", "deregister"] {
            assert_eq!(needed_permission(operation), "service:write on the service");
        }
        assert_eq!(
            needed_permission("agent_self"),
            "agent:read (agent_prefix \"\")"
        );
    }
}
