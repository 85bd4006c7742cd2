//! Draining: the one way the sidecar leaves Consul. A drain is started by SIGTERM/SIGINT or by the
//! admin `/drain` endpoint (the app's preStop hook); both end up here.
//!
//! The sequence: stop the reconcilers at once (their in-flight calls are abandoned: nothing may
//! re-register), mark every instance critical ("draining"), wait `drain.delay` (a second signal
//! cuts it short), deregister every instance, retrying while Consul is unreachable, then read each
//! instance back (and deregister it again if a late write put it back) and confirm that the
//! servers, where clients read, no longer hold it. Every call of the drain is bounded by one
//! deadline, `drain.delay + drain.deregisterTimeout` after the drain started, so shutdown fits the
//! budget the kubelet gives it. Later requests join the drain in progress.
//!
//! A signal makes a drain final. A drain from `/drain` heals when the app is restarted (see
//! [`crate::heal`]): the instances are registered again and a later `/drain` drains again.
//!
//! A drain that failed (Consul unreachable past the deadline) leaves the instances to the crash net
//! ([`Registry::abandon`]) and is tried again by the signal that follows (a preStop's drain, then
//! the kubelet's SIGTERM): at once, without a second delay, within the signal's own budget
//! (`drain.delay + drain.deregisterTimeout` after it). A sidecar that starts while Consul holds
//! its instances marked draining (it was restarted in the middle of a drain) finishes that drain
//! before registering anything.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};

use crate::consul::{CheckStatus, ConsulError, Registry, ServiceWatch};
use crate::manifest::{DrainPolicy, POD_UID_KEY, RetryPolicy, ServiceSpec, duration};
use crate::metrics::Metrics;
use crate::reconcile::Backoff;
use crate::status::StatusBoard;

/// The check output while draining, without the pod (see [`drain_mark`]).
pub const DRAINING_OUTPUT: &str =
    "draining: consul-registrar is taking this instance out of service";

