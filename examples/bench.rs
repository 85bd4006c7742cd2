//! The benchmark suite: drives a real Consul dev agent, the demo gRPC app and the release sidecar,
//! and writes `results.json` (every sample) and `results.md` (the tables) into a results directory.
//! `scripts/bench.sh` (`make bench`) builds everything once, runs this program and draws
//! `latency.png` from the JSON; `docs/benchmarks.md` explains the method and the latest figures.
//!
//! Phases, selectable with `--phases` / `BENCH_PHASES` (comma-separated, default all):
//! - `propagation`: the app flips health → `GET /v1/health/service/<name>` shows the new status,
//!   watched with blocking queries so the observer adds no polling delay. In one run and against
//!   the same app: us in agent mode (`bench-us`, the TTL check the sidecar drives), us in catalog
//!   mode (`bench-cat`, a check on a virtual node written with `PUT /v1/catalog/register`), the
//!   peer (`bench-peer`, Consul's own `GRPC` check at interval 1 s; 10 s is computed from it) and
//!   the floor (`bench-floor`, a TTL check the bench updates itself: what Consul alone costs).
//! - `footprint`: RSS and CPU of the sidecar idle and under 10 flips/s, beside a Consul client
//!   agent (not -dev) joined to the dev server and running the peer's check; binary sizes.
//! - `drain`: SIGTERM with drain delay 0 → the instance is gone from the catalog.
//! - `scale`: one sidecar with 1, 100 and 1,000 services: time to register all, RSS, CPU per
//!   flip, Consul requests per minute in steady state.
//! - `recovery`: the Consul agent killed and restarted empty → the instance back and passing.
//! - `raft`: steady-state Raft writes per minute per instance, agent mode and catalog mode, against
//!   a quiet window of the same server without a sidecar: the raft log index
//!   (`/v1/agent/self`, `Stats.raft.last_log_index`) and, by kind, the server's own telemetry
//!   (`consul.raft.apply` and `consul.fsm.*` in `/v1/agent/metrics`).
//! - `scale-catalog`, `scale-catalog-shared` (with `sharedSession`), `scale-agent`: N one-instance
//!   sidecars of one service against three
//!   servers; the servers' CPU, requests and bytes per pod event, per flip and at rest
//!   ([`scale_pods`]). Not part of `all`: only when named.
//! - `reap`: a sidecar SIGKILLed → its instance gone from the catalog, agent mode
//!   (`deregisterCriticalServiceAfter` and Consul's reaper) beside catalog mode (the session
//!   expires, its key goes, a surviving sidecar's reaper deregisters the instance).
//!
//! Figures are reported, never asserted: the program exits non-zero only when something could not
//! run at all (Consul did not start, the sidecar never registered, a results file could not be
//! written). Everything listens on 127.0.0.1, on ports below the ephemeral range.
//!
//! Consul, the demo app and the sidecar are started by the workspace's test kit (`testkit/`), the
//! same code the integration tests use; this file holds what only the benchmark does: the
//! observers, the resource readings, the statistics and the report.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};
use testkit::{
    ConsulAgent, ConsulOptions, DemoApp, DemoAppOptions, Metrics, Sidecar, SidecarOptions,
    instance_status,
};

/// The health service the demo app serves and every check asks about.
const HEALTH_SERVICE: &str = "helloworld.Greeter";
const PHASES: [&str; 10] = [
    "propagation",
    "footprint",
    "drain",
    "scale",
    "recovery",
    "raft",
    "reap",
    "scale-catalog",
    "scale-catalog-shared",
    "scale-agent",
];

#[path = "bench/scale_pods.rs"]
mod scale_pods;
/// The catalog-mode sidecars' session TTL: the manifest's default and Consul's minimum.
const SESSION_TTL_S: u64 = 10;

#[derive(Parser)]
#[command(
    name = "bench",
    about = "consul-registrar benchmarks against a real Consul (see docs/benchmarks.md)"
)]
struct Args {
    /// The consul binary (scripts/consul.sh prints one).
    #[arg(long, env = "CONSUL_BIN")]
    consul: PathBuf,
    /// The release consul-registrar binary.
    #[arg(long)]
    registrar: PathBuf,
    /// The release demo-app binary.
    #[arg(long)]
    demo_app: PathBuf,
    /// Where results.json, results.md and logs/ go.
    #[arg(long, env = "BENCH_OUT", default_value = "bench-results")]
    out: PathBuf,
    /// Phases to run: all, or a comma-separated subset of propagation, footprint, drain, scale,
    /// recovery, raft, reap.
    #[arg(
        long,
        env = "BENCH_PHASES",
        default_value = "all",
        value_delimiter = ','
    )]
    phases: Vec<String>,
    /// Flips each way measured for us.
    #[arg(long, env = "BENCH_FLIPS", default_value_t = 200)]
    flips: usize,
    /// Of those, flips each way also measured for the peer (each takes about a second).
    #[arg(long, env = "BENCH_PEER_FLIPS", default_value_t = 40)]
    peer_flips: usize,
    /// Flips each way of the floor (a TTL check updated by the bench itself).
    #[arg(long, env = "BENCH_FLOOR_FLIPS", default_value_t = 100)]
    floor_flips: usize,
    /// Drains measured (a fresh sidecar each).
    #[arg(long, env = "BENCH_DRAIN_RUNS", default_value_t = 30)]
    drain_runs: usize,
    /// Consul restarts measured.
    #[arg(long, env = "BENCH_RECOVERY_RUNS", default_value_t = 8)]
    recovery_runs: usize,
    /// Length of the idle footprint window.
    #[arg(long, env = "BENCH_IDLE_SECONDS", default_value_t = 60)]
    idle_seconds: u64,
    /// Length of the 10 flips/s footprint window.
    #[arg(long, env = "BENCH_LOAD_SECONDS", default_value_t = 20)]
    load_seconds: u64,
    /// Length of each steady-state window of the scale phase.
    #[arg(long, env = "BENCH_STEADY_SECONDS", default_value_t = 60)]
    steady_seconds: u64,
    /// Service counts of the scale phase.
    #[arg(
        long,
        env = "BENCH_SCALE",
        default_value = "1,100,1000",
        value_delimiter = ','
    )]
    scale: Vec<usize>,
    /// Instances of the one sidecar whose steady-state Raft writes are counted, in each mode.
    #[arg(long, env = "BENCH_RAFT_INSTANCES", default_value_t = 20)]
    raft_instances: usize,
    /// Length of each quiet window of the raft phase (no sidecar, agent mode, catalog mode).
    #[arg(long, env = "BENCH_RAFT_SECONDS", default_value_t = 60)]
    raft_seconds: u64,
    /// SIGKILLed sidecars in each mode in the reap phase (killed 30 s / runs apart).
    #[arg(long, env = "BENCH_REAP_RUNS", default_value_t = 3)]
    reap_runs: usize,
    /// Pod counts of the scale-catalog and scale-agent phases.
    #[arg(
        long,
        env = "BENCH_PODS",
        default_value = "50,100,200,400",
        value_delimiter = ','
    )]
    pods: Vec<usize>,
    /// How long the scale-catalog and scale-agent phases wait, once every instance passes, before
    /// their at-rest window: longer than a blocking query's longest wait (`resyncInterval`, 60 s,
    /// plus Consul's jitter of up to wait/16), so that the queries made while the pods started
    /// (each sidecar's first watch, before it joins its node's shared session) have ended and the
    /// window sees the steady state, not the tail of the start.
    #[arg(long, env = "BENCH_PODS_SETTLE_SECONDS", default_value_t = 70)]
    pods_settle_seconds: u64,
    /// Length of the at-rest window of the scale-catalog and scale-agent phases: at least the
    /// sidecars' `resyncInterval` (60 s), so that every blocking query re-arms in it once.
    #[arg(long, env = "BENCH_PODS_REST_SECONDS", default_value_t = 60)]
    pods_rest_seconds: u64,
    /// Pod events (start, register, drain) measured per pod count. Their window (≈ 5 s each)
    /// should outlast `resyncInterval` (60 s): the at-rest rate taken off it includes the
    /// blocking queries' re-arms, which a shorter window catches at some phase of their cycle.
    #[arg(long, env = "BENCH_POD_EVENTS", default_value_t = 20)]
    pod_events: usize,
    /// Flips of one replica measured per pod count (1.5 s each; 40 span a `resyncInterval`, as
    /// above).
    #[arg(long, env = "BENCH_POD_FLIPS", default_value_t = 40)]
    pod_flips: usize,
    /// The source revision, for the report.
    #[arg(long, default_value = "")]
    commit: String,
    /// The Rust toolchain, for the report.
    #[arg(long, default_value = "")]
    rustc: String,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let phases: Vec<&str> = if args.phases.iter().any(|p| p == "all") {
        // The N-pod phases take long and start hundreds of processes: only when named.
        PHASES
            .into_iter()
            .filter(|p| !p.starts_with("scale-"))
            .collect()
    } else {
        for p in &args.phases {
            if !PHASES.contains(&p.as_str()) {
                bail!("unknown phase {p:?}: expected all or some of {PHASES:?}");
            }
        }
        PHASES
            .into_iter()
            .filter(|p| args.phases.iter().any(|a| a == p))
            .collect()
    };
    let logs = args.out.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    let _ = rustls::crypto::ring::default_provider().install_default();
    testkit::use_binaries(
        args.consul.clone(),
        args.registrar.clone(),
        args.demo_app.clone(),
    );
    let bed = Bed {
        consul_bin: args.consul.clone(),
        registrar: args.registrar.clone(),
        logs,
        http: reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(64)
            .build()
            .context("HTTP client")?,
    };
    let started = Instant::now();
    let mut results = json!({
        "machine": machine(),
        "versions": {
            "consul-registrar": command_line(&args.registrar, &["--version"]),
            "consul": command_line(&args.consul, &["version"]),
            "rustc": args.rustc,
            "commit": args.commit,
        },
        "phases": phases,
        "config": {
            "flips_each_way": args.flips,
            "peer_flips_each_way": args.peer_flips,
            "floor_flips_each_way": args.floor_flips,
            "drain_runs": args.drain_runs,
            "recovery_runs": args.recovery_runs,
            "idle_seconds": args.idle_seconds,
            "load_seconds": args.load_seconds,
            "steady_seconds": args.steady_seconds,
            "scale": args.scale,
            "raft_instances": args.raft_instances,
            "raft_seconds": args.raft_seconds,
            "reap_runs": args.reap_runs,
            "session_ttl_seconds": SESSION_TTL_S,
        },
    });

    // The main test bed: a Consul dev server, the demo app, our sidecar and the peer's check.
    let needs_main = |p: &&str| matches!(*p, "propagation" | "footprint" | "drain");
    let mut main = if phases.iter().any(needs_main) {
        Some(MainBed::start(&bed).await?)
    } else {
        None
    };
    for (k, phase) in phases.iter().enumerate() {
        let t = Instant::now();
        say(&format!("phase {phase}"));
        let value = match (*phase, main.as_mut()) {
            ("propagation", Some(m)) => propagation(m, &args).await?,
            ("footprint", Some(m)) => footprint(&bed, m, &args).await?,
            ("drain", Some(m)) => drain(&bed, m, &args).await?,
            ("scale", _) => scale(&bed, &args).await?,
            ("recovery", _) => recovery(&bed, &args).await?,
            ("raft", _) => raft(&bed, &args).await?,
            ("reap", _) => reap(&bed, &args).await?,
            ("scale-catalog", _) => {
                scale_pods::scale_pods(&bed, &args, Mode::Catalog, false).await?
            }
            ("scale-catalog-shared", _) => {
                scale_pods::scale_pods(&bed, &args, Mode::Catalog, true).await?
            }
            ("scale-agent", _) => scale_pods::scale_pods(&bed, &args, Mode::Agent, false).await?,
            _ => unreachable!("the main bed runs for propagation, footprint and drain"),
        };
        results[*phase] = value;
        results[*phase]["phase_seconds"] = json!(round(t.elapsed().as_secs_f64(), 1));
        write_results(&args.out, &results)?;
        if !phases[k + 1..].iter().any(needs_main) {
            main = None; // stops its processes before the next phase
        }
    }
    results["total_seconds"] = json!(round(started.elapsed().as_secs_f64(), 1));
    results["machine"]["loadavg_end"] = json!(read("/proc/loadavg").trim());
    write_results(&args.out, &results)?;
    say(&format!(
        "done in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        args.out.join("results.md").display()
    ));
    Ok(())
}

