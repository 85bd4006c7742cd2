//! What each instance looks like right now, for `GET /status` and `/readyz`: the probe's verdict,
//! what Consul last acknowledged, and the last error of each. Written by the probe and the
//! reconciler, read by the admin server; nothing here drives behaviour, except that `/readyz` (the
//! pod's readiness) is judged from it ([`StatusBoard::readiness`]).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Serialize;

use crate::manifest::Readiness;

/// The shared status of every instance, in manifest order.
#[derive(Debug, Default)]
pub struct StatusBoard {
    instances: Vec<Arc<Mutex<InstanceStatus>>>,
}

/// One instance's status.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceStatus {
    pub id: String,
    pub service: String,
    pub probe: ProbeStatus,
    pub consul: ConsulStatus,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeStatus {
    /// `passing` or `critical`.
    pub verdict: &'static str,
    /// What the probe saw, as sent to Consul as the check output.
    pub output: String,
    /// `watch`, `poll`, or `waiting` before the first probe.
    pub mode: &'static str,
    pub last_error: Option<String>,
    #[serde(with = "unix_seconds")]
    pub changed_at: SystemTime,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConsulStatus {
    /// Whether Consul holds the instance as the sidecar last wrote it.
    pub registered: bool,
    /// Has the instance ever been registered by this process.
    pub ever_registered: bool,
    /// The check status Consul acknowledged last (a write it answered, or the instance adopted);
    /// None while Consul is not known to hold the instance (never registered, found missing,
    /// deregistered). A Consul that stops answering leaves it as it was: what Consul last
    /// acknowledged is still what its clients see.
    pub status: Option<&'static str>,
    pub last_error: Option<String>,
    /// Consul refused the last request as malformed (HTTP 400): it is retried only once per
    /// resync interval, and `last_error` carries Consul's message.
    pub refused: bool,
    pub repairs: u64,
    #[serde(with = "unix_seconds")]
    pub changed_at: SystemTime,
}

impl StatusBoard {
    /// A board with one entry per `(id, service)`.
    pub fn new<'a>(instances: impl IntoIterator<Item = (&'a str, &'a str)>) -> Arc<StatusBoard> {
        let now = SystemTime::now();
        Arc::new(StatusBoard {
            instances: instances
                .into_iter()
                .map(|(id, service)| {
                    Arc::new(Mutex::new(InstanceStatus {
                        id: id.to_string(),
                        service: service.to_string(),
                        probe: ProbeStatus {
                            verdict: "critical",
                            output: String::new(),
                            mode: "waiting",
                            last_error: None,
                            changed_at: now,
                        },
                        consul: ConsulStatus {
                            registered: false,
                            ever_registered: false,
                            status: None,
                            last_error: None,
                            refused: false,
                            repairs: 0,
                            changed_at: now,
                        },
                    }))
                })
                .collect(),
        })
    }

    /// The handle for the instance at `index` (manifest order).
    pub fn entry(&self, index: usize) -> StatusEntry {
        StatusEntry(Arc::clone(&self.instances[index]))
    }

    /// A copy of every instance's status.
    pub fn snapshot(&self) -> Vec<InstanceStatus> {
        self.instances.iter().map(|i| lock(i).clone()).collect()
    }

    /// Whether the instances are ready under `rule` (see [`Readiness`]): an instance counts as
    /// passing when the probe's verdict is passing and Consul acknowledged passing (a verdict
    /// Consul has not been told yet does not count, nor does Consul's passing for a verdict that
    /// has since turned critical). Else why not, naming the instances (at most three).
    pub fn readiness(&self, rule: Readiness) -> Result<(), String> {
        let statuses: Vec<(String, &'static str, Option<&'static str>)> = self
            .instances
            .iter()
            .map(|i| {
                let s = lock(i);
                (s.id.clone(), s.probe.verdict, s.consul.status)
            })
            .collect();
        let passing = |(_, verdict, acked): &(String, &str, Option<&str>)| {
            *verdict == "passing" && *acked == Some("passing")
        };
        let why = |(id, verdict, acked): &(String, &str, Option<&str>)| match (acked, *verdict) {
            (None, _) => format!("{id} is not in Consul"),
            (Some(status), "passing") if *status != "passing" => {
                format!(
                    "{id} is {status} in Consul (the probe passes; Consul has not acknowledged it yet)"
                )
            }
            (Some(_), verdict) => format!("{id}'s probe says {verdict}"),
        };
        let list = |failing: Vec<String>| {
            let more = failing.len().saturating_sub(3);
            let mut text = failing.into_iter().take(3).collect::<Vec<_>>().join("; ");
            if more > 0 {
                text.push_str(&format!("; and {more} more"));
            }
            text
        };
        match rule {
            Readiness::All => {
                let failing: Vec<String> =
                    statuses.iter().filter(|s| !passing(s)).map(why).collect();
                if failing.is_empty() {
                    Ok(())
                } else {
                    Err(list(failing))
                }
            }
            Readiness::Any => {
                if statuses.iter().any(passing) {
                    Ok(())
                } else {
                    Err(format!(
                        "no instance is passing in Consul (readiness: any): {}",
                        list(statuses.iter().map(why).collect())
                    ))
                }
            }
            Readiness::Registered => {
                let failing: Vec<String> = statuses
                    .iter()
                    .filter(|(_, _, acked)| acked.is_none())
                    .map(why)
                    .collect();
                if failing.is_empty() {
                    Ok(())
                } else {
                    Err(list(failing))
                }
            }
        }
    }
}

