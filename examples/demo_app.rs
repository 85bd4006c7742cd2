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
//! `--tls-cert`/`--tls-key` serve gRPC over TLS.

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
use tonic::codegen::tokio_stream::Stream;
use tonic::{Request as GrpcRequest, Response as GrpcResponse, Status};
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

mod hello {
    tonic::include_proto!("helloworld");
}
use hello::greeter_server::{Greeter, GreeterServer};
use hello::{HelloReply, HelloRequest};

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
    reporter: tonic_health::server::HealthReporter,
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

/// A health service without Watch, for testing the poll fallback.
struct CheckOnlyHealth(Arc<RwLock<BTreeMap<String, ServingStatus>>>);

#[tonic::async_trait]
impl Health for CheckOnlyHealth {
    async fn check(
        &self,
        req: GrpcRequest<HealthCheckRequest>,
    ) -> Result<GrpcResponse<HealthCheckResponse>, Status> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        match map.get(&req.get_ref().service) {
            Some(s) => Ok(GrpcResponse::new(HealthCheckResponse { status: *s as i32 })),
            None => Err(Status::not_found("unknown service")),
        }
    }

    type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

    async fn watch(
        &self,
        _: GrpcRequest<HealthCheckRequest>,
    ) -> Result<GrpcResponse<Self::WatchStream>, Status> {
        Err(Status::unimplemented(
            "Watch is not implemented by this server",
        ))
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
    let mut url = format!("http://{control}/{path}");
    if let Some(s) = service {
        url.push_str(&format!("?service={s}"));
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()?
        .post(&url)
        .send()
        .await?;
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
    let (reporter, health_server) = tonic_health::server::health_reporter();
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

    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let local = listener.local_addr()?;
    let name = args.name.clone().unwrap_or_else(|| local.to_string());

    if let Some(control) = args.control {
        let control_listener = tokio::net::TcpListener::bind(control).await?;
        tokio::spawn(serve_control(control_listener, health.clone()));
    }

    let shutdown = tokio_util::sync::CancellationToken::new();
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
                    _ => {
                        shutdown.cancel();
                        return;
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
    let greeter = GreeterServer::new(GreeterService { name });
    let router = if args.no_watch {
        builder
            .add_service(HealthServer::new(CheckOnlyHealth(Arc::clone(
                &health.statuses,
            ))))
            .add_service(greeter)
    } else {
        builder.add_service(health_server).add_service(greeter)
    };
    println!("demo-app listening on {local}");
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let stop = shutdown.clone();
    router
        .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
        .await?;
    eprintln!("demo-app: stopped");
    Ok(())
}

async fn serve_control(listener: tokio::net::TcpListener, health: HealthState) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
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
        .map(str::to_string);
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
