//! The demo app: the "hello" Greeter gRPC service of the Consul + gRPC tutorial this project grew
//! from, with the standard gRPC health service (tonic-health) for the whole server ("") and for
//! named services. Its serving status can be flipped while it runs, so demos, tests and benchmarks
//! can drive readiness:
//!
//! - SIGUSR1 → every health service NOT_SERVING; SIGUSR2 → SERVING;
//! - the control port (`--control`): `POST /serving`, `POST /not-serving` (`?service=NAME` for one),
//!   `GET /status`; and `demo-app set --control ADDR serving|not-serving` calls it (for
//!   `kubectl exec` into an image without a shell).
//!
//! `--no-watch` serves a health service that answers Watch with UNIMPLEMENTED (Check works), like
//! older servers; `--generate-services N` adds health services `svc-0` … `svc-{N-1}`;
//! `--tls-cert`/`--tls-key` serve gRPC over TLS; `--start-delay 15s` opens the gRPC port only that
//! long after the start (an app that loads for a while: its port is closed meanwhile, and SIGTERM or
//! SIGINT end it at once); `--start not-serving` starts every health service NOT_SERVING (an app that
//! never serves unless flipped).
//!
//! It prints `demo-app listening on <addr>` to stdout once the gRPC port is bound (tests wait for
//! that line) and logs every flip to stderr. SIGTERM or SIGINT stop it gracefully with exit 0: open
//! Watch streams end with UNAVAILABLE so that they cannot hold the shutdown up.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

use clap::{Parser, Subcommand, ValueEnum};
use futures_util::StreamExt;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
use tokio_util::sync::CancellationToken;
use tonic::codegen::tokio_stream::Stream;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use demo_app::hello::greeter_server::{Greeter, GreeterServer};
use demo_app::hello::{HelloReply, HelloRequest};

#[derive(Parser)]
#[command(
    name = "demo-app",
    about = "The tutorial's Greeter gRPC server with a flippable health service"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Serve(ServeArgs),
    /// Flip a running demo app through its control port.
    Set {
        #[arg(long, default_value = "127.0.0.1:8080")]
        control: String,
        status: Wanted,
        /// Only this health service (default: all).
        #[arg(long)]
        service: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Wanted {
    Serving,
    NotServing,
}

#[derive(clap::Args, Clone)]
struct ServeArgs {
    /// gRPC listen address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// HTTP control address (optional).
    #[arg(long)]
    control: Option<SocketAddr>,
    /// Named health services (repeatable).
    #[arg(long = "health-service", default_value = "helloworld.Greeter")]
    health_services: Vec<String>,
    /// Also serve health services svc-0 … svc-{N-1}.
    #[arg(long, default_value_t = 0)]
    generate_services: usize,
    /// Initial status.
    #[arg(long, value_enum, default_value = "serving")]
    start: Wanted,
    /// Answer Watch with UNIMPLEMENTED.
    #[arg(long)]
    no_watch: bool,
    /// Open the gRPC port only this long after the start (`500ms`, `15s`): an app still loading.
    #[arg(long, value_parser = parse_delay, default_value = "0s")]
    start_delay: std::time::Duration,
    /// Name used in replies (defaults to the listen address).
    #[arg(long)]
    name: Option<String>,
    /// Serve gRPC over TLS with this PEM certificate (needs --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The PEM key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
}

/// The current status of every health service, mirrored into tonic-health's reporter.
#[derive(Clone)]
struct HealthState {
    reporter: HealthReporter,
    statuses: Arc<RwLock<BTreeMap<String, ServingStatus>>>,
}

impl HealthState {
    async fn set(&self, service: Option<&str>, status: ServingStatus) -> usize {
        let names: Vec<String> = {
            let map = self.statuses.read().unwrap_or_else(|p| p.into_inner());
            map.keys()
                .filter(|k| service.is_none_or(|s| s == k.as_str()))
                .cloned()
                .collect()
        };
        for name in &names {
            self.reporter.set_service_status(name, status).await;
            self.statuses
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.clone(), status);
        }
        eprintln!("demo-app: {} health service(s) now {status:?}", names.len());
        names.len()
    }

    fn snapshot(&self) -> BTreeMap<String, String> {
        self.statuses
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), format!("{v:?}")))
            .collect()
    }
}

