//! The sidecar against a real Consul agent and the real demo app: what Consul itself reports over
//! its HTTP API as the app flips, dies and restarts, as Consul loses state, and as the sidecar drains.

mod support;

use std::time::{Duration, Instant};

use support::sidecar::Sidecar;
use support::{ConsulAgent, ConsulOptions, DemoApp, DemoAppOptions, wait_until};

const SECOND: Duration = Duration::from_secs(1);

/// A manifest for one instance `id` of service `hello` pointing at the demo app on `app_port`.
fn manifest(consul: &str, app_port: u16, id: &str, health: &str, extra: &str) -> String {
    format!(
        "consul:
  address: {consul}
  retry:
    initial: 50ms
    max: 500ms
{extra}
drain:
  delay: 1s
  deregisterTimeout: 3s
services:
  - name: hello
    id: {id}
    address: 127.0.0.1
    port: {app_port}
    tags: [grpc, v1]
    meta:
      version: v1
    weights:
      passing: 7
    health:
      service: helloworld.Greeter
      interval: 200ms
      timeout: 200ms
      failureThreshold: 2
{health}
    check:
      ttl: 5s
"
    )
}

async fn status_becomes(
    consul: &ConsulAgent,
    id: &str,
    want: Option<&str>,
    timeout: Duration,
) -> bool {
    consul.wait_for_status("hello", id, want, timeout).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_with_the_manifest_fields_and_follows_health_via_watch() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions {
        start_serving: false,
        ..Default::default()
    })
    .await;
    let sidecar = Sidecar::start(
        &manifest(
            &consul.http_addr(),
            app.port(),
            "hello-1",
            "      mode: watch",
            "",
        ),
        &[],
    );

    assert!(
        status_becomes(&consul, "hello-1", Some("critical"), 10 * SECOND).await,
        "never registered"
    );
    let catalog = consul.catalog_service("hello").await;
    assert_eq!(catalog.len(), 1);
    let svc = &catalog[0];
    assert_eq!(svc["ServiceID"], "hello-1");
    assert_eq!(svc["ServiceAddress"], "127.0.0.1");
    assert_eq!(svc["ServicePort"], app.port());
    assert_eq!(svc["ServiceTags"], serde_json::json!(["grpc", "v1"]));
    assert_eq!(svc["ServiceMeta"]["version"], "v1");
    assert_eq!(svc["ServiceMeta"]["managed-by"], "consul-registrar");
    assert_eq!(svc["ServiceWeights"]["Passing"], 7);

    app.set_serving(true).await;
    assert!(
        status_becomes(&consul, "hello-1", Some("passing"), 2 * SECOND).await,
        "SERVING did not pass"
    );
    app.set_serving(false).await;
    assert!(
        status_becomes(&consul, "hello-1", Some("critical"), 2 * SECOND).await,
        "NOT_SERVING did not turn critical"
    );
    app.set_serving(true).await;
    assert!(status_becomes(&consul, "hello-1", Some("passing"), 2 * SECOND).await);

    let (_, status) = sidecar.get("/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    assert_eq!(status["instances"][0]["probe"]["mode"], "watch");
    assert_eq!(status["instances"][0]["probe"]["verdict"], "passing");
    assert_eq!(sidecar.metric("consul_registrar_health_transitions_total{instance=\"hello-1\",service=\"hello\",to=\"passing\"}").await, Some(2.0));
    assert_eq!(sidecar.metric("consul_registrar_health_transitions_total{instance=\"hello-1\",service=\"hello\",to=\"critical\"}").await, Some(1.0));
    assert_eq!(
        sidecar
            .metric("consul_registrar_instance_healthy{instance=\"hello-1\",service=\"hello\"}")
            .await,
        Some(1.0)
    );
    assert!(
        sidecar
            .metric("consul_registrar_sync_lag_seconds_count")
            .await
            .unwrap_or(0.0)
            >= 3.0
    );
}

