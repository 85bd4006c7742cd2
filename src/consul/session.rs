//! Catalog mode's crash net, the holding side: one Consul session per sidecar and one liveness key
//! per instance, acquired by that session with behaviour `delete`.
//!
//! A catalog entry never expires, but a session does: renewed every `sessionTTL / 2` while the
//! sidecar lives (the pace of Consul's own `api.RenewPeriodic`; a failed renewal is retried
//! within seconds), invalidated by Consul between 1× and 2× the TTL after the last renewal (a
//! SIGKILL, an OOM kill, a lost node), which deletes every key it holds. The reapers
//! ([`super::reaper`]) then remove the instances whose key is gone. Renewals are not Raft writes.
//!
//! Order is the invariant: an instance's key is acquired before the instance is registered and
//! deleted with its deregistration, so a live instance always has its key; and the key's session
//! proves whose the instance is ([`super::catalog`] guards its writes with it). Sessions live on a
//! node of their own ([`SESSIONS_NODE`]), so removing an empty virtual node invalidates none.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use reqwest::Method;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::shared::{self, Ack, Beat, Desk, HolderValue};
use super::{ConsulClient, ConsulError, path_escape};
use crate::manifest::{CatalogSettings, MANAGED_BY_KEY, MANAGED_BY_VALUE, RetryPolicy, duration};
use crate::metrics::Metrics;
use crate::reconcile::Backoff;

/// The pod a sidecar runs in: its name (empty outside Kubernetes) and its UID (a random one
/// outside Kubernetes).
#[derive(Debug, Clone, Copy)]
pub struct Pod<'a> {
    pub name: &'a str,
    pub uid: &'a str,
}

/// The sidecar's session and the keys it holds.
pub struct Liveness {
    client: ConsulClient,
    settings: CatalogSettings,
    /// The session's name: `consul-registrar/<node>/<first instance id>/<pod>`, how a restarted
    /// sidecar (same pod) finds and adopts the session of its previous run, and never the session
    /// of another pod's sidecar with the same instance ID on the same node.
    name: String,
    /// The manifest's first instance: its key's holder is our previous run's session, if any.
    first_instance: String,
    /// Each instance's service (by instance ID), whose name is part of the instance's key.
    services: BTreeMap<String, String>,
    /// The pod's name (empty outside Kubernetes).
    pod: String,
    /// The current session, once made.
    session: tokio::sync::Mutex<Option<String>>,
    /// The instances whose key we hold (or want to): re-acquired when the session is replaced.
    held: std::sync::Mutex<BTreeSet<String>>,
    /// Of those, the ones acquired with the current session (cleared when it is replaced).
    acquired: std::sync::Mutex<BTreeSet<String>>,
    /// Set by a drain's end (or a failed drain's abandon), cleared by the next `hold` (a heal):
    /// meanwhile no session is made, however a renewal in flight turns out.
    ended: std::sync::atomic::AtomicBool,
    /// Rung when the session was lost: a reaper may have removed our instances meanwhile.
    alarm: Arc<watch::Sender<u64>>,
    metrics: Arc<Metrics>,
    retry: RetryPolicy,
    /// With `sharedSession`: this sidecar's side of the virtual node's shared session.
    shared: Option<Shared>,
    /// What the current session is to this sidecar.
    role: std::sync::Mutex<Role>,
    /// The services whose reaper key this sidecar holds with its session: it keeps a session of
    /// its own while it reaps (a peer never takes a reaper key).
    reaping: std::sync::Mutex<BTreeSet<String>>,
}

/// `consul.catalog.sharedSession`: where peers reach this sidecar, who it is, and its desk for
/// when it holds the virtual node's session.
struct Shared {
    advertise: String,
    pod_uid: String,
    http: reqwest::Client,
    desk: Arc<Desk>,
}

/// What the current session is to this sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    /// Its own (or none yet).
    Own,
    /// Its own, and the virtual node's shared session: its peers' keys are held with it too.
    Holder,
    /// The holder's, borrowed: it heartbeats the holder at `advertise` instead of renewing.
    Peer {
        advertise: String,
        last_ack: std::time::Instant,
    },
}

/// A KV entry as Consul answers it.
#[derive(Deserialize)]
struct KeyEntry {
    #[serde(rename = "Key", default)]
    key: String,
    #[serde(rename = "Session", default)]
    session: Option<String>,
    #[serde(rename = "Value", default)]
    value: Option<String>,
    #[serde(rename = "ModifyIndex", default)]
    modify_index: u64,
}

impl KeyEntry {
    /// The value's JSON field `field` (values are base64 in Consul's answers).
    fn value_field(&self, field: &str) -> Option<String> {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(self.value.as_deref()?)
            .ok()?;
        let value: serde_json::Value = serde_json::from_slice(&raw).ok()?;
        value.get(field)?.as_str().map(str::to_string)
    }
}

#[derive(Deserialize)]
struct SessionEntry {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Name", default)]
    name: String,
}

#[derive(Deserialize)]
struct Created {
    #[serde(rename = "ID")]
    id: String,
}

impl Liveness {
    /// `instances`: the manifest's (instance ID, service name) pairs, in its order.
    pub fn new(
        client: ConsulClient,
        settings: CatalogSettings,
        instances: &[(&str, &str)],
        pod: Pod<'_>,
        alarm: Arc<watch::Sender<u64>>,
        metrics: Arc<Metrics>,
        retry: RetryPolicy,
    ) -> Self {
        let Pod {
            name: pod,
            uid: pod_uid,
        } = pod;
        metrics.expect_session_renewals();
        let shared = settings.shared_session.as_ref().map(|advertise| Shared {
            advertise: advertise.clone(),
            pod_uid: pod_uid.to_string(),
            http: reqwest::Client::builder()
                .timeout(BEAT_TIMEOUT)
                .connect_timeout(BEAT_TIMEOUT)
                .build()
                .unwrap_or_default(),
            desk: Arc::new(Desk::new(
                settings.session_ttl,
                &settings.key_prefix,
                &settings.node,
                Arc::clone(&metrics),
            )),
        });
        let first_instance = instances.first().map_or("", |(id, _)| *id);
        Liveness {
            name: if pod.is_empty() {
                format!("consul-registrar/{}/{first_instance}", settings.node)
            } else {
                format!("consul-registrar/{}/{first_instance}/{pod}", settings.node)
            },
            first_instance: first_instance.to_string(),
            services: instances
                .iter()
                .map(|(id, service)| (id.to_string(), service.to_string()))
                .collect(),
            pod: pod.to_string(),
            client,
            settings,
            session: tokio::sync::Mutex::new(None),
            held: std::sync::Mutex::new(BTreeSet::new()),
            acquired: std::sync::Mutex::new(BTreeSet::new()),
            ended: std::sync::atomic::AtomicBool::new(false),
            alarm,
            metrics,
            retry,
            shared,
            role: std::sync::Mutex::new(Role::Own),
            reaping: std::sync::Mutex::new(BTreeSet::new()),
        }
    }

