//! `consul.login` against a real Consul with ACLs on (`default_policy = "deny"`) and a `jwt` auth
//! method (the test kit signs service-account-shaped JWTs): the same login, logout and binding
//! rules a `kubernetes` method serves. Both modes log in, register, follow flips and log out
//! after the drain (no login token left); a deleted token and a rotated bearer token file mean
//! a new login; a service the identity may not write is refused with a clear 403; each login
//! error a user hits says what to fix; no log line and no `/status` holds the token.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use support::jwt::{AUDIENCE, JwtIssuer, create_binding_rule, login_tokens, secret_of};
use support::sidecar::Sidecar;
use support::{ConsulAgent, ConsulOptions, DemoApp, DemoAppOptions, wait_until};

const SECOND: Duration = Duration::from_secs(1);
const METHOD: &str = "test-k8s-auth-method";
/// The node catalog-mode sessions live on.
const SESSIONS_NODE: &str = "consul-registrar--sessions";
const PAGE: &str = include_str!("../docs/acl-login.md");

/// What docs/acl-login.md binds for catalog mode beside the service identity: the first `hcl`
/// block of its section on logging in, so the page cannot drift from what works.
fn catalog_policy() -> &'static str {
    let section = PAGE
        .split("\n## ")
        .find(|s| s.starts_with("Logging in"))
        .expect("docs/acl-login.md has a section on logging in");
    let start = section.find("```hcl\n").expect("an hcl block") + "```hcl\n".len();
    let end = section[start..]
        .find("```")
        .expect("the hcl block is closed");
    &section[start..start + end]
}

/// A Consul with ACLs and the auth method: a `service` binding named after the service account
/// (as consul-k8s binds), and in catalog mode a `policy` binding for the virtual node's needs.
async fn consul_with_login(mode: &str) -> (ConsulAgent, JwtIssuer) {
    let consul = ConsulAgent::start_with(ConsulOptions {
        acl: true,
        ..Default::default()
    })
    .await;
    let issuer = JwtIssuer::new();
    issuer.create_auth_method(&consul, METHOD).await;
    create_binding_rule(&consul, METHOD, "service", "${value.service_account}", "").await;
    if mode == "catalog" {
        let status = consul
            .put(
                "/v1/acl/policy",
                &json!({"Name": "consul-registrar-catalog", "Rules": catalog_policy()}),
            )
            .await
            .expect("policy");
        assert_eq!(status, 200);
        create_binding_rule(&consul, METHOD, "policy", "consul-registrar-catalog", "").await;
    }
    (consul, issuer)
}