/// A writer's handle on one instance's status.
#[derive(Debug, Clone)]
pub struct StatusEntry(Arc<Mutex<InstanceStatus>>);

impl StatusEntry {
    /// Changes the status under its lock.
    pub fn update(&self, f: impl FnOnce(&mut InstanceStatus)) {
        f(&mut lock(&self.0));
    }
}

/// A poisoned lock only means a panic elsewhere; the status data is still fine to read.
fn lock(m: &Mutex<InstanceStatus>) -> MutexGuard<'_, InstanceStatus> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(states: &[(&'static str, Option<&'static str>)]) -> Arc<StatusBoard> {
        let ids: Vec<String> = (0..states.len()).map(|i| format!("i-{i}")).collect();
        let b = StatusBoard::new(ids.iter().map(|id| (id.as_str(), "svc")));
        for (i, (verdict, acked)) in states.iter().enumerate() {
            b.entry(i).update(|s| {
                s.probe.verdict = verdict;
                s.consul.status = *acked;
            });
        }
        b
    }

    #[test]
    fn all_needs_every_instance_passing_for_its_current_verdict() {
        assert!(
            board(&[("passing", Some("passing")); 2])
                .readiness(Readiness::All)
                .is_ok()
        );
        let why = board(&[("passing", Some("passing")), ("critical", Some("passing"))])
            .readiness(Readiness::All)
            .expect_err("a verdict turned critical");
        assert!(why.contains("i-1's probe says critical"), "{why}");
        let why = board(&[("passing", Some("critical"))])
            .readiness(Readiness::All)
            .expect_err("Consul not told yet");
        assert!(why.contains("not acknowledged"), "{why}");
        let why = board(&[("passing", None)])
            .readiness(Readiness::All)
            .expect_err("not in Consul");
        assert!(why.contains("not in Consul"), "{why}");
    }

    #[test]
    fn any_needs_one_and_registered_needs_every_instance_held() {
        let mixed = board(&[("critical", Some("critical")), ("passing", Some("passing"))]);
        assert!(mixed.readiness(Readiness::Any).is_ok());
        assert!(mixed.readiness(Readiness::Registered).is_ok());
        assert!(mixed.readiness(Readiness::All).is_err());
        let none = board(&[("critical", Some("critical")), ("passing", None)]);
        assert!(none.readiness(Readiness::Any).is_err());
        assert!(none.readiness(Readiness::Registered).is_err());
    }

    #[test]
    fn a_long_list_of_reasons_is_cut_at_three() {
        let why = board(&[("critical", None); 5])
            .readiness(Readiness::All)
            .expect_err("none");
        assert!(why.ends_with("and 2 more"), "{why}");
    }
}

mod unix_seconds {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let secs = t
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        s.serialize_f64((secs * 1000.0).round() / 1000.0)
    }
}
