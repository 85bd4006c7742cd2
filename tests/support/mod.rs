//! The integration-test harness: real Consul agents (`consul agent -dev` on free loopback ports,
//! optionally with ACLs or HTTPS only), the real demo gRPC app, and the real sidecar binary
//! (`sidecar.rs`). Every process is killed on drop; a failing test prints the logs.
#![allow(dead_code)]

/// Pods on network namespaces: an app and the sidecar sharing a pod IP, a kubelet's termination.
pub mod podsim;
/// The real `consul-registrar` binary as a child process.
pub mod sidecar;

use std::future::Future;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

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

/// The `consul` binary from `scripts/consul.sh` (once per test process). Panics, never skips, with
/// the script's explanation of how to provide Consul.
pub fn consul_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/consul.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .expect("run scripts/consul.sh");
        assert!(
            out.status.success(),
            "no Consul binary for the integration tests:\n{}\nSet CONSUL_BIN to a consul 1.20+ binary, or install Go so scripts/consul.sh can build it.",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// The sidecar binary under test.
pub fn registrar_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_consul-registrar"))
}

/// A TCP port on 127.0.0.1 that is free when asked. Ports come from below Linux's ephemeral range
/// (32768+), so that no outgoing connection of a test process can take one between this call and
/// the bind; a per-process counter from a random start keeps parallel tests apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 12_000;
    const HIGH: u32 = 32_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        fastrand::u32(..(HIGH - LOW)),
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..(HIGH - LOW) {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % (HIGH - LOW);
        let port = (LOW + offset) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port between {LOW} and {HIGH}")
}

/// A plain HTTP client for loopback calls (installs rustls's crypto provider first).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Which Consul to start.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsulOptions {
    /// ACLs on, default policy deny, a management and a registrar token.
    pub acl: bool,
    /// HTTPS only, with a CA and a server certificate made by `consul tls`.
    pub tls: bool,
    /// Listen on this address instead of 127.0.0.1 (the pod simulation's bridge address).
    pub bind: Option<std::net::Ipv4Addr>,
}

/// A Consul dev agent on loopback ports of its own.
pub struct ConsulAgent {
    opts: ConsulOptions,
    http_port: u16,
    server_port: u16,
    serf_lan_port: u16,
    serf_wan_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    starts: u32,
}

impl ConsulAgent {
    /// Reserves ports and a directory without starting the agent.
    pub fn prepare(opts: ConsulOptions) -> ConsulAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = ConsulAgent {
            opts,
            http_port: free_port(),
            server_port: free_port(),
            serf_lan_port: free_port(),
            serf_wan_port: free_port(),
            dir,
            child: None,
            starts: 0,
        };
        if opts.tls {
            agent.make_certificates();
        }
        agent
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

    fn make_certificates(&self) {
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
        run(self.dir.path(), &["tls", "ca", "create"]);
        run(
            self.dir.path(),
            &["tls", "cert", "create", "-server", "-dc", "dc1"],
        );
        let wrong = self.dir.path().join("wrong");
        std::fs::create_dir_all(&wrong).expect("mkdir");
        run(&wrong, &["tls", "ca", "create"]);
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

    /// The log of the agent's latest start (each start gets a new file).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("consul-{}.log", self.starts))
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
        config
    }

