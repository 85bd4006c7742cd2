//! The admin HTTP server beside the data path: `/metrics`, `/healthz`, `/readyz`, `/drain` and
//! `/status`. It only reads shared state and starts drains; a bad request can't disturb the rest.
//!
//! - `GET /healthz`: 200 while the process and its runtime answer (liveness).
//! - `GET /readyz`: 200 while Consul holds the instances passing for the probe's current verdict
//!   (as the manifest's `readiness` rule counts them: all, any, or registered whatever the status)
//!   and no drain holds; 503 otherwise, with the reason. What Consul acknowledged last stands while
//!   Consul does not answer, so an outage alone does not take the pod out of its Service.
//! - `GET|POST /drain[?wait=true]`: starts the drain (202); with `wait=true` answers 200 only when
//!   every instance is deregistered (500 if that failed). GET is accepted because Kubernetes
//!   `preStop` `httpGet` hooks can only send GET. Only a caller holding the drain token (header
//!   `X-Drain-Token`, see [`DrainAuth`]) may drain; without a configured token, only a loopback
//!   peer. Anyone else gets 403, counted in `admin_requests_refused_total`.
//! - `GET /status`: JSON with each instance's probe verdict, Consul state and last errors.
//! - `GET /metrics`: Prometheus text format.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::consul::node_view::{self, NodeView, ViewRequest};
use crate::consul::shared::{self, Desk};
use crate::manifest::{Readiness, Secret};
use crate::metrics::Metrics;
use crate::shutdown::{DrainHandle, Origin, Phase};
use crate::status::StatusBoard;

/// The request header that carries the drain token.
pub const DRAIN_TOKEN_HEADER: &str = "X-Drain-Token";

/// How long requests in flight (a preStop's `/drain?wait=true`) may still be answered when the
/// sidecar stops: [`serve`] returns at most this long after it is told to stop.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub board: Arc<StatusBoard>,
    pub drain: DrainHandle,
    pub drain_auth: Arc<DrainAuth>,
    /// What `/readyz` requires of the instances in Consul.
    pub readiness: Readiness,
    /// With a shared session (catalog mode): the holder's desk, which answers heartbeats.
    pub desk: Option<Arc<Desk>>,
    /// With a shared session: the virtual node's view, which the holder lends its peers.
    pub view: Option<Arc<NodeView>>,
}

/// Who may start a drain: set from `CONSUL_REGISTRAR_DRAIN_TOKEN` or
/// `CONSUL_REGISTRAR_DRAIN_TOKEN_FILE` (the file wins when both are set).
#[derive(Debug, Clone)]
pub enum DrainAuth {
    /// No token configured: only a peer on loopback (inside the pod) may drain.
    LoopbackOnly,
    /// Callers must send the token in `X-Drain-Token`.
    Token(Secret),
    /// As `Token`, read from this file on every drain request, so that a mounted Secret that
    /// Kubernetes updates in place takes effect without a restart. Surrounding whitespace is
    /// ignored; an unreadable or empty file refuses every drain.
    TokenFile(PathBuf),
}

impl DrainAuth {
    /// From the environment variables' values; an empty token counts as none.
    pub fn from_settings(token: Option<String>, file: Option<PathBuf>) -> DrainAuth {
        match (token, file) {
            (_, Some(file)) => DrainAuth::TokenFile(file),
            (Some(token), None) if !token.trim().is_empty() => {
                DrainAuth::Token(Secret::new(token.trim()))
            }
            _ => DrainAuth::LoopbackOnly,
        }
    }

    /// Whether a request from `peer` with `presented` (the header's value) may drain; the reason
    /// (a metric label) when not.
    fn check(&self, peer: SocketAddr, presented: Option<&[u8]>) -> Result<(), &'static str> {
        let expected = match self {
            DrainAuth::LoopbackOnly => {
                return if peer.ip().to_canonical().is_loopback() {
                    Ok(())
                } else {
                    Err("not_loopback")
                };
            }
            DrainAuth::Token(secret) => secret.expose().to_string(),
            DrainAuth::TokenFile(path) => match std::fs::read_to_string(path) {
                Ok(text) if !text.trim().is_empty() => text.trim().to_string(),
                Ok(_) => {
                    tracing::error!(file = %path.display(), "the drain token file is empty; refusing every drain");
                    return Err("token_unreadable");
                }
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "cannot read the drain token file; refusing every drain");
                    return Err("token_unreadable");
                }
            },
        };
        match presented {
            None => Err("missing_token"),
            Some(p) if constant_time_eq(p, expected.as_bytes()) => Ok(()),
            Some(_) => Err("wrong_token"),
        }
    }
}

