//! Catalog mode: registration straight into the servers' catalog, for clusters without client
//! agents (consul-k8s 1.0+'s default). Instances live on a virtual node of our own
//! (`consul-registrar-<NODE_NAME>`), which no agent's anti-entropy and no consul-k8s controller
//! touches; their check carries the probe's verdict and never expires, so a session's liveness key
//! ([`super::session`]) is the crash net and the reapers ([`super::reaper`]) act on it.
//!
//! Writes go through Raft: one per registration and one per status change, none in between.

use std::sync::Arc;
use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;

use super::registration::CheckSeen;
use super::session::Liveness;
use super::{
    AgentService, AgentServiceRegistration, CheckStatus, ConsulClient, ConsulError, Registry,
    ServiceWatch, path_escape,
};
use crate::manifest::{CatalogSettings, MANAGED_BY_KEY, MANAGED_BY_VALUE, ServiceSpec};

/// The catalog backend of [`Registry`].
#[derive(Clone)]
pub struct CatalogRegistry {
    client: ConsulClient,
    settings: Arc<CatalogSettings>,
    liveness: Arc<Liveness>,
}

/// One entry of `GET /v1/health/service/:name`.
#[derive(Deserialize)]
struct HealthEntry {
    #[serde(rename = "Service")]
    service: AgentService,
    #[serde(rename = "Checks", default)]
    checks: Vec<HealthCheck>,
}

#[derive(Deserialize)]
struct HealthCheck {
    #[serde(rename = "CheckID", default)]
    check_id: String,
    #[serde(rename = "Status", default)]
    status: String,
    #[serde(rename = "Output", default)]
    output: String,
}

impl CatalogRegistry {
    pub fn new(client: ConsulClient, settings: CatalogSettings, liveness: Arc<Liveness>) -> Self {
        CatalogRegistry {
            client,
            settings: Arc::new(settings),
            liveness,
        }
    }

    /// `GET /v1/health/service/:name` filtered to our instance on our node; blocking from
    /// `index` when given.
    async fn instance(
        &self,
        spec: &ServiceSpec,
        index: Option<(&str, Duration)>,
    ) -> Result<ServiceWatch, ConsulError> {
        let filter = format!(
            "Node.Node == \"{}\" and Service.ID == \"{}\"",
            self.settings.node, spec.id
        );
        let path = format!("/v1/health/service/{}", path_escape(&spec.name));
        let req = self
            .client
            .request(Method::GET, &path)
            .query(&[("filter", filter.as_str())]);
        let (operation, req, timeout) = match index {
            Some((index, wait)) => (
                "watch_instance",
                req.query(&[
                    ("index", if index.is_empty() { "0" } else { index }),
                    ("wait", &format!("{}ms", wait.as_millis())),
                ]),
                super::blocking_timeout(wait),
            ),
            None => ("read_instance", req, super::REQUEST_TIMEOUT),
        };
        let answer = self.client.send(operation, req, timeout).await?;
        let entries: Vec<HealthEntry> =
            serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
                operation,
                reason: e.to_string(),
            })?;
        let Some(entry) = entries.into_iter().next() else {
            return Ok(ServiceWatch::Missing);
        };
        let mut service = entry.service;
        service.check = match entry
            .checks
            .into_iter()
            .find(|c| c.check_id == spec.check.id)
        {
            Some(c) => CheckSeen::Present {
                status: c.status,
                output: c.output,
            },
            None => CheckSeen::Missing,
        };
        Ok(ServiceWatch::Present {
            service: Box::new(service),
            hash: answer.index.unwrap_or_default(),
        })
    }

    async fn catalog_register(
        &self,
        operation: &'static str,
        body: &serde_json::Value,
    ) -> Result<(), ConsulError> {
        let req = self
            .client
            .request(Method::PUT, "/v1/catalog/register")
            .json(body);
        match self
            .client
            .send(operation, req, super::REQUEST_TIMEOUT)
            .await
        {
            // A check for a service (or node) the catalog no longer has.
            Err(ConsulError::Status {
                status: 500, body, ..
            }) if body.contains("Missing service") || body.contains("Missing node") => {
                Err(ConsulError::NotFound {
                    operation,
                    what: "instance",
                })
            }
            other => other.map(drop),
        }
    }
}

