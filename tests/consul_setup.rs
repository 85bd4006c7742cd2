//! How the sidecar copes with how it reaches Consul, against real Consul agents: a request Consul
//! refuses (400) is not retried every second; plain HTTP needs no CA bundle and HTTPS without one
//! says what to set; an address over several agents stops the sidecar with exit code 78; a
//! rotated token file is picked up without a restart.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use support::sidecar::Sidecar;
use support::{ConsulAgent, ConsulOptions, DemoApp, DemoAppOptions, wait_until};

const SECOND: Duration = Duration::from_secs(1);

fn manifest(consul: &str, app_port: u16, id: &str, extra: &str) -> String {
    format!(
        "consul:
  address: {consul}
  retry:
    initial: 50ms
    max: 200ms
{extra}
drain:
  delay: 0s
  deregisterTimeout: 2s
services:
  - name: hello
    id: {id}
    address: 127.0.0.1
    port: {app_port}
    health:
      interval: 200ms
      timeout: 200ms
    check:
      ttl: 3s
"
    )
}

async fn passing(consul: &ConsulAgent, id: &str, timeout: Duration) -> bool {
    consul
        .wait_for_status("hello", id, "passing", timeout)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_consul_refuses_is_logged_once_shown_and_not_retried_every_second() {
    // Consul CE refuses the `ns` parameter: "Namespaces are a Consul Enterprise feature" (400).
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let sidecar = Sidecar::start(
        &manifest(
            &consul.http_addr(),
            app.port(),
            "hello-1",
            "  namespace: team-a",
        ),
        &[],
    );
    let refused = "consul_registrar_consul_refused_total{instance=\"hello-1\",service=\"hello\"}";
    assert!(
        wait_until(5 * SECOND, || async {
            sidecar.metric(refused).await.unwrap_or(0.0) >= 1.0
        })
        .await,
        "{}",
        sidecar.logs()
    );
    // With retry.max 200 ms an ordinary error is retried ~15 times in 3 s; a refusal once a
    // resync interval (1 m).
    tokio::time::sleep(3 * SECOND).await;
    let calls = sidecar
        .metric("consul_registrar_consul_requests_total{operation=\"read_service\",status=\"4xx\"}")
        .await
        .unwrap_or(0.0);
    assert!(calls <= 2.0, "a refused request was retried {calls} times");
    assert_eq!(sidecar.metric(refused).await, Some(1.0));
    let logs = sidecar.logs();
    assert_eq!(
        logs.matches("Consul refused the request").count(),
        1,
        "{logs}"
    );
    assert!(
        logs.contains("Namespaces are a Consul Enterprise feature"),
        "{logs}"
    );
    let (_, status) = sidecar.get("/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).expect("status JSON");
    let consul_status = &status["instances"][0]["consul"];
    assert_eq!(consul_status["refused"], true, "{status}");
    assert!(
        consul_status["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("HTTP 400") && e.contains("Enterprise")),
        "{status}"
    );
}

/// A CA bundle location that holds nothing, as in a distroless or scratch image.
fn without_ca_bundle(dir: &std::path::Path) -> [(String, String); 2] {
    let empty_file = dir.join("empty.pem");
    std::fs::write(&empty_file, "").expect("write");
    let empty_dir = dir.join("certs");
    std::fs::create_dir_all(&empty_dir).expect("mkdir");
    [
        ("SSL_CERT_FILE".into(), empty_file.display().to_string()),
        ("SSL_CERT_DIR".into(), empty_dir.display().to_string()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_needs_no_ca_bundle_and_https_without_one_names_the_fix() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env = without_ca_bundle(dir.path());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();

    let plain = Sidecar::start(
        &manifest(&consul.http_addr(), app.port(), "hello-1", ""),
        &env,
    );
    assert!(
        passing(&consul, "hello-1", 10 * SECOND).await,
        "plain HTTP failed without a CA bundle\n{}",
        plain.logs()
    );

    let https = format!("https://127.0.0.1:{}", support::free_port());
    let mut tls = Sidecar::start(&manifest(&https, app.port(), "hello-2", ""), &env);
    let status = tls.wait_exit(10 * SECOND).expect("stops at start-up");
    assert_eq!(status.code(), Some(1));
    let logs = tls.logs();
    assert!(
        logs.contains("no CA certificates were found") && logs.contains("CONSUL_CACERT"),
        "{logs}"
    );
    assert!(!logs.contains("builder error"), "{logs}");
}

/// A round-robin TCP proxy on loopback: each new connection goes to the next backend.
fn round_robin_proxy(backends: Vec<u16>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let next = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let backend = backends[next.fetch_add(1, Ordering::SeqCst) % backends.len()];
            let Ok(server) = TcpStream::connect(("127.0.0.1", backend)) else {
                continue;
            };
            for (mut from, mut to) in [
                (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                ),
                (server, client),
            ] {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                });
            }
        }
    });
    port
}

