//! Wires the parts together for `consul-registrar run`: one probe and one reconciler per instance,
//! the drainer, the admin server and the signal handler, all stopped through one cancellation
//! token. Returns when the sidecar has drained after a signal.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::consul::{ConsulClient, ConsulError};
use crate::manifest::Manifest;
use crate::metrics::Metrics;
use crate::probe::{self, HealthProbe, ProbeSetupError, Verdict};
use crate::reconcile::{AntiEntropy, Reconciler};
use crate::shutdown::{DrainHandle, Drainer, Phase};
use crate::status::StatusBoard;

/// Why the sidecar could not run or did not finish cleanly.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Consul(#[from] ConsulError),
    #[error(transparent)]
    Probe(#[from] ProbeSetupError),
    #[error("cannot listen on the admin address {address}: {source}")]
    Admin {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("drain incomplete: {0}")]
    DrainFailed(String),
    /// A set-up the sidecar cannot work with, found while running (e.g. an address over several
    /// Consul agents). Exit code 78.
    #[error("{0}")]
    Configuration(String),
}

impl SidecarError {
    /// Whether the set-up must change before a restart can help (exit code 78, EX_CONFIG).
    pub fn is_configuration(&self) -> bool {
        matches!(self, SidecarError::Configuration(_))
    }
}

/// Runs the sidecar until a signal has drained it.
pub async fn run(manifest: Manifest, admin_address: SocketAddr) -> Result<(), SidecarError> {
    let metrics = Metrics::new();
    let board = StatusBoard::new(
        manifest
            .services
            .iter()
            .map(|s| (s.id.as_str(), s.name.as_str())),
    );
    let client = ConsulClient::new(&manifest.consul, Arc::clone(&metrics))?;
    let drain = DrainHandle::new();
    let everything = CancellationToken::new();
    let _stop_everything = everything.clone().drop_guard();
    let sync = everything.child_token();

    let listener =
        TcpListener::bind(admin_address)
            .await
            .map_err(|source| SidecarError::Admin {
                address: admin_address,
                source,
            })?;
    let signals = Signals::new([SIGTERM, SIGINT]).map_err(SidecarError::Signals)?;
    tracing::info!(
        admin = %listener.local_addr().unwrap_or(admin_address),
        consul = %client.address(),
        instances = manifest.services.len(),
        "consul-registrar started"
    );
    tokio::spawn(admin::serve(
        listener,
        AdminState {
            metrics: Arc::clone(&metrics),
            board: Arc::clone(&board),
            drain: drain.clone(),
        },
        everything.child_token(),
    ));

    // Probes of the same target share one HTTP/2 connection.
    let mut channels = HashMap::new();
    let mut reconcilers = Vec::with_capacity(manifest.services.len());
    let alarm = AntiEntropy::alarm();
    for (i, spec) in manifest.services.iter().enumerate() {
        let key = format!(
            "{}|{}|{:?}",
            spec.health.address, spec.health.port, spec.health.tls
        );
        let channel = match channels.get(&key) {
            Some(c) => Clone::clone(c),
            None => {
                let c = probe::channel_for(&spec.health)?;
                channels.insert(key, c.clone());
                c
            }
        };
        let (verdict_tx, verdict_rx) = watch::channel(Verdict::waiting());
        let probe = HealthProbe::new(
            spec.health.clone(),
            channel,
            &spec.name,
            &spec.id,
            Arc::clone(&metrics),
            board.entry(i),
        );
        tokio::spawn(probe.run(verdict_tx, everything.child_token()));
        let reconciler = Reconciler::new(
            spec.clone(),
            client.clone(),
            Arc::clone(&metrics),
            board.entry(i),
            manifest.consul.retry,
            manifest.consul.resync_interval,
            AntiEntropy::member(&alarm, i < manifest.consul.blocking_watches),
        );
        reconcilers.push(tokio::spawn(reconciler.run(verdict_rx, sync.clone())));
    }

    let several_agents = client.clone();
    tokio::spawn(
        Drainer {
            handle: drain.clone(),
            client,
            services: manifest.services.clone(),
            policy: manifest.drain,
            retry: manifest.consul.retry,
            metrics,
            board,
            sync,
            reconcilers,
        }
        .run(),
    );

    // The first signal starts the drain (or finds it done after /drain); a second one skips the
    // rest of the drain delay. The process ends when a signal has come and the drain is over.
    let signals_handle = signals.handle();
    let mut signals = signals.fuse();
    let mut signalled = false;
    let outcome = loop {
        tokio::select! {
            // Calls reach several agents: nothing the sidecar does can be trusted to stick. Stop
            // (the TTL checks expire and Consul removes the copies after
            // deregisterCriticalServiceAfter) with the error that says what to change.
            message = several_agents.several_agents() => {
                signals_handle.close();
                return Err(SidecarError::Configuration(message));
            }
            Some(sig) = signals.next() => {
                let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
                if !signalled {
                    signalled = true;
                    if drain.request() {
                        tracing::info!(signal = name, "signal received: draining");
                    }
                } else {
                    tracing::info!(signal = name, "another signal received");
                    drain.skip_delay();
                }
            }
            phase = drain.finished(), if signalled => break phase,
        }
    };
    signals_handle.close();
    match outcome {
        Phase::Failed(e) => Err(SidecarError::DrainFailed(e)),
        _ => Ok(()),
    }
}