/// `health.mode: watch` against an app without Watch: critical, saying why, and it stays so
/// (the interval's Check answers SERVING, but watch mode asked for Watch: a SERVING Check must not
/// turn it passing until Watch is tried again, 30 s later, and critical once more).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_mode_against_an_app_without_watch_stays_critical() {
    let consul = ConsulAgent::start_dev().await;
    let legacy = DemoApp::start(DemoAppOptions {
        no_watch: true,
        ..Default::default()
    })
    .await;
    let sidecar = Sidecar::start(
        &manifest(
            &consul.http_addr(),
            legacy.port(),
            "legacy-1",
            "      mode: watch",
            "",
        ),
        &[],
    );
    assert!(
        status_becomes(&consul, "legacy-1", Some("critical"), 10 * SECOND).await,
        "never registered critical\n{}",
        sidecar.logs()
    );
    let until = Instant::now() + 5 * SECOND;
    while Instant::now() < until {
        let seen = consul.check_status("hello", "legacy-1").await;
        assert_eq!(
            seen.as_deref(),
            Some("critical"),
            "watch mode against an app without Watch turned {seen:?}\n{}",
            sidecar.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, status) = sidecar.get("/status").await;
    assert!(
        status.contains("does not implement the Watch RPC"),
        "/status does not say why: {status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_mode_and_the_fallback_from_an_app_without_watch_follow_health() {
    let consul = ConsulAgent::start_dev().await;
    // An app that answers Watch with UNIMPLEMENTED: `auto` falls back to polling Check.
    let legacy = DemoApp::start(DemoAppOptions {
        no_watch: true,
        ..Default::default()
    })
    .await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let auto = Sidecar::start(
        &manifest(
            &consul.http_addr(),
            legacy.port(),
            "legacy-1",
            "      mode: auto",
            "",
        ),
        &[],
    );
    let poll = Sidecar::start(
        &manifest(
            &consul.http_addr(),
            app.port(),
            "poll-1",
            "      mode: poll",
            "",
        ),
        &[],
    );

    for (app, id) in [(&legacy, "legacy-1"), (&app, "poll-1")] {
        assert!(
            status_becomes(&consul, id, Some("passing"), 10 * SECOND).await,
            "{id} never passed"
        );
        app.set_serving(false).await;
        assert!(
            status_becomes(&consul, id, Some("critical"), 2 * SECOND).await,
            "{id} did not turn critical"
        );
        app.set_serving(true).await;
        assert!(
            status_becomes(&consul, id, Some("passing"), 2 * SECOND).await,
            "{id} did not pass again"
        );
    }
    for sidecar in [&auto, &poll] {
        let (_, status) = sidecar.get("/status").await;
        assert!(status.contains("\"mode\":\"poll\""), "{status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_app_turns_critical_and_a_restarted_one_passes_again() {
    let consul = ConsulAgent::start_dev().await;
    let mut app = DemoApp::start(DemoAppOptions::default()).await;
    let mut sidecar = Sidecar::start(
        &manifest(&consul.http_addr(), app.port(), "hello-1", "", ""),
        &[],
    );
    assert!(status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await);

    app.kill();
    // At once: its Watch stream ended and its port refuses (tests/drains.rs times that); a margin
    // for the machine.
    assert!(
        status_becomes(&consul, "hello-1", Some("critical"), 3 * SECOND).await,
        "killed app still passing"
    );
    let checks = consul.health_service("hello").await;
    let output = checks[0]["Checks"]
        .as_array()
        .and_then(|c| {
            c.iter()
                .find(|c| c["CheckID"] == "consul-registrar:hello-1")
        })
        .map(|c| c["Output"].to_string())
        .unwrap_or_default();
    assert!(
        output.contains("the app is gone"),
        "check output should say what the probe saw: {output}"
    );

    app.restart().await;
    assert!(
        status_becomes(&consul, "hello-1", Some("passing"), 5 * SECOND).await,
        "restarted app not passing"
    );
    assert!(
        sidecar.wait_exit(Duration::ZERO).is_none(),
        "the sidecar must outlive its app"
    );
    // The refused Check that found the app gone counts as an error (critical at once, so there
    // may be no second one before the restart).
    assert!(sidecar.metric("consul_registrar_probe_results_total{instance=\"hello-1\",outcome=\"error\",service=\"hello\"}").await.unwrap_or(0.0) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_lost_by_consul_is_back_within_two_seconds() {
    let mut consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let sidecar = Sidecar::start(
        &manifest(&consul.http_addr(), app.port(), "hello-1", "", ""),
        &[],
    );
    assert!(status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await);

    // Someone deregisters it by hand.
    consul.deregister_raw("hello-1").await;
    let gone = Instant::now();
    assert!(
        status_becomes(&consul, "hello-1", Some("passing"), 2 * SECOND).await,
        "not back within 2 s of a manual deregistration"
    );
    eprintln!("back {:?} after the manual deregistration", gone.elapsed());

    // The agent restarts with its state wiped.
    consul.restart_wiped().await;
    let answering = Instant::now();
    assert!(
        status_becomes(&consul, "hello-1", Some("passing"), 2 * SECOND).await,
        "not back within 2 s of Consul answering"
    );
    eprintln!("back {:?} after Consul answered again", answering.elapsed());
    assert!(sidecar.metric("consul_registrar_repairs_total{instance=\"hello-1\",reason=\"missing\",service=\"hello\"}").await.unwrap_or(0.0) >= 2.0);
    assert_eq!(
        consul.catalog_service("hello").await.len(),
        1,
        "duplicate instances"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_started_before_consul_registers_once_consul_appears() {
    let mut consul = ConsulAgent::prepare(ConsulOptions::default());
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let mut sidecar = Sidecar::start(
        &manifest(&consul.http_addr(), app.port(), "hello-1", "", ""),
        &[],
    );
    tokio::time::sleep(SECOND).await;
    assert_eq!(
        sidecar.get("/readyz").await.0,
        503,
        "ready before registering"
    );
    assert_eq!(
        sidecar.metric("consul_registrar_consul_reachable").await,
        Some(0.0)
    );
    assert!(
        sidecar.wait_exit(Duration::ZERO).is_none(),
        "the sidecar must not exit while Consul is absent"
    );

    consul.start().await;
    assert!(
        status_becomes(&consul, "hello-1", Some("passing"), 3 * SECOND).await,
        "did not register once Consul appeared"
    );
    assert!(
        wait_until(2 * SECOND, || async {
            sidecar.get("/readyz").await.0 == 200
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_marks_critical_at_once_then_deregisters_and_exits_zero() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let mut sidecar = Sidecar::start(
        &manifest(&consul.http_addr(), app.port(), "hello-1", "", ""),
        &[],
    );
    assert!(status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await);

    let t0 = Instant::now();
    sidecar.signal("TERM");
    assert!(
        status_becomes(&consul, "hello-1", Some("critical"), SECOND / 2).await,
        "not critical at once"
    );
    assert!(
        status_becomes(&consul, "hello-1", None, 3 * SECOND).await,
        "not deregistered after the delay"
    );
    let gone_after = t0.elapsed();
    assert!(
        gone_after >= Duration::from_millis(900),
        "deregistered before the 1 s drain delay: {gone_after:?}"
    );
    let status = sidecar.wait_exit(5 * SECOND).expect("exits after draining");
    assert_eq!(status.code(), Some(0), "{}", sidecar.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_skips_the_rest_of_the_drain_delay() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let long_delay = manifest(&consul.http_addr(), app.port(), "hello-1", "", "")
        .replace("delay: 1s", "delay: 30s");
    let mut sidecar = Sidecar::start(&long_delay, &[]);
    assert!(status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await);

    sidecar.signal("TERM");
    assert!(status_becomes(&consul, "hello-1", Some("critical"), SECOND).await);
    let t0 = Instant::now();
    sidecar.signal("TERM");
    assert!(
        status_becomes(&consul, "hello-1", None, 3 * SECOND).await,
        "second SIGTERM did not cut the delay short"
    );
    let status = sidecar.wait_exit(5 * SECOND).expect("exits");
    assert_eq!(status.code(), Some(0));
    assert!(t0.elapsed() < 5 * SECOND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sidecar_adopts_its_instance_and_leaves_foreign_ones_alone() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let text = manifest(&consul.http_addr(), app.port(), "hello-1", "", "");
    let first = Sidecar::start(&text, &[]);
    assert!(status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await);
    let index_before =
        consul.agent_service("hello-1").await.expect("registered")["ContentHash"].clone();
    first.signal("KILL");
    drop(first);

    let second = Sidecar::start(&text, &[]);
    assert!(
        wait_until(5 * SECOND, || async {
            second.get("/readyz").await.0 == 200
        })
        .await
    );
    assert_eq!(
        consul.catalog_service("hello").await.len(),
        1,
        "a restart must not duplicate the instance"
    );
    assert_eq!(
        consul.agent_service("hello-1").await.expect("still there")["ContentHash"],
        index_before,
        "re-registered an instance that was in sync"
    );
    assert!(
        !second.logs().contains("registered it again"),
        "{}",
        second.logs()
    );

    // An instance registered by someone else under an ID in our manifest is not touched.
    consul
        .register_raw(serde_json::json!({"ID": "foreign-1", "Name": "hello", "Port": 1, "Address": "127.0.0.9"}))
        .await;
    let foreign = Sidecar::start(
        &manifest(&consul.http_addr(), app.port(), "foreign-1", "", ""),
        &[],
    );
    assert!(
        wait_until(3 * SECOND, || async {
            foreign
                .logs()
                .contains("not registered by consul-registrar")
        })
        .await,
        "{}",
        foreign.logs()
    );
    let svc = consul
        .agent_service("foreign-1")
        .await
        .expect("foreign instance kept");
    assert_eq!(svc["Port"], 1);
    assert_eq!(svc["Address"], "127.0.0.9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_consul_works_with_a_token_file_and_refuses_a_wrong_token_without_logging_it() {
    let consul = ConsulAgent::start_with(ConsulOptions {
        acl: true,
        ..Default::default()
    })
    .await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(
        &token_file,
        consul
            .registrar_token()
            .expect("ACL agent has a registrar token"),
    )
    .expect("write token");

    let good = Sidecar::start(
        &manifest(
            &consul.http_addr(),
            app.port(),
            "hello-1",
            "",
            &format!("  tokenFile: {}", token_file.display()),
        ),
        &[],
    );
    assert!(
        status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await,
        "{}",
        good.logs()
    );

    let wrong = "00000000-dead-beef-0000-000000000000";
    let bad = Sidecar::start(
        &manifest(&consul.http_addr(), app.port(), "hello-2", "", ""),
        &[("CONSUL_HTTP_TOKEN", wrong)],
    );
    assert!(
        wait_until(5 * SECOND, || async { bad.logs().contains("ACL token") }).await,
        "no hint about the token: {}",
        bad.logs()
    );
    assert_eq!(consul.check_status("hello", "hello-2").await, None);
    assert_eq!(bad.get("/readyz").await.0, 503);
    for (name, logs) in [("good", good.logs()), ("bad", bad.logs())] {
        assert!(!logs.contains(wrong), "{name} sidecar logged the token");
        assert!(
            !logs.contains(consul.registrar_token().unwrap_or("-")),
            "{name} sidecar logged the token"
        );
    }
    let (_, status) = bad.get("/status").await;
    assert!(
        status.contains("403"),
        "status should show the refusal: {status}"
    );
    assert!(!status.contains(wrong));
    let (_, metrics) = bad.get("/metrics").await;
    assert!(
        metrics.contains(
            "consul_registrar_consul_requests_total{operation=\"read_service\",status=\"4xx\"}"
        ),
        "{metrics}"
    );
    assert!(
        !metrics.contains(wrong) && !metrics.contains(support::REGISTRAR_TOKEN),
        "a token in the metrics"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_consul_works_with_the_right_ca_and_refuses_a_wrong_one() {
    let consul = ConsulAgent::start_with(ConsulOptions {
        tls: true,
        ..Default::default()
    })
    .await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let ca = consul
        .ca_file()
        .expect("TLS agent has a CA")
        .display()
        .to_string();
    let good = Sidecar::start(
        &manifest(
            &consul.http_addr(),
            app.port(),
            "hello-1",
            "",
            &format!("  tls:\n    caFile: {ca}\n    serverName: localhost"),
        ),
        &[],
    );
    assert!(
        status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await,
        "{}",
        good.logs()
    );

    let wrong_ca = consul
        .wrong_ca_file()
        .expect("a second CA")
        .display()
        .to_string();
    let bad = Sidecar::start(
        &manifest(&consul.http_addr(), app.port(), "hello-2", "", ""),
        &[("CONSUL_CACERT", wrong_ca.as_str())],
    );
    assert!(
        wait_until(5 * SECOND, || async {
            let l = bad.logs();
            l.contains("certificate") || l.contains("UnknownIssuer")
        })
        .await,
        "no clear TLS error: {}",
        bad.logs()
    );
    assert_eq!(consul.check_status("hello", "hello-2").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_serving_grpc_over_tls_is_probed_with_the_manifest_ca() {
    // The TLS agent's CA and certificate double as the app's: Consul itself stays plain here.
    let certs = ConsulAgent::prepare(ConsulOptions {
        tls: true,
        ..Default::default()
    });
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions {
        tls: certs.server_cert(),
        ..Default::default()
    })
    .await;
    let ca = certs.ca_file().expect("CA").display().to_string();
    let tls = format!("      tls:\n        caFile: {ca}\n        serverName: localhost");
    let sidecar = Sidecar::start(
        &manifest(&consul.http_addr(), app.port(), "tls-1", &tls, ""),
        &[],
    );
    assert!(
        status_becomes(&consul, "tls-1", Some("passing"), 10 * SECOND).await,
        "{}",
        sidecar.logs()
    );
    app.set_serving(false).await;
    assert!(status_becomes(&consul, "tls-1", Some("critical"), 2 * SECOND).await);

    // The same app probed without TLS never passes.
    let plain = Sidecar::start(
        &manifest(&consul.http_addr(), app.port(), "plain-1", "", ""),
        &[],
    );
    app.set_serving(true).await;
    assert!(status_becomes(&consul, "tls-1", Some("passing"), 2 * SECOND).await);
    tokio::time::sleep(2 * SECOND).await;
    assert_eq!(
        consul.check_status("hello", "plain-1").await.as_deref(),
        Some("critical"),
        "{}",
        plain.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_beyond_the_blocking_watches_come_back_on_the_alarm() {
    let mut consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let mut text = format!(
        "consul:\n  address: {}\n  blockingWatches: 1\n  retry: {{initial: 50ms, max: 500ms}}\nservices:\n",
        consul.http_addr()
    );
    for i in 0..4 {
        text.push_str(&format!(
            "  - name: hello\n    id: many-{i}\n    address: 127.0.0.1\n    port: {}\n    health:\n      interval: 200ms\n      timeout: 200ms\n    check:\n      ttl: 30s\n",
            app.port()
        ));
    }
    let sidecar = Sidecar::start(&text, &[]);
    for i in 0..4 {
        assert!(
            status_becomes(&consul, &format!("many-{i}"), Some("passing"), 10 * SECOND).await,
            "{}",
            sidecar.logs()
        );
    }
    consul.restart_wiped().await;
    // Only many-0 is watched; its watcher's alarm brings the other three back as fast.
    for i in 0..4 {
        assert!(
            status_becomes(&consul, &format!("many-{i}"), Some("passing"), 2 * SECOND).await,
            "many-{i} not back within 2 s (TTL refresh would take 10 s)\n{}",
            sidecar.logs()
        );
    }
    assert_eq!(consul.catalog_service("hello").await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_instances_register_within_consuls_default_connection_limit() {
    // Consul refuses a client past 200 HTTP connections (429). 400 instances registering at once
    // must not need more: every one is registered on the first try and turns passing.
    const N: usize = 400;
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let mut text = format!("consul:\n  address: {}\nservices:\n", consul.http_addr());
    for i in 0..N {
        text.push_str(&format!(
            "  - name: many\n    id: many-{i}\n    address: 127.0.0.1\n    port: {}\n",
            app.port()
        ));
    }
    let sidecar = Sidecar::start(&text, &[]);
    let all_passing = wait_until(30 * SECOND, || async {
        match consul.get("/v1/health/service/many?passing=true").await {
            Ok((200, serde_json::Value::Array(entries))) => entries.len() == N,
            _ => false,
        }
    })
    .await;
    assert!(
        all_passing,
        "not all {N} instances passing\n{}",
        sidecar.logs()
    );
    let calls = |operation: &'static str, class: &'static str| {
        let sidecar = &sidecar;
        async move {
            sidecar
                .metric(&format!(
                    "consul_registrar_consul_requests_total{{operation=\"{operation}\",status=\"{class}\"}}"
                ))
                .await
                .unwrap_or(0.0)
        }
    };
    assert_eq!(calls("register", "2xx").await, N as f64);
    for operation in ["register", "update_ttl", "read_service"] {
        for class in ["5xx", "error"] {
            assert_eq!(calls(operation, class).await, 0.0, "{operation} {class}");
        }
    }
    assert_eq!(calls("register", "4xx").await, 0.0, "registrations refused");
    assert_eq!(calls("update_ttl", "4xx").await, 0.0, "TTL updates refused");
}

/// An "agent" that accepts connections and never answers: every call hangs until its timeout.
fn silent_agent() -> (String, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = format!("http://{}", listener.local_addr().expect("addr"));
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        // Holds every connection open, silent, until the test process ends.
        for stream in listener.incoming().flatten() {
            open.push(stream);
        }
    });
    (addr, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_against_an_agent_that_never_answers_fits_delay_plus_deregister_timeout() {
    let (agent, _held) = silent_agent();
    let app = DemoApp::start(DemoAppOptions::default()).await;
    // Delay 1 s + deregisterTimeout 2 s: the kubelet's budget must cover 3 s, not the 10 s a
    // single Consul call may take.
    let m = manifest(&agent, app.port(), "hello-1", "", "")
        .replace("deregisterTimeout: 3s", "deregisterTimeout: 2s");
    let mut sidecar = Sidecar::start(&m, &[]);
    // Let the reconciler's first registration get stuck in flight.
    tokio::time::sleep(2 * SECOND).await;
    let t0 = Instant::now();
    sidecar.signal("TERM");
    let status = sidecar.wait_exit(15 * SECOND).expect("exits");
    let took = t0.elapsed();
    assert!(
        took <= 4 * SECOND,
        "took {took:?}, past delay + deregisterTimeout + 1 s\n{}",
        sidecar.logs()
    );
    assert_eq!(
        status.code(),
        Some(1),
        "an incomplete drain exits 1\n{}",
        sidecar.logs()
    );
    assert!(
        sidecar
            .logs()
            .contains("could not deregister 1 instance(s)")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_wait_sent_before_sigterm_gets_its_answer_before_the_sidecar_exits() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    // Several rounds: the exit and the answer race, so one lucky round proves little.
    for round in 0..3 {
        let id = format!("hello-{round}");
        let m = manifest(&consul.http_addr(), app.port(), &id, "", "")
            .replace("delay: 1s", "delay: 300ms");
        let mut sidecar = Sidecar::start(&m, &[]);
        assert!(status_becomes(&consul, &id, Some("passing"), 10 * SECOND).await);
        let admin = sidecar.admin.clone();
        let waiter = tokio::spawn(async move {
            support::http_client()
                .get(format!("http://{admin}/drain?wait=true"))
                .timeout(10 * SECOND)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| e.to_string())
        });
        // The request is in (the drain it started is under way), however loaded the machine.
        let started = wait_until(5 * SECOND, || async {
            sidecar.metric("consul_registrar_draining").await == Some(1.0)
        })
        .await;
        assert!(
            started,
            "round {round}: /drain did not start a drain\n{}",
            sidecar.logs()
        );
        // A classic sidecar: SIGTERM while the app's preStop still waits.
        sidecar.signal("TERM");
        let answer = waiter.await.expect("waiter");
        assert_eq!(answer, Ok(200), "round {round}\n{}", sidecar.logs());
        let status = sidecar.wait_exit(5 * SECOND).expect("exits");
        assert_eq!(status.code(), Some(0));
    }
}

/// A TCP proxy to `backend` on loopback that can freeze the connections it carries: a frozen
/// connection stays open on both sides (the kernel keeps acknowledging what the sidecar sends)
/// but no byte is forwarded any more, as over a connection whose far end vanished without a FIN
/// (a half-open connection). Connections accepted after the freeze are forwarded as usual.
struct FreezingProxy {
    port: u16,
    /// Bumped by [`FreezingProxy::freeze_existing`]; a connection is frozen once it is past the
    /// value it was accepted under.
    epoch: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FreezingProxy {
    async fn start(backend: u16) -> FreezingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let epoch = std::sync::Arc::new(tokio::sync::watch::Sender::new(0u64));
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (epochs, count) = (epoch.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                else {
                    continue;
                };
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mine = *epochs.borrow();
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                for (from, to) in [(client_read, server_write), (server_read, client_write)] {
                    tokio::spawn(forward(from, to, epochs.subscribe(), mine));
                }
            }
        });
        FreezingProxy {
            port,
            epoch,
            accepted,
        }
    }

    /// Freezes every connection open now.
    fn freeze_existing(&self) {
        self.epoch.send_modify(|e| *e += 1);
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Copies one direction of a proxied connection until it ends, or until it is frozen: then it
/// holds both sockets open, reading and writing nothing, for as long as the test runs.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut epoch: tokio::sync::watch::Receiver<u64>,
    mine: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            // The borrowed value is dropped inside: it must not live across the await below.
            _ = async { drop(epoch.wait_for(|e| *e > mine).await) } => {
                std::future::pending::<()>().await;
            }
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
    let _ = to.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_connection_to_the_app_is_replaced_after_failure_threshold_timeouts() {
    // Issue 13 item 10: the probe's connection to the app goes silent without closing (the far
    // end vanished: a rescheduled remote target, a NAT or load balancer that dropped its state).
    // The probe must turn critical, then connect anew and come back passing, instead of reusing
    // the dead connection until the kernel gives up minutes later.
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let proxy = FreezingProxy::start(app.port()).await;
    // interval 200ms, timeout 200ms, failureThreshold 2 (the manifest's health settings).
    let sidecar = Sidecar::start(
        &manifest(&consul.http_addr(), proxy.port, "hello-1", "", ""),
        &[],
    );
    assert!(
        status_becomes(&consul, "hello-1", Some("passing"), 10 * SECOND).await,
        "{}",
        sidecar.logs()
    );
    let before = proxy.accepted();
    let transitions = |to: &'static str| {
        let sidecar = &sidecar;
        async move {
            sidecar
                .metric(&format!("consul_registrar_health_transitions_total{{instance=\"hello-1\",service=\"hello\",to=\"{to}\"}}"))
                .await
                .unwrap_or(0.0)
        }
    };
    let passed = transitions("passing").await;

    let frozen_at = Instant::now();
    proxy.freeze_existing();
    // Critical (the verdict; in Consul it lasts only until the new connection answers, too
    // briefly to be sure to see it there), then passing again, in Consul.
    let failed = wait_until(5 * SECOND, || async {
        transitions("critical").await >= 1.0
    })
    .await;
    assert!(
        failed,
        "a connection that forwards nothing must fail the probe\n{}",
        sidecar.logs()
    );
    // failureThreshold × (interval + timeout) for the timeouts, then a new connection and one
    // SERVING answer; a few seconds more for the TTL update and the machine.
    let bound = 2 * (Duration::from_millis(200) + Duration::from_millis(200)) + 4 * SECOND;
    let back = wait_until(bound.saturating_sub(frozen_at.elapsed()), || async {
        transitions("passing").await > passed
            && consul.check_status("hello", "hello-1").await.as_deref() == Some("passing")
    })
    .await;
    assert!(
        back,
        "not passing again {:?} after the connection to the app froze (bound {bound:?}): the probe keeps the half-open connection\n{}",
        frozen_at.elapsed(),
        sidecar.logs()
    );
    assert!(
        proxy.accepted() > before,
        "passing again without a new connection: the freeze did not take"
    );
}
