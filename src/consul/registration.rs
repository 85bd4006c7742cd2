//! What we send to Consul's agent API for one instance, built from a [`ServiceSpec`], and how we
//! tell whether what Consul has is still what we sent (drift).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::manifest::{MANAGED_BY_KEY, MANAGED_BY_VALUE, ServiceSpec, duration};

/// A TTL check status, as Consul spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Passing,
    Warning,
    Critical,
}

impl CheckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Passing => "passing",
            CheckStatus::Warning => "warning",
            CheckStatus::Critical => "critical",
        }
    }
}

impl fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Body of `PUT /v1/agent/service/register` (Consul's field names).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct AgentServiceRegistration {
    #[serde(rename = "ID")]
    pub id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights: Option<WeightsBody>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tagged_addresses: BTreeMap<String, TaggedAddressBody>,
    pub enable_tag_override: bool,
    pub checks: Vec<TtlCheckBody>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct WeightsBody {
    pub passing: u32,
    pub warning: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct TaggedAddressBody {
    pub address: String,
    pub port: u16,
}

/// The sidecar's TTL check, registered together with the service.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct TtlCheckBody {
    #[serde(rename = "CheckID")]
    pub check_id: String,
    pub name: String,
    #[serde(rename = "TTL")]
    pub ttl: String,
    pub status: CheckStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
    pub deregister_critical_service_after: String,
}

impl AgentServiceRegistration {
    /// The registration for `spec`, its TTL check starting at `status`.
    pub fn new(spec: &ServiceSpec, status: CheckStatus) -> Self {
        AgentServiceRegistration {
            id: spec.id.clone(),
            name: spec.name.clone(),
            address: spec.address.clone(),
            port: spec.port,
            tags: spec.tags.clone(),
            meta: spec.meta.clone(),
            weights: spec.weights.map(|w| WeightsBody {
                passing: w.passing,
                warning: w.warning,
            }),
            tagged_addresses: spec
                .tagged_addresses
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        TaggedAddressBody {
                            address: v.address.clone(),
                            port: v.port,
                        },
                    )
                })
                .collect(),
            enable_tag_override: spec.enable_tag_override,
            checks: vec![TtlCheckBody {
                check_id: spec.check.id.clone(),
                name: spec.check.name.clone(),
                ttl: duration::format(spec.check.ttl),
                status,
                notes: spec.check.notes.clone(),
                deregister_critical_service_after: duration::format(
                    spec.check.deregister_critical_service_after,
                ),
            }],
        }
    }
}

/// The parts of `GET /v1/agent/service/:id` that we compare.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentService {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    pub address: String,
    pub port: u16,
    pub tags: Option<Vec<String>>,
    pub meta: Option<BTreeMap<String, String>>,
    pub weights: Option<AgentWeights>,
    pub enable_tag_override: bool,
    pub tagged_addresses: Option<BTreeMap<String, AgentTaggedAddress>>,
    pub content_hash: String,
    /// Our check as Consul holds it, when the read reports it (catalog mode).
    #[serde(skip)]
    pub check: CheckSeen,
}