fn say(text: &str) {
    eprintln!("bench: {text}");
}

fn write_results(out: &Path, results: &Value) -> Result<()> {
    let json_path = out.join("results.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(results)? + "\n")
        .with_context(|| format!("write {}", json_path.display()))?;
    let md_path = out.join("results.md");
    std::fs::write(&md_path, markdown(results))
        .with_context(|| format!("write {}", md_path.display()))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The machine: processes' resource use
// ---------------------------------------------------------------------------------------------

/// What every phase needs: the binaries (for their sizes), the log directory and one HTTP client.
struct Bed {
    consul_bin: PathBuf,
    registrar: PathBuf,
    logs: PathBuf,
    http: reqwest::Client,
}

impl Bed {
    /// A Consul agent (not started) with the log `logs/consul-<node>.log` and INFO logging,
    /// Consul's default outside -dev (whose DEBUG logs every HTTP request).
    fn consul(&self, node: &'static str, opts: ConsulOptions) -> ConsulAgent {
        let mut agent = ConsulAgent::prepare(ConsulOptions {
            node: Some(node),
            log_level: Some("info"),
            ..opts
        });
        agent.log_to(self.logs.join(format!("consul-{node}.log")));
        agent
    }

    /// The HTTP API of `agent` through the bench's one client.
    fn api(&self, agent: &ConsulAgent) -> Api {
        Api {
            http: self.http.clone(),
            base: agent.http_addr(),
        }
    }

    /// The demo app with the log `logs/<name>.log`, serving `HEALTH_SERVICE` and `svc-0` …
    /// `svc-{generate_services - 1}`.
    async fn demo_app(&self, name: &str, generate_services: usize) -> DemoApp {
        DemoApp::start(DemoAppOptions {
            health_services: vec![HEALTH_SERVICE.into()],
            generate_services,
            log: Some(self.logs.join(format!("{name}.log"))),
            ..Default::default()
        })
        .await
    }

    /// The release sidecar with `manifest` in `logs/<name>.manifest.yaml`, its log in
    /// `logs/<name>.log`, at log level INFO.
    fn sidecar(&self, name: &str, manifest: &str) -> Sidecar {
        self.sidecar_env(name, manifest, &[])
    }

    /// [`sidecar`](Self::sidecar) with environment variables (a catalog-mode sidecar's
    /// `NODE_NAME` and `HOST_IP`, see [`catalog_env`]).
    fn sidecar_env(&self, name: &str, manifest: &str, env: &[(&str, &str)]) -> Sidecar {
        Sidecar::start_with(
            manifest,
            env,
            &SidecarOptions {
                log_level: "info",
                files: Some((self.logs.clone(), name.to_string())),
            },
        )
    }
}

/// An error if `agent` has exited (it should not, except when the bench kills it).
fn check_alive(agent: &mut ConsulAgent) -> Result<()> {
    if let Some(status) = agent.exited() {
        bail!(
            "Consul exited unexpectedly with {status}:\n{}",
            testkit::tail(&agent.log_path(), 20)
        );
    }
    Ok(())
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The first line a binary prints for `args` (its version).
fn command_line(bin: &Path, args: &[&str]) -> String {
    Command::new(bin)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default()
}

fn machine() -> Value {
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let meminfo = read("/proc/meminfo");
    let mem_kib = proc_field(&meminfo, "MemTotal:").unwrap_or(0);
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": round(mem_kib as f64 / 1024.0 / 1024.0, 1),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "loadavg_start": read("/proc/loadavg").trim(),
    })
}

/// A `Name:   1234 kB` field of a /proc file.
fn proc_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// One reading of a process's resource use.
#[derive(Clone, Copy)]
struct Usage {
    at: Instant,
    /// CPU time of the live threads, from /proc/<pid>/task/*/schedstat (nanoseconds).
    cpu_ns: u64,
    /// User + system time of the process, from /proc/<pid>/stat (clock ticks, in nanoseconds).
    stat_ns: u64,
    rss_kib: u64,
    /// Of the RSS: anonymous memory (heap, stacks) and file-backed pages (the binary's code).
    anon_kib: u64,
    file_kib: u64,
    hwm_kib: u64,
}

fn usage(pid: u32) -> Option<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces: state is field 3, utime 14, stime 15.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let mut cpu_ns = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let s = read(task.path().join("schedstat"));
        cpu_ns += s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(Usage {
        at: Instant::now(),
        cpu_ns,
        stat_ns: ticks * 1_000_000_000 / clock_ticks(),
        rss_kib: proc_field(&status, "VmRSS:")?,
        anon_kib: proc_field(&status, "RssAnon:").unwrap_or(0),
        file_kib: proc_field(&status, "RssFile:").unwrap_or(0),
        hwm_kib: proc_field(&status, "VmHWM:")?,
    })
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        command_line(Path::new("getconf"), &["CLK_TCK"])
            .trim()
            .parse()
            .unwrap_or(100)
    })
}

/// CPU use between two readings, in % of one core: (from /proc/stat ticks, from schedstat).
fn cpu_percent(a: &Usage, b: &Usage) -> (f64, f64) {
    let wall = b.at.duration_since(a.at).as_nanos().max(1) as f64;
    (
        100.0 * b.stat_ns.saturating_sub(a.stat_ns) as f64 / wall,
        100.0 * b.cpu_ns.saturating_sub(a.cpu_ns) as f64 / wall,
    )
}

