//! Every Prometheus series the sidecar exports, named and documented in one place.
//!
//! Labels are bounded: the service name and instance id come from the manifest, operations and
//! outcomes are fixed sets. Error text never becomes a label. The metrics table of
//! docs/metrics.md mirrors this file.
//!
//! Series that alerts watch exist from the start, at 0 (each instance's, from
//! [`Metrics::expect_instance`]; catalog mode's session renewals, from
//! [`Metrics::expect_session_renewals`]): Prometheus's `increase()` sees a counter's first
//! increment only when the series was scraped before it, and `== 0` never fires on a series
//! that does not exist (an instance that was never registered).

use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// `drains_total`'s outcomes.
pub const DRAIN_OUTCOMES: [&str; 2] = ["drained", "failed"];
/// Why `/drain` refused a request (`admin_requests_refused_total{endpoint="drain"}`).
pub const DRAIN_REFUSAL_REASONS: [&str; 4] = [
    "missing_token",
    "wrong_token",
    "token_unreadable",
    "not_loopback",
];
/// `repairs_total`'s reasons.
pub const REPAIR_REASONS: [&str; 2] = ["missing", "changed"];
/// `shared_session_beats_total`'s outcomes.
pub const SHARED_SESSION_BEAT_OUTCOMES: [&str; 3] = ["ok", "rejected", "error"];

/// `session_renewals_total`'s outcomes.
pub const SESSION_RENEWAL_OUTCOMES: [&str; 3] = ["ok", "lost", "error"];

/// Buckets for things that should take milliseconds (probe RPCs, Consul calls, sync lag).
const FAST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The sidecar's metrics and the registry that serves them.
pub struct Metrics {
    registry: Registry,
    /// `consul_registrar_probe_results_total{service,instance,outcome}`: probe observations by
    /// outcome: `serving`, `not_serving`, `service_unknown`, `error`, `timeout`.
    pub probe_results: IntCounterVec,
    /// `consul_registrar_probe_duration_seconds{service,instance}`: unary `Check` round trips and
    /// the time to open a `Watch` stream.
    pub probe_duration: HistogramVec,
    /// `consul_registrar_health_transitions_total{service,instance,to}`: probe verdict changes,
    /// `to` = `passing` or `critical`.
    pub health_transitions: IntCounterVec,
    /// `consul_registrar_instance_healthy{service,instance}`: 1 when the probe verdict is passing.
    pub instance_healthy: IntGaugeVec,
    /// `consul_registrar_instance_registered{service,instance}`: 1 while Consul has the instance as
    /// the sidecar last wrote it.
    pub instance_registered: IntGaugeVec,
    /// `consul_registrar_consul_requests_total{operation,status}`: Consul API calls by operation
    /// (`register`, `update_ttl`, `deregister`, `read_service`, `watch_service`, `leader`, `agent_self`) and
    /// status class (`2xx`, `4xx`, `5xx`, `error` for no HTTP answer).
    pub consul_requests: IntCounterVec,
    /// `consul_registrar_consul_denied_total`: Consul calls answered 403 (ACL: the token is
    /// unknown or its policy lacks a permission the call needs; the log names the permission).
    pub consul_denied: IntCounter,
    /// `consul_registrar_consul_refused_total{service,instance}`: steps that failed because Consul
    /// refused the request as malformed (HTTP 400 and other 4xx but 403/404/429); such a step is
    /// retried once per `resyncInterval`.
    pub consul_refused: IntCounterVec,
    /// `consul_registrar_consul_request_duration_seconds{operation}` (blocking watches excluded).
    pub consul_request_duration: HistogramVec,
    /// `consul_registrar_repairs_total{service,instance,reason}`: instances put back in Consul,
    /// `reason` = `missing` (Consul lost it) or `changed` (its definition differed).
    pub repairs: IntCounterVec,
    /// `consul_registrar_sync_lag_seconds`: from a probe verdict change to Consul acknowledging it.
    pub sync_lag: Histogram,
    /// `consul_registrar_consul_reachable`: 1 when the last Consul call got an HTTP answer.
    pub consul_reachable: IntGauge,
    /// `consul_registrar_draining`: 1 from the start of a drain until it heals (or the end).
    pub draining: IntGauge,
    /// `consul_registrar_drains_total{outcome}`: finished drains, `outcome` = `drained` (every
    /// instance deregistered) or `failed` (instances left in Consul when the deadline came).
    pub drains: IntCounterVec,
    /// `consul_registrar_drains_healed_total`: drains from `/drain` cancelled because the app was
    /// restarted and serves again (a liveness or startup probe restart, see `heal.rs`).
    pub drains_healed: IntCounter,
    /// `consul_registrar_admin_requests_refused_total{endpoint,reason}`: admin requests refused
    /// with 403; `endpoint` = `drain`, `reason` = `missing_token`, `wrong_token`,
    /// `token_unreadable` (the token file could not be read) or `not_loopback` (no token is
    /// configured and the peer is not on loopback).
    pub admin_refused: IntCounterVec,
    /// `consul_registrar_reaped_total`: instances of other (gone) sidecars this one removed in
    /// catalog mode, because their session expired.
    pub reaped: IntCounter,
    /// `consul_registrar_session_renewals_total{outcome}`: catalog mode's session renewals by
    /// outcome: `ok`, `lost` (Consul no longer had the session), `error` (no answer).
    pub session_renewals: IntCounterVec,
    /// `consul_registrar_shared_session_beats_total{outcome}`: a peer's heartbeats to the holder
    /// of its virtual node's shared session: `ok`, `rejected` (the holder answered no: it drains,
    /// or holds another session) or `error` (no answer).
    pub shared_session_beats: IntCounterVec,
    /// `consul_registrar_shared_session_peers`: on the holder of a shared session, the pods whose
    /// keys it holds for them.
    pub shared_session_peers: IntGauge,
    /// `consul_registrar_shared_session_released_total`: liveness keys the holder deleted because
    /// their pod stopped heartbeating (its instances are then reaped).
    pub shared_session_released: IntCounter,
    /// `consul_registrar_build_info{version}`: always 1.
    pub build_info: IntGaugeVec,
}

