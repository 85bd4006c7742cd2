//! Catalog mode's crash net, the reaping side: every catalog-mode sidecar removes the instances
//! whose liveness key is gone (their sidecar's session expired: a SIGKILL, an OOM kill, a lost
//! node).
//!
//! It judges only the instances of its own key prefix (their `liveness-key-prefix` meta; none
//! means the default prefix) and of one service: another group's keys are not the ones it reads,
//! and a per-service token may write only its own service.
//!
//! The work is done once per (key prefix, service), not by every sidecar (issue 20: N sidecars
//! watching the whole prefix cost the servers O(N) answers of O(N) keys per pod event), and on
//! that service's keys alone (`<prefix>/<service>/<node>/<id>`: one service's pod events wake no
//! other service's reaper, and its answers list only its own instances' keys). Consul's
//! leader-election recipe picks the one: whoever's session holds `<prefix>/.reaper/<service>`.
//! The others block on that one key (a stale read, answered only when it changes) and take it as
//! soon as it is free (its holder drained, or its session expired: then its own instances' keys
//! go in the same moment, and the new holder's first sweep reaps them).
//!
//! The holder sweeps when it takes the key: every instance of the service on a managed virtual
//! node without its key is a ghost (one read of the service, never one per virtual node: with a
//! reaper per service, that would cost the servers services × nodes reads a sweep). Then it
//! watches the service's keys with a blocking query (key names only); a key that disappears
//! marks its instance for removal, and its virtual node for a second look a session TTL later (a
//! registration that landed after its key went); a watch that could not read for a while sweeps
//! again (a key may have come and gone unseen); and it sweeps again every `resyncInterval` or so,
//! for instances whose key never existed. At rest the holder's work is thus a blocking query re-armed
//! and one read of the service per `resyncInterval`, not per TTL. Removal is one transaction, "the
//! key does not exist, and delete the service", so two holders for a moment (a takeover), or an
//! owner that comes back and takes its key again, are harmless: the transaction fails once the
//! key exists. Virtual nodes left empty are removed ([`remove_if_empty`]): those of the instances
//! it reaps, and, at the first sweep after taking the key, any managed node. A sidecar without a
//! session (not registered yet, or its drain failed and destroyed it) cannot stand; while nobody
//! holds the key, it watches anyway.
//!
//! If no catalog-mode sidecar of the prefix and service is alive anywhere, nothing reaps: ghosts
//! stay (with their last status) until the next one starts and sweeps.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::session::{
    KEY_PREFIX_META, Liveness, SESSIONS_NODE, key_of, key_path, reaper_key, service_keys,
};
use super::{ConsulClient, ConsulError, path_escape};
use crate::manifest::{
    CatalogSettings, DEFAULT_KEY_PREFIX, MANAGED_BY_KEY, MANAGED_BY_VALUE, RetryPolicy,
};
use crate::metrics::Metrics;
use crate::reconcile::Backoff;

/// Removes the instances of sidecars that are gone.
pub struct Reaper {
    pub client: ConsulClient,
    pub settings: CatalogSettings,
    pub metrics: Arc<Metrics>,
    pub retry: RetryPolicy,
    /// How long one blocking query on the keys waits.
    pub wait: Duration,
    /// The sidecar's session, which the elected reaper holds the reaper key with.
    pub liveness: Arc<Liveness>,
    /// The service whose instances this reaper judges.
    pub service: String,
}

#[derive(Deserialize)]
struct NodeEntry {
    #[serde(rename = "Node")]
    node: String,
}

/// `GET /v1/catalog/node-services/:node`, the parts the crash net reads.
#[derive(Deserialize)]
pub(super) struct NodeServices {
    #[serde(rename = "Node", default)]
    node: Option<NodeIndex>,
    /// `null` for a node without services (a virtual node whose sidecar has made its session but
    /// not yet registered, or whose instances are all gone).
    #[serde(rename = "Services", default)]
    pub(super) services: Option<Vec<NodeService>>,
}

#[derive(Deserialize)]
pub(super) struct NodeService {
    #[serde(rename = "ID")]
    pub(super) id: String,
    #[serde(rename = "Service")]
    pub(super) service: String,
    #[serde(rename = "Meta", default)]
    pub(super) meta: Option<std::collections::BTreeMap<String, String>>,
    #[serde(rename = "ModifyIndex", default)]
    modify_index: u64,
}

