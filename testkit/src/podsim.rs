//! A pod simulation from Linux network namespaces, real processes and real signals.
//!
//! A [`Network`] is a bridge in the root namespace (the "node", which also runs Consul on the
//! bridge address) with a /24 of its own. [`Network::node`] adds a simulated Kubernetes node (a
//! name and one more address on the bridge, the node's `HOST_IP`) for pods whose sidecar runs in
//! catalog mode ([`Mode::Catalog`]): the sidecar gets `NODE_NAME` and `HOST_IP` from it as the
//! Downward API would give them, and registers on that node's virtual Consul node. A [`Pod`] is a namespace with its own IP on that bridge,
//! where an app and the sidecar share the pod's localhost, as containers of a Kubernetes pod do.
//! [`Pod::terminate`] plays the kubelet: optional preStop `GET /drain?wait=true` to the pod IP,
//! SIGTERM (classic sidecar: app and sidecar at once; native sidecar: the app first, the sidecar
//! after the app has exited), a grace period, then SIGKILL.
//!
//! Needs root and `ip` (iproute2). Only this simulation's own addresses are ever targeted.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

pub use crate::{Proc, go_peers};
use crate::{demo_app_bin, http_client, registrar_bin};

/// The tutorial's Go client sending steady traffic, discovering `hello` through Consul.
pub struct TrafficClient {
    proc: Proc,
    report: PathBuf,
    _dir: tempfile::TempDir,
}

impl TrafficClient {
    /// Starts it (in the root namespace, the node) against Consul at `consul` (`host:port`).
    pub fn start(consul: &str, rate: u32) -> TrafficClient {
        let dir = tempfile::tempdir().expect("tempdir");
        let report = dir.path().join("report.json");
        let mut cmd = Command::new(go_peers().join("hello-client"));
        cmd.args([
            "-consul",
            consul,
            "-service",
            "hello",
            "-rate",
            &rate.to_string(),
        ])
        .args(["-duration", "10m", "-timeout", "1s", "-out"])
        .arg(&report);
        let proc = Proc::spawn(cmd, dir.path().join("client.log"));
        TrafficClient {
            proc,
            report,
            _dir: dir,
        }
    }

    /// Stops it (SIGTERM) and returns its JSON report.
    pub fn finish(mut self) -> serde_json::Value {
        self.proc.signal("TERM");
        let exited = self
            .proc
            .wait_until(Instant::now() + Duration::from_secs(20));
        assert!(
            exited.is_some(),
            "hello-client did not stop:\n{}",
            self.proc.logs()
        );
        let text = std::fs::read_to_string(&self.report)
            .unwrap_or_else(|_| panic!("no report from hello-client:\n{}", self.proc.logs()));
        serde_json::from_str(&text).expect("JSON report")
    }
}

/// Why the simulation cannot run here, if it cannot (not root, no `ip`).
pub fn unavailable() -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .unwrap_or_default();
    if uid != "0" {
        return Some("the pod simulation needs root (ip netns)".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("the pod simulation needs iproute2 (`ip`)".into());
    }
    None
}

/// Fails the calling test, saying why, when the simulation cannot run here. A scenario that needs
/// the simulation never passes without running: mark it
/// `#[ignore = "needs root: network namespaces (make podsim)"]`, so that a plain `cargo test` lists
/// it as ignored, and call this first; `make podsim` (`scripts/podsim.sh`) runs the ignored
/// scenarios as root and, without root, refuses and names every scenario it did not run.
pub fn require_available() {
    if let Some(why) = unavailable() {
        panic!("NOT RUN: {why}; run the pod simulation as root: make podsim");
    }
}

