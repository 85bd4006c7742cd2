//! Catalog mode's shared session (`consul.catalog.sharedSession`): the sidecars of one virtual node
//! share one session, held and renewed by one of them, the *holder*; the others, its *peers*, take
//! their liveness keys with it and prove they are alive to the holder over the pod network (a
//! heartbeat to its admin server, `POST /shared-session`) instead of renewing sessions of their
//! own. The servers then see one renewal stream per virtual node, not one per pod.
//!
//! What keeps it safe:
//! - a peer joins only after the holder answered it, and leaves (a session of its own, its keys
//!   moved to it in one transaction, so no key ever disappears) when the holder stops answering
//!   for `sessionTTL / 2`, refuses it, or is gone: an unreachable holder (a NetworkPolicy, a
//!   crash, a drain) never costs a live peer its instances;
//! - the holder deletes a peer's keys (and the reapers then remove its instances) only
//!   `1.5 × sessionTTL` after the last heartbeat that named them, guarded by its session: a crashed
//!   peer goes within 2 × sessionTTL + 1 s, as with a session of its own;
//! - one key, one pod: the holder refuses a key that another live pod named (the same instance ID
//!   on the same node), and a peer writes to or removes an instance only while the key's value
//!   names its pod;
//! - a node lost whole takes the holder's session, and with it every key of the node.
//!
//! This module is the holder's desk (who is covered, until when) and the heartbeat's wire format;
//! [`super::session::Liveness`] plays both roles.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;

/// The admin server's path for heartbeats.
pub const PATH: &str = "/shared-session";
/// The header that carries the shared session's ID: only a sidecar that read the holder key may
/// heartbeat (the ID is as secret as the key prefix's `key:read`).
pub const SESSION_HEADER: &str = "X-Consul-Registrar-Session";

/// A peer's heartbeat: its pod and the keys it holds (or is about to take) with the session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Beat {
    #[serde(rename = "pod-uid")]
    pub pod_uid: String,
    pub keys: Vec<String>,
}

/// The holder's answer: its session, and the keys it refused (another live pod named them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ack {
    pub session: String,
    #[serde(default)]
    pub refused: Vec<String>,
}

/// The holder key's value: where the holder's admin server is, and its pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HolderValue {
    pub advertise: String,
    #[serde(rename = "pod-uid")]
    pub pod_uid: String,
}

/// The holder key of `node`'s shared session: `<prefix>/.holder/<node>` (a first segment with a
/// dot, like the reaper keys', is never a service's).
pub fn holder_key(prefix: &str, node: &str) -> String {
    format!("{prefix}/.holder/{node}")
}