/// Compares without returning early, so the time taken does not tell how much of a guess was
/// right (only the length of the longer input shows).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    diff == 0
}

/// Serves on `listener` until `cancel`; then answers the requests in flight (a waiting
/// `/drain?wait=true` gets its answer) until [`SHUTDOWN_GRACE`] after `cancel`, and returns.
pub async fn serve(listener: TcpListener, state: AdminState, cancel: CancellationToken) {
    // One deadline for every connection: set when `cancel` comes.
    let (grace_tx, grace) = tokio::sync::watch::channel(None::<tokio::time::Instant>);
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "admin server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let cancel = cancel.clone();
        let mut grace = grace.clone();
        connections.spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(req, peer, &state).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = cancel.cancelled() => {}
            }
            // Finish the request in flight, if any, then close: until the one deadline.
            conn.as_mut().graceful_shutdown();
            let deadline = match grace.wait_for(Option::is_some).await {
                Ok(d) => (*d).unwrap_or_else(tokio::time::Instant::now),
                Err(_) => return,
            };
            let _ = tokio::time::timeout_at(deadline, conn).await;
        });
    }
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    grace_tx.send_replace(Some(deadline));
    let _ = tokio::time::timeout_at(deadline, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    // Whatever is still open is dropped (aborted) with the set.
}

type Reply = Response<Full<Bytes>>;

async fn route(req: Request<Incoming>, peer: SocketAddr, state: &AdminState) -> Reply {
    let path = req.uri().path();
    let allowed: &[Method] = match path {
        "/drain" => &[Method::GET, Method::POST],
        shared::PATH if state.desk.is_some() => &[Method::POST],
        node_view::PATH if state.desk.is_some() && state.view.is_some() => &[Method::POST],
        "/metrics" | "/healthz" | "/readyz" | "/status" => &[Method::GET, Method::HEAD],
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    if !allowed.contains(req.method()) {
        let allow = allowed
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        if let Ok(v) = allow.parse() {
            r.headers_mut().insert(ALLOW, v);
        }
        return r;
    }
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => readiness(state),
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(state.metrics.render())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/status" => status(state),
        shared::PATH => heartbeat(req, state).await,
        node_view::PATH => lend_view(req, state).await,
        _ => {
            let presented = req.headers().get(DRAIN_TOKEN_HEADER).map(|v| v.as_bytes());
            if let Err(reason) = state.drain_auth.check(peer, presented) {
                state
                    .metrics
                    .admin_refused
                    .with_label_values(&["drain", reason])
                    .inc();
                tracing::warn!(%peer, reason, "drain request refused");
                return text(StatusCode::FORBIDDEN, "forbidden\n");
            }
            drain(req.uri().query().unwrap_or_default(), state).await
        }
    }
}

/// A peer's heartbeat to the holder of the shared session (see [`crate::consul::shared`]).
async fn heartbeat(req: Request<Incoming>, state: &AdminState) -> Reply {
    let Some(desk) = &state.desk else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let presented = presented_session(&req);
    let body = match peer_body(req, "heartbeat too large\n").await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    desk_reply(desk.answer(presented.as_deref(), &body))
}

/// A peer's long poll of the holder's view of the virtual node (see
/// [`crate::consul::node_view`]): the same credential as a heartbeat, and only the instances
/// whose keys the holder covers for the asking pod.
async fn lend_view(req: Request<Incoming>, state: &AdminState) -> Reply {
    let (Some(desk), Some(view)) = (&state.desk, &state.view) else {
        return text(StatusCode::NOT_FOUND, "not found\n");
    };
    let Some(_poll) = view.poll() else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests for the node view: read Consul\n",
        );
    };
    if let Err(refused) = desk.admits(presented_session(&req).as_deref()) {
        let status =
            StatusCode::from_u16(refused.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return text(status, &refused.body);
    }
    let arrived = std::time::Instant::now();
    let body = match peer_body(req, "request too large\n").await {
        Ok(b) => b,
        Err(refused) => return refused,
    };
    let asked: ViewRequest = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                &format!("not a view request: {e}\n"),
            );
        }
    };
    let ids = desk.covered_ids(&asked.pod_uid, &asked.keys);
    // Another epoch's generation means nothing here: the current snapshot.
    let after = if asked.epoch == view.epoch() {
        asked.after
    } else {
        0
    };
    // The asker's last write, on our clock: the request's transit moves it later, by about as
    // much as the write's own way to the servers and back, which the snapshot that shows the
    // write was read after; the margin keeps that snapshot from looking older than the write.
    let written = asked.written_ms_ago.map(|ago| {
        arrived
            .checked_sub(Duration::from_millis(ago) + node_view::WRITE_MARGIN)
            .unwrap_or(arrived)
    });
    let wait = Duration::from_millis(asked.wait_ms).min(node_view::POLL);
    let Some(snapshot) = view.newer(after, written, wait).await else {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no view of the node: read Consul\n",
        );
    };
    desk_reply(shared::Answer {
        status: 200,
        body: serde_json::to_string(&snapshot.part(view.epoch(), &ids)).unwrap_or_default(),
    })
}

