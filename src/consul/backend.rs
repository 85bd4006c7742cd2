//! The one seam between the reconciler/drainer and Consul: [`Registry`], what a Consul layout must
//! offer to keep one instance registered. The reconciler stays one loop over "desired vs observed,
//! one step"; how to register, report a status, watch, deregister, and what the crash net is, is
//! the backend's business. Two implementations: the node's client agent ([`ConsulClient`], agent
//! API and a TTL check) and the servers' catalog ([`super::catalog::CatalogRegistry`], a virtual
//! node and sessions).

use std::future::Future;
use std::time::Duration;

use super::{AgentServiceRegistration, CheckStatus, ConsulClient, ConsulError, ServiceWatch};
use crate::manifest::ServiceSpec;

/// What the reconciler and the drainer need from a Consul layout, per instance.
///
/// Every call is idempotent. `NotFound` from [`Registry::set_status`] means the instance (or its
/// check) is gone from Consul: read, then register again.
pub trait Registry: Clone + Send + Sync + 'static {
    /// Where calls go (for logs).
    fn address(&self) -> &str;

    /// Checks that the layout is still the one the sidecar can work with (agent mode: calls keep
    /// reaching the same agent). `again` asks even when it was checked before.
    fn verify(&self, again: bool) -> impl Future<Output = Result<(), ConsulError>> + Send;

    /// A plain read of the instance.
    fn read(
        &self,
        spec: &ServiceSpec,
    ) -> impl Future<Output = Result<ServiceWatch, ConsulError>> + Send;

    /// A blocking read: answers when the instance changes from `version` (the previous answer's),
    /// or after `wait`.
    fn watch(
        &self,
        spec: &ServiceSpec,
        version: &str,
        wait: Duration,
    ) -> impl Future<Output = Result<ServiceWatch, ConsulError>> + Send;

    /// Registers the instance (and whatever keeps it alive) with its check at `status`/`output`.
    /// `first`: this sidecar has not registered it before (not a repair).
    fn register(
        &self,
        spec: &ServiceSpec,
        status: CheckStatus,
        output: &str,
        first: bool,
    ) -> impl Future<Output = Result<(), ConsulError>> + Send;

    /// The instance was found in Consul as ours (adopted after a restart, or read again): take
    /// over whatever keeps it alive, cheaply when that is already ours.
    fn claim(&self, spec: &ServiceSpec) -> impl Future<Output = Result<(), ConsulError>> + Send;

    /// Sets the check's status and output (agent: also resets the TTL timer).
    fn set_status(
        &self,
        spec: &ServiceSpec,
        status: CheckStatus,
        output: &str,
    ) -> impl Future<Output = Result<(), ConsulError>> + Send;

    /// Removes the instance; an instance already gone counts as done.
    fn deregister(
        &self,
        spec: &ServiceSpec,
    ) -> impl Future<Output = Result<(), ConsulError>> + Send;

    /// How often an unchanged status must be sent again (agent: a third of the TTL), `None` when
    /// Consul keeps it without refreshes (catalog).
    fn refresh_every(&self, spec: &ServiceSpec) -> Option<Duration>;

    /// Whether reads report the check's status, so that a status changed behind our back (a
    /// restored snapshot, a hand edit) counts as drift. The agent's TTL refresh repairs it anyway.
    fn reports_check(&self) -> bool;

    /// Which ACL token calls carry now; a change means registering again.
    fn token_generation(&self) -> u64;

    /// After the instance was deregistered and the registry's own read found it gone: whether the
    /// servers, which clients read, no longer hold it either. Agent mode: the agent's sync to the
    /// servers can fail (a leader election) and leave them holding it for up to a minute, so the
    /// servers are asked, and an instance of ours they still hold is removed there (false: read
    /// again). Catalog mode reads the servers already: true.
    fn confirmed_gone(
        &self,
        spec: &ServiceSpec,
    ) -> impl Future<Output = Result<bool, ConsulError>> + Send;

    /// Whether Consul holds the check of any of `specs` with `status` and `output` (one call for
    /// them all): the drain's mark, left by a previous run of the sidecar that ended mid-drain.
    fn marked(
        &self,
        specs: &[ServiceSpec],
        status: CheckStatus,
        output: &str,
    ) -> impl Future<Output = Result<bool, ConsulError>> + Send;

    /// After a drain deregistered every instance: release what kept them alive.
    fn drained(&self) -> impl Future<Output = ()> + Send;

    /// After a drain that failed: stop keeping the instances alive, so that the crash net takes
    /// them (agent: nothing to do, the TTL is no longer refreshed; catalog: the session is no longer
    /// renewed, so Consul invalidates it and a reaper removes the instances).
    fn abandon(&self) -> impl Future<Output = ()> + Send;

    /// Resolves with a message when the sidecar must stop because of how Consul is laid out
    /// (agent mode: the address reaches several agents); never, otherwise.
    fn unworkable(&self) -> impl Future<Output = String> + Send;
}