/// The drain's mark: the check output while draining, naming the pod by its UID when the sidecar
/// knows it. A sidecar that starts and finds its instances so marked was restarted in the middle
/// of its pod's drain and finishes it; a new pod of the same name (a StatefulSet's, after the old
/// one's drain was cut off) has another UID, so its predecessor's mark is not its own.
pub fn drain_mark(services: &[ServiceSpec]) -> String {
    match services.iter().find_map(|s| s.meta.get(POD_UID_KEY)) {
        Some(uid) => format!("{DRAINING_OUTPUT} (pod {uid})"),
        None => DRAINING_OUTPUT.to_string(),
    }
}

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
    /// When the first signal came: its budget runs from there.
    signalled_at: Option<Instant>,
    /// The drain under way tries again after a failed one: no second delay.
    retry: bool,
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
                    signalled_at: None,
                    retry: false,
                })
                .0,
            ),
            skip_delay: Arc::new(Notify::new()),
        }
    }

    /// Starts a drain, or joins the one in progress or finished. A signal after a failed drain
    /// starts it again (a retry).
    pub fn request(&self, origin: Origin) -> Ticket {
        let mut ticket = Ticket {
            started: false,
            drain: 0,
        };
        self.state.send_if_modified(|s| {
            let mut changed = false;
            if origin == Origin::Signal && !s.terminating {
                s.terminating = true;
                s.signalled_at = Some(Instant::now());
                changed = true;
            }
            let again = origin == Origin::Signal && matches!(s.phase, Phase::Failed(_));
            if s.phase == Phase::Running || again {
                s.phase = Phase::Draining;
                s.started += 1;
                s.retry = again;
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

    /// Whether the drain under way tries again after a failed one; when a signal came, the end
    /// of its budget (`budget` after it).
    fn plan(&self, budget: std::time::Duration) -> (bool, Option<Instant>) {
        let s = self.state.borrow();
        (s.retry, s.signalled_at.map(|at| at + budget))
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

    /// Ends the drain under way with `outcome`; unless it failed, `may_retry`, while a signal's
    /// budget (`budget` after the signal) still runs: then it stays under way and the end of that
    /// budget is returned, for another try.
    fn finish_unless_retried(
        &self,
        outcome: &Phase,
        budget: std::time::Duration,
        may_retry: bool,
    ) -> Option<Instant> {
        let mut again = None;
        self.state.send_if_modified(|s| {
            let signal_deadline = s.signalled_at.map(|at| at + budget);
            if let (true, Phase::Failed(_), Some(deadline)) = (may_retry, outcome, signal_deadline)
                && Instant::now() < deadline
            {
                again = Some(deadline);
                return false;
            }
            s.finished = s.started;
            s.phase = outcome.clone();
            s.outcome = outcome.clone();
            true
        });
        again
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

/// When a drain waits until (the end of its delay) and must be over by (every call included).
#[derive(Debug, Clone, Copy)]
struct Plan {
    delay_end: Instant,
    deadline: Instant,
    /// Tries again after a failed drain, within what is left of a signal's budget.
    retry: bool,
}

impl<R: Registry> Drainer<R> {
    /// Starts the reconcilers (after finishing a drain a previous run of the sidecar left under
    /// way), then drains on every request; after a drain from `/drain`, heals when the app comes
    /// back (see [`crate::heal`]). Returns once a drain is final.
    pub async fn run(self) {
        let handle = self.handle.clone();
        tokio::select! {
            found = self.found_draining() => if found {
                tracing::warn!(
                    "Consul holds this pod's instances marked draining: the sidecar was restarted in the middle of a drain; finishing it before anything is registered (it heals only if the app is restarted)"
                );
                handle.request(Origin::Admin);
            },
            () = handle.requested() => {}
        }
        let mut reconcilers = if handle.phase() == Phase::Running {
            (self.start_reconcilers)()
        } else {
            Vec::new()
        };
        let budget = self.policy.delay + self.policy.deregister_timeout;
        loop {
            handle.requested().await;
            // The heal watch starts with the drain, so an app that dies during the delay counts.
            let healths: Vec<_> = self.services.iter().map(|s| s.health.clone()).collect();
            let mut back = AbortOnDrop(tokio::spawn(async move {
                crate::heal::restarted(&healths).await
            }));
            let started = Instant::now();
            let plan = match handle.plan(budget) {
                // Again after a failed drain: the delay was served, the signal's budget is left.
                (true, Some(signal_deadline)) => Plan {
                    delay_end: started,
                    deadline: signal_deadline,
                    retry: true,
                },
                _ => Plan {
                    delay_end: started + self.policy.delay,
                    deadline: started + budget,
                    retry: false,
                },
            };
            let mut outcome = self.drain(std::mem::take(&mut reconcilers), plan).await;
            // A signal came while this drain failed: again, once, within what is left of its
            // budget (decided together with the signal's own request, so none falls between).
            let mut may_retry = !plan.retry;
            while let Some(signal_deadline) =
                handle.finish_unless_retried(&outcome, budget, std::mem::take(&mut may_retry))
            {
                tracing::info!(
                    "the drain failed and a signal came meanwhile: trying again within the signal's budget"
                );
                let now = Instant::now();
                outcome = self
                    .drain(
                        Vec::new(),
                        Plan {
                            delay_end: now,
                            deadline: signal_deadline,
                            retry: true,
                        },
                    )
                    .await;
            }
            let counted = if matches!(outcome, Phase::Drained) {
                "drained"
            } else {
                "failed"
            };
            self.metrics.drains.with_label_values(&[counted]).inc();
            if matches!(outcome, Phase::Failed(_)) {
                // Nothing of ours may keep the instances alive now: the crash net takes them
                // (agent: the TTL, no longer refreshed; catalog: the session, no longer renewed).
                self.registry.abandon().await;
            }
            tokio::select! {
                () = handle.terminated() => {
                    // A signal after a failed drain started it again.
                    if handle.phase() == Phase::Draining {
                        continue;
                    }
                    return;
                }
                healed = back.wait() => if !healed { return },
            }
            if !handle.heal() {
                if handle.phase() == Phase::Draining {
                    continue;
                }
                return;
            }
            tracing::info!(
                "drain healed: the app was restarted and answers again (the drain came from /drain, not from a signal); registering every instance again with its own verdict"
            );
            self.metrics.drains_healed.inc();
            self.metrics.draining.set(0);
            for i in 0..self.services.len() {
                // /readyz waits until each instance is registered again.
                self.board.entry(i).update(|s| {
                    s.consul.ever_registered = false;
                    s.consul.status = None;
                });
            }
            reconcilers = (self.start_reconcilers)();
        }
    }

    /// Whether Consul holds any of our instances with the drain's critical mark: a previous run of
    /// this sidecar was draining when it ended. Asked until Consul answers (nothing can be
    /// registered before anyway); a refusal (ACL) counts as no.
    async fn found_draining(&self) -> bool {
        let mut backoff = Backoff::new(self.retry);
        let mut logged = false;
        loop {
            // The agent's identity first, as the reconcilers take it (see `Registry::verify`): an
            // address over several agents is found the same way.
            let asked = async {
                self.registry.verify(false).await?;
                self.registry
                    .marked(
                        &self.services,
                        CheckStatus::Critical,
                        &drain_mark(&self.services),
                    )
                    .await
            };
            match asked.await {
                Ok(found) => return found,
                Err(e) if e.is_retryable() && !matches!(e, ConsulError::Forbidden { .. }) => {
                    if !std::mem::replace(&mut logged, true) {
                        tracing::debug!(error = %e, "cannot yet ask Consul whether a drain was under way; retrying");
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot ask Consul whether a drain was under way when this sidecar last stopped; assuming none");
                    return false;
                }
            }
        }
    }

    async fn drain(&self, reconcilers: Vec<JoinHandle<()>>, plan: Plan) -> Phase {
        let started = Instant::now();
        let Plan {
            delay_end,
            deadline,
            retry: again,
        } = plan;
        if again {
            tracing::info!(
                budget_ms = deadline.saturating_duration_since(started).as_millis() as u64,
                "draining again after a failed drain: marking every instance critical and deregistering at once"
            );
        } else {
            tracing::info!(
                delay = %duration::format(self.policy.delay),
                deregister_timeout = %duration::format(self.policy.deregister_timeout),
                "draining: marking every instance critical, then deregistering"
            );
        }
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
        let drain_mark = &drain_mark(&self.services);
        let marks_end = if delay_end <= started {
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
                    .set_status(s, CheckStatus::Critical, drain_mark)
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

        // 3. Deregister, retrying until the deadline, read back, and confirm at the servers.
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
            let within = if again {
                format!(
                    "what was left of the signal's budget ({}ms)",
                    deadline.saturating_duration_since(started).as_millis()
                )
            } else {
                format!(
                    "drain.delay + drain.deregisterTimeout ({})",
                    duration::format(self.policy.delay + self.policy.deregister_timeout)
                )
            };
            let message = format!(
                "could not deregister {} instance(s) within {within}: {}; they turn critical when their TTL expires and Consul removes them after deregisterCriticalServiceAfter (catalog mode: the session is no longer renewed, and a reaper removes them within 2 × sessionTTL); a signal that follows tries again",
                failures.len(),
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
/// deregistered again. Then confirms that the servers no longer hold it ([`Registry::confirmed_gone`]:
/// an agent's sync to them can fail). Every call ends by `deadline`.
async fn deregister_until<R: Registry>(
    registry: &R,
    spec: &ServiceSpec,
    retry: RetryPolicy,
    deadline: Instant,
) -> Result<(), String> {
    use AfterDeregistration::{Seen, Unconfirmed};
    let mut backoff = Backoff::new(retry);
    let mut attempts = 0u32;
    let mut unconfirmed = false;
    let mut last_error = String::from("no attempt before the deadline");
    loop {
        attempts += 1;
        let attempt = async {
            // Only ours: read first, deregister only if nobody else's instance holds the ID.
            if foreign(registry, spec).await? {
                return Ok::<_, ConsulError>(None);
            }
            match registry.deregister(spec).await {
                Ok(()) => {}
                // The token may not remove it; if the servers hold no such instance (it was
                // never registered: the token may not write it), there is nothing to remove.
                Err(e @ ConsulError::Forbidden { .. }) => {
                    return match registry.read(spec).await? {
                        ServiceWatch::Missing if registry.confirmed_gone(spec).await? => {
                            tracing::info!(instance = %spec.id, "not in Consul (the token may not write it): nothing to deregister");
                            Ok(None)
                        }
                        _ => Err(e),
                    };
                }
                Err(e) => return Err(e),
            }
            let seen = registry.read(spec).await?;
            if matches!(seen, ServiceWatch::Missing) && !registry.confirmed_gone(spec).await? {
                return Ok(Some(Unconfirmed));
            }
            Ok(Some(Seen(seen)))
        };
        match timeout_at(deadline, attempt).await {
            Ok(Ok(None | Some(Seen(ServiceWatch::Missing)))) => return Ok(()),
            Ok(Ok(Some(Unconfirmed))) => {
                if !std::mem::replace(&mut unconfirmed, true) {
                    tracing::warn!(instance = %spec.id, "the agent no longer has the instance but the servers still do (its sync to them failed, e.g. during a leader election); removed it at the servers, confirming");
                }
                last_error = "the servers still held the instance".into();
            }
            Ok(Ok(Some(Seen(ServiceWatch::Present { service, .. })))) => {
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
        let Some(next) = next_attempt(Instant::now(), backoff.next_delay(), deadline) else {
            return Err(format!(
                "{} (after {attempts} attempts): {last_error}",
                spec.id
            ));
        };
        tokio::time::sleep_until(next).await;
    }
}

/// The least time a drain's last attempt gets before the deadline.
const LAST_ATTEMPT: Duration = Duration::from_millis(250);

/// When to try again after a failed attempt at `now` with the backoff's `wait`: then, or, when
/// that would pass the deadline, a last time `LAST_ATTEMPT` before it (a Consul back in the
/// backoff's last wait still counts); None when not even that is left.
fn next_attempt(now: Instant, wait: Duration, deadline: Instant) -> Option<Instant> {
    let last = deadline.checked_sub(LAST_ATTEMPT)?;
    if now >= last {
        return None;
    }
    Some(now.checked_add(wait).map_or(last, |t| t.min(last)))
}

/// What a read after a deregistration found.
enum AfterDeregistration {
    /// The registry's own view (the agent's, or the servers' in catalog mode).
    Seen(ServiceWatch),
    /// Gone from the agent, but the servers still held it (removed there; read again).
    Unconfirmed,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_deregistration_is_tried_once_more_just_before_the_deadline() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(6);
        let last = deadline - LAST_ATTEMPT;
        // A wait that ends in time is taken as it is.
        assert_eq!(
            next_attempt(now, Duration::from_secs(1), deadline),
            Some(now + Duration::from_secs(1))
        );
        // One that would pass the deadline (a large retry.max) becomes a last try before it.
        assert_eq!(
            next_attempt(now, Duration::from_secs(8), deadline),
            Some(last)
        );
        assert_eq!(
            next_attempt(
                now + Duration::from_secs(5),
                Duration::from_secs(5),
                deadline
            ),
            Some(last)
        );
        // After the last try, nothing is left.
        assert_eq!(
            next_attempt(last, Duration::from_millis(50), deadline),
            None
        );
        assert_eq!(next_attempt(deadline, Duration::ZERO, deadline), None);
    }
}