/// The shared session's ID a peer presented (`X-Consul-Registrar-Session`).
fn presented_session(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(shared::SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// A peer's request body, small by nature (a pod's keys), or the 413 (`too_large`) past 64 KiB.
async fn peer_body(req: Request<Incoming>, too_large: &str) -> Result<Bytes, Reply> {
    use http_body_util::BodyExt as _;
    http_body_util::Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|_| text(StatusCode::PAYLOAD_TOO_LARGE, too_large))
}

/// The holder's answer to a peer: JSON when 200, its text otherwise.
fn desk_reply(answer: shared::Answer) -> Reply {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = Response::new(Full::new(Bytes::from(answer.body)));
    *r.status_mut() = status;
    if status == StatusCode::OK {
        r.headers_mut().insert(
            CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/json"),
        );
    }
    r
}

fn readiness(state: &AdminState) -> Reply {
    match state.drain.phase() {
        Phase::Running => match state.board.readiness(state.readiness) {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {why}\n"),
            ),
        },
        Phase::Draining => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n"),
        _ => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: drained\n"),
    }
}

fn status(state: &AdminState) -> Reply {
    let phase = match state.drain.phase() {
        Phase::Running => "running".to_string(),
        Phase::Draining => "draining".to_string(),
        Phase::Drained => "drained".to_string(),
        Phase::Failed(e) => format!("drain failed: {e}"),
    };
    let body = serde_json::json!({
        "phase": phase,
        "instances": state.board.snapshot(),
    });
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn drain(query: &str, state: &AdminState) -> Reply {
    let wait = query
        .split('&')
        .any(|kv| matches!(kv, "wait=true" | "wait=1" | "wait"));
    let ticket = state.drain.request(Origin::Admin);
    if ticket.started {
        tracing::info!(wait, "drain requested over the admin endpoint");
    }
    if !wait {
        return text(StatusCode::ACCEPTED, "draining\n");
    }
    match state.drain.finished(ticket).await {
        Phase::Failed(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
        _ => text(StatusCode::OK, "drained\n"),
    }
}

fn text(status: StatusCode, body: &str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().expect("ip"), 40000)
    }

    #[test]
    fn without_a_token_only_loopback_peers_may_drain() {
        let auth = DrainAuth::from_settings(Some("  ".into()), None);
        assert!(auth.check(peer("127.0.0.1"), None).is_ok());
        assert!(auth.check(peer("::1"), None).is_ok());
        assert!(auth.check(peer("::ffff:127.0.0.1"), None).is_ok());
        assert_eq!(auth.check(peer("10.0.0.7"), None), Err("not_loopback"));
        assert_eq!(
            auth.check(peer("10.0.0.7"), Some(b"anything")),
            Err("not_loopback")
        );
    }

    #[test]
    fn with_a_token_every_peer_needs_it() {
        let auth = DrainAuth::from_settings(Some("s3cret\n".into()), None);
        assert_eq!(auth.check(peer("127.0.0.1"), None), Err("missing_token"));
        assert_eq!(
            auth.check(peer("10.0.0.7"), Some(b"s3cre")),
            Err("wrong_token")
        );
        assert_eq!(
            auth.check(peer("10.0.0.7"), Some(b"s3cret!")),
            Err("wrong_token")
        );
        assert!(auth.check(peer("10.0.0.7"), Some(b"s3cret")).is_ok());
        assert!(!format!("{auth:?}").contains("s3cret"));
    }

    #[test]
    fn a_token_file_is_read_on_every_request() {
        let dir = std::env::temp_dir().join(format!("drain-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("token");
        let auth = DrainAuth::from_settings(Some("ignored".into()), Some(file.clone()));
        assert_eq!(
            auth.check(peer("127.0.0.1"), Some(b"ignored")),
            Err("token_unreadable")
        );
        std::fs::write(&file, "one\n").expect("write");
        assert!(auth.check(peer("10.0.0.7"), Some(b"one")).is_ok());
        std::fs::write(&file, "two").expect("write");
        assert_eq!(
            auth.check(peer("10.0.0.7"), Some(b"one")),
            Err("wrong_token")
        );
        assert!(auth.check(peer("10.0.0.7"), Some(b"two")).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
