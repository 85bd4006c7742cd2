//! TLS from the probe to the app: with `caFile`, with the system's CA bundle when there is none,
//! and without verification when `insecureSkipVerify` says so; for `run` and for `probe`. The app
//! is the demo app serving TLS with a certificate from a CA of its own (`consul tls`), which no
//! system bundle holds.

mod support;

use std::time::Duration;

use support::sidecar::{Sidecar, probe};
use support::{ConsulAgent, ConsulOptions, DemoApp, DemoAppOptions, wait_until};

const SECOND: Duration = Duration::from_secs(1);

fn manifest(consul: &str, app_port: u16, id: &str, tls: &str) -> String {
    format!(
        "consul:
  address: {consul}
services:
  - name: hello
    id: {id}
    address: 127.0.0.1
    port: {app_port}
    health:
      interval: 200ms
      timeout: 500ms
      tls:
{tls}
    check:
      ttl: 5s
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_verifies_with_the_ca_file_or_the_system_roots_or_not_at_all() {
    let certs = ConsulAgent::prepare(ConsulOptions {
        tls: true,
        ..Default::default()
    });
    let app = DemoApp::start(DemoAppOptions {
        tls: certs.server_cert(),
        ..Default::default()
    })
    .await;
    let ca = certs.ca_file().expect("CA").display().to_string();
    let addr = app.addr();

    let (code, text) = probe(&[
        "--addr",
        &addr,
        "--tls",
        "--tls-ca-cert",
        &ca,
        "--tls-server-name",
        "localhost",
    ]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = probe(&["--addr", &addr, "--tls", "--tls-no-verify"]);
    assert_eq!(code, Some(0), "--tls-no-verify: {text}");
    let (code, text) = probe(&["--addr", &addr, "--tls", "--tls-server-name", "localhost"]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("UnknownIssuer"),
        "the system roots do not know the app's CA, and the error must say so: {text}"
    );

    let consul = ConsulAgent::start_dev().await;
    let skip = Sidecar::start(
        &manifest(
            &consul.http_addr(),
            app.port(),
            "skip-1",
            "        insecureSkipVerify: true",
        ),
        &[],
    );
    let with_ca = Sidecar::start(
        &manifest(
            &consul.http_addr(),
            app.port(),
            "ca-1",
            &format!("        caFile: {ca}\n        serverName: localhost"),
        ),
        &[],
    );
    let system = Sidecar::start(
        &manifest(
            &consul.http_addr(),
            app.port(),
            "system-1",
            "        serverName: localhost",
        ),
        &[],
    );
    for (id, sidecar) in [("skip-1", &skip), ("ca-1", &with_ca)] {
        assert!(
            consul
                .wait_for_status("hello", id, "passing", 10 * SECOND)
                .await,
            "{id}: {}",
            sidecar.logs()
        );
    }
    assert_eq!(
        skip.logs().matches("insecureSkipVerify is on").count(),
        1,
        "{}",
        skip.logs()
    );
    assert!(
        wait_until(10 * SECOND, || async {
            let (_, status) = system.get("/status").await;
            status.contains("UnknownIssuer")
        })
        .await,
        "the probe error must name the certificate problem: {}",
        system.get("/status").await.1
    );
    assert_eq!(
        consul.check_status("hello", "system-1").await.as_deref(),
        Some("critical")
    );
}
