//! The admin server against a real Consul: readiness, drain over HTTP, bad requests, metrics that
//! pass Prometheus's own linter, drains counted by outcome, and the chart's alerts and Grafana
//! dashboard naming only metrics a live sidecar exports.

mod support;

use std::collections::BTreeSet;
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
    // Both instances' critical written before the flip back (else the verdicts may coalesce and
    // one instance never writes either).
    assert!(
        wait_until(2 * SECOND, || async {
            m("consul_registrar_sync_lag_seconds_count").await >= lag_before + 2.0
        })
        .await,
        "sync lag not recorded for both instances' critical"
    );
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
    // The other instance's repair may land a moment later.
    assert!(wait_until(5 * SECOND, || async { m(registers).await >= 4.0 }).await);
    assert_eq!(m(repairs).await, 1.0, "repaired more than once");
    assert_eq!(m("consul_registrar_consul_reachable").await, 1.0);

    // The exposition passes Prometheus's own linter, and no label carries an error or a token.
    let (_, text) = sidecar.get("/metrics").await;
    for line in text.lines().filter(|l| l.starts_with("consul_registrar_")) {
        let labels = line.split_once('{').map_or("", |(_, rest)| rest);
        assert!(
            !labels.contains("error:") && !labels.contains("refused") && line.len() < 300,
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

/// GET with an optional `X-Drain-Token`: (status, body).
async fn get_with_token(sidecar: &Sidecar, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = support::http_client()
        .get(format!("http://{}{path}", sidecar.admin))
        .timeout(30 * SECOND);
    if let Some(t) = token {
        req = req.header("X-Drain-Token", t);
    }
    match req.send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_drain_token_only_its_holder_drains_and_a_rotated_file_takes_effect() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("drain-token");
    std::fs::write(&token_file, "first-token-0123456789\n").expect("token file");
    let file = token_file.to_string_lossy().to_string();
    let sidecar = Sidecar::start(
        &manifest(&consul.http_addr(), app.port(), "0s"),
        &[("CONSUL_REGISTRAR_DRAIN_TOKEN_FILE", &file)],
    );
    assert!(
        wait_until(10 * SECOND, || async {
            sidecar.get("/readyz").await.0 == 200
        })
        .await
    );
    let refused = |reason: &'static str| {
        let sidecar = &sidecar;
        async move {
            sidecar
                .metric(&format!(
                    "consul_registrar_admin_requests_refused_total{{endpoint=\"drain\",reason=\"{reason}\"}}"
                ))
                .await
                .unwrap_or(0.0)
        }
    };

    // Without the header (even from loopback), with a wrong one, with a wrong method: refused,
    // counted, and nothing is drained.
    let (code, body) = get_with_token(&sidecar, "/drain?wait=true", None).await;
    assert_eq!((code, body.as_str()), (403, "forbidden\n"));
    assert_eq!(
        sidecar.request(reqwest::Method::POST, "/drain").await.0,
        403
    );
    assert_eq!(refused("missing_token").await, 2.0);
    assert_eq!(
        get_with_token(&sidecar, "/drain", Some("first-token-012345678"))
            .await
            .0,
        403
    );
    assert_eq!(refused("wrong_token").await, 1.0);
    for path in ["/metrics", "/healthz", "/readyz", "/status"] {
        assert_eq!(sidecar.get(path).await.0, 200, "{path} not readable");
    }
    assert_eq!(
        consul.check_status("hello", "hello-1").await.as_deref(),
        Some("passing"),
        "a refused request drained"
    );

    // The file is read on each request: after a rotation the old token is refused.
    std::fs::write(&token_file, "second-token-abcdef\n").expect("rotate");
    assert_eq!(
        get_with_token(&sidecar, "/drain", Some("first-token-0123456789"))
            .await
            .0,
        403
    );
    let (code, body) =
        get_with_token(&sidecar, "/drain?wait=true", Some("second-token-abcdef")).await;
    assert_eq!(code, 200, "{body}");
    assert!(consul.catalog_service("hello").await.is_empty());

    // The token shows nowhere.
    let (_, status) = sidecar.get("/status").await;
    let (_, metrics) = sidecar.get("/metrics").await;
    for text in [sidecar.logs(), status, metrics] {
        assert!(
            !text.contains("first-token") && !text.contains("second-token"),
            "token leaked:\n{text}"
        );
    }
    assert!(sidecar.logs().contains("drain request refused"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_heals_when_the_app_restarts_but_not_when_the_app_stays_or_a_signal_follows() {
    let consul = ConsulAgent::start_dev().await;
    let mut app = DemoApp::start(DemoAppOptions::default()).await;
    let mut sidecar = Sidecar::start(&manifest(&consul.http_addr(), app.port(), "0s"), &[]);
    let ready = |want: u16| {
        let sidecar = &sidecar;
        async move {
            wait_until(10 * SECOND, || async {
                sidecar.get("/readyz").await.0 == want
            })
            .await
        }
    };
    assert!(ready(200).await);

    // The preStop of a liveness restart: drained, and while the app stays up it stays drained
    // (an operator's manual /drain holds).
    assert_eq!(sidecar.get("/drain?wait=true").await.0, 200);
    tokio::time::sleep(2 * SECOND).await;
    assert!(consul.catalog_service("hello").await.is_empty());
    assert_eq!(sidecar.get("/readyz").await.0, 503);
    assert_eq!(
        sidecar.metric("consul_registrar_drains_healed_total").await,
        Some(0.0)
    );

    // The kubelet restarts the app container: gone, then serving on the same port.
    app.kill();
    tokio::time::sleep(SECOND).await;
    assert!(
        consul.catalog_service("hello").await.is_empty(),
        "registered again while the app was gone"
    );
    app.restart().await;
    assert!(
        wait_until(10 * SECOND, || async {
            consul.check_status("hello", "hello-1").await.as_deref() == Some("passing")
                && consul.check_status("greeter", "greeter-1").await.as_deref() == Some("passing")
        })
        .await,
        "not registered again after the app came back"
    );
    assert!(ready(200).await, "/readyz did not come back");
    assert_eq!(
        sidecar.metric("consul_registrar_drains_healed_total").await,
        Some(1.0)
    );
    assert_eq!(sidecar.metric("consul_registrar_draining").await, Some(0.0));
    assert!(sidecar.logs().contains("drain healed"));

    // Pod deletion: the preStop drains, the app stops for good, then SIGTERM: drained, exit 0.
    assert_eq!(sidecar.get("/drain?wait=true").await.0, 200);
    assert!(consul.catalog_service("hello").await.is_empty());
    app.kill();
    tokio::time::sleep(SECOND / 2).await;
    sidecar.signal("TERM");
    let status = sidecar.wait_exit(5 * SECOND).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", sidecar.logs());
    assert!(consul.catalog_service("hello").await.is_empty());
    assert!(consul.catalog_service("greeter").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_heals_when_the_app_is_back_on_its_port_within_milliseconds() {
    // The kubelet kills and starts a container in one sync: the port can be closed for a few
    // hundred milliseconds only, less than the 200 ms between two tries of the port at times. Here
    // the app is killed and started again 30 ms later (its port closed for some 50 ms), three
    // times: each drain must heal.
    let consul = ConsulAgent::start_dev().await;
    let mut app = DemoApp::start(DemoAppOptions::default()).await;
    let sidecar = Sidecar::start(&manifest(&consul.http_addr(), app.port(), "0s"), &[]);
    for round in 1..=3 {
        assert!(
            wait_until(10 * SECOND, || async {
                sidecar.get("/readyz").await.0 == 200
            })
            .await,
            "round {round}: not ready"
        );
        assert_eq!(sidecar.get("/drain?wait=true").await.0, 200);
        assert!(consul.catalog_service("hello").await.is_empty());
        app.kill();
        tokio::time::sleep(Duration::from_millis(30)).await;
        app.restart().await;
        assert!(
            wait_until(10 * SECOND, || async {
                consul.check_status("hello", "hello-1").await.as_deref() == Some("passing")
            })
            .await,
            "round {round}: the app was back within milliseconds and the drain never healed:\n{}",
            sidecar.logs()
        );
        assert_eq!(
            sidecar.metric("consul_registrar_drains_healed_total").await,
            Some(f64::from(round))
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signal_makes_the_drain_final_even_if_the_app_comes_back() {
    let consul = ConsulAgent::start_dev().await;
    let mut app = DemoApp::start(DemoAppOptions::default()).await;
    // A long drain delay, so the app is gone and back while the drain still runs.
    let mut sidecar = Sidecar::start(&manifest(&consul.http_addr(), app.port(), "3s"), &[]);
    assert!(
        wait_until(10 * SECOND, || async {
            sidecar.get("/readyz").await.0 == 200
        })
        .await
    );
    let waiter = {
        let admin = sidecar.admin.clone();
        tokio::spawn(async move {
            support::http_client()
                .get(format!("http://{admin}/drain?wait=true"))
                .timeout(30 * SECOND)
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    tokio::time::sleep(SECOND / 2).await;
    sidecar.signal("TERM");
    app.restart().await;
    let status = sidecar.wait_exit(10 * SECOND).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", sidecar.logs());
    assert!(consul.catalog_service("hello").await.is_empty());
    assert!(!sidecar.logs().contains("drain healed"));
    // The classic sidecar's pending preStop request got its answer, not a reset.
    assert_eq!(waiter.await.expect("waiter").ok(), Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_are_counted_by_outcome() {
    let mut consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let text = manifest(&consul.http_addr(), app.port(), "0s")
        .replace("drain:\n", "drain:\n  deregisterTimeout: 1s\n");
    let sidecar = Sidecar::start(&text, &[]);
    assert!(
        wait_until(10 * SECOND, || async {
            sidecar.get("/readyz").await.0 == 200
        })
        .await
    );
    let drained = "consul_registrar_drains_total{outcome=\"drained\"}";
    let failed = "consul_registrar_drains_total{outcome=\"failed\"}";
    // There from the start, at 0: an alert's increase() sees the first failure.
    assert_eq!(sidecar.metric(failed).await, Some(0.0));
    assert_eq!(sidecar.metric(drained).await, Some(0.0));
    // Consul gone: the drain cannot deregister within its deadline and answers 500.
    consul.stop();
    let (code, body) = sidecar.get("/drain?wait=true").await;
    assert_eq!(code, 500, "{body}");
    assert_eq!(
        sidecar.metric(failed).await,
        Some(1.0),
        "{}",
        sidecar.logs()
    );
    assert_eq!(sidecar.metric(drained).await, Some(0.0));
}

/// The metric names a PromQL expression selects (not functions, aggregations, keywords, labels,
/// Grafana variables or Helm actions).
fn metric_names(expr: &str) -> BTreeSet<String> {
    const NOT_METRICS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "inf",
        "nan",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Helm actions first ({{ $sel }} sits inside a label matcher).
    let mut text = String::new();
    let mut rest = expr;
    while let Some(start) = rest.find("{{") {
        text.push_str(&rest[..start]);
        rest = rest[start..]
            .split_once("}}")
            .map_or("", |(_, after)| after);
    }
    text.push_str(rest);
    let chars: Vec<char> = text.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_group = |i: &mut usize, open: char, close: char| {
        let mut depth = 0;
        while *i < chars.len() {
            if chars[*i] == open {
                depth += 1;
            } else if chars[*i] == close {
                depth -= 1;
                if depth == 0 {
                    *i += 1;
                    return;
                }
            } else if chars[*i] == '"' {
                *i += 1;
                while *i < chars.len() && chars[*i] != '"' {
                    *i += 1;
                }
            }
            *i += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        if c == '{' {
            skip_group(&mut i, '{', '}');
        } else if c == '[' {
            skip_group(&mut i, '[', ']');
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += 1;
            }
            i += 1;
        } else if c == '$' || c.is_ascii_digit() || c == '.' {
            // A variable, a number or a duration: the whole word.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_.{}".contains(chars[i]))
            {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            let call = next < chars.len() && chars[next] == '(';
            if LABEL_LISTS.contains(&word.as_str()) {
                if call {
                    i = next;
                    skip_group(&mut i, '(', ')');
                }
            } else if !call && !NOT_METRICS.contains(&word.as_str()) {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_are_read_from_promql() {
    let names = |e| metric_names(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            "histogram_quantile(0.99, sum by (le, operation) (rate(a_bucket{ns=~\"$namespace\"}[$__rate_interval])))"
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("(b{ {{- $sel -}} } == 0) unless on (namespace, pod) (c{x=\"{y}\"} == 1)"),
        ["b", "c"]
    );
    assert_eq!(
        names("x * on (pod, instance) group_left () y or vector(0)"),
        ["x", "y"]
    );
}

/// The expressions of the chart's PrometheusRule template (`expr:` lines and `>-` blocks).
fn alert_expressions(template: &str) -> Vec<String> {
    let lines: Vec<&str> = template.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(expr) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        if expr.trim() != ">-" {
            out.push(expr.trim().to_string());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let block: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| l.len() - l.trim_start().len() > indent)
            .map(|l| l.trim())
            .collect();
        out.push(block.join(" "));
    }
    out
}

/// Every sample name of a /metrics text.
fn exported(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_alerts_and_dashboard_name_only_metrics_a_live_sidecar_exports() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    // One sidecar in each mode: catalog mode adds its session's series.
    let agent = Sidecar::start(&manifest(&consul.http_addr(), app.port(), "1s"), &[]);
    let catalog_manifest = format!(
        "consul:\n  mode: catalog\n  address: {}\nservices:\n  - name: hello\n    id: hello-catalog\n    address: 127.0.0.1\n    port: {}\n    health:\n      interval: 200ms\n      timeout: 200ms\n",
        consul.http_addr(),
        app.port()
    );
    let catalog = Sidecar::start(
        &catalog_manifest,
        &[("NODE_NAME", "node-a"), ("HOST_IP", "127.0.0.1")],
    );
    for sidecar in [&agent, &catalog] {
        assert!(
            wait_until(15 * SECOND, || async {
                sidecar.get("/readyz").await.0 == 200
            })
            .await,
            "{}",
            sidecar.logs()
        );
    }
    let mut live = exported(&agent.get("/metrics").await.1);
    live.extend(exported(&catalog.get("/metrics").await.1));

    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard_path = format!("{root}/charts/consul-registrar/dashboards/consul-registrar.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&dashboard_path).expect("dashboard"))
            .expect("dashboard JSON");
    let mut queries: Vec<(String, String)> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push((
                format!("dashboard panel {:?}", panel["title"]),
                target["expr"].as_str().expect("expr").to_string(),
            ));
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        // label_values(<selector>, <label>): the selector is the query.
        if let Some(selector) = variable["definition"]
            .as_str()
            .and_then(|d| d.strip_prefix("label_values("))
            .and_then(|d| d.rsplit_once(','))
            .map(|(selector, _)| selector)
        {
            queries.push((
                format!("dashboard variable {:?}", variable["name"]),
                selector.to_string(),
            ));
        }
    }
    let rules = std::fs::read_to_string(format!(
        "{root}/charts/consul-registrar/templates/prometheusrule.yaml"
    ))
    .expect("rules");
    let expressions = alert_expressions(&rules);
    assert!(expressions.len() >= 7, "{expressions:?}");
    queries.extend(expressions.into_iter().map(|e| ("alert".to_string(), e)));

    let mut named = BTreeSet::new();
    for (place, query) in &queries {
        let names = metric_names(query);
        assert!(!names.is_empty(), "{place}: no metric in {query}");
        for name in names {
            assert!(
                live.contains(&name),
                "{place} names {name}, which the sidecar does not export: {query}"
            );
            named.insert(name);
        }
    }
    // The queries cover the sidecar's own series, not a chosen few.
    let own: BTreeSet<_> = live
        .iter()
        .filter(|n| n.starts_with("consul_registrar_"))
        .map(|n| {
            n.trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count")
        })
        .map(str::to_string)
        .collect();
    let shown: BTreeSet<_> = named
        .iter()
        .map(|n| n.trim_end_matches("_bucket").to_string())
        .collect();
    // A new series goes on a dashboard panel (charts/consul-registrar/dashboards/), or here with
    // the reason it needs none.
    const NOT_ON_THE_DASHBOARD: &[&str] = &[];
    let unshown: Vec<_> = own
        .difference(&shown)
        .filter(|n| !NOT_ON_THE_DASHBOARD.contains(&n.as_str()))
        .collect();
    assert!(
        unshown.is_empty(),
        "series no dashboard panel or alert shows: {unshown:?}"
    );
}
