//! Catalog mode's crash net, the holding side: one Consul session per sidecar and one liveness key
//! per instance, acquired by that session with behaviour `delete`.
//!
//! A catalog entry never expires, but a session does: renewed every `sessionTTL / 3` while the
//! sidecar lives, invalidated by Consul between 1× and 2× the TTL after the last renewal (a
//! SIGKILL, an OOM kill, a lost node), which deletes every key it holds. The reapers
//! ([`super::reaper`]) then remove the instances whose key is gone. Renewals are not Raft writes.
//!
//! Order is the invariant: an instance's key is acquired before the instance is registered and
//! deleted after it is deregistered, so a live instance always has its key.

use std::collections::BTreeSet;
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
    /// The session's name: `consul-registrar/<node>/<first instance id>`, how a restarted
    /// sidecar finds (and adopts) the session of its previous run.
    name: String,
    /// The current session, once made.
    session: tokio::sync::Mutex<Option<String>>,
    /// The instances whose key we hold (or want to): re-acquired when the session is replaced.
    held: std::sync::Mutex<BTreeSet<String>>,
    /// Of those, the ones acquired with the current session (cleared when it is replaced).
    acquired: std::sync::Mutex<BTreeSet<String>>,
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
    pub fn new(
        client: ConsulClient,
        settings: CatalogSettings,
        first_instance: &str,
        alarm: Arc<watch::Sender<u64>>,
        metrics: Arc<Metrics>,
        retry: RetryPolicy,
    ) -> Self {
        Liveness {
            name: format!("consul-registrar/{}/{first_instance}", settings.node),
            client,
            settings,
            session: tokio::sync::Mutex::new(None),
            held: std::sync::Mutex::new(BTreeSet::new()),
            acquired: std::sync::Mutex::new(BTreeSet::new()),
            alarm,
            metrics,
            retry,
        }
    }

    /// The liveness key of instance `id`: `<keyPrefix>/<node>/<id>`.
    pub fn key(&self, id: &str) -> String {
        key_of(&self.settings.key_prefix, &self.settings.node, id)
    }

    /// Acquires the key of instance `id` with our session (making or adopting the session first).
    /// Without `force`, a key already acquired with the current session is not asked for again
    /// (a registration forces it: the key may have been deleted by hand). A key held by another
    /// live session (another sidecar claiming the same node and ID, or the session of a pod
    /// being replaced, until it expires) is an error to retry.
    pub async fn hold(&self, id: &str, force: bool) -> Result<(), ConsulError> {
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

    /// Deletes the key of instance `id` (after it was deregistered).
    pub async fn release(&self, id: &str) -> Result<(), ConsulError> {
        lock(&self.held).remove(id);
        lock(&self.acquired).remove(id);
        let req = self.client.request(
            Method::DELETE,
            &format!("/v1/kv/{}", key_path(&self.key(id))),
        );
        self.client
            .send("key_delete", req, super::REQUEST_TIMEOUT)
            .await
            .map(drop)
    }

    /// Destroys the session (its keys go with it). After a drain: nothing of ours is left.
    pub async fn end(&self) {
        lock(&self.held).clear();
        lock(&self.acquired).clear();
        let Some(id) = self.session.lock().await.take() else {
            return;
        };
        let req = self.client.request(
            Method::PUT,
            &format!("/v1/session/destroy/{}", path_escape(&id)),
        );
        if let Err(e) = self
            .client
            .send("session_destroy", req, super::REQUEST_TIMEOUT)
            .await
        {
            tracing::warn!(error = %e, "could not destroy the session; Consul invalidates it within 2 × sessionTTL");
        }
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

    /// A new (or adopted) session, and every held key acquired with it.
    async fn reacquire(&self) -> Result<(), ConsulError> {
        let session = self.session().await?;
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
        if let Some(id) = current.as_ref() {
            return Ok(id.clone());
        }
        // Sessions live on a node, so the node comes first (one write, at start-up).
        self.register_node().await?;
        let req = self.client.request(
            Method::GET,
            &format!("/v1/session/node/{}", path_escape(&self.settings.node)),
        );
        let answer = self
            .client
            .send("session_list", req, super::REQUEST_TIMEOUT)
            .await?;
        let sessions: Vec<SessionEntry> =
            serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
                operation: "session_list",
                reason: e.to_string(),
            })?;
        for old in sessions.iter().filter(|s| s.name == self.name) {
            if self.renew(&old.id).await? {
                tracing::info!("adopted the session of this sidecar's previous run");
                *current = Some(old.id.clone());
                return Ok(old.id.clone());
            }
        }
        let body = serde_json::json!({
            "Name": self.name,
            "Node": self.settings.node,
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

    /// The virtual node alone (`SkipNodeUpdate` would not create it).
    async fn register_node(&self) -> Result<(), ConsulError> {
        let body = serde_json::json!({
            "Node": self.settings.node,
            "Address": self.settings.node_address,
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

/// Consul's answer to an acquire with a session it does not have:
/// `500 raft apply failed: invalid session "<id>"`.
fn is_invalid_session(e: &ConsulError) -> bool {
    matches!(e, ConsulError::Status { status: 500, body, .. } if body.contains("invalid session"))
}

fn lock(set: &std::sync::Mutex<BTreeSet<String>>) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
    set.lock().unwrap_or_else(|p| p.into_inner())
}

/// `<prefix>/<node>/<id>`.
pub fn key_of(prefix: &str, node: &str, id: &str) -> String {
    format!("{prefix}/{node}/{id}")
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
