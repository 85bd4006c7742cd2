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
//!   and numbered within the view's epoch (one per holder process): a sidecar asks for one newer
//!   than the last it saw, so a change is never missed;
//! - a snapshot is given for an instance only if it was read after the sidecar's last write of it
//!   was sent (placed on the holder's clock, less [`WRITE_MARGIN`] for the request's transit);
//! - the holder answers a peer only for the instances whose liveness keys it covers for that
//!   peer's pod, and names them: an instance it does not name, or does not see (its token's ACLs
//!   filtered the read), is not said to be absent;
//! - no view (the holder cannot read, is not the holder any more, does not answer within
//!   [`POLL`]), and the sidecar watches the servers itself, as without a shared session.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The admin server's path for the node view.
pub const PATH: &str = "/shared-session/node";

/// The longest one request waits for a newer snapshot. A peer asks again with the same `after`
/// when nothing came, so a holder that stops answering (frozen, its network gone without a reset)
/// costs it at most this much before it watches the servers itself.
pub const POLL: Duration = Duration::from_secs(5);
/// How long a request waits for the first snapshot of a holder that has just begun reading.
pub const FIRST_READ: Duration = Duration::from_secs(5);
/// How much earlier than a peer's request places it its last write is taken to be: the
/// request's transit to the holder makes the write look later than it was, and without a
/// margin the very snapshot that shows the write could look older than it (seen in tests on a
/// busy machine). A snapshot read within the margin before a write may be taken for its state:
/// the reconciler reads once more before it writes on a state that predates its write, as it
/// does with a blocking query of its own that crosses its write.
pub const WRITE_MARGIN: Duration = Duration::from_millis(100);
/// Requests answered at once: the rest are refused (503), and their sidecars watch the servers.
pub const MAX_POLLS: usize = 256;

/// What a peer asks: a snapshot of view `epoch` newer than `after` (another epoch, or 0: the
/// current one), read after its last write of these instances (`writtenMsAgo` before it asked),
/// waiting up to `waitMs` for it; only the parts of the instances whose liveness keys (`keys`)
/// the holder covers for its pod (`pod-uid`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewRequest {
    pub epoch: u64,
    pub after: u64,
    #[serde(rename = "waitMs")]
    pub wait_ms: u64,
    #[serde(rename = "writtenMsAgo", default)]
    pub written_ms_ago: Option<u64>,
    #[serde(rename = "pod-uid")]
    pub pod_uid: String,
    pub keys: Vec<String>,
}

