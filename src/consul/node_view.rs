//! Catalog mode with a shared session: the holder's view of its virtual node, which the node's
//! sidecars watch instead of each asking the servers.
//!
//! Without it, every sidecar keeps a blocking query on its virtual node's checks and reads its
//! instance's definition at each answer: at rest, two requests per pod every `resyncInterval`,
//! the most of what catalog mode asks of the servers once the session is shared. With it, the
//! holder alone does that, for the whole node (`GET /v1/health/node/:node` blocking, then
//! `GET /v1/catalog/node-services/:node`), and publishes what it read as one numbered snapshot;
//! its peers ask its admin server (`POST /shared-session/node`, a long poll with the shared
//! session's ID as the credential, like the heartbeat) for a snapshot newer than the last they
//! saw, and get their own instances' part of it. The servers then see one watch per virtual node,
//! as with a client agent per node.
//!
//! What keeps it as exact as a watch of one's own:
//! - a snapshot is read from the servers like the peers' own reads (the leader, not `stale`),
//!   and numbered: a peer asks for one newer than the last it saw, so a change is never missed;
//! - a snapshot read before the instance's last write (as far as the sidecar can tell, erring
//!   early) is not taken as the instance's state: it asks for the next one;
//! - no view (the holder cannot read, is not the holder any more, or does not answer): the peer
//!   watches the servers itself, as without a shared session.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The admin server's path for the node view.
pub const PATH: &str = "/shared-session/node";

/// The longest a peer's request waits for a newer snapshot (its own watch's wait, capped).
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// How long a request waits for the first snapshot of a view that has none yet.
pub const FIRST_READ: Duration = Duration::from_secs(5);

/// What a peer asks: a snapshot newer than `after` (0: the current one), waiting up to `wait_ms`
/// for it, then the current one; only the parts of instances `ids`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewRequest {
    pub after: u64,
    #[serde(rename = "waitMs")]
    pub wait_ms: u64,
    pub ids: Vec<String>,
}

/// The holder's answer: a snapshot's number, how long before the answer it was read, and the
/// asked instances' definitions and checks as Consul gave them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewAnswer {
    pub generation: u64,
    #[serde(rename = "ageMs")]
    pub age_ms: u64,
    pub services: Vec<serde_json::Value>,
    pub checks: Vec<serde_json::Value>,
    /// The holder's token may not see everything on the node: an instance missing from the
    /// answer may be there all the same.
    #[serde(default)]
    pub partial: bool,
}

/// One read of the virtual node: its services' definitions and its checks.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    /// The holder's token may not see everything on the node (`X-Consul-Results-Filtered-By-ACLs`).
    pub partial: bool,
    /// When the servers answered the read of the checks: the state is at least about this
    /// recent (a blocking query re-runs when the state changes, then answers).
    pub read_at: Instant,
    pub services: Vec<serde_json::Value>,
    pub checks: Vec<serde_json::Value>,
}

impl Snapshot {
    /// The part of instances `ids`: their definitions, and their checks (by `ServiceID`).
    pub fn part(&self, ids: &[String]) -> ViewAnswer {
        let asked = |v: &serde_json::Value, field: &str| {
            v.get(field)
                .and_then(serde_json::Value::as_str)
                .is_some_and(|id| ids.iter().any(|i| i == id))
        };
        ViewAnswer {
            generation: self.generation,
            age_ms: self.read_at.elapsed().as_millis() as u64,
            services: self
                .services
                .iter()
                .filter(|s| asked(s, "ID"))
                .cloned()
                .collect(),
            checks: self
                .checks
                .iter()
                .filter(|c| asked(c, "ServiceID"))
                .cloned()
                .collect(),
            partial: self.partial,
        }
    }
}

/// The holder's current snapshot, if it has one.
pub struct NodeView {
    current: watch::Sender<Option<Arc<Snapshot>>>,
    generation: AtomicU64,
}