/// The holder's side: the keys it holds for its peers, and when each was last named.
pub struct Desk {
    /// A peer's key is released this long after the last heartbeat that named it.
    grace: Duration,
    /// Heartbeats are refused when the session was last renewed longer ago than this.
    stale: Duration,
    /// Only keys on this virtual node, under this prefix, are taken in.
    key_start: String,
    key_node: String,
    state: std::sync::Mutex<DeskState>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct DeskState {
    /// The shared session while this sidecar holds it and accepts heartbeats.
    session: Option<String>,
    keys: BTreeMap<String, Covered>,
    /// This sidecar's own keys: refused to every peer (an instance ID of ours on another pod).
    mine: std::collections::BTreeSet<String>,
    /// The shared session's last renewal: a holder that cannot renew stops taking heartbeats
    /// (after `sessionTTL / 2`), so its peers leave while the session is still valid.
    renewed: Option<Instant>,
    /// When the desk last covered anyone: a holder that covered peers lately lets its session
    /// expire rather than destroying it, so they have the time to move their keys.
    last_covered: Option<Instant>,
}

struct Covered {
    pod: String,
    last: Instant,
}

/// How a heartbeat was answered: the HTTP status and body.
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Desk {
    pub fn new(ttl: Duration, prefix: &str, node: &str, metrics: Arc<Metrics>) -> Self {
        Desk {
            grace: ttl + ttl / 2,
            stale: ttl / 2,
            key_start: format!("{prefix}/"),
            key_node: node.to_string(),
            state: std::sync::Mutex::new(DeskState::default()),
            metrics,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, DeskState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts taking heartbeats for `session` (this sidecar just became the holder), covering the
    /// `known` keys (key, pod) it found held by that session (a restart of the holder: their
    /// pods heartbeat again, or they are released after the grace).
    pub fn open(&self, session: &str, known: Vec<(String, String)>) {
        let mut state = self.state();
        state.session = Some(session.to_string());
        let now = Instant::now();
        state.renewed = Some(now);
        for (key, pod) in known {
            state.keys.insert(key, Covered { pod, last: now });
        }
        self.count(&state);
    }

    /// The shared session was just renewed.
    pub fn renewed(&self) {
        self.state().renewed = Some(Instant::now());
    }

    /// Stops taking heartbeats (a drain, or the session was lost) and forgets the keys (whether
    /// the session must be left to expire is [`Desk::covered_lately`]).
    pub fn close(&self) {
        let mut state = self.state();
        state.session = None;
        if !state.keys.is_empty() {
            state.last_covered = Some(Instant::now());
        }
        state.keys.clear();
        self.count(&state);
    }

    /// Forgets every key (the session is gone, and its keys with it).
    pub fn clear(&self) {
        let mut state = self.state();
        state.session = None;
        state.keys.clear();
        self.count(&state);
    }

    /// Whether a peer was covered within the grace: the session must then be left to expire,
    /// never destroyed, so that they can move their keys.
    pub fn covered_lately(&self) -> bool {
        let state = self.state();
        !state.keys.is_empty() || state.last_covered.is_some_and(|t| t.elapsed() < self.grace)
    }

    /// Whether a request that presented `presented` as the session comes from a peer of the
    /// shared session this sidecar holds and renews: the session's ID, or the refusal.
    fn admit(&self, state: &DeskState, presented: Option<&str>) -> Result<String, Answer> {
        let Some(session) = state.session.clone() else {
            return Err(Answer {
                status: 410,
                body: "not the holder of a shared session (any more)\n".into(),
            });
        };
        if presented != Some(session.as_str()) {
            return Err(Answer {
                status: 409,
                body: "another session: read the holder key again\n".into(),
            });
        }
        if state.renewed.is_none_or(|t| t.elapsed() > self.stale) {
            // Consul has not heard from us for a while: the session may expire, taking every key
            // of the node with it. The peers had better move theirs to sessions of their own.
            return Err(Answer {
                status: 503,
                body: "cannot renew the shared session: take a session of your own\n".into(),
            });
        }
        Ok(session)
    }

    /// Whether a request for the node view that presented `presented` may be answered.
    pub fn admits(&self, presented: Option<&str>) -> Result<(), Answer> {
        self.admit(&self.state(), presented).map(|_| ())
    }

    /// Answers one heartbeat that presented `presented` as the session.
    pub fn answer(&self, presented: Option<&str>, body: &[u8]) -> Answer {
        let mut state = self.state();
        let session = match self.admit(&state, presented) {
            Ok(session) => session,
            Err(refused) => return refused,
        };
        let beat: Beat = match serde_json::from_slice(body) {
            Ok(b) => b,
            Err(e) => {
                return Answer {
                    status: 400,
                    body: format!("not a heartbeat: {e}\n"),
                };
            }
        };
        let now = Instant::now();
        // The pod's keys it no longer names (deregistered, or dropped from its manifest across a
        // restart) are released at the next pass: gone already, or an instance nobody holds.
        let named: std::collections::BTreeSet<&String> = beat.keys.iter().collect();
        let expired = now.checked_sub(self.grace).unwrap_or(now);
        for (key, c) in state.keys.iter_mut() {
            if c.pod == beat.pod_uid && !named.contains(key) {
                c.last = expired;
            }
        }
        let mut refused = Vec::new();
        for key in beat.keys {
            if !self.takes(&key) || state.mine.contains(&key) {
                refused.push(key);
                continue;
            }
            match state.keys.get_mut(&key) {
                Some(c) if c.pod != beat.pod_uid && c.last > expired => {
                    refused.push(key);
                }
                Some(c) => {
                    c.pod.clone_from(&beat.pod_uid);
                    c.last = now;
                }
                None => {
                    state.keys.insert(
                        key,
                        Covered {
                            pod: beat.pod_uid.clone(),
                            last: now,
                        },
                    );
                }
            }
        }
        state.last_covered = Some(now);
        self.count(&state);
        let ack = Ack { session, refused };
        Answer {
            status: 200,
            body: serde_json::to_string(&ack).unwrap_or_default(),
        }
    }

    /// Of `keys`, the instance IDs of those this desk covers for `pod` (a peer may read only its
    /// own instances in the node view).
    pub fn covered_ids(&self, pod: &str, keys: &[String]) -> Vec<String> {
        let state = self.state();
        keys.iter()
            .filter(|k| state.keys.get(*k).is_some_and(|c| c.pod == pod))
            .filter_map(|k| k.rsplit('/').next().map(str::to_string))
            .collect()
    }

    /// A key of this virtual node under this prefix: `<prefix>/<service>/<node>/<id>`.
    fn takes(&self, key: &str) -> bool {
        let Some(rest) = key.strip_prefix(&self.key_start) else {
            return false;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        parts.len() == 3
            && parts[1] == self.key_node
            && !parts[0].is_empty()
            && !parts[0].starts_with('.')
            && !parts[2].is_empty()
    }

    /// The keys last named longer than the grace ago, taken off the desk: their pods are gone.
    pub fn overdue(&self) -> Vec<String> {
        let mut state = self.state();
        let gone: Vec<String> = state
            .keys
            .iter()
            .filter(|(_, c)| c.last.elapsed() >= self.grace)
            .map(|(k, _)| k.clone())
            .collect();
        for key in &gone {
            state.keys.remove(key);
        }
        if !gone.is_empty() {
            self.count(&state);
        }
        gone
    }

    /// Claims `key` for this sidecar's own instance before it takes the key with the session: false
    /// when a live peer named it (that pod's instance, under the same session). Claimed, it is
    /// refused to every peer.
    pub fn claim(&self, key: &str) -> bool {
        let mut state = self.state();
        if state
            .keys
            .get(key)
            .is_some_and(|c| c.last.elapsed() < self.grace)
            && state.session.is_some()
        {
            return false;
        }
        state.keys.remove(key);
        state.mine.insert(key.to_string());
        true
    }

    /// This sidecar no longer holds `key` (its instance was deregistered).
    pub fn unclaim(&self, key: &str) {
        self.state().mine.remove(key);
    }

    /// Puts back a key whose release failed (Consul did not answer): tried again next time.
    pub fn requeue(&self, key: &str) {
        let mut state = self.state();
        let last = Instant::now()
            .checked_sub(self.grace)
            .unwrap_or_else(Instant::now);
        state.keys.entry(key.to_string()).or_insert(Covered {
            pod: String::new(),
            last,
        });
    }

    fn count(&self, state: &DeskState) {
        let pods: std::collections::BTreeSet<&str> = state
            .keys
            .values()
            .map(|c| c.pod.as_str())
            .filter(|p| !p.is_empty())
            .collect();
        self.metrics
            .shared_session_peers
            .set(i64::try_from(pods.len()).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desk() -> Desk {
        Desk::new(
            Duration::from_secs(10),
            "p/instances",
            "vnode",
            Metrics::new(),
        )
    }

    fn beat(pod: &str, keys: &[&str]) -> Vec<u8> {
        serde_json::to_vec(&Beat {
            pod_uid: pod.into(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
        })
        .unwrap_or_default()
    }

    fn refused(answer: &Answer) -> Vec<String> {
        serde_json::from_str::<Ack>(&answer.body)
            .map(|a| a.refused)
            .unwrap_or_else(|_| vec!["<no ack>".into()])
    }

    #[test]
    fn only_the_holder_with_the_right_session_answers() {
        let desk = desk();
        let body = beat("a", &["p/instances/hello/vnode/1"]);
        assert_eq!(desk.answer(Some("s"), &body).status, 410);
        desk.open("s", Vec::new());
        assert_eq!(desk.answer(Some("other"), &body).status, 409);
        assert_eq!(desk.answer(None, &body).status, 409);
        assert_eq!(desk.answer(Some("s"), b"{").status, 400);
        let ok = desk.answer(Some("s"), &body);
        assert_eq!(ok.status, 200);
        assert!(refused(&ok).is_empty());
        desk.close();
        assert_eq!(desk.answer(Some("s"), &body).status, 410);
    }

    #[test]
    fn a_key_named_by_a_live_pod_is_refused_to_another_and_foreign_keys_are_never_taken() {
        let desk = desk();
        desk.open("s", Vec::new());
        let key = "p/instances/hello/vnode/fixed";
        assert!(refused(&desk.answer(Some("s"), &beat("a", &[key]))).is_empty());
        assert_eq!(refused(&desk.answer(Some("s"), &beat("b", &[key]))), [key]);
        // The same pod again (a restarted container): accepted.
        assert!(refused(&desk.answer(Some("s"), &beat("a", &[key]))).is_empty());
        for foreign in [
            "other/instances/hello/vnode/1",
            "p/instances/hello/another-node/1",
            "p/instances/.reaper/hello",
            "p/instances/hello/vnode/1/extra",
        ] {
            assert_eq!(
                refused(&desk.answer(Some("s"), &beat("c", &[foreign]))),
                [foreign]
            );
        }
        assert!(desk.overdue().is_empty());
        assert!(desk.covered_lately());
    }

    #[test]
    fn a_holder_that_cannot_renew_sends_its_peers_away() {
        let desk = Desk::new(
            Duration::from_millis(100),
            "p/instances",
            "vnode",
            Metrics::new(),
        );
        desk.open("s", Vec::new());
        let body = beat("a", &["p/instances/hello/vnode/1"]);
        assert_eq!(desk.answer(Some("s"), &body).status, 200);
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(
            desk.answer(Some("s"), &body).status,
            503,
            "not renewed for TTL/2"
        );
        desk.renewed();
        assert_eq!(desk.answer(Some("s"), &body).status, 200);
    }

    #[test]
    fn keys_a_pod_stops_naming_are_released_and_free_for_another_pod_at_once() {
        let desk = desk();
        desk.open("s", Vec::new());
        let key = "p/instances/hello/vnode/web-0";
        assert!(refused(&desk.answer(Some("s"), &beat("old", &[key]))).is_empty());
        // The old pod drained: its last heartbeat names nothing.
        assert!(refused(&desk.answer(Some("s"), &beat("old", &[]))).is_empty());
        assert!(refused(&desk.answer(Some("s"), &beat("new", &[key]))).is_empty());
        // A pod that dropped a key from its manifest: released at the next pass.
        let dropped = "p/instances/hello/vnode/gone";
        desk.answer(Some("s"), &beat("p", &[dropped]));
        desk.answer(Some("s"), &beat("p", &[]));
        assert_eq!(desk.overdue(), [dropped]);
    }

    #[test]
    fn the_holders_own_keys_are_refused_to_peers_and_a_peers_key_to_the_holder() {
        let desk = desk();
        desk.open("s", Vec::new());
        let ours = "p/instances/hello/vnode/mine";
        assert!(desk.claim(ours));
        assert_eq!(
            refused(&desk.answer(Some("s"), &beat("peer", &[ours]))),
            [ours]
        );
        let theirs = "p/instances/hello/vnode/theirs";
        assert!(refused(&desk.answer(Some("s"), &beat("peer", &[theirs]))).is_empty());
        assert!(
            !desk.claim(theirs),
            "a live peer's key is not the holder's to take"
        );
        desk.unclaim(ours);
        assert!(refused(&desk.answer(Some("s"), &beat("peer", &[ours]))).is_empty());
    }
}