/// The holder's answer: the view's epoch, a snapshot's number and the asked instances'
/// definitions and checks as Consul gave them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewAnswer {
    pub epoch: u64,
    pub generation: u64,
    /// The instances it answers for (those of the asked keys it covers for the pod): an instance
    /// not named here is not said to be absent.
    pub ids: Vec<String>,
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
    pub fn part(&self, epoch: u64, ids: &[String]) -> ViewAnswer {
        let asked = |v: &serde_json::Value, field: &str| {
            v.get(field)
                .and_then(serde_json::Value::as_str)
                .is_some_and(|id| ids.iter().any(|i| i == id))
        };
        ViewAnswer {
            epoch,
            generation: self.generation,
            ids: ids.to_vec(),
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

/// Where the view stands.
#[derive(Debug, Clone)]
enum State {
    /// Not the holder, or the servers cannot be read: askers watch on their own.
    Unavailable,
    /// Just became the holder: the first read is under way.
    Starting,
    Ready(Arc<Snapshot>),
}

/// The holder's current snapshot, if it has one.
pub struct NodeView {
    state: watch::Sender<State>,
    /// Tells this view's numbering from another's (another holder, or this one restarted with
    /// the same session).
    epoch: u64,
    generation: AtomicU64,
    polls: AtomicUsize,
}

impl Default for NodeView {
    fn default() -> Self {
        NodeView {
            state: watch::Sender::new(State::Unavailable),
            epoch: fastrand::u64(1..),
            generation: AtomicU64::new(0),
            polls: AtomicUsize::new(0),
        }
    }
}

/// A request being answered, counted against [`MAX_POLLS`].
pub struct Poll<'a>(&'a AtomicUsize);

impl Drop for Poll<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl NodeView {
    /// This view's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// One more request being answered; None past [`MAX_POLLS`].
    pub fn poll(&self) -> Option<Poll<'_>> {
        if self.polls.fetch_add(1, Ordering::SeqCst) >= MAX_POLLS {
            self.polls.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Poll(&self.polls))
    }

    /// This sidecar just became the holder: its first read is under way.
    pub fn begin(&self) {
        self.state.send_if_modified(|s| {
            let unavailable = matches!(s, State::Unavailable);
            if unavailable {
                *s = State::Starting;
            }
            unavailable
        });
    }

    /// A new snapshot, read at `read_at`.
    pub fn publish(
        &self,
        read_at: Instant,
        services: Vec<serde_json::Value>,
        checks: Vec<serde_json::Value>,
        partial: bool,
    ) {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.state.send_replace(State::Ready(Arc::new(Snapshot {
            generation,
            partial,
            read_at,
            services,
            checks,
        })));
    }

    /// No view (not the holder, or the servers cannot be read): askers watch on their own.
    pub fn clear(&self) {
        self.state.send_if_modified(|s| {
            !matches!(std::mem::replace(s, State::Unavailable), State::Unavailable)
        });
    }

    /// A snapshot newer than `after` and read after `not_before`, as soon as there is one; after
    /// `wait`, the current one if it was read after `not_before`. None without a view (at once;
    /// a holder's first read is waited for, up to [`FIRST_READ`]) or when it goes meanwhile.
    pub async fn newer(
        &self,
        after: u64,
        not_before: Option<Instant>,
        wait: Duration,
    ) -> Option<Arc<Snapshot>> {
        let fits = |s: &Snapshot| not_before.is_none_or(|t| s.read_at > t);
        let mut rx = self.state.subscribe();
        let wait = match &*rx.borrow_and_update() {
            State::Unavailable => return None,
            State::Starting => wait.min(FIRST_READ),
            State::Ready(_) => wait,
        };
        let newer = async {
            let state = rx
                .wait_for(|s| match s {
                    State::Unavailable => true,
                    State::Starting => false,
                    State::Ready(s) => s.generation > after && fits(s),
                })
                .await
                .ok()?;
            match &*state {
                State::Ready(s) => Some(Arc::clone(s)),
                _ => None,
            }
        };
        match tokio::time::timeout(wait, newer).await {
            Ok(found) => found,
            Err(_) => match &*self.state.borrow() {
                State::Ready(s) if fits(s) => Some(Arc::clone(s)),
                _ => None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_peer_gets_only_the_asked_instances_part() {
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
        let State::Ready(snapshot) = view.state.borrow().clone() else {
            panic!("published");
        };
        let part = snapshot.part(view.epoch(), &["a-1".to_string()]);
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
        let ask = |after: u64, not_before: Option<Instant>| {
            let view = Arc::clone(&view);
            tokio::spawn(
                async move { view.newer(after, not_before, Duration::from_secs(60)).await },
            )
        };
        let settle = || tokio::time::sleep(Duration::from_millis(20));
        // No view: none, at once.
        assert!(view.newer(0, None, Duration::from_secs(60)).await.is_none());
        // A holder's first read is waited for.
        view.begin();
        let first = ask(0, None);
        settle().await;
        publish();
        assert_eq!(generation(first.await.expect("joined")), Some(1));
        // Newer than 1: the next publication answers...
        let waiting = ask(1, None);
        settle().await;
        publish();
        assert_eq!(generation(waiting.await.expect("joined")), Some(2));
        // ...and without one, the wait ends with the current snapshot.
        let current = view.newer(2, None, Duration::from_millis(50)).await;
        assert_eq!(generation(current), Some(2));
        // Written after the current one was read: the next one, or none.
        let written = Instant::now();
        assert!(
            view.newer(0, Some(written), Duration::from_millis(50))
                .await
                .is_none()
        );
        let waiting = ask(0, Some(written));
        settle().await;
        publish();
        assert_eq!(generation(waiting.await.expect("joined")), Some(3));
        // Cleared while waiting: none.
        let waiting = ask(3, None);
        settle().await;
        view.clear();
        assert!(waiting.await.expect("joined").is_none());
    }

    #[test]
    fn requests_past_the_cap_are_refused() {
        let view = NodeView::default();
        let polls: Vec<_> = (0..MAX_POLLS).map_while(|_| view.poll()).collect();
        assert_eq!(polls.len(), MAX_POLLS);
        assert!(view.poll().is_none());
        drop(polls);
        assert!(view.poll().is_some());
    }
}