impl Registry for ConsulClient {
    fn address(&self) -> &str {
        ConsulClient::address(self)
    }

    async fn verify(&self, again: bool) -> Result<(), ConsulError> {
        self.verify_agent(again).await
    }

    async fn read(&self, spec: &ServiceSpec) -> Result<ServiceWatch, ConsulError> {
        self.watch_service(&spec.id, None, Duration::ZERO).await
    }

    async fn watch(
        &self,
        spec: &ServiceSpec,
        version: &str,
        wait: Duration,
    ) -> Result<ServiceWatch, ConsulError> {
        self.watch_service(&spec.id, Some(version), wait).await
    }

    async fn register(
        &self,
        spec: &ServiceSpec,
        status: CheckStatus,
        output: &str,
        first: bool,
    ) -> Result<(), ConsulError> {
        // A first registration starts critical and the verdict follows as a status change, which
        // the agent syncs to the catalog with its output at once (an output-only change waits
        // for check_update_interval). A repair registers the current status directly.
        let initial = if first { CheckStatus::Critical } else { status };
        ConsulClient::register(self, &AgentServiceRegistration::new(spec, initial)).await?;
        // The agent starts the check with an empty output; say what the probe saw.
        self.update_ttl(&spec.check.id, status, output).await
    }

    async fn claim(&self, _spec: &ServiceSpec) -> Result<(), ConsulError> {
        // The TTL check is the agent's crash net; nothing to take over.
        Ok(())
    }

    async fn set_status(
        &self,
        spec: &ServiceSpec,
        status: CheckStatus,
        output: &str,
    ) -> Result<(), ConsulError> {
        self.update_ttl(&spec.check.id, status, output).await
    }

    async fn deregister(&self, spec: &ServiceSpec) -> Result<(), ConsulError> {
        ConsulClient::deregister(self, &spec.id).await
    }

    fn refresh_every(&self, spec: &ServiceSpec) -> Option<Duration> {
        Some(spec.check.ttl / 3)
    }

    fn reports_check(&self) -> bool {
        false
    }

    fn token_generation(&self) -> u64 {
        ConsulClient::token_generation(self)
    }

    async fn confirmed_gone(&self, spec: &ServiceSpec) -> Result<bool, ConsulError> {
        self.servers_forget(spec).await
    }

    async fn marked(
        &self,
        specs: &[ServiceSpec],
        status: CheckStatus,
        output: &str,
    ) -> Result<bool, ConsulError> {
        let ours: Vec<&str> = specs.iter().map(|s| s.check.id.as_str()).collect();
        Ok(self.agent_checks().await?.iter().any(|c| {
            ours.contains(&c.check_id.as_str()) && c.status == status.as_str() && c.output == output
        }))
    }

    async fn drained(&self) {}

    async fn abandon(&self) {}

    async fn unworkable(&self) -> String {
        self.several_agents().await
    }
}
