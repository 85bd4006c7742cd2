//! What each instance looks like right now, for `GET /status` and `/readyz`: the probe's verdict,
//! what the sidecar last wrote to Consul, and the last error of each. Written by the probe and the
//! reconciler, read by the admin server; nothing here drives behaviour.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use serde::Serialize;

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
    /// The check status Consul acknowledged last.
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

    /// True once every instance has been registered at least once.
    pub fn all_registered_once(&self) -> bool {
        self.instances
            .iter()
            .all(|i| lock(i).consul.ever_registered)
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

mod unix_seconds {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let secs = t
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        s.serialize_f64((secs * 1000.0).round() / 1000.0)
    }
}
