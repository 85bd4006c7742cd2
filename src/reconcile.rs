//! The reconciler: keeps one instance in Consul as the manifest and the probe's verdict say it should
//! be. It owns the desired state; each step compares it with what it knows of Consul and makes one
//! call towards it, so a step is safe to repeat at any time.
//!
//! What it knows of Consul comes from its own calls and from an anti-entropy watcher: a blocking
//! query on the agent's service endpoint, which answers at once when the definition changes or the
//! service disappears (agent restarted empty, someone deregistered it), and otherwise every
//! `resyncInterval` (the periodic full resync). Consul errors are retried with capped exponential
//! backoff and jitter; the probe goes on meanwhile and the latest verdict is pushed once Consul is back.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, mpsc, watch};
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

use crate::consul::{
    AgentService, AgentServiceRegistration, CheckSeen, CheckStatus, ConsulError, Drift, Registry,
    ServiceWatch,
};
use crate::manifest::{RetryPolicy, ServiceSpec};
use crate::metrics::Metrics;
use crate::probe::Verdict;
use crate::status::StatusEntry;

/// What the reconciler believes Consul holds for its instance.
#[derive(Debug, Clone, PartialEq, Eq)]
enum View {
    /// Not looked yet (start-up).
    Unknown,
    /// A TTL update found our check gone: read before registering again (the instance may be
    /// gone too, or someone else's under our ID).
    CheckGone,
    Missing,
    InSync,
    Differs(&'static str),
    NotOurs,
}

/// At most this many steps in a row without waiting: a repair takes four (read, read again,
/// register, refresh), so more means two views that keep sending each other back.
const MAX_STEPS_IN_A_ROW: u32 = 16;

/// Capped exponential backoff with "equal jitter": each wait is between half and all of the
/// current step, so many sidecars retrying at once spread out.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: RetryPolicy,
    next: Duration,
}

impl Backoff {
    pub fn new(policy: RetryPolicy) -> Self {
        Backoff {
            policy,
            next: policy.initial,
        }
    }

    /// The next wait; the step doubles up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = self.next.saturating_mul(2).min(self.policy.max);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.next = self.policy.initial;
    }
}

/// `now + d`, or a moment so far ahead that it never comes when `d` does not fit (the manifest
/// caps durations at Go's ~292 years, which fits; this keeps the arithmetic total anyway).
pub fn instant_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// "Never" for timers: about 30 years, as tokio's own far future.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// Keeps one instance registered and its check following the verdict.
pub struct Reconciler<R> {
    spec: ServiceSpec,
    desired: AgentServiceRegistration,
    registry: R,
    metrics: Arc<Metrics>,
    status: StatusEntry,
    retry: RetryPolicy,
    resync_interval: Duration,
    anti_entropy: AntiEntropy,
    /// The client's token generation of our last registration.
    registered_with: std::sync::atomic::AtomicU64,
}

/// The anti-entropy alarm shared by every reconciler of a sidecar. Only the first
/// `consul.blockingWatches` instances keep a blocking query open (a client may hold only so many
/// connections to an agent); an agent that restarts empty loses every instance at once, so when a
/// watcher sees its instance missing or changed it rings the alarm and every reconciler reads its
/// own instance again. Unwatched instances are also read every `resyncInterval`, and any instance
/// found missing by a TTL refresh (404) is registered again at once.
#[derive(Clone)]
pub struct AntiEntropy {
    alarm: Arc<watch::Sender<u64>>,
    watched: bool,
}

impl AntiEntropy {
    /// A new alarm; hand [`AntiEntropy::member`] to each reconciler.
    pub fn alarm() -> Arc<watch::Sender<u64>> {
        Arc::new(watch::channel(0).0)
    }

    /// A reconciler's membership: `watched` keeps a blocking query on its instance.
    pub fn member(alarm: &Arc<watch::Sender<u64>>, watched: bool) -> AntiEntropy {
        AntiEntropy {
            alarm: Arc::clone(alarm),
            watched,
        }
    }

    fn ring(&self) {
        self.alarm.send_modify(|generation| *generation += 1);
    }
}

/// What the watcher tells the reconciler: what Consul answered (or that it did not), and when the
/// question was asked, so that an answer older than our last registration is not mistaken for news.
struct Sighting {
    asked_at: Instant,
    answer: Result<ServiceWatch, ()>,
}

