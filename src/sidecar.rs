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

use crate::admin::{self, AdminState, DrainAuth};
use crate::consul::reaper::Reaper;
use crate::consul::session::{Liveness, Pod};
use crate::consul::{CatalogRegistry, ConsulClient, ConsulError, Registry};
use crate::manifest::{ConsulMode, Manifest};
use crate::metrics::Metrics;
use crate::probe::{self, HealthProbe, ProbeSetupError, Verdict};
use crate::reconcile::{AntiEntropy, Reconciler};
use crate::shutdown::{DrainHandle, Drainer, Origin, Phase};
use crate::status::StatusBoard;

/// Why the sidecar could not run or did not finish cleanly.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error(transparent)]
    Consul(#[from] ConsulError),
    #[error(transparent)]
    Probe(#[from] ProbeSetupError),
    #[error("cannot listen on the admin address {address}")]
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

/// Runs the sidecar until a signal has drained it. `drain_auth` says who may call `/drain`.
pub async fn run(
    manifest: Manifest,
    admin_address: SocketAddr,
    drain_auth: DrainAuth,
) -> Result<(), SidecarError> {
    let metrics = Metrics::new();
    let client = ConsulClient::new(&manifest.consul, Arc::clone(&metrics))?;
    let everything = CancellationToken::new();
    let stop_everything = everything.clone().drop_guard();
    let alarm = AntiEntropy::alarm();
    let login = client.clone();
    let outcome = match manifest.consul.mode.clone() {
        ConsulMode::Agent => {
            run_with(
                client,
                manifest,
                AdminSetup {
                    address: admin_address,
                    drain_auth,
                    desk: None,
                    view: None,
                },
                metrics,
                alarm,
                everything,
            )
            .await
        }
        ConsulMode::Catalog(settings) => {
            // Each instance names its key prefix, so reapers of other prefixes leave it alone.
            let mut manifest = manifest;
            for spec in &mut manifest.services {
                spec.meta.insert(
                    crate::consul::session::KEY_PREFIX_META.to_string(),
                    settings.key_prefix.clone(),
                );
            }
            let retry = manifest.consul.retry;
            // The instances' liveness keys and the session that holds them.
            let instances: Vec<(&str, &str)> = manifest
                .services
                .iter()
                .map(|s| (s.id.as_str(), s.name.as_str()))
                .collect();
            let liveness = Arc::new(Liveness::new(
                client.clone(),
                settings.clone(),
                &instances,
                Pod {
                    name: &pod_name(),
                    uid: &pod_uid(&manifest),
                },
                Arc::clone(&alarm),
                Arc::clone(&metrics),
                retry,
            ));
            tokio::spawn(Arc::clone(&liveness).run(everything.child_token()));
            // Every catalog-mode sidecar stands for reaper of each of its services; one per
            // (key prefix, service) is elected and does the work.
            let services: std::collections::BTreeSet<&str> =
                manifest.services.iter().map(|s| s.name.as_str()).collect();
            for service in services {
                tokio::spawn(
                    Reaper {
                        client: client.clone(),
                        settings: settings.clone(),
                        metrics: Arc::clone(&metrics),
                        retry,
                        wait: manifest.consul.resync_interval,
                        liveness: Arc::clone(&liveness),
                        service: service.to_string(),
                    }
                    .run(everything.child_token()),
                );
            }
            tracing::info!(node = %settings.node, session_ttl = %crate::manifest::duration::format(settings.session_ttl), "catalog mode: registering on a virtual node, with a session as the crash net");
            let desk = liveness.desk();
            let registry = CatalogRegistry::new(client, settings, liveness);
            // With a shared session, the holder reads the virtual node for all its sidecars.
            let view = registry.node_view();
            tokio::spawn(registry.clone().run_node_view(
                manifest.consul.resync_interval,
                retry,
                everything.child_token(),
            ));
            run_with(
                registry,
                manifest,
                AdminSetup {
                    address: admin_address,
                    drain_auth,
                    desk,
                    view,
                },
                metrics,
                alarm,
                everything,
            )
            .await
        }
    };
    // A login token is an ACL object: log out once nothing calls Consul any more (with a static
    // token, nothing to do).
    drop(stop_everything);
    login.logout().await;
    outcome
}

/// The admin server's address, who may drain, and (with a shared session) the holder's desk.
struct AdminSetup {
    address: SocketAddr,
    drain_auth: DrainAuth,
    desk: Option<Arc<crate::consul::shared::Desk>>,
    view: Option<Arc<crate::consul::node_view::NodeView>>,
}

/// [`run`] with the Consul backend chosen.
async fn run_with<R: Registry>(
    registry: R,
    manifest: Manifest,
    admin: AdminSetup,
    metrics: Arc<Metrics>,
    alarm: Arc<watch::Sender<u64>>,
    everything: CancellationToken,
) -> Result<(), SidecarError> {
    let AdminSetup {
        address: admin_address,
        drain_auth,
        desk,
        view,
    } = admin;
    let board = StatusBoard::new(
        manifest
            .services
            .iter()
            .map(|s| (s.id.as_str(), s.name.as_str())),
    );
    let drain = DrainHandle::new();

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
        consul = %registry.address(),
        instances = manifest.services.len(),
        drain_auth = match &drain_auth {
            DrainAuth::LoopbackOnly => "loopback peers only (no drain token configured)",
            DrainAuth::Token(_) => "X-Drain-Token (from CONSUL_REGISTRAR_DRAIN_TOKEN)",
            DrainAuth::TokenFile(_) => "X-Drain-Token (from CONSUL_REGISTRAR_DRAIN_TOKEN_FILE)",
        },
        "consul-registrar started"
    );
    if let DrainAuth::TokenFile(file) = &drain_auth
        && std::fs::read_to_string(file).map_or(true, |t| t.trim().is_empty())
    {
        tracing::warn!(file = %file.display(), "the drain token file is unreadable or empty: /drain refuses every request until it holds a token");
    }
    // The admin server has its own stop, so it can answer requests in flight after the rest.
    let admin_stop = CancellationToken::new();
    let _stop_admin = admin_stop.clone().drop_guard();
    let admin_server = tokio::spawn(admin::serve(
        listener,
        AdminState {
            metrics: Arc::clone(&metrics),
            board: Arc::clone(&board),
            drain: drain.clone(),
            drain_auth: Arc::new(drain_auth),
            readiness: manifest.readiness,
            desk,
            view,
        },
        admin_stop.clone(),
    ));

    // Probes of the same target share one HTTP/2 connection.
    let mut channels = HashMap::new();
    let mut reconcilers = Vec::with_capacity(manifest.services.len());
    let consul_settings = &manifest.consul;
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
        metrics.expect_instance(&spec.name, &spec.id);
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
        reconcilers.push((
            spec.clone(),
            board.entry(i),
            AntiEntropy::member(&alarm, i < consul_settings.blocking_watches),
            verdict_rx,
        ));
    }
    // The drainer starts them, stops them when a drain starts, and starts them again if it heals.
    let (retry, resync_interval) = (consul_settings.retry, consul_settings.resync_interval);
    let start_reconcilers = {
        let registry = registry.clone();
        let metrics = Arc::clone(&metrics);
        let everything = everything.clone();
        Box::new(move || {
            reconcilers
                .iter()
                .map(|(spec, entry, anti_entropy, verdicts)| {
                    let reconciler = Reconciler::new(
                        spec.clone(),
                        registry.clone(),
                        Arc::clone(&metrics),
                        entry.clone(),
                        retry,
                        resync_interval,
                        anti_entropy.clone(),
                    );
                    tokio::spawn(reconciler.run(verdicts.clone(), everything.child_token()))
                })
                .collect()
        })
    };

    let unworkable = registry.clone();
    tokio::spawn(
        Drainer {
            handle: drain.clone(),
            registry,
            services: manifest.services.clone(),
            policy: manifest.drain,
            retry: manifest.consul.retry,
            metrics,
            board,
            start_reconcilers,
        }
        .run(),
    );

    // The first signal starts the drain (or finds it done after /drain); a second one skips the
    // rest of the drain delay. The process ends when a signal has come and the drain is over.
    let signals_handle = signals.handle();
    let mut signals = signals.fuse();
    let mut ticket = None;
    let outcome = loop {
        tokio::select! {
            // Calls reach several agents: nothing the sidecar does can be trusted to stick. Stop
            // (the TTL checks expire and Consul removes the copies after
            // deregisterCriticalServiceAfter) with the error that says what to change.
            message = unworkable.unworkable() => {
                signals_handle.close();
                return Err(SidecarError::Configuration(message));
            }
            Some(sig) = signals.next() => {
                let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
                if ticket.is_none() {
                    let t = drain.request(Origin::Signal);
                    if t.started {
                        tracing::info!(signal = name, "signal received: draining");
                    } else {
                        tracing::info!(signal = name, "signal received: finishing the drain under way (it no longer heals)");
                    }
                    ticket = Some(t);
                } else {
                    tracing::info!(signal = name, "another signal received");
                    drain.skip_delay();
                }
            }
            phase = async { match ticket { Some(t) => drain.finished(t).await, None => std::future::pending().await } } => break phase,
        }
    };
    signals_handle.close();
    // A classic sidecar gets SIGTERM while the app's preStop still waits on /drain?wait=true:
    // answer it before exiting, so the kubelet does not see a reset (FailedPreStopHook). The
    // server answers what is in flight for SHUTDOWN_GRACE and returns.
    admin_stop.cancel();
    let _ = admin_server.await;
    match outcome {
        Phase::Failed(e) => Err(SidecarError::DrainFailed(e)),
        _ => Ok(()),
    }
}

/// The pod's name (`POD_NAME`, else the container's `HOSTNAME`, which Kubernetes sets to it), so
/// that a session is adopted only by a later run in the same pod.
/// The pod's UID (`POD_UID`, in the instances' meta), else `POD_NAME` (a restarted container is
/// the same pod), else one made up for this process: what a holder of a shared session knows this
/// sidecar's keys by.
fn pod_uid(manifest: &Manifest) -> String {
    manifest
        .services
        .iter()
        .find_map(|s| s.meta.get(crate::manifest::POD_UID_KEY))
        .cloned()
        .or_else(|| {
            std::env::var("POD_NAME")
                .ok()
                .filter(|name| !name.is_empty())
        })
        .unwrap_or_else(|| format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)))
}

fn pod_name() -> String {
    ["POD_NAME", "HOSTNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_default()
}
