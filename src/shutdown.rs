//! Draining: the one way the sidecar leaves Consul. A drain is started by SIGTERM/SIGINT or by the
//! admin `/drain` endpoint (the app's preStop hook); both end up here.
//!
//! The sequence: stop the reconcilers at once (their in-flight calls are abandoned: nothing may
//! re-register), mark every instance critical ("draining"), wait `drain.delay` (a second signal
//! cuts it short), deregister every instance, retrying while Consul is unreachable, then read each
//! instance back and deregister it again if a late write put it back. Every call of the drain is
//! bounded by one deadline, `drain.delay + drain.deregisterTimeout` after the drain started, so
//! shutdown fits the budget the kubelet gives it. Later requests join the drain in progress.
//!
//! A signal makes a drain final. A drain from `/drain` heals when the app is restarted (see
//! [`crate::heal`]): the instances are registered again and a later `/drain` drains again.

use std::sync::Arc;

use futures_util::future::join_all;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};

use crate::consul::{CheckStatus, ConsulError, Registry, ServiceWatch};
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

/// Who asked for a drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// `/drain` (the app's preStop hook, or an operator): may heal.
    Admin,
    /// SIGTERM or SIGINT: the process is ending; the drain is final.
    Signal,
}

#[derive(Debug, Clone)]
struct DrainState {
    phase: Phase,
    /// Drains started so far; a waiter waits for the one it joined.
    started: u64,
    /// The last drain that finished, and how.
    finished: u64,
    outcome: Phase,
    /// A signal came: no drain heals any more.
    terminating: bool,
}

/// The drain a request started or joined.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    /// This request started it.
    pub started: bool,
    drain: u64,
}

/// A handle to start a drain, cut its delay short, and watch its progress. Cheap to clone.
#[derive(Clone)]
pub struct DrainHandle {
    state: Arc<watch::Sender<DrainState>>,
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
            state: Arc::new(
                watch::channel(DrainState {
                    phase: Phase::Running,
                    started: 0,
                    finished: 0,
                    outcome: Phase::Running,
                    terminating: false,
                })
                .0,
            ),
            skip_delay: Arc::new(Notify::new()),
        }
    }

    /// Starts a drain, or joins the one in progress or finished.
    pub fn request(&self, origin: Origin) -> Ticket {
        let mut ticket = Ticket {
            started: false,
            drain: 0,
        };
        self.state.send_if_modified(|s| {
            let mut changed = false;
            if origin == Origin::Signal && !s.terminating {
                s.terminating = true;
                changed = true;
            }
            if s.phase == Phase::Running {
                s.phase = Phase::Draining;
                s.started += 1;
                ticket.started = true;
                changed = true;
            }
            ticket.drain = s.started;
            changed
        });
        ticket
    }

    /// Ends the drain delay now (a second signal).
    pub fn skip_delay(&self) {
        self.skip_delay.notify_one();
    }

    pub fn phase(&self) -> Phase {
        self.state.borrow().phase.clone()
    }

    /// True once a signal came (the drain, if any, is final).
    pub fn terminating(&self) -> bool {
        self.state.borrow().terminating
    }

    /// Waits until the drain of `ticket` has finished and returns how the last drain ended.
    pub async fn finished(&self, ticket: Ticket) -> Phase {
        let mut rx = self.state.subscribe();
        match rx.wait_for(|s| s.finished >= ticket.drain).await {
            Ok(s) => s.outcome.clone(),
            // The sender lives in self: it cannot be dropped while we wait.
            Err(_) => Phase::Failed("drain state lost".into()),
        }
    }

    async fn requested(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| s.phase == Phase::Draining).await;
    }

    async fn terminated(&self) {
        let mut rx = self.state.subscribe();
        let _ = rx.wait_for(|s| s.terminating).await;
    }

    fn finish(&self, outcome: Phase) {
        self.state.send_modify(|s| {
            s.finished = s.started;
            s.phase = outcome.clone();
            s.outcome = outcome;
        });
    }

    /// Back to running, unless a signal came meanwhile.
    fn heal(&self) -> bool {
        self.state.send_if_modified(|s| {
            if s.terminating || !s.phase.is_finished() {
                return false;
            }
            s.phase = Phase::Running;
            true
        })
    }
}