fn mib(kib: u64) -> f64 {
    round(kib as f64 / 1024.0, 1)
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

// ---------------------------------------------------------------------------------------------
// Consul
// ---------------------------------------------------------------------------------------------

/// The HTTP API of one Consul agent.
#[derive(Clone)]
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    /// GET with an optional blocking index: (X-Consul-Index, JSON body).
    async fn get(
        &self,
        path: &str,
        query: &[(&str, String)],
        wait: Duration,
    ) -> Result<(u64, Value)> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .query(query)
            .timeout(wait + Duration::from_secs(5))
            .send()
            .await?;
        let status = resp.status();
        let index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("GET {path}: HTTP {status}: {body}");
        }
        Ok((index, body))
    }

    /// A blocking query (`index` 0: answer at once).
    async fn blocking(
        &self,
        path: &str,
        extra: &[(&str, String)],
        index: u64,
        wait: Duration,
    ) -> Result<(u64, Value)> {
        let mut query: Vec<(&str, String)> = extra.to_vec();
        if index > 0 {
            query.push(("index", index.to_string()));
            query.push(("wait", format!("{}ms", wait.as_millis().max(1))));
        }
        self.get(path, &query, wait).await
    }

    async fn put(&self, path: &str, body: &Value) -> Result<()> {
        let resp = self
            .http
            .put(format!("{}{path}", self.base))
            .json(body)
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        let status = resp.status();
        if !status.is_success() {
            bail!(
                "PUT {path}: HTTP {status}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// The raft leader: `Err` when the agent does not answer HTTP, `Ok("")` while it has none.
    async fn leader(&self) -> Result<String> {
        let resp = self
            .http
            .get(format!("{}/v1/status/leader", self.base))
            .timeout(Duration::from_secs(2))
            .send()
            .await?;
        Ok(resp.json::<String>().await.unwrap_or_default())
    }
}

/// What an observer waits for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Want {
    Status(&'static str),
    /// Critical, warning or gone: what a client asking for passing instances no longer gets.
    NotPassing,
    Gone,
}

fn matches(want: Want, status: Option<&str>) -> bool {
    match want {
        Want::Status(s) => status == Some(s),
        Want::NotPassing => status != Some("passing"),
        Want::Gone => status.is_none(),
    }
}

/// The current index and status of instance `id` of service `name`.
async fn current(api: &Api, name: &str, id: &str) -> Result<(u64, Option<&'static str>)> {
    let (index, body) = api
        .get(&format!("/v1/health/service/{name}"), &[], Duration::ZERO)
        .await?;
    Ok((index, instance_status(&body, id)))
}

/// Follows `/v1/health/service/<name>` with blocking queries from `index` until instance `id` is as
/// wanted; returns the moment the answer showing it arrived, or None at `deadline`.
async fn observe(
    api: &Api,
    name: &str,
    id: &str,
    want: Want,
    mut index: u64,
    deadline: Instant,
) -> Option<Instant> {
    let path = format!("/v1/health/service/{name}");
    loop {
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        let wait = (deadline - now).min(Duration::from_secs(10));
        match api.blocking(&path, &[], index, wait).await {
            Ok((new_index, body)) => {
                let at = Instant::now();
                if matches(want, instance_status(&body, id)) {
                    return Some(at);
                }
                // Consul's rule: an index that went backwards means start over.
                index = if new_index < index {
                    0
                } else {
                    new_index.max(1)
                };
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// Counts the checks matching `filter` by status, following `/v1/health/state/any` with blocking
/// queries (at most every 25 ms) until `done` holds; returns the moment it did and the last counts.
async fn observe_counts(
    api: &Api,
    filter: &str,
    deadline: Instant,
    done: impl Fn(&BTreeMap<String, usize>) -> bool,
) -> (Option<Instant>, BTreeMap<String, usize>) {
    let mut index = 0;
    let mut counts = BTreeMap::new();
    let query = [("filter", filter.to_string())];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return (None, counts);
        }
        let asked = Instant::now();
        let wait = (deadline - now).min(Duration::from_secs(10));
        match api
            .blocking("/v1/health/state/any", &query, index, wait)
            .await
        {
            Ok((new_index, body)) => {
                let at = Instant::now();
                counts.clear();
                for c in body.as_array().into_iter().flatten() {
                    let status = c["Status"].as_str().unwrap_or("?").to_string();
                    *counts.entry(status).or_insert(0) += 1;
                }
                if done(&counts) {
                    return (Some(at), counts);
                }
                index = if new_index < index {
                    0
                } else {
                    new_index.max(1)
                };
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
        let spacing = Duration::from_millis(25);
        if asked.elapsed() < spacing {
            tokio::time::sleep(spacing - asked.elapsed()).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Manifests and metrics
// ---------------------------------------------------------------------------------------------

/// One instance of a manifest.
struct Instance {
    name: String,
    id: String,
    health_service: String,
}

/// How a sidecar registers: through the node's agent, or in the catalog on a virtual node.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Agent,
    Catalog,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Agent => "agent",
            Mode::Catalog => "catalog",
        }
    }
}

/// A manifest with every default except the Consul address and drain delay 0 (agent mode).
fn manifest(consul: &str, app_port: u16, instances: &[Instance]) -> String {
    manifest_in(Mode::Agent, consul, app_port, instances)
}

/// A manifest in `mode` with every default except the Consul address and drain delay 0; in
/// catalog mode the session TTL is written out ([`SESSION_TTL_S`], the default) and the node and
/// its address come from the environment ([`catalog_env`]), as in a pod.
fn manifest_in(mode: Mode, consul: &str, app_port: u16, instances: &[Instance]) -> String {
    let mode_block = match mode {
        Mode::Agent => String::new(),
        Mode::Catalog => {
            format!("  mode: catalog\n  catalog:\n    sessionTTL: {SESSION_TTL_S}s\n")
        }
    };
    let mut m =
        format!("consul:\n  address: {consul}\n{mode_block}drain:\n  delay: 0s\nservices:\n");
    for i in instances {
        let _ = write!(
            m,
            "  - name: {}\n    id: {}\n    address: 127.0.0.1\n    port: {app_port}\n    health:\n      service: {}\n",
            i.name, i.id, i.health_service
        );
    }
    m
}

/// The downward-API variables of a catalog-mode sidecar on the Kubernetes node `node`: its
/// virtual node is `consul-registrar-<node>`, with address 127.0.0.1.
fn catalog_env(node: &str) -> [(&'static str, String); 2] {
    [
        ("NODE_NAME", node.to_string()),
        ("HOST_IP", "127.0.0.1".to_string()),
    ]
}

/// A sidecar in `mode` (catalog mode: on Kubernetes node `node`).
fn start_in(bed: &Bed, mode: Mode, name: &str, manifest: &str, node: &str) -> Sidecar {
    match mode {
        Mode::Agent => bed.sidecar(name, manifest),
        Mode::Catalog => {
            let env = catalog_env(node);
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            bed.sidecar_env(name, manifest, &env)
        }
    }
}

/// Requests per minute by operation and status between two scrapes `seconds` apart.
fn request_rates(before: &Metrics, after: &Metrics, seconds: f64) -> Value {
    let (a, b) = (before.consul_requests(), after.consul_requests());
    let mut rates = serde_json::Map::new();
    for (key, v) in &b {
        let d = v - a.get(key).copied().unwrap_or(0.0);
        if d > 0.0 {
            rates.insert(key.clone(), json!(round(d * 60.0 / seconds, 1)));
        }
    }
    Value::Object(rates)
}

/// Whether a steady-state window saw only TTL refreshes and anti-entropy reads (blocking watches
/// and periodic reads of an instance), all 2xx: no registration, no error, no lost instance.
fn only_refreshes_and_watches(rates: &Value) -> bool {
    rates.as_object().is_some_and(|m| {
        m.keys().all(|k| {
            matches!(
                k.as_str(),
                "update_ttl 2xx" | "watch_service 2xx" | "read_service 2xx"
            )
        })
    })
}

/// The mean of a histogram between two scrapes, in milliseconds.
fn histogram_mean_ms(
    before: &Metrics,
    after: &Metrics,
    name: &str,
    label: Option<(&str, &str)>,
) -> Value {
    let sum = after.sum(&format!("{name}_sum"), label) - before.sum(&format!("{name}_sum"), label);
    let count =
        after.sum(&format!("{name}_count"), label) - before.sum(&format!("{name}_count"), label);
    if count > 0.0 {
        json!({ "mean_ms": round(sum / count * 1000.0, 3), "count": count })
    } else {
        Value::Null
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// p50/p90/p99/max (and min, mean, count) of samples in milliseconds; `timeouts` counts samples
/// that never arrived.
fn summary(samples: &[f64], timeouts: usize) -> Value {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return json!({ "n": 0, "timeouts": timeouts });
    }
    let mean = s.iter().sum::<f64>() / s.len() as f64;
    json!({
        "n": s.len(),
        "timeouts": timeouts,
        "min": round(s[0], 3),
        "p50": round(percentile(&s, 50.0), 3),
        "p90": round(percentile(&s, 90.0), 3),
        "p99": round(percentile(&s, 99.0), 3),
        "max": round(s[s.len() - 1], 3),
        "mean": round(mean, 3),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn rounded(samples: &[f64]) -> Vec<f64> {
    samples.iter().map(|x| round(*x, 3)).collect()
}

// ---------------------------------------------------------------------------------------------
// The main bed
// ---------------------------------------------------------------------------------------------

/// The Consul dev server, the demo app, our sidecars for `bench-us` (agent mode) and `bench-cat`
/// (catalog mode), the peer's and the floor's registrations.
struct MainBed {
    consul: ConsulAgent,
    api: Api,
    app: DemoApp,
    us: Sidecar,
    cat: Sidecar,
}

const US: (&str, &str) = ("bench-us", "bench-us-1");
const CAT: (&str, &str) = ("bench-cat", "bench-cat-1");
const PEER: (&str, &str) = ("bench-peer", "bench-peer-1");
const FLOOR: (&str, &str) = ("bench-floor", "bench-floor-1");
const FLOOR_CHECK: &str = "bench-floor-ttl";

impl MainBed {
    async fn start(bed: &Bed) -> Result<MainBed> {
        say("starting the Consul dev server, the demo app and the sidecar");
        let mut consul = bed.consul("bench-server", ConsulOptions::default());
        consul.start().await;
        let api = bed.api(&consul);
        let app = bed.demo_app("demo-app", 0).await;
        let us = bed.sidecar(
            "sidecar-us",
            &manifest(
                &consul.http_addr(),
                app.port(),
                &[Instance {
                    name: US.0.into(),
                    id: US.1.into(),
                    health_service: HEALTH_SERVICE.into(),
                }],
            ),
        );
        // The same, in catalog mode: its instance sits on the virtual node
        // consul-registrar-bench-node, not on the dev server's own node.
        let cat = start_in(
            bed,
            Mode::Catalog,
            "sidecar-cat",
            &manifest_in(
                Mode::Catalog,
                &consul.http_addr(),
                app.port(),
                &[Instance {
                    name: CAT.0.into(),
                    id: CAT.1.into(),
                    health_service: HEALTH_SERVICE.into(),
                }],
            ),
            "bench-node",
        );
        // The peer: Consul's own gRPC check, run by the agent every second, against the same app.
        api.put(
            "/v1/agent/service/register",
            &json!({
                "Name": PEER.0, "ID": PEER.1, "Address": "127.0.0.1", "Port": app.port(),
                "Check": {
                    "Name": "gRPC health (Consul's own check)",
                    "GRPC": format!("127.0.0.1:{}/{HEALTH_SERVICE}", app.port()),
                    "Interval": "1s",
                },
            }),
        )
        .await?;
        // The floor: a TTL check the bench updates itself.
        api.put(
            "/v1/agent/service/register",
            &json!({
                "Name": FLOOR.0, "ID": FLOOR.1, "Address": "127.0.0.1", "Port": 1,
                "Check": { "CheckID": FLOOR_CHECK, "Name": "floor", "TTL": "30m", "Status": "passing" },
            }),
        )
        .await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        for (name, id) in [US, CAT, PEER] {
            if observe(&api, name, id, Want::Status("passing"), 0, deadline)
                .await
                .is_none()
            {
                let log = if (name, id) == CAT { &cat } else { &us };
                bail!(
                    "{id} is not passing in Consul 30 s after start; sidecar log:\n{}",
                    log.tail(30)
                );
            }
        }
        Ok(MainBed {
            consul,
            api,
            app,
            us,
            cat,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Phase: propagation
// ---------------------------------------------------------------------------------------------

fn target_of(serving: bool) -> &'static str {
    if serving { "passing" } else { "critical" }
}

/// Waits (up to 5 s) until instance `id` shows `status`, so a flip starts from a settled state.
async fn settle(api: &Api, (name, id): (&str, &str), status: &'static str) -> Result<u64> {
    let (index, now) = current(api, name, id).await?;
    if now == Some(status) {
        return Ok(index);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    observe(api, name, id, Want::Status(status), index, deadline).await;
    Ok(current(api, name, id).await?.0)
}

/// Samples of one measured instance, in milliseconds, by direction.
#[derive(Default)]
struct Samples {
    to_critical: Vec<f64>,
    to_passing: Vec<f64>,
    timeouts: usize,
}

impl Samples {
    fn push(&mut self, to: &str, t0: Instant, at: Option<Instant>) {
        match at {
            Some(at) if to == "critical" => self.to_critical.push(ms(at - t0)),
            Some(at) => self.to_passing.push(ms(at - t0)),
            None => self.timeouts += 1,
        }
    }

    fn all(&self) -> Vec<f64> {
        self.to_critical
            .iter()
            .chain(&self.to_passing)
            .copied()
            .collect()
    }

    fn report(&self) -> Value {
        json!({
            "all": summary(&self.all(), self.timeouts),
            "to_critical": summary(&self.to_critical, 0),
            "to_passing": summary(&self.to_passing, 0),
            "samples_ms": { "to_critical": rounded(&self.to_critical), "to_passing": rounded(&self.to_passing) },
        })
    }
}

async fn propagation(m: &mut MainBed, args: &Args) -> Result<Value> {
    let api = m.api.clone();

    // The floor: what Consul alone takes from a TTL update to a blocking query seeing it.
    let mut floor = Samples::default();
    let mut serving = true;
    for _ in 0..2 * args.floor_flips {
        let to = target_of(!serving);
        let index = settle(&api, FLOOR, target_of(serving)).await?;
        // The blocking query is in flight while the update is sent, as for us and the peer.
        let t0 = Instant::now();
        let body = json!({ "Status": to, "Output": format!("floor flip to {to}") });
        let path = format!("/v1/agent/check/update/{FLOOR_CHECK}");
        let (put, at) = tokio::join!(
            api.put(&path, &body),
            observe(
                &api,
                FLOOR.0,
                FLOOR.1,
                Want::Status(to),
                index,
                t0 + Duration::from_secs(5)
            )
        );
        put?;
        floor.push(to, t0, at);
        serving = !serving;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(5..25))).await;
    }
    say(&format!("floor: {}", summary(&floor.all(), floor.timeouts)));

    // Us (agent and catalog mode) and the peer against the same app. The first 2 × peer_flips
    // flips wait for all three; after each, a random pause of up to one check interval puts the
    // next flip at a uniformly random point of the peer's schedule (otherwise every flip would
    // land just after its check and wait a whole interval). The remaining flips measure only us,
    // both modes every time.
    let before = m.us.metrics().await;
    let cat_before = m.cat.metrics().await;
    let mut us = Samples::default();
    let mut cat = Samples::default();
    let mut peer = Samples::default();
    let peer_flips = args.peer_flips.min(args.flips);
    let total = 2 * args.flips;
    let mut serving = true;
    for i in 0..total {
        let with_peer = i < 2 * peer_flips;
        let to = target_of(!serving);
        let us_index = settle(&api, US, target_of(serving)).await?;
        let cat_index = settle(&api, CAT, target_of(serving)).await?;
        let peer_index = if with_peer {
            settle(&api, PEER, target_of(serving)).await?
        } else {
            0
        };
        let t0 = Instant::now();
        m.app.set_serving(!serving).await;
        let (us_at, cat_at, peer_at) = tokio::join!(
            observe(
                &api,
                US.0,
                US.1,
                Want::Status(to),
                us_index,
                t0 + Duration::from_secs(5)
            ),
            observe(
                &api,
                CAT.0,
                CAT.1,
                Want::Status(to),
                cat_index,
                t0 + Duration::from_secs(5)
            ),
            async {
                if with_peer {
                    observe(
                        &api,
                        PEER.0,
                        PEER.1,
                        Want::Status(to),
                        peer_index,
                        t0 + Duration::from_secs(5),
                    )
                    .await
                } else {
                    None
                }
            }
        );
        if us_at.is_none() || cat_at.is_none() {
            check_alive(&mut m.consul)?;
        }
        us.push(to, t0, us_at);
        cat.push(to, t0, cat_at);
        if with_peer {
            peer.push(to, t0, peer_at);
        }
        serving = !serving;
        let pause = if with_peer {
            fastrand::u64(0..1000)
        } else {
            fastrand::u64(10..60)
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if (i + 1) % 50 == 0 {
            say(&format!("propagation: {}/{total} flips", i + 1));
        }
    }
    let after = m.us.metrics().await;
    let cat_after = m.cat.metrics().await;
    // Leave the app serving for the next phase.
    if !serving {
        m.app.set_serving(true).await;
        settle(&api, US, "passing").await?;
        settle(&api, CAT, "passing").await?;
    }

    let us_all = us.all();
    let peer_all = peer.all();
    let us_s = summary(&us_all, us.timeouts);
    let cat_s = summary(&cat.all(), cat.timeouts);
    let peer_s = summary(&peer_all, peer.timeouts);
    // The peer at 10 s, computed: its latency is the wait for the next check (uniform over the
    // interval, because flips land at random points of its schedule) plus a fixed cost c (the check
    // RPC and the catalog sync). c = mean(1 s latencies) − 500 ms; at 10 s the quantile q is
    // q·10 s + c.
    // With n samples the mean of the uniform wait is known to ±289/√n ms, which is more than c;
    // an estimate below zero is taken as zero.
    let c = peer_s["mean"].as_f64().map(|m| (m - 500.0).max(0.0));
    let peer10 = c.map_or(Value::Null, |c| {
        json!({
            "computed": true,
            "fixed_cost_ms": round(c, 3),
            "fixed_cost_uncertainty_ms": round(289.0 / (peer_all.len().max(1) as f64).sqrt(), 1),
            "p50": round(5000.0 + c, 1), "p90": round(9000.0 + c, 1),
            "p99": round(9900.0 + c, 1), "max": round(10000.0 + c, 1), "mean": round(5000.0 + c, 1),
        })
    });
    let p50_ratio = |a: &Value, b: &Value| match (a["p50"].as_f64(), b["p50"].as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => json!(round(a / b, 1)),
        _ => Value::Null,
    };
    let ratio = |peer: &Value| p50_ratio(peer, &us_s);
    say(&format!("us (agent mode): {us_s}"));
    say(&format!("us (catalog mode): {cat_s}"));
    say(&format!("peer (1 s): {peer_s}"));
    Ok(json!({
        "us": us.report(),
        "catalog": cat.report(),
        "peer_1s": peer.report(),
        "peer_10s": peer10,
        "floor": floor.report(),
        "ratio_p50_peer_1s_over_us": ratio(&peer_s),
        "ratio_p50_peer_10s_over_us": ratio(&peer10),
        "ratio_p50_peer_1s_over_catalog": p50_ratio(&peer_s, &cat_s),
        "ratio_p50_peer_10s_over_catalog": p50_ratio(&peer10, &cat_s),
        "ratio_p50_catalog_over_agent": p50_ratio(&cat_s, &us_s),
        "catalog_sync_lag": histogram_mean_ms(&cat_before, &cat_after, "consul_registrar_sync_lag_seconds", None),
        "sidecar_sync_lag": histogram_mean_ms(&before, &after, "consul_registrar_sync_lag_seconds", None),
        "sidecar_update_ttl": histogram_mean_ms(
            &before, &after, "consul_registrar_consul_request_duration_seconds", Some(("operation", "update_ttl"))),
    }))
}

// ---------------------------------------------------------------------------------------------
// Phase: footprint
// ---------------------------------------------------------------------------------------------

/// Reads `pids` every second for `seconds`; returns the first and last readings and the peak RSS.
async fn watch_usage(pids: &[u32], seconds: u64) -> Vec<(Usage, Usage, u64)> {
    let first: Vec<Option<Usage>> = pids.iter().map(|p| usage(*p)).collect();
    let mut peak: Vec<u64> = first.iter().map(|u| u.map_or(0, |u| u.rss_kib)).collect();
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1).min(end - Instant::now())).await;
        for (i, p) in pids.iter().enumerate() {
            if let Some(u) = usage(*p) {
                peak[i] = peak[i].max(u.rss_kib);
            }
        }
    }
    pids.iter()
        .zip(first)
        .zip(peak)
        .filter_map(|((p, a), peak)| Some((a?, usage(*p)?, peak)))
        .collect()
}

fn usage_report(a: &Usage, b: &Usage, peak_kib: u64) -> Value {
    let (stat, sched) = cpu_percent(a, b);
    json!({
        "cpu_percent_of_core": round(stat, 3),
        "cpu_percent_of_core_schedstat": round(sched, 3),
        "rss_mib": mib(b.rss_kib),
        "rss_peak_in_window_mib": mib(peak_kib),
        "rss_anon_mib": mib(b.anon_kib),
        "rss_file_mib": mib(b.file_kib),
        "rss_high_water_mib": mib(b.hwm_kib),
        "seconds": round(b.at.duration_since(a.at).as_secs_f64(), 1),
    })
}

async fn footprint(bed: &Bed, m: &mut MainBed, args: &Args) -> Result<Value> {
    // The per-node alternative: a Consul client agent joined to the dev server, running the peer's
    // gRPC check (interval 1 s) against the same app.
    let mut client = bed.consul(
        "bench-client",
        ConsulOptions {
            join: Some(m.consul.serf_lan_port()),
            ..Default::default()
        },
    );
    client.start().await;
    let client_api = bed.api(&client);
    let node = "bench-client";
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, nodes) = m.api.get("/v1/catalog/nodes", &[], Duration::ZERO).await?;
        if nodes
            .as_array()
            .is_some_and(|n| n.iter().any(|x| x["Node"] == node))
        {
            break;
        }
        if Instant::now() >= deadline {
            bail!("the Consul client agent did not join within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let node_peer = ("bench-node-peer", "bench-node-peer-1");
    client_api
        .put(
            "/v1/agent/service/register",
            &json!({
                "Name": node_peer.0, "ID": node_peer.1, "Address": "127.0.0.1", "Port": m.app.port(),
                "Check": { "GRPC": format!("127.0.0.1:{}/{HEALTH_SERVICE}", m.app.port()), "Interval": "1s" },
            }),
        )
        .await?;
    let _ = observe(
        &m.api,
        node_peer.0,
        node_peer.1,
        Want::Status("passing"),
        0,
        Instant::now() + Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    let pids = [m.us.pid(), client.pid(), m.cat.pid()];
    say(&format!("footprint: idle for {} s", args.idle_seconds));
    let m0 = m.us.metrics().await;
    let c0 = m.cat.metrics().await;
    let t0 = Instant::now();
    let idle = watch_usage(&pids, args.idle_seconds).await;
    let m1 = m.us.metrics().await;
    let c1 = m.cat.metrics().await;
    let idle_rates = request_rates(&m0, &m1, t0.elapsed().as_secs_f64());
    let cat_idle_rates = request_rates(&c0, &c1, t0.elapsed().as_secs_f64());

    say(&format!(
        "footprint: 10 flips/s for {} s",
        args.load_seconds
    ));
    let flips = args.load_seconds * 10;
    let load_start: Vec<Option<Usage>> = pids.iter().map(|p| usage(*p)).collect();
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    let mut serving = true;
    let mut peak = [0u64; 3];
    for i in 0..flips {
        ticker.tick().await;
        serving = !serving;
        m.app.set_serving(serving).await;
        if i % 10 == 0 {
            for (k, p) in pids.iter().enumerate() {
                peak[k] = peak[k].max(usage(*p).map_or(0, |u| u.rss_kib));
            }
        }
    }
    ticker.tick().await;
    let load_end: Vec<Option<Usage>> = pids.iter().map(|p| usage(*p)).collect();
    if !serving {
        m.app.set_serving(true).await;
    }
    settle(&m.api, US, "passing").await?;
    settle(&m.api, CAT, "passing").await?;

    let report = |k: usize| -> Value {
        let Some((a, b, pk)) = idle.get(k) else {
            return Value::Null;
        };
        let under_load = match (load_start[k], load_end[k]) {
            (Some(x), Some(y)) => usage_report(&x, &y, peak[k].max(y.rss_kib)),
            _ => Value::Null,
        };
        json!({ "idle": usage_report(a, b, *pk), "ten_flips_per_second": under_load })
    };
    let mut sidecar = report(0);
    // CPU per flip: what the load window costs beyond idle, per flip.
    if let (Some((a, b, _)), Some(x), Some(y)) = (idle.first(), load_start[0], load_end[0]) {
        let idle_rate =
            b.cpu_ns.saturating_sub(a.cpu_ns) as f64 / b.at.duration_since(a.at).as_secs_f64();
        let extra = y.cpu_ns.saturating_sub(x.cpu_ns) as f64
            - idle_rate * y.at.duration_since(x.at).as_secs_f64();
        sidecar["cpu_per_flip_us"] = json!(round(extra / flips as f64 / 1000.0, 1));
    }
    sidecar["consul_requests_per_minute_idle"] = idle_rates.clone();
    sidecar["idle_requests_only_refreshes_and_watches"] =
        json!(only_refreshes_and_watches(&idle_rates));
    let mut catalog_sidecar = report(2);
    catalog_sidecar["consul_requests_per_minute_idle"] = cat_idle_rates;
    let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    Ok(json!({
        "sidecar": sidecar,
        "catalog_sidecar": catalog_sidecar,
        "consul_client_agent": report(1),
        "binary_mib": {
            "consul-registrar": mib(size(&bed.registrar) / 1024),
            "consul-registrar_bytes": size(&bed.registrar),
            "consul": mib(size(&bed.consul_bin) / 1024),
        },
        "flips_in_load_window": flips,
    }))
}

// ---------------------------------------------------------------------------------------------
// Phase: drain
// ---------------------------------------------------------------------------------------------

async fn drain(bed: &Bed, m: &mut MainBed, args: &Args) -> Result<Value> {
    const DRAIN: (&str, &str) = ("bench-drain", "bench-drain-1");
    let text = manifest(
        &m.consul.http_addr(),
        m.app.port(),
        &[Instance {
            name: DRAIN.0.into(),
            id: DRAIN.1.into(),
            health_service: HEALTH_SERVICE.into(),
        }],
    );
    let mut gone = Vec::new();
    let mut exited = Vec::new();
    let mut startup = Vec::new();
    let mut timeouts = 0;
    let mut bad_exits = Vec::new();
    for run in 0..args.drain_runs {
        let spawned = Instant::now();
        let mut sidecar = bed.sidecar("sidecar-drain", &text);
        let Some(up) = observe(
            &m.api,
            DRAIN.0,
            DRAIN.1,
            Want::Status("passing"),
            0,
            spawned + Duration::from_secs(30),
        )
        .await
        else {
            bail!(
                "the drain sidecar did not register within 30 s:\n{}",
                sidecar.tail(30)
            );
        };
        startup.push(ms(up - spawned));
        let (index, _) = current(&m.api, DRAIN.0, DRAIN.1).await?;
        let t0 = Instant::now();
        sidecar.signal("TERM");
        let (at, status) = tokio::join!(
            observe(
                &m.api,
                DRAIN.0,
                DRAIN.1,
                Want::Gone,
                index,
                t0 + Duration::from_secs(10)
            ),
            async {
                let s = sidecar.exit_within(Duration::from_secs(15)).await;
                (s, Instant::now())
            }
        );
        match at {
            Some(at) => gone.push(ms(at - t0)),
            None => timeouts += 1,
        }
        match status {
            (Some(s), t) if s.success() => exited.push(ms(t - t0)),
            (s, _) => bad_exits.push(format!("run {run}: {s:?}")),
        }
        check_alive(&mut m.consul)?;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(20..100))).await;
    }
    let s = summary(&gone, timeouts);
    say(&format!("drain: {s}"));
    Ok(json!({
        "gone_from_catalog": s,
        "process_exit": summary(&exited, 0),
        "startup_to_passing": summary(&startup, 0),
        "unexpected_exits": bad_exits,
        "samples_ms": rounded(&gone),
        "startup_samples_ms": rounded(&startup),
    }))
}

// ---------------------------------------------------------------------------------------------
// Phase: scale
// ---------------------------------------------------------------------------------------------

/// The per-client connection limit of the scale phase's own Consul agent (Consul's default is 200).
const SCALE_CONN_LIMIT: u32 = 10_000;
const SCALE_FILTER: &str = "CheckID matches \"^consul-registrar:scale-\"";

fn scale_instances(n: usize) -> Vec<Instance> {
    (0..n)
        .map(|i| Instance {
            name: format!("scale-{i}"),
            id: format!("scale-{i}-1"),
            health_service: format!("svc-{i}"),
        })
        .collect()
}

fn at_least(status: &'static str, n: usize) -> impl Fn(&BTreeMap<String, usize>) -> bool + Copy {
    move |c: &BTreeMap<String, usize>| c.get(status).copied().unwrap_or(0) >= n
}

async fn scale(bed: &Bed, args: &Args) -> Result<Value> {
    let most = args.scale.iter().copied().max().unwrap_or(0);
    let app = bed.demo_app("demo-app-scale", most).await;
    // Consul refuses a client past 200 connections by default. The sidecar keeps under that
    // (at most 32 calls in flight plus `consul.blockingWatches` watches), and an earlier version
    // did not, so the rows are measured against an agent with the limit raised, where a burst of
    // connections costs memory instead of refusals; the largest count is also run against an agent
    // with the default limits, and the report counts the calls it refused.
    let mut consul = bed.consul(
        "bench-scale",
        ConsulOptions {
            http_max_conns_per_client: Some(SCALE_CONN_LIMIT),
            ..Default::default()
        },
    );
    consul.start().await;
    let api = bed.api(&consul);
    let mut rows = Vec::new();
    for &n in &args.scale {
        say(&format!("scale: {n} services"));
        rows.push(scale_row(bed, &api, &consul.http_addr(), &app, n, args).await?);
        check_alive(&mut consul)?;
    }
    drop(consul);
    let default_limits = if most > 150 {
        Some(scale_with_default_limits(bed, &app, most).await?)
    } else {
        None
    };
    Ok(json!({
        "consul_limits": format!("http_max_conns_per_client = {SCALE_CONN_LIMIT}"),
        "rows": rows,
        "default_limits": default_limits,
    }))
}

/// One sidecar with `n` services: time to register all, steady state, flips of all at once.
async fn scale_row(
    bed: &Bed,
    api: &Api,
    consul: &str,
    app: &DemoApp,
    n: usize,
    args: &Args,
) -> Result<Value> {
    let text = manifest(consul, app.port(), &scale_instances(n));
    let spawned = Instant::now();
    let mut sidecar = bed.sidecar(&format!("sidecar-scale-{n}"), &text);
    let (up, counts) = observe_counts(
        api,
        SCALE_FILTER,
        spawned + Duration::from_secs(120),
        at_least("passing", n),
    )
    .await;
    let register_all_ms = up.map(|t| round(ms(t - spawned), 1));
    say(&format!(
        "scale: {n} passing after {register_all_ms:?} ms ({counts:?})"
    ));
    let after_register = usage(sidecar.pid());
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Steady state: no flips.
    let m0 = sidecar.metrics().await;
    let t0 = Instant::now();
    let steady = watch_usage(&[sidecar.pid()], args.steady_seconds).await;
    let m1 = sidecar.metrics().await;
    let rates = request_rates(&m0, &m1, t0.elapsed().as_secs_f64());

    // Flips: every health service of the app at once, then wait for all n in the catalog.
    let rounds = match n {
        0..=10 => 20,
        11..=200 => 10,
        _ => 3,
    };
    let mut cpu_ns = 0u64;
    let mut flipped = 0usize;
    let mut all_flipped = Vec::new();
    let mut flip_timeouts = 0;
    for r in 0..2 * rounds {
        let serving = r % 2 == 1;
        let before = usage(sidecar.pid());
        let t = Instant::now();
        app.set_serving(serving).await;
        let (at, _) = observe_counts(
            api,
            SCALE_FILTER,
            t + Duration::from_secs(30),
            at_least(target_of(serving), n),
        )
        .await;
        let after = usage(sidecar.pid());
        if let (Some(a), Some(b)) = (before, after) {
            cpu_ns += b.cpu_ns.saturating_sub(a.cpu_ns);
            flipped += n;
        }
        match at {
            Some(at) => all_flipped.push(ms(at - t)),
            None => {
                flip_timeouts += 1;
                break;
            }
        }
    }
    app.set_serving(true).await;
    let end = usage(sidecar.pid());
    let m2 = sidecar.metrics().await;
    let status = sidecar.terminate(Duration::from_secs(60)).await;
    let (gone, _) = observe_counts(
        api,
        SCALE_FILTER,
        Instant::now() + Duration::from_secs(60),
        |c| c.values().sum::<usize>() == 0,
    )
    .await;
    Ok(json!({
        "services": n,
        "register_all_ms": register_all_ms,
        "rss_after_register_mib": after_register.map(|u| mib(u.rss_kib)),
        "steady": steady.first().map(|(a, b, pk)| usage_report(a, b, *pk)),
        "consul_requests_per_minute_steady": rates,
        "steady_requests_only_refreshes_and_watches": only_refreshes_and_watches(&rates),
        "expected_requests_per_minute": n as f64 * (60.0 / (10.0 / 3.0) + 1.0),
        "flip_rounds": all_flipped.len() + flip_timeouts,
        "all_flipped_ms": summary(&all_flipped, flip_timeouts),
        "cpu_per_instance_flip_us": (flipped > 0).then(|| round(cpu_ns as f64 / flipped as f64 / 1000.0, 1)),
        "rss_end_mib": end.map(|u| mib(u.rss_kib)),
        "rss_high_water_mib": end.map(|u| mib(u.hwm_kib)),
        "consul_errors_total": consul_errors(&m2),
        "drained_ok": status.is_some_and(|s| s.success()) && gone.is_some(),
    }))
}

/// Consul calls that failed: no HTTP answer, a 5xx, or a 4xx other than a read finding an
/// instance not registered yet (404). Consul answers a connection past its per-client limit with
/// 429, counted here.
fn consul_errors(m: &Metrics) -> f64 {
    m.consul_requests()
        .iter()
        .filter(|(k, _)| {
            k.ends_with(" error")
                || k.ends_with(" 5xx")
                || (k.ends_with(" 4xx")
                    && !k.starts_with("read_service")
                    && !k.starts_with("watch_service"))
        })
        // A fold from +0.0: an empty f64 `sum()` is -0.0, which prints as "-0.00".
        .fold(0.0, |total, (_, v)| total + v)
}

/// The largest count against a Consul agent with default limits, for 20 s: how many registered,
/// how many Consul calls failed.
async fn scale_with_default_limits(bed: &Bed, app: &DemoApp, n: usize) -> Result<Value> {
    say(&format!(
        "scale: {n} services against Consul's default limits (20 s)"
    ));
    let mut consul = bed.consul("bench-scale-default", ConsulOptions::default());
    consul.start().await;
    let api = bed.api(&consul);
    let spawned = Instant::now();
    let mut sidecar = bed.sidecar(
        &format!("sidecar-scale-{n}-default-limits"),
        &manifest(&consul.http_addr(), app.port(), &scale_instances(n)),
    );
    let (up, counts) = observe_counts(
        &api,
        SCALE_FILTER,
        spawned + Duration::from_secs(20),
        at_least("passing", n),
    )
    .await;
    let metrics = sidecar.metrics().await;
    let requests = metrics.consul_requests();
    let status = sidecar.terminate(Duration::from_secs(60)).await;
    check_alive(&mut consul)?;
    say(&format!(
        "scale: default limits: {counts:?} after 20 s, {} failed Consul calls",
        consul_errors(&metrics)
    ));
    Ok(json!({
        "services": n,
        "seconds": 20,
        "register_all_ms": up.map(|t| round(ms(t - spawned), 1)),
        "checks_by_status": counts,
        "consul_errors_total": consul_errors(&metrics),
        "consul_requests": requests,
        "exit": status.map(|s| s.to_string()),
    }))
}

// ---------------------------------------------------------------------------------------------
// Phase: recovery
// ---------------------------------------------------------------------------------------------

async fn recovery(bed: &Bed, args: &Args) -> Result<Value> {
    const REC: (&str, &str) = ("bench-recovery", "bench-recovery-1");
    let mut consul = bed.consul("bench-recovery", ConsulOptions::default());
    consul.start().await;
    let api = bed.api(&consul);
    let app = bed.demo_app("demo-app-recovery", 0).await;
    let sidecar = bed.sidecar(
        "sidecar-recovery",
        &manifest(
            &consul.http_addr(),
            app.port(),
            &[Instance {
                name: REC.0.into(),
                id: REC.1.into(),
                health_service: HEALTH_SERVICE.into(),
            }],
        ),
    );
    if observe(
        &api,
        REC.0,
        REC.1,
        Want::Status("passing"),
        0,
        Instant::now() + Duration::from_secs(30),
    )
    .await
    .is_none()
    {
        bail!(
            "the recovery sidecar did not register:\n{}",
            sidecar.tail(30)
        );
    }
    let mut from_http = Vec::new();
    let mut from_leader = Vec::new();
    let mut leader_after_http = Vec::new();
    let mut down_ms = Vec::new();
    let mut timeouts = 0;
    for run in 0..args.recovery_runs {
        let killed = Instant::now();
        consul.stop();
        consul.spawn();
        let mut http_at = None;
        let deadline = Instant::now() + Duration::from_secs(60);
        let leader_at = loop {
            match api.leader().await {
                Ok(l) => {
                    let now = Instant::now();
                    http_at.get_or_insert(now);
                    if !l.is_empty() {
                        break now;
                    }
                }
                Err(_) if Instant::now() >= deadline => {
                    bail!("Consul did not come back within 60 s (run {run})")
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let http_at = http_at.unwrap_or(leader_at);
        down_ms.push(ms(http_at - killed));
        leader_after_http.push(ms(leader_at - http_at));
        match observe(
            &api,
            REC.0,
            REC.1,
            Want::Status("passing"),
            0,
            http_at + Duration::from_secs(30),
        )
        .await
        {
            Some(back) => {
                from_http.push(ms(back - http_at));
                from_leader.push(ms(back.saturating_duration_since(leader_at)));
            }
            None => timeouts += 1,
        }
        say(&format!(
            "recovery run {run}: back {:?} ms after Consul answered",
            from_http.last().map(|x| round(*x, 1))
        ));
        tokio::time::sleep(Duration::from_millis(fastrand::u64(200..1200))).await;
    }
    let repairs = sidecar.metrics().await.sum(
        "consul_registrar_repairs_total",
        Some(("reason", "missing")),
    );
    drop(sidecar);
    Ok(json!({
        "from_consul_answering": summary(&from_http, timeouts),
        "from_leader_elected": summary(&from_leader, timeouts),
        "leader_after_http": summary(&leader_after_http, 0),
        "consul_down_ms": summary(&down_ms, 0),
        "repairs_counted": repairs,
        "samples_ms": rounded(&from_http),
    }))
}

// ---------------------------------------------------------------------------------------------
// Phase: raft
// ---------------------------------------------------------------------------------------------

/// The kinds of Raft write a registrar can cause, as Consul's telemetry names them
/// (`consul.fsm.<kind>`): catalog registrations and deregistrations, KV writes, sessions,
/// transactions. Everything else a quiet server writes is Consul's own (coordinate updates; the
/// leader's periodic barrier, which is a log entry without an FSM apply).
const REGISTRAR_FSM_KINDS: [&str; 5] = ["register", "deregister", "kvs", "session", "txn"];

/// The server's raft log index (`Stats.raft.last_log_index` of `/v1/agent/self`): it grows by one
/// for every entry appended, whatever wrote it.
async fn raft_log_index(api: &Api) -> Result<u64> {
    let (_, body) = api.get("/v1/agent/self", &[], Duration::ZERO).await?;
    body["Stats"]["raft"]["last_log_index"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .context("no Stats.raft.last_log_index in /v1/agent/self")
}

/// Raft applies and barriers, and FSM applies by kind (and `op` label), in one interval of
/// `/v1/agent/metrics`.
fn raft_counts(metrics: &Value) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for c in metrics["Counters"].as_array().into_iter().flatten() {
        let name = c["Name"].as_str().unwrap_or_default();
        if let Some(short @ ("raft.apply" | "raft.barrier")) = name.strip_prefix("consul.") {
            *out.entry(short.to_string()).or_insert(0.0) += c["Count"].as_f64().unwrap_or(0.0);
        }
    }
    for sample in metrics["Samples"].as_array().into_iter().flatten() {
        let name = sample["Name"].as_str().unwrap_or_default();
        if let Some(kind) = name.strip_prefix("consul.fsm.") {
            let op = sample["Labels"]["op"]
                .as_str()
                .map_or(String::new(), |op| format!(" {op}"));
            *out.entry(format!("fsm.{kind}{op}")).or_insert(0.0) +=
                sample["Count"].as_f64().unwrap_or(0.0);
        }
    }
    out
}

/// Seconds since midnight of a telemetry timestamp (`2026-11-25 18:07:00 +0000 UTC`).
fn seconds_of_day(timestamp: &str) -> Option<u32> {
    let time = timestamp.split(' ').nth(1)?;
    let mut parts = time.split(':').map(|p| p.parse::<u32>().ok());
    Some(parts.next()?? * 3600 + parts.next()?? * 60 + parts.next()??)
}

/// Whether a key of [`raft_counts`] is an FSM apply of a registrar's kind.
fn registrar_kind(key: &str) -> bool {
    key.strip_prefix("fsm.")
        .and_then(|k| k.split(' ').next())
        .is_some_and(|k| REGISTRAR_FSM_KINDS.contains(&k))
}

/// Raft activity of the server behind `api` over a window of `seconds`: the raft log index at both
/// ends (every entry, exact, over the whole window), and by kind from Consul's in-memory telemetry
/// (`/v1/agent/metrics`, read every second). That endpoint shows the last *finished* 10-s
/// interval, so the first interval shown ended before the window began and the second began before
/// it; only the later ones, wholly inside the window, are counted.
async fn raft_window(api: &Api, seconds: u64) -> Result<Value> {
    let index0 = raft_log_index(api).await?;
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(seconds);
    let mut shown: Vec<(String, BTreeMap<String, f64>)> = Vec::new();
    loop {
        if let Ok((_, m)) = api.get("/v1/agent/metrics", &[], Duration::ZERO).await
            && let Some(ts) = m["Timestamp"].as_str()
            && !shown.iter().any(|(t, _)| t == ts)
        {
            shown.push((ts.to_string(), raft_counts(&m)));
        }
        let now = Instant::now();
        if now >= end {
            break;
        }
        tokio::time::sleep((end - now).min(Duration::from_secs(1))).await;
    }
    let index1 = raft_log_index(api).await?;
    let wall = t0.elapsed().as_secs_f64();
    let interval_s = shown
        .windows(2)
        .filter_map(|w| seconds_of_day(&w[1].0)?.checked_sub(seconds_of_day(&w[0].0)?))
        .filter(|d| *d > 0)
        .min()
        .unwrap_or(10);
    let inside = shown.get(2..).unwrap_or_default();
    let telemetry_s = (inside.len() as u32 * interval_s) as f64;
    let mut totals: BTreeMap<String, f64> = BTreeMap::new();
    for (_, counts) in inside {
        for (k, v) in counts {
            *totals.entry(k.clone()).or_insert(0.0) += v;
        }
    }
    let per_minute = |x: f64| {
        if telemetry_s > 0.0 {
            json!(round(x * 60.0 / telemetry_s, 2))
        } else {
            Value::Null
        }
    };
    let registrar: f64 = totals
        .iter()
        .filter(|(k, _)| registrar_kind(k))
        // A fold from +0.0: an empty f64 `sum()` is -0.0, which prints as "-0.00".
        .fold(0.0, |total, (_, v)| total + v);
    let entries = index1.saturating_sub(index0);
    Ok(json!({
        "seconds": round(wall, 1),
        "raft_log_entries": entries,
        "raft_log_entries_per_minute": round(entries as f64 * 60.0 / wall, 2),
        "telemetry_seconds": telemetry_s,
        "telemetry_counts": totals,
        "telemetry_per_minute": totals.iter().map(|(k, v)| (k.clone(), per_minute(*v))).collect::<serde_json::Map<_, _>>(),
        "registrar_kind_writes": registrar,
        "registrar_kind_writes_per_minute": per_minute(registrar),
    }))
}

/// The sum of a scrape's Consul requests (every operation and status).
fn requests_total(rates: &Value) -> f64 {
    rates.as_object().map_or(0.0, |m| {
        m.values()
            .filter_map(Value::as_f64)
            .fold(0.0, |total, x| total + x)
    })
}

/// Steady-state Raft writes: one Consul dev server, a quiet window without a sidecar, then one
/// sidecar with `raft_instances` instances in agent mode, then one in catalog mode, each in a
/// quiet window of its own after every instance passes (no flips; the start-up writes are over).
async fn raft(bed: &Bed, args: &Args) -> Result<Value> {
    let n = args.raft_instances.max(1);
    let mut consul = bed.consul("bench-raft", ConsulOptions::default());
    consul.start().await;
    let api = bed.api(&consul);
    let app = bed.demo_app("demo-app-raft", 0).await;
    // The new server's own start-up writes (its node, its leadership) first.
    tokio::time::sleep(Duration::from_secs(5)).await;
    say(&format!(
        "raft: quiet window without a sidecar ({} s)",
        args.raft_seconds
    ));
    let baseline = raft_window(&api, args.raft_seconds).await?;
    say(&format!(
        "raft: no sidecar: {} raft log entries/min, {} of a registrar's kinds",
        baseline["raft_log_entries_per_minute"], baseline["registrar_kind_writes_per_minute"]
    ));
    let mut rows = serde_json::Map::new();
    for mode in [Mode::Agent, Mode::Catalog] {
        let name = format!("raft-{}", mode.name());
        let instances: Vec<Instance> = (0..n)
            .map(|i| Instance {
                name: name.clone(),
                id: format!("{name}-{i}"),
                health_service: HEALTH_SERVICE.into(),
            })
            .collect();
        let mut sidecar = start_in(
            bed,
            mode,
            &format!("sidecar-{name}"),
            &manifest_in(mode, &consul.http_addr(), app.port(), &instances),
            "bench-raft-node",
        );
        let filter = format!("ServiceName == \"{name}\"");
        let (up, counts) = observe_counts(
            &api,
            &filter,
            Instant::now() + Duration::from_secs(60),
            at_least("passing", n),
        )
        .await;
        if up.is_none() {
            bail!(
                "raft: the {} mode sidecar's {n} instances were not all passing within 60 s \
                 ({counts:?}):\n{}",
                mode.name(),
                sidecar.tail(30)
            );
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        say(&format!(
            "raft: {} mode, {n} instances ({} s)",
            mode.name(),
            args.raft_seconds
        ));
        let m0 = sidecar.metrics().await;
        let t = Instant::now();
        let window = raft_window(&api, args.raft_seconds).await?;
        let m1 = sidecar.metrics().await;
        let secs = t.elapsed().as_secs_f64();
        let rates = request_rates(&m0, &m1, secs);
        let renewals = |m: &Metrics| {
            m.sum(
                "consul_registrar_session_renewals_total",
                Some(("outcome", "ok")),
            )
        };
        let over = window["raft_log_entries_per_minute"]
            .as_f64()
            .unwrap_or(0.0)
            - baseline["raft_log_entries_per_minute"]
                .as_f64()
                .unwrap_or(0.0);
        let kinds = window["registrar_kind_writes_per_minute"].as_f64();
        say(&format!(
            "raft: {} mode: {} raft log entries/min ({over:+.1} over the quiet server), {kinds:?} of \
             a registrar's kinds",
            mode.name(),
            window["raft_log_entries_per_minute"]
        ));
        let row = json!({
            "instances": n,
            "window": window,
            "raft_log_entries_per_minute_over_baseline": round(over, 2),
            "raft_log_entries_per_minute_per_instance_over_baseline": round(over / n as f64, 3),
            "registrar_kind_writes_per_minute_per_instance": kinds.map(|k| round(k / n as f64, 3)),
            "consul_requests_per_minute": rates,
            "consul_requests_per_minute_per_instance": round(requests_total(&rates) / n as f64, 2),
            "session_renewals_per_minute": round((renewals(&m1) - renewals(&m0)) * 60.0 / secs, 1),
        });
        rows.insert(mode.name().to_string(), row);
        let status = sidecar.terminate(Duration::from_secs(60)).await;
        let (gone, _) = observe_counts(
            &api,
            &filter,
            Instant::now() + Duration::from_secs(30),
            |c| c.values().sum::<usize>() == 0,
        )
        .await;
        if !status.is_some_and(|s| s.success()) || gone.is_none() {
            say(&format!(
                "raft: the {} mode sidecar did not drain cleanly ({status:?})",
                mode.name()
            ));
        }
        check_alive(&mut consul)?;
    }
    Ok(json!({
        "instances": n,
        "window_seconds": args.raft_seconds,
        "registrar_kinds": REGISTRAR_FSM_KINDS,
        "baseline": baseline,
        "agent": rows.get("agent"),
        "catalog": rows.get("catalog"),
    }))
}

// ---------------------------------------------------------------------------------------------
// Phase: reap
// ---------------------------------------------------------------------------------------------

/// How long a SIGKILLed sidecar's instance may take to go, by mode, before it counts as lost:
/// agent mode: the TTL (10 s), `deregisterCriticalServiceAfter` (1 m) and Consul's reaper (every
/// 30 s) with room to spare; catalog mode: 2 × session TTL, the reaper, and room.
fn reap_deadline(mode: Mode) -> Duration {
    match mode {
        Mode::Agent => Duration::from_secs(240),
        Mode::Catalog => Duration::from_secs(4 * SESSION_TTL_S + 30),
    }
}

/// SIGKILL → gone, both modes side by side on one Consul dev server: `reap_runs` sidecars in each
/// mode (one instance each, every default: agent mode with `check.ttl` 10 s and
/// `deregisterCriticalServiceAfter` 1 m; catalog mode with session TTL 10 s on Kubernetes node
/// `bench-reap-a`), and one more catalog-mode sidecar of the catalog-mode victims' service on node
/// `bench-reap-b`, started first, that stays alive: elected, its reaper is the one that deregisters
/// the others' instances (a reaper judges only its own service's). A managed virtual node without
/// instances (`consul-registrar-bench-reap-empty`) is there from the start, as in a cluster where
/// every pod of some node has gone: the sweep that meets it removes it. An agent-mode and a catalog-mode
/// sidecar are killed at the same moment, pair after pair 30 s / runs apart (so the kills land at
/// different points of Consul's 30 s reaper period).
async fn reap(bed: &Bed, args: &Args) -> Result<Value> {
    // Of the catalog-mode victims' service (`reap-<mode>`): only its own service's sidecars reap.
    const SURVIVOR: (&str, &str) = ("reap-catalog", "reap-survivor-1");
    let runs = args.reap_runs.max(1);
    let mut consul = bed.consul("bench-reap", ConsulOptions::default());
    consul.start().await;
    let api = bed.api(&consul);
    let app = bed.demo_app("demo-app-reap", 0).await;
    let addr = consul.http_addr();
    // A virtual node whose pods have all gone (left by a sidecar that never drained): the reaper's
    // sweep must get past it.
    api.put(
        "/v1/catalog/register",
        &json!({
            "Node": "consul-registrar-bench-reap-empty",
            "Address": "127.0.0.1",
            "NodeMeta": { "managed-by": "consul-registrar" },
        }),
    )
    .await?;
    let one = |name: &str, id: &str| {
        [Instance {
            name: name.into(),
            id: id.into(),
            health_service: HEALTH_SERVICE.into(),
        }]
    };
    let survivor = start_in(
        bed,
        Mode::Catalog,
        "sidecar-reap-survivor",
        &manifest_in(
            Mode::Catalog,
            &addr,
            app.port(),
            &one(SURVIVOR.0, SURVIVOR.1),
        ),
        "bench-reap-b",
    );
    let mut victims: Vec<(usize, Mode, String, String, Sidecar)> = Vec::new();
    for k in 0..runs {
        for mode in [Mode::Agent, Mode::Catalog] {
            let name = format!("reap-{}", mode.name());
            let id = format!("{name}-{k}");
            let sidecar = start_in(
                bed,
                mode,
                &format!("sidecar-{id}"),
                &manifest_in(mode, &addr, app.port(), &one(&name, &id)),
                "bench-reap-a",
            );
            victims.push((k, mode, name, id, sidecar));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    if observe(
        &api,
        SURVIVOR.0,
        SURVIVOR.1,
        Want::Status("passing"),
        0,
        deadline,
    )
    .await
    .is_none()
    {
        bail!(
            "reap: the surviving sidecar did not register:\n{}",
            survivor.tail(30)
        );
    }
    for (_, _, name, id, sidecar) in &victims {
        if observe(&api, name, id, Want::Status("passing"), 0, deadline)
            .await
            .is_none()
        {
            bail!("reap: {id} did not register:\n{}", sidecar.tail(30));
        }
    }
    let reaped_before = survivor
        .metrics()
        .await
        .sum("consul_registrar_reaped_total", None);
    let spacing = Duration::from_secs(30) / runs as u32;
    say(&format!(
        "reap: killing {runs} sidecar(s) in each mode, {} s apart",
        spacing.as_secs()
    ));
    let mut observers = tokio::task::JoinSet::new();
    for k in 0..runs {
        if k > 0 {
            tokio::time::sleep(spacing + Duration::from_millis(fastrand::u64(0..1000))).await;
        }
        for (_, mode, name, id, sidecar) in victims.iter().filter(|v| v.0 == k) {
            let t0 = Instant::now();
            sidecar.signal("KILL");
            let (api, mode, name, id) = (api.clone(), *mode, name.clone(), id.clone());
            observers.spawn(async move {
                let deadline = t0 + reap_deadline(mode);
                let not_passing = observe(&api, &name, &id, Want::NotPassing, 0, deadline).await;
                let gone = observe(&api, &name, &id, Want::Gone, 0, deadline).await;
                (
                    mode,
                    id,
                    not_passing.map(|t| ms(t - t0)),
                    gone.map(|t| ms(t - t0)),
                )
            });
        }
    }
    let mut results: BTreeMap<&str, (Vec<f64>, Vec<f64>, usize)> = BTreeMap::new();
    while let Some(joined) = observers.join_next().await {
        let (mode, id, not_passing, gone) = joined.context("a reap observer panicked")?;
        say(&format!(
            "reap: {id}: not passing after {:?} s, gone after {:?} s",
            not_passing.map(|x| round(x / 1000.0, 1)),
            gone.map(|x| round(x / 1000.0, 1))
        ));
        let entry = results.entry(mode.name()).or_default();
        entry.0.extend(not_passing);
        match gone {
            Some(g) => entry.1.push(g),
            None => entry.2 += 1,
        }
    }
    let reaped = survivor
        .metrics()
        .await
        .sum("consul_registrar_reaped_total", None)
        - reaped_before;
    let survivor_passing = current(&api, SURVIVOR.0, SURVIVOR.1).await?.1 == Some("passing");
    check_alive(&mut consul)?;
    drop(victims);
    let report = |mode: Mode| {
        let (not_passing, gone, lost) = results.get(mode.name()).cloned().unwrap_or_default();
        json!({
            "not_passing": summary(&not_passing, lost),
            "gone": summary(&gone, lost),
            "not_passing_samples_ms": rounded(&not_passing),
            "gone_samples_ms": rounded(&gone),
        })
    };
    let agent = report(Mode::Agent);
    let catalog = report(Mode::Catalog);
    let ratio = match (
        agent["gone"]["p50"].as_f64(),
        catalog["gone"]["p50"].as_f64(),
    ) {
        (Some(a), Some(c)) if c > 0.0 => json!(round(a / c, 1)),
        _ => Value::Null,
    };
    Ok(json!({
        "runs": runs,
        "session_ttl_seconds": SESSION_TTL_S,
        "catalog_bound_ms": (2 * SESSION_TTL_S + 1) * 1000,
        "agent_bound_ms": (10 + 60 + 30) * 1000,
        "agent": agent,
        "catalog": catalog,
        "ratio_p50_gone_agent_over_catalog": ratio,
        "survivor_reaped_total": reaped,
        "survivor_still_passing": survivor_passing,
    }))
}

// ---------------------------------------------------------------------------------------------
// The Markdown report
// ---------------------------------------------------------------------------------------------

fn f(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.abs() >= 100.0 => format!("{x:.0}"),
        Some(x) if x.abs() >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
        None => "–".into(),
    }
}

fn latency_row(md: &mut String, label: &str, s: &Value) {
    let _ = writeln!(
        md,
        "| {label} | {} | {} | {} | {} | {} | {} |",
        s["n"].as_u64().map_or("–".into(), |n| n.to_string()),
        f(&s["p50"]),
        f(&s["p90"]),
        f(&s["p99"]),
        f(&s["max"]),
        s["timeouts"].as_u64().unwrap_or(0)
    );
}

/// A latency summary in milliseconds, in seconds.
fn in_seconds(s: &Value) -> Value {
    let mut out = s.clone();
    for k in ["min", "p50", "p90", "p99", "max", "mean"] {
        if let Some(x) = s[k].as_f64() {
            out[k] = json!(x / 1000.0);
        }
    }
    out
}

const LATENCY_HEADER: &str =
    "| | n | p50 ms | p90 ms | p99 ms | max ms | lost |\n|---|---:|---:|---:|---:|---:|---:|\n";

struct Target {
    what: &'static str,
    goal: &'static str,
    value: String,
    met: Option<bool>,
}

fn targets(r: &Value) -> Vec<Target> {
    let mut t = Vec::new();
    let num = |v: &Value| v.as_f64();
    let le = |v: Option<f64>, goal: f64| v.map(|x| x <= goal);
    let p = &r["propagation"];
    if !p.is_null() {
        let p99 = num(&p["us"]["all"]["p99"]);
        t.push(Target {
            what: "propagation p99",
            goal: "≤ 10 ms",
            value: format!("{} ms", f(&p["us"]["all"]["p99"])),
            met: le(p99, 10.0),
        });
        let ratio = num(&p["ratio_p50_peer_1s_over_us"]);
        t.push(Target {
            what: "p50 vs Consul's check at 1 s",
            goal: "≥ 50× faster",
            value: format!("{}×", f(&p["ratio_p50_peer_1s_over_us"])),
            met: ratio.map(|x| x >= 50.0),
        });
        if !p["catalog"].is_null() {
            t.push(Target {
                what: "propagation p99, catalog mode",
                goal: "≤ 10 ms",
                value: format!("{} ms", f(&p["catalog"]["all"]["p99"])),
                met: le(num(&p["catalog"]["all"]["p99"]), 10.0),
            });
            t.push(Target {
                what: "p50 vs Consul's check at 1 s, catalog mode",
                goal: "≥ 50× faster",
                value: format!("{}×", f(&p["ratio_p50_peer_1s_over_catalog"])),
                met: num(&p["ratio_p50_peer_1s_over_catalog"]).map(|x| x >= 50.0),
            });
        }
    }
    let reap = &r["reap"];
    if !reap.is_null() {
        let g = &reap["catalog"]["gone"];
        let lost = g["timeouts"].as_u64().unwrap_or(0);
        t.push(Target {
            what: "SIGKILL → gone, catalog mode (max)",
            goal: "≤ 2 × session TTL + 1 s (21 s)",
            value: if lost > 0 {
                format!("{lost} of {} never gone", reap["runs"])
            } else {
                format!("{} s", f(&json!(g["max"].as_f64().map(|x| x / 1000.0))))
            },
            met: if lost > 0 {
                Some(false)
            } else {
                le(num(&g["max"]), 21_000.0)
            },
        });
    }
    let raft = &r["raft"];
    if !raft.is_null() {
        let k = &raft["catalog"]["registrar_kind_writes_per_minute_per_instance"];
        t.push(Target {
            what: "steady-state Raft writes, catalog mode",
            goal: "none (session renewals are not Raft writes)",
            value: format!("{} per minute per instance", f(k)),
            met: num(k).map(|x| x == 0.0),
        });
    }
    let d = &r["drain"];
    if !d.is_null() {
        t.push(Target {
            what: "drain (delay 0) p99",
            goal: "≤ 50 ms",
            value: format!("{} ms", f(&d["gone_from_catalog"]["p99"])),
            met: le(num(&d["gone_from_catalog"]["p99"]), 50.0),
        });
    }
    let rec = &r["recovery"];
    if !rec.is_null() {
        t.push(Target {
            what: "recovery (max)",
            goal: "≤ 1 s",
            value: format!("{} ms", f(&rec["from_consul_answering"]["max"])),
            met: le(num(&rec["from_consul_answering"]["max"]), 1000.0)
                .map(|ok| ok && rec["from_consul_answering"]["timeouts"] == 0),
        });
    }
    let fp = &r["footprint"];
    if !fp.is_null() {
        let rss = num(&fp["sidecar"]["ten_flips_per_second"]["rss_peak_in_window_mib"])
            .into_iter()
            .chain(num(&fp["sidecar"]["idle"]["rss_peak_in_window_mib"]))
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        t.push(Target {
            what: "RSS, 1 service (peak seen)",
            goal: "≤ 10 MiB",
            value: rss.map_or("–".into(), |x| format!("{x:.1} MiB")),
            met: le(rss, 10.0),
        });
        t.push(Target {
            what: "idle CPU, 1 service",
            goal: "≤ 0.1 % of a core",
            value: format!("{} %", f(&fp["sidecar"]["idle"]["cpu_percent_of_core"])),
            met: le(num(&fp["sidecar"]["idle"]["cpu_percent_of_core"]), 0.1),
        });
        t.push(Target {
            what: "release binary, stripped",
            goal: "≤ 10 MiB",
            value: format!("{} MiB", f(&fp["binary_mib"]["consul-registrar"])),
            met: le(num(&fp["binary_mib"]["consul-registrar"]), 10.0),
        });
    }
    if let Some(rows) = r["scale"]["rows"].as_array() {
        if let Some(row) = rows.iter().find(|x| x["services"] == 1000) {
            let rss = num(&row["rss_high_water_mib"]);
            t.push(Target {
                what: "RSS, 1,000 services (high water)",
                goal: "≤ 50 MiB",
                value: rss.map_or("–".into(), |x| format!("{x:.1} MiB")),
                met: le(rss, 50.0),
            });
        }
        let d = &r["scale"]["default_limits"];
        if !d.is_null() {
            t.push(Target {
                what: "1,000 services, Consul's default limits",
                goal: "all registered and passing",
                value: if d["register_all_ms"].is_null() {
                    format!("not within {} s: {}", d["seconds"], d["checks_by_status"])
                } else {
                    format!(
                        "in {} ms, {} refused or failed calls retried",
                        f(&d["register_all_ms"]),
                        f(&d["consul_errors_total"])
                    )
                },
                met: Some(!d["register_all_ms"].is_null()),
            });
        }
        let only: Vec<bool> = rows
            .iter()
            .filter_map(|x| x["steady_requests_only_refreshes_and_watches"].as_bool())
            .collect();
        if !only.is_empty() {
            t.push(Target {
                what: "steady-state Consul requests",
                goal: "TTL refreshes and anti-entropy only",
                value: if only.iter().all(|x| *x) {
                    "only those".into()
                } else {
                    "others too (see scale)".into()
                },
                met: Some(only.iter().all(|x| *x)),
            });
        }
    }
    t
}

fn markdown(r: &Value) -> String {
    let mut md = String::from("# consul-registrar benchmark results\n\n");
    let m = &r["machine"];
    let v = &r["versions"];
    let _ = writeln!(
        md,
        "Machine: {} × {} ({} GiB), Linux {}; load average at start {}.  \n{}; {}; {}{}.\n",
        m["cores"],
        m["cpu"].as_str().unwrap_or("?"),
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or("?"),
        m["loadavg_start"].as_str().unwrap_or("?"),
        v["consul-registrar"].as_str().unwrap_or("?"),
        v["consul"].as_str().unwrap_or("?"),
        v["rustc"].as_str().unwrap_or(""),
        v["commit"]
            .as_str()
            .filter(|c| !c.is_empty())
            .map_or(String::new(), |c| format!(", commit {c}")),
    );
    let t = targets(r);
    if !t.is_empty() {
        md.push_str("## Targets (reported, not asserted)\n\n| target | goal | measured | |\n|---|---|---|---|\n");
        for x in &t {
            let mark = match x.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "–",
            };
            let _ = writeln!(md, "| {} | {} | {} | {mark} |", x.what, x.goal, x.value);
        }
        md.push('\n');
    }
    let p = &r["propagation"];
    if !p.is_null() {
        md.push_str("## Propagation: the app flips → `/v1/health/service` shows it\n\n");
        md.push_str(LATENCY_HEADER);
        latency_row(
            &mut md,
            "**consul-registrar**, agent mode (both ways)",
            &p["us"]["all"],
        );
        latency_row(&mut md, "… to critical", &p["us"]["to_critical"]);
        latency_row(&mut md, "… to passing", &p["us"]["to_passing"]);
        if !p["catalog"].is_null() {
            latency_row(
                &mut md,
                "**consul-registrar**, catalog mode (both ways)",
                &p["catalog"]["all"],
            );
            latency_row(&mut md, "… to critical", &p["catalog"]["to_critical"]);
            latency_row(&mut md, "… to passing", &p["catalog"]["to_passing"]);
        }
        latency_row(
            &mut md,
            "Consul `GRPC` check, interval 1 s",
            &p["peer_1s"]["all"],
        );
        let p10 = &p["peer_10s"];
        let _ = writeln!(
            md,
            "| Consul `GRPC` check, interval 10 s (computed) | – | {} | {} | {} | {} | – |",
            f(&p10["p50"]),
            f(&p10["p90"]),
            f(&p10["p99"]),
            f(&p10["max"])
        );
        latency_row(
            &mut md,
            "Consul alone (TTL update by the bench)",
            &p["floor"]["all"],
        );
        let _ = writeln!(
            md,
            "\np50 ratio: Consul's check at 1 s / consul-registrar = **{}×**; at 10 s = **{}×**. \
             Inside the sidecar, verdict change → Consul acknowledged: mean {} ms (`sync_lag_seconds`).\n",
            f(&p["ratio_p50_peer_1s_over_us"]),
            f(&p["ratio_p50_peer_10s_over_us"]),
            f(&p["sidecar_sync_lag"]["mean_ms"]),
        );
        if !p["catalog"].is_null() {
            let _ = writeln!(
                md,
                "Catalog mode: p50 ratio Consul's check at 1 s / catalog mode = **{}×**; at 10 s = **{}×**; \
                 catalog mode / agent mode = {}×. Inside the catalog-mode sidecar, verdict change → \
                 Consul acknowledged: mean {} ms.\n",
                f(&p["ratio_p50_peer_1s_over_catalog"]),
                f(&p["ratio_p50_peer_10s_over_catalog"]),
                f(&p["ratio_p50_catalog_over_agent"]),
                f(&p["catalog_sync_lag"]["mean_ms"]),
            );
        }
    }
    let raft = &r["raft"];
    if !raft.is_null() {
        let _ = writeln!(
            md,
            "## Steady-state Raft writes: agent vs catalog mode\n\n\
             One Consul dev server; one sidecar with {} instances in each mode, in turn; quiet \
             windows of {} s without flips. *Raft log entries* count every entry the server \
             appended (`last_log_index`), Consul's own included; *a registrar's kinds* counts \
             the FSM applies a registrar can cause ({}), from the server's telemetry.\n",
            raft["instances"],
            raft["window_seconds"],
            raft["registrar_kinds"]
                .as_array()
                .map(|k| k
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        );
        md.push_str(
            "| window | raft log entries/min | over the quiet server, per instance/min | \
             writes of a registrar's kinds/min | per instance/min | Consul requests/min per instance | \
             session renewals/min |\n|---|---:|---:|---:|---:|---:|---:|\n",
        );
        let b = &raft["baseline"];
        let _ = writeln!(
            md,
            "| no sidecar | {} | – | {} | – | – | – |",
            f(&b["raft_log_entries_per_minute"]),
            f(&b["registrar_kind_writes_per_minute"])
        );
        for (label, key) in [("agent mode", "agent"), ("catalog mode", "catalog")] {
            let x = &raft[key];
            if x.is_null() {
                continue;
            }
            let _ = writeln!(
                md,
                "| {label}, {} instances | {} | {} | {} | {} | {} | {} |",
                x["instances"],
                f(&x["window"]["raft_log_entries_per_minute"]),
                f(&x["raft_log_entries_per_minute_per_instance_over_baseline"]),
                f(&x["window"]["registrar_kind_writes_per_minute"]),
                f(&x["registrar_kind_writes_per_minute_per_instance"]),
                f(&x["consul_requests_per_minute_per_instance"]),
                f(&x["session_renewals_per_minute"]),
            );
        }
        let _ = writeln!(
            md,
            "\nBy kind (per minute, telemetry): no sidecar {}; agent mode {}; catalog mode {}. \
             Consul requests per minute: agent mode {}; catalog mode {}.\n",
            b["telemetry_per_minute"],
            raft["agent"]["window"]["telemetry_per_minute"],
            raft["catalog"]["window"]["telemetry_per_minute"],
            raft["agent"]["consul_requests_per_minute"],
            raft["catalog"]["consul_requests_per_minute"],
        );
    }
    let reap = &r["reap"];
    if !reap.is_null() {
        md.push_str("## Reap: a SIGKILLed sidecar's instance, agent vs catalog mode\n\n");
        md.push_str(
            "| | n | p50 s | p90 s | p99 s | max s | lost |\n|---|---:|---:|---:|---:|---:|---:|\n",
        );
        latency_row(
            &mut md,
            "agent mode: SIGKILL → not passing (the TTL expired)",
            &in_seconds(&reap["agent"]["not_passing"]),
        );
        latency_row(
            &mut md,
            "agent mode: SIGKILL → gone (deregisterCriticalServiceAfter, Consul's reaper)",
            &in_seconds(&reap["agent"]["gone"]),
        );
        latency_row(
            &mut md,
            "catalog mode: SIGKILL → not passing",
            &in_seconds(&reap["catalog"]["not_passing"]),
        );
        latency_row(
            &mut md,
            "catalog mode: SIGKILL → gone (session expired, a live sidecar's reaper)",
            &in_seconds(&reap["catalog"]["gone"]),
        );
        let _ = writeln!(
            md,
            "\np50 ratio, gone: agent mode / catalog mode = **{}×**. Session TTL {} s; bounds: catalog \
             mode 2 × TTL + 1 s = {} s, agent mode TTL + 1 m + 30 s = {} s. The surviving \
             catalog-mode sidecar counted {} reaped instances (`consul_registrar_reaped_total`).\n",
            f(&reap["ratio_p50_gone_agent_over_catalog"]),
            reap["session_ttl_seconds"],
            reap["catalog_bound_ms"]
                .as_f64()
                .map_or(0.0, |x| x / 1000.0),
            reap["agent_bound_ms"].as_f64().map_or(0.0, |x| x / 1000.0),
            f(&reap["survivor_reaped_total"]),
        );
    }
    let d = &r["drain"];
    if !d.is_null() {
        md.push_str("## Drain and start-up\n\n");
        md.push_str(LATENCY_HEADER);
        latency_row(
            &mut md,
            "SIGTERM (delay 0) → gone from the catalog",
            &d["gone_from_catalog"],
        );
        latency_row(&mut md, "SIGTERM → process exited", &d["process_exit"]);
        latency_row(
            &mut md,
            "start → registered and passing",
            &d["startup_to_passing"],
        );
        md.push('\n');
    }
    let rec = &r["recovery"];
    if !rec.is_null() {
        md.push_str("## Recovery: Consul restarted empty\n\n");
        md.push_str(LATENCY_HEADER);
        latency_row(
            &mut md,
            "Consul answers HTTP → instance back and passing",
            &rec["from_consul_answering"],
        );
        latency_row(
            &mut md,
            "Consul has a leader → instance back and passing",
            &rec["from_leader_elected"],
        );
        latency_row(
            &mut md,
            "(Consul: HTTP answering → leader)",
            &rec["leader_after_http"],
        );
        md.push('\n');
    }
    let fp = &r["footprint"];
    if !fp.is_null() {
        md.push_str("## Footprint\n\n| process | window | CPU % of a core | RSS MiB (end / peak) | of which anon / file-backed |\n|---|---|---:|---:|---:|\n");
        for (label, key) in [
            ("consul-registrar, 1 service", "sidecar"),
            (
                "consul-registrar, catalog mode, 1 service",
                "catalog_sidecar",
            ),
            (
                "Consul client agent (per-node alternative)",
                "consul_client_agent",
            ),
        ] {
            for (wlabel, w) in [("idle", "idle"), ("10 flips/s", "ten_flips_per_second")] {
                let u = &fp[key][w];
                if u.is_null() {
                    continue;
                }
                let _ = writeln!(
                    md,
                    "| {label} | {wlabel} ({} s) | {} | {} / {} | {} / {} |",
                    f(&u["seconds"]),
                    f(&u["cpu_percent_of_core"]),
                    f(&u["rss_mib"]),
                    f(&u["rss_peak_in_window_mib"]),
                    f(&u["rss_anon_mib"]),
                    f(&u["rss_file_mib"])
                );
            }
        }
        let _ = writeln!(
            md,
            "\nCPU per flip (beyond idle): {} µs. Binary: consul-registrar {} MiB (stripped release), consul {} MiB. \
             Consul requests per minute while idle: {}.\n",
            f(&fp["sidecar"]["cpu_per_flip_us"]),
            f(&fp["binary_mib"]["consul-registrar"]),
            f(&fp["binary_mib"]["consul"]),
            fp["sidecar"]["consul_requests_per_minute_idle"]
        );
        if !fp["catalog_sidecar"]["consul_requests_per_minute_idle"].is_null() {
            let _ = writeln!(
                md,
                "Catalog mode, Consul requests per minute while idle: {}.\n",
                fp["catalog_sidecar"]["consul_requests_per_minute_idle"]
            );
        }
    }
    if let Some(rows) = r["scale"]["rows"].as_array() {
        let _ = writeln!(
            md,
            "## Scale: one sidecar, many services\n\nConsul agent with `limits {{ {} }}` \
             (default 200; see below).\n",
            r["scale"]["consul_limits"].as_str().unwrap_or("?")
        );
        md.push_str("| services | register all (ms) | all flipped p50 (ms) | CPU per instance flip (µs) | steady CPU % | RSS MiB (steady / high water) | Consul requests/min (steady) |\n|---:|---:|---:|---:|---:|---:|---|\n");
        for x in rows {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} / {} | {} |",
                x["services"],
                f(&x["register_all_ms"]),
                f(&x["all_flipped_ms"]["p50"]),
                f(&x["cpu_per_instance_flip_us"]),
                f(&x["steady"]["cpu_percent_of_core"]),
                f(&x["steady"]["rss_mib"]),
                f(&x["rss_high_water_mib"]),
                x["consul_requests_per_minute_steady"]
            );
        }
        let d = &r["scale"]["default_limits"];
        if !d.is_null() {
            let _ = writeln!(
                md,
                "\nWith Consul's default limits (`http_max_conns_per_client = 200`), {} services: \
                 all passing after {} ms; checks by status after {} s: {}; {} Consul calls refused \
                 (429 past the limit) or failed, and retried. Calls by outcome: {}",
                d["services"],
                f(&d["register_all_ms"]),
                d["seconds"],
                d["checks_by_status"],
                f(&d["consul_errors_total"]),
                d["consul_requests"]
            );
        }
        md.push('\n');
    }
    scale_pods::markdown_pods(&mut md, r);
    let _ = writeln!(
        md,
        "Percentiles are nearest-rank over all samples; \"lost\" counts changes not seen within the deadline. \
         Method: docs/benchmarks.md. Total run time: {} s.",
        f(&r["total_seconds"])
    );
    md
}