// The proxy, like any L4 load balancer, routes per connection: the identity check opens a
// connection of its own each time, so it reaches the other agent too (over a pooled keep-alive
// connection it could keep landing on the same one, and the sidecar never stopped). At start-up it
// asks over two connections before anything is registered: waiting for an instance to go missing
// was a race the sidecar could lose for good (registered on both agents, nothing missing again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_over_several_agents_stops_the_sidecar_with_exit_code_78() {
    let a = ConsulAgent::start_dev().await;
    let b = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let proxy = round_robin_proxy(vec![a.http_port(), b.http_port()]);
    let mut sidecar = Sidecar::start(
        &manifest(
            &format!("http://127.0.0.1:{proxy}"),
            app.port(),
            "hello-1",
            "",
        ),
        &[],
    );
    let status = sidecar
        .wait_exit(30 * SECOND)
        .expect("the sidecar must stop when calls reach different agents");
    let logs = sidecar.logs();
    assert_eq!(status.code(), Some(78), "{logs}");
    assert!(
        logs.contains("reached different Consul agents")
            && logs.contains("consul.mode: catalog")
            && logs.contains("register through the servers' catalog"),
        "{logs}"
    );
    for agent in [&a, &b] {
        let (_, services) = agent.get("/v1/agent/services").await.expect("services");
        assert!(
            services.get("hello-1").is_none(),
            "nothing may be registered on an address over several agents: {services}\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_token_file_is_picked_up_without_a_restart() {
    let consul = ConsulAgent::start_with(ConsulOptions {
        acl: true,
        ..Default::default()
    })
    .await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    // Two tokens with the registrar's policy: the pod starts with the first.
    let old = "11111111-2222-4333-8444-555555555555";
    let new = "66666666-7777-4888-9999-aaaaaaaaaaaa";
    for secret in [old, new] {
        let token = json!({"SecretID": secret, "Policies": [{"Name": "registrar"}]});
        assert_eq!(
            consul.put("/v1/acl/token", &token).await.expect("token"),
            200
        );
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, old).expect("write");
    let sidecar = Sidecar::start(
        &manifest(
            &consul.http_addr(),
            app.port(),
            "hello-1",
            &format!("  tokenFile: {}", token_file.display()),
        ),
        &[],
    );
    assert!(
        passing(&consul, "hello-1", 10 * SECOND).await,
        "{}",
        sidecar.logs()
    );

    // Rotate: the old token is deleted in Consul, the Secret's file is replaced (as the kubelet
    // does, by renaming a new file over it).
    let me: serde_json::Value = support::http_client()
        .get(format!("{}/v1/acl/token/self", consul.http_addr()))
        .header("X-Consul-Token", old)
        .send()
        .await
        .expect("token self")
        .json()
        .await
        .expect("token JSON");
    let accessor = me["AccessorID"].as_str().expect("accessor").to_string();
    let r = consul
        .client()
        .delete(format!("{}/v1/acl/token/{accessor}", consul.http_addr()))
        .send()
        .await
        .expect("delete token");
    assert!(r.status().is_success());
    let staged = dir.path().join("token.new");
    std::fs::write(&staged, new).expect("write");
    std::fs::rename(&staged, &token_file).expect("rename");

    // The next TTL refresh gets 403, the file is read again, the retry succeeds; a health change
    // reaches Consul with the new token.
    app.set_serving(false).await;
    assert!(
        wait_until(10 * SECOND, || async {
            consul.check_status("hello", "hello-1").await.as_deref() == Some("critical")
        })
        .await,
        "{}",
        sidecar.logs()
    );
    app.set_serving(true).await;
    assert!(
        passing(&consul, "hello-1", 10 * SECOND).await,
        "{}",
        sidecar.logs()
    );
    assert!(
        wait_until(5 * SECOND, || async {
            sidecar.get("/readyz").await.0 == 200
        })
        .await
    );
    let logs = sidecar.logs();
    assert!(logs.contains("the token file changed"), "{logs}");
    assert!(
        !logs.contains(old) && !logs.contains(new),
        "a token in the log"
    );
}
