//! One ownership rule, applied by every path: an instance is ours iff Consul's copy carries
//! `managed-by=consul-registrar`. Against a real Consul agent, with foreign instances registered by
//! hand under IDs of the manifest: the TTL refresh that finds its check gone, an unwatched instance
//! waiting for a foreign one to go, the drain; and an instance adopted after a restart.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::sidecar::Sidecar;
use support::{ConsulAgent, DemoApp, DemoAppOptions, wait_until};

const SECOND: Duration = Duration::from_secs(1);

/// Two instances of `hello` on the demo app: `watched-0` keeps the one blocking query, `id` is
/// unwatched (read on alarm, every resync interval and when a TTL refresh gets 404).
fn manifest(consul: &str, app_port: u16, id: &str) -> String {
    let instance = |id: &str| {
        format!(
            "  - name: hello
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
    };
    format!(
        "consul:
  address: {consul}
  blockingWatches: 1
  retry:
    initial: 50ms
    max: 500ms
drain:
  delay: 0s
  deregisterTimeout: 3s
services:
{}{}",
        instance("watched-0"),
        instance(id)
    )
}

fn foreign(id: &str) -> Value {
    json!({"ID": id, "Name": "hello", "Port": 1, "Address": "127.0.0.9"})
}

async fn is_ours(consul: &ConsulAgent, id: &str) -> Option<bool> {
    consul
        .agent_service(id)
        .await
        .map(|s| s["Meta"]["managed-by"] == "consul-registrar")
}

async fn passing(consul: &ConsulAgent, id: &str, timeout: Duration) -> bool {
    consul
        .wait_for_status("hello", id, "passing", timeout)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_refresh_that_finds_its_check_gone_leaves_a_foreign_instance_alone() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let sidecar = Sidecar::start(&manifest(&consul.http_addr(), app.port(), "hello-2"), &[]);
    assert!(
        passing(&consul, "hello-2", 10 * SECOND).await,
        "{}",
        sidecar.logs()
    );

    // Someone else takes the ID over in one call; our check goes with our definition, so the next
    // TTL refresh (every ttl/3 = 1 s) gets 404.
    let status = consul
        .put(
            "/v1/agent/service/register?replace-existing-checks=true",
            &foreign("hello-2"),
        )
        .await
        .expect("register");
    assert_eq!(status, 200);
    assert!(
        wait_until(5 * SECOND, || async {
            sidecar
                .logs()
                .contains("not registered by consul-registrar")
        })
        .await,
        "{}",
        sidecar.logs()
    );
    tokio::time::sleep(2 * SECOND).await;
    let svc = consul.agent_service("hello-2").await.expect("still there");
    assert_eq!(
        svc["Port"], 1,
        "the foreign instance was overwritten: {svc}"
    );
    assert_eq!(is_ours(&consul, "hello-2").await, Some(false));
}

/// Our check deregistered alone (`PUT /v1/agent/check/deregister/:id`, an operator or a tool),
/// our service left: Consul counts a service without checks as passing, whatever the app says.
/// The next TTL refresh gets 404 and the instance is registered again, check included, at once;
/// and the sidecar's calls to Consul stay a handful, not a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_deregistered_alone_is_put_back_at_once_without_a_loop_of_calls() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let sidecar = Sidecar::start(&manifest(&consul.http_addr(), app.port(), "hello-2"), &[]);
    for id in ["watched-0", "hello-2"] {
        assert!(
            passing(&consul, id, 10 * SECOND).await,
            "{}",
            sidecar.logs()
        );
    }
    let calls = |m: &support::Metrics| m.sum("consul_registrar_consul_requests_total", None);
    let before = calls(&sidecar.metrics().await);
    for id in ["watched-0", "hello-2"] {
        let status = consul
            .put(
                &format!("/v1/agent/check/deregister/consul-registrar:{id}"),
                &json!(null),
            )
            .await
            .expect("deregister the check");
        assert_eq!(status, 200);
    }
    // The TTL (3 s) is refreshed every second: the 404 comes within one.
    tokio::time::sleep(3 * SECOND).await;
    for id in ["watched-0", "hello-2"] {
        let (_, checks) = consul.get("/v1/agent/checks").await.expect("agent checks");
        let check = checks.get(format!("consul-registrar:{id}")).cloned();
        assert!(
            check.as_ref().is_some_and(|c| c["Status"] == "passing"),
            "the check of {id} was not put back: {check:?}\n{}",
            sidecar.logs()
        );
    }
    let made = calls(&sidecar.metrics().await) - before;
    assert!(
        made < 100.0,
        "{made} calls to Consul in 3 s after a check was deregistered (a loop)\n{}",
        sidecar.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwatched_instance_registers_once_the_foreign_one_is_gone() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    consul.register_raw(foreign("hello-2")).await;
    let sidecar = Sidecar::start(&manifest(&consul.http_addr(), app.port(), "hello-2"), &[]);
    assert!(passing(&consul, "watched-0", 10 * SECOND).await);
    assert!(
        wait_until(5 * SECOND, || async {
            sidecar
                .logs()
                .contains("not registered by consul-registrar")
        })
        .await,
        "{}",
        sidecar.logs()
    );
    assert_eq!(is_ours(&consul, "hello-2").await, Some(false));

    consul.deregister_raw("hello-2").await;
    // A foreign instance is read again every max(retry.max, 10 s).
    assert!(
        passing(&consul, "hello-2", 15 * SECOND).await,
        "the unwatched instance never came back after the foreign one left\n{}",
        sidecar.logs()
    );
    assert_eq!(is_ours(&consul, "hello-2").await, Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_leaves_a_foreign_instance_alone() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    consul.register_raw(foreign("hello-2")).await;
    let mut sidecar = Sidecar::start(&manifest(&consul.http_addr(), app.port(), "hello-2"), &[]);
    assert!(passing(&consul, "watched-0", 10 * SECOND).await);

    sidecar.signal("TERM");
    let status = sidecar.wait_exit(10 * SECOND).expect("drains and exits");
    assert_eq!(status.code(), Some(0), "{}", sidecar.logs());
    assert_eq!(consul.agent_service("watched-0").await, None, "ours stays");
    let svc = consul
        .agent_service("hello-2")
        .await
        .expect("the drain deregistered an instance that is not ours");
    assert_eq!(svc["Port"], 1);
    assert!(
        sidecar.logs().contains("the drain leaves it alone"),
        "{}",
        sidecar.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_instance_is_repaired_without_a_critical_flap() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let text = manifest(&consul.http_addr(), app.port(), "hello-2");
    let first = Sidecar::start(&text, &[]);
    assert!(passing(&consul, "hello-2", 10 * SECOND).await);
    first.signal("KILL");
    drop(first);

    let second = Sidecar::start(&text, &[]);
    assert!(
        wait_until(5 * SECOND, || async {
            second.get("/readyz").await.0 == 200
        })
        .await,
        "{}",
        second.logs()
    );

    // Follow every catalog change of the instance's check from here on.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let watcher = {
        let seen = std::sync::Arc::clone(&seen);
        let client = consul.client();
        let url = format!("{}/v1/health/checks/hello", consul.http_addr());
        tokio::spawn(async move {
            let mut index = String::from("0");
            loop {
                let Ok(r) = client
                    .get(&url)
                    .query(&[("index", index.as_str()), ("wait", "5s")])
                    .send()
                    .await
                else {
                    continue;
                };
                if let Some(i) = r.headers().get("X-Consul-Index") {
                    index = i.to_str().unwrap_or("0").to_string();
                }
                let body: Value = r.json().await.unwrap_or(Value::Null);
                for c in body.as_array().into_iter().flatten() {
                    if c["ServiceID"] == "hello-2" {
                        let status = c["Status"].as_str().unwrap_or_default().to_string();
                        seen.lock().expect("lock").push(status);
                    }
                }
            }
        })
    };
    tokio::time::sleep(SECOND / 2).await;
    consul.deregister_raw("hello-2").await;
    assert!(
        passing(&consul, "hello-2", 5 * SECOND).await,
        "{}",
        second.logs()
    );
    tokio::time::sleep(SECOND / 2).await;
    watcher.abort();
    assert!(
        !seen.lock().expect("lock").iter().any(|s| s == "critical"),
        "the repair flapped the adopted instance critical: {:?}",
        seen.lock().expect("lock")
    );
    assert_eq!(
        second
            .metric(
                "consul_registrar_repairs_total{instance=\"hello-2\",reason=\"missing\",service=\"hello\"}"
            )
            .await,
        Some(1.0),
        "the repair of an adopted instance must count as one\n{}",
        second.logs()
    );
}
