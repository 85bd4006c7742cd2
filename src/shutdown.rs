//! Draining: the one way the sidecar leaves Consul. A drain is started by SIGTERM/SIGINT or by the
//! admin `/drain` endpoint (the app's preStop hook); both end up here.
//!
//! The sequence: stop the reconcilers (nothing may re-register), mark every instance critical at
//! once ("draining"), wait `drain.delay` (a second signal cuts it short), deregister every instance,
//! retrying until `drain.deregisterTimeout` when Consul is unreachable. A drain runs once; later
//! requests join it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::consul::{CheckStatus, ConsulClient, ConsulError, ServiceWatch};
use crate::manifest::{DrainPolicy, RetryPolicy, ServiceSpec, duration};
use crate::metrics::Metrics;
use crate::reconcile::Backoff;
use crate::status::StatusBoard;

/// The check output while draining.
pub const DRAINING_OUTPUT: &str =
    "draining: consul-registrar is taking this instance out of service";

/// Where the sidecar is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Keeping instances registered.
    Running,
    /// A drain was requested and is under way.
    Draining,
    /// Every instance is deregistered.
    Drained,
    /// The drain ended with instances left in Consul (they turn critical when their TTL expires
    /// and Consul reaps them after deregisterCriticalServiceAfter).
    Failed(String),
}

impl Phase {
    pub fn is_finished(&self) -> bool {
        matches!(self, Phase::Drained | Phase::Failed(_))
    }
}

/// A handle to start a drain, cut its delay short, and watch its progress. Cheap to clone.
#[derive(Clone)]
pub struct DrainHandle {
    phase: Arc<watch::Sender<Phase>>,
    skip_delay: Arc<Notify>,
}

impl Default for DrainHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl DrainHandle {
    pub fn new() -> Self {
        DrainHandle {
            phase: Arc::new(watch::channel(Phase::Running).0),
            skip_delay: Arc::new(Notify::new()),
        }
    }

    /// Starts the drain; returns false when one was already started.
    pub fn request(&self) -> bool {
        self.phase.send_if_modified(|p| {
            if *p == Phase::Running {
                *p = Phase::Draining;
                true
            } else {
                false
            }
        })
    }

    /// Ends the drain delay now (a second signal).
    pub fn skip_delay(&self) {
        self.skip_delay.notify_one();
    }

    pub fn phase(&self) -> Phase {
        self.phase.borrow().clone()
    }

    /// Waits until the drain has finished and returns how it ended.
    pub async fn finished(&self) -> Phase {
        let mut rx = self.phase.subscribe();
        match rx.wait_for(Phase::is_finished).await {
            Ok(p) => p.clone(),
            // The sender lives in self: it cannot be dropped while we wait.
            Err(_) => Phase::Failed("drain state lost".into()),
        }
    }

    async fn requested(&self) {
        let mut rx = self.phase.subscribe();
        let _ = rx.wait_for(|p| *p != Phase::Running).await;
    }
}

/// Everything the drain needs, handed over by the sidecar at start-up.
pub struct Drainer {
    pub handle: DrainHandle,
    pub client: ConsulClient,
    pub services: Vec<ServiceSpec>,
    pub policy: DrainPolicy,
    pub retry: RetryPolicy,
    pub metrics: Arc<Metrics>,
    pub board: Arc<StatusBoard>,
    /// Cancels the reconcilers.
    pub sync: CancellationToken,
    pub reconcilers: Vec<JoinHandle<()>>,
}

impl Drainer {
    /// Waits for a drain request, then drains.
    pub async fn run(self) {
        let handle = self.handle.clone();
        handle.requested().await;
        let outcome = self.drain().await;
        handle.phase.send_replace(outcome);
    }

    async fn drain(self) -> Phase {
        let started = Instant::now();
        tracing::info!(
            delay = %duration::format(self.policy.delay),
            "draining: marking every instance critical, then deregistering"
        );
        self.metrics.draining.set(1);
        self.sync.cancel();
        for task in self.reconcilers {
            let _ = task.await;
        }

        // 1. Critical at once. One try each: if Consul is down the deregistration below retries.
        let client = &self.client;
        let marks = self.services.iter().map(|s| async move {
            if let Ok(true) = foreign(client, &s.id).await {
                return;
            }
            match client
                .update_ttl(&s.check.id, CheckStatus::Critical, DRAINING_OUTPUT)
                .await
            {
                Ok(()) | Err(ConsulError::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(instance = %s.id, error = %e, "could not mark instance critical")
                }
            }
        });
        join_all(marks).await;
        for i in 0..self.services.len() {
            self.board
                .entry(i)
                .update(|s| s.consul.status = Some("critical"));
        }

        // 2. The delay, so that clients move away before the instance disappears.
        if !self.policy.delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(self.policy.delay) => {}
                _ = self.handle.skip_delay.notified() => tracing::info!("second signal: skipping the rest of the drain delay"),
            }
        }

        // 3. Deregister, retrying until the deadline.
        let deadline = crate::reconcile::instant_after(self.policy.deregister_timeout);
        let retry = self.retry;
        let results = join_all(self.services.iter().map(|s| async move {
            let mut backoff = Backoff::new(retry);
            let mut attempts = 0u32;
            loop {
                attempts += 1;
                // Only ours: read first, deregister if nobody else's instance holds the ID.
                let result = match foreign(client, &s.id).await {
                    Ok(true) => return Ok(()),
                    Ok(false) => client.deregister(&s.id).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        let wait = backoff.next_delay();
                        if Instant::now().checked_add(wait).is_none_or(|t| t >= deadline) {
                            return Err(format!("{} (after {attempts} attempts): {e}", s.id));
                        }
                        if attempts == 1 {
                            tracing::warn!(instance = %s.id, error = %e, "deregistration failed; retrying until the deadline");
                        }
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }))
        .await;
        let mut failures = Vec::new();
        for (i, (s, r)) in self.services.iter().zip(results).enumerate() {
            match r {
                Ok(()) => {
                    self.metrics
                        .instance_registered
                        .with_label_values(&[&s.name, &s.id])
                        .set(0);
                    self.board.entry(i).update(|st| {
                        st.consul.registered = false;
                        st.consul.status = None;
                    });
                }
                Err(e) => failures.push(e),
            }
        }
        if failures.is_empty() {
            tracing::info!(
                instances = self.services.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "drained: every instance is deregistered"
            );
            Phase::Drained
        } else {
            let message = format!(
                "could not deregister {} instance(s) within {}: {}; they turn critical when their TTL expires and Consul removes them after deregisterCriticalServiceAfter",
                failures.len(),
                duration::format(self.policy.deregister_timeout),
                failures.join("; ")
            );
            tracing::error!("{message}");
            Phase::Failed(message)
        }
    }
}

/// Whether Consul holds an instance under `id` that is not ours (the ownership rule,
/// [`crate::consul::AgentService::is_ours`]): the drain leaves it alone, logging why.
async fn foreign(client: &ConsulClient, id: &str) -> Result<bool, ConsulError> {
    match client.watch_service(id, None, Duration::ZERO).await? {
        ServiceWatch::Present { service, .. } if !service.is_ours() => {
            tracing::warn!(instance = %id, "an instance with this ID in Consul was not registered by consul-registrar; the drain leaves it alone");
            Ok(true)
        }
        _ => Ok(false),
    }
}