impl<R: Registry> Reconciler<R> {
    pub fn new(
        spec: ServiceSpec,
        registry: R,
        metrics: Arc<Metrics>,
        status: StatusEntry,
        retry: RetryPolicy,
        resync_interval: Duration,
        anti_entropy: AntiEntropy,
    ) -> Self {
        let desired = AgentServiceRegistration::new(&spec, CheckStatus::Critical);
        Reconciler {
            spec,
            desired,
            registry,
            metrics,
            status,
            retry,
            resync_interval,
            anti_entropy,
            registered_with: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn labels(&self) -> [&str; 2] {
        [&self.spec.name, &self.spec.id]
    }

    /// Runs until `cancel`. Never returns an error: Consul trouble is retried, logged and shown in
    /// the status and metrics.
    pub async fn run(self, mut verdicts: watch::Receiver<Verdict>, cancel: CancellationToken) {
        // Unwatched instances keep `sightings_tx` unused (but alive) here, so `recv` just waits.
        let (sightings_tx, mut sightings) = mpsc::channel::<Sighting>(4);
        let registered = Arc::new(Notify::new());
        let watcher_cancel = cancel.child_token();
        let _stop_watcher = watcher_cancel.clone().drop_guard();
        if self.anti_entropy.watched {
            tokio::spawn(watch_instance(
                self.registry.clone(),
                self.spec.clone(),
                self.resync_interval,
                self.retry,
                sightings_tx,
                Arc::clone(&registered),
                watcher_cancel,
            ));
        }
        let mut alarm = self.anti_entropy.alarm.subscribe();
        // Unwatched instances are read again every resync interval (a watched one's blocking
        // query returns at least that often, which is its resync).
        let mut resync = tokio::time::interval_at(
            instant_after(self.resync_interval).into(),
            self.resync_interval,
        );

        let mut view = View::Unknown;
        let mut acked: Option<(CheckStatus, String)> = None;
        let mut ever_registered = false;
        let mut backoff = Backoff::new(self.retry);
        let mut retry_at: Option<Instant> = None;
        let mut last_logged: Option<String> = None;
        // Catalog mode needs no refreshes: the first one is due "never".
        let refresh_every = self
            .registry
            .refresh_every(&self.spec)
            .unwrap_or(FAR_FUTURE);
        let mut refresh_due = Instant::now();
        let mut registered_at: Option<Instant> = None;
        // When that registration had landed: a `Missing` asked before then may predate it.
        let mut registered_until: Option<Instant> = None;
        // When we last wrote the check: an older sighting of its status is not news.
        let mut written_at: Option<Instant> = None;
        // A differing check was read again and still differs (see `step`).
        let mut check_confirmed = false;
        // Steps taken in a row without waiting (see `MAX_STEPS_IN_A_ROW`).
        let mut in_a_row = 0;

        loop {
            if retry_at.is_none() {
                let verdict = verdicts.borrow_and_update().clone();
                // A sighting asked after this moment may already show this step's write; one
                // asked before it cannot (see `Sighting`).
                let step_started = Instant::now();
                let step = self
                    .step(
                        &mut view,
                        &mut acked,
                        &verdict,
                        refresh_due,
                        &mut ever_registered,
                        &mut check_confirmed,
                    )
                    .await;
                match step {
                    Ok(progress) => {
                        backoff.reset();
                        if last_logged.take().is_some() {
                            tracing::info!(instance = %self.spec.id, "Consul is in step again");
                        }
                        self.status.update(|s| {
                            s.consul.last_error = None;
                            s.consul.refused = false;
                        });
                        if let Some(when) = progress.refreshed_at {
                            refresh_due = when
                                .checked_add(refresh_every)
                                .unwrap_or_else(|| instant_after(FAR_FUTURE));
                            written_at = Some(step_started);
                        }
                        if progress.registered {
                            registered_at = Some(step_started);
                            registered_until = Some(Instant::now());
                            registered.notify_one();
                        }
                        if progress.again {
                            in_a_row += 1;
                            if in_a_row < MAX_STEPS_IN_A_ROW {
                                continue;
                            }
                            // Never a loop of calls that ignores cancellation, whatever Consul
                            // answers: wait as after an error, then go on from here.
                            tracing::warn!(instance = %self.spec.id, steps = in_a_row, "no settled state after many steps in a row; pausing before the next");
                            retry_at = Some(instant_after(self.retry.max));
                        }
                        in_a_row = 0;
                    }
                    Err(e) => {
                        in_a_row = 0;
                        let delay = match &e {
                            StepError::NotOurs => self.retry.max.max(Duration::from_secs(10)),
                            // Consul refused the request itself (400): the same request is
                            // refused again, so ask once per resync interval, not every second.
                            StepError::Consul(c) if c.is_refusal() => {
                                self.retry.max.max(self.resync_interval)
                            }
                            _ => backoff.next_delay(),
                        };
                        retry_at = Some(instant_after(delay));
                        self.report_error(&e, &mut last_logged);
                    }
                }
            }

            let wake_retry = async {
                match retry_at {
                    Some(t) => sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            let wake_refresh = async {
                match (&acked, retry_at) {
                    (Some(_), None) => sleep_until(refresh_due.into()).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wake_retry => retry_at = None,
                _ = wake_refresh => {}
                _ = resync.tick(), if !self.anti_entropy.watched => {
                    if view == View::InSync {
                        view = View::Unknown;
                    }
                }
                rang = alarm.changed() => {
                    if rang.is_err() {
                        return;
                    }
                    // Another instance went missing: Consul may have lost this one too.
                    if matches!(view, View::InSync) {
                        view = View::Unknown;
                    }
                    retry_at = None;
                    backoff.reset();
                }
                changed = verdicts.changed() => {
                    if changed.is_err() {
                        return; // the probe is gone: the sidecar is stopping
                    }
                }
                sighting = sightings.recv() => {
                    let Some(Sighting { asked_at, answer }) = sighting else { return };
                    if registered_at.is_some_and(|r| asked_at < r) {
                        continue; // asked before our last registration: stale
                    }
                    match answer {
                        // Asked while our registration was under way, the answer may predate
                        // it: read again rather than register twice.
                        Ok(ServiceWatch::Missing) if registered_until.is_some_and(|d| asked_at < d) => {
                            view = View::Unknown;
                        }
                        Ok(ServiceWatch::Missing) => {
                            view = View::Missing;
                            self.not_held();
                        }
                        Ok(ServiceWatch::Present { service, .. }) => {
                            let fresh = written_at.is_none_or(|w| asked_at >= w);
                            view = self.view_of(&service, acked.as_ref().filter(|_| fresh));
                            if view == View::NotOurs {
                                self.not_held();
                            }
                        }
                        // The watcher lost Consul; our own calls will find out more.
                        Err(()) => continue,
                    }
                    if matches!(view, View::Missing | View::Differs(_)) && ever_registered {
                        self.anti_entropy.ring();
                    }
                    // Consul answered the watcher, so it is worth trying now.
                    retry_at = None;
                    backoff.reset();
                }
            }
        }
    }

    /// One step towards the desired state.
    async fn step(
        &self,
        view: &mut View,
        acked: &mut Option<(CheckStatus, String)>,
        verdict: &Verdict,
        refresh_due: Instant,
        ever_registered: &mut bool,
        confirmed: &mut bool,
    ) -> Result<Progress, StepError> {
        let [service, instance] = self.labels();
        match view.clone() {
            View::Unknown => {
                self.registry.verify(false).await?;
                let seen = self.registry.read(&self.spec).await?;
                *view = match seen {
                    ServiceWatch::Missing => View::Missing,
                    ServiceWatch::Present { service, .. } => {
                        // An instance of ours found in Consul (adopted after a restart) counts as
                        // registered: a later repair puts back its current status, no flap.
                        if service.is_ours() {
                            *ever_registered = true;
                            self.registry.claim(&self.spec).await?;
                        }
                        self.view_of(&service, acked.as_ref())
                    }
                };
                if matches!(*view, View::Missing | View::NotOurs) {
                    self.not_held();
                }
                Ok(Progress::again())
            }
            // Our check is gone and our service may not be: an agent's read shows no check, so
            // the service alone reads as in sync; put the check back by registering again.
            View::CheckGone => {
                *view = match self.registry.read(&self.spec).await? {
                    ServiceWatch::Missing => View::Missing,
                    ServiceWatch::Present { service, .. } if service.is_ours() => {
                        View::Differs("check gone")
                    }
                    ServiceWatch::Present { .. } => View::NotOurs,
                };
                if matches!(*view, View::Missing | View::NotOurs) {
                    self.not_held();
                }
                Ok(Progress::again())
            }
            // Read again before every retry: the foreign instance may be gone by then (an
            // unwatched instance has no watcher to tell it).
            View::NotOurs => {
                *view = View::Unknown;
                Err(StepError::NotOurs)
            }
            // A check that differs may be an answer read before our own last write landed (the
            // watcher's read and our write cross): read once more before writing.
            View::Differs("check") if !*confirmed => {
                *view = match self.registry.read(&self.spec).await? {
                    ServiceWatch::Missing => View::Missing,
                    ServiceWatch::Present { service, .. } => self.view_of(&service, acked.as_ref()),
                };
                *confirmed = *view == View::Differs("check");
                Ok(Progress::again())
            }
            View::Missing | View::Differs(_) => {
                *confirmed = false;
                // Said once the repair is made (while Consul is unreachable the step is retried
                // with backoff, and the error is logged once, not the intent on every try).
                let (reason, why): (Option<&'static str>, String) = match view {
                    View::Differs("token") => (
                        None,
                        "the ACL token changed; registered the instance again so that Consul syncs it with the new token".into(),
                    ),
                    View::Differs("check gone") => (
                        Some("missing"),
                        "the instance's check was gone from Consul (deregistered on its own); registered the instance again".into(),
                    ),
                    View::Differs("check") => (
                        Some("changed"),
                        "the instance's check in Consul differed from the probe's verdict (a restored snapshot or a hand edit); registered it again".into(),
                    ),
                    View::Differs(field) => (
                        Some("changed"),
                        format!("instance in Consul differed from the manifest ({field}); registered it again"),
                    ),
                    _ if *ever_registered => (
                        Some("missing"),
                        "instance was missing from Consul; registered it again".into(),
                    ),
                    _ => (None, String::new()),
                };
                self.set_registered(false);
                // An instance that went missing may have been registered on another agent
                // behind the same address: make sure it is still the same one.
                self.registry.verify(*ever_registered).await?;
                // A repair puts back the current status directly, so watchers see no flap.
                let generation = self.registry.token_generation();
                self.registry
                    .register(
                        &self.spec,
                        verdict.status,
                        &verdict.output,
                        !*ever_registered,
                    )
                    .await?;
                self.registered_with
                    .store(generation, std::sync::atomic::Ordering::Relaxed);
                if let Some(reason) = reason {
                    tracing::warn!(%instance, "{why}");
                    self.metrics
                        .repairs
                        .with_label_values(&[service, instance, reason])
                        .inc();
                    self.status.update(|s| s.consul.repairs += 1);
                } else if !why.is_empty() {
                    tracing::info!(%instance, "{why}");
                } else {
                    tracing::info!(%instance, status = %verdict.status, "registered instance");
                }
                *ever_registered = true;
                *view = View::InSync;
                self.acknowledge(acked, verdict);
                Ok(Progress {
                    registered: true,
                    ..Progress::refreshed()
                })
            }
            View::InSync => {
                if *ever_registered
                    && self.registry.token_generation()
                        != self
                            .registered_with
                            .load(std::sync::atomic::Ordering::Relaxed)
                {
                    *view = View::Differs("token");
                    return Ok(Progress::again());
                }
                let changed = acked.as_ref() != Some(&(verdict.status, verdict.output.clone()));
                if !changed && Instant::now() < refresh_due {
                    return Ok(Progress::idle());
                }
                match self
                    .registry
                    .set_status(&self.spec, verdict.status, &verdict.output)
                    .await
                {
                    Ok(()) => {
                        self.acknowledge(acked, verdict);
                        Ok(Progress::refreshed())
                    }
                    Err(ConsulError::NotFound { .. }) => {
                        // Our check is gone; the instance may be gone too, or replaced by someone
                        // else's under the same ID: read before registering again.
                        *view = View::CheckGone;
                        *acked = None;
                        self.not_held();
                        Ok(Progress::again())
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// What a read of the instance says, compared with what we want: its definition, and (when
    /// the backend reports checks and we know what we last wrote) its check.
    fn view_of(&self, service: &AgentService, acked: Option<&(CheckStatus, String)>) -> View {
        match service.drift_from(&self.desired) {
            Drift::InSync => {}
            Drift::Changed { field } => return View::Differs(field),
            Drift::NotOurs => return View::NotOurs,
            Drift::Missing => return View::Missing,
        }
        if !self.registry.reports_check() {
            return View::InSync;
        }
        match (&service.check, acked) {
            (CheckSeen::Missing, _) => View::Differs("check"),
            (CheckSeen::Present { status, output }, Some((want, want_output)))
                if status != want.as_str() || output != want_output =>
            {
                View::Differs("check")
            }
            _ => View::InSync,
        }
    }

    /// Records that Consul now holds `verdict`.
    fn acknowledge(&self, acked: &mut Option<(CheckStatus, String)>, verdict: &Verdict) {
        let status_changed = acked.as_ref().map(|a| a.0) != Some(verdict.status);
        if status_changed && acked.is_some() {
            self.metrics
                .sync_lag
                .observe(verdict.changed_at.elapsed().as_secs_f64());
        }
        if status_changed && acked.is_some() {
            tracing::info!(instance = %self.spec.id, status = %verdict.status, "Consul check updated");
        }
        *acked = Some((verdict.status, verdict.output.clone()));
        self.set_registered(true);
        self.status.update(|s| {
            if status_changed {
                s.consul.changed_at = SystemTime::now();
            }
            s.consul.status = Some(verdict.status.as_str());
            s.consul.ever_registered = true;
        });
    }

    /// Consul does not hold our instance (found missing, or someone else's under our ID): what it
    /// acknowledged before no longer stands (`/readyz` counts it as not in Consul).
    fn not_held(&self) {
        self.set_registered(false);
        self.status.update(|s| s.consul.status = None);
    }

    fn set_registered(&self, registered: bool) {
        let [service, instance] = self.labels();
        self.metrics
            .instance_registered
            .with_label_values(&[service, instance])
            .set(i64::from(registered));
        self.status.update(|s| s.consul.registered = registered);
    }

    /// Logs an error when it is new (not on every retry) and shows it in the status.
    fn report_error(&self, e: &StepError, last_logged: &mut Option<String>) {
        let text = e.to_string();
        let refused = matches!(e, StepError::Consul(c) if c.is_refusal());
        if refused {
            let [service, instance] = self.labels();
            self.metrics
                .consul_refused
                .with_label_values(&[service, instance])
                .inc();
        }
        if last_logged.as_deref() != Some(&text) {
            match e {
                _ if refused => {
                    tracing::error!(instance = %self.spec.id, error = %text, retry_in = %crate::manifest::duration::format(self.retry.max.max(self.resync_interval)), "Consul refused the request; fix the manifest (retrying once per resync interval)")
                }
                StepError::Consul(ConsulError::Forbidden { .. }) | StepError::NotOurs => {
                    tracing::error!(instance = %self.spec.id, error = %text, "cannot sync with Consul; retrying with backoff")
                }
                _ => {
                    tracing::warn!(instance = %self.spec.id, error = %text, "cannot sync with Consul; retrying with backoff")
                }
            }
            *last_logged = Some(text.clone());
        }
        self.set_registered(false);
        self.status.update(|s| {
            s.consul.last_error = Some(text);
            s.consul.refused = refused;
        });
    }
}

/// What a successful step did.
struct Progress {
    /// Take another step at once (the view changed).
    again: bool,
    /// The instance was (re-)registered: the watcher may resume.
    registered: bool,
    /// Consul's TTL timer was reset at this moment.
    refreshed_at: Option<Instant>,
}

impl Progress {
    fn again() -> Self {
        Progress {
            again: true,
            registered: false,
            refreshed_at: None,
        }
    }
    fn idle() -> Self {
        Progress {
            again: false,
            registered: false,
            refreshed_at: None,
        }
    }
    fn refreshed() -> Self {
        Progress {
            again: false,
            registered: false,
            refreshed_at: Some(Instant::now()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Consul(#[from] ConsulError),
    #[error(
        "an instance with this ID exists in Consul but was not registered by consul-registrar (no managed-by meta); leaving it alone"
    )]
    NotOurs,
}

/// The anti-entropy watcher: a blocking query on the instance, re-armed after every answer. A
/// `Missing` answer pauses it until the reconciler has registered again (or a resync interval
/// passes), so a vanished instance is not polled in a tight loop.
async fn watch_instance<R: Registry>(
    registry: R,
    spec: ServiceSpec,
    wait: Duration,
    retry: RetryPolicy,
    sightings: mpsc::Sender<Sighting>,
    registered: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut hash: Option<String> = None;
    let mut backoff = Backoff::new(retry);
    loop {
        let asked_at = Instant::now();
        let answer = tokio::select! {
            _ = cancel.cancelled() => return,
            a = registry.watch(&spec, hash.as_deref().unwrap_or(""), wait) => a,
        };
        match answer {
            Ok(ServiceWatch::Present { service, hash: h }) => {
                backoff.reset();
                // An unchanged hash after `wait` is the periodic resync: it is reported all the same.
                hash = Some(h);
                let answer = Ok(ServiceWatch::Present {
                    service,
                    hash: String::new(),
                });
                if sightings.send(Sighting { asked_at, answer }).await.is_err() {
                    return;
                }
            }
            Ok(ServiceWatch::Missing) => {
                backoff.reset();
                hash = None;
                let answer = Ok(ServiceWatch::Missing);
                if sightings.send(Sighting { asked_at, answer }).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = registered.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            Err(_) => {
                hash = None;
                if sightings
                    .send(Sighting {
                        asked_at,
                        answer: Err(()),
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut b = Backoff::new(RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(400),
        });
        let waits: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        let steps = [100, 200, 400, 400, 400];
        for (w, s) in waits.iter().zip(steps) {
            let s = Duration::from_millis(s);
            assert!(*w >= s / 2 && *w <= s, "{w:?} outside [{:?}, {s:?}]", s / 2);
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
