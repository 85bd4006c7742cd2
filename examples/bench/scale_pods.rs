//! The `scale-catalog` and `scale-agent` phases (issue 20): what N pods of one service cost the
//! Consul servers. N one-instance sidecars of service `hello`, 20 per (virtual) node, against a
//! cluster of three servers (`testkit::ConsulCluster`): in catalog mode each sidecar talks to one
//! of the servers (round robin, as through a Kubernetes Service) through a byte meter of the bench;
//! in agent mode to the client agent of its node (N/20 client agents joined to the servers).
//!
//! For each N it reads, from /proc of the three server processes, their CPU time, and from every
//! sidecar's `/metrics` the Consul calls it made, in three windows:
//! - at rest (nothing happens);
//! - pod events: a sidecar starts, registers, becomes passing and drains (SIGTERM), one after
//!   another;
//! - flips: one replica's app turns NOT_SERVING and back.
//!
//! The per-event and per-flip figures have the at-rest rate over the window's length taken off.
//! Bytes are what the servers sent to the sidecars (catalog mode; in agent mode the agents talk
//! to the servers over RPC, not metered). The servers log at INFO and allow
//! [`SCALE_CONN_LIMIT`] connections per client address (every sidecar here connects from
//! 127.0.0.1, where pods have an address each).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use testkit::{ConsulCluster, wait_until};

/// Pods per (virtual) node.
const PODS_PER_NODE: usize = 20;

