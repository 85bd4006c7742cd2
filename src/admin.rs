//! The admin HTTP server beside the data path: `/metrics`, `/healthz`, `/readyz`, `/drain` and
//! `/status`. It only reads shared state and starts drains; a bad request can't disturb the rest.
//!
//! - `GET /healthz`: 200 while the process and its runtime answer (liveness).
//! - `GET /readyz`: 200 once every instance has been registered at least once and no drain has
//!   started; 503 otherwise, with the reason.
//! - `GET|POST /drain[?wait=true]`: starts the drain (202); with `wait=true` answers 200 only when
//!   every instance is deregistered (500 if that failed). GET is accepted because Kubernetes
//!   `preStop` `httpGet` hooks can only send GET.
//! - `GET /status`: JSON with each instance's probe verdict, Consul state and last errors.
//! - `GET /metrics`: Prometheus text format.

use std::convert::Infallible;
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
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::shutdown::{DrainHandle, Phase};
use crate::status::StatusBoard;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub board: Arc<StatusBoard>,
    pub drain: DrainHandle,
}

/// Serves on `listener` until `cancel`.
pub async fn serve(listener: TcpListener, state: AdminState, cancel: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = cancel.cancelled() => return,
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
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(req, &state).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(64 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
}

type Reply = Response<Full<Bytes>>;

async fn route(req: Request<Incoming>, state: &AdminState) -> Reply {
    let path = req.uri().path();
    let allowed: &[Method] = match path {
        "/drain" => &[Method::GET, Method::POST],
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
        _ => drain(req.uri().query().unwrap_or_default(), state).await,
    }
}

fn readiness(state: &AdminState) -> Reply {
    match state.drain.phase() {
        Phase::Running if state.board.all_registered_once() => text(StatusCode::OK, "ready\n"),
        Phase::Running => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not every instance has been registered yet\n",
        ),
        _ => text(StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n"),
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
    if state.drain.request() {
        tracing::info!(wait, "drain requested over the admin endpoint");
    }
    if !wait {
        return text(StatusCode::ACCEPTED, "draining\n");
    }
    match state.drain.finished().await {
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
