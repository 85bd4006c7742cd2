//! The test bed itself: the Consul is real, the demo app flips for real, and the ACL and TLS
//! variants accept the right credentials and refuse wrong ones. Every other integration test relies
//! on these facts.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{ConsulAgent, ConsulOptions, DemoApp, DemoAppOptions, wait_until};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use demo_app::hello;

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_is_real_it_registers_and_reads_back() {
    let consul = ConsulAgent::start_dev().await;
    consul
        .register_raw(serde_json::json!({
            "ID": "web-1", "Name": "web", "Address": "127.0.0.2", "Port": 8080, "Tags": ["t1"],
            "Check": { "CheckID": "web-1-ttl", "TTL": "30s", "Status": "passing" }
        }))
        .await;
    let catalog = consul.catalog_service("web").await;
    assert_eq!(catalog.len(), 1);
    assert_eq!(catalog[0]["ServiceID"], "web-1");
    assert_eq!(catalog[0]["ServicePort"], 8080);
    assert_eq!(catalog[0]["ServiceTags"], serde_json::json!(["t1"]));
    assert!(
        wait_until(5 * SECOND, || async {
            consul.check_status("web", "web-1").await.as_deref() == Some("passing")
        })
        .await
    );
    let health = consul.health_service("web").await;
    assert_eq!(health[0]["Service"]["Address"], "127.0.0.2");

    let version = Command::new(support::consul_bin())
        .arg("version")
        .output()
        .expect("consul version");
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.starts_with("Consul v1.2"),
        "not a 1.20+ Consul: {version}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_wiped_loses_every_registration_and_answers_again() {
    let mut consul = ConsulAgent::start_dev().await;
    consul
        .register_raw(serde_json::json!({"ID": "a-1", "Name": "a", "Port": 1}))
        .await;
    assert!(consul.agent_service("a-1").await.is_some());
    let port = consul.http_port();
    consul.restart_wiped().await;
    assert_eq!(consul.http_port(), port);
    assert!(
        consul.agent_service("a-1").await.is_none(),
        "state survived the restart"
    );
    assert!(consul.catalog_service("a").await.is_empty());
}

async fn channel(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect to the demo app")
}