/// Starts the reconcilers (again, after a heal); returns their tasks.
pub type StartReconcilers = Box<dyn Fn() -> Vec<JoinHandle<()>> + Send + Sync>;

/// Everything the drain needs, handed over by the sidecar at start-up.
pub struct Drainer<R> {
    pub handle: DrainHandle,
    pub registry: R,
    pub services: Vec<ServiceSpec>,
    pub policy: DrainPolicy,
    pub retry: RetryPolicy,
    pub metrics: Arc<Metrics>,
    pub board: Arc<StatusBoard>,
    pub start_reconcilers: StartReconcilers,
}

impl<R: Registry> Drainer<R> {
    /// Starts the reconcilers, then drains on every request; after a drain from `/drain`, heals
    /// when the app comes back (see [`crate::heal`]). Returns once a drain is final.
    pub async fn run(self) {
        let handle = self.handle.clone();
        let mut reconcilers = (self.start_reconcilers)();
        loop {
            handle.requested().await;
            // The heal watch starts with the drain, so an app that dies during the delay counts.
            let healths: Vec<_> = self.services.iter().map(|s| s.health.clone()).collect();
            let mut back = AbortOnDrop(tokio::spawn(async move {
                crate::heal::gone_and_back(&healths).await
            }));
            let outcome = self.drain(std::mem::take(&mut reconcilers)).await;
            handle.finish(outcome);
            tokio::select! {
                _ = handle.terminated() => return,
                healed = back.wait() => if !healed { return },
            }
            if !handle.heal() {
                return;
            }
            tracing::info!(
                "drain healed: the app was restarted and serves again (the drain came from /drain, not from a signal); registering every instance again"
            );
            self.metrics.drains_healed.inc();
            self.metrics.draining.set(0);
            for i in 0..self.services.len() {
                // /readyz waits until each instance is registered again.
                self.board
                    .entry(i)
                    .update(|s| s.consul.ever_registered = false);
            }
            reconcilers = (self.start_reconcilers)();
        }
    }

    async fn drain(&self, reconcilers: Vec<JoinHandle<()>>) -> Phase {
        let started = Instant::now();
        let delay_end = started + self.policy.delay;
        let deadline = delay_end + self.policy.deregister_timeout;
        tracing::info!(
            delay = %duration::format(self.policy.delay),
            deregister_timeout = %duration::format(self.policy.deregister_timeout),
            "draining: marking every instance critical, then deregistering"
        );
        self.metrics.draining.set(1);
        // Abort, not wait: a reconciler's call in flight may take its whole request timeout.
        for task in &reconcilers {
            task.abort();
        }
        for task in reconcilers {
            let _ = task.await;
        }

        // 1. Critical at once. One try each, bounded by the delay (or, without a delay, by the
        //    deadline): if Consul is down, the deregistration below retries.
        let registry = &self.registry;
        let marks_end = if self.policy.delay.is_zero() {
            deadline
        } else {
            delay_end
        };
        let marks = self.services.iter().map(|s| async move {
            let mark = async {
                // Only ours: an instance someone else holds under our ID is left alone.
                if let Ok(true) = foreign(registry, s).await {
                    return Ok(());
                }
                registry
                    .set_status(s, CheckStatus::Critical, DRAINING_OUTPUT)
                    .await
            };
            match timeout_at(marks_end, mark).await
            {
                Ok(Ok(()) | Err(ConsulError::NotFound { .. })) => {}
                Ok(Err(e)) => {
                    tracing::warn!(instance = %s.id, error = %e, "could not mark instance critical")
                }
                Err(_) => {
                    tracing::warn!(instance = %s.id, "could not mark instance critical before the drain delay ended")
                }
            }
        });
        join_all(marks).await;
        for i in 0..self.services.len() {
            self.board
                .entry(i)
                .update(|s| s.consul.status = Some("critical"));
        }

        // 2. The rest of the delay, so that clients move away before the instance disappears.
        if Instant::now() < delay_end {
            tokio::select! {
                _ = tokio::time::sleep_until(delay_end) => {}
                _ = self.handle.skip_delay.notified() => tracing::info!("second signal: skipping the rest of the drain delay"),
            }
        }

        // 3. Deregister, retrying until the deadline, and read back.
        let retry = self.retry;
        let results = join_all(
            self.services
                .iter()
                .map(|s| deregister_until(registry, s, retry, deadline)),
        )
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
            // Catalog mode: the session and its keys go too (within the deadline).
            if timeout_at(deadline, registry.drained()).await.is_err() {
                tracing::warn!(
                    "could not end the session before the deadline; Consul invalidates it within 2 × sessionTTL"
                );
            }
            tracing::info!(
                instances = self.services.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "drained: every instance is deregistered"
            );
            Phase::Drained
        } else {
            let message = format!(
                "could not deregister {} instance(s) within drain.delay + drain.deregisterTimeout ({}): {}; they turn critical when their TTL expires and Consul removes them after deregisterCriticalServiceAfter",
                failures.len(),
                duration::format(self.policy.delay + self.policy.deregister_timeout),
                failures.join("; ")
            );
            tracing::error!("{message}");
            Phase::Failed(message)
        }
    }
}