fn manifest(consul: &str, app_port: u16, mode: &str, service: &str, login: &str) -> String {
    format!(
        "consul:
  address: {consul}
  mode: {mode}
  login:
{login}
  retry:
    initial: 50ms
    max: 500ms
drain:
  delay: 0s
  deregisterTimeout: 3s
services:
  - name: {service}
    id: {service}-1
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

fn login_settings(method: &str, bearer: &Path) -> String {
    format!(
        "    authMethod: {method}\n    bearerTokenFile: {}\n    meta:\n      pod: hello-pod",
        bearer.display()
    )
}

/// Replaces `path` as the kubelet updates a projected token: a new file renamed over it.
fn write_bearer(path: &Path, token: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, token).expect("write the bearer token");
    std::fs::rename(&staged, path).expect("rename the bearer token");
}

async fn status_becomes(consul: &ConsulAgent, service: &str, want: Option<&str>) -> bool {
    consul
        .wait_for_status(service, &format!("{service}-1"), want, 10 * SECOND)
        .await
}

fn env(mode: &str) -> Vec<(&'static str, &'static str)> {
    if mode == "catalog" {
        vec![("NODE_NAME", "kube-a"), ("HOST_IP", "127.0.0.1")]
    } else {
        Vec::new()
    }
}

/// Log in, register, follow a flip each way, drain, log out: no login token left, no SecretID
/// in the log or in `/status`.
async fn logs_in_registers_and_logs_out(mode: &str) {
    let (consul, issuer) = consul_with_login(mode).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bearer = dir.path().join("token");
    write_bearer(&bearer, &issuer.service_account_token("hello", AUDIENCE, 1));
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let mut sidecar = Sidecar::start(
        &manifest(
            &consul.http_addr(),
            app.port(),
            mode,
            "hello",
            &login_settings(METHOD, &bearer),
        ),
        &env(mode),
    );
    assert!(
        status_becomes(&consul, "hello", Some("passing")).await,
        "no registration after a login\n{}",
        sidecar.logs()
    );
    let tokens = login_tokens(&consul, METHOD).await;
    assert_eq!(tokens.len(), 1, "one login, one token: {tokens:?}");
    let secret = secret_of(&consul, &tokens[0])
        .await
        .expect("the login token");
    let (_, token) = consul
        .get(&format!("/v1/acl/token/{}", tokens[0]))
        .await
        .expect("token");
    assert_eq!(
        token["Description"]
            .as_str()
            .map(|d| d.contains("hello-pod")),
        Some(true),
        "the login's meta: {token}"
    );

    app.set_serving(false).await;
    assert!(
        status_becomes(&consul, "hello", Some("critical")).await,
        "{}",
        sidecar.logs()
    );
    app.set_serving(true).await;
    assert!(
        status_becomes(&consul, "hello", Some("passing")).await,
        "{}",
        sidecar.logs()
    );
    let (_, status) = sidecar.get("/status").await;
    assert!(!status.contains(&secret), "the login token in /status");
    let (_, metrics) = sidecar.get("/metrics").await;
    assert!(!metrics.contains(&secret), "the login token in /metrics");

    let exit = sidecar.terminate(10 * SECOND).await;
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "{}", sidecar.logs());
    assert!(
        status_becomes(&consul, "hello", None).await,
        "{}",
        sidecar.logs()
    );
    assert_eq!(
        login_tokens(&consul, METHOD).await,
        Vec::<String>::new(),
        "a login token was left behind\n{}",
        sidecar.logs()
    );
    let logs = sidecar.logs();
    assert!(logs.contains("logged in to Consul"), "{logs}");
    assert!(logs.contains("logged out of Consul"), "{logs}");
    assert!(!logs.contains(&secret), "the login token reached the log");
    assert!(!logs.contains("HTTP 403"), "a call was refused:\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_mode_logs_in_registers_and_logs_out() {
    logs_in_registers_and_logs_out("agent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_mode_logs_in_registers_and_logs_out() {
    logs_in_registers_and_logs_out("catalog").await;
}

/// The login token deleted in Consul (or expired): the next call gets 403 "ACL not found", the
/// sidecar logs in again and the instance follows the app on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_login_token_means_a_new_login() {
    let (consul, issuer) = consul_with_login("agent").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bearer = dir.path().join("token");
    write_bearer(&bearer, &issuer.service_account_token("hello", AUDIENCE, 1));
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let sidecar = Sidecar::start(
        &manifest(
            &consul.http_addr(),
            app.port(),
            "agent",
            "hello",
            &login_settings(METHOD, &bearer),
        ),
        &[],
    );
    assert!(
        status_becomes(&consul, "hello", Some("passing")).await,
        "{}",
        sidecar.logs()
    );
    let first = login_tokens(&consul, METHOD).await;
    assert_eq!(first.len(), 1);
    let old_secret = secret_of(&consul, &first[0]).await.expect("secret");
    let r = consul
        .client()
        .delete(format!("{}/v1/acl/token/{}", consul.http_addr(), first[0]))
        .send()
        .await
        .expect("delete the login token");
    assert!(r.status().is_success());

    app.set_serving(false).await;
    assert!(
        status_becomes(&consul, "hello", Some("critical")).await,
        "no new login after the token was deleted: {:#}\n{}",
        serde_json::Value::Array(consul.health_service("hello").await),
        sidecar.logs()
    );
    let now = login_tokens(&consul, METHOD).await;
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, first);
    let new_secret = secret_of(&consul, &now[0]).await.expect("secret");
    app.set_serving(true).await;
    assert!(
        status_becomes(&consul, "hello", Some("passing")).await,
        "{}",
        sidecar.logs()
    );
    let logs = sidecar.logs();
    assert!(logs.contains("logging in again"), "{logs}");
    assert!(!logs.contains(&old_secret) && !logs.contains(&new_secret));
}

