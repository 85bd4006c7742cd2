//! Catalog mode's shared node session (`consul.catalog.sharedSession`), against a real Consul
//! `-dev` server, the real demo app and real sidecar processes on one virtual node: the sidecars of
//! a node share one session, which only its holder renews (its peers heartbeat the holder's admin
//! server instead); a SIGKILLed peer is reaped within 2 × sessionTTL + 1 s and nobody else moves;
//! a SIGKILLed or drained holder takes no live peer with it (the peers' instances keep their
//! CreateIndex) and another holder takes over; a sidecar that cannot reach the holder keeps a
//! session of its own and is never reaped; and a second sidecar with an instance ID already held
//! under the shared session never writes to nor removes the first one's instance, nor does a peer
//! with the holder's own instance ID touch the holder's.
//!
//! The holder's `advertise` must be the address its admin server listens on: the manifests say
//! `${CONSUL_REGISTRAR_ADMIN_ADDR}`, which the kit's `Sidecar` sets to the admin address it chose
//! (except where the holder advertises a closed port on purpose).

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::sidecar::Sidecar;
use support::{ConsulAgent, DemoApp, DemoAppOptions, free_port, instance_status, wait_until};

const SECOND: Duration = Duration::from_secs(1);
/// The manifests' session TTL.
const SESSION_TTL: Duration = Duration::from_secs(10);
/// How long a dead sidecar's instance may stay: 2 × TTL, plus a second.
const BOUND: Duration = Duration::from_secs(21);
/// How often the catalog is sampled while instances must stay.
const SAMPLE: Duration = Duration::from_millis(200);
const PREFIX: &str = "consul-registrar/instances";
/// The Kubernetes node every sidecar of these tests runs on.
const NODE: &str = "kube-a";
/// Where catalog mode's sessions live.
const SESSIONS_NODE: &str = "consul-registrar--sessions";
const RENEWALS: &str = "consul_registrar_session_renewals_total";
const BEATS: &str = "consul_registrar_shared_session_beats_total";
const REQUESTS: &str = "consul_registrar_consul_requests_total";
/// A sidecar's own admin address, as its manifest reads it (the kit sets the variable).
const OWN_ADMIN: &str = "${CONSUL_REGISTRAR_ADMIN_ADDR}";

/// A one-instance catalog-mode manifest: service `hello`, instance `id`, the shared session with
/// `advertise` as this sidecar's address for the others of its virtual node.
fn manifest(consul: &str, id: &str, port: u16, advertise: &str) -> String {
    format!(
        "consul:
  mode: catalog
  address: {consul}
  retry:
    initial: 50ms
    max: 500ms
  catalog:
    sessionTTL: 10s
    sharedSession:
      advertise: \"{advertise}\"
drain:
  delay: 1s
  deregisterTimeout: 3s
services:
  - name: hello
    id: {id}
    address: 127.0.0.1
    port: {port}
    tags: [grpc]
    health:
      service: helloworld.Greeter
      interval: 200ms
      timeout: 200ms
      failureThreshold: 1
"
    )
}

fn virtual_node() -> String {
    format!("consul-registrar-{NODE}")
}

/// The liveness key of instance `id` of `hello`.
fn key(id: &str) -> String {
    format!("{PREFIX}/hello/{}/{id}", virtual_node())
}

/// The key whose session is the virtual node's shared session.
fn holder_key() -> String {
    format!("{PREFIX}/.holder/{}", virtual_node())
}

fn reaper_key() -> String {
    format!("{PREFIX}/.reaper/hello")
}

/// The sidecar of one pod on [`NODE`] (the kit's [`Sidecar`]), with the instance ID it registers and
/// its pod's UID. Dropping it kills the sidecar; if the test is failing, its log is printed.
struct Member {
    /// The instance ID it registers.
    id: &'static str,
    /// Its pod's `POD_UID`.
    uid: &'static str,
    sidecar: Sidecar,
}

impl Member {
    /// Starts the sidecar of pod `uid` (also its HOSTNAME) registering instance `id`; the holder
    /// reaches it at its own admin address, or at `advertise` when given.
    fn start(
        consul: &ConsulAgent,
        app: &DemoApp,
        member: (&'static str, &'static str),
        advertise: Option<&str>,
    ) -> Member {
        Member::start_resyncing(consul, app, member, advertise, "1m")
    }

