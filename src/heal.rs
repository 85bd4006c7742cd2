//! Healing a drain that no termination follows. The kubelet runs the app's preStop hook (our
//! `/drain`) not only before deleting a pod but also before restarting an app container whose
//! liveness or startup probe failed; after such a restart nothing would ever put the instances back.
//!
//! The rule: after a drain that came from `/drain` (not from a signal), once the app's health
//! port has been seen gone (a TCP connection to it fails: the process is not there) and then
//! every instance's health service answers SERVING `successThreshold` times in a row, the app
//! has been restarted and serves again: the drain is cancelled and the instances registered
//! again. A pod being deleted never gets there: its app goes away and does not come back, and
//! SIGTERM (which makes a drain final) follows. An app that never goes away (an operator's manual
//! `/drain`) stays drained.
//!
//! The port is tried every [`POLL`], so a restart is noticed if the port stays closed longer than
//! that; a container restart (stop, remove, create, start, the app binding its port) takes longer.

use std::time::Duration;

use tokio::net::TcpStream;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::manifest::HealthSpec;
use crate::probe::{self, HealthRpc};

/// How often the app's health port is tried while a drain may heal.
pub const POLL: Duration = Duration::from_millis(200);

/// Resolves once every probe target (address and port) has been seen gone and then serving again
/// (every instance on it SERVING `successThreshold` times in a row). Runs until then: the caller
/// drops it when the drain becomes final.
pub async fn gone_and_back(specs: &[HealthSpec]) {
    let mut targets: Vec<(String, u16, Vec<&HealthSpec>)> = Vec::new();
    for spec in specs {
        match targets
            .iter_mut()
            .find(|(a, p, _)| *a == spec.address && *p == spec.port)
        {
            Some((_, _, instances)) => instances.push(spec),
            None => targets.push((spec.address.clone(), spec.port, vec![spec])),
        }
    }
    futures_util::future::join_all(
        targets
            .iter()
            .map(|(address, port, instances)| target_gone_and_back(address, *port, instances)),
    )
    .await;
}

async fn target_gone_and_back(address: &str, port: u16, instances: &[&HealthSpec]) {
    let connect_timeout = instances
        .iter()
        .map(|s| s.timeout)
        .min()
        .unwrap_or(Duration::from_secs(1));
    let needed = instances
        .iter()
        .map(|s| s.success_threshold.max(1))
        .max()
        .unwrap_or(1);
    let mut ticker = tokio::time::interval(POLL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let connected = tokio::time::timeout(connect_timeout, TcpStream::connect((address, port)))
            .await
            .is_ok_and(|r| r.is_ok());
        if !connected {
            tracing::info!(%address, port, "the app's health port is closed: the app went away; the drain heals if it comes back serving");
            break;
        }
    }
    let mut streak = 0;
    loop {
        ticker.tick().await;
        let mut all = true;
        for spec in instances {
            if !serving(spec).await {
                all = false;
                break;
            }
        }
        streak = if all { streak + 1 } else { 0 };
        if streak >= needed {
            tracing::info!(%address, port, "the app is back and serving");
            return;
        }
    }
}

/// One unary `Check` on a fresh connection: SERVING or not (any error counts as not).
async fn serving(spec: &HealthSpec) -> bool {
    let Ok(endpoint) = probe::endpoint_for(spec) else {
        return false;
    };
    let ask = async {
        let channel = endpoint.connect().await.ok()?;
        let answer = HealthRpc::new(channel)
            .check(HealthCheckRequest {
                service: spec.service.clone(),
            })
            .await
            .ok()?;
        Some(answer.into_inner().status == ServingStatus::Serving as i32)
    };
    matches!(
        tokio::time::timeout(spec.timeout * 2, ask).await,
        Ok(Some(true))
    )
}
