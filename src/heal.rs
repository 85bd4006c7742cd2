//! Healing a drain that no termination follows. The kubelet runs the app's preStop hook (our
//! `/drain`) not only before deleting a pod but also before restarting an app container whose
//! liveness or startup probe failed; after such a restart nothing would ever put the instances back.
//!
//! The rule: after a drain that came from `/drain` (not from a signal), once the app's health
//! port has been seen gone (a TCP connection to it is refused: the process is not there) and then
//! every instance's health service answers SERVING `successThreshold` times in a row, the app
//! has been restarted and serves again: the drain is cancelled and the instances registered
//! again. A pod being deleted never gets there: its app goes away and does not come back, and
//! SIGTERM (which makes a drain final) follows. An app that never goes away (an operator's manual
//! `/drain`) stays drained.
//!
//! Seeing "gone" must not depend on sampling: the kubelet kills and starts the container in one
//! sync, so the port can be closed for well under a second. So the watch holds a connection to the
//! app (an idle HTTP/2 connection, over TLS when the probe uses TLS; no stream, so it never holds
//! the app's graceful shutdown up) and tries the port as soon as that connection ends: a process
//! that exits, or a server that shuts down, ends it, and its port is refused from moments later
//! (the kernel lets go of the listening socket just after the connections) until the new process
//! listens. A connection that ends while the port keeps answering (an idle timeout of the
//! server's) is held again. The port is also tried every [`POLL`], for servers where no connection
//! can be held.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::manifest::HealthSpec;
use crate::probe::{self, HealthRpc, TcpWatcher, WatchedConnector};

/// How often the app's health port is tried while a drain may heal.
pub const POLL: Duration = Duration::from_millis(200);

/// The least time between two attempts to hold a connection to the app.
const HOLD_RETRY: Duration = Duration::from_secs(1);

/// After the held connection ended, the port is tried every `SETTLE_EVERY` for `SETTLE`.
const SETTLE: Duration = Duration::from_millis(100);
const SETTLE_EVERY: Duration = Duration::from_millis(2);

/// Resolves once every probe target (address and port) has been seen gone and then serving again
/// (every instance on it SERVING `successThreshold` times in a row). Runs until then: the caller
/// drops it when the drain becomes final.
pub async fn gone_and_back(specs: &[HealthSpec]) {
    let mut targets: Vec<(String, u16, Vec<&HealthSpec>)> = Vec::new();
    for spec in specs {
        match targets
            .iter_mut()
            .find(|(a, p, _)| *a == spec.address && *p == spec.port)
        {
            Some((_, _, instances)) => instances.push(spec),
            None => targets.push((spec.address.clone(), spec.port, vec![spec])),
        }
    }
    futures_util::future::join_all(
        targets
            .iter()
            .map(|(address, port, instances)| target_gone_and_back(address, *port, instances)),
    )
    .await;
}

async fn target_gone_and_back(address: &str, port: u16, instances: &[&HealthSpec]) {
    let connect_timeout = instances
        .iter()
        .map(|s| s.timeout)
        .min()
        .unwrap_or(Duration::from_secs(1));
    let needed = instances
        .iter()
        .map(|s| s.success_threshold.max(1))
        .max()
        .unwrap_or(1);
    let Some(first) = instances.first() else {
        return;
    };
    went_away(first, connect_timeout).await;
    tracing::info!(%address, port, "the app's health port is closed: the app went away; the drain heals if it comes back serving");
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut streak = 0;
    loop {
        ticker.tick().await;
        let mut all = true;
        for spec in instances {
            if !serving(spec).await {
                all = false;
                break;
            }
        }
        streak = if all { streak + 1 } else { 0 };
        if streak >= needed {
            tracing::info!(%address, port, "the app is back and serving");
            return;
        }
    }
}

/// One unary `Check` on a fresh connection: SERVING or not (any error counts as not).
async fn serving(spec: &HealthSpec) -> bool {
    let Ok(endpoint) = probe::endpoint_for(spec) else {
        return false;
    };
    let ask = async {
        let channel = endpoint.connect().await.ok()?;
        let answer = HealthRpc::new(channel)
            .check(HealthCheckRequest {
                service: spec.service.clone(),
            })
            .await
            .ok()?;
        Some(answer.into_inner().status == ServingStatus::Serving as i32)
    };
    matches!(
        tokio::time::timeout(spec.timeout * 2, ask).await,
        Ok(Some(true))
    )
}

/// Resolves once a TCP connection to the health port of `spec` (one of the instances on that
/// target) is refused (or times out): within milliseconds when the connection held to the app
/// ends and the port closes, else at a [`POLL`].
async fn went_away(spec: &HealthSpec, connect_timeout: Duration) {
    let (address, port) = (spec.address.as_str(), spec.port);
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut held: Option<Held> = None;
    let mut last_hold: Option<Instant> = None;
    loop {
        if held.is_none() && last_hold.is_none_or(|at| at.elapsed() >= HOLD_RETRY) {
            last_hold = Some(Instant::now());
            held = Held::open(spec, connect_timeout).await;
        }
        let ended = held.as_ref().map(|h| h.ended.clone());
        tokio::select! {
            _ = ticker.tick() => {
                if port_closed(address, port, connect_timeout).await {
                    return;
                }
            }
            () = async {
                match ended {
                    Some(ended) => ended.cancelled().await,
                    None => std::future::pending().await,
                }
            } => {
                held = None;
                // A process that exits closes its connections before the kernel lets go of its
                // listening socket, which still completes handshakes meanwhile: so the port is
                // tried for a while, not once.
                let until = Instant::now() + SETTLE;
                loop {
                    if port_closed(address, port, connect_timeout).await {
                        return;
                    }
                    if Instant::now() >= until {
                        break;
                    }
                    tokio::time::sleep(SETTLE_EVERY).await;
                }
                tracing::debug!(%address, port, "the connection held to the app ended, but its port still answers: holding a new one");
            }
        }
    }
}

/// True if a TCP connection to the port is refused or does not come within `timeout`.
async fn port_closed(address: &str, port: u16, timeout: Duration) -> bool {
    !tokio::time::timeout(timeout, TcpStream::connect((address, port)))
        .await
        .is_ok_and(|r| r.is_ok())
}

/// A connection to the app, held open with no stream on it, and the token cancelled when it ends.
struct Held {
    _channel: Channel,
    ended: CancellationToken,
}

impl Held {
    /// Connects the way the probe does (HTTP/2, TLS if the probe uses it); None if that fails.
    async fn open(spec: &HealthSpec, timeout: Duration) -> Option<Held> {
        let endpoint = probe::endpoint_for(spec).ok()?;
        let ended = CancellationToken::new();
        let token = ended.clone();
        let connector = WatchedConnector(move || EndWatch(token.clone()));
        match tokio::time::timeout(timeout, endpoint.connect_with_connector(connector)).await {
            Ok(Ok(channel)) => Some(Held {
                _channel: channel,
                ended,
            }),
            _ => None,
        }
    }
}

/// Cancels its token when the connection ends: the server closed it, it failed, or it was dropped.
struct EndWatch(CancellationToken);

impl TcpWatcher for EndWatch {
    fn closed(&mut self) {
        self.0.cancel();
    }

    fn dropped(&mut self) {
        self.0.cancel();
    }
}
