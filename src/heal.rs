//! Healing a drain that no termination follows. The kubelet runs the app's preStop hook (our
//! `/drain`) not only before deleting a pod but also before restarting an app container whose
//! liveness or startup probe failed; after such a restart nothing would ever put the instances back.
//!
//! The rule: a drain that came from `/drain` (not from a signal) heals when one of the app's health
//! targets (address and port) was restarted after the drain began — seen up (it accepted a
//! connection), then gone (a connection to it is refused: the process is not there), then
//! answering its health service again. The instances are then registered again, each with its own
//! verdict (a service that answers NOT_SERVING comes back critical, and a target in another
//! container that never restarted comes back too): the pod is not going away. A pod being deleted
//! never gets there: its app goes away and does not come back, and SIGTERM (which makes a drain
//! final) follows. An app that never goes away (an operator's manual `/drain`) stays drained.
//!
//! "Seen up after the drain began" is what keeps a deletion from healing when the pod's app was
//! still starting: its port was closed when the preStop drained, it opens during the drain delay,
//! and the kubelet stops it once the preStop has answered. Without the first sighting, closed-then-
//! serving would pass for a restart, and the instance would be put back for an app about to stop.
//! (The price: a startup-probe restart of an app whose port never opened is not seen as a restart;
//! its drain stays until the app is restarted again or the pod ends.)
//!
//! Seeing "gone" must not depend on sampling: the kubelet kills and starts the container in one
//! sync, so the port can be closed for well under a second. So the watch holds a connection to the
//! app (an idle HTTP/2 connection, over TLS when the probe uses TLS; no stream, so it never holds
//! the app's graceful shutdown up) and tries the port as soon as that connection ends: a process
//! that exits, or a server that shuts down, ends it, and its port is refused from moments later
//! (the kernel lets go of the listening socket just after the connections) until the new process
//! listens. A connection that ends while the port keeps answering (an idle timeout of the
//! server's) is held again. While no connection is held the port is tried every [`POLL`]; while one
//! is, every [`HELD_POLL`] only (a target on another host can vanish without closing it). Once the
//! target is gone, one channel per target asks its health service every [`POLL`]: one connection
//! per target, not one per instance.

use std::time::Duration;

use futures_util::future::select_all;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;

use crate::manifest::HealthSpec;
use crate::probe::{self, HealthRpc, TcpWatcher, WatchedConnector};

/// How often the app's health port is tried while no connection to it is held, and how often a
/// gone target's health service is asked.
pub const POLL: Duration = Duration::from_millis(200);

/// How often the port is tried while a connection to it is held.
const HELD_POLL: Duration = Duration::from_secs(5);

/// The least time between two attempts to hold a connection to the app.
const HOLD_RETRY: Duration = Duration::from_secs(1);

/// After the held connection ended, the port is tried every `SETTLE_EVERY` for `SETTLE`.
const SETTLE: Duration = Duration::from_millis(100);
const SETTLE_EVERY: Duration = Duration::from_millis(2);

/// Resolves once one probe target (address and port) was restarted after the call: seen up,
/// then gone, then answering its health service again. Runs until then: the caller drops it when
/// the drain becomes final.
pub async fn restarted(specs: &[HealthSpec]) {
    let mut targets: Vec<&HealthSpec> = Vec::new();
    for spec in specs {
        if !targets
            .iter()
            .any(|t| t.address == spec.address && t.port == spec.port)
        {
            targets.push(spec);
        }
    }
    if targets.is_empty() {
        return std::future::pending().await;
    }
    let watches = targets
        .into_iter()
        .map(|spec| Box::pin(target_restarted(spec)));
    select_all(watches).await;
}

/// Seen up, gone, back: one target (`spec` is the first instance probed on it).
async fn target_restarted(spec: &HealthSpec) {
    let (address, port) = (spec.address.as_str(), spec.port);
    went_away(spec).await;
    tracing::info!(%address, port, "the app's health port closed after the drain began (the app was up, and went away); the drain heals if it comes back");
    answers_again(spec).await;
    tracing::info!(%address, port, "the app is back: it answers its health service again");
}