/// A TCP relay in front of one server that counts the bytes the server sends back.
struct Meter {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Meter {
    async fn start(backend: SocketAddr) -> Result<Meter> {
        let listener = TcpListener::bind(("127.0.0.1", testkit::free_port()))
            .await
            .context("bind the byte meter")?;
        let addr = listener.local_addr()?;
        let served = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&served);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = pump(cr, sw, None);
                    let down = pump(sr, cw, Some(counter));
                    tokio::join!(up, down);
                });
            }
        });
        Ok(Meter { addr, served, task })
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counter: Option<Arc<AtomicU64>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(c) = &counter {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The servers' CPU time (user + system), in milliseconds.
fn servers_cpu_ms(cluster: &ConsulCluster) -> f64 {
    (0..3)
        .filter_map(|i| usage(cluster.server(i).pid()))
        .map(|u| u.stat_ns as f64 / 1e6)
        .sum()
}

/// One reading of what the servers did so far.
#[derive(Clone, Copy)]
struct Reading {
    at: Instant,
    cpu_ms: f64,
    requests: f64,
    bytes: f64,
}

/// The bed of one N: the servers, meters, agents, apps and sidecars.
struct PodsBed {
    mode: Mode,
    /// Catalog mode with `sharedSession`: one session per virtual node.
    shared: bool,
    cluster: ConsulCluster,
    meters: Vec<Meter>,
    agents: Vec<ConsulAgent>,
    shared_app: DemoApp,
    flip_app: DemoApp,
    sidecars: Vec<Sidecar>,
    /// Calls made by sidecars that have exited since (the event sidecars').
    gone_requests: f64,
}

impl PodsBed {
    async fn reading(&self) -> Reading {
        let mut requests = self.gone_requests;
        for s in &self.sidecars {
            requests += s
                .metrics()
                .await
                .sum("consul_registrar_consul_requests_total", None);
        }
        Reading {
            at: Instant::now(),
            cpu_ms: servers_cpu_ms(&self.cluster),
            requests,
            bytes: self.meters.iter().map(|m| m.served() as f64).sum(),
        }
    }

    /// The Consul address of pod `i` (on node `i / 20`).
    fn address(&self, i: usize) -> String {
        match self.mode {
            Mode::Catalog => format!("http://{}", self.meters[i % self.meters.len()].addr),
            Mode::Agent => self.agents[(i / PODS_PER_NODE) % self.agents.len()].http_addr(),
        }
    }

    fn start_pod(&self, bed: &Bed, name: &str, i: usize, app_port: u16) -> Sidecar {
        let mut manifest = manifest_in(
            self.mode,
            &self.address(i),
            app_port,
            &[Instance {
                name: "hello".into(),
                id: name.into(),
                health_service: HEALTH_SERVICE.into(),
            }],
        );
        if self.shared {
            // The test kit tells each sidecar its admin address in CONSUL_REGISTRAR_ADMIN_ADDR.
            manifest = manifest.replacen(
                "  catalog:\n",
                "  catalog:\n    sharedSession:\n      advertise: ${CONSUL_REGISTRAR_ADMIN_ADDR}\n",
                1,
            );
        }
        start_in(
            bed,
            self.mode,
            name,
            &manifest,
            &format!("kube-{}", i / PODS_PER_NODE),
        )
    }

    /// The passing instances of `hello` as the cluster sees them.
    async fn passing(&self) -> usize {
        match self
            .cluster
            .api()
            .get("/v1/health/service/hello?passing=1")
            .await
        {
            Ok((200, Value::Array(a))) => a.len(),
            _ => 0,
        }
    }
}

/// Whether sidecar `s` is ready: its instance passing and Consul told so (read from the sidecar,
/// so the waiting costs the servers nothing).
async fn pod_passing(s: &Sidecar) -> bool {
    s.get("/readyz").await.0 == 200
}

pub(crate) async fn scale_pods(bed: &Bed, args: &Args, mode: Mode, shared: bool) -> Result<Value> {
    let mut rows = Vec::new();
    let name = if shared {
        "catalog-shared"
    } else {
        mode.name()
    };
    for &n in &args.pods {
        say(&format!("scale-{name}: {n} pods"));
        let row = match pods_row(bed, args, mode, shared, n).await {
            Ok(row) => row,
            Err(e) => {
                say(&format!("scale-{name}: {n} pods failed: {e:#}"));
                json!({ "pods": n, "error": format!("{e:#}") })
            }
        };
        rows.push(row);
    }
    Ok(json!({ "rows": rows, "loadavg": read("/proc/loadavg").trim() }))
}

async fn pods_row(bed: &Bed, args: &Args, mode: Mode, shared: bool, n: usize) -> Result<Value> {
    let loadavg_before = read("/proc/loadavg").trim().to_string();
    let cluster = ConsulCluster::start_with(ConsulOptions {
        log_level: Some("info"),
        http_max_conns_per_client: Some(SCALE_CONN_LIMIT),
        ..ConsulOptions::default()
    })
    .await;
    let mut meters = Vec::new();
    let mut agents = Vec::new();
    match mode {
        Mode::Catalog => {
            for addr in cluster.http_socket_addrs() {
                meters.push(Meter::start(addr).await?);
            }
        }
        Mode::Agent => {
            for k in 0..n.div_ceil(PODS_PER_NODE) {
                agents.push(
                    ConsulAgent::start_with(ConsulOptions {
                        join: Some(cluster.server(k % 3).serf_lan_port()),
                        log_level: Some("info"),
                        ..ConsulOptions::default()
                    })
                    .await,
                );
            }
        }
    }
    let mut pods = PodsBed {
        mode,
        shared,
        cluster,
        meters,
        agents,
        shared_app: bed.demo_app(&format!("pods-{n}-shared-app"), 0).await,
        flip_app: bed.demo_app(&format!("pods-{n}-flip-app"), 0).await,
        sidecars: Vec::new(),
        gone_requests: 0.0,
    };
    // Start the pods, ten at a time.
    let t0 = Instant::now();
    for i in 0..n {
        let port = if i == 0 {
            pods.flip_app.port()
        } else {
            pods.shared_app.port()
        };
        let name = format!("pod-{n}-{i}");
        let s = pods.start_pod(bed, &name, i, port);
        pods.sidecars.push(s);
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let all_up = Duration::from_secs(60 + n as u64 / 2);
    let deadline = Instant::now() + all_up;
    while pods.passing().await < n {
        if Instant::now() > deadline {
            bail!(
                "only {} of {n} instances passing after {all_up:?}",
                pods.passing().await
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let started_s = t0.elapsed().as_secs_f64();
    // Let the start-up settle (sessions, sweeps, elections, the first blocking queries).
    tokio::time::sleep(Duration::from_secs(args.pods_settle_seconds)).await;

    // At rest.
    let a = pods.reading().await;
    tokio::time::sleep(Duration::from_secs(args.pods_rest_seconds)).await;
    let b = pods.reading().await;
    let rest_s = (b.at - a.at).as_secs_f64();
    let rest = (
        (b.cpu_ms - a.cpu_ms) / rest_s,
        (b.requests - a.requests) / rest_s,
        (b.bytes - a.bytes) / rest_s,
    );
    let net = |x: Reading, y: Reading, count: usize| {
        let s = (y.at - x.at).as_secs_f64();
        let c = count as f64;
        (
            ((y.cpu_ms - x.cpu_ms) - rest.0 * s) / c,
            ((y.requests - x.requests) - rest.1 * s) / c,
            ((y.bytes - x.bytes) - rest.2 * s) / c,
        )
    };

    // Pod events: start, register, passing, drain; one after another.
    let a = pods.reading().await;
    for k in 0..args.pod_events {
        let i = k * PODS_PER_NODE % n;
        let name = format!("event-{n}-{k}");
        let mut s = pods.start_pod(bed, &name, i, pods.shared_app.port());
        let up = wait_until(Duration::from_secs(30), || pod_passing(&s)).await;
        if !up {
            bail!("event pod {name} never passed:\n{}", s.tail(20));
        }
        pods.gone_requests += s
            .metrics()
            .await
            .sum("consul_registrar_consul_requests_total", None);
        let _ = s.terminate(Duration::from_secs(15)).await;
        // Let every watcher react (re-arm jitter, the reaper's pause).
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let b = pods.reading().await;
    let event = net(a, b, args.pod_events);

    // Flips of one replica (pod 0, its own app).
    let a = pods.reading().await;
    for k in 0..args.pod_flips {
        pods.flip_app.set_serving(k % 2 == 1).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    pods.flip_app.set_serving(true).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = pods.reading().await;
    let flips = args.pod_flips + args.pod_flips % 2;
    let flip = net(a, b, flips);

    let row = json!({
        "pods": n,
        "nodes": n.div_ceil(PODS_PER_NODE),
        "all_passing_s": round(started_s, 1),
        "rest": {
            "settled_s": args.pods_settle_seconds,
            "seconds": round(rest_s, 1),
            "servers_cpu_ms_per_s": round(rest.0, 2),
            "requests_per_min_per_pod": round(rest.1 * 60.0 / n as f64, 2),
            "bytes_per_min_per_pod": round(rest.2 * 60.0 / n as f64, 0),
        },
        "per_event": {
            "count": args.pod_events,
            "servers_cpu_ms": round(event.0, 1),
            "requests": round(event.1, 1),
            "bytes": round(event.2, 0),
        },
        "per_flip": {
            "count": flips,
            "servers_cpu_ms": round(flip.0, 1),
            "requests": round(flip.1, 1),
            "bytes": round(flip.2, 0),
        },
        "loadavg_before": loadavg_before,
        "loadavg_after": read("/proc/loadavg").trim(),
    });
    say(&format!("scale-{}: {row}", mode.name()));
    drop(pods);
    Ok(row)
}

/// The table of a scale-catalog or scale-agent phase.
pub(crate) fn markdown_pods(md: &mut String, r: &Value) {
    for (phase, title) in [
        ("scale-catalog", "catalog mode"),
        (
            "scale-catalog-shared",
            "catalog mode with a shared session per virtual node",
        ),
        ("scale-agent", "agent mode"),
    ] {
        let Some(rows) = r[phase]["rows"].as_array() else {
            continue;
        };
        let _ = writeln!(
            md,
            "## Scale: N pods of one service, {title}, three servers\n\nLoad average after: {}.\n",
            r[phase]["loadavg"].as_str().unwrap_or("?")
        );
        md.push_str("| pods | servers' CPU per event (ms) | requests per event | bytes per event | CPU per flip (ms) | requests per flip | bytes per flip | CPU at rest (ms/s) | requests/min/pod at rest | bytes/min/pod at rest |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for x in rows {
            if !x["error"].is_null() {
                let _ = writeln!(md, "| {} | failed: {} |||||||||", x["pods"], x["error"]);
                continue;
            }
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                x["pods"],
                f(&x["per_event"]["servers_cpu_ms"]),
                f(&x["per_event"]["requests"]),
                f(&x["per_event"]["bytes"]),
                f(&x["per_flip"]["servers_cpu_ms"]),
                f(&x["per_flip"]["requests"]),
                f(&x["per_flip"]["bytes"]),
                f(&x["rest"]["servers_cpu_ms_per_s"]),
                f(&x["rest"]["requests_per_min_per_pod"]),
                f(&x["rest"]["bytes_per_min_per_pod"]),
            );
        }
        md.push('\n');
    }
}