impl Metrics {
    /// Creates the series and a registry holding them plus the standard `process_*` metrics.
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let m = Metrics {
            probe_results: counter_vec(
                "probe_results_total",
                "Probe observations by outcome.",
                &["service", "instance", "outcome"],
            ),
            probe_duration: histogram_vec(
                "probe_duration_seconds",
                "Duration of health Check RPCs and of opening Watch streams.",
                &["service", "instance"],
            ),
            health_transitions: counter_vec(
                "health_transitions_total",
                "Changes of the probe verdict.",
                &["service", "instance", "to"],
            ),
            instance_healthy: gauge_vec(
                "instance_healthy",
                "1 when the instance's probe verdict is passing, 0 when critical.",
                &["service", "instance"],
            ),
            instance_registered: gauge_vec(
                "instance_registered",
                "1 while Consul holds the instance as the sidecar last wrote it.",
                &["service", "instance"],
            ),
            consul_requests: counter_vec(
                "consul_requests_total",
                "Consul HTTP API requests by operation and status class.",
                &["operation", "status"],
            ),
            consul_denied: IntCounter::new(
                "consul_registrar_consul_denied_total",
                "Consul HTTP API requests answered 403 (ACL).",
            )
            .expect("valid counter"),
            consul_refused: counter_vec(
                "consul_refused_total",
                "Steps refused by Consul as malformed requests (HTTP 400).",
                &["service", "instance"],
            ),
            consul_request_duration: histogram_vec(
                "consul_request_duration_seconds",
                "Duration of Consul HTTP API requests (blocking watches excluded).",
                &["operation"],
            ),
            repairs: counter_vec(
                "repairs_total",
                "Instances put back in Consul by anti-entropy.",
                &["service", "instance", "reason"],
            ),
            sync_lag: Histogram::with_opts(
                HistogramOpts::new(
                    "consul_registrar_sync_lag_seconds",
                    "Time from a probe verdict change to Consul acknowledging the new status.",
                )
                .buckets(FAST_BUCKETS.to_vec()),
            )
            .expect("valid histogram"),
            consul_reachable: IntGauge::new(
                "consul_registrar_consul_reachable",
                "1 when the last Consul request got an HTTP answer.",
            )
            .expect("valid gauge"),
            draining: IntGauge::new(
                "consul_registrar_draining",
                "1 from the start of a drain until it heals or the sidecar ends.",
            )
            .expect("valid gauge"),
            drains: counter_vec(
                "drains_total",
                "Finished drains by outcome: drained, or failed (instances left in Consul).",
                &["outcome"],
            ),
            drains_healed: IntCounter::new(
                "consul_registrar_drains_healed_total",
                "Drains from /drain cancelled because the app was restarted and serves again.",
            )
            .expect("valid counter"),
            admin_refused: counter_vec(
                "admin_requests_refused_total",
                "Admin requests refused with 403, by endpoint and reason.",
                &["endpoint", "reason"],
            ),
            reaped: IntCounter::new(
                "consul_registrar_reaped_total",
                "Instances of gone sidecars removed by this one (catalog mode).",
            )
            .expect("valid counter"),
            session_renewals: counter_vec(
                "session_renewals_total",
                "Catalog mode's session renewals, by outcome.",
                &["outcome"],
            ),
            shared_session_beats: counter_vec(
                "shared_session_beats_total",
                "Heartbeats to the holder of the virtual node's shared session, by outcome.",
                &["outcome"],
            ),
            shared_session_peers: IntGauge::new(
                "consul_registrar_shared_session_peers",
                "Pods whose liveness keys this holder of the shared session holds for them.",
            )
            .expect("valid gauge"),
            shared_session_released: IntCounter::new(
                "consul_registrar_shared_session_released_total",
                "Liveness keys the holder deleted because their pod stopped heartbeating.",
            )
            .expect("valid counter"),
            build_info: gauge_vec("build_info", "Build information; always 1.", &["version"]),
            registry,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for outcome in DRAIN_OUTCOMES {
            m.drains.with_label_values(&[outcome]);
        }
        for reason in DRAIN_REFUSAL_REASONS {
            m.admin_refused.with_label_values(&["drain", reason]);
        }
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.probe_results.clone()),
            Box::new(m.probe_duration.clone()),
            Box::new(m.health_transitions.clone()),
            Box::new(m.instance_healthy.clone()),
            Box::new(m.instance_registered.clone()),
            Box::new(m.consul_requests.clone()),
            Box::new(m.consul_denied.clone()),
            Box::new(m.consul_refused.clone()),
            Box::new(m.consul_request_duration.clone()),
            Box::new(m.repairs.clone()),
            Box::new(m.sync_lag.clone()),
            Box::new(m.consul_reachable.clone()),
            Box::new(m.draining.clone()),
            Box::new(m.drains.clone()),
            Box::new(m.drains_healed.clone()),
            Box::new(m.admin_refused.clone()),
            Box::new(m.reaped.clone()),
            Box::new(m.session_renewals.clone()),
            Box::new(m.shared_session_beats.clone()),
            Box::new(m.shared_session_peers.clone()),
            Box::new(m.shared_session_released.clone()),
            Box::new(m.build_info.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for c in collectors {
            // Names are fixed and distinct, so registration cannot fail.
            m.registry.register(c).expect("unique metric names");
        }
        // Exported at 0 from the start, like the shared session's other two series, so that the
        // dashboard's panel and a rate() see the first heartbeat.
        for outcome in SHARED_SESSION_BEAT_OUTCOMES {
            m.shared_session_beats.with_label_values(&[outcome]);
        }
        Arc::new(m)
    }

