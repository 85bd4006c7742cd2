//! The manifest exactly as written in YAML (camelCase keys, unknown keys rejected). Defaults and
//! cross-field rules are applied when this is resolved into [`super::Manifest`].

use std::collections::BTreeMap;

use serde::Deserialize;

use super::values::{
    ConsulModeName, Count, Delay, Flag, HealthMode, InstanceId, KeyPrefix, MetaKey, NodeName, Port,
    PositiveDuration, ServiceAddress, ServiceName, Text,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawManifest {
    #[serde(default)]
    pub consul: RawConsul,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub drain: RawDrain,
    pub services: Vec<RawService>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawConsul {
    pub address: Option<Text>,
    pub token: Option<Text>,
    pub token_file: Option<Text>,
    pub datacenter: Option<Text>,
    pub namespace: Option<Text>,
    pub partition: Option<Text>,
    pub tls: Option<RawTls>,
    pub retry: Option<RawRetry>,
    pub resync_interval: Option<PositiveDuration>,
    pub blocking_watches: Option<Count>,
    pub mode: Option<ConsulModeName>,
    pub catalog: Option<RawCatalog>,
}

/// `consul.catalog`: settings of catalog mode only.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawCatalog {
    pub node: Option<NodeName>,
    pub node_address: Option<ServiceAddress>,
    #[serde(rename = "sessionTTL")]
    pub session_ttl: Option<PositiveDuration>,
    pub key_prefix: Option<KeyPrefix>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawTls {
    pub ca_file: Option<Text>,
    pub cert_file: Option<Text>,
    pub key_file: Option<Text>,
    pub server_name: Option<Text>,
    pub insecure_skip_verify: Option<Flag>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRetry {
    pub initial: Option<PositiveDuration>,
    pub max: Option<PositiveDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAdmin {
    pub address: Option<Text>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawDrain {
    pub delay: Option<Delay>,
    pub deregister_timeout: Option<PositiveDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawService {
    pub name: ServiceName,
    pub id: Option<InstanceId>,
    pub address: Option<ServiceAddress>,
    pub port: Port,
    #[serde(default)]
    pub tags: Vec<Text>,
    #[serde(default)]
    pub meta: BTreeMap<MetaKey, Text>,
    pub weights: Option<RawWeights>,
    #[serde(default)]
    pub tagged_addresses: BTreeMap<Text, RawTaggedAddress>,
    pub enable_tag_override: Option<Flag>,
    #[serde(default)]
    pub health: RawHealth,
    #[serde(default)]
    pub check: RawCheck,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawWeights {
    pub passing: Count,
    pub warning: Option<Count>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawTaggedAddress {
    pub address: ServiceAddress,
    pub port: Port,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawHealth {
    pub address: Option<ServiceAddress>,
    pub port: Option<Port>,
    pub service: Option<Text>,
    pub tls: Option<RawTls>,
    pub mode: Option<HealthMode>,
    pub interval: Option<PositiveDuration>,
    pub timeout: Option<PositiveDuration>,
    pub success_threshold: Option<Count>,
    pub failure_threshold: Option<Count>,
    pub initial_delay: Option<Delay>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawCheck {
    pub ttl: Option<PositiveDuration>,
    pub deregister_critical_service_after: Option<PositiveDuration>,
    pub notes: Option<Text>,
}