/// tonic-health's standard health service, with two changes: Watch streams end (UNAVAILABLE) when
/// the app shuts down, since a graceful shutdown waits for every open stream; and with `--no-watch`
/// Watch answers UNIMPLEMENTED, like servers that predate it (to test the poll fallback).
struct DemoHealth {
    standard: HealthService,
    watch: bool,
    shutdown: CancellationToken,
}

#[tonic::async_trait]
impl Health for DemoHealth {
    async fn check(
        &self,
        req: GrpcRequest<HealthCheckRequest>,
    ) -> Result<GrpcResponse<HealthCheckResponse>, Status> {
        self.standard.check(req).await
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(
        &self,
        req: GrpcRequest<HealthCheckRequest>,
    ) -> Result<GrpcResponse<Self::WatchStream>, Status> {
        if !self.watch {
            return Err(Status::unimplemented(
                "Watch is not implemented by this server",
            ));
        }
        let updates = self.standard.watch(req).await?.into_inner();
        let until_shutdown = updates
            .take_until(self.shutdown.clone().cancelled_owned())
            .chain(futures_util::stream::once(async {
                Err(Status::unavailable("the demo app is shutting down"))
            }));
        Ok(GrpcResponse::new(Box::pin(until_shutdown)))
    }
}

struct GreeterService {
    name: String,
}

#[tonic::async_trait]
impl Greeter for GreeterService {
    async fn say_hello(
        &self,
        req: GrpcRequest<HelloRequest>,
    ) -> Result<GrpcResponse<HelloReply>, Status> {
        Ok(GrpcResponse::new(HelloReply {
            message: format!("Hello {} from {}", req.into_inner().name, self.name),
        }))
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Set {
            control,
            status,
            service,
        }) => set(&control, status, service).await,
        Some(Command::Serve(args)) => serve(args).await,
        None => serve(cli.serve).await,
    }
}