    /// The holder's desk, for the admin server's `POST /shared-session` (with `sharedSession`).
    pub fn desk(&self) -> Option<Arc<Desk>> {
        self.shared.as_ref().map(|s| Arc::clone(&s.desk))
    }

    fn role(&self) -> Role {
        self.role.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_role(&self, role: Role) {
        *self.role.lock().unwrap_or_else(|p| p.into_inner()) = role;
    }

    /// The liveness key of instance `id`: `<keyPrefix>/<service>/<node>/<id>`.
    pub fn key(&self, id: &str) -> String {
        let service = self.services.get(id).map_or("", String::as_str);
        key_of(&self.settings.key_prefix, service, &self.settings.node, id)
    }

    /// Acquires the key of instance `id` with our session (making or adopting the session first).
    /// Without `force`, a key already acquired with the current session is not asked for again
    /// (a registration forces it: the key may have been deleted by hand). A key held by another
    /// live session (another sidecar claiming the same node and ID, or the session of a pod
    /// being replaced, until it expires) is an error to retry.
    pub async fn hold(&self, id: &str, force: bool) -> Result<(), ConsulError> {
        self.ended.store(false, std::sync::atomic::Ordering::SeqCst);
        lock(&self.held).insert(id.to_string());
        let mut session = self.session().await?;
        if !force && lock(&self.acquired).contains(id) {
            return Ok(());
        }
        if let Some(shared) = &self.shared
            && !shared.desk.claim(&self.key(id))
        {
            // Our desk covers that key for another live pod (we hold the shared session): under
            // the same session, the acquire would succeed and take that pod's instance.
            return Err(ConsulError::KeyHeld { key: self.key(id) });
        }
        if let Role::Peer { advertise, .. } = self.role() {
            // The holder takes the key in first (it refuses one another live pod named), so that
            // it knows to release it should this pod stop heartbeating.
            match self.beat(&advertise, &session).await {
                Ok(ack) if ack.session == session => {
                    if ack.refused.contains(&self.key(id)) {
                        return Err(ConsulError::KeyHeld { key: self.key(id) });
                    }
                }
                _ => {
                    self.leave("the holder of the shared session did not take the key in")
                        .await;
                    session = self.session().await?;
                }
            }
        }
        match self.acquire(id, &session).await {
            // Consul no longer has the session (servers wiped or restored, a hand `destroy`): the
            // renewal would find out only at its next tick, up to TTL/2 later. Replace it now.
            Err(e) if is_invalid_session(&e) => {
                tracing::warn!(
                    "Consul no longer has our session (servers wiped or restored, or destroyed by hand): making a new one and taking the keys again"
                );
                self.forget(&session).await;
                let session = self.session().await?;
                self.acquire(id, &session).await?;
            }
            // With a shared session: held by another session of ours (a leave or a join whose
            // move did not complete)? Then it moves.
            Err(ConsulError::KeyHeld { key }) if self.shared.is_some() => {
                match self.read_key(&key).await? {
                    Some(e)
                        if e.value_field(POD_UID_FIELD).as_deref()
                            == self.shared.as_ref().map(|s| s.pod_uid.as_str())
                            && e.session.as_deref().is_some_and(|s| s != session) =>
                    {
                        let from = e.session.unwrap_or_default();
                        if !self.move_keys(&[id.to_string()], &from, &session).await? {
                            return Err(ConsulError::KeyHeld { key });
                        }
                    }
                    _ => return Err(ConsulError::KeyHeld { key }),
                }
            }
            other => other?,
        }
        // With a shared session, a leave (or a join) may have changed the session while we took
        // the key: it moved only the keys it knew of, and this one must follow. The session's
        // lock is held until the key counts as acquired, so the next one moves it too.
        let _current = match &self.shared {
            Some(_) => {
                let current = self.session.lock().await;
                if let Some(now) = current.as_deref()
                    && now != session
                    && !self
                        .move_keys(&[id.to_string()], &session, now)
                        .await
                        .unwrap_or(false)
                {
                    return Err(ConsulError::KeyHeld { key: self.key(id) });
                }
                Some(current)
            }
            None => None,
        };
        lock(&self.acquired).insert(id.to_string());
        Ok(())
    }

    /// Drops `session` as the current one (if it still is): the next [`hold`](Self::hold) makes
    /// or adopts another, and every reconciler reads its instance again (claiming its key anew).
    async fn forget(&self, session: &str) {
        let mut current = self.session.lock().await;
        if current.as_deref() == Some(session) {
            *current = None;
            lock(&self.acquired).clear();
            self.lost_role();
            drop(current);
            self.alarm.send_modify(|generation| *generation += 1);
        }
    }

    /// The current session is gone (its keys with it): no longer a holder or a peer.
    fn lost_role(&self) {
        if self.role() == Role::Holder
            && let Some(shared) = &self.shared
        {
            shared.desk.clear();
        }
        self.set_role(Role::Own);
    }

    /// The session holding the key of instance `id`, None when the key is absent or unheld.
    /// With a shared session, a key that names another pod is that pod's: it reads as held by
    /// another session (`<session> (pod <uid>)`).
    pub async fn holder(&self, id: &str) -> Result<Option<String>, ConsulError> {
        let Some(entry) = self.read_key(&self.key(id)).await? else {
            return Ok(None);
        };
        let Some(session) = entry.session.clone() else {
            return Ok(None);
        };
        if let Some(shared) = &self.shared
            && let Some(pod) = entry.value_field(POD_UID_FIELD)
            && pod != shared.pod_uid
        {
            return Ok(Some(format!("{session} (pod {pod})")));
        }
        Ok(Some(session))
    }

    /// The KV entry of `key`, None when absent.
    async fn read_key(&self, key: &str) -> Result<Option<KeyEntry>, ConsulError> {
        Ok(self
            .kv_entries("key_read", key, false)
            .await?
            .into_iter()
            .next())
    }

    /// `GET /v1/kv/<key>` (with `recurse`: every key under it); none when absent.
    async fn kv_entries(
        &self,
        operation: &'static str,
        key: &str,
        recurse: bool,
    ) -> Result<Vec<KeyEntry>, ConsulError> {
        let mut req = self
            .client
            .request(Method::GET, &format!("/v1/kv/{}", key_path(key)));
        if recurse {
            req = req.query(&[("recurse", "")]);
        }
        let answer = match self
            .client
            .send(operation, req, super::REQUEST_TIMEOUT)
            .await
        {
            Ok(a) => a,
            Err(ConsulError::Status { status: 404, .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
            operation,
            reason: e.to_string(),
        })
    }

    /// The first operations of a transaction that may touch instance `id` only while `session`
    /// holds its key for us: the session's check and, with a shared session (which holds other
    /// pods' keys too), the key's index as read when its value names our pod (a key naming
    /// another pod gets a check that fails).
    pub async fn guard(
        &self,
        id: &str,
        session: &str,
    ) -> Result<Vec<serde_json::Value>, ConsulError> {
        self.guard_key(&self.key(id), session).await
    }

    /// [`guard`](Self::guard) for the liveness key `key`.
    async fn guard_key(
        &self,
        key: &str,
        session: &str,
    ) -> Result<Vec<serde_json::Value>, ConsulError> {
        let Some(shared) = &self.shared else {
            return Ok(vec![serde_json::json!(
                { "KV": { "Verb": "check-session", "Key": key, "Session": session } }
            )]);
        };
        let entry = self.read_key(key).await?;
        let ours = entry.as_ref().filter(|e| {
            e.session.as_deref() == Some(session)
                && e.value_field(POD_UID_FIELD)
                    .is_none_or(|pod| pod == shared.pod_uid)
        });
        Ok(match ours {
            Some(e) => vec![
                serde_json::json!({ "KV": { "Verb": "check-session", "Key": key, "Session": session } }),
                serde_json::json!({ "KV": { "Verb": "check-index", "Key": key, "Index": e.modify_index } }),
            ],
            // Not ours (or gone): a check that fails, whatever the key.
            None => vec![serde_json::json!(
                { "KV": { "Verb": "check-session", "Key": key, "Session": NO_SESSION } }
            )],
        })
    }

    /// Stops holding the key of instance `id` here (its deregistration removed the key, in the
    /// same transaction, only if our session held it: see [`super::catalog`]).
    pub fn let_go(&self, id: &str) {
        lock(&self.held).remove(id);
        lock(&self.acquired).remove(id);
        if let Some(shared) = &self.shared {
            shared.desk.unclaim(&self.key(id));
        }
    }

    /// The current session, if there is one; never makes one.
    pub async fn current(&self) -> Option<String> {
        self.session.lock().await.clone()
    }

    /// Destroys the session (its keys go with it). After a drain: nothing of ours is left, and no
    /// session is made again until the next [`hold`](Self::hold) (a renewal still in flight that
    /// finds the session gone makes none).
    pub async fn end(&self) {
        let (role, id) = self.stop().await;
        let Some(id) = id else {
            return;
        };
        if let Role::Peer { advertise, .. } = &role {
            // A last heartbeat naming no key: the holder forgets our keys at once (a new pod
            // with the same instance ID may take them without waiting out the grace).
            let _ = self.beat(advertise, &id).await;
        }
        if !self.may_destroy(&role, &id).await {
            return;
        }
        if let Err(e) = destroy(&self.client, &id).await {
            tracing::warn!(error = %e, "could not destroy the session; Consul invalidates it within 2 × sessionTTL");
        }
    }

    /// After a failed drain: the session is no longer renewed, and is destroyed as soon as Consul
    /// answers again, so its keys go and the reapers remove the instances at once rather than
    /// after Consul invalidates it (as after a crash, within 2 × sessionTTL).
    pub async fn abandon(&self) {
        let (role, id) = self.stop().await;
        let Some(id) = id else {
            return;
        };
        if !self.may_destroy(&role, &id).await {
            return;
        }
        let ttl = self.settings.session_ttl;
        tracing::warn!(
            ttl = %duration::format(ttl),
            "the drain failed: the session is no longer renewed and is destroyed once Consul answers again (Consul invalidates it within 2 × sessionTTL anyway); a reaper then removes the instances"
        );
        // In the background: Consul was unreachable moments ago, and the caller must not wait.
        // Tried again until it is done or Consul has invalidated the session by itself; a
        // destroy that lands after a heal made a new session touches only this old one.
        let client = self.client.clone();
        let mut backoff = Backoff::new(self.retry);
        let give_up = crate::reconcile::instant_after(ttl.saturating_mul(2));
        tokio::spawn(async move {
            loop {
                match destroy(&client, &id).await {
                    Ok(()) => {
                        tracing::info!("destroyed the session of the failed drain");
                        return;
                    }
                    Err(e) if e.is_retryable() && std::time::Instant::now() < give_up => {
                        tracing::debug!(error = %e, "cannot yet destroy the session of the failed drain; retrying");
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not destroy the session of the failed drain; Consul invalidates it within 2 × sessionTTL");
                        return;
                    }
                }
            }
        });
    }

    /// Marks the session ended and takes it (no renewal, no new one until the next `hold`), with
    /// what it was to us (read under the same lock, so a join finishing meanwhile is seen).
    async fn stop(&self) -> (Role, Option<String>) {
        let mut current = self.session.lock().await;
        let role = self.role();
        self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
        lock(&self.held).clear();
        lock(&self.acquired).clear();
        if let Some(shared) = &self.shared {
            // Heartbeats are refused from now: the peers move their keys at once.
            shared.desk.close();
        }
        self.set_role(Role::Own);
        (role, current.take())
    }

    /// Whether the ended session `id`, which was `role`, is ours to destroy: a peer's is the
    /// holder's; a holder's that covered peers lately is left to expire (its holder key
    /// released), so that they have the time to move their keys to sessions of their own.
    async fn may_destroy(&self, role: &Role, id: &str) -> bool {
        match role {
            Role::Peer { .. } => false,
            Role::Holder
                if self
                    .shared
                    .as_ref()
                    .is_some_and(|s| s.desk.covered_lately()) =>
            {
                // The holder key and the reapers' keys: another sidecar takes over at once, not
                // once the session expires.
                let prefix = &self.settings.key_prefix;
                let mut keys = vec![shared::holder_key(prefix, &self.settings.node)];
                keys.extend(
                    lock(&self.reaping)
                        .iter()
                        .map(|service| reaper_key(prefix, service)),
                );
                for key in keys {
                    self.release_key(&key, id).await;
                }
                tracing::info!(
                    "left the virtual node's shared session to expire: its peers move their keys to sessions of their own meanwhile"
                );
                false
            }
            _ => true,
        }
    }

    /// Renews the session every `sessionTTL / 2` until `cancel`; a lost session is replaced and
    /// every held key acquired again.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        if self.shared.is_some() {
            return self.run_shared(cancel).await;
        }
        let every = self.renew_every();
        let mut backoff = Backoff::new(self.retry);
        let mut wait = every;
        let mut failing = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let current = self.session.lock().await.clone();
            let Some(session) = current else {
                // No session yet (nothing registered), or it was just ended by a drain.
                wait = every;
                continue;
            };
            wait = self.renew_step(&session, &mut backoff, &mut failing).await;
        }
    }

    /// With a shared session, every `sessionTTL / 10` until `cancel`: a peer heartbeats its
    /// holder (and leaves when it stops answering); a holder or a sidecar on its own renews every
    /// `sessionTTL / 2`; the holder releases the keys of pods that stopped heartbeating; a sidecar
    /// on its own that does not reap tries every sessionTTL or so to hold or join the node's
    /// shared session.
    async fn run_shared(self: Arc<Self>, cancel: CancellationToken) {
        use std::time::Instant;
        let ttl = self.settings.session_ttl;
        let tick = ttl / 10;
        let mut backoff = Backoff::new(self.retry);
        let mut failing = false;
        let mut renew_at = Instant::now() + self.renew_every();
        let mut join_at = Instant::now() + ttl;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            // The session and what it is to us, read together (a join or a leave changes both
            // under the session's lock).
            let (session, role) = {
                let current = self.session.lock().await;
                (current.clone(), self.role())
            };
            let Some(session) = session else {
                continue;
            };
            match role {
                Role::Peer {
                    advertise,
                    last_ack,
                } => {
                    // After a leave, the next try to join is a sessionTTL or so away.
                    join_at = Instant::now() + ttl.mul_f64(0.8 + 0.2 * fastrand::f64());
                    match self.beat(&advertise, &session).await {
                        Ok(ack) if ack.session == session => {}
                        Ok(_) => self.leave("the holder holds another session").await,
                        Err(BeatError::Refused(why)) => {
                            self.leave(&format!("the holder refused the heartbeat: {why}"))
                                .await;
                        }
                        Err(BeatError::NoAnswer(why)) if last_ack.elapsed() >= ttl / 2 => {
                            self.leave(&format!(
                                "the holder has not answered for sessionTTL / 2: {why}"
                            ))
                            .await;
                        }
                        Err(BeatError::NoAnswer(_)) => {}
                    }
                    renew_at = Instant::now() + self.renew_every();
                }
                role => {
                    if Instant::now() >= renew_at {
                        let wait = self.renew_step(&session, &mut backoff, &mut failing).await;
                        renew_at = Instant::now() + wait;
                    }
                    if role == Role::Holder {
                        self.release_overdue(&session).await;
                    } else if Instant::now() >= join_at {
                        join_at = Instant::now() + ttl.mul_f64(0.8 + 0.2 * fastrand::f64());
                        self.try_join(&session).await;
                    }
                }
            }
        }
    }

    /// How often a session is renewed: half its TTL, as Consul's own `api.RenewPeriodic` does.
    /// Consul invalidates it no sooner than a TTL after the last renewal (in practice 2 × TTL), so
    /// a renewal that fails is retried (with backoff, within this) well before.
    fn renew_every(&self) -> std::time::Duration {
        self.settings.session_ttl / 2
    }

    /// One renewal of `session`; the wait before the next.
    async fn renew_step(
        &self,
        session: &str,
        backoff: &mut Backoff,
        failing: &mut bool,
    ) -> std::time::Duration {
        let every = self.renew_every();
        match self.renew(session).await {
            Ok(true) => {
                self.renewal("ok");
                if let Some(shared) = &self.shared {
                    shared.desk.renewed();
                }
                if std::mem::take(failing) {
                    tracing::info!("session renewed again");
                }
                backoff.reset();
                every
            }
            // Destroyed by the drain while this renewal was on its way: nothing to redo.
            Ok(false) if self.ended.load(std::sync::atomic::Ordering::SeqCst) => every,
            Ok(false) => {
                self.renewal("lost");
                tracing::warn!(
                    ttl = %duration::format(self.settings.session_ttl),
                    "the session expired (Consul did not hear from us for too long, or it was destroyed); its liveness keys are gone and other sidecars may reap our instances: making a new session and taking the keys again"
                );
                {
                    let mut current = self.session.lock().await;
                    if current.as_deref() == Some(session) {
                        *current = None;
                        lock(&self.acquired).clear();
                        self.lost_role();
                    }
                }
                let wait = match self.reacquire().await {
                    Ok(()) => {
                        backoff.reset();
                        every
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not take the liveness keys again; retrying");
                        backoff.next_delay()
                    }
                };
                // Our instances may be gone (reaped): every reconciler reads its own again.
                self.alarm.send_modify(|generation| *generation += 1);
                wait
            }
            Err(e) => {
                self.renewal("error");
                if !*failing {
                    *failing = true;
                    tracing::warn!(error = %e, "cannot renew the session; retrying (it expires after 1–2 × sessionTTL without a renewal)");
                }
                backoff.next_delay().min(every)
            }
        }
    }

    fn renewal(&self, outcome: &str) {
        self.metrics
            .session_renewals
            .with_label_values(&[outcome])
            .inc();
    }

    /// A new (or adopted) session, and every held key acquired with it; nothing once a drain
    /// ended the session (checked under the session's lock, so a drain ending meanwhile wins).
    async fn reacquire(&self) -> Result<(), ConsulError> {
        let session = {
            let mut current = self.session.lock().await;
            if self.ended.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(());
            }
            self.session_locked(&mut current).await?
        };
        let ids: Vec<String> = lock(&self.held).iter().cloned().collect();
        for id in ids {
            self.acquire(&id, &session).await?;
            lock(&self.acquired).insert(id);
        }
        Ok(())
    }

    /// The current session; else the one our previous run left on the node (same name), if it
    /// is still valid; else a new one.
    async fn session(&self) -> Result<String, ConsulError> {
        let mut current = self.session.lock().await;
        self.session_locked(&mut current).await
    }

    /// [`session`](Self::session) with its lock held by the caller.
    async fn session_locked(&self, current: &mut Option<String>) -> Result<String, ConsulError> {
        if let Some(id) = current.as_ref() {
            return Ok(id.clone());
        }
        // Sessions live on a node of their own, never on a virtual node with instances, so that
        // removing an empty virtual node invalidates no session. The node comes first.
        self.register_node().await?;
        if let Some(id) = self.previous(current).await? {
            self.take_holder(&id, true).await;
            return Ok(id);
        }
        if let Some(id) = self.join(current).await {
            return Ok(id);
        }
        let id = self.create(current).await?;
        self.take_holder(&id, false).await;
        Ok(id)
    }

    /// A new session of our own, made the current one.
    async fn create(&self, current: &mut Option<String>) -> Result<String, ConsulError> {
        let body = serde_json::json!({
            "Name": self.name,
            "Node": SESSIONS_NODE,
            "TTL": duration::format(self.settings.session_ttl),
            "Behavior": "delete",
            // Without an empty list Consul ties the session to the node's serfHealth check,
            // which a node without an agent does not have.
            "NodeChecks": [],
            // A key of an invalidated session may be taken again at once (by our next session).
            "LockDelay": "0s",
        });
        let req = self
            .client
            .request(Method::PUT, "/v1/session/create")
            .json(&body);
        let answer = self
            .client
            .send("session_create", req, super::REQUEST_TIMEOUT)
            .await?;
        let created: Created =
            serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
                operation: "session_create",
                reason: e.to_string(),
            })?;
        tracing::info!(
            ttl = %duration::format(self.settings.session_ttl),
            node = %self.settings.node,
            "session created"
        );
        *current = Some(created.id.clone());
        Ok(created.id)
    }

    /// With `sharedSession`, no session yet: the node's shared session, if its holder answers a
    /// heartbeat (made the current one; our keys are then taken with it).
    async fn join(&self, current: &mut Option<String>) -> Option<String> {
        let shared = self.shared.as_ref()?;
        let (session, holder) = self.read_holder().await?;
        if holder.pod_uid == shared.pod_uid {
            return None;
        }
        match self.beat(&holder.advertise, &session).await {
            Ok(ack) if ack.session == session => {
                self.set_role(Role::Peer {
                    advertise: holder.advertise,
                    last_ack: std::time::Instant::now(),
                });
                tracing::info!(
                    "joined the virtual node's shared session: the holder's session holds our keys, and we heartbeat it instead of renewing a session"
                );
                *current = Some(session.clone());
                Some(session)
            }
            Ok(_) | Err(_) => None,
        }
    }

    /// The shared session's holder key, when a session holds it: that session and the value.
    async fn read_holder(&self) -> Option<(String, HolderValue)> {
        let key = shared::holder_key(&self.settings.key_prefix, &self.settings.node);
        match self.read_key(&key).await {
            Ok(Some(entry)) => {
                let session = entry.session.clone()?;
                let advertise = entry.value_field("advertise")?;
                let pod_uid = entry.value_field(POD_UID_FIELD)?;
                Some((session, HolderValue { advertise, pod_uid }))
            }
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the shared session's holder key");
                None
            }
        }
    }

    /// With `sharedSession`: takes the holder key with our session `own` if it is free, making
    /// this sidecar the holder. `adopted`: our previous run's session, which may already hold
    /// peers' keys: they are covered again (released unless their pods heartbeat).
    async fn take_holder(&self, own: &str, adopted: bool) {
        let Some(shared) = &self.shared else {
            return;
        };
        let key = shared::holder_key(&self.settings.key_prefix, &self.settings.node);
        let value = HolderValue {
            advertise: shared.advertise.clone(),
            pod_uid: shared.pod_uid.clone(),
        };
        let req = self
            .client
            .request(Method::PUT, &format!("/v1/kv/{}", key_path(&key)))
            .query(&[("acquire", own)])
            .json(&value);
        match self
            .client
            .send("holder_key", req, super::REQUEST_TIMEOUT)
            .await
        {
            Ok(answer) if String::from_utf8_lossy(&answer.body).trim() == "true" => {
                let known = if adopted {
                    match self.held_for_peers(own).await {
                        Ok(known) => known,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot list the keys our previous run held for its peers; those of pods that are gone stay until the session ends");
                            Vec::new()
                        }
                    }
                } else {
                    Vec::new()
                };
                shared.desk.open(own, known);
                self.set_role(Role::Holder);
                tracing::info!(advertise = %shared.advertise, "holding the virtual node's shared session: its other sidecars may take their keys with it");
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot take the shared session's holder key"),
        }
    }

    /// The keys on our virtual node that `session` holds for other pods (key, pod).
    async fn held_for_peers(&self, session: &str) -> Result<Vec<(String, String)>, ConsulError> {
        let prefix = format!("{}/", self.settings.key_prefix);
        let entries = self.kv_entries("key_list", &prefix, true).await?;
        let ours: BTreeSet<String> = self.services.keys().map(|id| self.key(id)).collect();
        let node_part = format!("/{}/", self.settings.node);
        Ok(entries
            .into_iter()
            .filter(|e| e.session.as_deref() == Some(session) && !ours.contains(&e.key))
            .filter(|e| {
                e.key
                    .strip_prefix(&prefix)
                    .is_some_and(|rest| !rest.starts_with('.') && rest.contains(&node_part))
            })
            .map(|e| {
                let pod = e.value_field(POD_UID_FIELD).unwrap_or_default();
                (e.key, pod)
            })
            .collect())
    }

    /// `PUT /v1/kv/<key>?release=<session>`: the key stays, free.
    async fn release_key(&self, key: &str, session: &str) {
        let req = self
            .client
            .request(Method::PUT, &format!("/v1/kv/{}", key_path(key)))
            .query(&[("release", session)]);
        if let Err(e) = self
            .client
            .send("key_release", req, super::REQUEST_TIMEOUT)
            .await
        {
            tracing::debug!(error = %e, key, "cannot release a key; it goes when the session expires");
        }
    }

    /// One heartbeat to the holder at `advertise` for `session`, naming every key we hold (or
    /// are about to take).
    async fn beat(&self, advertise: &str, session: &str) -> Result<Ack, BeatError> {
        let Some(shared) = &self.shared else {
            return Err(BeatError::Refused("no shared session configured".into()));
        };
        let keys: Vec<String> = lock(&self.held).iter().map(|id| self.key(id)).collect();
        let beat = Beat {
            pod_uid: shared.pod_uid.clone(),
            keys,
        };
        let sent = shared
            .http
            .post(format!("http://{advertise}{}", shared::PATH))
            .header(shared::SESSION_HEADER, session)
            .json(&beat)
            .send()
            .await;
        let outcome = match sent {
            Ok(answer) if answer.status().is_success() => match answer.json::<Ack>().await {
                Ok(ack) => Ok(ack),
                Err(e) => Err(BeatError::NoAnswer(e.to_string())),
            },
            Ok(answer) => Err(BeatError::Refused(format!("HTTP {}", answer.status()))),
            // Nothing listens there (the holder is gone): no need to wait for it.
            Err(e) if e.is_connect() && !e.is_timeout() => {
                Err(BeatError::Refused(format!("cannot connect: {e}")))
            }
            Err(e) => Err(BeatError::NoAnswer(e.to_string())),
        };
        let label = match &outcome {
            Ok(_) => "ok",
            Err(BeatError::Refused(_)) => "rejected",
            Err(BeatError::NoAnswer(_)) => "error",
        };
        self.metrics
            .shared_session_beats
            .with_label_values(&[label])
            .inc();
        if outcome.is_ok() {
            let mut role = self.role.lock().unwrap_or_else(|p| p.into_inner());
            if let Role::Peer { last_ack, .. } = &mut *role {
                *last_ack = std::time::Instant::now();
            }
        }
        outcome
    }

    /// A peer leaves the shared session (`why`): a session of its own, and its keys moved to it in
    /// one transaction, so none ever disappears (and no reaper takes its instances) as long as
    /// the holder's session is valid. If it is not (keys already gone), the keys are taken
    /// again and every reconciler reads its instance.
    async fn leave(&self, why: &str) {
        let mut current = self.session.lock().await;
        if !matches!(self.role(), Role::Peer { .. }) {
            return;
        }
        let borrowed = current.take();
        self.set_role(Role::Own);
        if self.ended.load(std::sync::atomic::Ordering::SeqCst) {
            lock(&self.acquired).clear();
            return;
        }
        tracing::warn!(
            reason = why,
            "leaving the virtual node's shared session: making a session of our own and moving our keys to it"
        );
        let own = match self.create(&mut current).await {
            Ok(own) => own,
            Err(e) => {
                tracing::warn!(error = %e, "cannot make a session of our own; trying again");
                lock(&self.acquired).clear();
                drop(current);
                self.alarm.send_modify(|generation| *generation += 1);
                return;
            }
        };
        let ids: Vec<String> = lock(&self.acquired).iter().cloned().collect();
        let moved = match &borrowed {
            Some(borrowed) if !ids.is_empty() => match self.move_keys(&ids, borrowed, &own).await {
                Ok(moved) => moved,
                // No answer: applied or not, the keys tell; else once more.
                Err(_) if self.all_held_by(&ids, &own).await => true,
                Err(_) => self.move_keys(&ids, borrowed, &own).await.unwrap_or(false),
            },
            _ => ids.is_empty(),
        };
        drop(current);
        if !moved {
            lock(&self.acquired).clear();
            self.alarm.send_modify(|generation| *generation += 1);
        }
        self.take_holder(&own, false).await;
    }

    /// A sidecar on its own session `own` (not a holder, not reaping): takes the holder key if it
    /// is free, else joins its holder, moving our keys from `own` to the shared session in one
    /// transaction and then destroying `own`.
    async fn try_join(&self, own: &str) {
        if !lock(&self.reaping).is_empty() || self.ended.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let Some(shared) = &self.shared else {
            return;
        };
        let Some((session, holder)) = self.read_holder().await else {
            self.take_holder(own, false).await;
            return;
        };
        if session == own || holder.pod_uid == shared.pod_uid {
            // Ours already (an acquire whose answer was lost, or a restarted holder): act on it.
            if session == own && self.role() == Role::Own {
                self.take_holder(own, true).await;
            }
            return;
        }
        let mut current = self.session.lock().await;
        if current.as_deref() != Some(own)
            || self.role() != Role::Own
            || self.ended.load(std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let ids: Vec<String> = lock(&self.acquired).iter().cloned().collect();
        if ids.len() != lock(&self.held).len() {
            // A key is being taken: next time.
            return;
        }
        let Ok(ack) = self.beat(&holder.advertise, &session).await else {
            return;
        };
        if ack.session != session || !ack.refused.is_empty() {
            return;
        }
        let moved = match self.move_keys(&ids, own, &session).await {
            Ok(moved) => moved,
            // No answer: it may have been applied (a leader election); the keys tell.
            Err(_) => self.all_held_by(&ids, &session).await,
        };
        if !moved {
            return;
        }
        *current = Some(session);
        self.set_role(Role::Peer {
            advertise: holder.advertise,
            last_ack: std::time::Instant::now(),
        });
        drop(current);
        tracing::info!(
            "joined the virtual node's shared session: our own session is no longer needed"
        );
        if let Err(e) = destroy(&self.client, own).await {
            tracing::debug!(error = %e, "could not destroy our own session after joining; it expires");
        }
    }

    /// Whether `session` holds the keys of all instances `ids`, naming our pod.
    async fn all_held_by(&self, ids: &[String], session: &str) -> bool {
        let Some(shared) = &self.shared else {
            return false;
        };
        for id in ids {
            match self.read_key(&self.key(id)).await {
                Ok(Some(e))
                    if e.session.as_deref() == Some(session)
                        && e.value_field(POD_UID_FIELD).as_deref() == Some(&shared.pod_uid) => {}
                _ => return false,
            }
        }
        true
    }

    /// Moves the keys of instances `ids` from session `from` to `to` in one transaction (each
    /// unlocked by `from` and locked by `to`): all or none.
    async fn move_keys(&self, ids: &[String], from: &str, to: &str) -> Result<bool, ConsulError> {
        use base64::Engine as _;
        let mut ops = Vec::new();
        for id in ids {
            let key = self.key(id);
            let value =
                base64::engine::general_purpose::STANDARD.encode(self.key_value(id).to_string());
            ops.push(
                serde_json::json!({ "KV": { "Verb": "unlock", "Key": key, "Session": from } }),
            );
            ops.push(serde_json::json!({ "KV": { "Verb": "lock", "Key": key, "Session": to, "Value": value } }));
        }
        self.txn("key_move", &serde_json::Value::Array(ops)).await
    }

    /// `PUT /v1/txn`: false when Consul refused it (409: one of its checks failed, nothing
    /// applied).
    async fn txn(
        &self,
        operation: &'static str,
        ops: &serde_json::Value,
    ) -> Result<bool, ConsulError> {
        self.client.txn(operation, ops, |_| true).await
    }

    /// The holder: deletes the keys of pods that stopped heartbeating (guarded by our session, so
    /// a key its pod moved to a session of its own stays), and the reapers remove their
    /// instances.
    async fn release_overdue(&self, session: &str) {
        let Some(shared) = &self.shared else {
            return;
        };
        for key in shared.desk.overdue() {
            let ops = serde_json::json!([
                { "KV": { "Verb": "check-session", "Key": key, "Session": session } },
                { "KV": { "Verb": "delete", "Key": key } },
            ]);
            match self.txn("key_release", &ops).await {
                Ok(true) => {
                    self.metrics.shared_session_released.inc();
                    tracing::info!(key = %key, "released the liveness key of a pod that stopped heartbeating: its instance is reaped");
                }
                // Gone already (its pod drained), or no longer ours (its pod left).
                Ok(false) => {}
                Err(e) => {
                    tracing::debug!(error = %e, key = %key, "cannot release a gone pod's key yet; trying again");
                    shared.desk.requeue(&key);
                }
            }
        }
    }

    /// Reaper keys held with our session: a sidecar that reaps keeps a session of its own.
    pub fn reaping(&self, service: &str, leading: bool) {
        let mut reaping = lock(&self.reaping);
        if leading {
            reaping.insert(service.to_string());
        } else {
            reaping.remove(service);
        }
    }

    /// The session a reaper may take a reaper key with: ours, never a borrowed one.
    pub async fn own_current(&self) -> Option<String> {
        let current = self.session.lock().await;
        if matches!(self.role(), Role::Peer { .. }) {
            return None;
        }
        current.clone()
    }

    /// Whether our keys are held with the holder's session.
    pub fn is_peer(&self) -> bool {
        matches!(self.role(), Role::Peer { .. })
    }

    /// Whether this sidecar holds the virtual node's shared session (and answers for its view).
    pub fn is_holder(&self) -> bool {
        self.role() == Role::Holder
    }

    /// A peer's holder: where its admin server is, the shared session's ID (the credential its
    /// admin server asks for), and our pod's UID (whose keys it covers).
    pub async fn holder_endpoint(&self) -> Option<(String, String, String)> {
        let session = self.session.lock().await.clone()?;
        let pod_uid = self.shared.as_ref()?.pod_uid.clone();
        match self.role() {
            Role::Peer { advertise, .. } => Some((advertise, session, pod_uid)),
            _ => None,
        }
    }

    /// A peer whose service's reaper key is free leaves the shared session, to take the key
    /// with a session of its own.
    pub async fn leave_to_reap(&self) {
        self.leave("a reaper keeps a session of its own, and this service has none")
            .await;
    }

    /// The value of instance `id`'s liveness key.
    fn key_value(&self, id: &str) -> serde_json::Value {
        let mut value = serde_json::json!({
            "node": self.settings.node,
            "instance": id,
            MANAGED_BY_KEY: MANAGED_BY_VALUE,
        });
        if let Some(shared) = &self.shared {
            value[POD_UID_FIELD] = serde_json::Value::String(shared.pod_uid.clone());
        }
        value
    }

    /// `PUT /v1/session/renew/:id`: false when Consul no longer has the session.
    async fn renew(&self, session: &str) -> Result<bool, ConsulError> {
        let req = self.client.request(
            Method::PUT,
            &format!("/v1/session/renew/{}", path_escape(session)),
        );
        match self
            .client
            // A renewal that hangs (a connection gone dead) must not outlast the next one due.
            .send(
                "session_renew",
                req,
                self.renew_every().min(super::REQUEST_TIMEOUT),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(ConsulError::Status { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// `PUT /v1/kv/<key>?acquire=<session>`.
    async fn acquire(&self, id: &str, session: &str) -> Result<(), ConsulError> {
        let key = self.key(id);
        let value = self.key_value(id);
        let req = self
            .client
            .request(Method::PUT, &format!("/v1/kv/{}", key_path(&key)))
            .query(&[("acquire", session)])
            .json(&value);
        let answer = self
            .client
            .send("key_acquire", req, super::REQUEST_TIMEOUT)
            .await?;
        if String::from_utf8_lossy(&answer.body).trim() == "true" {
            Ok(())
        } else {
            Err(ConsulError::KeyHeld { key })
        }
    }

    /// Our previous run's session (same name: same node, first instance and pod), if Consul still
    /// has it: renewed and made the current one. Found as the holder of the first instance's key
    /// (two reads, however many sessions there are), or (a run of a version before the sessions'
    /// node) among the sessions on the virtual node. A previous run that died between making its
    /// session and taking that key is not found: its session expires.
    async fn previous(&self, current: &mut Option<String>) -> Result<Option<String>, ConsulError> {
        let mut sessions = Vec::new();
        if let Some(holder) = self.holder(&self.first_instance).await? {
            let req = self.client.request(
                Method::GET,
                &format!("/v1/session/info/{}", path_escape(&holder)),
            );
            let answer = self
                .client
                .send("session_list", req, super::REQUEST_TIMEOUT)
                .await?;
            let found: Option<Vec<SessionEntry>> =
                serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
                    operation: "session_list",
                    reason: e.to_string(),
                })?;
            sessions.extend(found.unwrap_or_default());
        }
        sessions.extend(self.sessions_on(&self.settings.node).await?);
        for old in sessions.iter().filter(|s| s.name == self.name) {
            if self.renew(&old.id).await? {
                tracing::info!("adopted the session of this sidecar's previous run");
                *current = Some(old.id.clone());
                if let Err(e) = self.release_dropped(&old.id).await {
                    tracing::warn!(error = %e, "could not check for instances of the previous run that the manifest no longer has; any stay until the pod ends");
                }
                return Ok(Some(old.id.clone()));
            }
        }
        Ok(None)
    }

    /// After adopting our previous run's `session`: the instances on our virtual node whose key
    /// it holds but that the manifest no longer has (edited across a restart of the sidecar in the
    /// same pod) are deregistered with their keys. Nothing else would: a held key keeps reapers
    /// away, and the drain removes only the manifest's instances. Each goes in one transaction
    /// that checks our session holds its key, so another pod's instance is never touched.
    async fn release_dropped(&self, session: &str) -> Result<(), ConsulError> {
        let node = self.settings.node.as_str();
        let found: Option<super::reaper::NodeServices> =
            super::reaper::node_services(&self.client, node, false).await?;
        for entry in found.and_then(|f| f.services).unwrap_or_default() {
            let meta = entry.meta.unwrap_or_default();
            let managed = meta
                .get(MANAGED_BY_KEY)
                .is_some_and(|v| v == MANAGED_BY_VALUE);
            // Another pod's (when both say): not even asked about.
            let other_pod =
                !self.pod.is_empty() && meta.get("pod-name").is_some_and(|p| *p != self.pod);
            if !managed || other_pod || self.services.contains_key(&entry.id) {
                continue;
            }
            let key = key_of(&self.settings.key_prefix, &entry.service, node, &entry.id);
            // With a shared session, which holds other pods' keys too: only a key naming our pod.
            let mut ops = self.guard_key(&key, session).await?;
            ops.extend(deregistration(&key, node, &entry.id, &entry.service));
            // Refused: our session does not hold its key, not ours.
            if self
                .txn("catalog_deregister", &serde_json::Value::Array(ops))
                .await?
            {
                tracing::info!(instance = %entry.id, service = %entry.service, "deregistered an instance of this sidecar's previous run that the manifest no longer has");
            }
        }
        Ok(())
    }

    /// The current session, else our previous run's if Consul still has it (adopted); never a
    /// new one. For a drain that a restarted sidecar finishes: its keys are the previous run's.
    pub async fn current_or_previous(&self) -> Result<Option<String>, ConsulError> {
        let mut current = self.session.lock().await;
        if current.is_some() {
            return Ok(current.clone());
        }
        if let Some(id) = self.previous(&mut current).await? {
            return Ok(Some(id));
        }
        // A peer's keys are held with the shared session.
        Ok(self.join(&mut current).await)
    }

    /// The sessions on `node`.
    async fn sessions_on(&self, node: &str) -> Result<Vec<SessionEntry>, ConsulError> {
        let req = self.client.request(
            Method::GET,
            &format!("/v1/session/node/{}", path_escape(node)),
        );
        let answer = self
            .client
            .send("session_list", req, super::REQUEST_TIMEOUT)
            .await?;
        serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
            operation: "session_list",
            reason: e.to_string(),
        })
    }

    /// The sessions' node (no service ever lives on it; a write only when it is missing or
    /// differs, which Consul skips when it is the same).
    async fn register_node(&self) -> Result<(), ConsulError> {
        let body = serde_json::json!({
            "Node": SESSIONS_NODE,
            "Address": "127.0.0.1",
            "NodeMeta": { MANAGED_BY_KEY: MANAGED_BY_VALUE },
        });
        let req = self
            .client
            .request(Method::PUT, "/v1/catalog/register")
            .json(&body);
        self.client
            .send("catalog_register", req, super::REQUEST_TIMEOUT)
            .await
            .map(drop)
    }
}