async fn health_of(addr: &str, service: &str) -> Result<i32, tonic::Status> {
    let mut client = HealthClient::new(channel(addr).await);
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_app_flips_from_outside_and_a_real_health_client_sees_it() {
    let app = DemoApp::start(DemoAppOptions::default()).await;
    async fn next(
        stream: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    ) -> Option<i32> {
        tokio::time::timeout(2 * SECOND, stream.message())
            .await
            .expect("a Watch message in time")
            .expect("stream ok")
            .map(|m| m.status)
    }
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;
    for service in ["", "helloworld.Greeter"] {
        assert_eq!(
            health_of(&app.addr(), service).await.expect("check"),
            serving
        );
    }
    assert_eq!(
        health_of(&app.addr(), "nope")
            .await
            .expect_err("unknown")
            .code(),
        Code::NotFound
    );

    // A Watch stream sees every flip.
    let mut client = HealthClient::new(channel(&app.addr()).await);
    let mut stream = client
        .watch(HealthCheckRequest {
            service: "helloworld.Greeter".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    assert_eq!(next(&mut stream).await, Some(serving));

    app.set_serving(false).await; // control port
    assert_eq!(next(&mut stream).await, Some(not_serving));
    assert_eq!(
        health_of(&app.addr(), "").await.expect("check"),
        not_serving
    );
    app.signal_serving(); // SIGUSR2
    assert_eq!(next(&mut stream).await, Some(serving));
    app.signal_not_serving(); // SIGUSR1
    assert_eq!(next(&mut stream).await, Some(not_serving));
    assert_eq!(
        health_of(&app.addr(), "helloworld.Greeter")
            .await
            .expect("check"),
        not_serving
    );

    // `demo-app set` flips it through the control port too.
    let out = Command::new(support::demo_app_bin())
        .args([
            "set",
            "--control",
            &format!("127.0.0.1:{}", app.control_port()),
            "serving",
        ])
        .output()
        .expect("demo-app set");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(next(&mut stream).await, Some(serving));

    let mut greeter = hello::greeter_client::GreeterClient::new(channel(&app.addr()).await);
    let reply = greeter
        .say_hello(hello::HelloRequest {
            name: "tests".into(),
        })
        .await
        .expect("SayHello");
    // The reply names the instance, so load-balancing tests can tell instances apart.
    assert_eq!(
        reply.into_inner().message,
        format!("Hello tests from {}", app.addr())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_health_service_flips_alone_and_the_control_port_reports_it() {
    let app = DemoApp::start(DemoAppOptions {
        start_serving: false,
        health_services: vec!["helloworld.Greeter".into(), "pkg.Other".into()],
        name: Some("blue".into()),
        ..Default::default()
    })
    .await;
    let serving = ServingStatus::Serving as i32;
    let not_serving = ServingStatus::NotServing as i32;
    let statuses = |names: [&'static str; 3]| {
        let addr = app.addr();
        async move {
            let mut out = Vec::new();
            for n in names {
                out.push(health_of(&addr, n).await.expect("check"));
            }
            out
        }
    };
    let all = ["", "helloworld.Greeter", "pkg.Other"];
    assert_eq!(
        statuses(all).await,
        vec![not_serving; 3],
        "--start not-serving"
    );
    let status = app.status().await;
    assert_eq!(
        status.keys().map(String::as_str).collect::<Vec<_>>(),
        all.to_vec(),
        "{status:?}"
    );
    assert!(status.values().all(|v| v == "NotServing"), "{status:?}");

    app.set_service_serving("pkg.Other", true).await;
    assert_eq!(statuses(all).await, vec![not_serving, not_serving, serving]);
    assert_eq!(app.status().await["pkg.Other"], "Serving");

    let set = |status: &str, service: &str| {
        Command::new(support::demo_app_bin())
            .args([
                "set",
                "--control",
                &format!("127.0.0.1:{}", app.control_port()),
                status,
                "--service",
                service,
            ])
            .output()
            .expect("demo-app set")
    };
    let out = set("serving", "helloworld.Greeter");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(statuses(all).await, vec![not_serving, serving, serving]);
    let out = set("serving", "no.Such");
    assert!(
        !out.status.success(),
        "an unknown health service is refused"
    );
    assert_eq!(statuses(all).await, vec![not_serving, serving, serving]);

    let mut greeter = hello::greeter_client::GreeterClient::new(channel(&app.addr()).await);
    let reply = greeter
        .say_hello(hello::HelloRequest { name: "x".into() })
        .await
        .expect("SayHello");
    assert_eq!(reply.into_inner().message, "Hello x from blue");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_watch_streams_share_one_connection_and_all_see_a_flip() {
    const N: usize = 1000;
    let app = DemoApp::start(DemoAppOptions {
        generate_services: N,
        ..Default::default()
    })
    .await;
    let conn = channel(&app.addr()).await; // one HTTP/2 connection for every stream
    let opened = futures_util::future::join_all((0..N).map(|i| {
        let mut client = HealthClient::new(conn.clone());
        async move {
            let mut stream = client
                .watch(HealthCheckRequest {
                    service: format!("svc-{i}"),
                })
                .await
                .unwrap_or_else(|e| panic!("watch svc-{i}: {e}"))
                .into_inner();
            let first = stream.message().await.expect("stream ok").map(|m| m.status);
            (stream, first)
        }
    }));
    let opened = tokio::time::timeout(60 * SECOND, opened)
        .await
        .expect("1000 Watch streams open within 60 s");
    assert!(
        opened
            .iter()
            .all(|(_, first)| *first == Some(ServingStatus::Serving as i32))
    );

    app.signal_not_serving();
    let flipped =
        futures_util::future::join_all(opened.into_iter().map(|(mut stream, _)| async move {
            stream.message().await.expect("stream ok").map(|m| m.status)
        }));
    let flipped = tokio::time::timeout(30 * SECOND, flipped)
        .await
        .expect("every stream hears of the flip within 30 s");
    assert_eq!(flipped.len(), N);
    assert!(
        flipped
            .iter()
            .all(|s| *s == Some(ServingStatus::NotServing as i32))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demo_app_without_watch_answers_unimplemented_but_checks() {
    let app = DemoApp::start(DemoAppOptions {
        no_watch: true,
        ..Default::default()
    })
    .await;
    let mut client = HealthClient::new(channel(&app.addr()).await);
    let err = client
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect_err("no Watch");
    assert_eq!(err.code(), Code::Unimplemented);
    assert_eq!(
        health_of(&app.addr(), "").await.expect("check"),
        ServingStatus::Serving as i32
    );
    app.set_serving(false).await;
    assert_eq!(
        health_of(&app.addr(), "").await.expect("check"),
        ServingStatus::NotServing as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_variant_accepts_the_registrar_token_and_refuses_a_wrong_one() {
    let consul = ConsulAgent::start_with(ConsulOptions {
        acl: true,
        ..Default::default()
    })
    .await;
    let plain = support::http_client();
    let register = |token: &str| {
        plain
            .put(format!("{}/v1/agent/service/register", consul.http_addr()))
            .header("X-Consul-Token", token)
            .json(&serde_json::json!({"ID": "acl-1", "Name": "acl", "Port": 1}))
            .send()
    };
    let ok = register(consul.registrar_token().expect("token"))
        .await
        .expect("request");
    assert_eq!(ok.status().as_u16(), 200);
    let bad = register("11111111-2222-3333-4444-555555555555")
        .await
        .expect("request");
    assert_eq!(bad.status().as_u16(), 403);
    let anonymous = plain
        .get(format!("{}/v1/agent/services", consul.http_addr()))
        .send()
        .await
        .expect("request");
    assert!(
        anonymous
            .json::<serde_json::Value>()
            .await
            .unwrap_or_default()
            .get("acl-1")
            .is_none(),
        "deny-by-default leaked a service"
    );
    assert!(
        consul.agent_service("acl-1").await.is_some(),
        "the management token sees it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_variant_serves_https_only_and_checks_the_ca() {
    let consul = ConsulAgent::start_with(ConsulOptions {
        tls: true,
        ..Default::default()
    })
    .await;
    assert!(consul.http_addr().starts_with("https://"));
    let (status, leader) = consul
        .get("/v1/status/leader")
        .await
        .expect("https with the right CA");
    assert_eq!(status, 200);
    assert!(leader.as_str().is_some_and(|l| !l.is_empty()));

    let _ = rustls::crypto::ring::default_provider().install_default();
    let pem = std::fs::read(consul.wrong_ca_file().expect("wrong CA")).expect("read");
    let wrong = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).expect("pem"))
        .build()
        .expect("client");
    let err = wrong
        .get(format!("{}/v1/status/leader", consul.http_addr()))
        .send()
        .await
        .expect_err("wrong CA refused");
    assert!(
        format!("{err:?}").contains("UnknownIssuer") || format!("{err:?}").contains("certificate"),
        "{err:?}"
    );
    let plain = support::http_client();
    let http = consul.http_addr().replace("https://", "http://");
    let answer = plain.get(format!("{http}/v1/status/leader")).send().await;
    assert!(
        answer.map(|r| r.status().as_u16() != 200).unwrap_or(true),
        "plain HTTP must not work"
    );
}

#[test]
fn consul_script_says_how_to_provide_consul_when_it_cannot() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/consul.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("CONSUL_BIN", "/nonexistent/consul")
        .output()
        .expect("run");
    assert!(!out.status.success(), "must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CONSUL_BIN=/nonexistent/consul is not an executable file"),
        "{stderr}"
    );
    assert!(stderr.contains("how to provide Consul"), "{stderr}");
    assert!(stderr.contains("install Go"), "{stderr}");
}

#[test]
fn consul_script_answers_from_its_cache_the_second_time() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/consul.sh");
    let first = Command::new("bash")
        .arg(script)
        .env_remove("CONSUL_BIN")
        .output()
        .expect("run");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let t0 = Instant::now();
    let second = Command::new("bash")
        .arg(script)
        .env_remove("CONSUL_BIN")
        .output()
        .expect("run");
    assert!(second.status.success());
    assert_eq!(first.stdout, second.stdout, "same binary both times");
    assert!(
        second.stderr.is_empty(),
        "a cache hit builds nothing: {}",
        String::from_utf8_lossy(&second.stderr)
    );
    eprintln!("cache hit in {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_demo_app_with_0_even_with_an_open_watch() {
    let mut app = DemoApp::start(DemoAppOptions::default()).await;
    let mut client = HealthClient::new(channel(&app.addr()).await);
    let mut stream = client
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    assert!(stream.message().await.expect("first message").is_some());
    let status = app.terminate(5 * SECOND).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM: {status:?} (None = still running after 5 s)"
    );
    let end = stream
        .message()
        .await
        .expect_err("the stream ends with an error");
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
}