    /// Creates an instance's series at their starting values (not registered, not passing, no
    /// repair, transition or refusal yet), so that alerts see them before anything happens.
    pub fn expect_instance(&self, service: &str, instance: &str) {
        let labels = [service, instance];
        self.instance_registered.with_label_values(&labels).set(0);
        self.instance_healthy.with_label_values(&labels).set(0);
        self.consul_refused.with_label_values(&labels);
        for reason in REPAIR_REASONS {
            self.repairs.with_label_values(&[service, instance, reason]);
        }
        for to in ["passing", "critical"] {
            self.health_transitions
                .with_label_values(&[service, instance, to]);
        }
    }

    /// Creates catalog mode's session renewal series at 0.
    pub fn expect_session_renewals(&self) {
        for outcome in SESSION_RENEWAL_OUTCOMES {
            self.session_renewals.with_label_values(&[outcome]);
        }
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(e) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(format!("consul_registrar_{name}"), help), labels)
        .expect("valid counter")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(format!("consul_registrar_{name}"), help), labels)
        .expect("valid gauge")
}

fn histogram_vec(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    HistogramVec::new(
        HistogramOpts::new(format!("consul_registrar_{name}"), help).buckets(FAST_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid histogram")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_prefix() {
        let m = Metrics::new();
        m.probe_results
            .with_label_values(&["a", "a-1", "serving"])
            .inc();
        m.probe_duration
            .with_label_values(&["a", "a-1"])
            .observe(0.001);
        m.health_transitions
            .with_label_values(&["a", "a-1", "passing"])
            .inc();
        m.instance_healthy.with_label_values(&["a", "a-1"]).set(1);
        m.instance_registered
            .with_label_values(&["a", "a-1"])
            .set(1);
        m.consul_requests
            .with_label_values(&["register", "2xx"])
            .inc();
        m.consul_request_duration
            .with_label_values(&["register"])
            .observe(0.002);
        m.repairs.with_label_values(&["a", "a-1", "missing"]).inc();
        m.sync_lag.observe(0.003);
        m.admin_refused
            .with_label_values(&["drain", "missing_token"])
            .inc();
        m.session_renewals.with_label_values(&["ok"]).inc();
        let text = m.render();
        for family in [
            "consul_registrar_probe_results_total",
            "consul_registrar_probe_duration_seconds_bucket",
            "consul_registrar_health_transitions_total",
            "consul_registrar_instance_healthy",
            "consul_registrar_instance_registered",
            "consul_registrar_consul_requests_total",
            "consul_registrar_consul_request_duration_seconds_bucket",
            "consul_registrar_repairs_total",
            "consul_registrar_sync_lag_seconds_bucket",
            "consul_registrar_consul_reachable",
            "consul_registrar_draining",
            "consul_registrar_drains_healed_total",
            "consul_registrar_admin_requests_refused_total{endpoint=\"drain\",reason=",
            "consul_registrar_reaped_total",
            "consul_registrar_session_renewals_total{outcome=\"ok\"}",
            "consul_registrar_drains_total{outcome=\"failed\"} 0",
            "consul_registrar_build_info{version=",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(family), "missing {family} in\n{text}");
        }
    }
}