    /// [`start`](Self::start), with the manifest's `resyncInterval` set to `resync`.
    fn start_resyncing(
        consul: &ConsulAgent,
        app: &DemoApp,
        (id, uid): (&'static str, &'static str),
        advertise: Option<&str>,
        resync: &str,
    ) -> Member {
        let text = manifest(
            &consul.http_addr(),
            id,
            app.port(),
            advertise.unwrap_or(OWN_ADMIN),
        )
        .replace(
            "  catalog:\n",
            &format!("  resyncInterval: {resync}\n  catalog:\n"),
        );
        let env = [
            ("NODE_NAME", NODE),
            ("HOST_IP", "127.0.0.1"),
            ("HOSTNAME", uid),
            ("POD_UID", uid),
        ];
        Member {
            id,
            uid,
            sidecar: Sidecar::start(&text, &env),
        }
    }

    async fn renewals_ok(&self) -> f64 {
        self.sidecar
            .metrics()
            .await
            .sum(RENEWALS, Some(("outcome", "ok")))
    }
}

impl Drop for Member {
    /// Names the sidecar whose log the kit prints next, when the test is failing.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- the next consul-registrar log is {}'s (pod {}) -----",
                self.id, self.uid
            );
        }
    }
}

/// The ends of the logs of `sidecars`, for failure messages.
fn tails(sidecars: &[&Member]) -> String {
    sidecars
        .iter()
        .map(|s| {
            format!(
                "----- {} (pod {}), last lines -----\n{}\n",
                s.id,
                s.uid,
                s.sidecar.tail(40)
            )
        })
        .collect()
}

/// The session holding `key`, if any.
async fn session_of(consul: &ConsulAgent, key: &str) -> Option<String> {
    consul
        .kv_entry(key)
        .await
        .and_then(|e| e["Session"].as_str().map(String::from))
}

/// The JSON value of `key` (`?raw`), None when the key is absent or its value is not JSON.
async fn value_of(consul: &ConsulAgent, key: &str) -> Option<Value> {
    match consul.get(&format!("/v1/kv/{key}?raw")).await {
        Ok((200, v)) if !v.is_null() => Some(v),
        _ => None,
    }
}

/// The pod UID the holder key names.
async fn holder_uid(consul: &ConsulAgent) -> Option<String> {
    value_of(consul, &holder_key())
        .await
        .and_then(|v| v["pod-uid"].as_str().map(String::from))
}

/// The `hello` instances of the virtual node, by ID: (CreateIndex, aggregated check status).
async fn instances(consul: &ConsulAgent) -> BTreeMap<String, (Value, &'static str)> {
    let entries = Value::Array(consul.health_service("hello").await);
    let mut out = BTreeMap::new();
    for e in entries.as_array().into_iter().flatten() {
        if e["Node"]["Node"] != virtual_node().as_str() {
            continue;
        }
        if let Some(id) = e["Service"]["ID"].as_str() {
            let status = instance_status(&entries, id).unwrap_or("absent");
            out.insert(
                id.to_string(),
                (e["Service"]["CreateIndex"].clone(), status),
            );
        }
    }
    out
}

/// The CreateIndex of each of `ids`; panics if one is not registered.
async fn create_indexes(consul: &ConsulAgent, ids: &[&str]) -> BTreeMap<String, Value> {
    let now = instances(consul).await;
    ids.iter()
        .map(|id| {
            let (index, _) = now
                .get(*id)
                .unwrap_or_else(|| panic!("{id} is not registered: {now:?}"));
            (id.to_string(), index.clone())
        })
        .collect()
}

/// What [`watch`] checks.
struct Watch<'a> {
    /// Instances that must stay registered with this CreateIndex.
    kept: &'a BTreeMap<String, Value>,
    /// ... and stay passing.
    passing: bool,
    /// An instance that should go: when it was first seen absent is returned.
    going: Option<&'a str>,
    /// Whose logs a failure shows.
    sidecars: &'a [&'a Member],
}

/// Samples the virtual node's instances every [`SAMPLE`] for `span`: panics as soon as a kept
/// instance is absent, has another CreateIndex (it was removed and registered again), or (when
/// asked) is not passing. Returns when the `going` instance was first seen absent, as time since
/// `since`.
async fn watch(
    consul: &ConsulAgent,
    w: &Watch<'_>,
    span: Duration,
    since: Instant,
) -> Option<Duration> {
    let start = Instant::now();
    let mut gone = None;
    loop {
        let now = instances(consul).await;
        for (id, index) in w.kept {
            match now.get(id) {
                None => panic!(
                    "{id}'s instance was removed {:?} into the watch ({:?} after the event)\n{}",
                    start.elapsed(),
                    since.elapsed(),
                    tails(w.sidecars)
                ),
                Some((i, _)) if i != index => panic!(
                    "{id}'s instance was removed and registered again (CreateIndex {index} → {i}) \
                     {:?} after the event\n{}",
                    since.elapsed(),
                    tails(w.sidecars)
                ),
                Some((_, status)) if w.passing && *status != "passing" => panic!(
                    "{id}'s instance turned {status} {:?} after the event\n{}",
                    since.elapsed(),
                    tails(w.sidecars)
                ),
                Some(_) => {}
            }
        }
        if let Some(going) = w.going
            && gone.is_none()
            && !now.contains_key(going)
        {
            gone = Some(since.elapsed());
        }
        if start.elapsed() >= span {
            return gone;
        }
        tokio::time::sleep(SAMPLE).await;
    }
}