/// Kept for tests written against the earlier harness: never skips any more, it fails the test
/// like [`require_available`] when the simulation cannot run, and returns false otherwise.
pub fn skip_unless_available() -> bool {
    require_available();
    false
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bridge with a /24 (`10.213.<id>.0/24`, gateway `.254`) and the namespaces on it.
pub struct Network {
    id: u8,
    bridge: String,
    next_host: AtomicU8,
    /// The next simulated node's address (counting down from the gateway, `.254`).
    next_node: AtomicU8,
    namespaces: Mutex<Vec<String>>,
}

impl Network {
    /// Creates a bridge with an unused id (several simulations may run at once).
    #[allow(
        clippy::new_without_default,
        reason = "it creates a bridge: no default value"
    )]
    pub fn new() -> Network {
        let start = (std::process::id() % 200) as u8;
        for i in 0..200u8 {
            let id = 20 + (start.wrapping_add(i) % 200);
            let bridge = format!("crb{id}");
            let ok = Command::new("ip")
                .args(["link", "add", &bridge, "type", "bridge"])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                ip(&[
                    "addr",
                    "add",
                    &format!("10.213.{id}.254/24"),
                    "dev",
                    &bridge,
                ]);
                // A MAC address of its own (locally administered), or the bridge would take the
                // lowest of its ports' and move it as pods join, cutting off pods that resolved
                // the old one until their ARP entries expire.
                ip(&[
                    "link",
                    "set",
                    &bridge,
                    "address",
                    &format!("02:00:0a:d5:{id:02x}:fe"),
                ]);
                ip(&["link", "set", &bridge, "up"]);
                return Network {
                    id,
                    bridge,
                    next_host: AtomicU8::new(1),
                    next_node: AtomicU8::new(254),
                    namespaces: Mutex::new(Vec::new()),
                };
            }
        }
        panic!("no free bridge id for the pod simulation");
    }

    /// The node's address on the bridge (where Consul listens).
    pub fn gateway(&self) -> String {
        format!("10.213.{}.254", self.id)
    }

    /// A simulated Kubernetes node called `name`: the first one has the gateway's address, each
    /// further one another address on the bridge (`.253`, `.252`, ...), in the root namespace.
    pub fn node(&self, name: &str) -> SimNode {
        let host = self.next_node.fetch_sub(1, Ordering::SeqCst);
        assert!(host > 250, "too many simulated nodes");
        let addr = format!("10.213.{}.{host}", self.id);
        if host != 254 {
            ip(&["addr", "add", &format!("{addr}/24"), "dev", &self.bridge]);
        }
        SimNode {
            name: name.to_string(),
            addr,
        }
    }

    /// The veth pair of the namespace with address `.host`: the end on the bridge, the end inside.
    fn veth_pair(&self, host: u8) -> (String, String) {
        (
            format!("cr{}v{host}", self.id),
            format!("cr{}p{host}", self.id),
        )
    }

    /// A new namespace with its own IP on the bridge.
    pub fn namespace(&self, name: &str) -> Netns {
        let host = self.next_host.fetch_add(1, Ordering::SeqCst);
        assert!(host < 250, "too many namespaces");
        let ns = format!("cr{}-{name}", self.id);
        let (outer, inner) = self.veth_pair(host);
        // A namespace outlives `ip netns del` while a process is still in it, and so does its
        // veth pair: a simulation that ran before with this id may have left one behind.
        for stale in [&["netns", "del", &ns][..], &["link", "del", &outer][..]] {
            let _ = Command::new("ip")
                .args(stale)
                .stderr(Stdio::null())
                .status();
        }
        ip(&["netns", "add", &ns]);
        self.namespaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ns.clone());
        ip(&[
            "link", "add", &outer, "type", "veth", "peer", "name", &inner,
        ]);
        ip(&["link", "set", &outer, "master", &self.bridge, "up"]);
        ip(&["link", "set", &inner, "netns", &ns]);
        let addr = format!("10.213.{}.{host}", self.id);
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            &inner,
        ]);
        ip(&["-n", &ns, "link", "set", &inner, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        Netns {
            name: ns,
            addr,
            port: outer,
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for ns in self
            .namespaces
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        // The veths too (deleting one end deletes both): a namespace that a lingering process
        // keeps alive would keep them, and the next simulation with this id could not add them.
        for host in 1..self.next_host.load(Ordering::SeqCst) {
            let _ = Command::new("ip")
                .args(["link", "del", &self.veth_pair(host).0])
                .stderr(Stdio::null())
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

/// A network namespace with one address.
#[derive(Debug, Clone)]
pub struct Netns {
    pub name: String,
    pub addr: String,
    /// Its veth's end on the bridge (in the root namespace): the pod's port on the node.
    pub port: String,
}

impl Netns {
    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Cuts (or heals) every packet from this namespace to `addr`: silent drops on established
    /// connections, immediate failures for new ones.
    pub fn cut_path_to(&self, addr: &str, cut: bool) {
        let verb = if cut { "add" } else { "del" };
        ip(&[
            "-n",
            &self.name,
            "route",
            verb,
            "blackhole",
            &format!("{addr}/32"),
        ]);
    }
}

/// A simulated Kubernetes node: what the Downward API gives a pod as `NODE_NAME` and `HOST_IP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimNode {
    pub name: String,
    pub addr: String,
}

impl SimNode {
    /// The virtual Consul node a catalog-mode sidecar on this node registers on, by the default
    /// naming rule (`consul-registrar-` + `NODE_NAME`).
    pub fn consul_node(&self) -> String {
        format!("consul-registrar-{}", self.name)
    }
}

/// How a pod's sidecar registers.
#[derive(Debug, Clone, Copy)]
pub enum Mode<'a> {
    /// Through the agent API of the Consul it is given (`consul.mode` left at its default).
    Agent,
    /// `consul.mode: catalog` on the Consul servers it is given, on the virtual node of `node`
    /// (`NODE_NAME`, `HOST_IP`; `consul.catalog.node` and `nodeAddress` left at their defaults),
    /// with a session of `session_ttl`.
    Catalog {
        node: &'a SimNode,
        session_ttl: &'a str,
    },
}

impl Mode<'_> {
    /// `agent` or `catalog`, for scenario names and figures.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Agent => "agent",
            Mode::Catalog { .. } => "catalog",
        }
    }
}

