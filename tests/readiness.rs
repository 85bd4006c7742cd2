//! Readiness follows Consul (issue 19 item 1): `/readyz` answers 200 only while Consul holds the
//! instances passing for the probe's current verdict (the manifest's `readiness` rule says which
//! instances count), so that Kubernetes' rollout machinery and a Service in front of the pods see
//! what Consul's clients see. Against a real Consul agent, the real demo app and the real sidecar;
//! a Consul outage is made with a [`support::Valve`] in front of the agent.

mod support;

use std::time::Duration;

use support::sidecar::Sidecar;
use support::{ConsulAgent, DemoApp, DemoAppOptions, Valve, wait_until};

const SECOND: Duration = Duration::from_secs(1);

/// Two instances on the demo app: `hello-1` asks about the whole server (""), `greeter-1` about
/// `helloworld.Greeter`. `readiness` is the manifest's top-level rule, when given.
fn manifest(consul: &str, app_port: u16, readiness: Option<&str>) -> String {
    let readiness = readiness.map_or(String::new(), |r| format!("readiness: {r}\n"));
    format!(
        "consul:
  address: {consul}
  retry: {{initial: 50ms, max: 500ms}}
{readiness}drain:
  delay: 0s
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

/// `/readyz`'s status stays `want` for all of `period` (polled every 100 ms); the first other
/// answer (status and body) otherwise.
async fn stays(sidecar: &Sidecar, want: u16, period: Duration) -> Result<(), (u16, String)> {
    let until = std::time::Instant::now() + period;
    while std::time::Instant::now() < until {
        let (code, body) = sidecar.get("/readyz").await;
        if code != want {
            return Err((code, body));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

async fn becomes(sidecar: &Sidecar, want: u16, timeout: Duration) -> bool {
    wait_until(timeout, || async { sidecar.get("/readyz").await.0 == want }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_until_consul_holds_every_instance_passing_and_follows_each_verdict() {
    let consul = ConsulAgent::start_dev().await;
    // An app that does not serve yet: both instances are registered critical.
    let app = DemoApp::start(DemoAppOptions {
        start_serving: false,
        ..Default::default()
    })
    .await;
    let sidecar = Sidecar::start(&manifest(&consul.http_addr(), app.port(), None), &[]);
    assert!(
        wait_until(10 * SECOND, || async {
            consul.check_status("hello", "hello-1").await.as_deref() == Some("critical")
                && consul.check_status("greeter", "greeter-1").await.as_deref() == Some("critical")
        })
        .await,
        "not registered"
    );
    // Registered but critical: clients discover nothing here, so neither may Kubernetes.
    if let Err((code, body)) = stays(&sidecar, 503, 2 * SECOND).await {
        panic!("ready while every instance is critical in Consul: {code} {body}");
    }

    app.set_serving(true).await;
    assert!(
        becomes(&sidecar, 200, 5 * SECOND).await,
        "not ready once serving"
    );
    // Ready means Consul holds both passing, not merely that the probe passes.
    assert_eq!(
        consul.check_status("hello", "hello-1").await.as_deref(),
        Some("passing")
    );
    assert_eq!(
        consul.check_status("greeter", "greeter-1").await.as_deref(),
        Some("passing")
    );

    // One service NOT_SERVING: under the default rule (all) the pod is not ready, and says why.
    app.set_service_serving("helloworld.Greeter", false).await;
    assert!(becomes(&sidecar, 503, 3 * SECOND).await, "still ready");
    let (_, body) = sidecar.get("/readyz").await;
    assert!(
        body.contains("greeter-1"),
        "the reason names the instance: {body}"
    );
    app.set_service_serving("helloworld.Greeter", true).await;
    assert!(becomes(&sidecar, 200, 3 * SECOND).await, "not ready again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readiness_rule_any_or_registered_lets_a_service_be_not_serving() {
    let consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    app.set_service_serving("helloworld.Greeter", false).await;

    // any: one instance passing in Consul is enough.
    let any = Sidecar::start(&manifest(&consul.http_addr(), app.port(), Some("any")), &[]);
    assert!(
        becomes(&any, 200, 10 * SECOND).await,
        "readiness any: not ready with hello-1 passing\n{}",
        any.logs()
    );
    assert_eq!(
        consul.check_status("greeter", "greeter-1").await.as_deref(),
        Some("critical")
    );
    app.set_service_serving("", false).await;
    assert!(
        becomes(&any, 503, 3 * SECOND).await,
        "readiness any: ready with nothing passing"
    );
    drop(any);

    // registered: Consul holding every instance is enough, whatever its status.
    let consul2 = ConsulAgent::start_dev().await;
    let registered = Sidecar::start(
        &manifest(&consul2.http_addr(), app.port(), Some("registered")),
        &[],
    );
    assert!(
        becomes(&registered, 200, 10 * SECOND).await,
        "readiness registered: not ready with both registered critical\n{}",
        registered.logs()
    );
    assert_eq!(
        consul2.check_status("hello", "hello-1").await.as_deref(),
        Some("critical")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_consul_outage_the_pod_stays_ready_until_its_verdict_changes() {
    let consul = ConsulAgent::start_dev().await;
    let valve = Valve::start(
        format!("127.0.0.1:{}", consul.http_port())
            .parse()
            .expect("address"),
    )
    .await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let sidecar = Sidecar::start(&manifest(&valve.http_addr(), app.port(), None), &[]);
    assert!(becomes(&sidecar, 200, 10 * SECOND).await, "never ready");

    // Consul frozen: what it last acknowledged (passing) is still what clients see, and the
    // verdict has not changed: the pod stays in the Service.
    valve.shut();
    if let Err((code, body)) = stays(&sidecar, 200, 3 * SECOND).await {
        panic!("a Consul outage took the pod out: {code} {body}");
    }
    // The app stops serving meanwhile: out at once, although Consul could not be told.
    app.set_serving(false).await;
    assert!(
        becomes(&sidecar, 503, 3 * SECOND).await,
        "ready while the app does not serve"
    );
    // Consul back: it learns critical, then passing again with the app; ready again.
    valve.open();
    assert!(
        wait_until(10 * SECOND, || async {
            consul.check_status("hello", "hello-1").await.as_deref() == Some("critical")
        })
        .await
    );
    app.set_serving(true).await;
    assert!(becomes(&sidecar, 200, 10 * SECOND).await, "not ready again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_consul_lost_is_not_ready_until_it_is_back() {
    // Consul restarted empty: the instances are registered again at once; /readyz is 503 only
    // while Consul does not hold them (the readiness probe's two failures in a row ride it out).
    let mut consul = ConsulAgent::start_dev().await;
    let app = DemoApp::start(DemoAppOptions::default()).await;
    let sidecar = Sidecar::start(&manifest(&consul.http_addr(), app.port(), None), &[]);
    assert!(becomes(&sidecar, 200, 10 * SECOND).await, "never ready");
    consul.restart_wiped().await;
    assert!(
        wait_until(10 * SECOND, || async {
            consul.check_status("hello", "hello-1").await.as_deref() == Some("passing")
                && consul.check_status("greeter", "greeter-1").await.as_deref() == Some("passing")
        })
        .await,
        "not repaired"
    );
    assert!(becomes(&sidecar, 200, 5 * SECOND).await, "not ready again");
}