async fn passing(consul: &ConsulAgent, sidecar: &Member) {
    assert!(
        consul
            .wait_for_status("hello", sidecar.id, "passing", 15 * SECOND)
            .await,
        "{} never passed\n{}",
        sidecar.id,
        tails(&[sidecar])
    );
}

/// Starts `first`, waits until it is the holder (the holder key names its pod, under the session
/// that holds its own liveness key) and until someone holds `hello`'s reaper key (so that no peer
/// leaves the shared session to take it); returns it and the shared session.
async fn start_holder(
    consul: &ConsulAgent,
    app: &DemoApp,
    first: (&'static str, &'static str),
    advertise: Option<&str>,
) -> (Member, String) {
    start_holder_resyncing(consul, app, first, advertise, "1m").await
}

/// [`start_holder`], with the manifest's `resyncInterval` set to `resync`.
async fn start_holder_resyncing(
    consul: &ConsulAgent,
    app: &DemoApp,
    first: (&'static str, &'static str),
    advertise: Option<&str>,
    resync: &str,
) -> (Member, String) {
    let holder = Member::start_resyncing(consul, app, first, advertise, resync);
    passing(consul, &holder).await;
    let became = wait_until(10 * SECOND, || async {
        let session = session_of(consul, &holder_key()).await;
        session.is_some()
            && session == session_of(consul, &key(holder.id)).await
            && holder_uid(consul).await.as_deref() == Some(holder.uid)
    })
    .await;
    assert!(
        became,
        "the first sidecar of the node never became the holder: holder key {:?} (value {:?}), its \
         liveness key held by {:?}\n{}",
        consul.kv_entry(&holder_key()).await,
        value_of(consul, &holder_key()).await,
        session_of(consul, &key(holder.id)).await,
        tails(&[&holder])
    );
    assert!(
        wait_until(10 * SECOND, || async {
            session_of(consul, &reaper_key()).await.is_some()
        })
        .await,
        "nobody took the reaper key of hello\n{}",
        tails(&[&holder])
    );
    let shared = session_of(consul, &holder_key())
        .await
        .expect("the holder key is held");
    (holder, shared)
}

/// After the holder of `shared` went (`what`, at `since`): within a TTL the holder key is held by
/// another live session and names one of `peers`, whose keys are all still there.
async fn a_peer_holds_instead_of(
    consul: &ConsulAgent,
    shared: &str,
    peers: &[&Member],
    what: &str,
    since: Instant,
) {
    let live: Vec<&str> = peers.iter().map(|s| s.uid).collect();
    let taken = wait_until(SESSION_TTL, || async {
        let Some(session) = session_of(consul, &holder_key()).await else {
            return false;
        };
        session != shared
            && consul.session(&session).await.is_some()
            && holder_uid(consul)
                .await
                .is_some_and(|uid| live.contains(&uid.as_str()))
    })
    .await;
    assert!(
        taken,
        "no new holder {:?} after {what}: holder key {:?}, value {:?}\n{}",
        since.elapsed(),
        consul.kv_entry(&holder_key()).await,
        value_of(consul, &holder_key()).await,
        tails(peers)
    );
    for peer in peers {
        assert!(
            consul.kv_entry(&key(peer.id)).await.is_some(),
            "the live peer {}'s key is gone",
            peer.id
        );
    }
}

/// Waits until the liveness keys of `sidecars` are all held by `shared`.
async fn all_share(consul: &ConsulAgent, sidecars: &[&Member], shared: &str) {
    let ok = wait_until(SESSION_TTL + 5 * SECOND, || async {
        for s in sidecars {
            if session_of(consul, &key(s.id)).await.as_deref() != Some(shared) {
                return false;
            }
        }
        true
    })
    .await;
    if !ok {
        let mut held = Vec::new();
        for s in sidecars {
            held.push((s.id, session_of(consul, &key(s.id)).await));
        }
        panic!(
            "the liveness keys are not all held by the shared session {shared}: {held:?} (reaper key \
             held by {:?})\n{}",
            session_of(consul, &reaper_key()).await,
            tails(sidecars)
        );
    }
}

/// Three sidecars of `hello` on the virtual node, `s-1` the holder (started first), `s-2` and `s-3`
/// its peers, all three keys under the shared session; and that session.
async fn three_sharing(consul: &ConsulAgent, app: &DemoApp) -> (Vec<Member>, String) {
    three_sharing_resyncing(consul, app, "1m").await
}