/// `PUT /v1/session/destroy/:id`.
async fn destroy(client: &ConsulClient, id: &str) -> Result<(), ConsulError> {
    let req = client.request(
        Method::PUT,
        &format!("/v1/session/destroy/{}", path_escape(id)),
    );
    client
        .send("session_destroy", req, super::REQUEST_TIMEOUT)
        .await
        .map(drop)
}

/// Consul's answer to an acquire with a session it does not have:
/// `500 raft apply failed: invalid session "<id>"`.
fn is_invalid_session(e: &ConsulError) -> bool {
    matches!(e, ConsulError::Status { status: 500, body, .. } if body.contains("invalid session"))
}

/// Why a heartbeat did not get an answer that keeps us covered.
enum BeatError {
    /// The holder is gone or said no: leave at once.
    Refused(String),
    /// No answer (yet): leave if it lasts.
    NoAnswer(String),
}

/// How long a heartbeat may take.
const BEAT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The field of a key's value that names the pod (with a shared session).
const POD_UID_FIELD: &str = "pod-uid";

/// A session ID no session has: a guard that must fail checks for it.
const NO_SESSION: &str = "00000000-0000-0000-0000-000000000000";

fn lock(set: &std::sync::Mutex<BTreeSet<String>>) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
    set.lock().unwrap_or_else(|p| p.into_inner())
}

