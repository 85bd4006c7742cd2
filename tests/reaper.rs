//! Catalog mode's reaper removes only what it can prove dead (issue 20, item 3), against a real
//! Consul `-dev` server: instances of another key prefix are never touched; a registration that
//! lands after its owner drained is gone within 2 × sessionTTL + 1 s; one that never had a key,
//! within a resyncInterval; a sidecar that lost an instance's key to another holder of the same ID
//! never removes the holder's instance or key; an empty virtual node is removed, and no live
//! session with it; an instance whose key came and went while the reaper could not read is reaped
//! once it can. And the reaping is done by one sidecar per key prefix and service (issue 20, item
//! 2): a key change wakes only that one, and when it is SIGKILLed another takes over and reaps its
//! instance within the bound; its periodic sweep reads the service once, not every virtual node,
//! and once a resyncInterval, not every sessionTTL.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::sidecar::Sidecar;
use support::{ConsulAgent, DemoApp, DemoAppOptions, Valve, wait_until};

const SECOND: Duration = Duration::from_secs(1);
/// The manifests' session TTL.
const SESSION_TTL: Duration = Duration::from_secs(10);
/// How long a ghost may stay: Consul invalidates a session within 2 × TTL, plus a second.
const BOUND: Duration = Duration::from_secs(21);
/// The manifests' resyncInterval, the pace of the elected reaper's periodic sweep (unless
/// [`resyncing_every`] says otherwise).
const RESYNC: Duration = Duration::from_secs(10);
const DEFAULT_PREFIX: &str = "consul-registrar/instances";
const OTHER_PREFIX: &str = "other-team/instances";