    /// Starts the agent and waits until it has a leader (and, with ACLs, the registrar token).
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        let config_path = self.dir.path().join("config.json");
        std::fs::write(&config_path, self.config().to_string()).expect("write config");
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let mut cmd = Command::new(consul_bin());
        let ip = self.bind_ip();
        cmd.args(["agent", "-dev", "-bind", &ip, "-client", &ip])
            .args(["-node", &format!("test-{}", self.http_port)])
            .args(CONSUL_LISTENERS_OFF)
            .args(["-server-port", &self.server_port.to_string()])
            .args(["-serf-lan-port", &self.serf_lan_port.to_string()])
            .args(["-serf-wan-port", &self.serf_wan_port.to_string()])
            .arg("-config-file")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log);
        if !self.opts.tls {
            cmd.args(["-http-port", &self.http_port.to_string()]);
        }
        self.child = Some(cmd.spawn().expect("spawn consul"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "consul exited with {status} during start:\n{}",
                    tail(&self.log_path(), 60)
                );
            }
            if let Ok((200, leader)) = self.get("/v1/status/leader").await
                && leader.as_str().is_some_and(|l| !l.is_empty())
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "consul has no leader after 60 s:\n{}",
                tail(&self.log_path(), 60)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.opts.acl {
            self.create_registrar_token().await;
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
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the agent and starts it again on the same ports; dev mode keeps state in memory, so
    /// every registration is gone.
    pub async fn restart_wiped(&mut self) {
        self.stop();
        self.start().await;
    }

    /// A client that trusts the agent's CA and sends the management token.
    pub fn client(&self) -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10));
        if let Some(ca) = self.ca_file() {
            let pem = std::fs::read(ca).expect("read CA");
            b = b.tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).expect("CA PEM"));
        }
        if let Some(token) = self.management_token() {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert("X-Consul-Token", token.parse().expect("header"));
            b = b.default_headers(headers);
        }
        b.build().expect("client")
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

    fn ok_json(r: Result<(u16, Value), reqwest::Error>, what: &str) -> Value {
        match r {
            Ok((200, v)) => v,
            Ok((404, _)) => Value::Null,
            other => panic!("{what}: {other:?}"),
        }
    }

    /// `GET /v1/agent/service/:id`, or None when the agent does not have it.
    pub async fn agent_service(&self, id: &str) -> Option<Value> {
        let v = Self::ok_json(
            self.get(&format!("/v1/agent/service/{id}")).await,
            "agent service",
        );
        (!v.is_null()).then_some(v)
    }

    /// `GET /v1/catalog/service/:name`.
    pub async fn catalog_service(&self, name: &str) -> Vec<Value> {
        let v = Self::ok_json(
            self.get(&format!("/v1/catalog/service/{name}")).await,
            "catalog",
        );
        v.as_array().cloned().unwrap_or_default()
    }

    /// `GET /v1/health/service/:name`.
    pub async fn health_service(&self, name: &str) -> Vec<Value> {
        let v = Self::ok_json(
            self.get(&format!("/v1/health/service/{name}")).await,
            "health",
        );
        v.as_array().cloned().unwrap_or_default()
    }

    /// The aggregated status of instance `id`'s own checks as the catalog reports it:
    /// `critical` if any is critical, else `warning` if any warns, else `passing`; None if absent.
    pub async fn check_status(&self, name: &str, id: &str) -> Option<String> {
        let entries = match self.get(&format!("/v1/health/service/{name}")).await {
            Ok((200, v)) => v.as_array().cloned().unwrap_or_default(),
            _ => return None,
        };
        let entry = entries.iter().find(|e| e["Service"]["ID"] == id)?;
        let statuses: Vec<&str> = entry["Checks"]
            .as_array()?
            .iter()
            .filter(|c| c["ServiceID"] == id)
            .filter_map(|c| c["Status"].as_str())
            .collect();
        Some(
            if statuses.contains(&"critical") {
                "critical"
            } else if statuses.contains(&"warning") {
                "warning"
            } else {
                "passing"
            }
            .to_string(),
        )
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

/// How to start the demo app. The default: serving, with Watch, health services "" and
/// `helloworld.Greeter`, plain gRPC.
#[derive(Debug, Clone)]
pub struct DemoAppOptions {
    /// Start SERVING (`--start serving`), else NOT_SERVING.
    pub start_serving: bool,
    /// Answer Watch with UNIMPLEMENTED (`--no-watch`).
    pub no_watch: bool,
    /// Named health services besides "" (`--health-service`, repeated).
    pub health_services: Vec<String>,
    /// Also serve health services `svc-0` … `svc-{N-1}` (`--generate-services`).
    pub generate_services: usize,
    /// The tag in SayHello replies (`--name`); the default is the listen address.
    pub name: Option<String>,
    /// Serve gRPC over TLS with this certificate and key (PEM files).
    pub tls: Option<(PathBuf, PathBuf)>,
}

impl Default for DemoAppOptions {
    fn default() -> Self {
        DemoAppOptions {
            start_serving: true,
            no_watch: false,
            health_services: vec!["helloworld.Greeter".into()],
            generate_services: 0,
            name: None,
            tls: None,
        }
    }
}

/// The demo gRPC app (`examples/demo_app.rs`) on a free loopback port, with a control port.
pub struct DemoApp {
    opts: DemoAppOptions,
    port: u16,
    control: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

/// The demo app binary, `<target>/<profile>/examples/demo-app` beside the binary under test.
/// `cargo test` builds examples, but `cargo test --test NAME` does not, so it is brought up to date
/// once per test process with `cargo build --example demo-app` into the same target dir and
/// profile (a no-op when it already is).
pub fn demo_app_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let profile_dir = registrar_bin().parent().expect("target dir").to_path_buf();
        let bin = profile_dir.join("examples/demo-app");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--example", "demo-app"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        // Build into the same target dir as the binary under test (CARGO_TARGET_DIR may point
        // anywhere).
        if let Some(target) = profile_dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
        let status = cmd.status().expect("run cargo build --example demo-app");
        assert!(
            status.success() && bin.exists(),
            "building the demo app failed ({status}); expected it at {}",
            bin.display()
        );
        bin
    })
    .clone()
}

