//! Drains that go wrong and heals that must not happen (issue 19 items 2–6), against real Consul
//! agents (a `-dev` server, or three servers with a client agent), the real demo app and the real
//! sidecar binary:
//!
//! - a drain that began while the app was still starting does not heal when the app starts
//!   serving during the drain delay; a restart after the drain began does heal it;
//! - a heal brings each instance back with its own verdict, over one connection per health target:
//!   one NOT_SERVING service, or a target in another container that never restarts, keeps nobody
//!   out;
//! - a drain that could not reach Consul is tried again by the SIGTERM that follows (exit 0 when
//!   that works), and in catalog mode does not leave the instance passing;
//! - `/drain?wait=true` answers only once the servers no longer hold the instance (agent mode: the
//!   client agent's sync to the servers can fail when the leader dies);
//! - a sidecar restarted in the middle of a drain stays drained, but a new pod of the same name
//!   (the old one's drain cut off) registers and gets Ready; an app that dies is critical at
//!   once; no session is made after a drain ended; the exit waits at most the one-second grace.

mod support;

use std::time::{Duration, Instant};

use support::sidecar::Sidecar;
use support::{
    ConsulAgent, ConsulCluster, ConsulOptions, DemoApp, DemoAppOptions, Valve, wait_until,
};

const SECOND: Duration = Duration::from_secs(1);

/// One instance `hello-1` (service `hello`) of the app on `app_port`, probed every 200 ms.
fn manifest(consul: &str, app_port: u16, delay: &str, deregister_timeout: &str) -> String {
    format!(
        "consul:
  address: {consul}
  retry: {{initial: 50ms, max: 500ms}}
drain:
  delay: {delay}
  deregisterTimeout: {deregister_timeout}
services:
  - name: hello
    id: hello-1
    address: 127.0.0.1
    port: {app_port}
    health:
      interval: 200ms
      timeout: 200ms
"
    )
}

/// The same in catalog mode (no check TTL there), on the virtual node `consul-registrar-<node>`.
fn catalog_manifest(consul: &str, app_port: u16, delay: &str, deregister_timeout: &str) -> String {
    manifest(consul, app_port, delay, deregister_timeout).replacen(
        "consul:\n",
        "consul:\n  mode: catalog\n  catalog: {sessionTTL: 10s}\n",
        1,
    )
}

/// The environment of a catalog-mode sidecar on Kubernetes node `node`.
fn on_node(node: &'static str) -> [(&'static str, &'static str); 2] {
    [("NODE_NAME", node), ("HOST_IP", "127.0.0.1")]
}

fn address(port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], port))
}

async fn status_becomes(
    consul: &ConsulAgent,
    id: &str,
    want: Option<&str>,
    timeout: Duration,
) -> bool {
    consul.wait_for_status("hello", id, want, timeout).await
}

/// Fails if instance `id` of `hello` shows `status` in Consul at any time during `period`.
async fn never(consul: &ConsulAgent, id: &str, status: &str, period: Duration, why: &str) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        let seen = consul.check_status("hello", id).await;
        assert_ne!(seen.as_deref(), Some(status), "{why}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn healed(sidecar: &Sidecar) -> f64 {
    sidecar
        .metric("consul_registrar_drains_healed_total")
        .await
        .unwrap_or(-1.0)
}

// ---- item 2: no false heal ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_begun_while_the_app_was_starting_does_not_heal_when_it_starts_serving() {
    let consul = ConsulAgent::start_dev().await;
    // The app loads for 3 s with its port closed, as a slow app does after its container starts.
    let app_started = Instant::now();
    let mut app = DemoApp::start(DemoAppOptions {
        start_delay: Some(3 * SECOND),
        ..Default::default()
    })
    .await;
    let sidecar = Sidecar::start(
        &manifest(&consul.http_addr(), app.port(), "2500ms", "3s"),
        &[],
    );
    assert!(
        status_becomes(&consul, "hello-1", Some("critical"), 10 * SECOND).await,
        "not registered"
    );

    // The pod is deleted while its app is still starting: the preStop drains, and the app opens
    // its port during the drain delay (it is stopped only once the preStop has answered).
    tokio::time::sleep((app_started + SECOND).saturating_duration_since(Instant::now())).await;
    assert!(
        app_started.elapsed() < 2500 * Duration::from_millis(1),
        "the machine is too slow for this test: the drain must start before the app listens"
    );
    let (code, body) = sidecar.get("/drain?wait=true").await;
    assert_eq!(code, 200, "{body}");
    app.wait_listening(5 * SECOND).await;
    assert!(
        consul.catalog_service("hello").await.is_empty(),
        "registered again right after the drain: it healed because the app started serving\n{}",
        sidecar.logs()
    );
    // The kubelet now stops the app. Until it does, nothing may put the instance back: a heal
    // needs a restart after the drain began, and an app that was still starting is no restart.
    never(
        &consul,
        "hello-1",
        "passing",
        3 * SECOND,
        "a drain from the preStop healed because the app started serving during the drain delay",
    )
    .await;
    assert!(
        consul.catalog_service("hello").await.is_empty(),
        "registered again after the drain"
    );
    assert_eq!(healed(&sidecar).await, 0.0);

    // A restart after the drain began (seen up, gone, back: a liveness restart) does heal it.
    app.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.options_mut().start_delay = None;
    app.restart().await;
    assert!(
        status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await,
        "a restart after the drain did not heal it\n{}",
        sidecar.logs()
    );
    assert_eq!(healed(&sidecar).await, 1.0);
}