/// One instance as `GET /v1/catalog/service/:service` lists it.
#[derive(Deserialize)]
struct ServiceEntry {
    #[serde(rename = "Node")]
    node: String,
    #[serde(rename = "ServiceID")]
    id: String,
    #[serde(rename = "ServiceName")]
    service: String,
    #[serde(rename = "ServiceMeta", default)]
    meta: Option<std::collections::BTreeMap<String, String>>,
    /// The instance's own index (what `delete-cas` compares), as in `node-services`.
    #[serde(rename = "ModifyIndex", default)]
    modify_index: u64,
}

/// Which virtual nodes a sweep checks for emptiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nodes {
    /// Those of the instances it reaped.
    Reaped,
    /// Every managed one.
    All,
}

#[derive(Deserialize)]
struct NodeIndex {
    #[serde(rename = "ModifyIndex", default)]
    modify_index: u64,
}

#[derive(Deserialize)]
struct KvEntry {
    #[serde(rename = "Session", default)]
    session: Option<String>,
}

/// How long the sidecars that do not reap block on the reaper key (Consul's default wait): it
/// answers at once when the key changes, so a longer wait costs no reaction time, only fewer
/// re-arms at rest (one per sidecar every 4–5 minutes, not every `resyncInterval`).
const REAPER_KEY_WAIT: Duration = Duration::from_secs(300);

/// The shortest wait of the holder's key watch: when a second look or the sweep is due.
const MIN_WAIT: Duration = Duration::from_millis(100);

/// A managed instance: where it is and what it is called.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Instance {
    node: String,
    id: String,
    service: String,
    /// The catalog's index of the instance as read: the removal applies only to this version.
    modify_index: u64,
}

impl Reaper {
    /// Until `cancel`: contends for the reaper key; while holding it, sweeps, watches the keys,
    /// and sweeps again every `resyncInterval` or so. Consul errors are retried with backoff.
    pub async fn run(self, cancel: CancellationToken) {
        Arc::new(self).lead(cancel).await
    }