/// A rotated projected token (a new bearer token file): a new login, the instance registered
/// again under the new token, both tokens logged out after the drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_bearer_token_file_means_a_new_login() {
    let (consul, issuer) = consul_with_login("agent").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bearer = dir.path().join("token");
    write_bearer(&bearer, &issuer.service_account_token("hello", AUDIENCE, 1));
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let mut sidecar = Sidecar::start(
        &manifest(
            &consul.http_addr(),
            app.port(),
            "agent",
            "hello",
            &login_settings(METHOD, &bearer),
        ),
        &[],
    );
    assert!(
        status_becomes(&consul, "hello", Some("passing")).await,
        "{}",
        sidecar.logs()
    );
    let first = login_tokens(&consul, METHOD).await;
    assert_eq!(first.len(), 1);
    // The file's modification time must move: a second apart at least on coarse file systems.
    tokio::time::sleep(1100 * Duration::from_millis(1)).await;
    write_bearer(&bearer, &issuer.service_account_token("hello", AUDIENCE, 2));
    assert!(
        wait_until(10 * SECOND, || async {
            let now = login_tokens(&consul, METHOD).await;
            now.len() == 2 && now.contains(&first[0])
        })
        .await,
        "no new login after the bearer token file changed: {:?}\n{}",
        login_tokens(&consul, METHOD).await,
        sidecar.logs()
    );
    app.set_serving(false).await;
    assert!(
        status_becomes(&consul, "hello", Some("critical")).await,
        "{}",
        sidecar.logs()
    );
    // The old token is logged out after the drain with the new one (or at the next rotation).
    let exit = sidecar.terminate(10 * SECOND).await;
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "{}", sidecar.logs());
    assert_eq!(
        login_tokens(&consul, METHOD).await,
        Vec::<String>::new(),
        "{}",
        sidecar.logs()
    );
    let logs = sidecar.logs();
    assert!(
        logs.contains("the bearer token file changed: logged in again"),
        "{logs}"
    );
}

