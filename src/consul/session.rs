//! Catalog mode's crash net, the holding side: one Consul session per sidecar and one liveness key
//! per instance, acquired by that session with behaviour `delete`.
//!
//! A catalog entry never expires, but a session does: renewed every `sessionTTL / 3` while the
//! sidecar lives, invalidated by Consul between 1× and 2× the TTL after the last renewal (a
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

use super::{ConsulClient, ConsulError, path_escape};
use crate::manifest::{CatalogSettings, MANAGED_BY_KEY, MANAGED_BY_VALUE, RetryPolicy, duration};
use crate::metrics::Metrics;
use crate::reconcile::Backoff;

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
        pod: &str,
        alarm: Arc<watch::Sender<u64>>,
        metrics: Arc<Metrics>,
        retry: RetryPolicy,
    ) -> Self {
        metrics.expect_session_renewals();
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
        }
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
        let session = self.session().await?;
        if !force && lock(&self.acquired).contains(id) {
            return Ok(());
        }
        match self.acquire(id, &session).await {
            // Consul no longer has the session (servers wiped or restored, a hand `destroy`): the
            // renewal would find out only at its next tick, up to TTL/3 later. Replace it now.
            Err(e) if is_invalid_session(&e) => {
                tracing::warn!(
                    "Consul no longer has our session (servers wiped or restored, or destroyed by hand): making a new one and taking the keys again"
                );
                self.forget(&session).await;
                let session = self.session().await?;
                self.acquire(id, &session).await?;
            }
            other => other?,
        }
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
            drop(current);
            self.alarm.send_modify(|generation| *generation += 1);
        }
    }

    /// The session holding the key of instance `id`, None when the key is absent or unheld.
    pub async fn holder(&self, id: &str) -> Result<Option<String>, ConsulError> {
        #[derive(Deserialize)]
        struct Entry {
            #[serde(rename = "Session", default)]
            session: Option<String>,
        }
        let req = self
            .client
            .request(Method::GET, &format!("/v1/kv/{}", key_path(&self.key(id))));
        let answer = match self
            .client
            .send("key_read", req, super::REQUEST_TIMEOUT)
            .await
        {
            Ok(a) => a,
            Err(ConsulError::Status { status: 404, .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let entries: Vec<Entry> =
            serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
                operation: "key_read",
                reason: e.to_string(),
            })?;
        Ok(entries.into_iter().next().and_then(|e| e.session))
    }

    /// Stops holding the key of instance `id` here (its deregistration removed the key, in the
    /// same transaction, only if our session held it: see [`super::catalog`]).
    pub fn let_go(&self, id: &str) {
        lock(&self.held).remove(id);
        lock(&self.acquired).remove(id);
    }

    /// The current session, if there is one; never makes one.
    pub async fn current(&self) -> Option<String> {
        self.session.lock().await.clone()
    }

    /// Destroys the session (its keys go with it). After a drain: nothing of ours is left, and no
    /// session is made again until the next [`hold`](Self::hold) (a renewal still in flight that
    /// finds the session gone makes none).
    pub async fn end(&self) {
        let Some(id) = self.stop().await else {
            return;
        };
        if let Err(e) = destroy(&self.client, &id).await {
            tracing::warn!(error = %e, "could not destroy the session; Consul invalidates it within 2 × sessionTTL");
        }
    }

    /// After a failed drain: the session is no longer renewed, and is destroyed as soon as Consul
    /// answers again, so its keys go and the reapers remove the instances at once rather than
    /// after Consul invalidates it (as after a crash, within 2 × sessionTTL).
    pub async fn abandon(&self) {
        let Some(id) = self.stop().await else {
            return;
        };
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

    /// Marks the session ended and takes it (no renewal, no new one until the next `hold`).
    async fn stop(&self) -> Option<String> {
        let mut current = self.session.lock().await;
        self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
        lock(&self.held).clear();
        lock(&self.acquired).clear();
        current.take()
    }

    /// Renews the session every `sessionTTL / 3` until `cancel`; a lost session is replaced and
    /// every held key acquired again.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let every = self.settings.session_ttl / 3;
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
            match self.renew(&session).await {
                Ok(true) => {
                    self.renewal("ok");
                    if std::mem::take(&mut failing) {
                        tracing::info!("session renewed again");
                    }
                    backoff.reset();
                    wait = every;
                }
                Ok(false) if self.ended.load(std::sync::atomic::Ordering::SeqCst) => {
                    // Destroyed by the drain while this renewal was on its way: nothing to redo.
                    wait = every;
                }
                Ok(false) => {
                    self.renewal("lost");
                    tracing::warn!(
                        ttl = %duration::format(self.settings.session_ttl),
                        "the session expired (Consul did not hear from us for too long, or it was destroyed); its liveness keys are gone and other sidecars may reap our instances: making a new session and taking the keys again"
                    );
                    {
                        let mut current = self.session.lock().await;
                        if current.as_deref() == Some(session.as_str()) {
                            *current = None;
                            lock(&self.acquired).clear();
                        }
                    }
                    wait = match self.reacquire().await {
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
                }
                Err(e) => {
                    self.renewal("error");
                    if !failing {
                        failing = true;
                        tracing::warn!(error = %e, "cannot renew the session; retrying (it expires after 1–2 × sessionTTL without a renewal)");
                    }
                    wait = backoff.next_delay().min(every);
                }
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
            return Ok(id);
        }
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
                (self.settings.session_ttl / 3).min(super::REQUEST_TIMEOUT),
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
        let value = serde_json::json!({
            "node": self.settings.node,
            "instance": id,
            MANAGED_BY_KEY: MANAGED_BY_VALUE,
        });
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
            let ops = deregistration_with_key(&key, session, node, &entry.id, &entry.service);
            let req = self.client.request(Method::PUT, "/v1/txn").json(&ops);
            match self
                .client
                .send("catalog_deregister", req, super::REQUEST_TIMEOUT)
                .await
            {
                Ok(_) => {
                    tracing::info!(instance = %entry.id, service = %entry.service, "deregistered an instance of this sidecar's previous run that the manifest no longer has")
                }
                // Our session does not hold its key: not ours.
                Err(ConsulError::Status { status: 409, .. }) => {}
                Err(e) => return Err(e),
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
        self.previous(&mut current).await
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

/// The transaction that removes instance `id` of `service` on `node` with its liveness `key`,
/// applied only while `session` holds the key (its first operation: a failed check applies
/// nothing).
pub fn deregistration_with_key(
    key: &str,
    session: &str,
    node: &str,
    id: &str,
    service: &str,
) -> serde_json::Value {
    serde_json::json!([
        { "KV": { "Verb": "check-session", "Key": key, "Session": session } },
        { "Service": { "Verb": "delete", "Node": node, "Service": { "ID": id, "Service": service } } },
        { "KV": { "Verb": "delete", "Key": key } },
    ])
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