impl Default for NodeView {
    fn default() -> Self {
        NodeView {
            current: watch::Sender::new(None),
            generation: AtomicU64::new(0),
        }
    }
}

impl NodeView {
    /// A new snapshot, read at `read_at`.
    pub fn publish(
        &self,
        read_at: Instant,
        services: Vec<serde_json::Value>,
        checks: Vec<serde_json::Value>,
        partial: bool,
    ) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.current.send_replace(Some(Arc::new(Snapshot {
            generation,
            partial,
            read_at,
            services,
            checks,
        })));
    }

    /// No snapshot (not the holder, or the servers cannot be read): askers watch on their own.
    pub fn clear(&self) {
        self.current.send_if_modified(|c| c.take().is_some());
    }

    /// A snapshot newer than `after`, as soon as there is one; after `wait`, the current one.
    /// None when the view is cleared meanwhile, and when there is none yet and the first does
    /// not come within [`FIRST_READ`] (the holder's first read answers at once).
    pub async fn newer(&self, after: u64, wait: Duration) -> Option<Arc<Snapshot>> {
        let mut rx = self.current.subscribe();
        let had = rx.borrow().is_some();
        let newer = async {
            rx.wait_for(|c| match c {
                Some(s) => s.generation > after,
                None => had,
            })
            .await
            .ok()
            .and_then(|found| found.clone())
        };
        let wait = if had { wait } else { wait.min(FIRST_READ) };
        match tokio::time::timeout(wait, newer).await {
            Ok(found) => found,
            Err(_) => self.current.borrow().clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_peer_gets_only_its_own_instances_part() {
        let view = NodeView::default();
        view.publish(
            Instant::now(),
            vec![json!({"ID": "a-1", "Service": "a"}), json!({"ID": "b-1"})],
            vec![
                json!({"CheckID": "serfHealth", "ServiceID": ""}),
                json!({"CheckID": "consul-registrar:a-1", "ServiceID": "a-1"}),
                json!({"CheckID": "consul-registrar:b-1", "ServiceID": "b-1"}),
            ],
            false,
        );
        let snapshot = view.current.borrow().clone().expect("published");
        let part = snapshot.part(&["a-1".to_string()]);
        assert_eq!(part.generation, 1);
        assert_eq!(part.services, vec![json!({"ID": "a-1", "Service": "a"})]);
        assert_eq!(
            part.checks,
            vec![json!({"CheckID": "consul-registrar:a-1", "ServiceID": "a-1"})]
        );
    }

    #[tokio::test]
    async fn newer_waits_for_the_next_snapshot_and_falls_back_to_the_current_one() {
        let view = Arc::new(NodeView::default());
        let publish = || view.publish(Instant::now(), vec![], vec![], false);
        let generation = |s: Option<Arc<Snapshot>>| s.map(|s| s.generation);
        // No snapshot yet: none at the end of the wait...
        assert!(view.newer(0, Duration::from_millis(50)).await.is_none());
        // ...unless the first one comes meanwhile.
        let first = {
            let view = Arc::clone(&view);
            tokio::spawn(async move { view.newer(0, Duration::from_secs(60)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        publish();
        assert_eq!(generation(first.await.expect("joined")), Some(1));
        // Newer than 1: the next publication answers at once...
        let waiting = {
            let view = Arc::clone(&view);
            tokio::spawn(async move { view.newer(1, Duration::from_secs(60)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        publish();
        assert_eq!(generation(waiting.await.expect("joined")), Some(2));
        // ...and without one, the wait ends with the current snapshot.
        let current = view.newer(2, Duration::from_millis(50)).await;
        assert_eq!(generation(current), Some(2));
        // Cleared while waiting: none.
        let waiting = {
            let view = Arc::clone(&view);
            tokio::spawn(async move { view.newer(2, Duration::from_secs(60)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        view.clear();
        assert!(waiting.await.expect("joined").is_none());
    }
}