/// A task that is aborted when the handle is dropped.
struct AbortOnDrop(JoinHandle<()>);

impl AbortOnDrop {
    /// True when the task finished (false if it panicked).
    async fn wait(&mut self) -> bool {
        (&mut self.0).await.is_ok()
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Deregisters one instance, then reads it back: a registration that timed out on our side may
/// still be applied by the agent later; if the instance is there again (and still ours), it is
/// deregistered again. Every call ends by `deadline`.
async fn deregister_until<R: Registry>(
    registry: &R,
    spec: &ServiceSpec,
    retry: RetryPolicy,
    deadline: Instant,
) -> Result<(), String> {
    let mut backoff = Backoff::new(retry);
    let mut attempts = 0u32;
    let mut last_error = String::from("no attempt before the deadline");
    loop {
        attempts += 1;
        let attempt = async {
            // Only ours: read first, deregister only if nobody else's instance holds the ID.
            if foreign(registry, spec).await? {
                return Ok(None);
            }
            registry.deregister(spec).await?;
            registry.read(spec).await.map(Some)
        };
        match timeout_at(deadline, attempt).await {
            Ok(Ok(None | Some(ServiceWatch::Missing))) => return Ok(()),
            Ok(Ok(Some(ServiceWatch::Present { service, .. }))) => {
                if !service.is_ours() {
                    // Someone else registered this ID after our deregistration: not ours to remove.
                    return Ok(());
                }
                tracing::warn!(instance = %spec.id, "the instance is back in Consul after its deregistration (a late write); deregistering it again");
                last_error = "the instance kept coming back".into();
            }
            Ok(Err(e)) => {
                if attempts == 1 {
                    tracing::warn!(instance = %spec.id, error = %e, "deregistration failed; retrying until the deadline");
                }
                last_error = e.to_string();
            }
            Err(_) => {
                last_error = format!("no answer from Consul before the deadline ({last_error})")
            }
        }
        let wait = backoff.next_delay();
        if Instant::now()
            .checked_add(wait)
            .is_none_or(|t| t >= deadline)
        {
            return Err(format!(
                "{} (after {attempts} attempts): {last_error}",
                spec.id
            ));
        }
        tokio::time::sleep(wait).await;
    }
}

/// Whether Consul holds an instance under `id` that is not ours (the ownership rule,
/// [`crate::consul::AgentService::is_ours`]): the drain leaves it alone, logging why.
async fn foreign<R: Registry>(registry: &R, spec: &ServiceSpec) -> Result<bool, ConsulError> {
    let id = &spec.id;
    match registry.read(spec).await? {
        ServiceWatch::Present { service, .. } if !service.is_ours() => {
            tracing::warn!(instance = %id, "an instance with this ID in Consul was not registered by consul-registrar; the drain leaves it alone");
            Ok(true)
        }
        _ => Ok(false),
    }
}