/// Which app a pod runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum App {
    /// The Go hello server from `tests/interop/go` (grpc-go's standard health server).
    GoHello,
    /// The demo app (tonic-health).
    Demo,
}

/// How the kubelet ends a pod.
#[derive(Debug, Clone, Copy)]
pub struct Termination {
    /// Call the sidecar's `/drain?wait=true` first, as the app container's preStop hook.
    pub pre_stop: bool,
    /// Native sidecar: SIGTERM to the sidecar only after the app exited.
    pub native_sidecar: bool,
    pub grace: Duration,
}

/// One pod: a namespace with an app on :50051 and the sidecar (admin :9102) sharing localhost.
pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub app: Proc,
    pub sidecar: Proc,
    pub id: String,
    pub app_kind: App,
    /// The simulated node of a catalog-mode pod (None in agent mode).
    pub node: Option<SimNode>,
    dir: tempfile::TempDir,
}

pub const APP_PORT: u16 = 50051;
pub const ADMIN_PORT: u16 = 9102;
/// The drain token every pod's sidecar gets (`CONSUL_REGISTRAR_DRAIN_TOKEN`) and the kubelet's
/// preStop sends (`X-Drain-Token`), as the chart provisions it.
pub const DRAIN_TOKEN: &str = "podsim-drain-token";

/// The sidecar of pod `name` in `ns`, with the Downward API's variables (and, on a simulated
/// node, `NODE_NAME` and `HOST_IP`) and the drain token.
fn sidecar_command(
    ns: &Netns,
    name: &str,
    node: Option<&SimNode>,
    manifest: &std::path::Path,
) -> Command {
    let mut cmd = ns.command(registrar_bin());
    cmd.args(["run", "--manifest"])
        .arg(manifest)
        .env("POD_IP", &ns.addr)
        .env("POD_NAME", name)
        .env("POD_NAMESPACE", "sim")
        .env("CONSUL_REGISTRAR_DRAIN_TOKEN", DRAIN_TOKEN);
    if let Some(node) = node {
        cmd.env("NODE_NAME", &node.name).env("HOST_IP", &node.addr);
    }
    cmd
}

/// The pieces a pod needs to start.
pub struct PodSpec<'a> {
    pub name: &'a str,
    pub app: App,
    pub consul: &'a str,
    pub mode: Mode<'a>,
    /// Extra YAML lines under the service's `health:` / top level `drain:` etc.
    pub drain_delay: &'a str,
    pub health: &'a str,
    /// The lines under the service's `check:` (none: no `check:` at all).
    pub check: &'a str,
}