/// The identity (service account `hello`) may write only `hello`: a manifest naming `billing`
/// gets a 403 that names the permission, and nothing is registered. In catalog mode the
/// registration is a transaction, whose refusal Consul answers 409 ("Permission denied" inside):
/// the user still gets a permission error and its hint, not "fix the manifest".
async fn a_service_the_identity_may_not_write_is_refused_clearly(mode: &str) {
    let (consul, issuer) = consul_with_login(mode).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let bearer = dir.path().join("token");
    write_bearer(&bearer, &issuer.service_account_token("hello", AUDIENCE, 1));
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let mut sidecar = Sidecar::start(
        &manifest(
            &consul.http_addr(),
            app.port(),
            mode,
            "billing",
            &login_settings(METHOD, &bearer),
        ),
        &env(mode),
    );
    // Agent mode: the agent's 403. Catalog mode: the registration transaction's 409, whose JSON
    // body escapes the quotes around the service's name.
    let (status, denied) = match mode {
        "agent" => (
            "HTTP 403",
            "lacks permission 'service:write' on \"billing\"",
        ),
        _ => (
            "HTTP 409",
            "lacks permission 'service:write' on \\\"billing\\\"",
        ),
    };
    let refusal = format!("({status}, permission denied");
    assert!(
        wait_until(10 * SECOND, || async {
            let logs = sidecar.logs();
            logs.contains(&refusal) && logs.contains(denied) && logs.contains("it needs")
        })
        .await,
        "no clear refusal ({refusal} ... {denied})\n{}",
        sidecar.logs()
    );
    assert!(consul.catalog_service("billing").await.is_empty());
    assert_eq!(sidecar.get("/readyz").await.0, 503);
    let metrics = sidecar.get("/metrics").await.1;
    let denied_total = metrics
        .lines()
        .find_map(|l| l.strip_prefix("consul_registrar_consul_denied_total "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    assert!(
        denied_total.is_some_and(|n| n >= 1.0),
        "the refusal is not counted as denied ({denied_total:?}):\n{metrics}"
    );
    // Stopped (a pod deleted): nothing was registered, so there is nothing the refused token must
    // remove. The drain succeeds rather than retrying the refused deregistration until its
    // deadline (which holds a pod for its whole grace period), and in catalog mode its session
    // and liveness key go with it rather than waiting out the session's TTL.
    let exit = sidecar.terminate(10 * SECOND).await;
    let logs = sidecar.logs();
    assert!(
        logs.contains("drained: every instance is deregistered")
            && !logs.contains("deregistration failed"),
        "the drain of an instance that was never registered did not succeed:\n{logs}"
    );
    assert_eq!(exit.and_then(|s| s.code()), Some(0), "{logs}");
    if mode == "catalog" {
        assert_eq!(
            consul.sessions_on(SESSIONS_NODE).await,
            Vec::<serde_json::Value>::new(),
            "a session left after the drain\n{logs}"
        );
        assert_eq!(
            consul.kv_keys("consul-registrar/").await,
            Vec::<String>::new(),
            "a liveness key left after the drain\n{logs}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_mode_refuses_a_service_the_identity_may_not_write_clearly() {
    a_service_the_identity_may_not_write_is_refused_clearly("agent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catalog_mode_refuses_a_service_the_identity_may_not_write_clearly() {
    a_service_the_identity_may_not_write_is_refused_clearly("catalog").await;
}

/// Each login error a user hits says what to fix: the auth method missing (named), the bearer
/// token file missing (its path), a wrong audience, no binding rule matching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_errors_say_what_to_fix() {
    let (consul, issuer) = consul_with_login("agent").await;
    // A second method whose only binding rule matches no one.
    issuer.create_auth_method(&consul, "picky").await;
    create_binding_rule(
        &consul,
        "picky",
        "service",
        "${value.service_account}",
        "value.service_account == \"nobody\"",
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("token");
    write_bearer(&good, &issuer.service_account_token("hello", AUDIENCE, 1));
    let wrong_audience = dir.path().join("wrong-audience");
    write_bearer(
        &wrong_audience,
        &issuer.service_account_token("hello", "https://kubernetes.default.svc", 1),
    );
    let missing = dir.path().join("no-such-token");
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let cases = [
        (
            "no-such-method",
            good.clone(),
            "Consul has no auth method named \"no-such-method\"".to_string(),
        ),
        (
            METHOD,
            missing.clone(),
            format!("cannot read the bearer token file {}", missing.display()),
        ),
        (
            METHOD,
            wrong_audience,
            "the bearer token's audience is not one the auth method accepts".to_string(),
        ),
        (
            "picky",
            good,
            "no binding rule of the auth method matched this bearer token".to_string(),
        ),
    ];
    for (method, bearer, message) in cases {
        let sidecar = Sidecar::start(
            &manifest(
                &consul.http_addr(),
                app.port(),
                "agent",
                "hello",
                &login_settings(method, &bearer),
            ),
            &[],
        );
        assert!(
            wait_until(10 * SECOND, || async { sidecar.logs().contains(&message) }).await,
            "expected {message:?}\n{}",
            sidecar.logs()
        );
        assert!(
            sidecar.logs().contains(&format!(
                "cannot log in to Consul with the auth method {method:?}"
            )),
            "{}",
            sidecar.logs()
        );
        assert!(consul.catalog_service("hello").await.is_empty());
    }
}