/// What a read said of the instance's check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CheckSeen {
    /// The read does not report checks (the agent's service endpoint).
    #[default]
    NotReported,
    /// The instance has no check of ours.
    Missing,
    /// The check's status and output.
    Present { status: String, output: String },
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentWeights {
    pub passing: u32,
    pub warning: u32,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AgentTaggedAddress {
    pub address: String,
    pub port: u16,
}

/// How what Consul holds compares with what we want.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// Consul has the instance as we registered it.
    InSync,
    /// Consul has no such instance.
    Missing,
    /// Consul has it, but `field` differs from the manifest.
    Changed { field: &'static str },
    /// An instance with our ID exists but was not registered by consul-registrar: hands off.
    NotOurs,
}

impl AgentService {
    /// The one ownership rule, applied by every path that writes to or removes an instance (the
    /// reconciler before registering again, the drainer before marking critical and
    /// deregistering): an instance is ours if and only if Consul's copy carries
    /// `managed-by=consul-registrar` in its meta. Anything else under one of our IDs is left alone.
    pub fn is_ours(&self) -> bool {
        self.meta
            .as_ref()
            .and_then(|m| m.get(MANAGED_BY_KEY))
            .is_some_and(|v| v == MANAGED_BY_VALUE)
    }

    /// Compares with the registration we want. Tags are left alone when `enableTagOverride` lets
    /// others edit them.
    pub fn drift_from(&self, want: &AgentServiceRegistration) -> Drift {
        if !self.is_ours() {
            return Drift::NotOurs;
        }
        let meta = self.meta.clone().unwrap_or_default();
        let tags = self.tags.clone().unwrap_or_default();
        let changed = |field| Drift::Changed { field };
        if self.service != want.name {
            return changed("name");
        }
        if self.port != want.port {
            return changed("port");
        }
        if self.address != want.address.clone().unwrap_or_default() {
            return changed("address");
        }
        if !want.enable_tag_override && tags != want.tags {
            return changed("tags");
        }
        if meta != want.meta {
            return changed("meta");
        }
        if self.enable_tag_override != want.enable_tag_override {
            return changed("enableTagOverride");
        }
        if let (Some(w), Some(have)) = (want.weights, self.weights)
            && (w.passing != have.passing || w.warning != have.warning)
        {
            return changed("weights");
        }
        let have_tagged = self.tagged_addresses.clone().unwrap_or_default();
        for (k, v) in &want.tagged_addresses {
            match have_tagged.get(k) {
                Some(h) if h.address == v.address && h.port == v.port => {}
                _ => return changed("taggedAddresses"),
            }
        }
        Drift::InSync
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Environment, parse};

    fn spec() -> ServiceSpec {
        let text = "services:\n  - name: hello\n    id: hello-1\n    address: 10.0.0.1\n    port: 50051\n    tags: [a, b]\n    meta: {version: v1}\n    weights: {passing: 3}\n    check:\n      ttl: 15s\n      deregisterCriticalServiceAfter: 2m\n";
        parse(text, "m.yaml", &Environment::Fixed(Default::default()))
            .expect("valid")
            .services
            .remove(0)
    }

    #[test]
    fn registration_uses_consul_field_names_and_explicit_check_id() {
        let body = serde_json::to_value(AgentServiceRegistration::new(
            &spec(),
            CheckStatus::Critical,
        ))
        .expect("serializes");
        assert_eq!(body["ID"], "hello-1");
        assert_eq!(body["Name"], "hello");
        assert_eq!(body["Address"], "10.0.0.1");
        assert_eq!(body["Port"], 50051);
        assert_eq!(body["Meta"]["managed-by"], "consul-registrar");
        assert_eq!(body["Meta"]["version"], "v1");
        assert_eq!(body["Weights"]["Passing"], 3);
        assert_eq!(body["Weights"]["Warning"], 1);
        let check = &body["Checks"][0];
        assert_eq!(check["CheckID"], "consul-registrar:hello-1");
        assert_eq!(check["TTL"], "15s");
        assert_eq!(check["Status"], "critical");
        assert_eq!(check["DeregisterCriticalServiceAfter"], "2m");
    }

    #[test]
    fn drift_detects_what_differs_and_what_is_not_ours() {
        let want = AgentServiceRegistration::new(&spec(), CheckStatus::Passing);
        let have = AgentService {
            id: "hello-1".into(),
            service: "hello".into(),
            address: "10.0.0.1".into(),
            port: 50051,
            tags: Some(vec!["a".into(), "b".into()]),
            meta: Some(want.meta.clone()),
            weights: Some(AgentWeights {
                passing: 3,
                warning: 1,
            }),
            ..Default::default()
        };
        assert_eq!(have.drift_from(&want), Drift::InSync);
        let moved = AgentService {
            port: 1,
            ..have.clone()
        };
        assert_eq!(moved.drift_from(&want), Drift::Changed { field: "port" });
        let retagged = AgentService {
            tags: Some(vec!["a".into()]),
            ..have.clone()
        };
        assert_eq!(retagged.drift_from(&want), Drift::Changed { field: "tags" });
        let foreign = AgentService { meta: None, ..have };
        assert_eq!(foreign.drift_from(&want), Drift::NotOurs);
    }
}