impl Pod {
    pub fn start(net: &Network, spec: PodSpec<'_>) -> Pod {
        let ns = net.namespace(spec.name);
        let dir = tempfile::tempdir().expect("tempdir");
        let app_cmd = match spec.app {
            App::GoHello => {
                let bin = go_peers().join("hello-server");
                let mut c = ns.command(bin);
                // Each RPC takes 50 ms, so RPCs are in flight at any moment, and the server
                // stops abruptly on SIGTERM: the worst case for clients, which only a drain
                // before the signal can make safe.
                c.args([
                    "-listen",
                    &format!("0.0.0.0:{APP_PORT}"),
                    "-name",
                    spec.name,
                ])
                .args(["-work", "50ms", "-shutdown", "immediate"]);
                c
            }
            App::Demo => {
                let mut c = ns.command(demo_app_bin());
                c.args([
                    "serve",
                    "--listen",
                    &format!("0.0.0.0:{APP_PORT}"),
                    "--name",
                    spec.name,
                ]);
                c
            }
        };
        let app = Proc::spawn(app_cmd, dir.path().join("app.log"));
        let id = format!("hello.sim.{}", spec.name);
        let consul_mode = match spec.mode {
            Mode::Agent => String::new(),
            Mode::Catalog { session_ttl, .. } => {
                format!("  mode: catalog\n  catalog:\n    sessionTTL: {session_ttl}\n")
            }
        };
        let check = if spec.check.is_empty() {
            String::new()
        } else {
            format!("    check:\n{}\n", spec.check)
        };
        let manifest = format!(
            "consul:
  address: {consul}
  retry: {{initial: 50ms, max: 500ms}}
{consul_mode}admin:
  address: 0.0.0.0:{ADMIN_PORT}
drain:
  delay: {delay}
  deregisterTimeout: 5s
services:
  - name: hello
    address: ${{POD_IP}}
    port: {APP_PORT}
    health:
      address: 127.0.0.1
      service: helloworld.Greeter
{health}
{check}",
            consul = spec.consul,
            delay = spec.drain_delay,
            health = spec.health,
        );
        let manifest_path = dir.path().join("manifest.yaml");
        std::fs::write(&manifest_path, manifest).expect("manifest");
        let node = match spec.mode {
            Mode::Agent => None,
            Mode::Catalog { node, .. } => Some(node.clone()),
        };
        let sidecar_cmd = sidecar_command(&ns, spec.name, node.as_ref(), &manifest_path);
        let sidecar = Proc::spawn(sidecar_cmd, dir.path().join("sidecar.log"));
        Pod {
            name: spec.name.to_string(),
            ns,
            app,
            sidecar,
            id,
            app_kind: spec.app,
            node,
            dir,
        }
    }

    /// Starts the sidecar again with the same manifest and environment (killing the old one if
    /// it still runs), as the kubelet restarts a crashed container; its log goes on in the same
    /// file.
    pub fn restart_sidecar(&mut self) {
        self.sidecar.kill();
        let manifest = self.dir.path().join("manifest.yaml");
        let cmd = sidecar_command(&self.ns, &self.name, self.node.as_ref(), &manifest);
        self.sidecar = Proc::spawn(cmd, self.dir.path().join("sidecar.log"));
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}:{ADMIN_PORT}{path}", self.ns.addr)
    }

    /// The kubelet's termination of this pod. Returns how long the whole termination took.
    pub async fn terminate(&mut self, how: Termination) -> Duration {
        let t0 = Instant::now();
        let deadline = t0 + how.grace;
        if how.pre_stop {
            let url = self.admin_url("/drain?wait=true");
            let r = http_client()
                .get(&url)
                .header("X-Drain-Token", DRAIN_TOKEN)
                .timeout(how.grace)
                .send()
                .await;
            assert!(
                r.is_ok_and(|r| r.status().is_success()),
                "preStop drain of {} failed",
                self.name
            );
        }
        self.app.signal("TERM");
        if how.native_sidecar {
            let _ = self.app.wait_until(deadline);
        }
        self.sidecar.signal("TERM");
        let _ = self.app.wait_until(deadline);
        let _ = self.sidecar.wait_until(deadline);
        self.app.kill();
        self.sidecar.kill();
        t0.elapsed()
    }

    pub fn logs(&self) -> String {
        format!(
            "--- {} app ---\n{}\n--- {} sidecar ---\n{}",
            self.name,
            self.app.logs(),
            self.name,
            self.sidecar.logs()
        )
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}