    /// Consul's leader-election recipe on `<prefix>/.reaper/<service>`. The holder runs the key
    /// watch ([`Reaper::watch`], which sweeps first and then at its own pace). Everyone, the
    /// holder too, blocks on the key (a stale read, answered when it changes or after
    /// [`REAPER_KEY_WAIT`]): the others take it as soon as it is free, the holder stops watching
    /// as soon as it is not its own.
    async fn lead(self: Arc<Self>, cancel: CancellationToken) {
        // The key watch, while this sidecar holds the key.
        let mut watching: Option<CancellationToken> = None;
        let stop = |watching: &mut Option<CancellationToken>| {
            if let Some(watch) = watching.take() {
                watch.cancel();
            }
        };
        let ttl = self.settings.session_ttl;
        // The key's index as last read; "0" reads it without blocking.
        let mut index = String::from("0");
        // Before the next read: a while after an error.
        let mut pause = None;
        // A refused take (the token's policy) is warned about once.
        let mut refusal_warned = false;
        loop {
            if let Some(pause) = pause.take() {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            // After an error: read again a while later.
            let later = ttl.mul_f64(0.8 + 0.2 * fastrand::f64());
            let Some(session) = self.liveness.own_current().await else {
                if self.liveness.is_peer() {
                    // A peer of a shared session: it reaps only with a session of its own. While
                    // the key is held it waits on it; when it is free (after a short, random
                    // pause, so that the service's peers do not all leave at once) it leaves.
                    self.liveness.reaping(&self.service, false);
                    stop(&mut watching);
                    let read = tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = self.reaper_key(&index) => r,
                    };
                    match read {
                        Ok((Some(_), next)) => index = next,
                        Ok((None, _)) => {
                            index = String::from("0");
                            tokio::select! {
                                _ = cancel.cancelled() => return,
                                _ = tokio::time::sleep((ttl / 10).mul_f64(fastrand::f64())) => {}
                            }
                            // Not when the token may not take the key: it would leave and
                            // join again for nothing, round after round.
                            if !refusal_warned
                                && matches!(self.reaper_key("0").await, Ok((None, _)))
                            {
                                self.liveness.leave_to_reap().await;
                            }
                        }
                        Err(_) => {
                            index = String::from("0");
                            pause = Some(ttl / 10);
                        }
                    }
                    continue;
                }
                // No session yet (nothing registered), or none any more (a failed drain destroys
                // it once Consul answers again, and the sidecar lives on). It cannot stand, but
                // while nobody holds the key nobody reaps: it watches meanwhile (its own
                // instances' keys went with its session), and stops once someone holds the key.
                (index, pause) = (String::from("0"), Some(ttl / 10));
                let read = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = self.reaper_key("0") => r,
                };
                match read {
                    Ok((None, _)) if watching.is_none() => {
                        let watch = cancel.child_token();
                        tokio::spawn(Arc::clone(&self).watch(watch.clone()));
                        watching = Some(watch);
                    }
                    Ok((Some(_), _)) => stop(&mut watching),
                    _ => {}
                }
                continue;
            };
            let read = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.reaper_key(&index) => r,
            };
            let holder = match read {
                Ok((holder, next)) => {
                    index = next;
                    holder
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the reaper key; trying again a while later");
                    (index, pause) = (String::from("0"), Some(later));
                    continue;
                }
            };
            // Another sidecar holds the key: it reaps, this one stops watching. A key that is free
            // but cannot be taken (this sidecar's session is gone: a failed drain, a partition)
            // leaves a running watch alone: it may be the last reaper of the service, and a
            // second watcher for a while is harmless.
            if holder.as_ref().is_some_and(|h| *h != session) {
                stop(&mut watching);
            }
            let leading = match holder {
                Some(h) => h == session,
                None => match self.take_reaper_key(&session).await {
                    Ok(taken) => taken,
                    Err(e) => {
                        if matches!(e, ConsulError::Forbidden { .. }) && !refusal_warned {
                            refusal_warned = true;
                            tracing::warn!(
                                service = %self.service,
                                error = %e,
                                "the token may not take this service's reaper key: this sidecar cannot reap the service's crashed pods (asked again every sessionTTL or so)"
                            );
                        } else {
                            tracing::debug!(error = %e, "cannot take the reaper key; trying again a while later");
                        }
                        index = String::from("0");
                        pause = Some(later);
                        false
                    }
                },
            };
            self.liveness.reaping(&self.service, leading);
            if !leading && index == "0" && pause.is_none() {
                // Nothing to block on (the key was free but taken by another meanwhile).
                pause = Some(ttl / 10);
            }
            if leading && watching.is_none() {
                // Just elected: the watch sweeps at once, then follows the keys.
                let watch = cancel.child_token();
                tokio::spawn(Arc::clone(&self).watch(watch.clone()));
                watching = Some(watch);
            }
        }
    }

    /// The session holding the prefix's reaper key (None: free), blocking from `index` unless
    /// "0", and the index to block on next.
    async fn reaper_key(&self, index: &str) -> Result<(Option<String>, String), ConsulError> {
        let key = reaper_key(&self.settings.key_prefix, &self.service);
        let wait = self.wait.max(REAPER_KEY_WAIT);
        let req = self
            .client
            .request(Method::GET, &format!("/v1/kv/{}", key_path(&key)))
            .query(&[
                ("stale", ""),
                ("index", index),
                ("wait", &super::wait_param(wait)),
            ]);
        // A blocking read is a watch: it holds no call permit and is not timed as a call, or
        // the reapers of a sidecar of many services would hold every permit for a minute.
        let (operation, timeout) = if index == "0" {
            ("reaper_key", super::REQUEST_TIMEOUT)
        } else {
            ("watch_reaper_key", super::blocking_timeout(wait))
        };
        match self.client.send(operation, req, timeout).await {
            Ok(answer) => {
                let entries: Vec<KvEntry> =
                    serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
                        operation,
                        reason: e.to_string(),
                    })?;
                let next = answer.index.unwrap_or_else(|| String::from("0"));
                Ok((entries.into_iter().next().and_then(|e| e.session), next))
            }
            Err(ConsulError::Status { status: 404, .. }) => Ok((None, String::from("0"))),
            Err(e) => Err(e),
        }
    }

    /// Tries to take the free reaper key with `session`.
    async fn take_reaper_key(&self, session: &str) -> Result<bool, ConsulError> {
        let key = reaper_key(&self.settings.key_prefix, &self.service);
        let req = self
            .client
            .request(Method::PUT, &format!("/v1/kv/{}", key_path(&key)))
            .query(&[("acquire", session)]);
        let answer = self
            .client
            .send("reaper_key", req, super::REQUEST_TIMEOUT)
            .await?;
        Ok(String::from_utf8_lossy(&answer.body).trim() == "true")
    }

    /// Sweeps, then watches the keys until `cancel`. A key that disappears marks its instance for
    /// removal at once, and its virtual node for a second look a session TTL later: a registration
    /// the servers applied after its owner drained (held through a leader election, at most
    /// `rpc_hold_timeout`, 7 s, which is less than the shortest TTL) has no key, and no key
    /// disappears to tell the watch, so it goes within 2 × TTL + 1 s of the key. And the service is
    /// swept again every 0.8–1 × `resyncInterval`, for instances whose key never existed (written
    /// by hand, or by a sidecar of an earlier version): one read of the service a resyncInterval,
    /// not a TTL, which would make the holder's work at rest grow with the service's size.
    async fn watch(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Backoff::new(self.retry);
        let mut known: Option<BTreeSet<String>> = None;
        let mut index = String::from("0");
        let mut warned = false;
        let sweep_every = || self.wait.mul_f64(0.8 + 0.2 * fastrand::f64());
        let mut sweep_at = Instant::now() + sweep_every();
        // When to look at which virtual node again: one look per key gone (a node whose keys go
        // one after another is looked at a TTL after each).
        let mut second_looks: BTreeSet<(Instant, String)> = BTreeSet::new();
        loop {
            // The blocking query ends by the next thing due, so nothing waits for a key change:
            // exactly then (what is due was drawn at random already; a wait drawn short of it
            // would re-arm again and again as it nears), or after a drawn full wait.
            let due = second_looks
                .first()
                .map_or(sweep_at, |(at, _)| sweep_at.min(*at));
            let until_due = due.saturating_duration_since(Instant::now());
            let wait = (until_due < self.wait).then(|| until_due.max(MIN_WAIT));
            let answer = tokio::select! {
                _ = cancel.cancelled() => return,
                a = self.keys(&index, wait) => a,
            };
            let (keys, next) = match answer {
                Ok(found) => found,
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "the reaper cannot read the liveness keys; retrying with backoff");
                        warned = true;
                    }
                    // Consul may come back empty (wiped): start from index 0 again. And the view
                    // is lost: a key that came and went meanwhile (a sidecar that started and
                    // died, or this sidecar's own session destroyed after a failed drain) is in
                    // no difference of two reads, so the next answer is swept, not compared.
                    index = String::from("0");
                    known = None;
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                    continue;
                }
            };
            warned = false;
            backoff.reset();
            let result = async {
                match &known {
                    None => {
                        sweep_at = Instant::now() + sweep_every();
                        self.sweep(&keys, Nodes::All).await?;
                    }
                    Some(before) => {
                        let gone: Vec<&String> = before.difference(&keys).collect();
                        let look_again = Instant::now() + self.settings.session_ttl;
                        for node in self.reap_gone(&gone, &keys).await? {
                            second_looks.insert((look_again, node));
                        }
                    }
                }
                if Instant::now() >= sweep_at {
                    sweep_at = Instant::now() + sweep_every();
                    self.sweep(&keys, Nodes::Reaped).await?;
                }
                let now = Instant::now();
                while let Some((at, node)) = second_looks.first().cloned() {
                    if at > now {
                        break;
                    }
                    self.reap_keyless(&node, &keys).await?;
                    // Looks due at once on the same node are one look.
                    second_looks.retain(|(later, other)| !(*other == node && *later <= now));
                }
                Ok::<(), ConsulError>(())
            };
            match result.await {
                Ok(()) => known = Some(keys),
                Err(e) => {
                    tracing::warn!(error = %e, "the reaper could not finish; trying again");
                    // Keep the old view, so the same keys count as gone next time, and read
                    // again at once rather than waiting for the next change.
                    index = String::from("0");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                    continue;
                }
            }
            // An index that went backwards (servers restored or wiped) starts over.
            let changed = next != index;
            index = match (next.parse::<u64>(), index.parse::<u64>()) {
                (Ok(n), Ok(i)) if n < i => String::from("0"),
                _ => next,
            };
            // Re-armed after a jittered pause: the key changes of a rollout, which wake every
            // reaper, come back as one answer rather than one each, and not all at once.
            if changed {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(fastrand::u64(0..200))) => {}
                }
            }
        }
    }

    /// The key names of the service's instances (`<prefix>/<service>/`: another service's key
    /// changes wake nothing here), blocking from `index` unless "0" (up to exactly `wait`, or by
    /// default a wait drawn from the watch's), and the index to block on next.
    async fn keys(
        &self,
        index: &str,
        wait: Option<Duration>,
    ) -> Result<(BTreeSet<String>, String), ConsulError> {
        let (wait, wait_param) = match wait {
            Some(exactly) => (exactly, format!("{}ms", exactly.as_millis())),
            None => (self.wait, super::wait_param(self.wait)),
        };
        let prefix = service_keys(&self.settings.key_prefix, &self.service);
        let req = self
            .client
            .request(Method::GET, &format!("/v1/kv/{}", key_path(&prefix)))
            .query(&[
                ("keys", "true"),
                // Any server may answer (a removal is a transaction the leader checks anyway),
                // so the watches of every sidecar do not all land on the leader.
                ("stale", ""),
                ("index", index),
                ("wait", &wait_param),
            ]);
        match self
            .client
            .send("watch_keys", req, super::blocking_timeout(wait))
            .await
        {
            Ok(answer) => {
                let keys: Vec<String> =
                    serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
                        operation: "watch_keys",
                        reason: e.to_string(),
                    })?;
                Ok((keys.into_iter().collect(), answer.index.unwrap_or_default()))
            }
            Err(e) => Err(e),
        }
    }

    /// Every instance of ours on a managed node whose key is missing (one read of the service,
    /// however many virtual nodes there are), then the virtual nodes that may be left empty:
    /// those of the reaped instances, or (`Nodes::All`, when the holder takes the key or its watch
    /// lost its view) every managed node, for the ones a drain or a failed removal left behind.
    async fn sweep(&self, keys: &BTreeSet<String>, nodes: Nodes) -> Result<(), ConsulError> {
        let ghosts: Vec<Instance> = self
            .instances()
            .await?
            .into_iter()
            .filter(|instance| !keys.contains(&self.key(instance)))
            .collect();
        if !ghosts.is_empty() {
            tracing::info!(
                ghosts = ghosts.len(),
                "sweep: instances whose sidecar is gone"
            );
        }
        let mut emptied = BTreeSet::new();
        for ghost in ghosts {
            self.reap(&ghost).await?;
            emptied.insert(ghost.node);
        }
        if nodes == Nodes::All {
            emptied.extend(self.managed_nodes().await?);
        }
        for node in emptied {
            remove_if_empty(&self.client, &node).await?;
        }
        Ok(())
    }

    /// Our instances of the service on managed virtual nodes (`managed-by` node and service meta,
    /// our key prefix): `GET /v1/catalog/service/:service` filtered by the nodes' meta, a stale
    /// read (a removal is a transaction the leader checks anyway).
    async fn instances(&self) -> Result<Vec<Instance>, ConsulError> {
        let path = format!("/v1/catalog/service/{}", path_escape(&self.service));
        let entries: Vec<ServiceEntry> = self.managed_read("service_instances", &path).await?;
        Ok(entries
            .into_iter()
            .filter(|e| e.node != SESSIONS_NODE && self.judges(e.meta.as_ref()))
            .map(|e| Instance {
                node: e.node,
                id: e.id,
                service: e.service,
                modify_index: e.modify_index,
            })
            .collect())
    }

    /// A stale read of `path` limited to the managed virtual nodes (their node meta says so).
    async fn managed_read<T: serde::de::DeserializeOwned>(
        &self,
        operation: &'static str,
        path: &str,
    ) -> Result<T, ConsulError> {
        let req = self.client.request(Method::GET, path).query(&[
            ("node-meta", format!("{MANAGED_BY_KEY}:{MANAGED_BY_VALUE}")),
            ("stale", String::new()),
        ]);
        let answer = self
            .client
            .send(operation, req, super::REQUEST_TIMEOUT)
            .await?;
        serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
            operation,
            reason: e.to_string(),
        })
    }

    /// Whether an instance with `meta` is one this reaper judges: ours (`managed-by`) and of
    /// our key prefix.
    fn judges(&self, meta: Option<&std::collections::BTreeMap<String, String>>) -> bool {
        meta.and_then(|m| m.get(MANAGED_BY_KEY))
            .is_some_and(|v| v == MANAGED_BY_VALUE)
            && self.owns_prefix(meta.and_then(|m| m.get(KEY_PREFIX_META)))
    }

    /// The instances whose keys disappeared (and did not come back); the virtual nodes of those
    /// keys.
    async fn reap_gone(
        &self,
        gone: &[&String],
        keys: &BTreeSet<String>,
    ) -> Result<Vec<String>, ConsulError> {
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        // Two holders for a moment (a takeover) see the same deletion: spread them out, so the
        // first one's removal is usually seen by the other before it writes.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..300))).await;
        let prefix = service_keys(&self.settings.key_prefix, &self.service);
        let mut by_node: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for key in gone {
            let Some((node, id)) = key
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split_once('/'))
            else {
                continue;
            };
            by_node.entry(node).or_default().push(id);
        }
        for (node, ids) in &by_node {
            self.reap_on(node, keys, |id| ids.contains(&id)).await?;
        }
        Ok(by_node.into_keys().map(String::from).collect())
    }

    /// A second look at `node`: every instance of ours there without its key.
    async fn reap_keyless(&self, node: &str, keys: &BTreeSet<String>) -> Result<(), ConsulError> {
        self.reap_on(node, keys, |_| true).await
    }

    /// Reaps the instances on `node` that `chosen` picks (by ID) and whose key is not in `keys`,
    /// then the node if that left it empty.
    async fn reap_on(
        &self,
        node: &str,
        keys: &BTreeSet<String>,
        chosen: impl Fn(&str) -> bool,
    ) -> Result<(), ConsulError> {
        let mut reaped = false;
        for instance in self.scan(node).await? {
            if chosen(&instance.id) && !keys.contains(&self.key(&instance)) {
                self.reap(&instance).await?;
                reaped = true;
            }
        }
        if reaped {
            remove_if_empty(&self.client, node).await?;
        }
        Ok(())
    }

    /// Whether an instance whose meta names key prefix `named` is ours to judge: only the
    /// instances of our own prefix are (their keys are the ones we read). One without the meta
    /// (registered by a version before it) counts as the default prefix's.
    fn owns_prefix(&self, named: Option<&String>) -> bool {
        named.map_or(DEFAULT_KEY_PREFIX, String::as_str) == self.settings.key_prefix
    }

    fn key(&self, instance: &Instance) -> String {
        key_of(
            &self.settings.key_prefix,
            &instance.service,
            &instance.node,
            &instance.id,
        )
    }

    /// The virtual nodes of consul-registrar (their node meta says so).
    async fn managed_nodes(&self) -> Result<Vec<String>, ConsulError> {
        let nodes: Vec<NodeEntry> = self
            .managed_read("managed_nodes", "/v1/catalog/nodes")
            .await?;
        Ok(nodes
            .into_iter()
            .map(|n| n.node)
            .filter(|n| n != SESSIONS_NODE)
            .collect())
    }

    /// Our instances on `node` (`managed-by` meta, our key prefix, our service).
    async fn scan(&self, node: &str) -> Result<Vec<Instance>, ConsulError> {
        let services: Option<NodeServices> = node_services(&self.client, node, true).await?;
        Ok(services
            .and_then(|s| s.services)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| s.service == self.service && self.judges(s.meta.as_ref()))
            .map(|s| Instance {
                node: node.to_string(),
                id: s.id,
                service: s.service,
                modify_index: s.modify_index,
            })
            .collect())
    }

    /// One transaction: the key still does not exist, and the instance goes if it is still the
    /// version read (`delete-cas`). A failed check (the owner took its key again and registered
    /// anew, or another reaper was first) leaves everything as it is, so each ghost is reaped
    /// (and counted) once. A token that may not write the service leaves it to reapers that may.
    async fn reap(&self, instance: &Instance) -> Result<(), ConsulError> {
        let ops = serde_json::json!([
            { "KV": { "Verb": "check-not-exists", "Key": self.key(instance) } },
            { "Service": {
                "Verb": "delete-cas",
                "Node": instance.node,
                "Service": {
                    "ID": instance.id,
                    "Service": instance.service,
                    "ModifyIndex": instance.modify_index,
                },
            } },
        ]);
        let req = self.client.request(Method::PUT, "/v1/txn").json(&ops);
        match self.client.send("reap", req, super::REQUEST_TIMEOUT).await {
            Ok(_) => {
                self.metrics.reaped.inc();
                tracing::info!(instance = %instance.id, node = %instance.node, service = %instance.service, "reaped an instance whose sidecar is gone (its session expired)");
                Ok(())
            }
            // A check failed: the key exists again (its owner is alive), or the instance is gone
            // or changed since it was read (another reaper, a re-registration).
            Err(ConsulError::Status { status: 409, .. }) => Ok(()),
            Err(ConsulError::Forbidden { .. }) => {
                tracing::debug!(instance = %instance.id, service = %instance.service, "may not reap this instance (the ACL token cannot write its service); leaving it to sidecars that may");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// `GET /v1/catalog/node-services/:node` (from any server when `stale`), decoded as `T`; None
/// when the node is unknown (a 404, or `null`).
pub(super) async fn node_services<T: serde::de::DeserializeOwned>(
    client: &ConsulClient,
    node: &str,
    stale: bool,
) -> Result<Option<T>, ConsulError> {
    let mut req = client.request(
        Method::GET,
        &format!("/v1/catalog/node-services/{}", path_escape(node)),
    );
    if stale {
        req = req.query(&[("stale", "")]);
    }
    let answer = match client
        .send("node_services", req, super::REQUEST_TIMEOUT)
        .await
    {
        Ok(a) => a,
        Err(ConsulError::Status { status: 404, .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
        operation: "node_services",
        reason: e.to_string(),
    })
}

/// Removes virtual node `node` if nothing is left on it: no service (of anyone's) and no session
/// (a sidecar of a version before the sessions' node keeps its session on its virtual node, and a
/// node's removal invalidates its sessions). Guarded by the node's index as read (`delete-cas`):
/// a registration since then rewrites the node (its meta) and the removal fails.
pub async fn remove_if_empty(client: &ConsulClient, node: &str) -> Result<(), ConsulError> {
    if node == SESSIONS_NODE {
        return Ok(());
    }
    let found: Option<NodeServices> = node_services(client, node, false).await?;
    let Some(found) = found else { return Ok(()) };
    let Some(index) = found.node.map(|n| n.modify_index) else {
        return Ok(());
    };
    if found.services.is_some_and(|s| !s.is_empty()) {
        return Ok(());
    }
    let req = client.request(
        Method::GET,
        &format!("/v1/session/node/{}", path_escape(node)),
    );
    let answer = client
        .send("session_list", req, super::REQUEST_TIMEOUT)
        .await?;
    let sessions: Vec<serde_json::Value> =
        serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
            operation: "session_list",
            reason: e.to_string(),
        })?;
    if !sessions.is_empty() {
        return Ok(());
    }
    let ops = serde_json::json!([
        { "Node": { "Verb": "delete-cas", "Node": { "Node": node, "ModifyIndex": index } } },
    ]);
    let req = client.request(Method::PUT, "/v1/txn").json(&ops);
    match client
        .send("remove_node", req, super::REQUEST_TIMEOUT)
        .await
    {
        Ok(_) => {
            tracing::info!(node = %node, "removed an empty virtual node");
            Ok(())
        }
        // Changed since it was read (a registration), or gone already.
        Err(ConsulError::Status { status: 409, .. }) => Ok(()),
        Err(ConsulError::Forbidden { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_without_services_reads_as_no_instances() {
        // What Consul 1.22 answers for a virtual node that has a session but no service yet.
        let body = r#"{"Node":{"ID":"","Node":"consul-registrar-a","Address":"10.0.0.1"},"Services":null}"#;
        let parsed: Option<NodeServices> = serde_json::from_str(body).expect("decodes");
        assert!(parsed.and_then(|s| s.services).is_none());
    }
}