impl DemoApp {
    /// Starts the app on a free loopback port, with a control port, and waits until it prints
    /// that it is listening.
    pub async fn start(opts: DemoAppOptions) -> DemoApp {
        let mut app = DemoApp {
            opts,
            port: free_port(),
            control: free_port(),
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        app.spawn().await;
        app
    }

    async fn spawn(&mut self) {
        let log = std::fs::File::create(self.log_path()).expect("log");
        let mut cmd = Command::new(demo_app_bin());
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--control", &format!("127.0.0.1:{}", self.control)])
            .args([
                "--generate-services",
                &self.opts.generate_services.to_string(),
            ])
            .args([
                "--start",
                if self.opts.start_serving {
                    "serving"
                } else {
                    "not-serving"
                },
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log);
        for s in &self.opts.health_services {
            cmd.args(["--health-service", s]);
        }
        if self.opts.no_watch {
            cmd.arg("--no-watch");
        }
        if let Some(name) = &self.opts.name {
            cmd.args(["--name", name]);
        }
        if let Some((cert, key)) = &self.opts.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        self.child = Some(cmd.spawn().expect("spawn demo-app"));
        let log_path = self.log_path();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !tail(&log_path, 5).contains("demo-app listening on") {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "demo-app exited with {status} during start:\n{}",
                    tail(&log_path, 20)
                );
            }
            assert!(
                Instant::now() < deadline,
                "demo-app did not start within 20 s:\n{}",
                tail(&log_path, 20)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The gRPC port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The gRPC address, `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The HTTP control port (`POST /serving`, `POST /not-serving`, `GET /status`).
    pub fn control_port(&self) -> u16 {
        self.control
    }

    /// The file that receives the app's stdout and stderr.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("app.log")
    }

    /// The process id (0 when not running).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Flips every health service through the control port.
    pub async fn set_serving(&self, serving: bool) {
        self.control_post(serving, None).await;
    }

    /// Flips one health service (`""` is the whole server) through the control port.
    pub async fn set_service_serving(&self, service: &str, serving: bool) {
        self.control_post(serving, Some(service)).await;
    }

    async fn control_post(&self, serving: bool, service: Option<&str>) {
        let path = if serving { "serving" } else { "not-serving" };
        let mut req = http_client().post(format!("http://127.0.0.1:{}/{path}", self.control));
        if let Some(service) = service {
            req = req.query(&[("service", service)]);
        }
        let r = req.send().await.expect("demo-app control port");
        assert!(
            r.status().is_success(),
            "control port answered {}",
            r.status()
        );
    }

    /// `GET /status` of the control port: health service name → `Serving` / `NotServing`.
    pub async fn status(&self) -> std::collections::BTreeMap<String, String> {
        http_client()
            .get(format!("http://127.0.0.1:{}/status", self.control))
            .send()
            .await
            .expect("demo-app control port")
            .json()
            .await
            .expect("status JSON")
    }

    /// Sends a signal by name to the app (`USR1`, `USR2`, `STOP`, `CONT`, ...).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Makes every health service NOT_SERVING with SIGUSR1, as an operator would from outside.
    pub fn signal_not_serving(&self) {
        self.signal("USR1");
    }

    /// Makes every health service SERVING with SIGUSR2.
    pub fn signal_serving(&self) {
        self.signal("USR2");
    }

    /// Sends SIGTERM and waits up to `timeout` for the app to exit: its exit status, or None if it
    /// is still running (it is then left running; drop kills it).
    pub async fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.signal("TERM");
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the app (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same ports.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for DemoApp {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- demo-app log -----\n{}\n-----",
                tail(&self.log_path(), 40)
            );
        }
    }
}
