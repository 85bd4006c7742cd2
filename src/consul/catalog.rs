//! Catalog mode: registration straight into the servers' catalog, for clusters without client
//! agents (consul-k8s 1.0+'s default). Instances live on a virtual node of our own
//! (`consul-registrar-<NODE_NAME>`), which no agent's anti-entropy and no consul-k8s controller
//! touches; their check carries the probe's verdict and never expires, so a session's liveness key
//! ([`super::session`]) is the crash net and the reapers ([`super::reaper`]) act on it.
//!
//! Writes go through Raft: one per registration and one per status change, none in between. Each
//! is a transaction guarded by the instance's liveness key (our session must hold it), so a write
//! applied late, after our drain, fails, and a sidecar that lost the key to another holder of the
//! same ID never writes to or removes that holder's instance.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::node_view::{self, NodeView, ViewAnswer, ViewRequest};
use super::registration::CheckSeen;
use super::session::{Liveness, deregistration};
use super::shared;
use super::{
    AgentService, AgentServiceRegistration, CheckStatus, ConsulClient, ConsulError, Registry,
    ServiceWatch, path_escape,
};
use crate::manifest::RetryPolicy;
use crate::manifest::{CatalogSettings, MANAGED_BY_KEY, MANAGED_BY_VALUE, ServiceSpec};
use crate::reconcile::Backoff;

/// The catalog backend of [`Registry`].
#[derive(Clone)]
pub struct CatalogRegistry {
    client: ConsulClient,
    settings: Arc<CatalogSettings>,
    liveness: Arc<Liveness>,
    /// Instances whose key another sidecar's session holds (the same ID on the same node): that
    /// sidecar's, whatever their meta says; reads report them as not ours, so the drain and the
    /// reconciler leave them alone.
    disowned: Arc<std::sync::Mutex<BTreeSet<String>>>,
    /// With a shared session: the virtual node's view ([`node_view`]), published while this
    /// sidecar holds the session; a peer asks its holder's instead.
    view: Option<Arc<NodeView>>,
    /// When each instance's last registration or status write was sent: a view read before that
    /// is not its state.
    written: Arc<std::sync::Mutex<BTreeMap<String, Instant>>>,
    /// For a peer's long polls of its holder's view (each with a timeout of its own).
    holder_http: reqwest::Client,
}

/// How a version of the node view starts (`view:<session>:<epoch>:<generation>`): what the
/// reconciler passes back is then no index of Consul's.
const VIEW_VERSION: &str = "view:";
/// How much longer than its wait a long poll of the holder may take.
const HOLDER_SLACK: Duration = Duration::from_secs(2);

/// One read of the virtual node for the view.
struct NodeRead {
    /// When the servers answered the checks' blocking query.
    read_at: Instant,
    checks: Vec<serde_json::Value>,
    services: Vec<serde_json::Value>,
    /// The token may not see all of it (`X-Consul-Results-Filtered-By-ACLs`).
    partial: bool,
    /// The checks' index.
    index: Option<String>,
}

