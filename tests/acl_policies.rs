//! The ACL policies docs/acl-login.md prints, exactly as a user copies them: for each mode, a token
//! with only that policy lets a sidecar register its instance, follow the app's health and drain
//! it, against a Consul with ACLs on and `default_policy = "deny"`. The HCL is read from the page
//! itself, so the page cannot drift from what works.

mod support;

use std::time::Duration;

use serde_json::json;
use support::sidecar::Sidecar;
use support::{ConsulAgent, ConsulOptions, DemoApp, DemoAppOptions};

const SECOND: Duration = Duration::from_secs(1);
const PAGE: &str = include_str!("../docs/acl-login.md");

/// The first `hcl` code block of the section `## {heading}` of docs/acl-login.md.
fn documented_policy(heading: &str) -> &'static str {
    let section = PAGE
        .split("\n## ")
        .find(|s| s.starts_with(heading))
        .unwrap_or_else(|| panic!("docs/acl-login.md has no section '## {heading}'"));
    let start = section
        .find("```hcl\n")
        .unwrap_or_else(|| panic!("the section '## {heading}' has no hcl block"))
        + "```hcl\n".len();
    let end = section[start..]
        .find("```")
        .expect("the hcl block is closed");
    &section[start..start + end]
}

/// A policy `name` with `rules` and a token for it whose SecretID is `secret`.
async fn create_token(consul: &ConsulAgent, name: &str, rules: &str, secret: &str) {
    let status = consul
        .put("/v1/acl/policy", &json!({"Name": name, "Rules": rules}))
        .await
        .expect("create policy");
    assert_eq!(
        status, 200,
        "Consul refused the documented policy {name}:\n{rules}"
    );
    let status = consul
        .put(
            "/v1/acl/token",
            &json!({"SecretID": secret, "Description": name, "Policies": [{"Name": name}]}),
        )
        .await
        .expect("create token");
    assert_eq!(status, 200, "token {name}");
}

/// A manifest for instance `hello-1` of service `hello` (the service the page's policies name).
fn manifest(consul: &str, app_port: u16, mode: &str) -> String {
    format!(
        "consul:
  address: {consul}
  mode: {mode}
  retry:
    initial: 50ms
    max: 500ms
drain:
  delay: 0s
  deregisterTimeout: 3s
services:
  - name: hello
    id: hello-1
    address: 127.0.0.1
    port: {app_port}
    health:
      service: helloworld.Greeter
      interval: 200ms
      timeout: 200ms
      failureThreshold: 1
"
    )
}

async fn status_becomes(consul: &ConsulAgent, want: Option<&str>, timeout: Duration) -> bool {
    consul
        .wait_for_status("hello", "hello-1", want, timeout)
        .await
}

/// Register, follow a flip each way, drain: every call a sidecar of `mode` makes in its life.
async fn the_documented_policy_suffices(mode: &str, heading: &str, env: &[(&str, &str)]) {
    let consul = ConsulAgent::start_with(ConsulOptions {
        acl: true,
        ..Default::default()
    })
    .await;
    let secret = "3d1f0c6e-58a2-4b9e-9f41-2c7a6e0b5d93";
    let name = format!("documented-{mode}-mode");
    create_token(&consul, &name, documented_policy(heading), secret).await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let env = [env, &[("CONSUL_HTTP_TOKEN", secret)]].concat();
    let mut sidecar = Sidecar::start(&manifest(&consul.http_addr(), app.port(), mode), &env);

    assert!(
        status_becomes(&consul, Some("passing"), 10 * SECOND).await,
        "the policy of '## {heading}' does not let the sidecar register\n{}",
        sidecar.logs()
    );
    app.set_serving(false).await;
    assert!(
        status_becomes(&consul, Some("critical"), 5 * SECOND).await,
        "the policy does not let the sidecar report a status\n{}",
        sidecar.logs()
    );
    app.set_serving(true).await;
    assert!(
        status_becomes(&consul, Some("passing"), 5 * SECOND).await,
        "{}",
        sidecar.logs()
    );
    let exit = sidecar.terminate(10 * SECOND).await;
    assert_eq!(
        exit.and_then(|s| s.code()),
        Some(0),
        "the drain did not finish cleanly\n{}",
        sidecar.logs()
    );
    assert!(
        status_becomes(&consul, None, 5 * SECOND).await,
        "the policy does not let the sidecar deregister\n{}",
        sidecar.logs()
    );
    let logs = sidecar.logs();
    assert!(
        !logs.contains("HTTP 403") && !logs.contains("may not read the agent"),
        "a call was refused under the documented policy:\n{logs}"
    );
    assert!(!logs.contains(secret), "the token reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_agent_mode_policy_suffices() {
    the_documented_policy_suffices("agent", "Agent mode", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_catalog_mode_policy_suffices() {
    the_documented_policy_suffices(
        "catalog",
        "Catalog mode",
        &[("NODE_NAME", "kube-a"), ("HOST_IP", "127.0.0.1")],
    )
    .await;
}

/// A token that may write the liveness keys but not the service's reaper key (a policy narrower
/// than the documented one): the sidecar registers and follows health, but cannot stand as its
/// service's reaper. It says so in a warning (nobody reaps that service's crashed pods), and asks
/// for the key every 0.8–1 × sessionTTL (10 s here), not in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reaper_key_the_token_may_not_take_is_asked_for_every_session_ttl_and_warned() {
    let consul = ConsulAgent::start_with(ConsulOptions {
        acl: true,
        ..Default::default()
    })
    .await;
    let secret = "8e2b4f1a-6c3d-4e5f-9a0b-1c2d3e4f5a6b";
    let rules = format!(
        "{}key_prefix \"consul-registrar/instances/.reaper/\" {{ policy = \"read\" }}\n",
        documented_policy("Catalog mode")
    );
    create_token(&consul, "no-reaper-key", &rules, secret).await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let sidecar = Sidecar::start(
        &manifest(&consul.http_addr(), app.port(), "catalog"),
        &[
            ("NODE_NAME", "kube-a"),
            ("HOST_IP", "127.0.0.1"),
            ("CONSUL_HTTP_TOKEN", secret),
        ],
    );
    assert!(
        status_becomes(&consul, Some("passing"), 10 * SECOND).await,
        "{}",
        sidecar.logs()
    );
    let reaper_key_calls = |m: &support::Metrics| {
        m.sum(
            "consul_registrar_consul_requests_total",
            Some(("operation", "reaper_key")),
        )
    };
    let before = reaper_key_calls(&sidecar.metrics().await);
    tokio::time::sleep(12 * SECOND).await;
    let asked = reaper_key_calls(&sidecar.metrics().await) - before;
    // One read and one refused take per try: at most two tries in 12 s.
    assert!(
        asked <= 4.0,
        "{asked} reaper-key calls in 12 s after a refusal (expected one read and one take every 8-10 s)\n{}",
        sidecar.logs()
    );
    let logs = sidecar.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("reaper key") && l.contains("403")),
        "the refused reaper key was not warned about:\n{logs}"
    );
}
