//! Consul agents on loopback ports of their own: a `-dev` server (optionally with ACLs, HTTPS only,
//! or on another address), a client agent joined to one, or one server of a
//! [`ConsulCluster`](crate::ConsulCluster); and reading Consul's answers (catalog, health, KV,
//! sessions).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{Proc, consul_bin, free_port, tail};

/// The ACL bootstrap (management) token of ACL-enabled agents.
pub const MANAGEMENT_TOKEN: &str = "0b5cbf21-1f43-4b42-b5b9-5d9b3b8c1e01";
/// The SecretID of the token with just a registrar's rights (fixed so restarts recreate it).
pub const REGISTRAR_TOKEN: &str = "7f0e3c1a-7d52-4e0c-9b9a-3c1d2e4f5a60";
/// The ACL policy of [`REGISTRAR_TOKEN`].
pub const REGISTRAR_RULES: &str = r#"service_prefix "" { policy = "write" }
node_prefix "" { policy = "read" }
agent_prefix "" { policy = "read" }"#;

/// Arguments that turn off a Consul agent's DNS and gRPC listeners: tests reach agents over HTTP
/// only, and fewer listeners mean fewer ports to find free.
pub const CONSUL_LISTENERS_OFF: [&str; 6] = [
    "-dns-port",
    "-1",
    "-grpc-port",
    "-1",
    "-grpc-tls-port",
    "-1",
];

/// The status of instance `id` in a `/v1/health/service/<name>` answer, as the catalog aggregates
/// its own checks: `critical` if any is critical, else `warning` if any warns, else `passing`;
/// None when the instance is absent.
pub fn instance_status(entries: &Value, id: &str) -> Option<&'static str> {
    let entry = entries
        .as_array()?
        .iter()
        .find(|e| e["Service"]["ID"] == id)?;
    let statuses: Vec<&str> = entry["Checks"]
        .as_array()?
        .iter()
        .filter(|c| c["ServiceID"] == id)
        .filter_map(|c| c["Status"].as_str())
        .collect();
    Some(if statuses.contains(&"critical") {
        "critical"
    } else if statuses.contains(&"warning") {
        "warning"
    } else {
        "passing"
    })
}

/// Which Consul to start. The default: a `-dev` server on 127.0.0.1 with Consul's `-dev` logging.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsulOptions {
    /// ACLs on, default policy deny, a management and a registrar token.
    pub acl: bool,
    /// HTTPS only, with a CA and a server certificate made by `consul tls`.
    pub tls: bool,
    /// Listen on this address instead of 127.0.0.1 (the pod simulation's bridge address).
    pub bind: Option<std::net::Ipv4Addr>,
    /// A client agent (not `-dev`, a data directory of its own) joining the server whose Serf LAN
    /// port on the same address this is ([`ConsulAgent::serf_lan_port`]).
    pub join: Option<u16>,
    /// The node name (default `test-<http port>`).
    pub node: Option<&'static str>,
    /// `-log-level` (default: Consul's, DEBUG for `-dev`, which logs every HTTP request).
    pub log_level: Option<&'static str>,
    /// `limits { http_max_conns_per_client = N }` (Consul's default is 200).
    pub http_max_conns_per_client: Option<u32>,
}

/// A Consul agent on loopback ports of its own. Dropping it kills the agent; if the test is
/// failing, the end of its log is printed.
pub struct ConsulAgent {
    opts: ConsulOptions,
    http_port: u16,
    server_port: u16,
    serf_lan_port: u16,
    serf_wan_port: u16,
    dir: tempfile::TempDir,
    log_file: Option<PathBuf>,
    proc: Option<Proc>,
    starts: u32,
    /// Set for a server of a cluster: the Serf LAN ports of the other servers (on the same
    /// address), which it joins; the cluster bootstraps once all of them are up.
    cluster_peers: Option<Vec<u16>>,
}