/// The body of `PUT /v1/catalog/register` on `settings.node`: the node, the check, and the
/// service when `service` (a status change sends the check alone, and fails if the service is gone).
pub fn registration_body(
    settings: &CatalogSettings,
    spec: &ServiceSpec,
    status: CheckStatus,
    output: &str,
    service: bool,
) -> serde_json::Value {
    let mut body = serde_json::json!({
        "Node": settings.node,
        "Address": settings.node_address,
        "NodeMeta": { MANAGED_BY_KEY: MANAGED_BY_VALUE },
        "SkipNodeUpdate": !service,
        "Check": {
            "Node": settings.node,
            "CheckID": spec.check.id,
            "Name": spec.check.name,
            "ServiceID": spec.id,
            "Status": status.as_str(),
            "Output": output,
            "Notes": spec.check.notes.clone().unwrap_or_default(),
        },
    });
    if service {
        let want = AgentServiceRegistration::new(spec, status);
        let mut s = serde_json::json!({
            "ID": want.id,
            "Service": want.name,
            "Tags": want.tags,
            "Port": want.port,
            "Meta": want.meta,
            "EnableTagOverride": want.enable_tag_override,
        });
        if let Some(address) = &want.address {
            s["Address"] = address.clone().into();
        }
        if let Some(w) = want.weights {
            s["Weights"] = serde_json::json!({ "Passing": w.passing, "Warning": w.warning });
        }
        if !want.tagged_addresses.is_empty() {
            s["TaggedAddresses"] =
                serde_json::to_value(&want.tagged_addresses).unwrap_or(serde_json::Value::Null);
        }
        body["Service"] = s;
    }
    body
}

impl Registry for CatalogRegistry {
    fn address(&self) -> &str {
        self.client.address()
    }

    async fn verify(&self, _again: bool) -> Result<(), ConsulError> {
        // Any server answers for the whole catalog: a load-balanced address is the normal case.
        Ok(())
    }

    async fn read(&self, spec: &ServiceSpec) -> Result<ServiceWatch, ConsulError> {
        self.instance(spec, None).await
    }

    async fn watch(
        &self,
        spec: &ServiceSpec,
        version: &str,
        wait: Duration,
    ) -> Result<ServiceWatch, ConsulError> {
        self.instance(spec, Some((version, wait))).await
    }

    async fn register(
        &self,
        spec: &ServiceSpec,
        status: CheckStatus,
        output: &str,
        _first: bool,
    ) -> Result<(), ConsulError> {
        // One write carries the service and its check with the verdict and its output.
        // The key first: a live instance is never without it, so no reaper takes it for a ghost.
        self.liveness.hold(&spec.id, true).await?;
        self.catalog_register(
            "catalog_register",
            &registration_body(&self.settings, spec, status, output, true),
        )
        .await
    }

    async fn claim(&self, spec: &ServiceSpec) -> Result<(), ConsulError> {
        // Found registered (after a restart: its key is held by our previous run's session,
        // which `hold` adopts): keep its key held.
        self.liveness.hold(&spec.id, false).await
    }

    async fn set_status(
        &self,
        spec: &ServiceSpec,
        status: CheckStatus,
        output: &str,
    ) -> Result<(), ConsulError> {
        self.catalog_register(
            "catalog_status",
            &registration_body(&self.settings, spec, status, output, false),
        )
        .await
    }

    async fn deregister(&self, spec: &ServiceSpec) -> Result<(), ConsulError> {
        let body = serde_json::json!({
            "Node": self.settings.node,
            "ServiceID": spec.id,
        });
        let req = self
            .client
            .request(Method::PUT, "/v1/catalog/deregister")
            .json(&body);
        self.client
            .send("catalog_deregister", req, super::REQUEST_TIMEOUT)
            .await?;
        // The key last, for the same reason it came first.
        self.liveness.release(&spec.id).await
    }

    fn refresh_every(&self, _spec: &ServiceSpec) -> Option<Duration> {
        None
    }

    fn reports_check(&self) -> bool {
        true
    }

    fn token_generation(&self) -> u64 {
        self.client.token_generation()
    }

    async fn drained(&self) {
        self.liveness.end().await;
    }

    async fn unworkable(&self) -> String {
        std::future::pending().await
    }
}