/// Asks the health service of `spec` every [`POLL`] over one channel until the target answers at
/// all: any status (each instance's verdict is the probe's business), or NOT_FOUND for a service
/// it does not know. The channel is made now, after the target went away, so that nothing held
/// over from the old process answers.
async fn answers_again(spec: &HealthSpec) {
    let Ok(endpoint) = probe::endpoint_for(spec) else {
        return std::future::pending().await;
    };
    let mut rpc = HealthRpc::new(endpoint.connect_lazy());
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let ask = rpc.check(HealthCheckRequest {
            service: spec.service.clone(),
        });
        match tokio::time::timeout(spec.timeout * 2, ask).await {
            Ok(Ok(_)) => return,
            Ok(Err(status)) if matches!(status.code(), Code::NotFound) => return,
            _ => {}
        }
    }
}

/// Resolves once the target of `spec` was seen up (a connection to it held, or its port
/// accepting one) and then gone (a TCP connection refused, or reset as it is made; one not made
/// within the probe's timeout proves nothing): within milliseconds when the connection held to
/// the app ends and the port closes, else at a poll.
async fn went_away(spec: &HealthSpec) {
    let (address, port, connect_timeout) = (spec.address.as_str(), spec.port, spec.timeout);
    let mut seen_up = false;
    let mut held: Option<Held> = None;
    let mut last_hold: Option<Instant> = None;
    let mut last_poll = Instant::now();
    loop {
        if held.is_none() && last_hold.is_none_or(|at| at.elapsed() >= HOLD_RETRY) {
            last_hold = Some(Instant::now());
            held = Held::open(spec, connect_timeout).await;
            if held.is_some() && !seen_up {
                seen_up = true;
                tracing::debug!(%address, port, "the app is up: holding a connection to it");
            }
        }
        let every = if held.is_some() { HELD_POLL } else { POLL };
        let ended = held.as_ref().map(|h| h.ended.clone());
        tokio::select! {
            () = tokio::time::sleep_until(last_poll + every) => {
                last_poll = Instant::now();
                match try_port(address, port, connect_timeout).await {
                    Port::Refused if seen_up => return,
                    Port::Accepted => seen_up = true,
                    Port::Refused | Port::NoAnswer => {}
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
                    if try_port(address, port, connect_timeout).await == Port::Refused {
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

/// What a TCP connection to a port found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    /// It was made: something listens.
    Accepted,
    /// It was refused: nothing listens (the process is not there); or reset as it was made: a
    /// proxy in front (a service mesh's) accepted it and found nothing behind.
    Refused,
    /// Neither within the timeout, or another error (an app too busy to accept, a lossy path):
    /// proves nothing either way.
    NoAnswer,
}

async fn try_port(address: &str, port: u16, timeout: Duration) -> Port {
    match tokio::time::timeout(timeout, TcpStream::connect((address, port))).await {
        Ok(Ok(_)) => Port::Accepted,
        Ok(Err(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            ) =>
        {
            Port::Refused
        }
        _ => Port::NoAnswer,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a refusal is "gone": a connection that does not come in time (a listener whose
    /// backlog is full drops the handshake: an app too busy to accept) is not a process that exited.
    #[tokio::test]
    async fn only_a_refused_connection_counts_as_gone_not_a_slow_one() {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let listener = socket.listen(1).expect("listen");
        let port = listener.local_addr().expect("address").port();
        // Fill the accept queue (never accepted) until a handshake no longer completes.
        let mut held = Vec::new();
        let full = loop {
            match tokio::time::timeout(
                Duration::from_millis(300),
                TcpStream::connect(("127.0.0.1", port)),
            )
            .await
            {
                Ok(Ok(stream)) if held.len() < 64 => held.push(stream),
                Ok(Ok(_)) => break false,
                Ok(Err(e)) => panic!("connect: {e}"),
                Err(_) => break true,
            }
        };
        assert!(full, "the listener's backlog never filled");
        assert_eq!(
            try_port("127.0.0.1", port, Duration::from_millis(300)).await,
            Port::NoAnswer,
            "a handshake that did not come in time counted as the app gone (or up)"
        );
        drop(held);
        drop(listener);
        assert_eq!(
            try_port("127.0.0.1", port, Duration::from_millis(300)).await,
            Port::Refused
        );
    }
}