/// `GET /v1/catalog/node-services/:node`.
#[derive(Deserialize)]
struct NodeServices {
    #[serde(rename = "Services", default)]
    services: Option<Vec<AgentService>>,
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
            view: settings.shared_session.as_ref().map(|_| Arc::default()),
            settings: Arc::new(settings),
            liveness,
            disowned: Default::default(),
            written: Default::default(),
            holder_http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .unwrap_or_default(),
        }
    }

    /// The node view, when there is a shared session (for the admin server to answer peers).
    pub fn node_view(&self) -> Option<Arc<NodeView>> {
        self.view.clone()
    }

    /// Instance `id` is about to be written (its transaction sent): a view read before now is
    /// not its state. Stamped as the transaction is sent, not when its answer comes: the holder's
    /// watch wakes on the write itself, often before the writer has its answer.
    fn wrote(&self, id: &str) {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), Instant::now());
    }

    /// When instance `id` was last written.
    fn written_at(&self, id: &str) -> Option<Instant> {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
    }

    /// The holder's side of the node view: while this sidecar holds the virtual node's shared
    /// session, a blocking query on the node's checks (re-armed after each answer, which comes at
    /// least every `resync`), then a read of its services, published as one snapshot. Not the
    /// holder, or the servers cannot be read: no view, and every sidecar of the node watches on
    /// its own.
    pub async fn run_node_view(
        self,
        resync: Duration,
        retry: RetryPolicy,
        cancel: CancellationToken,
    ) {
        let Some(view) = self.view.clone() else {
            return;
        };
        let tick = self.settings.session_ttl / 10;
        let no_longer_holder = || async {
            while self.liveness.is_holder() {
                tokio::time::sleep(tick).await;
            }
        };
        let mut index = String::new();
        let mut backoff = Backoff::new(retry);
        loop {
            if !self.liveness.is_holder() {
                view.clear();
                index.clear();
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(tick) => continue,
                }
            }
            view.begin();
            let read = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = no_longer_holder() => continue,
                read = self.read_node(&index, resync) => read,
            };
            match read {
                Ok(read) => {
                    backoff.reset();
                    let old: u64 = index.parse().unwrap_or(0);
                    let new = read.index.unwrap_or_default();
                    // An index that went backwards (the servers' state wiped or restored): the
                    // next read starts over.
                    index = if new.parse::<u64>().unwrap_or(0) < old {
                        String::new()
                    } else {
                        new
                    };
                    view.publish(read.read_at, read.services, read.checks, read.partial);
                    tracing::debug!(index = %index, "the node view: a new snapshot of the virtual node");
                }
                Err(e) => {
                    view.clear();
                    index.clear();
                    tracing::debug!(error = %e, "the node view cannot read the virtual node; its sidecars watch on their own meanwhile");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
    }

    /// One read of the whole virtual node for the view: its checks (a blocking query from
    /// `index`, waiting up to `wait`), then its services; when the blocking query answered (the
    /// state read is at least that recent), and the checks' index.
    async fn read_node(&self, index: &str, wait: Duration) -> Result<NodeRead, ConsulError> {
        let node = path_escape(&self.settings.node);
        let req = self
            .client
            .request(Method::GET, &format!("/v1/health/node/{node}"))
            .query(&[
                ("index", if index.is_empty() { "0" } else { index }),
                ("wait", &super::wait_param(wait)),
            ]);
        let checks = self
            .client
            .send("watch_node", req, super::blocking_timeout(wait))
            .await?;
        let read_at = Instant::now();
        let decode = |operation: &'static str, body: &[u8]| {
            serde_json::from_slice::<serde_json::Value>(body).map_err(|e| ConsulError::Decode {
                operation,
                reason: e.to_string(),
            })
        };
        let array = |v: Option<&serde_json::Value>| {
            v.and_then(serde_json::Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let mut partial = checks.filtered_by_acls;
        let node_checks = array(Some(&decode("watch_node", &checks.body)?));
        let req = self
            .client
            .request(Method::GET, &format!("/v1/catalog/node-services/{node}"));
        let services = match self
            .client
            .send("read_node", req, super::REQUEST_TIMEOUT)
            .await
        {
            // `null` when the node is unknown, `"Services": null` when it has none.
            Ok(a) => {
                partial |= a.filtered_by_acls;
                array(decode("read_node", &a.body)?.get("Services"))
            }
            Err(ConsulError::Status { status: 404, .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(NodeRead {
            read_at,
            checks: node_checks,
            services,
            partial,
            index: checks.index,
        })
    }

    /// The instance from the node view: this sidecar's own when it holds the shared session,
    /// else its holder's; newer than `version` when that is a version of the same view (else the
    /// current one), and read after our last write of the instance. None when there is no view
    /// to ask, or it does not vouch for the instance: the caller watches Consul itself.
    async fn watch_view(
        &self,
        spec: &ServiceSpec,
        version: &str,
        wait: Duration,
    ) -> Option<ServiceWatch> {
        let view = self.view.as_ref()?;
        let deadline = Instant::now() + wait;
        // `view:<session>:<epoch>:<generation>`, as the last answer named it.
        let seen: Option<(&str, u64, u64)> = version.strip_prefix(VIEW_VERSION).and_then(|v| {
            let mut parts = v.splitn(3, ':');
            let session = parts.next()?;
            let epoch = parts.next()?.parse().ok()?;
            let generation = parts.next()?.parse().ok()?;
            Some((session, epoch, generation))
        });
        let after_in = |session: &str, epoch: u64| match seen {
            Some((s, e, g)) if s == session && e == epoch => g,
            _ => 0,
        };
        let ids = std::slice::from_ref(&spec.id);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let written = self.written_at(&spec.id);
            let (session, answer) = if self.liveness.is_holder() {
                let session = self.liveness.current().await?;
                let snapshot = view
                    .newer(after_in(&session, view.epoch()), written, left)
                    .await?;
                (session, snapshot.part(view.epoch(), ids))
            } else {
                let (advertise, session, pod_uid) = self.liveness.holder_endpoint().await?;
                let (epoch, after) = match seen {
                    Some((s, e, g)) if s == session => (e, g),
                    _ => (0, 0),
                };
                let request = ViewRequest {
                    epoch,
                    after,
                    wait_ms: left.min(node_view::POLL).as_millis() as u64,
                    written_ms_ago: written.map(|w| w.elapsed().as_millis() as u64),
                    pod_uid,
                    keys: vec![self.liveness.key(&spec.id)],
                };
                let answer = self.ask_holder(&advertise, &session, &request).await?;
                if answer.epoch == epoch && answer.generation <= after && Instant::now() < deadline
                {
                    // Nothing newer yet: ask again (a holder that stopped answering shows within
                    // one poll).
                    continue;
                }
                (session, answer)
            };
            return self.seen_in_view(spec, &session, answer);
        }
    }

    /// One long poll of the holder's view (`POST /shared-session/node`); None when it does not
    /// answer with one.
    async fn ask_holder(
        &self,
        advertise: &str,
        session: &str,
        request: &ViewRequest,
    ) -> Option<ViewAnswer> {
        let sent = self
            .holder_http
            .post(format!("http://{advertise}{}", node_view::PATH))
            .header(shared::SESSION_HEADER, session)
            .json(request)
            .timeout(Duration::from_millis(request.wait_ms) + HOLDER_SLACK)
            .send()
            .await;
        match sent {
            Ok(answer) if answer.status().is_success() => match answer.json().await {
                Ok(view) => Some(view),
                Err(e) => {
                    tracing::debug!(error = %e, "the holder's node view could not be read; watching Consul");
                    None
                }
            },
            Ok(answer) => {
                tracing::debug!(status = %answer.status(), "the holder has no node view for us; watching Consul");
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "the holder did not answer for its node view; watching Consul");
                None
            }
        }
    }

    /// Our instance as a view's part shows it (like [`instance`](Self::instance)); None when the
    /// part does not vouch for it (not named, or absent from a read the ACLs filtered).
    fn seen_in_view(
        &self,
        spec: &ServiceSpec,
        session: &str,
        answer: ViewAnswer,
    ) -> Option<ServiceWatch> {
        if !answer.ids.contains(&spec.id) {
            return None;
        }
        let hash = format!(
            "{VIEW_VERSION}{session}:{}:{}",
            answer.epoch, answer.generation
        );
        let partial = answer.partial;
        let Some(service) = answer
            .services
            .into_iter()
            .filter_map(|v| serde_json::from_value::<AgentService>(v).ok())
            .find(|s| s.id == spec.id)
        else {
            return (!partial).then_some(ServiceWatch::Missing);
        };
        let checks = answer
            .checks
            .into_iter()
            .filter_map(|v| serde_json::from_value::<HealthCheck>(v).ok());
        Some(self.seen(spec, service, checks, hash))
    }

    /// Our instance, found as `service` beside the node's `checks`, as the reconciler sees it:
    /// with its check's status and output, and no meta when another sidecar's session holds its
    /// key (its instance, not ours).
    fn seen(
        &self,
        spec: &ServiceSpec,
        mut service: AgentService,
        checks: impl IntoIterator<Item = HealthCheck>,
        hash: String,
    ) -> ServiceWatch {
        if self.disowned().contains(&spec.id) {
            service.meta = None;
        }
        service.check = match checks.into_iter().find(|c| c.check_id == spec.check.id) {
            Some(c) => CheckSeen::Present {
                status: c.status,
                output: c.output,
            },
            None => CheckSeen::Missing,
        };
        ServiceWatch::Present {
            service: Box::new(service),
            hash,
        }
    }

    fn disowned(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.disowned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One `PUT /v1/txn`; `Ok(false)` when its first operation (a check on the liveness key)
    /// failed, nothing applied.
    async fn txn(
        &self,
        operation: &'static str,
        ops: &serde_json::Value,
    ) -> Result<bool, ConsulError> {
        self.txn_guarded(operation, ops, 1).await
    }

    /// [`txn`](Self::txn) whose first `guards` operations are checks on the liveness key:
    /// `Ok(false)` when one of them failed.
    async fn txn_guarded(
        &self,
        operation: &'static str,
        ops: &serde_json::Value,
        guards: usize,
    ) -> Result<bool, ConsulError> {
        // The first operations are the checks on the liveness key; another one failing (a
        // malformed registration) is a refusal, not a lost key.
        self.client
            .txn(operation, ops, |body| guard_failed(body, guards))
            .await
    }

    /// Every check on our virtual node (other sidecars' on the same Kubernetes node too), as
    /// the servers hold them (`GET /v1/health/node/:node`), blocking from `index` when given,
    /// and the answer's index (its version). `operation` names the request in metrics and errors.
    async fn node_checks(
        &self,
        operation: &'static str,
        index: Option<(&str, Duration)>,
    ) -> Result<(Vec<HealthCheck>, Option<String>), ConsulError> {
        let node = path_escape(&self.settings.node);
        let req = self
            .client
            .request(Method::GET, &format!("/v1/health/node/{node}"));
        let (req, timeout) = match index {
            Some((index, wait)) => (
                req.query(&[
                    ("index", if index.is_empty() { "0" } else { index }),
                    ("wait", &super::wait_param(wait)),
                ]),
                super::blocking_timeout(wait),
            ),
            None => (req, super::REQUEST_TIMEOUT),
        };
        let answer = self.client.send(operation, req, timeout).await?;
        let checks = serde_json::from_slice(&answer.body).map_err(|e| ConsulError::Decode {
            operation,
            reason: e.to_string(),
        })?;
        Ok((checks, answer.index))
    }

    /// Our instance as the servers hold it, from our virtual node alone (never the whole
    /// service: a change to another replica wakes no one but its own node's sidecars): the
    /// node's checks (`GET /v1/health/node/:node`, blocking from `index` when given, whose index
    /// is the version), then the instance's definition (`GET /v1/catalog/node-services/:node`
    /// filtered to its ID). A change between the two reads wakes the next watch at once.
    async fn instance(
        &self,
        spec: &ServiceSpec,
        index: Option<(&str, Duration)>,
    ) -> Result<ServiceWatch, ConsulError> {
        let node = path_escape(&self.settings.node);
        let operation = if index.is_some() {
            "watch_instance"
        } else {
            "read_instance"
        };
        let (checks, version) = self.node_checks(operation, index).await?;
        let filter = format!("ID == \"{}\"", spec.id);
        let req = self
            .client
            .request(Method::GET, &format!("/v1/catalog/node-services/{node}"))
            .query(&[("filter", filter.as_str())]);
        let definition = match self
            .client
            .send("read_instance", req, super::REQUEST_TIMEOUT)
            .await
        {
            Ok(a) => a,
            Err(ConsulError::Status { status: 404, .. }) => return Ok(ServiceWatch::Missing),
            Err(e) => return Err(e),
        };
        // `null` when the node is unknown, `"Services": null` when it has none.
        let found: Option<NodeServices> =
            serde_json::from_slice(&definition.body).map_err(|e| ConsulError::Decode {
                operation: "read_instance",
                reason: e.to_string(),
            })?;
        let Some(service) = found
            .and_then(|f| f.services)
            .and_then(|s| s.into_iter().find(|s| s.id == spec.id))
        else {
            return Ok(ServiceWatch::Missing);
        };
        Ok(self.seen(spec, service, checks, version.unwrap_or_default()))
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
            // A transaction's ACL check of a service's check needs the service's name.
            "ServiceName": spec.name,
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

/// The registration as one transaction: our session holds the instance's key `key`, then the
/// node (its meta `registration` changed, so a reaper's guarded removal of the node
/// read empty before fails), the service and its check.
pub fn registration_txn(
    settings: &CatalogSettings,
    spec: &ServiceSpec,
    status: CheckStatus,
    output: &str,
    key: &str,
    session: &str,
) -> serde_json::Value {
    let body = registration_body(settings, spec, status, output, true);
    let mut service = body["Service"].clone();
    service["ID"] = spec.id.clone().into();
    serde_json::json!([
        { "KV": { "Verb": "check-session", "Key": key, "Session": session } },
        { "Node": { "Verb": "set", "Node": {
            "Node": settings.node,
            "Address": settings.node_address,
            "Meta": {
                MANAGED_BY_KEY: MANAGED_BY_VALUE,
                REGISTERED_META: fastrand::u64(..).to_string(),
            },
        } } },
        { "Service": { "Verb": "set", "Node": settings.node, "Service": service } },
        { "Check": { "Verb": "set", "Check": body["Check"] } },
    ])
}

/// Whether a failed transaction's answer (409) names its first operation. The answer may be cut
/// short (errors keep 300 characters), so it is searched, not parsed.
fn guard_failed(body: &str, guards: usize) -> bool {
    let compact: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    (0..guards).any(|i| {
        compact.contains(&format!("\"OpIndex\":{i},"))
            || compact.contains(&format!("\"OpIndex\":{i}}}"))
    })
}

/// Node meta rewritten by every registration (see [`registration_txn`]).
/// (Consul reserves meta keys starting with `consul-`.)
pub const REGISTERED_META: &str = "registration";

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
        if let Some(found) = self.watch_view(spec, version, wait).await {
            return Ok(found);
        }
        // A version of the node view is no index of Consul's: read at once.
        let index = if version.starts_with(VIEW_VERSION) {
            ""
        } else {
            version
        };
        self.instance(spec, Some((index, wait))).await
    }

    async fn register(
        &self,
        spec: &ServiceSpec,
        status: CheckStatus,
        output: &str,
        _first: bool,
    ) -> Result<(), ConsulError> {
        // One transaction carries the service and its check with the verdict and its output,
        // guarded by the liveness key: it applies only while our session holds the key, so a
        // registration the servers hold past our drain (a leader election) fails instead of
        // landing as a ghost. The key first: a live instance is never without it.
        self.disowned().remove(&spec.id);
        self.liveness.hold(&spec.id, true).await?;
        let key = self.liveness.key(&spec.id);
        let Some(session) = self.liveness.current().await else {
            return Err(ConsulError::KeyHeld { key });
        };
        self.wrote(&spec.id);
        if self
            .txn(
                "catalog_register",
                &registration_txn(&self.settings, spec, status, output, &key, &session),
            )
            .await?
        {
            Ok(())
        } else {
            // The key is no longer our session's (lost meanwhile): take it again, then register.
            Err(ConsulError::KeyHeld { key })
        }
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
        // Guarded like the registration: only while our session holds the key.
        let key = self.liveness.key(&spec.id);
        let ours = self.liveness.current_or_previous().await?;
        if let Some(session) = &ours {
            let body = registration_body(&self.settings, spec, status, output, false);
            let mut ops = self.liveness.guard(&spec.id, session).await?;
            let guards = ops.len();
            ops.push(serde_json::json!({ "Check": { "Verb": "set", "Check": body["Check"] } }));
            self.wrote(&spec.id);
            match self
                .txn_guarded("catalog_status", &serde_json::Value::Array(ops), guards)
                .await
            {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                // The check's service (or node) is gone: "Missing service registration".
                Err(ConsulError::Status { status: 409, .. }) => {
                    return Err(ConsulError::NotFound {
                        operation: "catalog_status",
                        what: "instance",
                    });
                }
                Err(e) => return Err(e),
            }
        }
        match self.liveness.holder(&spec.id).await? {
            Some(other) if Some(&other) != ours.as_ref() => {
                // Another sidecar's session holds the key: its instance, not ours to mark.
                tracing::warn!(instance = %spec.id, key = %key, "another sidecar's session holds this instance's liveness key (the same ID on the same node): the instance is that sidecar's, and its status is left alone");
                self.disowned().insert(spec.id.clone());
                Ok(())
            }
            // The instance (or its check) is gone, or our session lost the key: read, then
            // register again (which takes the key first).
            _ => Err(ConsulError::NotFound {
                operation: "catalog_status",
                what: "instance",
            }),
        }
    }

    async fn deregister(&self, spec: &ServiceSpec) -> Result<(), ConsulError> {
        // Ownership is the key's session: the instance and its key go together, in one
        // transaction that checks our session holds the key. A key that is gone (our session
        // expired) lets the instance go alone, as a reaper would. A key that another session
        // holds (another sidecar with the same ID on the same node) means the instance is that
        // sidecar's: neither it nor the key is touched.
        let key = self.liveness.key(&spec.id);
        let node = self.settings.node.as_str();
        let [delete_service, delete_key] = deregistration(&key, node, &spec.id, &spec.name);
        if let Some(session) = self.liveness.current_or_previous().await? {
            let mut ops = self.liveness.guard(&spec.id, &session).await?;
            let guards = ops.len();
            ops.extend([delete_service.clone(), delete_key]);
            if self
                .txn_guarded("catalog_deregister", &serde_json::Value::Array(ops), guards)
                .await?
            {
                self.liveness.let_go(&spec.id);
                return Ok(());
            }
        }
        let ops = serde_json::json!([
            { "KV": { "Verb": "check-not-exists", "Key": key } },
            delete_service,
        ]);
        if self.txn("catalog_deregister", &ops).await? {
            self.liveness.let_go(&spec.id);
            return Ok(());
        }
        tracing::warn!(instance = %spec.id, key = %key, "another sidecar's session holds this instance's liveness key (the same ID on the same node): the instance is that sidecar's, and neither it nor the key is touched");
        self.liveness.let_go(&spec.id);
        self.disowned().insert(spec.id.clone());
        Ok(())
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

    async fn confirmed_gone(&self, _spec: &ServiceSpec) -> Result<bool, ConsulError> {
        // The read that found it gone was the servers' own.
        Ok(true)
    }

    async fn marked(
        &self,
        specs: &[ServiceSpec],
        status: CheckStatus,
        output: &str,
    ) -> Result<bool, ConsulError> {
        let (checks, _) = self.node_checks("node_checks", None).await?;
        let ours: Vec<&str> = specs.iter().map(|s| s.check.id.as_str()).collect();
        Ok(checks.iter().any(|c| {
            ours.contains(&c.check_id.as_str()) && c.status == status.as_str() && c.output == output
        }))
    }

    async fn drained(&self) {
        self.liveness.end().await;
        // Our virtual node, if nothing is left on it (other sidecars' instances or sessions).
        if let Err(e) = super::reaper::remove_if_empty(&self.client, &self.settings.node).await {
            tracing::debug!(error = %e, "could not remove the empty virtual node; a reaper's sweep will");
        }
    }

    async fn abandon(&self) {
        self.liveness.abandon().await;
    }

    async fn unworkable(&self) -> String {
        std::future::pending().await
    }
}

#[cfg(test)]
mod tests {
    use super::guard_failed;

    #[test]
    fn a_failed_key_check_is_told_from_another_failed_operation() {
        // Consul 1.22's answers, as the client keeps them (300 characters).
        let lost = "{\n    \"Results\": null,\n    \"Errors\": [\n        {\n            \"OpIndex\": 0,\n            \"What\": \"failed session check for key \\\"consul-registrar/instances/consul-registrar-kube-a/fixed-1\\\", current session \\\"6d3653fc";
        assert!(guard_failed(lost, 1));
        let refused = "{\n    \"Results\": null,\n    \"Errors\": [\n        {\n            \"OpIndex\": 2,\n            \"What\": \"Invalid Service Meta\"\n        }\n    ]\n}";
        assert!(!guard_failed(refused, 1));
        assert!(!guard_failed("{\"OpIndex\": 10, \"What\": \"x\"}", 2));
        assert!(guard_failed("{\"OpIndex\": 1, \"What\": \"x\"}", 2));
    }
}