/// [`three_sharing`], with the manifests' `resyncInterval` set to `resync`.
async fn three_sharing_resyncing(
    consul: &ConsulAgent,
    app: &DemoApp,
    resync: &str,
) -> (Vec<Member>, String) {
    let (holder, shared) =
        start_holder_resyncing(consul, app, ("s-1", "pod-uid-1"), None, resync).await;
    let mut sidecars = vec![
        holder,
        Member::start_resyncing(consul, app, ("s-2", "pod-uid-2"), None, resync),
        Member::start_resyncing(consul, app, ("s-3", "pod-uid-3"), None, resync),
    ];
    for s in &sidecars[1..] {
        passing(consul, s).await;
    }
    all_share(consul, &sidecars.iter().collect::<Vec<_>>(), &shared).await;
    // The holder, as the holder key names it (by pod UID) first.
    let uid = holder_uid(consul).await;
    let at = sidecars
        .iter()
        .position(|s| Some(s.uid) == uid.as_deref())
        .unwrap_or_else(|| panic!("the holder key names pod {uid:?}, none of the three"));
    sidecars.swap(0, at);
    (sidecars, shared)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_on_one_virtual_node_share_one_session_and_only_the_holder_renews_it() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let (sidecars, shared) = three_sharing(&consul, &app).await;
    let all: Vec<&Member> = sidecars.iter().collect();
    let (holder, peers) = (&sidecars[0], &sidecars[1..]);

    let one_session = wait_until(5 * SECOND, || async {
        let sessions = consul.sessions_on(SESSIONS_NODE).await;
        sessions.len() == 1 && sessions[0]["ID"] == shared.as_str()
    })
    .await;
    assert!(
        one_session,
        "three sidecars sharing session {shared} should leave exactly that one session on {SESSIONS_NODE}, \
         found {:?}\n{}",
        consul
            .sessions_on(SESSIONS_NODE)
            .await
            .iter()
            .map(|s| s["ID"].clone())
            .collect::<Vec<_>>(),
        tails(&all)
    );

    let holder_before = holder.renewals_ok().await;
    let mut peers_before = 0.0;
    let mut beats_before = Vec::new();
    for p in peers {
        let m = p.sidecar.metrics().await;
        peers_before += m.sum(RENEWALS, Some(("outcome", "ok")));
        beats_before.push(m.sum(BEATS, Some(("outcome", "ok"))));
    }
    // Renewals come every TTL/2 (on the session's TTL/10 tick): two in 1.3 × TTL at least.
    let window = SESSION_TTL.mul_f64(1.3);
    tokio::time::sleep(window).await;
    let holder_renewed = holder.renewals_ok().await - holder_before;
    let mut peers_after = 0.0;
    let mut beats = Vec::new();
    for (p, before) in peers.iter().zip(&beats_before) {
        let m = p.sidecar.metrics().await;
        peers_after += m.sum(RENEWALS, Some(("outcome", "ok")));
        beats.push(m.sum(BEATS, Some(("outcome", "ok"))) - before);
    }
    assert_eq!(
        peers_after - peers_before,
        0.0,
        "the peers renewed sessions {} times in {window:?} ({peers_after} in all): only the \
         holder should renew\n{}",
        peers_after - peers_before,
        tails(&all)
    );
    assert!(
        holder_renewed >= 2.0,
        "the holder renewed the shared session {holder_renewed} times in {window:?} (every \
         TTL/2 expected)\n{}",
        tails(&all)
    );
    assert!(
        beats.iter().all(|b| *b >= 3.0),
        "the peers' successful heartbeats to the holder in {window:?}: {beats:?} (every TTL/10 \
         expected)\n{}",
        tails(&all)
    );
    // Nobody left meanwhile.
    all_share(&consul, &all, &shared).await;
    assert!(
        consul.session(&shared).await.is_some(),
        "the shared session is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_peer_is_reaped_within_two_session_ttls_and_nobody_else_moves() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let (mut sidecars, shared) = three_sharing(&consul, &app).await;
    // sidecars[0] is the holder; the victim is a peer.
    let victim = sidecars.remove(1);
    let (victim_id, victim_uid) = (victim.id, victim.uid);
    let kept = create_indexes(&consul, &[sidecars[0].id, sidecars[1].id]).await;
    assert!(
        instances(&consul).await.contains_key(victim_id),
        "the victim is not registered"
    );

    victim.sidecar.signal("KILL");
    let killed = Instant::now();
    drop(victim);
    let all: Vec<&Member> = sidecars.iter().collect();
    let w = Watch {
        kept: &kept,
        passing: false,
        going: Some(victim_id),
        sidecars: &all,
    };
    let gone = watch(&consul, &w, BOUND + 5 * SECOND, killed).await;
    let Some(gone) = gone else {
        panic!(
            "the SIGKILLed peer {victim_id} (pod {victim_uid}) is still in the catalog {:?} after \
             the kill; its key is held by {:?} (the shared session is {shared})\n{}",
            killed.elapsed(),
            session_of(&consul, &key(victim_id)).await,
            tails(&all)
        );
    };
    println!("FIGURE SIGKILLed peer reaped after {gone:?}");
    assert!(
        gone <= BOUND,
        "the SIGKILLed peer {victim_id} was reaped {gone:?} after the kill; the bound is 2 × \
         session TTL + 1 s = {BOUND:?}"
    );
    assert!(
        consul.kv_entry(&key(victim_id)).await.is_none(),
        "the SIGKILLed peer's key stayed"
    );
    // Nobody else moved: the holder and the other peer still share the one session, under the
    // same holder, and the one reaped instance is the dead peer's.
    all_share(&consul, &all, &shared).await;
    assert_eq!(
        holder_uid(&consul).await.as_deref(),
        Some(sidecars[0].uid),
        "the holder changed though only a peer died\n{}",
        tails(&all)
    );
    let mut reaped = 0.0;
    for s in &sidecars {
        reaped += s
            .sidecar
            .metrics()
            .await
            .sum("consul_registrar_reaped_total", None);
    }
    assert_eq!(
        reaped,
        1.0,
        "the survivors should have reaped one instance, the dead peer's\n{}",
        tails(&all)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_holder_takes_no_live_peer_with_it() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let (mut sidecars, shared) = three_sharing(&consul, &app).await;
    let holder = sidecars.remove(0);
    let (holder_id, holder_pod) = (holder.id, holder.uid);
    let peer_ids: Vec<&str> = sidecars.iter().map(|s| s.id).collect();
    let kept = create_indexes(&consul, &peer_ids).await;

    holder.sidecar.signal("KILL");
    let killed = Instant::now();
    drop(holder);
    let peers: Vec<&Member> = sidecars.iter().collect();
    let w = Watch {
        kept: &kept,
        passing: false,
        going: Some(holder_id),
        sidecars: &peers,
    };
    // The peers' instances stay, with the same CreateIndex, for 3 × TTL: their keys were moved to
    // sessions of their own before the shared one expired.
    let gone = watch(&consul, &w, 3 * SESSION_TTL, killed).await;
    let gone = gone.unwrap_or_else(|| {
        panic!(
            "the SIGKILLed holder's instance {holder_id} is still in the catalog {:?} after the kill\n{}",
            killed.elapsed(),
            tails(&peers)
        )
    });
    println!("FIGURE SIGKILLed holder's instance reaped after {gone:?}");
    assert!(
        gone <= BOUND,
        "the SIGKILLed holder's instance was reaped {gone:?} after the kill; the bound is {BOUND:?}"
    );
    assert!(
        consul.session(&shared).await.is_none(),
        "the dead holder's session {shared} is still alive {:?} after the kill",
        killed.elapsed()
    );

    // A new holder: the holder key is held by a live session and names a live pod.
    a_peer_holds_instead_of(
        &consul,
        &shared,
        &peers,
        &format!("the holder (pod {holder_pod}) was killed"),
        killed,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_holder_leaves_its_peers_registered() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let (mut sidecars, shared) = three_sharing(&consul, &app).await;
    let mut holder = sidecars.remove(0);
    let peer_ids: Vec<&str> = sidecars.iter().map(|s| s.id).collect();
    let kept = create_indexes(&consul, &peer_ids).await;

    holder.sidecar.signal("TERM");
    let drained = Instant::now();
    let peers: Vec<&Member> = sidecars.iter().collect();
    let w = Watch {
        kept: &kept,
        passing: false,
        going: Some(holder.id),
        sidecars: &peers,
    };
    let gone = watch(&consul, &w, 2 * SESSION_TTL, drained).await;
    let status = holder.sidecar.exit_within(SECOND).await;
    assert!(
        status.is_some(),
        "the holder has not exited {:?} after SIGTERM (drain delay 1 s)\n{}",
        drained.elapsed(),
        tails(&[&holder])
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "the drained holder's exit\n{}",
        tails(&[&holder])
    );
    assert!(
        gone.is_some(),
        "the drained holder's instance {} is still in the catalog {:?} after SIGTERM\n{}",
        holder.id,
        drained.elapsed(),
        tails(&[&holder])
    );

    a_peer_holds_instead_of(&consul, &shared, &peers, "the holder drained", drained).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_cannot_reach_the_holder_keeps_its_own_session() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    // The holder advertises a port nothing listens on.
    let closed = format!("127.0.0.1:{}", free_port());
    let (holder, shared) = start_holder(&consul, &app, ("s-1", "pod-uid-1"), Some(&closed)).await;
    assert_eq!(
        value_of(&consul, &holder_key())
            .await
            .map(|v| v["advertise"].clone()),
        Some(Value::from(closed.as_str())),
        "the holder key should carry the holder's advertise address"
    );
    let peer = Member::start(&consul, &app, ("s-2", "pod-uid-2"), None);
    passing(&consul, &peer).await;
    let all = [&holder, &peer];

    let own = wait_until(SESSION_TTL, || async {
        match session_of(&consul, &key(peer.id)).await {
            Some(s) => s != shared && consul.session(&s).await.is_some(),
            None => false,
        }
    })
    .await;
    assert!(
        own,
        "the sidecar that cannot reach the holder should hold its key with a session of its own: \
         it is held by {:?}, the shared session is {shared}\n{}",
        session_of(&consul, &key(peer.id)).await,
        tails(&all)
    );
    let own_session = session_of(&consul, &key(peer.id))
        .await
        .expect("the key is held");
    let kept = create_indexes(&consul, &[holder.id, peer.id]).await;
    let w = Watch {
        kept: &kept,
        passing: false,
        going: None,
        sidecars: &all,
    };
    let since = Instant::now();
    watch(&consul, &w, 2 * SESSION_TTL, since).await;
    assert_eq!(
        session_of(&consul, &key(peer.id)).await,
        Some(own_session.clone()),
        "the unreachable holder's would-be peer lost or changed its key's session"
    );
    assert!(
        consul.session(&own_session).await.is_some(),
        "the peer's own session {own_session} is gone"
    );
    assert_eq!(
        session_of(&consul, &key(holder.id)).await,
        Some(shared),
        "the holder's key changed hands"
    );
    for s in all {
        assert_eq!(
            s.sidecar
                .metrics()
                .await
                .sum("consul_registrar_reaped_total", None),
            0.0,
            "{} reaped something\n{}",
            s.id,
            tails(&all)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_id_under_one_holder_never_touches_the_first_ones_instance() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let (holder, shared) = start_holder(&consul, &app, ("h-1", "pod-uid-h"), None).await;
    let first = Member::start(&consul, &app, ("dup-1", "pod-uid-a"), None);
    passing(&consul, &first).await;
    all_share(&consul, &[&holder, &first], &shared).await;
    let first_uid = |v: Option<Value>| v.and_then(|v| v["pod-uid"].as_str().map(String::from));
    assert_eq!(
        first_uid(value_of(&consul, &key("dup-1")).await).as_deref(),
        Some(first.uid),
        "the first sidecar's key should name its pod"
    );
    let kept = create_indexes(&consul, &["h-1", "dup-1"]).await;

    // A second pod on the node with the same instance ID joins the same holder.
    let mut second = Member::start(&consul, &app, ("dup-1", "pod-uid-b"), None);
    let all = [&holder, &first, &second];
    let w = Watch {
        kept: &kept,
        passing: true,
        going: None,
        sidecars: &all,
    };
    let started = Instant::now();
    watch(&consul, &w, 5 * SECOND, started).await;
    let key_owner = first_uid(value_of(&consul, &key("dup-1")).await);
    assert_eq!(
        key_owner.as_deref(),
        Some(first.uid),
        "the second sidecar of dup-1 took or rewrote the first one's key\n{}",
        tails(&all)
    );

    // It drains; the first one's instance stays, passing, past the time the holder would drop the
    // keys of a pod that stopped beating (1.5 × TTL) and a reaper's reaction.
    second.sidecar.signal("TERM");
    let drained = Instant::now();
    let exited = second.sidecar.exit_within(10 * SECOND).await;
    assert!(
        exited.is_some(),
        "the second sidecar of dup-1 did not exit within 10 s of SIGTERM\n{}",
        tails(&[&second])
    );
    let all = [&holder, &first];
    let w = Watch {
        kept: &kept,
        passing: true,
        going: None,
        sidecars: &all,
    };
    watch(&consul, &w, BOUND, drained).await;
    assert_eq!(
        session_of(&consul, &key("dup-1")).await,
        Some(shared),
        "the first sidecar's key is no longer held by the shared session\n{}",
        tails(&all)
    );
    assert_eq!(
        first_uid(value_of(&consul, &key("dup-1")).await).as_deref(),
        Some(first.uid),
        "the first sidecar's key no longer names its pod"
    );
    drop(second);
}

/// Samples every [`SAMPLE`] for `span` that the holder's instance keeps its CreateIndex (as in
/// `kept`) and stays passing, and that its liveness key stays held by `shared` and names the
/// holder's pod; panics at the first sample that says otherwise, saying how long it was after
/// `since` (`what` says what happened then).
async fn holder_keeps(
    consul: &ConsulAgent,
    holder: &Member,
    (kept, shared): (&BTreeMap<String, Value>, &str),
    (span, since, what): (Duration, Instant, &str),
    sidecars: &[&Member],
) {
    let w = Watch {
        kept,
        passing: true,
        going: None,
        sidecars,
    };
    let start = Instant::now();
    loop {
        watch(consul, &w, Duration::ZERO, since).await;
        let session = session_of(consul, &key(holder.id)).await;
        let value = value_of(consul, &key(holder.id)).await;
        let pod = value
            .as_ref()
            .and_then(|v| v["pod-uid"].as_str().map(String::from));
        assert!(
            session.as_deref() == Some(shared) && pod.as_deref() == Some(holder.uid),
            "{:?} {what}, the holder's liveness key {} is held by {session:?} (the shared session \
             is {shared}) and names pod {pod:?} (value {value:?}), not the holder's pod {}: \
             another sidecar took or rewrote it\n{}",
            since.elapsed(),
            key(holder.id),
            holder.uid,
            tails(sidecars)
        );
        if start.elapsed() >= span {
            return;
        }
        tokio::time::sleep(SAMPLE).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_the_holders_instance_id_never_touches_the_holders_instance() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let (holder, shared) = start_holder(&consul, &app, ("dup-1", "pod-uid-h"), None).await;
    let kept = create_indexes(&consul, &["dup-1"]).await;
    // Before anyone else comes: the key names the holder's pod, under the shared session.
    holder_keeps(
        &consul,
        &holder,
        (&kept, &shared),
        (Duration::ZERO, Instant::now(), "before the second sidecar"),
        &[&holder],
    )
    .await;

    // A second pod on the node with the holder's own instance ID joins the holder: its heartbeat
    // names the holder's key, which is the holder's own, not a peer's to cover.
    let mut second = Member::start(&consul, &app, ("dup-1", "pod-uid-b"), None);
    let started = Instant::now();
    holder_keeps(
        &consul,
        &holder,
        (&kept, &shared),
        (
            8 * SECOND,
            started,
            "after the second sidecar of dup-1 started",
        ),
        &[&holder, &second],
    )
    .await;

    // It drains (how it exits is not the point); the holder's instance stays, passing, under the
    // shared session, past the time a holder drops the keys of a pod that stopped beating
    // (1.5 × TTL) and a reaper's reaction.
    second.sidecar.signal("TERM");
    let drained = Instant::now();
    let exited = second.sidecar.exit_within(10 * SECOND).await;
    assert!(
        exited.is_some(),
        "the second sidecar of dup-1 did not exit within 10 s of SIGTERM\n{}",
        tails(&[&holder, &second])
    );
    holder_keeps(
        &consul,
        &holder,
        (&kept, &shared),
        (
            BOUND,
            drained,
            "after the second sidecar of dup-1 was sent SIGTERM",
        ),
        &[&holder, &second],
    )
    .await;
    drop(second);
}

/// The Consul requests `operation` a sidecar has made so far.
async fn requests(member: &Member, operation: &str) -> f64 {
    member
        .sidecar
        .metrics()
        .await
        .sum(REQUESTS, Some(("operation", operation)))
}

/// Removes instance `id` from the virtual node by hand, as an operator or a restored snapshot might.
async fn deregister_by_hand(consul: &ConsulAgent, id: &str) {
    let status = consul
        .put(
            "/v1/catalog/deregister",
            &serde_json::json!({ "Node": virtual_node(), "ServiceID": id }),
        )
        .await
        .expect("deregister by hand");
    assert_eq!(status, 200, "deregistering {id} by hand");
}

/// Waits up to `within` for instance `id` to be registered and passing.
async fn back_passing(consul: &ConsulAgent, id: &str, within: Duration) -> bool {
    wait_until(within, || async {
        instances(consul)
            .await
            .get(id)
            .is_some_and(|(_, status)| *status == "passing")
    })
    .await
}

/// The node's sidecars watch the holder's view of their virtual node, not the servers: the
/// holder alone keeps a blocking query on the node; a change there (a peer's instance removed by
/// hand) wakes it, the peer whose instance it was registers it again at once (well within
/// resyncInterval, 1 m here), and no sidecar of the node asks the servers for its instance, not
/// even the one that wrote, whose write the holder's next snapshot already shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecars_of_a_node_watch_the_holders_view_of_it_not_the_servers() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let (sidecars, _shared) = three_sharing(&consul, &app).await;
    let all: Vec<&Member> = sidecars.iter().collect();
    let holder = &sidecars[0];
    // The peers' first watches may have gone to the servers before they joined.
    tokio::time::sleep(2 * SECOND).await;
    let mut before = Vec::new();
    for s in &sidecars {
        before.push(requests(s, "watch_instance").await);
    }
    let holder_watched = requests(holder, "watch_node").await;

    let moved = &sidecars[1];
    deregister_by_hand(&consul, moved.id).await;
    let since = Instant::now();
    assert!(
        back_passing(&consul, moved.id, 5 * SECOND).await,
        "{}'s instance, removed by hand, was not registered again within 5 s (resyncInterval 1m: \
         the change must wake the watch)\n{}",
        moved.id,
        tails(&all)
    );
    let back = since.elapsed();
    // Two of the view's 5 s polls: the sidecar that wrote still takes the holder's answers.
    tokio::time::sleep(11 * SECOND).await;
    for (s, b) in sidecars.iter().zip(&before) {
        let watched = requests(s, "watch_instance").await - b;
        assert_eq!(
            watched,
            0.0,
            "{} asked the servers for its instance {watched} times (blocking queries) while the \
             holder's view answers for the node\n{}",
            s.id,
            tails(&all)
        );
    }
    assert!(
        requests(holder, "watch_node").await > holder_watched,
        "the holder's watch of the node did not wake on the change\n{}",
        tails(&all)
    );
    eprintln!("registered again {back:?} after the removal by hand");
}

/// A peer's instance edited by hand (its tags) is put back through the holder's view within
/// resyncInterval (3 s here): the view carries the definitions, not only the checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_instance_edited_by_hand_is_put_back_through_the_view() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let (sidecars, _shared) = three_sharing_resyncing(&consul, &app, "3s").await;
    let all: Vec<&Member> = sidecars.iter().collect();
    let edited = &sidecars[2];
    let entry = consul
        .health_service("hello")
        .await
        .into_iter()
        .find(|e| e["Service"]["ID"] == edited.id)
        .expect("the instance is registered");
    let mut service = entry["Service"].clone();
    service["Tags"] = serde_json::json!(["edited-by-hand"]);
    let status = consul
        .put(
            "/v1/catalog/register",
            &serde_json::json!({
                "Node": virtual_node(),
                "Address": entry["Node"]["Address"],
                "Service": service,
                "SkipNodeUpdate": true,
            }),
        )
        .await
        .expect("edit by hand");
    assert_eq!(status, 200, "editing {}'s tags by hand", edited.id);
    let tags = || async {
        consul
            .catalog_service("hello")
            .await
            .into_iter()
            .find(|s| s["ServiceID"] == edited.id)
            .map(|s| s["ServiceTags"].clone())
    };
    assert!(
        wait_until(3 * SECOND + 5 * SECOND, || async {
            tags().await == Some(serde_json::json!(["grpc"]))
        })
        .await,
        "{}'s tags were not put back within resyncInterval (3 s) + 5 s: {:?}\n{}",
        edited.id,
        tags().await,
        tails(&all)
    );
}

/// Three sharing, every peer in a long poll of the holder's view; then the holder gets `signal`
/// and a peer's instance is removed by hand: it must be registered again within `within`.
async fn a_peer_repairs_without_its_holder(signal: &str, within: Duration) {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let (sidecars, _shared) = three_sharing(&consul, &app).await;
    tokio::time::sleep(2 * SECOND).await;
    sidecars[0].sidecar.signal(signal);
    let all: Vec<&Member> = sidecars.iter().collect();
    let peer = &sidecars[2];
    deregister_by_hand(&consul, peer.id).await;
    let back = back_passing(&consul, peer.id, within).await;
    if signal == "STOP" {
        sidecars[0].sidecar.signal("CONT");
    }
    assert!(
        back,
        "{}'s instance, removed by hand after SIG{signal} to its holder, was not registered again \
         within {within:?}\n{}",
        peer.id,
        tails(&all)
    );
}

/// The holder SIGKILLed: its peers, whose long polls of its view fail, watch the servers
/// themselves at once; a peer's instance removed by hand right after is registered again within
/// seconds, before the peer has even left the shared session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_holder_its_peers_watch_the_servers_themselves() {
    a_peer_repairs_without_its_holder("KILL", 3 * SECOND).await;
}

/// The holder frozen (SIGSTOP: no answer, no reset): its peers' long polls of its view end within
/// one poll (5 s), and they watch the servers themselves; a peer's instance removed by hand is
/// registered again within 10 s, not when their watch's 1-minute wait runs out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_holder_costs_its_peers_one_poll_at_most() {
    a_peer_repairs_without_its_holder("STOP", 10 * SECOND).await;
}