/// A one-instance catalog-mode manifest: service `hello`, instance `id`, liveness keys under
/// `prefix`, a resyncInterval of [`RESYNC`].
fn manifest(consul: &str, id: &str, port: u16, prefix: &str) -> String {
    format!(
        "consul:
  mode: catalog
  address: {consul}
  resyncInterval: 10s
  retry:
    initial: 50ms
    max: 500ms
  catalog:
    sessionTTL: 10s
    keyPrefix: {prefix}
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

/// `manifest` with a resyncInterval of `interval` (such as "60s", the default).
fn resyncing_every(manifest: String, interval: &str) -> String {
    manifest.replace(
        "resyncInterval: 10s",
        &format!("resyncInterval: {interval}"),
    )
}

/// The pod's Downward API: Kubernetes node `node`, pod `pod` (the container's HOSTNAME).
fn pod(node: &'static str, pod: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("NODE_NAME", node),
        ("HOST_IP", "127.0.0.1"),
        ("HOSTNAME", pod),
    ]
}

fn virtual_node(node: &str) -> String {
    format!("consul-registrar-{node}")
}

/// The liveness key of instance `id` of `hello` on Kubernetes node `node`.
fn key(prefix: &str, node: &str, id: &str) -> String {
    format!("{prefix}/hello/{}/{id}", virtual_node(node))
}

/// The catalog's entry of instance `id` of `hello`, if any.
async fn entry(consul: &ConsulAgent, id: &str) -> Option<Value> {
    consul
        .catalog_service("hello")
        .await
        .into_iter()
        .find(|e| e["ServiceID"] == id)
}

async fn passing(consul: &ConsulAgent, id: &str, sidecar: &Sidecar) {
    assert!(
        consul
            .wait_for_status("hello", id, "passing", 10 * SECOND)
            .await,
        "{id} never passed\n{}",
        sidecar.logs()
    );
}

async fn holder(consul: &ConsulAgent, key: &str) -> Option<String> {
    consul
        .kv_entry(key)
        .await
        .and_then(|e| e["Session"].as_str().map(String::from))
}

/// Starts `manifest`'s instance `id` on kube-a and waits until it passes, holds the reaper key,
/// and has made its first sweep (on taking the key).
async fn elected_reaper(consul: &ConsulAgent, manifest: &str, id: &'static str) -> Sidecar {
    let sidecar = Sidecar::start(manifest, &pod("kube-a", id));
    passing(consul, id, &sidecar).await;
    takes_the_reaper_key(consul, ("kube-a", id), &sidecar, 5 * SECOND).await;
    tokio::time::sleep(2 * SECOND).await;
    sidecar
}

/// The Consul requests of operation `op` in `metrics`.
fn requests(metrics: &support::Metrics, op: &str) -> f64 {
    metrics.sum(
        "consul_registrar_consul_requests_total",
        Some(("operation", op)),
    )
}

async fn gone_within(consul: &ConsulAgent, id: &str, within: Duration) -> bool {
    wait_until(within, || async { entry(consul, id).await.is_none() }).await
}

/// Waits until the session of `sidecar` (instance `id` on Kubernetes node `node`) holds the
/// default prefix's reaper key of `hello`.
async fn takes_the_reaper_key(
    consul: &ConsulAgent,
    (node, id): (&str, &str),
    sidecar: &Sidecar,
    within: Duration,
) {
    let reaper_key = format!("{DEFAULT_PREFIX}/.reaper/hello");
    let session = holder(consul, &key(DEFAULT_PREFIX, node, id)).await;
    assert!(
        wait_until(within, || async {
            holder(consul, &reaper_key).await == session
        })
        .await,
        "the sidecar of {id} did not take the reaper key\n{}",
        sidecar.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_with_different_key_prefixes_each_reap_only_their_own() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let addr = consul.http_addr();
    let d1 = Sidecar::start(
        &manifest(&addr, "d-1", app.port(), DEFAULT_PREFIX),
        &pod("kube-a", "d-1"),
    );
    let o1 = Sidecar::start(
        &manifest(&addr, "o-1", app.port(), OTHER_PREFIX),
        &pod("kube-a", "o-1"),
    );
    passing(&consul, "d-1", &d1).await;
    passing(&consul, "o-1", &o1).await;
    let before: Vec<Value> = vec![
        entry(&consul, "d-1").await.expect("d-1")["CreateIndex"].clone(),
        entry(&consul, "o-1").await.expect("o-1")["CreateIndex"].clone(),
    ];

    // A sidecar of each group starts on another node: each start-up sweep looks only at its own
    // prefix's instances.
    let d2 = Sidecar::start(
        &manifest(&addr, "d-2", app.port(), DEFAULT_PREFIX),
        &pod("kube-b", "d-2"),
    );
    let o2 = Sidecar::start(
        &manifest(&addr, "o-2", app.port(), OTHER_PREFIX),
        &pod("kube-b", "o-2"),
    );
    passing(&consul, "d-2", &d2).await;
    passing(&consul, "o-2", &o2).await;
    // Past a periodic sweep too.
    tokio::time::sleep(RESYNC + 2 * SECOND).await;
    for (sidecar, name) in [(&d2, "d-2"), (&o2, "o-2")] {
        assert_eq!(
            sidecar
                .metrics()
                .await
                .sum("consul_registrar_reaped_total", None),
            0.0,
            "{name}'s reaper removed a live instance\n{}",
            sidecar.logs()
        );
    }
    let after: Vec<Value> = vec![
        entry(&consul, "d-1").await.expect("d-1")["CreateIndex"].clone(),
        entry(&consul, "o-1").await.expect("o-1")["CreateIndex"].clone(),
    ];
    assert_eq!(
        before, after,
        "a live instance was removed and registered again (a flap)"
    );

    // Each group's first sidecar is SIGKILLed: each group's survivor reaps its own, only.
    d1.signal("KILL");
    o1.signal("KILL");
    let killed = Instant::now();
    drop((d1, o1));
    assert!(
        gone_within(&consul, "d-1", BOUND + 5 * SECOND).await,
        "{}",
        d2.logs()
    );
    assert!(
        gone_within(&consul, "o-1", BOUND + 5 * SECOND).await,
        "{}",
        o2.logs()
    );
    assert!(
        killed.elapsed() <= BOUND,
        "reaped after {:?}",
        killed.elapsed()
    );
    tokio::time::sleep(SECOND).await;
    for (sidecar, name) in [(&d2, "d-2"), (&o2, "o-2")] {
        assert_eq!(
            sidecar
                .metrics()
                .await
                .sum("consul_registrar_reaped_total", None),
            1.0,
            "{name} should have reaped its own group's instance, and only it\n{}",
            sidecar.logs()
        );
        assert_eq!(
            consul.check_status("hello", name).await.as_deref(),
            Some("passing")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_the_servers_apply_after_its_owner_drained_is_gone_within_two_session_ttls()
{
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let survivor = Sidecar::start(
        &manifest(&consul.http_addr(), "s-1", app.port(), DEFAULT_PREFIX),
        &pod("kube-a", "s-1"),
    );
    passing(&consul, "s-1", &survivor).await;

    // The owner's registration reaches the servers only 6 s after it was sent (a leader election
    // holds writes up to rpc_hold_timeout): by then its sidecar has drained and exited.
    let valve = Valve::start(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        consul.http_port(),
    )))
    .await;
    valve.hold_back("\"Tags\":[\"grpc\"]", 6 * SECOND);
    let mut owner = Sidecar::start(
        &manifest(&valve.http_addr(), "w-1", app.port(), DEFAULT_PREFIX),
        &pod("kube-b", "w-1"),
    );
    assert!(
        wait_until(10 * SECOND, || async { valve.held_back() >= 1 }).await,
        "the registration never went out\n{}",
        owner.logs()
    );
    let sent = Instant::now();
    let status = owner.terminate(10 * SECOND).await.expect("drains");
    assert_eq!(status.code(), Some(0), "{}", owner.logs());
    assert!(
        consul
            .kv_entry(&key(DEFAULT_PREFIX, "kube-b", "w-1"))
            .await
            .is_none(),
        "the drain left the key"
    );
    // The held write reaches Consul at 6 s; whatever it did, nothing of it stays past the bound.
    let landed = sent + 6 * SECOND;
    tokio::time::sleep_until((landed + BOUND).into()).await;
    assert!(
        entry(&consul, "w-1").await.is_none(),
        "a registration applied after its owner drained is still in the catalog {:?} later\n{}",
        BOUND,
        survivor.logs()
    );
    assert_eq!(
        consul.check_status("hello", "s-1").await.as_deref(),
        Some("passing")
    );
}

/// What a late write of a sidecar of an earlier version (whose registrations were not guarded by
/// their key) leaves on the node of a pod that drained: a managed, passing instance whose key
/// went just before it landed. The key's going marks its virtual node for a second look a TTL
/// later, so it goes within the crash bound even though the periodic sweep (a resyncInterval, 60 s
/// here) is far off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_registration_landing_after_its_owner_drained_is_gone_within_two_session_ttls() {
    a_late_keyless_registration_is_gone_within_the_bound(&["w-1"], Duration::ZERO).await;
}

/// The same when another pod of the node drained 5 s before: each key gone has its own second
/// look, so the late write (11 s after the first key went, past that key's look) is still found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_registration_is_gone_in_time_though_a_pod_of_its_node_drained_just_before() {
    a_late_keyless_registration_is_gone_within_the_bound(&["w-1", "w-2"], 5 * SECOND).await;
}

/// A reaper on kube-a; `owners` on kube-b, drained `gap` apart; 6 s after the last drain (a
/// write the servers held through a leader election) a keyless registration of the last one
/// lands. It must be gone within [`BOUND`] of landing, the periodic sweep being 60 s away.
async fn a_late_keyless_registration_is_gone_within_the_bound(
    owners: &[&'static str],
    gap: Duration,
) {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let addr = consul.http_addr();
    let survivor = elected_reaper(
        &consul,
        &resyncing_every(manifest(&addr, "s-1", app.port(), DEFAULT_PREFIX), "60s"),
        "s-1",
    )
    .await;
    let mut sidecars = Vec::new();
    for &id in owners {
        let owner = Sidecar::start(
            &resyncing_every(manifest(&addr, id, app.port(), DEFAULT_PREFIX), "60s"),
            &pod("kube-b", id),
        );
        passing(&consul, id, &owner).await;
        sidecars.push(owner);
    }
    for (n, owner) in sidecars.iter_mut().enumerate() {
        if n > 0 {
            tokio::time::sleep(gap).await;
        }
        let status = owner.terminate(10 * SECOND).await.expect("drains");
        assert_eq!(status.code(), Some(0), "{}", owner.logs());
    }
    let late = owners.last().expect("an owner");
    tokio::time::sleep(6 * SECOND).await;
    a_keyless_instance_is_gone_within(&consul, &survivor, ("kube-b", late, app.port()), BOUND)
        .await;
}

/// Writes a managed, passing instance `id` of `hello` without a key on Kubernetes node `node`
/// (its port `port`), and asserts it is gone within `within` of the write, the `survivor`'s
/// instance s-1 still passing.
async fn a_keyless_instance_is_gone_within(
    consul: &ConsulAgent,
    survivor: &Sidecar,
    (node, id, port): (&str, &str, u16),
    within: Duration,
) {
    consul
        .catalog_register(&json!({
            "Node": virtual_node(node),
            "Address": "127.0.0.1",
            "NodeMeta": { "managed-by": "consul-registrar" },
            "Service": {
                "ID": id, "Service": "hello", "Port": port, "Tags": ["grpc"],
                "Meta": { "managed-by": "consul-registrar" },
            },
            "Check": {
                "CheckID": format!("consul-registrar:{id}"), "Name": "keyless", "ServiceID": id,
                "Status": "passing",
            },
        }))
        .await;
    let written = Instant::now();
    assert!(
        gone_within(consul, id, within + 10 * SECOND).await,
        "the keyless instance {id} is still there {:?} after it was written\n{}",
        written.elapsed(),
        survivor.logs()
    );
    println!("FIGURE keyless {id} gone after {:?}", written.elapsed());
    assert!(
        written.elapsed() <= within,
        "{id} gone after {:?}",
        written.elapsed()
    );
    assert_eq!(
        consul.check_status("hello", "s-1").await.as_deref(),
        Some("passing")
    );
}

/// An instance that never had a key (written by hand with our meta, or by a sidecar of an earlier
/// version with no key disappearing near it) is found by the elected reaper's periodic sweep,
/// within a resyncInterval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ghost_written_without_a_key_is_swept_within_a_resync_interval() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let survivor = elected_reaper(
        &consul,
        &manifest(&consul.http_addr(), "s-1", app.port(), DEFAULT_PREFIX),
        "s-1",
    )
    .await;
    a_keyless_instance_is_gone_within(
        &consul,
        &survivor,
        ("kube-b", "ghost-1", app.port()),
        RESYNC + 2 * SECOND,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_key_came_and_went_while_the_reaper_could_not_read_is_reaped_once_it_can()
{
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    // The elected reaper reaches Consul through a valve. A long session TTL puts its periodic
    // sweep 48–60 s after its election, so a removal within seconds is the watch's doing.
    let valve = Valve::start(std::net::SocketAddr::from((
        [127, 0, 0, 1],
        consul.http_port(),
    )))
    .await;
    let start = |consul: String, id: &str, node: &'static str, pod_name: &'static str| {
        Sidecar::start(
            &manifest(&consul, id, app.port(), DEFAULT_PREFIX).replacen(
                "sessionTTL: 10s",
                "sessionTTL: 60s",
                1,
            ),
            &pod(node, pod_name),
        )
    };
    let reaper = start(valve.http_addr(), "r-1", "kube-a", "r-1");
    passing(&consul, "r-1", &reaper).await;
    takes_the_reaper_key(&consul, ("kube-a", "r-1"), &reaper, 10 * SECOND).await;
    // Its watch has swept and blocks on the keys.
    tokio::time::sleep(SECOND).await;
    valve.shut();
    // Meanwhile a sidecar starts, registers and dies, and its session goes (destroyed here rather
    // than waited for): its key came and went while the reaper could not read.
    let victim = start(consul.http_addr(), "v-1", "kube-b", "v-1");
    passing(&consul, "v-1", &victim).await;
    let victim_key = key(DEFAULT_PREFIX, "kube-b", "v-1");
    let victim_session = holder(&consul, &victim_key)
        .await
        .expect("the victim holds its key");
    victim.signal("KILL");
    drop(victim);
    let destroyed = consul
        .put(
            &format!("/v1/session/destroy/{victim_session}"),
            &json!(null),
        )
        .await
        .expect("destroys the victim's session");
    assert_eq!(destroyed, 200);
    assert!(
        consul.kv_entry(&victim_key).await.is_none(),
        "the key stayed"
    );
    assert_eq!(
        consul.check_status("hello", "v-1").await.as_deref(),
        Some("passing"),
        "the victim's instance should still be there, passing"
    );
    valve.open();
    let opened = Instant::now();
    assert!(
        gone_within(&consul, "v-1", 10 * SECOND).await,
        "the instance whose key went while the reaper could not read is still there {:?} after \
         the reaper could read again\n{}",
        opened.elapsed(),
        reaper.logs()
    );
    assert_eq!(
        consul.check_status("hello", "r-1").await.as_deref(),
        Some("passing")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_periodic_sweeper_drains_another_sidecar_takes_over_at_once() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let addr = consul.http_addr();
    let mut first = Sidecar::start(
        &manifest(&addr, "a-1", app.port(), DEFAULT_PREFIX),
        &pod("kube-a", "a-1"),
    );
    passing(&consul, "a-1", &first).await;
    let reaper_key = format!("{DEFAULT_PREFIX}/.reaper/hello");
    assert!(
        wait_until(SESSION_TTL + 2 * SECOND, || async {
            holder(&consul, &reaper_key).await.is_some()
        })
        .await,
        "nobody took the reaper key\n{}",
        first.logs()
    );
    let second = Sidecar::start(
        &manifest(&addr, "b-1", app.port(), DEFAULT_PREFIX),
        &pod("kube-b", "b-1"),
    );
    passing(&consul, "b-1", &second).await;
    let leader = holder(&consul, &reaper_key).await;
    assert_eq!(
        leader,
        holder(&consul, &key(DEFAULT_PREFIX, "kube-a", "a-1")).await,
        "the first sidecar should hold the reaper key"
    );
    // The sweeper drains: its session goes, and with it the reaper key; the other sidecar, blocked
    // on the key, takes it at once.
    let status = first.terminate(10 * SECOND).await.expect("drains");
    assert_eq!(status.code(), Some(0), "{}", first.logs());
    let second_session = holder(&consul, &key(DEFAULT_PREFIX, "kube-b", "b-1")).await;
    assert!(
        wait_until(3 * SECOND, || async {
            holder(&consul, &reaper_key).await == second_session
        })
        .await,
        "the reaper key was not taken over at once\n{}",
        second.logs()
    );
    // A keyless ghost written now is swept by the new holder.
    consul
        .catalog_register(&json!({
            "Node": virtual_node("kube-c"),
            "Address": "127.0.0.1",
            "NodeMeta": { "managed-by": "consul-registrar" },
            "Service": {
                "ID": "ghost-2", "Service": "hello", "Port": app.port(),
                "Meta": { "managed-by": "consul-registrar" },
            },
        }))
        .await;
    let written = Instant::now();
    assert!(
        gone_within(&consul, "ghost-2", BOUND).await,
        "the ghost is still there {:?} after it was written\n{}",
        written.elapsed(),
        second.logs()
    );
    assert!(
        wait_until(5 * SECOND, || async {
            consul.catalog_node(&virtual_node("kube-c")).await.is_none()
        })
        .await,
        "the ghost's empty virtual node stayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_that_lost_the_key_to_another_holder_of_the_id_never_removes_its_instance_or_key()
{
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    // Two pods on one node with the same fixed instance ID: the first holds the key.
    let text = manifest(&consul.http_addr(), "fixed-1", app.port(), DEFAULT_PREFIX);
    let winner = Sidecar::start(&text, &pod("kube-a", "web-a"));
    passing(&consul, "fixed-1", &winner).await;
    let key = key(DEFAULT_PREFIX, "kube-a", "fixed-1");
    let session = holder(&consul, &key)
        .await
        .expect("the winner holds the key");
    let created = entry(&consul, "fixed-1").await.expect("registered")["CreateIndex"].clone();

    let mut loser = Sidecar::start(&text, &pod("kube-a", "web-b"));
    tokio::time::sleep(3 * SECOND).await;
    let status = loser.terminate(10 * SECOND).await.expect("drains");
    assert_eq!(status.code(), Some(0), "{}", loser.logs());
    tokio::time::sleep(SECOND).await;

    assert_eq!(
        holder(&consul, &key).await,
        Some(session.clone()),
        "the winner's key was removed or changed hands\nloser:\n{}",
        loser.logs()
    );
    assert!(
        consul.session(&session).await.is_some(),
        "the winner's session is gone"
    );
    let now = entry(&consul, "fixed-1").await.unwrap_or_else(|| {
        panic!(
            "the winner's instance was removed\nloser:\n{}",
            loser.logs()
        )
    });
    assert_eq!(
        now["CreateIndex"], created,
        "the winner's instance was removed and registered again"
    );
    assert_eq!(
        consul.check_status("hello", "fixed-1").await.as_deref(),
        Some("passing")
    );
    assert_eq!(
        winner.metrics().await.sum(
            "consul_registrar_session_renewals_total",
            Some(("outcome", "lost"))
        ),
        0.0,
        "{}",
        winner.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_virtual_node_is_removed_without_invalidating_a_live_session() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let addr = consul.http_addr();
    // A live sidecar, and a session of an earlier version's sidecar on an empty virtual node.
    let live = Sidecar::start(
        &manifest(&addr, "live-1", app.port(), DEFAULT_PREFIX),
        &pod("kube-a", "live-1"),
    );
    passing(&consul, "live-1", &live).await;
    let live_session = holder(&consul, &key(DEFAULT_PREFIX, "kube-a", "live-1"))
        .await
        .expect("live key");
    consul
        .catalog_register(&json!({
            "Node": virtual_node("kube-old"), "Address": "127.0.0.1",
            "NodeMeta": { "managed-by": "consul-registrar" },
        }))
        .await;
    let (status, old) = consul
        .client()
        .put(format!("{addr}/v1/session/create"))
        .json(&json!({ "Node": virtual_node("kube-old"), "NodeChecks": [], "TTL": "600s" }))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .expect("session create");
    assert_eq!(status, 200);
    let old_session = old.json::<Value>().await.expect("json")["ID"]
        .as_str()
        .expect("id")
        .to_string();

    // A pod on another node comes and drains: its virtual node goes with its last instance.
    let mut drained = Sidecar::start(
        &manifest(&addr, "z-1", app.port(), DEFAULT_PREFIX),
        &pod("kube-z", "z-1"),
    );
    passing(&consul, "z-1", &drained).await;
    let status = drained.terminate(10 * SECOND).await.expect("drains");
    assert_eq!(status.code(), Some(0), "{}", drained.logs());
    assert!(
        wait_until(5 * SECOND, || async {
            consul.catalog_node(&virtual_node("kube-z")).await.is_none()
        })
        .await,
        "the drained sidecar's empty virtual node stayed\n{}",
        drained.logs()
    );

    // A new sidecar's start-up sweep, and the periodic one, pass over every managed node.
    let fresh = Sidecar::start(
        &manifest(&addr, "b-1", app.port(), DEFAULT_PREFIX),
        &pod("kube-b", "b-1"),
    );
    passing(&consul, "b-1", &fresh).await;
    tokio::time::sleep(SESSION_TTL + 2 * SECOND).await;
    assert!(
        consul
            .catalog_node(&virtual_node("kube-old"))
            .await
            .is_some(),
        "a node with a live session on it was removed"
    );
    assert!(
        consul.session(&old_session).await.is_some(),
        "the old session was invalidated"
    );
    assert!(consul.catalog_node(&virtual_node("kube-a")).await.is_some());
    assert_eq!(
        holder(&consul, &key(DEFAULT_PREFIX, "kube-a", "live-1")).await,
        Some(live_session.clone())
    );
    assert!(consul.session(&live_session).await.is_some());
    assert_eq!(
        live.metrics().await.sum(
            "consul_registrar_session_renewals_total",
            Some(("outcome", "lost"))
        ),
        0.0,
        "{}",
        live.logs()
    );
    for id in ["live-1", "b-1"] {
        assert_eq!(
            consul.check_status("hello", id).await.as_deref(),
            Some("passing")
        );
    }
}

/// The reaper's periodic sweep (every 0.8–1 × resyncInterval, 10 s here) reads its service's
/// instances once, whatever the number of virtual nodes: with one elected reaper per service, a
/// sweep that read every virtual node cost the servers services × nodes reads a sweep (a cluster
/// of 100 nodes and 200 services: 2,000 reads a second at a sweep every 10 s, at rest). Only the
/// holder's first sweep passes over every node, for the empty ones. At rest its key watch answers
/// once a sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_periodic_sweep_reads_the_service_once_not_every_virtual_node() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    // 30 other Kubernetes nodes, each with an instance of another team's service.
    for i in 0..30 {
        consul
            .catalog_register(&json!({
                "Node": virtual_node(&format!("kube-n{i}")), "Address": "127.0.0.1",
                "NodeMeta": { "managed-by": "consul-registrar" },
                "Service": { "ID": format!("other-{i}"), "Service": "other", "Port": 9,
                             "Meta": { "managed-by": "consul-registrar" } },
            }))
            .await;
    }
    let sidecar = elected_reaper(
        &consul,
        &manifest(&consul.http_addr(), "a-1", app.port(), DEFAULT_PREFIX),
        "a-1",
    )
    .await;
    let before = sidecar.metrics().await;
    // At least two periodic sweeps.
    tokio::time::sleep(2 * RESYNC + 2 * SECOND).await;
    let after = sidecar.metrics().await;
    let node_reads = requests(&after, "node_services") - requests(&before, "node_services");
    let sweeps = requests(&after, "service_instances") - requests(&before, "service_instances");
    assert!(
        node_reads == 0.0,
        "the periodic sweeps read {node_reads} virtual nodes (31 managed): a sweep must not walk every node\n{}",
        sidecar.logs()
    );
    assert!(
        sweeps >= 2.0,
        "expected at least two periodic sweeps in {:?}, saw {sweeps}\n{}",
        2 * RESYNC + 2 * SECOND,
        sidecar.logs()
    );
    // Its key watch ends when a sweep is due, once: not again and again as the sweep nears.
    let answers = requests(&after, "watch_keys") - requests(&before, "watch_keys");
    assert!(
        answers <= sweeps + 1.0,
        "the key watch answered {answers} times for {sweeps} sweeps at rest\n{}",
        sidecar.logs()
    );
    assert_eq!(
        consul.catalog_service("other").await.len(),
        30,
        "another service's instances were touched"
    );
}

/// At rest the elected reaper's work is paced by resyncInterval, not by the session TTL: one
/// read of its service's N instances every 0.8–1 × sessionTTL made the servers' load at rest
/// grow with the service's size (issue 20). Over 2.5 TTLs, with the default resyncInterval
/// (60 s), it reads neither the service nor, without blocking, its own reaper key; its key watch
/// and its reaper key's blocking query at most re-arm.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_rest_the_elected_reaper_sweeps_once_a_resync_interval_not_every_session_ttl() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let sidecar = elected_reaper(
        &consul,
        &resyncing_every(
            manifest(&consul.http_addr(), "a-1", app.port(), DEFAULT_PREFIX),
            "60s",
        ),
        "a-1",
    )
    .await;
    let before = sidecar.metrics().await;
    let window = SESSION_TTL * 5 / 2;
    tokio::time::sleep(window).await;
    let after = sidecar.metrics().await;
    let made = |op: &str| requests(&after, op) - requests(&before, op);
    assert_eq!(
        (made("service_instances"), made("reaper_key")),
        (0.0, 0.0),
        "the holder read its service's instances and its reaper key (service_instances, reaper_key) that often in {window:?} at rest\n{}",
        sidecar.logs()
    );
    assert!(
        made("watch_keys") <= 1.0 && made("watch_reaper_key") <= 1.0,
        "the holder's key watch answered {} times and its reaper key's {} in {window:?} at rest\n{}",
        made("watch_keys"),
        made("watch_reaper_key"),
        sidecar.logs()
    );
}

/// The keys are laid out by service (`<prefix>/<service>/<node>/<id>`) and a reaper watches its
/// own service's: another service's pods starting and stopping wake it not once (with one reaper
/// per service watching the whole prefix, every pod event woke every service's reaper, each
/// answered with every key of the cluster), its own service's do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_services_key_changes_never_wake_a_reaper() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let addr = consul.http_addr();
    let sidecar = Sidecar::start(
        &manifest(&addr, "a-1", app.port(), DEFAULT_PREFIX),
        &pod("kube-a", "a-1"),
    );
    passing(&consul, "a-1", &sidecar).await;
    takes_the_reaper_key(&consul, ("kube-a", "a-1"), &sidecar, 5 * SECOND).await;
    tokio::time::sleep(SECOND).await;
    let client = consul.client();
    let churn = |service: &'static str| {
        let client = client.clone();
        let addr = addr.clone();
        async move {
            for i in 0..5 {
                let path = format!(
                    "{addr}/v1/kv/{DEFAULT_PREFIX}/{service}/{}/z-{i}",
                    virtual_node("kube-z")
                );
                client.put(&path).body("x").send().await.expect("put");
                tokio::time::sleep(Duration::from_millis(300)).await;
                client.delete(&path).send().await.expect("delete");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    let before = answers(&[&sidecar], "watch_keys").await[0];
    churn("other").await;
    let others = answers(&[&sidecar], "watch_keys").await[0] - before;
    assert_eq!(
        others,
        0.0,
        "10 key changes of another service woke the reaper of hello {others} times\n{}",
        sidecar.logs()
    );
    churn("hello").await;
    let own = answers(&[&sidecar], "watch_keys").await[0] - before;
    assert!(own >= 1.0, "its own service's key changes never woke it");
}

/// How many answers of `operation` each sidecar has had.
async fn answers(sidecars: &[&Sidecar], operation: &str) -> Vec<f64> {
    let mut counts = Vec::new();
    for sidecar in sidecars {
        counts.push(requests(&sidecar.metrics().await, operation));
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_change_wakes_only_the_elected_reaper_not_every_sidecar() {
    // Issue 20 item 2: every sidecar watching the whole key prefix meant O(N) answers of O(N)
    // keys per pod event. Only the holder of the reaper key watches it now.
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let addr = consul.http_addr();
    let sidecars = [
        Sidecar::start(
            &manifest(&addr, "a-1", app.port(), DEFAULT_PREFIX),
            &pod("kube-a", "a-1"),
        ),
        Sidecar::start(
            &manifest(&addr, "b-1", app.port(), DEFAULT_PREFIX),
            &pod("kube-b", "b-1"),
        ),
        Sidecar::start(
            &manifest(&addr, "c-1", app.port(), DEFAULT_PREFIX),
            &pod("kube-c", "c-1"),
        ),
    ];
    for (id, sidecar) in ["a-1", "b-1", "c-1"].into_iter().zip(&sidecars) {
        passing(&consul, id, sidecar).await;
    }
    tokio::time::sleep(2 * SECOND).await;
    let all: Vec<&Sidecar> = sidecars.iter().collect();
    let before = answers(&all, "watch_keys").await;
    // Reads of the reaper key: the others' blocking reads and the holder's checks.
    let reaper_reads = || async {
        let watches: f64 = answers(&all, "watch_reaper_key").await.iter().sum();
        let checks: f64 = answers(&all, "reaper_key").await.iter().sum();
        watches + checks
    };
    let reaper_before = reaper_reads().await;
    // Ten keys of the prefix come and go elsewhere (pods starting and stopping on another node).
    let client = consul.client();
    for i in 0..10 {
        let path = format!(
            "{addr}/v1/kv/{}",
            key(DEFAULT_PREFIX, "kube-z", &format!("z-{i}"))
        );
        client.put(&path).body("x").send().await.expect("put");
        tokio::time::sleep(Duration::from_millis(150)).await;
        client.delete(&path).send().await.expect("delete");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    tokio::time::sleep(SECOND).await;
    let after = answers(&all, "watch_keys").await;
    let reaper_woken = reaper_reads().await - reaper_before;
    let woken: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(
        woken.iter().filter(|w| **w > 0.0).count(),
        1,
        "20 key changes elsewhere woke these sidecars' key watches {woken:?} times: exactly one \
         sidecar (the elected reaper) should watch the keys"
    );
    // The others block on the reaper key alone, which those changes do not touch (at most the
    // holder's own check of it, every TTL or so, falls in the window).
    assert!(
        reaper_woken <= 3.0,
        "20 key changes elsewhere answered {reaper_woken} reads of the reaper key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_elected_reaper_is_killed_another_takes_over_and_reaps_its_instance_within_the_bound()
 {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let addr = consul.http_addr();
    let first = Sidecar::start(
        &manifest(&addr, "a-1", app.port(), DEFAULT_PREFIX),
        &pod("kube-a", "a-1"),
    );
    passing(&consul, "a-1", &first).await;
    let reaper_key = format!("{DEFAULT_PREFIX}/.reaper/hello");
    takes_the_reaper_key(&consul, ("kube-a", "a-1"), &first, 5 * SECOND).await;
    let others = [
        Sidecar::start(
            &manifest(&addr, "b-1", app.port(), DEFAULT_PREFIX),
            &pod("kube-b", "b-1"),
        ),
        Sidecar::start(
            &manifest(&addr, "c-1", app.port(), DEFAULT_PREFIX),
            &pod("kube-c", "c-1"),
        ),
    ];
    for (id, sidecar) in ["b-1", "c-1"].into_iter().zip(&others) {
        passing(&consul, id, sidecar).await;
    }
    // The elected reaper dies without a word: its session, its instance's key and the reaper key
    // go together when Consul invalidates the session; a follower blocked on the reaper key takes
    // it and sweeps.
    first.signal("KILL");
    let killed = Instant::now();
    drop(first);
    assert!(
        gone_within(&consul, "a-1", BOUND + 5 * SECOND).await,
        "the killed reaper's instance stayed\n{}\n{}",
        others[0].logs(),
        others[1].logs()
    );
    let reaped_after = killed.elapsed();
    assert!(
        reaped_after <= BOUND,
        "reaped {reaped_after:?} after the kill; the bound is 2 × session TTL + 1 s = {BOUND:?}"
    );
    let new_holder = holder(&consul, &reaper_key).await;
    assert!(new_holder.is_some(), "nobody took the reaper key over");
    let mut holders = Vec::new();
    for (node, id) in [("kube-b", "b-1"), ("kube-c", "c-1")] {
        holders.push(holder(&consul, &key(DEFAULT_PREFIX, node, id)).await);
    }
    assert!(
        holders.contains(&new_holder),
        "the reaper key is held by {new_holder:?}, not by a survivor {holders:?}"
    );
    let mut reaped = 0.0;
    for sidecar in &others {
        reaped += sidecar
            .metrics()
            .await
            .sum("consul_registrar_reaped_total", None);
    }
    assert_eq!(reaped, 1.0, "the killed instance is reaped once");
    for id in ["b-1", "c-1"] {
        assert_eq!(
            consul.check_status("hello", id).await.as_deref(),
            Some("passing")
        );
    }
    assert!(
        wait_until(5 * SECOND, || async {
            consul.catalog_node(&virtual_node("kube-a")).await.is_none()
        })
        .await,
        "the killed reaper's empty virtual node stayed"
    );
}