#[cfg(test)]
mod expected_series {
    use super::*;

    fn has(text: &str, series: &str) -> bool {
        text.lines().any(|l| l == series)
    }

    #[test]
    fn series_that_alerts_watch_exist_at_zero_before_anything_happens() {
        let m = Metrics::new();
        let text = m.render();
        assert!(
            has(
                &text,
                "consul_registrar_drains_total{outcome=\"drained\"} 0"
            ),
            "{text}"
        );
        assert!(
            has(&text, "consul_registrar_drains_total{outcome=\"failed\"} 0"),
            "{text}"
        );
        assert!(
            !text.contains("consul_registrar_instance_registered{"),
            "no instance yet"
        );
        assert!(
            !text.contains("consul_registrar_session_renewals_total{"),
            "agent mode has no session"
        );

        m.expect_instance("hello", "hello-1");
        m.expect_session_renewals();
        let text = m.render();
        for series in [
            "consul_registrar_instance_registered{instance=\"hello-1\",service=\"hello\"} 0",
            "consul_registrar_instance_healthy{instance=\"hello-1\",service=\"hello\"} 0",
            "consul_registrar_consul_refused_total{instance=\"hello-1\",service=\"hello\"} 0",
            "consul_registrar_repairs_total{instance=\"hello-1\",reason=\"missing\",service=\"hello\"} 0",
            "consul_registrar_repairs_total{instance=\"hello-1\",reason=\"changed\",service=\"hello\"} 0",
            "consul_registrar_health_transitions_total{instance=\"hello-1\",service=\"hello\",to=\"critical\"} 0",
            "consul_registrar_session_renewals_total{outcome=\"lost\"} 0",
            "consul_registrar_session_renewals_total{outcome=\"error\"} 0",
        ] {
            assert!(has(&text, series), "missing {series} in\n{text}");
        }
    }

    #[test]
    fn process_wide_counters_start_at_zero() {
        let text = Metrics::new().render();
        for series in [
            "consul_registrar_consul_denied_total 0",
            "consul_registrar_admin_requests_refused_total{endpoint=\"drain\",reason=\"wrong_token\"} 0",
        ] {
            assert!(has(&text, series), "missing {series} in\n{text}");
        }
    }
}