// ---- item 3: heal per instance ------------------------------------------------------------------

/// `n` instances `svc-<i>` of the app, probed through `health_port` (a counting proxy).
fn services_manifest(consul: &str, app_port: u16, health_port: u16, n: usize) -> String {
    let mut m = format!(
        "consul:
  address: {consul}
  retry: {{initial: 50ms, max: 500ms}}
drain:
  delay: 0s
services:
"
    );
    for i in 0..n {
        m.push_str(&format!(
            "  - name: svc-{i}
    id: svc-{i}-1
    address: 127.0.0.1
    port: {app_port}
    health:
      port: {health_port}
      service: svc-{i}
      interval: 200ms
      timeout: 200ms
"
        ));
    }
    m
}

async fn svc_status(consul: &ConsulAgent, i: usize) -> Option<String> {
    consul
        .check_status(&format!("svc-{i}"), &format!("svc-{i}-1"))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heal_brings_each_instance_back_with_its_own_verdict_over_one_connection() {
    const N: usize = 6;
    let consul = ConsulAgent::start_dev().await;
    let mut app = DemoApp::start(DemoAppOptions {
        generate_services: N,
        ..Default::default()
    })
    .await;
    let proxy = Valve::start(address(app.port())).await;
    let sidecar = Sidecar::start(
        &services_manifest(&consul.http_addr(), app.port(), proxy.port(), N),
        &[],
    );
    assert!(
        wait_until(10 * SECOND, || async {
            for i in 0..N {
                if svc_status(&consul, i).await.as_deref() != Some("passing") {
                    return false;
                }
            }
            true
        })
        .await,
        "not all passing"
    );
    assert_eq!(sidecar.get("/drain?wait=true").await.0, 200);

    // Waiting for a restart costs no connection per poll: the one held to the app tells.
    let before = proxy.connections();
    tokio::time::sleep(2 * SECOND).await;
    let waiting = proxy.connections() - before;
    assert!(
        waiting <= 1,
        "{waiting} connections to the app in 2 s while the drain waited for a restart"
    );

    // A liveness restart; the app comes back with one service (svc-5) not serving.
    app.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    app.options_mut().start_serving = false;
    app.restart().await;
    let before = proxy.connections();
    for i in 0..N - 1 {
        app.set_service_serving(&format!("svc-{i}"), true).await;
    }
    assert!(
        wait_until(10 * SECOND, || async {
            for i in 0..N - 1 {
                if svc_status(&consul, i).await.as_deref() != Some("passing") {
                    return false;
                }
            }
            svc_status(&consul, N - 1).await.as_deref() == Some("critical")
        })
        .await,
        "one NOT_SERVING service kept the others out after the restart\n{}",
        sidecar.logs()
    );
    let healing = proxy.connections() - before;
    assert!(
        healing < N,
        "{healing} connections to the app to heal {N} instances of one target"
    );
    assert_eq!(healed(&sidecar).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_target_that_never_restarts_does_not_keep_the_others_out() {
    // Two containers in the pod: the app (restarted by its liveness probe, whose preStop drained)
    // and another one that keeps running.
    let consul = ConsulAgent::start_dev().await;
    let mut restarted = DemoApp::start(DemoAppOptions::default()).await;
    let steady = DemoApp::start(DemoAppOptions::default()).await;
    let m = format!(
        "consul:
  address: {}
drain:
  delay: 0s
services:
  - name: hello
    id: hello-1
    address: 127.0.0.1
    port: {}
    health: {{interval: 200ms, timeout: 200ms}}
  - name: hello
    id: hello-2
    address: 127.0.0.1
    port: {}
    health: {{interval: 200ms, timeout: 200ms}}
",
        consul.http_addr(),
        restarted.port(),
        steady.port()
    );
    let sidecar = Sidecar::start(&m, &[]);
    for id in ["hello-1", "hello-2"] {
        assert!(status_becomes(&consul, id, Some("passing"), 10 * SECOND).await);
    }
    assert_eq!(sidecar.get("/drain?wait=true").await.0, 200);
    restarted.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    restarted.restart().await;
    for id in ["hello-1", "hello-2"] {
        assert!(
            status_becomes(&consul, id, Some("passing"), 10 * SECOND).await,
            "{id} not back: a target that never went away kept the heal from happening\n{}",
            sidecar.logs()
        );
    }
}

// ---- item 4: a failed drain is tried again ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prestop_drain_that_could_not_reach_consul_is_tried_again_by_sigterm() {
    let consul = ConsulAgent::start_dev().await;
    let valve = Valve::start(address(consul.http_port())).await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let mut sidecar = Sidecar::start(&manifest(&valve.http_addr(), app.port(), "1s", "2s"), &[]);
    assert!(status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await);

    // Consul freezes: the preStop's drain fails at its deadline (delay 1 s + deregisterTimeout 2 s).
    valve.shut();
    let (code, body) = sidecar.get("/drain?wait=true").await;
    assert_eq!(code, 500, "{body}");
    // Consul answers again; the app has stopped and the SIGTERM comes.
    valve.open();
    let signalled = Instant::now();
    sidecar.signal("TERM");
    let status = sidecar.exit_within(10 * SECOND).await.expect("exits");
    let took = signalled.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM after a failed drain did not drain again\n{}",
        sidecar.logs()
    );
    assert!(
        took <= 4 * SECOND,
        "took {took:?}, past delay + deregisterTimeout + 1 s"
    );
    assert!(consul.catalog_service("hello").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_during_a_failing_drain_tries_again_within_what_is_left_of_its_budget() {
    let consul = ConsulAgent::start_dev().await;
    let valve = Valve::start(address(consul.http_port())).await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let mut sidecar = Sidecar::start(&manifest(&valve.http_addr(), app.port(), "1s", "2s"), &[]);
    assert!(status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await);
    valve.shut();
    // A drain that will fail at its deadline (3 s); the signal comes 2 s in, so its own budget
    // runs 3 s from there; Consul is back only after the first drain's deadline.
    let started = Instant::now();
    assert_eq!(
        sidecar.request(reqwest::Method::POST, "/drain").await.0,
        202
    );
    tokio::time::sleep((started + 2 * SECOND).saturating_duration_since(Instant::now())).await;
    sidecar.signal("TERM");
    tokio::time::sleep(
        (started + 3500 * Duration::from_millis(1)).saturating_duration_since(Instant::now()),
    )
    .await;
    valve.open();
    let status = sidecar.exit_within(10 * SECOND).await.expect("exits");
    assert_eq!(
        status.code(),
        Some(0),
        "the signal's budget was not used for another try\n{}",
        sidecar.logs()
    );
    assert!(
        started.elapsed() <= 6 * SECOND,
        "exited {:?} after the drain began, past the signal's budget + 1 s",
        started.elapsed()
    );
    assert!(consul.catalog_service("hello").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_retry_against_a_consul_still_away_ends_within_its_budget() {
    let consul = ConsulAgent::start_dev().await;
    let valve = Valve::start(address(consul.http_port())).await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let mut sidecar = Sidecar::start(&manifest(&valve.http_addr(), app.port(), "1s", "2s"), &[]);
    assert!(status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await);
    valve.shut();
    assert_eq!(sidecar.get("/drain?wait=true").await.0, 500);
    let signalled = Instant::now();
    sidecar.signal("TERM");
    let status = sidecar.exit_within(15 * SECOND).await.expect("exits");
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(1), "{}", sidecar.logs());
    assert!(
        took <= 4 * SECOND,
        "took {took:?} after the signal, past delay + deregisterTimeout + 1 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_catalog_mode_a_failed_drain_does_not_leave_the_instance_passing() {
    let consul = ConsulAgent::start_dev().await;
    let valve = Valve::start(address(consul.http_port())).await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    // A long session TTL: Consul would invalidate the session only 30–60 s after its last
    // renewal, so an instance gone within seconds shows the sidecar ended it, not Consul.
    let mut sidecar = Sidecar::start(
        &catalog_manifest(&valve.http_addr(), app.port(), "1s", "2s").replacen(
            "sessionTTL: 10s",
            "sessionTTL: 30s",
            1,
        ),
        &on_node("node-a"),
    );
    assert!(
        status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await,
        "not passing within 10 s\n{}",
        sidecar.logs()
    );
    valve.shut();
    let (code, body) = sidecar.get("/drain?wait=true").await;
    assert_eq!(code, 500, "the drain did not fail: {body}");
    valve.open();
    // The sidecar lives on (a native sidecar waits for its app to stop). A catalog check never
    // expires: the session of the failed drain is destroyed as soon as Consul answers again, its
    // keys go with it, and the reaper removes the instance.
    assert!(
        wait_until(10 * SECOND, || async {
            consul.check_status("hello", "hello-1").await.as_deref() != Some("passing")
        })
        .await,
        "the instance stayed passing for 10 s after Consul answered again, following a failed drain\n{}",
        sidecar.logs()
    );
    sidecar.signal("TERM");
    let status = sidecar.exit_within(10 * SECOND).await.expect("exits");
    assert_eq!(status.code(), Some(0), "{}", sidecar.logs());
    assert!(consul.catalog_service("hello").await.is_empty());
}

// ---- item 5: /drain?wait=true means the servers know --------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_wait_answers_once_the_servers_no_longer_hold_the_instance_though_the_leader_died() {
    let mut cluster = ConsulCluster::start().await;
    let client = ConsulAgent::start_with(ConsulOptions {
        join: Some(cluster.server(0).serf_lan_port()),
        log_level: Some("debug"),
        ..Default::default()
    })
    .await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let sidecar = Sidecar::start(&manifest(&client.http_addr(), app.port(), "2s", "15s"), &[]);
    assert!(
        wait_until(20 * SECOND, || async {
            cluster
                .api()
                .check_status("hello", "hello-1")
                .await
                .as_deref()
                == Some("passing")
        })
        .await,
        "not passing at the servers"
    );
    // The server the client agent sends its RPCs (its syncs to the catalog) to becomes the leader,
    // and dies just before the drain's deregistration: the agent's sync of it fails.
    let deadline = Instant::now() + 10 * SECOND;
    let server = loop {
        if let Some(s) = cluster.rpc_server_of(&client) {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "cannot tell which server the client agent uses"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    cluster.transfer_leadership(server).await;
    let admin = sidecar.admin.clone();
    let started = Instant::now();
    let waiter = tokio::spawn(async move {
        let answer = support::http_client()
            .get(format!("http://{admin}/drain?wait=true"))
            .timeout(60 * SECOND)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| e.to_string());
        (answer, Instant::now())
    });
    tokio::time::sleep(
        (started + 1700 * Duration::from_millis(1)).saturating_duration_since(Instant::now()),
    )
    .await;
    assert_eq!(
        cluster.rpc_server_of(&client),
        Some(server),
        "the client agent moved to another server"
    );
    cluster.kill(server);
    let killed = Instant::now();
    // When the two servers left agree on a new leader (polled every 20 ms while the drain waits).
    let mut leader_back = None;
    while !waiter.is_finished() {
        if leader_back.is_none() && cluster.leader().await.is_some() {
            leader_back = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (answer, answered) = waiter.await.expect("waiter");
    if leader_back.is_none() && cluster.leader().await.is_some() {
        leader_back = Some(Instant::now());
    }
    assert_eq!(answer, Ok(200), "{}", sidecar.logs());
    // The answer waited for the servers: none can confirm anything before a new leader is
    // elected (Raft's election timeout is 1 s here, and it took 1.5 to 4 s in our runs), while an
    // answer that trusted the agent came as it dropped the instance, 0.3 s after the kill. (The
    // agent's own sync of the deregistration failed against the dead server; the new leader's
    // event then makes the agent sync in full, racing the sidecar's confirmation, so which of the
    // two removed the instance at the servers varies from run to run: not asserted.)
    let leader_back = leader_back.unwrap_or_else(|| {
        panic!(
            "/drain?wait=true answered {:?} after the kill, before the servers had a leader again\n{}",
            answered.duration_since(killed),
            sidecar.logs()
        )
    });
    // Allowing for 20 ms of polling and for each server learning of the leader in its own time.
    assert!(
        answered + Duration::from_millis(250) >= leader_back,
        "/drain?wait=true answered {:?} after the kill, {:?} before the servers had a leader again\n{}",
        answered.duration_since(killed),
        leader_back.duration_since(answered),
        sidecar.logs()
    );
    // The answer came: the servers (a new leader elected) must not hold the instance any more.
    cluster.wait_for_leader(60 * SECOND).await;
    let nodes = cluster.api().nodes_of("hello", "hello-1").await;
    assert!(
        nodes.is_empty(),
        "/drain?wait=true answered 200 {:?} after it began, but the servers still hold the instance on {nodes:?}\n{}",
        answered.duration_since(started),
        sidecar.logs()
    );
}

// ---- item 6: the smaller ones -------------------------------------------------------------------

/// The environment of a sidecar in pod `uid` (the Downward API's `metadata.uid`), on Kubernetes
/// node `node-a` in catalog mode; `None`: not in a pod (no `POD_UID`).
fn pod_env(catalog: bool, uid: Option<&'static str>) -> Vec<(&'static str, &'static str)> {
    let mut env = if catalog {
        on_node("node-a").to_vec()
    } else {
        Vec::new()
    };
    env.extend(uid.map(|uid| ("POD_UID", uid)));
    env
}

/// The manifest of [`manifest`] or [`catalog_manifest`], a 3 s drain delay and a 5 s deadline.
fn drain_manifest(catalog: bool, consul: &str, app_port: u16) -> String {
    if catalog {
        catalog_manifest(consul, app_port, "3s", "5s")
    } else {
        manifest(consul, app_port, "3s", "5s")
    }
}

/// Agent mode without `POD_UID` (as on a host), catalog mode in a pod: a restart keeps the pod.
async fn restarted_in_the_middle_of_a_drain(catalog: bool) {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let m = drain_manifest(catalog, &consul.http_addr(), app.port());
    let env = &pod_env(catalog, catalog.then_some("0b1c7e52-pod-a"));
    let mut first = Sidecar::start(&m, env);
    assert!(status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await);
    assert_eq!(first.request(reqwest::Method::POST, "/drain").await.0, 202);
    assert!(status_becomes(&consul, "hello-1", Some("critical"), 2 * SECOND).await);
    // The sidecar dies in the middle of the drain (OOM, a liveness kill) and is restarted, while
    // the kubelet's preStop is still pending.
    first.signal("KILL");
    assert!(first.exit_within(5 * SECOND).await.is_some());
    let second = Sidecar::start(&m, env);
    never(
        &consul,
        "hello-1",
        "passing",
        3 * SECOND,
        "the restarted sidecar put its draining instance back as passing",
    )
    .await;
    assert!(
        status_becomes(&consul, "hello-1", None, 10 * SECOND).await,
        "the restarted sidecar did not finish the drain\n{}",
        second.logs()
    );
    assert_eq!(second.get("/readyz").await.0, 503);
    // The instance goes before the drain ends (in catalog mode its session and key go after it).
    assert!(
        wait_until(5 * SECOND, || async {
            second
                .get("/status")
                .await
                .1
                .contains("\"phase\":\"drained\"")
        })
        .await,
        "{}",
        second.get("/status").await.1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_restarted_in_the_middle_of_a_drain_stays_drained() {
    restarted_in_the_middle_of_a_drain(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_catalog_mode_a_sidecar_restarted_in_the_middle_of_a_drain_stays_drained() {
    restarted_in_the_middle_of_a_drain(true).await;
}

/// A pod whose drain was cut off (killed during the drain delay: a grace period shorter than the
/// drain, `kubectl delete --grace-period=1`) leaves its instance marked draining; a StatefulSet
/// puts a new pod of the same name (the same instance ID) on the same node within seconds. That
/// new pod is not the old one restarted: it registers and gets Ready, and is not held drained
/// waiting for an app restart that never comes.
async fn a_new_pod_of_the_same_name_is_not_held_by_its_predecessors_cut_off_drain(catalog: bool) {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let m = drain_manifest(catalog, &consul.http_addr(), app.port());
    let mut old = Sidecar::start(&m, &pod_env(catalog, Some("0b1c7e52-pod-old")));
    assert!(status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await);
    assert_eq!(old.request(reqwest::Method::POST, "/drain").await.0, 202);
    assert!(status_becomes(&consul, "hello-1", Some("critical"), 2 * SECOND).await);
    old.signal("KILL");
    assert!(old.exit_within(5 * SECOND).await.is_some());
    let new = Sidecar::start(&m, &pod_env(catalog, Some("9d4a61f0-pod-new")));
    // Catalog mode: the old pod's session holds the instance's key until it expires (2 × the
    // 10 s TTL); agent mode: nothing stands in the way.
    let bound = if catalog { 30 * SECOND } else { 10 * SECOND };
    let began = Instant::now();
    let mut ready = false;
    while began.elapsed() < bound {
        if new.get("/readyz").await.0 == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        ready,
        "the new pod of the same name was not Ready within {bound:?}: {}\n{}",
        new.get("/status").await.1,
        new.logs()
    );
    assert_eq!(
        consul.check_status("hello", "hello-1").await.as_deref(),
        Some("passing"),
        "Ready, but its instance is not passing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pod_of_the_same_name_is_not_held_by_its_predecessors_cut_off_drain_agent_mode() {
    a_new_pod_of_the_same_name_is_not_held_by_its_predecessors_cut_off_drain(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pod_of_the_same_name_is_not_held_by_its_predecessors_cut_off_drain_catalog_mode() {
    a_new_pod_of_the_same_name_is_not_held_by_its_predecessors_cut_off_drain(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_dies_is_critical_at_once_not_after_failure_threshold_probes() {
    let consul = ConsulAgent::start_dev().await;
    let mut app = DemoApp::start(DemoAppOptions::default()).await;
    // A Check every second, five failures in a row to fail: counted, a dead app would pass for
    // at least three more seconds.
    let m = manifest(&consul.http_addr(), app.port(), "0s", "3s").replace(
        "      interval: 200ms\n      timeout: 200ms\n",
        "      interval: 1s\n      timeout: 1s\n      failureThreshold: 5\n",
    );
    let _sidecar = Sidecar::start(&m, &[]);
    assert!(status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await);
    // The app crashes (an OOM kill, no preStop): its Watch stream ends and its port refuses.
    let killed = Instant::now();
    app.kill();
    assert!(status_becomes(&consul, "hello-1", Some("critical"), 10 * SECOND).await);
    let took = killed.elapsed();
    assert!(
        took < 1500 * Duration::from_millis(1),
        "critical {took:?} after the app died: a refused connection after the Watch stream ended counted as one failure of five"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_is_made_after_the_drain_ended() {
    let consul = ConsulAgent::start_dev().await;
    let valve = Valve::start(address(consul.http_port())).await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let sidecar = Sidecar::start(
        &catalog_manifest(&valve.http_addr(), app.port(), "0s", "3s"),
        &on_node("node-a"),
    );
    // Sessions live on a node of their own.
    let node = "consul-registrar--sessions";
    assert!(status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await);
    // A renewal is on its way when the drain destroys the session (it is answered after).
    valve.hold_back("/v1/session/renew/", 2 * SECOND);
    let held = valve.held_back();
    assert!(
        wait_until(10 * SECOND, || async { valve.held_back() > held }).await,
        "no renewal"
    );
    assert_eq!(sidecar.get("/drain?wait=true").await.0, 200);
    assert!(consul.sessions_on(node).await.is_empty());
    tokio::time::sleep(4 * SECOND).await;
    let sessions = consul.sessions_on(node).await;
    assert!(
        sessions.is_empty(),
        "a session was made after the drain ended: {sessions:?}\n{}",
        sidecar.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_admin_request_holds_the_exit_no_longer_than_the_one_second_grace() {
    use std::io::Write;
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let mut sidecar = Sidecar::start(&manifest(&consul.http_addr(), app.port(), "0s", "3s"), &[]);
    assert!(status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await);
    // Half a request, never finished: the admin server waits for it only during its grace.
    let mut stalled = std::net::TcpStream::connect(&sidecar.admin).expect("connect");
    stalled
        .write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n")
        .expect("write");
    tokio::time::sleep(SECOND / 5).await;
    let signalled = Instant::now();
    sidecar.signal("TERM");
    let status = sidecar.exit_within(5 * SECOND).await.expect("exits");
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0));
    assert!(
        took < 1500 * Duration::from_millis(1),
        "exited {took:?} after SIGTERM (drain delay 0 s): past the one-second grace"
    );
}