/// The node every sidecar's session lives on. Not a Kubernetes node's virtual node (a Kubernetes
/// node's name never starts with `-`), and no instance is ever registered on it.
pub const SESSIONS_NODE: &str = "consul-registrar--sessions";

/// The service meta key that names the key prefix of the instance's liveness key: a reaper
/// touches only the instances of its own prefix. (Consul reserves meta keys starting with
/// `consul-`.)
pub const KEY_PREFIX_META: &str = "liveness-key-prefix";

/// The key whose holder (a session, Consul's leader-election recipe) is the one reaper of
/// `service`'s instances of the prefix: `<prefix>/.reaper/<service>` (its first segment starts with
/// a dot, which no service name does, so it is never among a service's instance keys).
pub fn reaper_key(prefix: &str, service: &str) -> String {
    format!("{prefix}/.reaper/{service}")
}

/// The keys of `service`'s instances: `<prefix>/<service>/`, what its reaper watches (a key
/// change of another service wakes nobody of this one).
pub fn service_keys(prefix: &str, service: &str) -> String {
    format!("{prefix}/{service}/")
}

/// An instance's liveness key: `<prefix>/<service>/<node>/<id>`.
pub fn key_of(prefix: &str, service: &str, node: &str, id: &str) -> String {
    format!("{}{node}/{id}", service_keys(prefix, service))
}

/// The operations that remove instance `id` of `service` on `node` with its liveness `key`, to
/// follow a guard.
pub fn deregistration(key: &str, node: &str, id: &str, service: &str) -> [serde_json::Value; 2] {
    [
        serde_json::json!(
            { "Service": { "Verb": "delete", "Node": node, "Service": { "ID": id, "Service": service } } }
        ),
        serde_json::json!({ "KV": { "Verb": "delete", "Key": key } }),
    ]
}

/// A KV key as a URL path: each segment escaped, the slashes kept.
pub fn key_path(key: &str) -> String {
    key.split('/')
        .map(path_escape)
        .collect::<Vec<_>>()
        .join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consuls_answer_to_an_acquire_with_a_lost_session_is_recognised() {
        let lost = ConsulError::Status {
            operation: "key_acquire",
            status: 500,
            body: r#"raft apply failed: invalid session "346e104d-850c-e207-8bd7-bcc65c457f6f""#
                .into(),
        };
        assert!(is_invalid_session(&lost));
        let no_leader = ConsulError::Status {
            operation: "key_acquire",
            status: 500,
            body: "No cluster leader".into(),
        };
        assert!(!is_invalid_session(&no_leader));
    }
}
