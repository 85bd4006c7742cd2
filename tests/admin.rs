//! The admin server against a real Consul: readiness, drain over HTTP, bad requests, and metrics that
//! pass Prometheus's own linter.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::sidecar::Sidecar;
use support::{ConsulAgent, DemoApp, DemoAppOptions, wait_until};

const SECOND: Duration = Duration::from_secs(1);

fn manifest(consul: &str, app_port: u16, delay: &str) -> String {
    format!(
        "consul:
  address: {consul}
  retry: {{initial: 50ms, max: 500ms}}
drain:
  delay: {delay}
services:
  - name: hello
    id: hello-1
    address: 127.0.0.1
    port: {app_port}
    health:
      interval: 200ms
      timeout: 200ms
  - name: greeter
    id: greeter-1
    address: 127.0.0.1
    port: {app_port}
    health:
      service: helloworld.Greeter
      interval: 200ms
      timeout: 200ms
"
    )
}

/// Sends raw bytes to the admin port and returns the status line.
fn raw(admin: &str, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(admin).expect("connect");
    s.set_read_timeout(Some(5 * SECOND)).expect("timeout");
    let _ = s.write_all(bytes);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_registration_and_drain_wait_returns_after_consul_lost_the_instance() {
    let mut consul = support::ConsulAgent::prepare(Default::default());
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let sidecar = Sidecar::start(&manifest(&consul.http_addr(), app.port(), "1s"), &[]);

    assert!(
        wait_until(5 * SECOND, || async {
            sidecar.get("/healthz").await.0 == 200
        })
        .await
    );
    assert_eq!(
        sidecar.get("/readyz").await.0,
        503,
        "ready before the first registration"
    );
    consul.start().await;
    assert!(
        wait_until(5 * SECOND, || async {
            sidecar.get("/readyz").await.0 == 200
        })
        .await
    );

    let t0 = Instant::now();
    let (code, body) = sidecar.get("/drain?wait=true").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "returned before the drain delay"
    );
    // When /drain?wait=true has answered, Consul no longer lists either instance.
    assert!(consul.catalog_service("hello").await.is_empty());
    assert!(consul.catalog_service("greeter").await.is_empty());
    assert_eq!(sidecar.get("/readyz").await.0, 503, "ready while drained");
    assert_eq!(sidecar.metric("consul_registrar_draining").await, Some(1.0));
    // Drained means drained: the instance is not put back.
    tokio::time::sleep(SECOND).await;
    assert!(
        consul.catalog_service("hello").await.is_empty(),
        "re-registered after a drain"
    );
    // A later /drain joins the finished drain.
    assert_eq!(
        sidecar.request(reqwest::Method::POST, "/drain").await.0,
        202
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_404_405_or_400_and_the_sidecar_keeps_serving() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let sidecar = Sidecar::start(&manifest(&consul.http_addr(), app.port(), "1s"), &[]);
    assert!(
        wait_until(10 * SECOND, || async {
            sidecar.get("/readyz").await.0 == 200
        })
        .await
    );

    assert_eq!(sidecar.get("/nope").await.0, 404);
    assert_eq!(sidecar.get("/metrics/extra").await.0, 404);
    assert_eq!(
        sidecar.request(reqwest::Method::DELETE, "/drain").await.0,
        405
    );
    assert_eq!(
        sidecar.request(reqwest::Method::POST, "/metrics").await.0,
        405
    );
    assert_eq!(
        sidecar.request(reqwest::Method::PUT, "/healthz").await.0,
        405
    );
    let admin = sidecar.admin.clone();
    let lines = tokio::task::spawn_blocking(move || {
        vec![
            raw(&admin, b"GARBAGE\r\n\r\n"),
            raw(
                &admin,
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
            ),
            raw(&admin, &[0u8, 159, 146, 150, 13, 10, 13, 10]),
            raw(
                &admin,
                format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(100_000)).as_bytes(),
            ),
        ]
    })
    .await
    .expect("raw requests");
    for line in &lines {
        assert!(
            line.is_empty()
                || line.contains(" 400 ")
                || line.contains(" 414 ")
                || line.contains(" 431 "),
            "unexpected answer {line:?}"
        );
    }
    // Half a request, then silence: must not block others.
    let mut slow = TcpStream::connect(&sidecar.admin).expect("connect");
    slow.write_all(b"GET /healthz HTTP/1.1\r\n").expect("write");
    assert_eq!(sidecar.get("/healthz").await.0, 200);
    assert_eq!(sidecar.get("/readyz").await.0, 200);
    assert_eq!(
        consul.check_status("hello", "hello-1").await.as_deref(),
        Some("passing")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_the_scenarios_and_pass_promtool() {
    let mut consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let sidecar = Sidecar::start(&manifest(&consul.http_addr(), app.port(), "0s"), &[]);
    assert!(
        wait_until(10 * SECOND, || async {
            sidecar.get("/readyz").await.0 == 200
        })
        .await
    );
    let m = |s: &'static str| {
        let sidecar = &sidecar;
        async move { sidecar.metric(s).await.unwrap_or(0.0) }
    };
    let passing = "consul_registrar_health_transitions_total{instance=\"hello-1\",service=\"hello\",to=\"passing\"}";
    let critical = "consul_registrar_health_transitions_total{instance=\"hello-1\",service=\"hello\",to=\"critical\"}";
    let registers = "consul_registrar_consul_requests_total{operation=\"register\",status=\"2xx\"}";
    assert_eq!(m(passing).await, 1.0);
    assert_eq!(m(critical).await, 0.0);
    assert_eq!(m(registers).await, 2.0, "one registration per instance");
    assert_eq!(m("consul_registrar_consul_reachable").await, 1.0);
    assert_eq!(
        m("consul_registrar_instance_registered{instance=\"hello-1\",service=\"hello\"}").await,
        1.0
    );

    // A flip moves the transitions by exactly one each way and records the sync lag.
    let lag_before = m("consul_registrar_sync_lag_seconds_count").await;
    app.set_serving(false).await;
    assert!(wait_until(2 * SECOND, || async { m(critical).await == 1.0 }).await);
    app.set_serving(true).await;
    assert!(wait_until(2 * SECOND, || async { m(passing).await == 2.0 }).await);
    assert!(
        wait_until(2 * SECOND, || async {
            m("consul_registrar_sync_lag_seconds_count").await >= lag_before + 4.0
        })
        .await,
        "sync lag not recorded for both instances' flips"
    );

    // Consul restarted empty: both instances repaired once, reachable drops and comes back.
    consul.restart_wiped().await;
    let repairs =
        "consul_registrar_repairs_total{instance=\"hello-1\",reason=\"missing\",service=\"hello\"}";
    assert!(
        wait_until(5 * SECOND, || async { m(repairs).await == 1.0 }).await,
        "repair not counted"
    );
    assert!(m(registers).await >= 4.0);
    assert_eq!(m("consul_registrar_consul_reachable").await, 1.0);

    // The exposition passes Prometheus's own linter, and no label carries an error or a token.
    let (_, text) = sidecar.get("/metrics").await;
    for line in text.lines().filter(|l| l.starts_with("consul_registrar_")) {
        assert!(
            !line.contains("error:") && !line.contains("refused") && line.len() < 300,
            "suspicious label: {line}"
        );
    }
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| {
        let out = Command::new("bash")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/promtool.sh"))
            .output()
            .expect("run scripts/promtool.sh");
        assert!(
            out.status.success(),
            "no promtool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    });
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Drain: the gauge goes to 1 and the instances are gone.
    assert_eq!(sidecar.get("/drain?wait=true").await.0, 200);
    assert_eq!(m("consul_registrar_draining").await, 1.0);
    assert_eq!(
        m("consul_registrar_instance_registered{instance=\"hello-1\",service=\"hello\"}").await,
        0.0
    );
    assert!(
        m("consul_registrar_consul_requests_total{operation=\"deregister\",status=\"2xx\"}").await
            >= 2.0
    );
}