impl ConsulAgent {
    /// Reserves ports and a directory without starting the agent.
    pub fn prepare(opts: ConsulOptions) -> ConsulAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        if opts.tls {
            make_certificates(dir.path());
        }
        ConsulAgent {
            opts,
            http_port: free_port(),
            server_port: free_port(),
            serf_lan_port: free_port(),
            serf_wan_port: free_port(),
            dir,
            log_file: None,
            proc: None,
            starts: 0,
            cluster_peers: None,
        }
    }

    /// Makes a prepared agent a server of a cluster (`-server`, a data directory of its own,
    /// `-bootstrap-expect` = peers + 1, `-retry-join` each peer's Serf LAN port on the same
    /// address, fast Raft timing).
    pub(crate) fn join_cluster(&mut self, peers: Vec<u16>) {
        self.cluster_peers = Some(peers);
    }

    /// The data directory of a cluster server.
    pub(crate) fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A plain dev agent, started.
    pub async fn start_dev() -> ConsulAgent {
        Self::start_with(ConsulOptions::default()).await
    }

    /// An agent of the given kind, started.
    pub async fn start_with(opts: ConsulOptions) -> ConsulAgent {
        let mut agent = Self::prepare(opts);
        agent.start().await;
        agent
    }

    /// Appends the log of every start to `path` instead of a file per start in the agent's
    /// temporary directory.
    pub fn log_to(&mut self, path: PathBuf) {
        self.log_file = Some(path);
    }

    /// The HTTP(S) base URL, e.g. `http://127.0.0.1:8500`.
    pub fn http_addr(&self) -> String {
        let scheme = if self.opts.tls { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.bind_ip(), self.http_port)
    }

    fn bind_ip(&self) -> String {
        self.opts
            .bind
            .map_or("127.0.0.1".to_string(), |ip| ip.to_string())
    }

    /// The HTTP (or, for TLS agents, HTTPS) port.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The Serf LAN port, which a client agent joins ([`ConsulOptions::join`]).
    pub fn serf_lan_port(&self) -> u16 {
        self.serf_lan_port
    }

    /// The server RPC (Raft) port: `/v1/status/leader` names the leader by it.
    pub fn server_port(&self) -> u16 {
        self.server_port
    }

    /// The node name of the agent itself (`-node`).
    pub fn node_name(&self) -> String {
        self.opts
            .node
            .map_or_else(|| format!("test-{}", self.http_port), str::to_string)
    }

    /// Whether the process was started and not stopped (it may still have crashed).
    pub fn is_running(&self) -> bool {
        self.proc.is_some()
    }

    /// The ACL bootstrap token ([`MANAGEMENT_TOKEN`]); None without ACLs.
    pub fn management_token(&self) -> Option<&'static str> {
        self.opts.acl.then_some(MANAGEMENT_TOKEN)
    }

    /// The token with just a registrar's rights ([`REGISTRAR_TOKEN`]); None without ACLs.
    pub fn registrar_token(&self) -> Option<&'static str> {
        self.opts.acl.then_some(REGISTRAR_TOKEN)
    }

    /// The CA that signed the agent's certificate (TLS agents).
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.opts
            .tls
            .then(|| self.dir.path().join("consul-agent-ca.pem"))
    }

    /// The agent's server certificate and key (valid for localhost and 127.0.0.1), which tests
    /// also use to serve the demo app over TLS.
    pub fn server_cert(&self) -> Option<(PathBuf, PathBuf)> {
        self.opts.tls.then(|| {
            let d = self.dir.path();
            (
                d.join("dc1-server-consul-0.pem"),
                d.join("dc1-server-consul-0-key.pem"),
            )
        })
    }

    /// A CA that did not sign it.
    pub fn wrong_ca_file(&self) -> Option<PathBuf> {
        self.opts
            .tls
            .then(|| self.dir.path().join("wrong/consul-agent-ca.pem"))
    }

    /// The log of the agent's latest start (each start gets a new file unless
    /// [`log_to`](Self::log_to) named one).
    pub fn log_path(&self) -> PathBuf {
        self.log_file
            .clone()
            .unwrap_or_else(|| self.dir.path().join(format!("consul-{}.log", self.starts)))
    }

    /// The process id (0 when not running).
    pub fn pid(&self) -> u32 {
        self.proc.as_ref().and_then(Proc::pid).unwrap_or(0)
    }

    /// The remote ports of the agent process's established TCP connections (Linux: its socket
    /// descriptors matched against `/proc/net/tcp`). A client agent holds one to the server it
    /// sends its RPCs to ([`ConsulCluster::rpc_server_of`](crate::ConsulCluster::rpc_server_of)).
    pub fn connected_ports(&self) -> Vec<u16> {
        let pid = self.pid();
        if pid == 0 {
            return Vec::new();
        }
        let inodes: std::collections::HashSet<String> =
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .filter_map(|target| {
                    let t = target.to_string_lossy().into_owned();
                    t.strip_prefix("socket:[")
                        .and_then(|rest| rest.strip_suffix(']'))
                        .map(str::to_string)
                })
                .collect();
        let mut ports = Vec::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let text = std::fs::read_to_string(table).unwrap_or_default();
            for line in text.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
                if fields.len() < 10 || fields[3] != "01" || !inodes.contains(fields[9]) {
                    continue;
                }
                if let Some(port) = fields[2]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                {
                    ports.push(port);
                }
            }
        }
        ports
    }

    /// The exit status if the agent has exited on its own.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.proc.as_mut().and_then(Proc::exited)
    }

    fn config(&self) -> Value {
        let mut config = serde_json::json!({});
        if self.opts.acl {
            config["acl"] = serde_json::json!({
                "enabled": true,
                "default_policy": "deny",
                "enable_token_persistence": false,
                "tokens": { "initial_management": MANAGEMENT_TOKEN, "agent": MANAGEMENT_TOKEN },
            });
        }
        if self.opts.tls {
            let d = self.dir.path();
            config["ports"] = serde_json::json!({ "http": -1, "https": self.http_port });
            config["tls"] = serde_json::json!({ "defaults": {
                "ca_file": d.join("consul-agent-ca.pem"),
                "cert_file": d.join("dc1-server-consul-0.pem"),
                "key_file": d.join("dc1-server-consul-0-key.pem"),
                "verify_incoming": false,
            }});
        }
        if let Some(n) = self.opts.http_max_conns_per_client {
            config["limits"] = serde_json::json!({ "http_max_conns_per_client": n });
        }
        if self.cluster_peers.is_some() {
            // Consul's production timing is 5× slower; 1 is what `-dev` uses.
            config["performance"] = serde_json::json!({ "raft_multiplier": 1 });
        }
        config
    }

    /// Starts the agent process without waiting for it (see [`start`](Self::start)).
    pub fn spawn(&mut self) {
        assert!(self.proc.is_none(), "already running");
        self.starts += 1;
        let config_path = self.dir.path().join("config.json");
        std::fs::write(&config_path, self.config().to_string()).expect("write config");
        let mut cmd = Command::new(consul_bin());
        let ip = self.bind_ip();
        cmd.arg("agent");
        match (self.opts.join, &self.cluster_peers) {
            (_, Some(peers)) => {
                let data = self.data_dir();
                std::fs::create_dir_all(&data).expect("data dir");
                cmd.arg("-server")
                    .args(["-bootstrap-expect", &(peers.len() + 1).to_string()])
                    .arg("-data-dir")
                    .arg(data)
                    .arg("-disable-keyring-file")
                    .args(["-retry-interval", "500ms"]);
                for port in peers {
                    cmd.args(["-retry-join", &format!("{ip}:{port}")]);
                }
            }
            (None, None) => {
                cmd.arg("-dev");
            }
            (Some(serf_lan), None) => {
                let data = self.dir.path().join("data");
                std::fs::create_dir_all(&data).expect("data dir");
                cmd.arg("-server=false")
                    .arg("-data-dir")
                    .arg(data)
                    .args(["-retry-join", &format!("{ip}:{serf_lan}")]);
            }
        }
        let node = self.node_name();
        cmd.args(["-bind", &ip, "-client", &ip, "-node", &node])
            .args(CONSUL_LISTENERS_OFF)
            .args(["-server-port", &self.server_port.to_string()])
            .args(["-serf-lan-port", &self.serf_lan_port.to_string()])
            .args(["-serf-wan-port", &self.serf_wan_port.to_string()])
            .arg("-config-file")
            .arg(&config_path);
        if let Some(level) = self.opts.log_level {
            cmd.args(["-log-level", level]);
        }
        if !self.opts.tls {
            cmd.args(["-http-port", &self.http_port.to_string()]);
        }
        self.proc = Some(Proc::spawn(cmd, self.log_path()));
    }

    /// Starts the agent and waits until it has a leader (and, with ACLs, the registrar token).
    pub async fn start(&mut self) {
        self.spawn();
        self.wait_for_leader(Duration::from_secs(60)).await;
        if self.opts.acl {
            self.create_registrar_token().await;
        }
    }

    /// Waits up to `timeout` until the agent knows a leader: its Raft address (`ip:server port`).
    /// Panics if the agent exits meanwhile or no leader comes.
    pub async fn wait_for_leader(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                panic!(
                    "consul exited with {status} during start:\n{}",
                    tail(&self.log_path(), 60)
                );
            }
            if let Some(leader) = self.leader().await {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "consul has no leader after {timeout:?}:\n{}",
                tail(&self.log_path(), 60)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The leader this agent knows (`GET /v1/status/leader`: `ip:server port`), None when it knows
    /// none or does not answer.
    pub async fn leader(&self) -> Option<String> {
        match self.get("/v1/status/leader").await {
            Ok((200, leader)) => leader.as_str().filter(|l| !l.is_empty()).map(String::from),
            _ => None,
        }
    }

    async fn create_registrar_token(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let policy = serde_json::json!({ "Name": "registrar", "Rules": REGISTRAR_RULES });
        let token = serde_json::json!({
            "SecretID": REGISTRAR_TOKEN,
            "Description": "consul-registrar tests",
            "Policies": [{ "Name": "registrar" }],
        });
        loop {
            let p = self.put("/v1/acl/policy", &policy).await;
            let t = self.put("/v1/acl/token", &token).await;
            if matches!(p, Ok(200)) && matches!(t, Ok(200)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "could not create the registrar token: {p:?} {t:?}\n{}",
                tail(&self.log_path(), 40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the agent; its ports stay reserved for a later [`start`](Self::start).
    pub fn stop(&mut self) {
        self.proc = None;
    }

    /// Kills the agent and starts it again on the same ports; dev mode keeps state in memory, so
    /// every registration is gone.
    pub async fn restart_wiped(&mut self) {
        self.stop();
        self.start().await;
    }

    /// A new client that trusts the agent's CA and sends the management token. Each call of
    /// [`get`](Self::get) and [`put`](Self::put) makes one, as the harness always did: a test that
    /// polls a large answer every 20 ms then loads Consul no more than it did before.
    pub fn client(&self) -> reqwest::Client {
        http_client_for(&self.opts, self.dir.path())
    }

    /// GET `path`: (status, JSON body or Null).
    pub async fn get(&self, path: &str) -> Result<(u16, Value), reqwest::Error> {
        let r = self
            .client()
            .get(format!("{}{path}", self.http_addr()))
            .send()
            .await?;
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(Value::Null);
        Ok((status, body))
    }

    /// PUT `path` with a JSON body: the status.
    pub async fn put(&self, path: &str, body: &Value) -> Result<u16, reqwest::Error> {
        let r = self
            .client()
            .put(format!("{}{path}", self.http_addr()))
            .json(body)
            .send()
            .await?;
        Ok(r.status().as_u16())
    }

    /// GET `path`: the JSON body on 200, Null on 404. A 5xx or a transport error (a server without
    /// a leader, one just killed) is retried for up to 10 s, then panics naming `what`.
    async fn read_json(&self, path: &str, what: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.get(path).await {
                Ok((200, v)) => return v,
                Ok((404, _)) => return Value::Null,
                Ok((status, _)) if status < 500 => panic!("{what}: {status}"),
                other if Instant::now() >= deadline => panic!("{what}: {other:?}"),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// `GET /v1/agent/service/:id`, or None when the agent does not have it.
    pub async fn agent_service(&self, id: &str) -> Option<Value> {
        let v = self
            .read_json(&format!("/v1/agent/service/{id}"), "agent service")
            .await;
        (!v.is_null()).then_some(v)
    }

    /// `GET /v1/catalog/service/:name`.
    pub async fn catalog_service(&self, name: &str) -> Vec<Value> {
        let v = self
            .read_json(&format!("/v1/catalog/service/{name}"), "catalog")
            .await;
        v.as_array().cloned().unwrap_or_default()
    }

    /// `GET /v1/health/service/:name`.
    pub async fn health_service(&self, name: &str) -> Vec<Value> {
        let v = self
            .read_json(&format!("/v1/health/service/{name}"), "health")
            .await;
        v.as_array().cloned().unwrap_or_default()
    }

    /// The aggregated status of instance `id`'s own checks as the catalog reports it (see
    /// [`instance_status`]); None if absent or Consul does not answer.
    pub async fn check_status(&self, name: &str, id: &str) -> Option<String> {
        match self.get(&format!("/v1/health/service/{name}")).await {
            Ok((200, v)) => instance_status(&v, id).map(str::to_string),
            _ => None,
        }
    }

    /// Waits up to `timeout` for instance `id` of service `name` to show `status` in the catalog
    /// ([`ConsulAgent::check_status`]), or to be gone when `status` is None; true if it did.
    pub async fn wait_for_status<'a>(
        &self,
        name: &str,
        id: &str,
        status: impl Into<Option<&'a str>>,
        timeout: Duration,
    ) -> bool {
        let status = status.into();
        crate::wait_until(timeout, || async {
            self.check_status(name, id).await.as_deref() == status
        })
        .await
    }

    /// `GET /v1/catalog/node/:node`: the node and its services (`{"Node": …, "Services": {id: …}}`),
    /// or None when the catalog has no such node.
    pub async fn catalog_node(&self, node: &str) -> Option<Value> {
        let v = self
            .read_json(&format!("/v1/catalog/node/{node}"), "catalog node")
            .await;
        (!v.is_null()).then_some(v)
    }

    /// The nodes instance `id` of service `name` is registered on, one entry per registration (so
    /// a duplicate shows as two).
    pub async fn nodes_of(&self, name: &str, id: &str) -> Vec<String> {
        self.catalog_service(name)
            .await
            .iter()
            .filter(|e| e["ServiceID"] == id)
            .filter_map(|e| e["Node"].as_str().map(String::from))
            .collect()
    }

    /// The keys under `prefix` (`GET /v1/kv/<prefix>?keys`), empty when there are none.
    pub async fn kv_keys(&self, prefix: &str) -> Vec<String> {
        let v = self
            .read_json(&format!("/v1/kv/{prefix}?keys"), "kv keys")
            .await;
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k.as_str().map(String::from))
            .collect()
    }

    /// The KV entry `key` (`{"Key", "Value" (base64), "Session", …}`), None when absent.
    pub async fn kv_entry(&self, key: &str) -> Option<Value> {
        let v = self.read_json(&format!("/v1/kv/{key}"), "kv entry").await;
        v.as_array().and_then(|a| a.first()).cloned()
    }

    /// `GET /v1/session/info/:id`: the session, None once it is gone.
    pub async fn session(&self, id: &str) -> Option<Value> {
        let v = self
            .read_json(&format!("/v1/session/info/{id}"), "session info")
            .await;
        v.as_array().and_then(|a| a.first()).cloned()
    }

    /// `GET /v1/session/node/:node`: the sessions on a node.
    pub async fn sessions_on(&self, node: &str) -> Vec<Value> {
        let v = self
            .read_json(&format!("/v1/session/node/{node}"), "node sessions")
            .await;
        v.as_array().cloned().unwrap_or_default()
    }

    /// `PUT /v1/catalog/register` (as an operator or another tool would); asserts 200.
    pub async fn catalog_register(&self, body: &Value) {
        let status = self
            .put("/v1/catalog/register", body)
            .await
            .expect("catalog register");
        assert_eq!(status, 200, "catalog register {body}");
    }

    /// `PUT /v1/catalog/deregister` (as an operator would); asserts 200.
    pub async fn catalog_deregister(&self, body: &Value) {
        let status = self
            .put("/v1/catalog/deregister", body)
            .await
            .expect("catalog deregister");
        assert_eq!(status, 200, "catalog deregister {body}");
    }

    /// Registers a service directly with the agent (as someone else would).
    pub async fn register_raw(&self, body: Value) {
        let status = self
            .put("/v1/agent/service/register", &body)
            .await
            .expect("register");
        assert_eq!(status, 200, "register {body}");
    }

    /// Deregisters a service directly (as an operator would).
    pub async fn deregister_raw(&self, id: &str) {
        let status = self
            .put(&format!("/v1/agent/service/deregister/{id}"), &Value::Null)
            .await
            .expect("deregister");
        assert_eq!(status, 200, "deregister {id}");
    }
}

impl Drop for ConsulAgent {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "----- consul log (last 200 lines) -----\n{}\n-----",
                tail(&self.log_path(), 200)
            );
        }
    }
}

/// A CA and a server certificate for dc1 in `dir`, and another CA in `dir/wrong`.
fn make_certificates(dir: &Path) {
    let run = |dir: &Path, args: &[&str]| {
        let out = Command::new(consul_bin())
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run consul tls");
        assert!(
            out.status.success(),
            "consul {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(dir, &["tls", "ca", "create"]);
    run(dir, &["tls", "cert", "create", "-server", "-dc", "dc1"]);
    let wrong = dir.join("wrong");
    std::fs::create_dir_all(&wrong).expect("mkdir");
    run(&wrong, &["tls", "ca", "create"]);
}

/// The client of an agent: trusts its CA, sends the management token.
fn http_client_for(opts: &ConsulOptions, dir: &Path) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10));
    if opts.tls {
        let pem = std::fs::read(dir.join("consul-agent-ca.pem")).expect("read CA");
        b = b.tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).expect("CA PEM"));
    }
    if opts.acl {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("X-Consul-Token", MANAGEMENT_TOKEN.parse().expect("header"));
        b = b.default_headers(headers);
    }
    b.build().expect("client")
}
