//! Catalog mode's crash net, the reaping side: every catalog-mode sidecar removes the instances
//! whose liveness key is gone (their sidecar's session expired: a SIGKILL, an OOM kill, a lost
//! node).
//!
//! At start-up it sweeps: every managed instance on a managed virtual node without its key is a
//! ghost. Then it watches the key prefix with a blocking query (key names only); a key that
//! disappears marks its instance for removal. Removal is one transaction, "the key does not exist,
//! and delete the service", so several reapers racing, or an owner that comes back and takes its
//! key again, are harmless: the transaction fails once the key exists.
//!
//! If no catalog-mode sidecar is alive anywhere, nothing reaps: ghosts stay (with their last
//! status) until the next one starts and sweeps.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::session::{key_of, key_path};
use super::{ConsulClient, ConsulError, path_escape};
use crate::manifest::{CatalogSettings, MANAGED_BY_KEY, MANAGED_BY_VALUE, RetryPolicy};
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
}

#[derive(Deserialize)]
struct NodeEntry {
    #[serde(rename = "Node")]
    node: String,
}

#[derive(Deserialize)]
struct NodeServices {
    /// `null` for a node without services (a virtual node whose sidecar has made its session but
    /// not yet registered, or whose instances are all gone).
    #[serde(rename = "Services", default)]
    services: Option<Vec<NodeService>>,
}

#[derive(Deserialize)]
struct NodeService {
    #[serde(rename = "ID")]
    id: String,
    #[serde(rename = "Service")]
    service: String,
    #[serde(rename = "Meta", default)]
    meta: Option<std::collections::BTreeMap<String, String>>,
    #[serde(rename = "ModifyIndex", default)]
    modify_index: u64,
}

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
    /// Sweeps, then watches the keys until `cancel`. Consul errors are retried with backoff.
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = Backoff::new(self.retry);
        let mut known: Option<BTreeSet<String>> = None;
        let mut index = String::from("0");
        let mut warned = false;
        loop {
            let answer = tokio::select! {
                _ = cancel.cancelled() => return,
                a = self.keys(&index) => a,
            };
            let (keys, next) = match answer {
                Ok(found) => found,
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "the reaper cannot read the liveness keys; retrying with backoff");
                        warned = true;
                    }
                    // Consul may come back empty (wiped): start from index 0 again.
                    index = String::from("0");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                    continue;
                }
            };
            warned = false;
            backoff.reset();
            let result = match &known {
                None => self.sweep(&keys).await,
                Some(before) => {
                    let gone: Vec<&String> = before.difference(&keys).collect();
                    self.reap_gone(&gone, &keys).await
                }
            };
            match result {
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
            index = match (next.parse::<u64>(), index.parse::<u64>()) {
                (Ok(n), Ok(i)) if n < i => String::from("0"),
                _ => next,
            };
        }
    }

    /// The whole prefix's key names, and the index to block on next.
    async fn keys(&self, index: &str) -> Result<(BTreeSet<String>, String), ConsulError> {
        let prefix = format!("{}/", self.settings.key_prefix);
        let req = self
            .client
            .request(Method::GET, &format!("/v1/kv/{}", key_path(&prefix)))
            .query(&[
                ("keys", "true"),
                ("index", index),
                ("wait", &format!("{}ms", self.wait.as_millis())),
            ]);
        match self
            .client
            .send("watch_keys", req, super::blocking_timeout(self.wait))
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

    /// Start-up: every managed instance on a managed node whose key is missing.
    async fn sweep(&self, keys: &BTreeSet<String>) -> Result<(), ConsulError> {
        let mut ghosts = Vec::new();
        for node in self.managed_nodes().await? {
            for instance in self.instances_on(&node).await? {
                if !keys.contains(&self.key(&instance)) {
                    ghosts.push(instance);
                }
            }
        }
        if !ghosts.is_empty() {
            tracing::info!(
                ghosts = ghosts.len(),
                "start-up sweep: instances whose sidecar is gone"
            );
        }
        for ghost in ghosts {
            self.reap(&ghost).await?;
        }
        Ok(())
    }

    /// The instances whose keys disappeared (and did not come back).
    async fn reap_gone(
        &self,
        gone: &[&String],
        keys: &BTreeSet<String>,
    ) -> Result<(), ConsulError> {
        if gone.is_empty() {
            return Ok(());
        }
        // Every reaper sees the same deletion: spread them out, so the first one's removal is
        // usually seen by the others before they write.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..300))).await;
        let prefix = format!("{}/", self.settings.key_prefix);
        let mut by_node: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
        for key in gone {
            let Some((node, id)) = key
                .strip_prefix(&prefix)
                .and_then(|rest| rest.split_once('/'))
            else {
                continue;
            };
            by_node.entry(node).or_default().push(id);
        }
        for (node, ids) in by_node {
            for instance in self.instances_on(node).await? {
                if ids.contains(&instance.id.as_str()) && !keys.contains(&self.key(&instance)) {
                    self.reap(&instance).await?;
                }
            }
        }
        Ok(())
    }

    fn key(&self, instance: &Instance) -> String {
        key_of(&self.settings.key_prefix, &instance.node, &instance.id)
    }

    /// The virtual nodes of consul-registrar (their node meta says so).
    async fn managed_nodes(&self) -> Result<Vec<String>, ConsulError> {
        let req = self
            .client
            .request(Method::GET, "/v1/catalog/nodes")
            .query(&[("node-meta", format!("{MANAGED_BY_KEY}:{MANAGED_BY_VALUE}"))]);
        let answer = self
            .client
            .send("managed_nodes", req, super::REQUEST_TIMEOUT)
            .await?;
        let nodes: Vec<NodeEntry> =
            serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
                operation: "managed_nodes",
                reason: e.to_string(),
            })?;
        Ok(nodes.into_iter().map(|n| n.node).collect())
    }

    /// Our instances on `node` (`managed-by` meta).
    async fn instances_on(&self, node: &str) -> Result<Vec<Instance>, ConsulError> {
        let req = self.client.request(
            Method::GET,
            &format!("/v1/catalog/node-services/{}", path_escape(node)),
        );
        let answer = match self
            .client
            .send("node_services", req, super::REQUEST_TIMEOUT)
            .await
        {
            Ok(a) => a,
            Err(ConsulError::Status { status: 404, .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        // `null` when the node is unknown.
        let services: Option<NodeServices> =
            serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
                operation: "node_services",
                reason: e.to_string(),
            })?;
        Ok(services
            .and_then(|s| s.services)
            .unwrap_or_default()
            .into_iter()
            .filter(|s| {
                s.meta
                    .as_ref()
                    .and_then(|m| m.get(MANAGED_BY_KEY))
                    .is_some_and(|v| v == MANAGED_BY_VALUE)
            })
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