async fn set(control: &str, status: Wanted, service: Option<String>) -> anyhow::Result<()> {
    let path = match status {
        Wanted::Serving => "serving",
        Wanted::NotServing => "not-serving",
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut req = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .post(format!("http://{control}/{path}"));
    if let Some(s) = service {
        req = req.query(&[("service", s)]);
    }
    let resp = req.send().await?;
    let ok = resp.status().is_success();
    println!("{}", resp.text().await.unwrap_or_default().trim());
    anyhow::ensure!(ok, "the demo app refused");
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let initial = match args.start {
        Wanted::Serving => ServingStatus::Serving,
        Wanted::NotServing => ServingStatus::NotServing,
    };
    let reporter = HealthReporter::new();
    let mut names: Vec<String> = vec![String::new()];
    names.extend(args.health_services.iter().cloned());
    names.extend((0..args.generate_services).map(|i| format!("svc-{i}")));
    let health = HealthState {
        reporter,
        statuses: Arc::new(RwLock::new(
            names.iter().map(|n| (n.clone(), initial)).collect(),
        )),
    };
    for n in &names {
        health.reporter.set_service_status(n, initial).await;
    }

    // Still loading: nothing listens yet, and a signal ends the app at once (as the default
    // action of SIGTERM would for a process that has not set up its shutdown yet).
    if !args.start_delay.is_zero() {
        eprintln!(
            "demo-app: loading for {:?} before opening the gRPC port",
            args.start_delay
        );
        let mut early = signal_hook_tokio::Signals::new([SIGTERM, SIGINT])?;
        let handle = early.handle();
        tokio::select! {
            () = tokio::time::sleep(args.start_delay) => {}
            Some(sig) = early.next() => {
                eprintln!("demo-app: signal {sig} while loading, exiting");
                std::process::exit(0);
            }
        }
        handle.close();
    }

    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let local = listener.local_addr()?;
    let name = args.name.clone().unwrap_or_else(|| local.to_string());

    let shutdown = CancellationToken::new();
    if let Some(control) = args.control {
        let control_listener = tokio::net::TcpListener::bind(control).await?;
        tokio::spawn(serve_control(
            control_listener,
            health.clone(),
            shutdown.clone(),
        ));
    }

    let mut signals = signal_hook_tokio::Signals::new([SIGUSR1, SIGUSR2, SIGTERM, SIGINT])?;
    {
        let health = health.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            while let Some(sig) = signals.next().await {
                match sig {
                    SIGUSR1 => {
                        health.set(None, ServingStatus::NotServing).await;
                    }
                    SIGUSR2 => {
                        health.set(None, ServingStatus::Serving).await;
                    }
                    _ if shutdown.is_cancelled() => {
                        eprintln!("demo-app: second signal {sig}, exiting at once");
                        std::process::exit(1);
                    }
                    _ => {
                        eprintln!("demo-app: signal {sig}, shutting down");
                        shutdown.cancel();
                    }
                }
            }
        });
    }

    let mut builder = tonic::transport::Server::builder().max_concurrent_streams(100_000u32);
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let identity =
            tonic::transport::Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?);
        builder =
            builder.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
    }
    let health_service = DemoHealth {
        standard: HealthService::from_health_reporter(health.reporter.clone()),
        watch: !args.no_watch,
        shutdown: shutdown.clone(),
    };
    let router = builder
        .add_service(HealthServer::new(health_service))
        .add_service(GreeterServer::new(GreeterService { name }));
    println!("demo-app listening on {local}");
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let stop = shutdown.clone();
    let server =
        router.serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await });
    // A client that keeps a unary call open could still hold the graceful shutdown up: bound it.
    let overdue = async {
        shutdown.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        served = server => served?,
        () = overdue => eprintln!("demo-app: connections still open after {SHUTDOWN_GRACE:?}, closing them"),
    }
    eprintln!("demo-app: stopped");
    Ok(())
}

/// `--start-delay`: a number with a unit (`ms`, `s`, `m`), or `0`.
fn parse_delay(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?} has no unit (ms, s or m)"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 15s)"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s or m)")),
    };
    std::time::Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// How long a graceful shutdown may wait for open calls.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

async fn serve_control(
    listener: tokio::net::TcpListener,
    health: HealthState,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. out of file descriptors: do not spin.
                eprintln!("demo-app: control port accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let health = health.clone();
                async move { Ok::<_, Infallible>(control(req, &health).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn control(
    req: Request<hyper::body::Incoming>,
    health: &HealthState,
) -> Response<Full<Bytes>> {
    let service = req
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("service=")))
        .map(percent_decode);
    let reply = |code: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = code;
        r
    };
    let status = match (req.method(), req.uri().path()) {
        (&Method::POST, "/serving") => ServingStatus::Serving,
        (&Method::POST, "/not-serving") => ServingStatus::NotServing,
        (&Method::GET, "/status") => {
            return reply(
                StatusCode::OK,
                serde_json::to_string(&health.snapshot()).unwrap_or_default(),
            );
        }
        _ => return reply(StatusCode::NOT_FOUND, "not found\n".into()),
    };
    match health.set(service.as_deref(), status).await {
        0 => reply(StatusCode::NOT_FOUND, "no such health service\n".into()),
        n => reply(
            StatusCode::OK,
            format!("{n} health service(s) now {status:?}\n"),
        ),
    }
}

/// Decodes a query-string value (`%XX` escapes and `+` for space); malformed escapes stay as is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
