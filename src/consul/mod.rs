//! The Consul agent HTTP API, as much of it as the sidecar needs: register, update a TTL check,
//! deregister, read and watch one service. The client owns the HTTP details (base URL, TLS, the
//! ACL token header, namespaces) and records every call in the metrics.

pub mod registration;

use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use tokio::sync::Semaphore;

use crate::manifest::{ConsulConnection, Secret};
use crate::metrics::Metrics;
pub use registration::{AgentService, AgentServiceRegistration, CheckStatus, Drift};

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
        "Consul refused {operation} (HTTP 403, permission denied: {body}); check the ACL token: it needs service:write on the service, node:read and agent:read"
    )]
    Forbidden {
        operation: &'static str,
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
    #[error("cannot set up the Consul client: {0}")]
    Setup(String),
}

impl ConsulError {
    /// Whether the same call may succeed later. Everything but a malformed request (4xx other
    /// than 403/404/429) is worth retrying: Consul restarts, elects leaders, and tokens get fixed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ConsulError::Status { status, .. } => *status == 429 || *status >= 500,
            ConsulError::Setup(_) => false,
            _ => true,
        }
    }
}

/// A client for one Consul agent.
#[derive(Clone)]
pub struct ConsulClient {
    http: reqwest::Client,
    base: Arc<str>,
    token: Option<Secret>,
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
    body: Vec<u8>,
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
        install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(MAX_IDLE_CONNECTIONS)
            .http1_only()
            .no_proxy();
        let mut base = conn.address.clone();
        let tls = &conn.tls;
        if base.starts_with("https://") {
            if let Some(ca) = &tls.ca_file {
                let pem = std::fs::read(ca).map_err(|e| {
                    ConsulError::Setup(format!("cannot read {}: {e}", ca.display()))
                })?;
                let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    ConsulError::Setup(format!("{} is not a PEM CA bundle: {e}", ca.display()))
                })?;
                builder = builder.tls_certs_only(certs);
            }
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                let mut pem = std::fs::read(cert).map_err(|e| {
                    ConsulError::Setup(format!("cannot read {}: {e}", cert.display()))
                })?;
                pem.extend(std::fs::read(key).map_err(|e| {
                    ConsulError::Setup(format!("cannot read {}: {e}", key.display()))
                })?);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                    ConsulError::Setup(format!("client certificate or key is not valid PEM: {e}"))
                })?;
                builder = builder.identity(identity);
            }
            if tls.insecure_skip_verify {
                builder = builder.tls_danger_accept_invalid_certs(true);
            }
            if let Some(name) = &tls.server_name {
                // Verify the certificate against `name` while connecting to the configured host:
                // address the server by that name and pin the name to the real socket address.
                let url =
                    reqwest::Url::parse(&base).map_err(|e| ConsulError::Setup(e.to_string()))?;
                let host = url.host_str().unwrap_or_default().trim_matches(['[', ']']);
                let port = url.port_or_known_default().unwrap_or(8501);
                let addr = (host, port)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| ConsulError::Setup(format!("cannot resolve {host}:{port}")))?;
                builder = builder.resolve(name, addr);
                base = format!("https://{name}:{port}");
            }
        }
        let http = builder
            .build()
            .map_err(|e| ConsulError::Setup(e.to_string()))?;
        let mut scope = Vec::new();
        if let Some(ns) = &conn.namespace {
            scope.push(("ns", ns.clone()));
        }
        if let Some(p) = &conn.partition {
            scope.push(("partition", p.clone()));
        }
        Ok(ConsulClient {
            http,
            base: base.into(),
            token: conn.token.clone(),
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
                    .query(&[("hash", h), ("wait", &format!("{}ms", wait.as_millis()))]),
                // Consul adds up to wait/16 of jitter; leave room for it and the network.
                wait + wait / 8 + Duration::from_secs(5),
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

    /// `GET /v1/status/leader`: the raft leader's address, empty while there is none.
    pub async fn leader(&self) -> Result<String, ConsulError> {
        let req = self.request(Method::GET, "/v1/status/leader");
        let answer = self.send("leader", req, REQUEST_TIMEOUT).await?;
        serde_json::from_slice::<String>(&answer.body).map_err(|e| ConsulError::Decode {
            operation: "leader",
            reason: e.to_string(),
        })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
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
        Box::pin(self.send_now(operation, req, timeout)).await
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
        let blocking = operation == "watch_service";
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
        if status.is_success() {
            let content_hash = resp
                .headers()
                .get("X-Consul-ContentHash")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = resp
                .bytes()
                .await
                .map_err(|e| self.unreachable(operation, &e))?;
            return Ok(Answer {
                content_hash,
                body: body.to_vec(),
            });
        }
        let body = resp.text().await.unwrap_or_default();
        let body = body.trim().chars().take(300).collect::<String>();
        Err(if status == StatusCode::FORBIDDEN {
            ConsulError::Forbidden { operation, body }
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
            reason: error_chain(e),
        }
    }

    fn record(&self, operation: &str, class: &str) {
        self.metrics
            .consul_requests
            .with_label_values(&[operation, class])
            .inc();
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The error and its causes on one line (reqwest's top-level message alone says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
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

/// rustls needs a process-wide crypto provider; we ship `ring`. Installing twice is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_escaped_for_paths() {
        assert_eq!(path_escape("hello.ns.pod-1"), "hello.ns.pod-1");
        assert_eq!(
            path_escape("consul-registrar:a b"),
            "consul-registrar:a%20b"
        );
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
                body: String::new()
            }
            .is_retryable()
        );
    }
}
